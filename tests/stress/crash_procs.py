"""Processors for the worker crash case of test_crash_matrix.py (loaded by path by workers).

``slow_tag`` marks itself busy (a file named after the worker pid, holding the log id) while
it runs, so the test can SIGKILL a worker that is certainly inside a processor.
"""

from __future__ import annotations

import os
import time


def _busy(log, fn):
    busy_dir = log.body["busy"]
    path = os.path.join(busy_dir, str(os.getpid()))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(log.id)
    os.replace(tmp, path)
    try:
        time.sleep(log.body["sleep"])
        return fn()
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def slow_tag(log):
    """count=1: one result per input log, tagged with the input id and the worker pid."""
    return _busy(log, lambda: {"src": log.id, "n": log.body["n"], "pid": os.getpid()})


def slow_batch(logs):
    """count>1: one result per input log (a list of bodies), for every ``to`` topic."""
    return _busy(logs[0], lambda: [{"src": lg.id, "n": lg.body["n"], "pid": os.getpid()}
                                   for lg in logs])
