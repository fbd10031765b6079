"""Workflows and step functions used by tests/test_flow_*.py (FLOW.md §1–4).

Workers import these as ``procmods.flowmods:<name>`` (tests/ is on the spawning process's
``sys.path``, which workers inherit). Every workflow is a module-level function decorated
at import, so the test process and the workers define the same workflows.

Side effects that must be counted across attempts, dead workers and restarted nodes are
lines appended to a file whose path the test passes in (``append`` / ``read_lines``):
nothing of pipeproc is involved in counting them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import pipeproc
from pipeproc import flow

GATE_TIMEOUT = 30.0  # a gate nobody opens (a failed test) lets its step go after this


# ---------------------------------------------------------------- side effects


def append(path: str, line: str) -> None:
    """Append one line to ``path`` (one ``write`` of a whole line, flushed at close)."""
    with open(path, "a") as f:
        f.write(line + "\n")


def read_lines(path: Any) -> list[str]:
    """The lines of ``path`` so far (``[]`` when it does not exist yet)."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def count(path: Any, tag: str) -> int:
    """How many lines of ``path`` are ``tag`` or start with ``tag + " "``."""
    return sum(1 for line in read_lines(path) if line == tag or line.startswith(tag + " "))


def wait_file(path: str, timeout: float = GATE_TIMEOUT) -> None:
    """Poll until ``path`` exists (at most ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def fail_once(path: str, tag: str) -> None:
    """Raise (escaping the workflow: a failed attempt) the first time only, so that the
    function runs again from the top; called in a workflow's body, not in a step."""
    if tag not in read_lines(path):
        append(path, tag)
        raise RuntimeError(f"{tag}: failing this attempt once")


# ---------------------------------------------------------------- step functions


def tick(path: str, tag: str, value: Any = None) -> Any:
    """A step's side effect: one line ``tag``; returns ``value``."""
    append(path, tag)
    return value


def stamp(path: str, tag: str, value: Any = None) -> Any:
    """One line ``"<tag> <time.time()> <pid>"``; returns ``value``."""
    append(path, f"{tag} {time.time():.6f} {os.getpid()}")
    return value


def gated(path: str, tag: str, gate: str, value: Any = None) -> Any:
    """``"<tag>:start <pid>"``, then wait for the file ``gate``, then ``"<tag>:end"``."""
    append(path, f"{tag}:start {os.getpid()}")
    wait_file(gate)
    append(path, f"{tag}:end")
    return value


def block_first(path: str, tag: str, value: Any = None) -> Any:
    """``"<tag>:start <pid> <json value>"``; the first execution then blocks (for a test to
    kill its worker or its node); any later one returns at once."""
    first = not any(line.startswith(f"{tag}:start ") for line in read_lines(path))
    append(path, f"{tag}:start {os.getpid()} {json.dumps(value)}")
    if first:
        time.sleep(GATE_TIMEOUT)
    append(path, f"{tag}:end")
    return value


def slow_first(path: str, tag: str, secs: float) -> str:
    """The first execution sleeps ``secs`` and returns ``"late"`` (writing ``<tag>:late-done``
    before it returns); any later one returns ``"fresh"`` at once."""
    first = not any(line.startswith(f"{tag}:start ") for line in read_lines(path))
    append(path, f"{tag}:start {os.getpid()}")
    if first:
        time.sleep(secs)
        append(path, f"{tag}:late-done")
        return "late"
    return "fresh"


def hold(path: str, tag: str, secs: float) -> None:
    """``"<tag> start <t>"``, sleep ``secs``, ``"<tag> end <t>"`` (concurrency measurements)."""
    append(path, f"{tag} start {time.time():.6f}")
    time.sleep(secs)
    append(path, f"{tag} end {time.time():.6f}")


def fail_times(path: str, tag: str, fails: int, value: Any = None) -> Any:
    """Line ``"<tag> <time>"`` per try; the first ``fails`` tries raise ValueError."""
    k = count(path, tag)
    append(path, f"{tag} {time.time():.6f}")
    if k < fails:
        raise ValueError(f"{tag} try {k + 1} failed")
    return value


