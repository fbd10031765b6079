"""DBOS Transact side of the flow benchmarks F1–F6, run in child processes by
`.venv/bin/python -m benchmarks.flow` when ``dbos`` is importable (``pip install dbos``; it is
not a dependency of pipeproc).

    python -m benchmarks.dbos_flow bench --sysdb PATH [--only F1,F3] [--quick] [--listener S]
    python -m benchmarks.dbos_flow f6-start --sysdb PATH --effects FILE --n 500
    python -m benchmarks.dbos_flow f6-recover --sysdb PATH --effects FILE --n 500 --out FILE

``bench`` prints one JSON object (workload → figures) as its last line. ``f6-start`` starts
``n`` runs of the effects workflow, prints ``started`` and waits to be killed (the parent
sends SIGKILL mid-run); ``f6-recover`` launches DBOS on the same system database (DBOS
recovers the pending workflows of executor ``local`` at launch), waits until all ``n`` have
succeeded and writes the timings and every run's result to ``--out``.

DBOS settings: its default system database, SQLite (``sqlite:///PATH``; DBOS sets no
``journal_mode``/``synchronous`` pragma, so SQLite's defaults apply: rollback journal,
``synchronous=FULL`` — every step is committed and fsynced before the next, the durability
of pipeproc's ``durability="full"``), default pool and executor threads, ``log_level``
WARNING, ``application_version`` ``"bench"`` (so the recovering process recovers the runs
of the killed one), and ``notification_listener_polling_interval_sec`` left at its default
(1 s) unless ``--listener`` is given (F5 is also measured with 0.01 s; on SQLite a ``recv``
wakes when that loop next polls, so F5 sends its message 50 ms after the run reached ``recv``
plus a random part of one interval: a random phase of the loop, as a real signal has). Workflows are started
with ``DBOS.start_workflow`` and awaited with ``handle.get_result()`` (a future in the same
process, no polling).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

from dbos import DBOS, DBOSConfig, SetWorkflowID

from benchmarks.flow_workflows import side_effect


# ------------------------------------------------------------------ steps and workflows

@DBOS.step(name="noop")
def s_noop(k: int) -> int:
    """A trivial step: returns its argument."""
    return k


@DBOS.step(name="wall_clock")
def s_wall_clock() -> float:
    """A step that returns the wall clock (epoch seconds) when it runs."""
    return time.time()


@DBOS.step(name="effect")
def s_effect(path: str, run_id: str, k: int) -> str:
    """The same side effect as the pipeproc side's steps."""
    return side_effect(path, run_id, k)


@DBOS.workflow(name="steps")
def steps(n: int) -> int:
    """F1, F2, F3: ``n`` no-op steps one after another."""
    for k in range(n):
        s_noop(k)
    return n


@DBOS.workflow(name="sleeper")
def sleeper(seconds: float) -> float:
    """F4: ``DBOS.sleep``; returns the lateness of the wake-up (seconds), measured as in
    ``benchmarks.flow_workflows.sleeper`` (the clock is read right before the sleep)."""
    t = time.time()
    DBOS.sleep(seconds)
    woke = s_wall_clock()
    return woke - (t + seconds)


_waiting: Dict[str, threading.Event] = {}


@DBOS.workflow(name="waiter")
def waiter() -> Any:
    """F5: ``DBOS.recv`` on topic ``go``; returns the message. Sets its entry of ``_waiting``
    (when there is one) right before it waits."""
    ev = _waiting.get(DBOS.workflow_id or "")
    if ev is not None:
        ev.set()
    return DBOS.recv("go", timeout_seconds=120)


_go = threading.Event()


@DBOS.workflow(name="effects")
def effects(path: str, n: int) -> List[str]:
    """F6: ``n`` steps with a side effect each; returns the recorded nonces, in order. Waits
    first for ``_go`` (a start barrier of the benchmark, not durable: ``f6-start`` sets it
    once all runs are started, ``f6-recover`` before it launches DBOS), so that the node is
    killed mid-run rather than while runs are still being started."""
    _go.wait(120)
    wid = DBOS.workflow_id or ""
    return [s_effect(path, wid, k) for k in range(n)]


# ------------------------------------------------------------------ set-up

def config(sysdb: str, listener: Optional[float] = None) -> DBOSConfig:
    """The DBOS configuration used by every command (see the module docstring)."""
    cfg: DBOSConfig = {"name": "pipeproc-flow-bench",
                       "system_database_url": f"sqlite:///{sysdb}",
                       "log_level": "WARNING",
                       "application_version": "bench"}
    if listener is not None:
        cfg["notification_listener_polling_interval_sec"] = listener
    return cfg


def _pct(xs: List[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))]


# ------------------------------------------------------------------ workloads

