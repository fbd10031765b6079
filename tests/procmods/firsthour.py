"""Processors used by tests/test_first_hour.py."""

from __future__ import annotations

import time


def sleep_then_done(log):
    time.sleep(log.body["s"])
    return {"done": True}