def always_fail(path: str, tag: str) -> None:
    append(path, tag)
    raise ValueError(f"{tag} failed")


def raise_local(path: str, tag: str) -> None:
    """Raises an exception whose type cannot be rebuilt elsewhere (a local class)."""

    class Weird(Exception):
        pass

    append(path, tag)
    raise Weird("odd failure")


def raise_reject(path: str, tag: str) -> None:
    append(path, tag)
    raise flow.Reject("the step rejects it")


def raise_nondeterminism(path: str, tag: str) -> None:
    append(path, tag)
    raise flow.NonDeterminism("raised by a step")


def make_set() -> Any:
    return {1, 2}


def make_tuple() -> Any:
    return (1, (2, 3))


def only_os_errors(exc: BaseException) -> bool:
    """A ``Retry.transient``: only OSError is worth another try."""
    return isinstance(exc, OSError)


def everything_transient(exc: BaseException) -> bool:
    return True


async def aslow(path: str, tag: str, delay: float, value: Any) -> Any:
    """An ``async def`` step function: sleeps ``delay``, then one line ``tag``."""
    await asyncio.sleep(delay)
    append(path, tag)
    return value


def work(path: str, name: str, arg: Any) -> dict:
    """The step of ``scripted``: one line ``name``, a little time, a result from its input."""
    append(path, name)
    time.sleep(0.05)
    return {"name": name, "arg": arg}


TRANSIENTS = {"only_os_errors": only_os_errors, "everything": everything_transient}


def retry_from(spec: dict | None) -> flow.Retry | None:
    """A ``flow.Retry`` from a payload (``transient`` given by its name in TRANSIENTS)."""
    if spec is None:
        return None
    spec = dict(spec)
    if "transient" in spec:
        spec["transient"] = TRANSIENTS[spec["transient"]]
    return flow.Retry(**spec)


# ---------------------------------------------------------------- workflows: basics


@flow.workflow()
def add(ctx: flow.Context, a: Any, b: Any) -> Any:
    return ctx.step("add", lambda x, y: x + y, a, b)


@flow.workflow()
def echo(ctx: flow.Context, x: Any) -> Any:
    return x


@flow.workflow(name="custom name / not a module path")
def named(ctx: flow.Context, x: Any) -> Any:
    return ctx.step("named", tick_value, x)


def tick_value(x: Any) -> Any:
    return x


@flow.workflow()
def tuple_step(ctx: flow.Context) -> list:
    r = ctx.step("t", make_tuple)
    return [type(r).__name__, type(r[1]).__name__, r]


@flow.workflow()
def ctx_kind(ctx: flow.Context, path: str) -> list:
    """A sync workflow: its context, step keyword arguments, and steps of one name taking
    their occurrences (replayed after fail_once)."""
    a = ctx.step("a", tick, path, "plain", "A")
    kw = ctx.step("kw", tick, path, tag="kw", value={"v": 1})
    same = [ctx.step("same", tick, path, f"same{i}", i) for i in range(3)]
    fail_once(path, "kind")
    return [isinstance(ctx, flow.Context), isinstance(ctx, flow.AsyncContext), a, kw, same]


@flow.workflow()
def sync_with_async_fn(ctx: flow.Context, path: str) -> Any:
    """FLOW.md §2: a step's ``fn`` is any callable, sync or ``async def``."""
    return ctx.step("a", aslow, path, "async-fn", 0.01, "A")


