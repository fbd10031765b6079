"""``pipeproc demo --flow`` (act 2 of ``make demo``): a durable order workflow, live.

What it does, in order:

1. spawns a node on ``location`` (default ``./pipeproc_data``) with two workers, or connects
   to the node already running there, and opens a :class:`pipeproc.flow.Engine` on it;
2. starts one run of :data:`pipeproc.demo_flows.order` (``order-N``, N counting the orders
   already in the store), whose steps write their side effects to
   ``<location>/demo-flow-effects.jsonl``;
3. follows the run and its child, printing each event of their history as it is recorded:
   the flaky payment's failed tries and retries, the steps' results, the durable sleep, the
   child run;
4. meanwhile acts on it like the outside world would: when the ``pack`` step has begun, it
   kills that worker with SIGKILL (the run goes on in a new attempt, replaying the recorded
   steps from its journal and running ``pack`` again); when the run waits for approval, it
   sends the ``approval`` signal;
5. prints the run's result and, from the effects file, how many times each step's code ran:
   every step whose result is in the journal must have completed exactly once
   (``each completed step ran once: yes``), the interrupted one shows its extra try.

Exit code 0 when the run finished and every completed step ran once, 1 otherwise.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from pipeproc import flow

from . import demo_flows
from ._demo import _location_option, cli_command, demo_node
from ._protocol import BUSY_POLL
from ._text import as_dict, dumps, shorten, table

TERMINAL = ("finished", "failed", "aborted", "cancelled", "rejected")
STALL_TIMEOUT = 120.0  # seconds the run may take before the demo gives up
ITEMS = {"espresso-beans": 2, "grinder": 1}
PACK_SECONDS = 2.0
SLEEP_SECONDS = 1.5

#: a line of the live view: (epoch seconds, source, text); sources in their order within
#: a millisecond: the code that ran (the effects file), the demo's actions, the journal
Item = Tuple[float, int, str]
CODE, DEMO, JOURNAL = 0, 1, 2


class _Live:
    """Event lines scrolling above one status line (redrawn in place on a terminal; not
    shown otherwise, where the event lines are the progress)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def line(self, text: str) -> None:
        if self.tty and self.last:
            self.stream.write("\r" + " " * len(self.last) + "\r")
        self.stream.write(text + "\n")
        if self.tty and self.last:
            self.stream.write(self.last)
        self.stream.flush()

    def status(self, text: str) -> None:
        if not self.tty:
            return
        pad = max(0, len(self.last) - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self.last = text

    def end(self) -> None:
        if self.tty and self.last:
            self.stream.write("\r" + " " * len(self.last) + "\r")
            self.stream.flush()
            self.last = ""


def run(*, location: Optional[str] = None, workers: int = 2, durability: str = "full",
        busy_poll: float = BUSY_POLL) -> int:
    """Run act 2; returns a CLI exit code (0 ok, 1 the demo's checks failed, 3 no node)."""
    location = location or "./pipeproc_data"
    print(f"pipeproc demo --flow: a durable order workflow ({workers} workers, store "
          f"{os.path.abspath(location)})")
    with demo_node(location, workers, durability, busy_poll, "workflow") as pp, \
            flow.Engine(pp) as engine:
        return _act(pp, engine, os.path.abspath(location))


def _start(engine: Any, effects: str) -> Any:
    """Start ``order-N`` with the first N not taken."""
    n = len(engine.runs(workflow=demo_flows.order.name)) + 1
    if n > 1:
        print(f"continuing on an existing store: {n - 1} earlier order(s)")
    while True:
        run = engine.start(demo_flows.order, ITEMS, effects, PACK_SECONDS, SLEEP_SECONDS,
                           id=f"order-{n}")
        if run.created:
            return run
        n += 1


def _act(pp: Any, engine: Any, location: str) -> int:
    if not pp.stats().get("workers"):
        print("pipeproc demo: the node has no workers, nothing would run the workflow "
              "(start it with --workers N)", file=sys.stderr)
        return 1
    effects = os.path.join(location, demo_flows.EFFECTS_FILE)
    print("  reserve -> charge (flaky, retried) -> pack (its worker gets kill -9) -> durable "
          "sleep -> approval signal -> child run demo-shipping -> receipt")
    print(f"  side effects of every step are counted in {effects}")
    print()
    t0 = time.time()
    run = _start(engine, effects)
    follow = _Follow(engine, run.id, t0)
    live = _Live(sys.stdout)
    killed: List[int] = []
    signalled = 0.0
    seen_effects = 0
    deadline = time.monotonic() + STALL_TIMEOUT
    try:
        while True:
            items = follow.poll()  # (time, text): the journal's new events
            status = follow.status
            # the code running (the effects file), and the outside world acting on the run:
            # kill the worker running `pack`, approve the order
            found = demo_flows.read_effects(effects)
            for e in found[seen_effects:]:
                if not follow.owns(e["run"]) or e["event"] != "start":
                    continue
                who = "" if e["run"] == run.id else "  child "
                items.append((e["t"], CODE, f"{who}worker {e['pid']} runs the code of step "
                                            f"{e['step']!r}"))
                if not killed and e["run"] == run.id and e["step"] == "pack":
                    items.append(_kill_worker(pp, e["pid"], killed))
            seen_effects = len(found)
            if (not signalled and status == "waiting"
                    and any(ev.get("type") == "step" and ev.get("name") == "ask-approval"
                            for ev in follow.events[run.id])):
                engine.signal(run.id, "approval", {"approved": True, "by": "demo"})
                signalled = time.time()
                items.append((signalled, DEMO, "demo: approval signal sent (the run was "
                                               "waiting, holding no worker)"))
            if status in TERMINAL:
                items.extend(follow.poll())
            # by millisecond; within one, the code that ran (the effects) before the demo's
            # actions before the journal's records
            for at, _, text in sorted(items, key=lambda item: (int(item[0] * 1000), item[1])):
                live.line(follow.stamp(at) + text)
            if status in TERMINAL:
                break
            live.status(f"[{time.time() - follow.t0:6.1f}s] {run.id} {status or '?'} "
                        f"(attempt {follow.attempt}) | steps recorded {follow.steps()}"
                        + (f" | child {follow.child_status}" if follow.child_status else ""))
            if time.monotonic() > deadline:
                live.end()
                print(f"pipeproc demo: the run did not end within {STALL_TIMEOUT:.0f} s "
                      f"(status {status}); see `{cli_command()} run {run.id}`", file=sys.stderr)
                return 1
            time.sleep(0.05)
    except KeyboardInterrupt:
        live.end()
        print(f"interrupted; the run goes on when a node runs on this store ({run.id})")
        return 130
    live.end()
    return _summary(engine, run, follow, effects, killed)


def _kill_worker(pp: Any, pid: int, killed: List[int]) -> Item:
    """SIGKILL the worker running ``pack`` (only a pid the node lists as its worker)."""
    pids = {w.get("pid") for w in pp.stats().get("workers", [])}
    if pid not in pids:
        killed.append(0)
        return (time.time(), DEMO,
                f"demo: step 'pack' runs in pid {pid}, not a worker of this node: no kill")
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)
    return (time.time(), DEMO, f"demo: kill -9 worker {pid} while step 'pack' runs (reserve "
                               "and charge are already in the journal)")


