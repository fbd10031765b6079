"""Processors of the Redis-only tests (tests/test_redis_only.py), run by workers started with
``allow=["procmods.redis_mods"]`` as ``"procmods.redis_mods:<function>"``."""

from __future__ import annotations

import os
import time


def inc(log):
    """``{"n": n + 1}``, with the pid of the worker that ran it."""
    return {"n": log.body["n"] + 1, "pid": os.getpid()}


def hold_first(log):
    """The first delivery of a log with ``"dir"`` claims ``<dir>/first`` (exclusively), writes
    the worker's pid to ``<dir>/holder`` and then hangs (a worker that will be killed holding
    its claim); any later delivery returns at once (the reclaimed log processed elsewhere)."""
    d = log.body.get("dir")
    if d:
        try:
            fd = os.open(os.path.join(d, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            tmp = os.path.join(d, "holder.tmp")
            with open(tmp, "w") as f:
                f.write(str(os.getpid()))
            os.replace(tmp, os.path.join(d, "holder"))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # until this worker is killed
                time.sleep(0.05)
    return {"n": log.body["n"], "pid": os.getpid()}


def rendezvous(log):
    """Waits (up to 20 s) until ``hosts`` different workers run this processor at once (each
    leaves its pid in the directory ``dir``); returns how many it met."""
    d = log.body["dir"]
    open(os.path.join(d, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 20
    while len(os.listdir(d)) < log.body["hosts"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"n": log.body["n"], "pid": os.getpid(), "met": len(os.listdir(d))}


def quits(log):
    """A processor that ends its worker with status 0 (a death that must count)."""
    import sys
    sys.exit(0)