@flow.workflow()
def ctx_bad_args(ctx: flow.Context) -> list:
    """Bad arguments of ctx calls, caught: the code of each error."""
    calls = [
        lambda: ctx.sleep("s", -1),
        lambda: ctx.sleep("s", "1"),
        lambda: ctx.wait_signal(""),
        lambda: ctx.wait_signal("x" * 201),
        lambda: ctx.wait_signal("x", timeout=-1),
        lambda: ctx.signal(ctx.run_id, ""),
        lambda: ctx.signal(ctx.run_id, "x", {1, 2}),
        lambda: ctx.child(echo, 1, id=""),
        lambda: ctx.child("no.such:workflow"),
        lambda: ctx.start(echo, 1, id="x" * 201),
        lambda: ctx.log(5),
    ]
    codes = []
    for call in calls:
        try:
            call()
            codes.append(None)
        except pipeproc.PipeProcError as exc:
            codes.append(exc.code)
    return codes


@flow.workflow()
def whoami(ctx: flow.Context) -> list:
    return [ctx.run_id, ctx.workflow, ctx.parent_id, ctx.attempt]


@flow.workflow()
def count_once(ctx: flow.Context, path: str, tag: str) -> str:
    ctx.step("tick", tick, path, tag)
    return tag


def reject_bad(*args: Any, **kwargs: Any) -> None:
    """A ``validate``: rejects when any argument is ``"bad"``."""
    if "bad" in args or "bad" in kwargs.values():
        raise ValueError("bad argument")


VALIDATE_CALLS: list = []


def record_validate(*args: Any, **kwargs: Any) -> None:
    """A ``validate`` that remembers, in the calling process, what it was called with."""
    VALIDATE_CALLS.append((os.getpid(), list(args), dict(kwargs)))
    reject_bad(*args, **kwargs)


@flow.workflow(validate=record_validate)
def validated(ctx: flow.Context, x: Any, y: Any = None) -> Any:
    return [x, y]


@flow.workflow()
def gate_then_signal(ctx: flow.Context, path: str, gate: str) -> Any:
    ctx.step("gated", gated, path, "g", gate)
    return ctx.wait_signal("go")


@flow.workflow()
def collect_signals(ctx: flow.Context, names: list) -> list:
    return [ctx.wait_signal(n) for n in names]


@flow.workflow()
def timed_wait(ctx: flow.Context, timeout: float) -> list:
    t0 = ctx.now()
    v = ctx.wait_signal("s", timeout=timeout)
    return [v, ctx.now() - t0]


@flow.workflow()
def race(ctx: flow.Context, path: str, timeout: float) -> list:
    v1 = ctx.wait_signal("s", timeout=timeout)
    fail_once(path, "race")  # the next attempt replays the first wait's outcome
    v2 = ctx.wait_signal("s", timeout=0.5)
    return [v1, v2]


@flow.workflow()
def nap(ctx: flow.Context, secs: float) -> float:
    ctx.sleep("nap", secs)
    return ctx.now()


@flow.workflow()
def nap_then_tick(ctx: flow.Context, path: str, secs: float) -> str:
    ctx.sleep("nap", secs)
    ctx.step("tick", tick, path, "woke")
    return "woke"


@flow.workflow()
def two_steps_gated(ctx: flow.Context, path: str, gate: str) -> int:
    a = ctx.step("one", gated, path, "one", gate, 1)
    b = ctx.step("two", tick, path, "two", 2)
    return a + b


@flow.workflow()
def hold_step(ctx: flow.Context, path: str, tag: str, secs: float) -> str:
    ctx.step("hold", hold, path, tag, secs)
    return tag


# ---------------------------------------------------------------- workflows: failures


@flow.workflow(max_failures=1)
def boom(ctx: flow.Context, msg: str) -> None:
    raise ValueError(msg)


@flow.workflow()
def attempts_fail(ctx: flow.Context, path: str) -> None:
    """Default max_failures (3): every attempt fails; one line per attempt with its time."""
    append(path, f"attempt {ctx.attempt} {time.time():.6f}")
    raise ValueError("every attempt fails")


@flow.workflow()
def fail_with(ctx: flow.Context, path: str, cls_name: str, msg: str) -> None:
    """Raises ``flow.<cls_name>(msg)`` (a line per attempt)."""
    append(path, f"attempt {ctx.attempt}")
    raise getattr(flow, cls_name)(msg)