class _Follow:
    """Polls a run's history (and its child's) and renders new events as lines."""

    def __init__(self, engine: Any, run_id: str, t0: float) -> None:
        self.engine = engine
        self.run_id = run_id
        self.t0 = t0
        self.events: Dict[str, List[Dict[str, Any]]] = {run_id: []}
        self.status: Optional[str] = None
        self.attempt = 1
        self.child_id: Optional[str] = None
        self.child_status: Optional[str] = None

    def stamp(self, at: float) -> str:
        return f"[{at - self.t0:6.2f}s] "

    def steps(self) -> int:
        return sum(1 for e in self.events[self.run_id] if e.get("type") == "step")

    def owns(self, run_id: str) -> bool:
        """Whether ``run_id`` is the run or one of its children."""
        return run_id == self.run_id or run_id.startswith(self.run_id + "/")

    def poll(self) -> List[Item]:
        """The new events of the run and its child, as items (``JOURNAL``)."""
        items: List[Item] = []
        for rid in [self.run_id] + ([self.child_id] if self.child_id else []):
            try:
                history = [as_dict(e) for e in self.engine.history(rid)]
            except flow.InvalidRun:  # the child is being started
                continue
            for ev in history[len(self.events[rid]):]:
                self.events[rid].append(ev)
                if ev.get("type") == "child" and rid == self.run_id:
                    self.child_id = (ev.get("data") or {}).get("id")
                    if self.child_id:
                        self.events.setdefault(self.child_id, [])
                if ev.get("type") == "status":
                    if rid == self.run_id:
                        self.status = ev.get("name")
                        self.attempt = (ev.get("data") or {}).get("attempt") or self.attempt
                    else:
                        self.child_status = ev.get("name")
                who = "" if rid == self.run_id else "  child "
                items.append(((ev.get("ts") or 0) / 1000, JOURNAL, who + describe(ev)))
        return items


