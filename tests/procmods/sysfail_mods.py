"""Processors used by tests/test_sysproc_failures.py (``"procmods.sysfail_mods:<fn>"``)."""

from __future__ import annotations

import os
import time


def fails(log):
    raise ValueError(f"cannot handle n={log.body['n']}")


def too_slow(log):
    """Sleeps ``sleep`` seconds, then leaves a mark (it must never get there when killed)."""
    time.sleep(log.body["sleep"])
    with open(log.body["mark"], "a") as f:
        f.write("finished\n")
    return {"n": log.body["n"]}


def wait_go_big(log):
    """Waits for the file ``go``, counts its run in ``runs``, returns a ``size``-byte body."""
    with open(log.body["runs"], "a") as f:
        f.write("x")
    deadline = time.monotonic() + 60
    while not os.path.exists(log.body["go"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"n": log.body["n"], "blob": "x" * log.body["size"]}


def echo(log):
    return {"n": log.body["n"]}