@flow.workflow()
def bad_return(ctx: flow.Context, kind: str) -> Any:
    if kind == "set":
        return {1, 2}
    return "x" * (1024 * 1024 + 16)


@flow.workflow()
def bad_inside(ctx: flow.Context, kind: str) -> Any:
    """A payload error escaping the function (not caught)."""
    if kind == "step_result":
        ctx.step("s", make_set)
    elif kind == "start_args":
        ctx.start(echo, {1, 2})
    elif kind == "kv_value":
        ctx.kv.set("k", {1, 2})
    elif kind == "log_fields":
        ctx.log("message", bad={1, 2})
    return "not reached"


@flow.workflow()
def rejecter(ctx: flow.Context, msg: str) -> None:
    raise flow.Reject(msg)


@flow.workflow(max_failures=1)
def fail_until_flag(ctx: flow.Context, path: str, flag: str) -> Any:
    ctx.step("first", tick, path, "first")
    if not os.path.exists(flag):
        raise RuntimeError("no flag yet")
    return ctx.wait_signal("s")


@flow.workflow(max_failures=2)
def always_fails_after_step(ctx: flow.Context, path: str) -> None:
    ctx.step("s", tick, path, "s")
    append(path, f"attempt {ctx.attempt}")
    raise ValueError("nope")


@flow.workflow(max_failures=1, lease=1.0)
def slow_step(ctx: flow.Context, path: str, secs: float) -> str:
    ctx.step("slow", slow_first, path, "slow", secs)
    return "done"


@flow.workflow(max_failures=1, lease=0.5)
def wait_beyond_lease(ctx: flow.Context) -> list:
    """Waits (a sleep, a signal, a child) longer than its lease: waiting is no attempt."""
    ctx.sleep("nap", 0.8)
    v = ctx.wait_signal("s", timeout=0.7)
    c = ctx.child(nap, 0.7)
    return [v, isinstance(c, float), ctx.attempt]


@flow.workflow(max_failures=1, lease=0.5)
def retry_wait_beyond_lease(ctx: flow.Context, path: str) -> Any:
    """One failed try, then a 0.9 s retry wait inside the attempt (longer than the lease):
    the wait is no heartbeat, so the attempt is interrupted."""
    return ctx.step("t", fail_times, path, "t", 1, "ok", retry=flow.Retry(intervals=[0.9]))


VERSION = os.environ.get("FLOWMODS_VERSION", "1")
MAX_FAILURES = int(os.environ.get("FLOWMODS_MAX_FAILURES", "3"))


@flow.workflow(version=VERSION, max_failures=MAX_FAILURES)
def configurable(ctx: flow.Context, path: str) -> None:
    """Its version and max_failures come from the environment of the process importing it."""
    append(path, f"attempt {ctx.attempt}")
    raise ValueError("configured to fail")


# ---------------------------------------------------------------- workflows: step retries


@flow.workflow()
def retrying(ctx: flow.Context, path: str, tag: str, fails: int, spec: Any,
             catch: bool) -> Any:
    """A step failing its first ``fails`` tries, under ``retry_from(spec)``."""
    try:
        return ctx.step(tag, fail_times, path, tag, fails, "ok", retry=retry_from(spec))
    except ValueError as exc:
        if catch:
            return ["caught", str(exc)]
        raise


@flow.workflow(max_failures=2)
def retrying_mf2(ctx: flow.Context, path: str, spec: Any) -> Any:
    return ctx.step("t", fail_times, path, "t", 99, "ok", retry=retry_from(spec))


@flow.workflow()
def step_raises(ctx: flow.Context, path: str, which: str) -> Any:
    fn = {"reject": raise_reject, "nondeterminism": raise_nondeterminism}[which]
    return ctx.step("s", fn, path, "s", retry=flow.Retry(max_attempts=5, initial=0.01))


