"""Processors used by tests/test_system_procs.py and tests/test_live_procs.py.

Workers import these as ``"procmods.sysmods:<function>"`` (tests/ is on the spawning
process's sys.path, which workers inherit).
"""

from __future__ import annotations

import asyncio
import os
import time

FACTOR = 2


def inc(log):
    return {"n": log.body["n"] + 1}


def double(log):
    return {"n": log.body["n"] * FACTOR}


def tag_pid(log):
    return {"n": log.body["n"], "pid": os.getpid()}


def two_bodies(log):
    """A list result: one log per element."""
    n = log.body["n"]
    return [{"n": n, "k": 0}, {"n": n, "k": 1}]


def one_list_body(log):
    """``[that_list]``: one log whose body is a list."""
    return [[log.body["n"], "a", "b"]]


def returns_none(log):
    return None


async def async_double(log):
    await asyncio.sleep(0.01)
    return {"n": log.body["n"] * 2, "async": True}


def batch_summary(logs):
    """count > 1: receives a list of Logs, returns one body describing the batch."""
    return {
        "is_list": isinstance(logs, list),
        "all_logs": all(type(x).__name__ == "Log" and isinstance(x.id, str) for x in logs),
        "ns": [x.body["n"] for x in logs],
        "ids": [x.id for x in logs],
    }


def batch_each(logs):
    """count > 1: one output body per input log."""
    return [{"n": x.body["n"] * 10} for x in logs]


def boom(log):
    raise RuntimeError("processor failure on purpose")


def flaky(log):
    """Fails the first ``fails`` times (counted in the file ``counter``), then succeeds."""
    path = log.body["counter"]
    with open(path, "a+") as f:
        f.seek(0)
        seen = len(f.read())
        f.write("x")
    if seen < log.body["fails"]:
        raise RuntimeError(f"flaky failure {seen}")
    return {"n": log.body["n"], "attempt": seen + 1}


def die_once(log):
    """Kills its worker the first time it sees a body with ``flag`` (a path not existing yet)."""
    flag = log.body.get("flag")
    if flag and not os.path.exists(flag):
        with open(flag, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)
    return {"n": log.body["n"], "pid": os.getpid()}


def die_always(log):
    os._exit(1)


def slow_interval(log):
    """Sleeps, and reports when it ran (to see two loops run at once)."""
    start = time.time()
    time.sleep(log.body.get("sleep", 0.4))
    return {"n": log.body["n"], "start": start, "end": time.time(), "pid": os.getpid()}


def slow_once(log):
    """Takes ``sleep`` seconds the first time (flag file ``flag`` absent), fast afterwards."""
    flag = log.body["flag"]
    if not os.path.exists(flag):
        with open(flag, "w") as f:
            f.write("slow")
        time.sleep(log.body["sleep"])
        return {"n": log.body["n"], "slow": True}
    return {"n": log.body["n"], "slow": False}
