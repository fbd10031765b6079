"""Workloads W1–W6 of BENCHMARKS.md, run through pipeproc's public API.

Run through the suite: `.venv/bin/python -m benchmarks [--quick] [--only W1,W5]`.

Each function takes a connected client (and sizes) and returns a dict with at least
``figure`` (the workload's figure: commits/s, logs/s or cycles/s). Warmup is untimed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from ._common import body, median, percentile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fill(pp: Any, topic: str, n: int, batch: int = 1000, start: int = 0) -> List[str]:
    """Commit ``n`` logs to ``topic`` in batches (untimed set-up); returns the last ids of
    each batch."""
    last = []
    for s in range(start, start + n, batch):
        ids = pp.commit([{"topic": topic, "body": body(i)}
                         for i in range(s, min(start + n, s + batch))])
        last.append(ids[-1])
    return last


def _m(meter, op: str, *a: Any) -> None:
    if meter is not None:
        getattr(meter, op)(*a)


def _mres(meter, client: bool = True) -> Dict[str, Any]:
    return meter.result(client) if meter is not None else {}


def w1(pp: Any, n: int, rounds: int = 5, warmup: int = 200, between=None,
       meter=None) -> Dict[str, Any]:
    """Sequential single-log commits, one client: median round rate, median latency.

    ``between()``, when given, runs (untimed) before each round and after the last."""
    commit = pp.commit
    for i in range(warmup):
        commit({"topic": "w1warm", "body": body(i)})
    per = max(1, n // rounds)
    rates, lat = [], []
    i = 0
    for _ in range(rounds):
        if between is not None:
            between()
        _m(meter, "start")
        t0 = time.perf_counter()
        for _ in range(per):
            t = time.perf_counter()
            commit({"topic": "w1", "body": body(i)})
            lat.append(time.perf_counter() - t)
            i += 1
        rates.append(per / (time.perf_counter() - t0))
        _m(meter, "stop", per)
    if between is not None:
        between()
    return {"figure": median(rates), "median_latency": median(lat),
            "p99_latency": percentile(lat, 99), "n": i, **_mres(meter)}


def w2(pp: Any, n: int, batch: int = 1000, topic: str = "w2", meter=None) -> Dict[str, Any]:
    """``n`` logs in atomic batches of ``batch``: logs/s."""
    fill(pp, "w2warm", 5 * batch, batch)
    commit = pp.commit
    lat = []
    _m(meter, "start")
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        items = [{"topic": topic, "body": body(i)} for i in range(s, min(n, s + batch))]
        t = time.perf_counter()
        commit(items)
        lat.append(time.perf_counter() - t)
    dt = time.perf_counter() - t0
    _m(meter, "stop", n)
    return {"figure": n / dt, "median_batch_latency": median(lat), "n": n, **_mres(meter)}


def _scan(pp: Any, topic: str, page: int) -> int:
    got = 0
    start: Optional[str] = None
    rng = pp.range
    while True:
        logs = rng(topic, start=start, exclusive=True, limit=page) if start else \
            rng(topic, limit=page)
        if not logs:
            return got
        got += len(logs)
        start = logs[-1].id


def w3(pp: Any, topic: str, n: int, rounds: int = 3, page: int = 1000,
       meter=None) -> Dict[str, Any]:
    """Read an ``n``-log topic in pages of ``page``: median round rate in logs/s."""
    assert _scan(pp, topic, page) == n  # warmup pass (also checks the count)
    rates = []
    for _ in range(rounds):
        _m(meter, "start")
        t0 = time.perf_counter()
        got = _scan(pp, topic, page)
        rates.append(got / (time.perf_counter() - t0))
        _m(meter, "stop", got)
        assert got == n, (got, n)
    return {"figure": median(rates), "n": n, **_mres(meter)}


def w4(pp: Any, topic: str, name: str, count: int, warmup_cycles: int,
       meter=None) -> Dict[str, Any]:
    """proc(count) then ack until proc returns nothing: cycles/s (count=1) or logs/s.

    The first ``warmup_cycles`` cycles are untimed."""
    proc, ack = pp.proc, pp.ack
    for _ in range(warmup_cycles):
        got = proc(topic, name=name, count=count)
        assert got is not None
        ack(name)
    cycles = logs = 0
    _m(meter, "start")
    t0 = time.perf_counter()
    while True:
        got = proc(topic, name=name, count=count)
        if got is None:
            break
        ack(name)
        cycles += 1
        logs += 1 if count == 1 else len(got)
    dt = time.perf_counter() - t0
    _m(meter, "stop", cycles if count == 1 else logs)
    fig = cycles / dt if count == 1 else logs / dt
    return {"figure": fig, "cycles": cycles, "logs": logs, "cycle_us": dt / max(cycles, 1) * 1e6,
            **_mres(meter)}


def w5(pp: Any, n: int, count: int, suffix: str, timeout: float,
       meter=None) -> Dict[str, Any]:
    """A system proc a -> b (``{"n": i + 1}``), node with 2 workers: time until ``b`` has
    ``n`` logs, from the system_proc call. Returns logs/s."""
    from . import processors
    src, dst = f"a{suffix}", f"b{suffix}"
    fill(pp, src, n)
    fn = processors.incr if count == 1 else processors.incr_batch
    _m(meter, "start")
    t0 = time.perf_counter()
    pp.system_proc(name=f"w5{suffix}", from_=src, processor=fn, to=dst, count=count)
    got = 0
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        try:
            got = pp.length(dst)
        except Exception as exc:  # invalid_topic until the first result lands
            if getattr(exc, "code", None) != "invalid_topic":
                raise
            got = 0
        if got >= n:
            break
        time.sleep(0.005)
    dt = time.perf_counter() - t0
    _m(meter, "stop", got)
    out = {"figure": got / dt, "n": got, "seconds": dt, **_mres(meter, client=False)}
    if got < n:
        out["note"] = f"timeout: only {got}/{n} after {timeout:.0f} s"
    else:
        first = pp.range(dst, limit=1)[0].body
        if not isinstance(first, dict) or "n" not in first:
            out["note"] = f"unexpected body in {dst}: {first!r}"
    return out


def w5_warmup(pp: Any, timeout: float = 60.0) -> None:
    """Have both workers import the processors module before timing (untimed)."""
    from . import processors
    fill(pp, "w5warm", 200, batch=100)
    pp.system_proc(name="w5warm", from_="w5warm", processor=processors.incr, to="w5warmout")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pp.length("w5warmout") >= 200:
                return
        except Exception:
            pass
        time.sleep(0.01)
    raise RuntimeError("W5 warmup: the workers did not process 200 logs in time")


def w6(location: str, n_each: int, clients: int = 4, topic: str = "w6",
       meter=None) -> Dict[str, Any]:
    """``clients`` processes commit ``n_each`` single logs each, released together by a start
    barrier; total commits/s over [first start, last end]."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = []
    try:
        for c in range(clients):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks._w6client", location, topic, str(n_each), str(c)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env, text=True))
        for p in procs:
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"W6 client failed to start (said {line!r})")
        _m(meter, "start")
        for p in procs:  # the barrier: every client is connected and warm; release all
            p.stdin.write("go\n")
            p.stdin.flush()
        res = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("W6 client died")
            res.append(json.loads(line))
        _m(meter, "stop", clients * n_each)
        for p in procs:
            p.stdin.close()
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    start = min(r["start"] for r in res)
    end = max(r["end"] for r in res)
    total = clients * n_each
    return {"figure": total / (end - start), "n": total, "seconds": end - start,
            "client_median_latency": median([r["median"] for r in res]),
            "start_skew": max(r["start"] for r in res) - start, **_mres(meter, client=False)}