@flow.workflow()
def caught_replay(ctx: flow.Context, path: str, local: bool) -> list:
    """Catches a step's failure; a later attempt must see the same failure (replayed)."""
    try:
        ctx.step("bad", raise_local if local else always_fail, path, "bad")
        seen = ["no exception", ""]
    except Exception as exc:  # noqa: BLE001 - the test looks at what came out
        seen = [type(exc).__name__, str(exc)]
    append(path, "seen " + json.dumps(seen))
    ctx.step("after", tick, path, "after")
    fail_once(path, "caught")
    return seen


@flow.workflow()
def caught_then_crash(ctx: flow.Context, path: str) -> str:
    """The caught failure is not recorded when the attempt fails before its next record."""
    try:
        ctx.step("bad", always_fail, path, "bad")
    except ValueError:
        pass
    fail_once(path, "crash")
    ctx.step("after", tick, path, "after")
    return "done"


# ---------------------------------------------------------------- workflows: the context


@flow.workflow()
def tour(ctx: flow.Context, path: str, peer: str = "") -> dict:
    """One of every recorded call, at known positions (see test_history_events_table)."""
    out: dict = {}
    out["add"] = ctx.step("add", lambda x, y: x + y, 1, 2)                       # 0
    try:
        ctx.step("bad", always_fail, path, "bad", retry=flow.Retry(intervals=[0.01]))  # 1
    except ValueError as exc:
        out["bad"] = str(exc)
    ctx.sleep("nap", 0.01)                                                        # 2
    out["go"] = ctx.wait_signal("go")                                             # 3
    out["never"] = ctx.wait_signal("never", timeout=0.05)                         # 4
    out["child"] = ctx.child(echo, 5)                                             # 5
    out["started"] = ctx.start(echo, 6)                                           # 6
    out["now"] = ctx.now()                                                        # 7
    out["random"] = ctx.random()                                                  # 8
    out["uuid"] = ctx.uuid()                                                      # 9
    ctx.kv.set("k", {"a": 1})                                                     # 10
    out["incr"] = ctx.kv.incr("n", 2)                                             # 11
    ctx.kv.delete("k")                                                            # 12
    ctx.log("hello", x=1)                                                         # 13
    ctx.signal(peer, "ping", {"p": 1})                                            # 14
    out["patched"] = ctx.patched("p1")                                            # (none)
    out["last"] = ctx.step("last", tick, path, "last", "end")                     # 15
    return out


@flow.workflow()
def kv_flow(ctx: flow.Context, path: str) -> list:
    seen0 = ctx.kv.get("n", "missing")
    ctx.kv.set("k", {"a": [1, 2]})
    n1 = ctx.kv.incr("n")
    n2 = ctx.kv.incr("n", 5)
    got = ctx.kv.get("k")
    items = ctx.kv.items()
    ctx.kv.set("s", "text")
    codes = []
    for bad in (lambda: ctx.kv.incr("s"), lambda: ctx.kv.set("", 1),
                lambda: ctx.kv.set("x" * 201, 1), lambda: ctx.kv.set("v", {1, 2})):
        try:
            bad()
            codes.append(None)
        except pipeproc.PipeProcError as exc:
            codes.append(exc.code)
    ctx.kv.set("y" * 200, 1)
    ctx.kv.delete("k")
    ctx.kv.delete("y" * 200)
    after = ctx.kv.get("k", "gone")
    ctx.log("kv done", n=n2)
    fail_once(path, "kv")  # the next attempt replays all of it
    return [seen0, n1, n2, got, items, codes, after]


@flow.workflow()
def kv_then_wait(ctx: flow.Context) -> dict:
    ctx.kv.set("a", 1)
    ctx.kv.incr("b", 3)
    ctx.wait_signal("go")
    return ctx.kv.items()


@flow.workflow()
def entropy(ctx: flow.Context, path: str) -> list:
    vals = [ctx.now(), ctx.random(), ctx.uuid()]
    used = ctx.step("use", tick, path, "use", vals)
    fail_once(path, "entropy")
    return [vals, used]