def f1(n: int) -> Dict[str, Any]:
    for _ in range(max(5, n // 20)):  # warmup
        DBOS.start_workflow(steps, 10).get_result()
    t0 = time.perf_counter()
    for _ in range(n):
        DBOS.start_workflow(steps, 10).get_result()
    dt = time.perf_counter() - t0
    n1 = max(10, n // 2)
    t1 = time.perf_counter()
    for _ in range(n1):
        DBOS.start_workflow(steps, 1).get_result()
    dt1 = time.perf_counter() - t1
    return {"figure": n / dt, "step_s": dt / (10 * n),
            "marginal_step_s": (dt / n - dt1 / n1) / 9, "run_s": dt / n, "n": n}


def f2(n: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    hs = [DBOS.start_workflow(steps, 10) for _ in range(n)]
    for h in hs:
        h.get_result()
    dt = time.perf_counter() - t0
    return {"figure": n / dt, "n": n}


def f3(n: int) -> Dict[str, Any]:
    for _ in range(5):
        DBOS.start_workflow(steps, 1).get_result()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        DBOS.start_workflow(steps, 1).get_result()
        lat.append(time.perf_counter() - t)
    return {"figure": statistics.median(lat), "p99": _pct(lat, 99), "n": n}


def f4(n: int, seconds: float = 0.2) -> Dict[str, Any]:
    hs = [DBOS.start_workflow(sleeper, seconds) for _ in range(n)]
    late = [h.get_result() for h in hs]
    return {"figure": statistics.median(late), "p99": _pct(late, 99), "max": max(late),
            "n": n}


def f5(n: int, interval: float) -> Dict[str, Any]:
    """``interval``: the notification listener's polling interval (seconds)."""
    lat, send = [], []
    for i in range(n):
        wid = f"f5-{uuid.uuid4().hex}"
        ev = _waiting[wid] = threading.Event()
        with SetWorkflowID(wid):
            h = DBOS.start_workflow(waiter)
        if not ev.wait(30):
            raise RuntimeError("the DBOS waiter did not start")
        # let it reach its wait inside recv, then send at a random phase of the notification
        # listener's polling loop (a send in step with the loop would always wait ~1 interval)
        time.sleep(0.05 + random.random() * interval)
        t = time.perf_counter()
        DBOS.send(wid, i, topic="go")
        send.append(time.perf_counter() - t)
        if h.get_result() != i:
            raise RuntimeError("wrong message")
        lat.append(time.perf_counter() - t)
        del _waiting[wid]
    return {"figure": statistics.median(lat), "p99": _pct(lat, 99),
            "send_median": statistics.median(send), "n": n}


def bench(a: argparse.Namespace) -> None:
    only = set(a.only.split(",")) if a.only else {"F1", "F2", "F3", "F4", "F5"}
    s = 10 if a.quick else 1
    DBOS(config=config(a.sysdb, a.listener))
    DBOS.launch()
    out: Dict[str, Any] = {}
    try:
        todo = [("F1", lambda: f1(200 // s)), ("F2", lambda: f2(200 // s)),
                ("F3", lambda: f3(200 // s)), ("F4", lambda: f4(50)),
                ("F5", lambda: f5(max(5, (10 if a.listener is None else 50) // s),
                                  1.0 if a.listener is None else a.listener))]
        for name, fn in todo:
            if name in only:
                print(f"  DBOS {name} ...", file=sys.stderr, flush=True)
                try:
                    out[name] = fn()
                except Exception as exc:  # one broken workload must not sink the others
                    out[name] = {"figure": None, "note": f"error: {type(exc).__name__}: {exc}"}
    finally:
        DBOS.destroy()
    print(json.dumps(out))


# ------------------------------------------------------------------ F6

def f6_start(a: argparse.Namespace) -> None:
    DBOS(config=config(a.sysdb))
    DBOS.launch()
    for i in range(a.n):
        with SetWorkflowID(f"f6-{i}"):
            DBOS.start_workflow(effects, a.effects, 10)
    print("started", flush=True)
    _go.set()
    time.sleep(3600)  # killed by the parent


def f6_recover(a: argparse.Namespace) -> None:
    _go.set()
    t_launch = time.time()
    DBOS(config=config(a.sysdb))
    DBOS.launch()
    t_launched = time.time()
    try:
        deadline = time.monotonic() + a.timeout
        while True:
            done = DBOS.list_workflows(status="SUCCESS", workflow_id_prefix="f6-",
                                       load_input=False, load_output=False)
            if len(done) >= a.n:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(done)} of {a.n} finished in {a.timeout} s")
            time.sleep(0.02)
        t_done = time.time()
        res = {w.workflow_id: w.output for w in
               DBOS.list_workflows(workflow_id_prefix="f6-", load_input=False)}
    finally:
        DBOS.destroy()
    with open(a.out, "w") as f:
        json.dump({"t_launch": t_launch, "t_launched": t_launched, "t_done": t_done,
                   "results": res}, f)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dbos_flow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["bench", "f6-start", "f6-recover"])
    ap.add_argument("--sysdb", required=True)
    ap.add_argument("--only")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--listener", type=float)
    ap.add_argument("--effects")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--out")
    ap.add_argument("--timeout", type=float, default=300.0)
    a = ap.parse_args(argv)
    {"bench": bench, "f6-start": f6_start, "f6-recover": f6_recover}[a.command](a)


if __name__ == "__main__":
    main()