def describe(ev: Dict[str, Any]) -> str:
    """One history event in words."""
    kind, name, data = ev.get("type"), ev.get("name"), ev.get("data") or {}
    if kind == "status":
        err = data.get("error")
        why = (f": {err.get('type')}: {err.get('message')}"
               if isinstance(err, dict) and name not in ("running", "finished") else "")
        attempt = f" (attempt {data.get('attempt')})" if data.get("attempt") else ""
        return f"status -> {name}{attempt}{why}"
    if kind == "step":
        return f"step {name!r} done -> {shorten(dumps(data.get('result')), 90)}"
    if kind == "retry":
        err = data.get("error") or {}
        return (f"step {name!r} try {data.get('attempt')} failed ({err.get('type')}: "
                f"{err.get('message')}); retry in {data.get('wait')} s")
    if kind == "step_failed":
        return f"step {name!r} failed: {shorten(dumps(data.get('error')), 90)}"
    if kind == "sleep":
        due = data.get("due") or 0
        return (f"durable sleep {name!r} for {max(0.0, due - (ev.get('ts') or 0) / 1000):.1f} s "
                "(the run waits, holding no worker)")
    if kind == "timer":
        return f"waiting for signal {name!r} (with a timeout)"
    if kind == "signal":
        return f"signal {name!r} arrived: {shorten(dumps(data.get('payload')), 60)}"
    if kind == "wait":
        return f"wait for {name!r} -> {shorten(dumps(data.get('payload')), 60)}"
    if kind in ("child", "start"):
        return f"{kind} run {data.get('id')} ({name})"
    if kind in ("now", "random", "uuid"):
        return f"ctx.{kind}() -> {data.get('value')} (recorded: the same on every replay)"
    if kind == "log":
        return f"log {name!r} {shorten(dumps(data.get('fields')), 60)}"
    return f"{kind} {name!r} {shorten(dumps(data), 80)}"


def _counts(effects: str, run_ids: Set[str]) -> Dict[Tuple[str, str], Dict[str, int]]:
    """(run, step) -> counts of start/done/fail lines, in order of first appearance."""
    out: Dict[Tuple[str, str], Dict[str, int]] = {}
    for e in demo_flows.read_effects(effects):
        if e["run"] in run_ids:
            c = out.setdefault((e["run"], e["step"]), {"start": 0, "done": 0, "fail": 0})
            c[e["event"]] = c.get(e["event"], 0) + 1
    return out


def _summary(engine: Any, run: Any, follow: _Follow, effects: str, killed: List[int]) -> int:
    info = as_dict(run.info())
    ok = info.get("status") == "finished"
    print()
    if ok:
        result = run.result(timeout=5.0)
        print(f"{run.id} finished after {info.get('attempt')} attempt(s): "
              f"{shorten(dumps(result), 200)}")
    else:
        print(f"{run.id} ended {info.get('status')}: {info.get('error')}", file=sys.stderr)
    ids = [run.id] + ([follow.child_id] if follow.child_id else [])
    recorded = {(rid, str(e.get("name"))) for rid in ids
                for e in (as_dict(x) for x in engine.history(rid)) if e.get("type") == "step"}
    counts = _counts(effects, set(ids))
    rows = []
    for (rid, step), c in counts.items():
        interrupted = c["start"] - c["done"] - c["fail"]
        rows.append([rid, step, c["start"], c["fail"], interrupted, c["done"],
                     "yes" if (rid, step) in recorded else "no"])
    print()
    print(table(["RUN", "STEP", "TRIES", "FAILED", "INTERRUPTED", "COMPLETED", "IN JOURNAL"],
                rows, right=(2, 3, 4, 5)))
    print()
    once = bool(recorded) and all(counts.get(k, {}).get("done") == 1 for k in recorded) \
        and all(c["done"] <= 1 for c in counts.values())
    retries = counts.get((run.id, "charge"), {}).get("fail", 0)
    pack = counts.get((run.id, "pack"), {"start": 0, "done": 0, "fail": 0})
    notes = [("retries", f"charge failed {retries} time(s) and was retried inside the attempt "
                         "(retry events in the history)")]
    if killed and killed[0]:
        notes.append(("worker kill", f"worker {killed[0]} killed in 'pack'; the next attempt "
                                     "replayed reserve and charge from the journal and ran pack "
                                     f"again ({pack['start']} tries, {pack['done']} completed)"))
    else:
        notes.append(("worker kill", "no worker was killed (the step did not run in a worker "
                                     "of this node)"))
    for k, v in notes:
        print(f"{k:<12} {v}")
    print(f"each completed step ran once: {'yes' if once else 'no'}")
    print()
    cmd = cli_command()
    where = _location_option(os.path.dirname(effects))
    print(f"to look around, run `{cmd} node{where}` and in another shell "
          f"`{cmd} runs{where}` or `{cmd} run {run.id}{where}`")
    return 0 if ok and once else 1