@flow.workflow()
def patchy(ctx: flow.Context, path: str, flag: str) -> list:
    """The 'deployed' code (the file ``flag`` exists) has a patched branch."""
    ctx.step("one", tick, path, "one")
    if os.path.exists(flag):
        if ctx.patched("fix"):
            r = ctx.step("new", tick, path, "new", "new")
        else:
            r = ctx.step("old", tick, path, "old", "old")
    else:
        r = ctx.step("old", tick, path, "old", "old")
    ctx.wait_signal("go")
    return r


@flow.workflow()
def patched_ids(ctx: flow.Context) -> list:
    codes = []
    for cid in ("", "x" * 201, 5):
        try:
            ctx.patched(cid)
            codes.append(None)
        except pipeproc.PipeProcError as exc:
            codes.append(exc.code)
    codes.append(ctx.patched("y" * 200))
    return codes


@flow.workflow()
def nondet(ctx: flow.Context, flag: str, mode: str, catch: bool) -> Any:
    """Position 1 changes when the file ``flag`` exists (the code changed in flight)."""
    changed = os.path.exists(flag)
    ctx.step("prep", tick_value, 0)                                   # 0
    try:
        if mode == "rename":
            ctx.step("refund" if changed else "charge", tick_value, 1)  # 1
        elif mode == "kind":
            if changed:
                ctx.sleep("charge", 0)
            else:
                ctx.step("charge", tick_value, 1)
        elif mode == "kv":
            ctx.kv.set("b" if changed else "a", 1)
        elif mode == "now":
            if changed:
                ctx.random()
            else:
                ctx.now()
        elif mode == "sleep":
            ctx.sleep("b" if changed else "a", 0)
        elif mode == "child":
            if changed:
                ctx.child(whoami)
            else:
                ctx.child(echo, 1)
        elif mode == "log":  # names of logs are not compared
            ctx.log("changed" if changed else "original")
    except Exception:  # noqa: BLE001 - catching it must not save the run
        if catch:
            return "saved"
        raise
    ctx.wait_signal("go")                                              # 2
    return "finished"


@flow.workflow()
def parent(ctx: flow.Context) -> list:
    a = ctx.child(echo, 1)                 # <id>/echo-0
    b = ctx.child(add, 2, 3)               # <id>/add-0
    c = ctx.start(echo, 3)                 # <id>/echo-1
    d = ctx.child(whoami)                  # <id>/whoami-0
    return [a, b, c, d, ctx.run_id, ctx.parent_id]


@flow.workflow()
def parent_of_whoami(ctx: flow.Context) -> list:
    return ctx.child(whoami)


@flow.workflow()
def parent_catches(ctx: flow.Context, target: str, arg: Any) -> list:
    wf = {"boom": boom, "rejecter": rejecter, "collect": collect_signals}[target]
    try:
        return ["finished", ctx.child(wf, arg)]
    except flow.RunError as exc:
        return [type(exc).__name__, exc.run_id, exc.error_type, exc.error_message,
                exc.error_code, exc.code]


@flow.workflow()
def parent_adopts(ctx: flow.Context, child_id: str) -> Any:
    return ctx.child(collect_signals, ["x"], id=child_id)


@flow.workflow()
def parent_then_wait(ctx: flow.Context) -> Any:
    r = ctx.child(echo, "c")
    return [r, ctx.wait_signal("go")]


@flow.workflow()
def parent_of_waiter(ctx: flow.Context) -> Any:
    return ctx.child(collect_signals, ["c"])


@flow.workflow()
def sender(ctx: flow.Context, path: str, to: str) -> Any:
    ctx.signal(to, "ping", {"p": 1})
    ctx.step("s", tick, path, "s")
    fail_once(path, "sender")
    try:
        ctx.signal("no-such-run-" + ctx.run_id, "ping")
    except flow.InvalidRun as exc:
        return [exc.code, isinstance(exc, LookupError)]
    return "no error"


@flow.workflow()
def unwinding(ctx: flow.Context, path: str) -> str:
    """flow.Suspend is not an Exception; finally blocks run; a ctx call in them re-raises."""
    try:
        ctx.sleep("s", 0.05)
    except Exception as exc:  # noqa: BLE001 - must never catch flow.Suspend
        append(path, f"caught {type(exc).__name__}")
    finally:
        try:
            ctx.now()
            append(path, "finally ok")
        except BaseException as exc:  # noqa: BLE001 - looking at what the ctx call raised
            append(path, f"finally {type(exc).__name__} "
                         f"{isinstance(exc, flow.Suspend)} {isinstance(exc, Exception)}")
            raise
    return "done"


@flow.workflow()
async def gather_flow(ctx: flow.AsyncContext, path: str) -> list:
    t = ctx.now()  # a plain call in an async workflow
    a, b, c = await asyncio.gather(
        ctx.step("a", aslow, path, "a", 0.15, 1),
        ctx.step("b", aslow, path, "b", 0.05, 2),
        ctx.step("c", tick, path, "c", 3),
    )
    await ctx.sleep("nap", 0.05)
    fail_once(path, "gather")
    return [a, b, c, isinstance(ctx, flow.AsyncContext), isinstance(t, float)]


@flow.workflow()
async def async_all(ctx: flow.AsyncContext, path: str) -> list:
    """Every awaited call of an AsyncContext, and the plain ones."""
    v = await ctx.wait_signal("s", timeout=5)
    k = await ctx.child(echo, "kid")
    sid = await ctx.start(echo, "started")
    n = ctx.kv.incr("n")
    ctx.log("async", n=n)
    p = ctx.patched("p")
    try:
        await ctx.step("bad", always_fail, path, "bad")
    except ValueError as exc:
        bad = str(exc)
    await ctx.sleep("z", 0)
    return [v, k, sid, n, p, bad, ctx.kv.items()]


@flow.workflow(max_failures=100, lease=5.0)
def scripted(ctx: flow.Context, path: str, plan: list) -> list:
    """Interprets ``plan``: ``[kind, name, arg]`` ops (the hypothesis test's workflows)."""
    out: list = []
    for kind, name, arg in plan:
        if kind == "step":
            out.append(ctx.step(name, work, path, name, arg))
        elif kind == "sleep":
            ctx.sleep(name, arg)
            out.append(None)
        elif kind == "signal":
            out.append(ctx.wait_signal(name))
        elif kind == "kv":
            out.append(ctx.kv.incr(name, arg))
        else:
            raise ValueError(f"unknown op {kind!r}")
    return out


# ---------------------------------------------------------------- workflows: kills


@flow.workflow()
def four_steps(ctx: flow.Context, path: str) -> list:
    r = [ctx.step("s0", tick, path, "s0", 0)]
    r.append(ctx.step("s1", tick, path, "s1", 1))
    x = ctx.random()
    r.append(ctx.step("s2", block_first, path, "s2", x))
    r.append(ctx.step("s3", tick, path, "s3", 3))
    return r


@flow.workflow(max_failures=1)
def four_steps_mf1(ctx: flow.Context, path: str) -> list:
    return four_steps.fn(ctx, path)


@flow.workflow(lease=1.0)
def late(ctx: flow.Context, path: str, secs: float) -> list:
    a = ctx.step("slow", slow_first, path, "slow", secs)
    b = ctx.step("after", tick, path, "after", a)
    return [a, b]


def _plus(i: int) -> int:
    return i


@flow.workflow()
def ten_steps(ctx: flow.Context) -> int:
    """Ten no-op steps: the sum of their results (tests/test_flow_store.py)."""
    return sum(ctx.step(f"s{i}", _plus, i) for i in range(10))


@flow.workflow()
def three_ticks(ctx: flow.Context, path: str, tag: str) -> int:
    """Three steps, each one line ``<tag>-<i>`` in ``path``: the run's result is 0+1+2."""
    return sum(ctx.step(f"s{i}", tick, path, f"{tag}-{i}", i) for i in range(3))
