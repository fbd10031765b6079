"""Small helpers shared by test modules (tests/ is on ``sys.path``, see conftest.py).

Wait on conditions, never on fixed sleeps: ``wait_until`` polls until a condition holds and
fails the test with what it waited for when the deadline passes.
"""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition", *,
               interval: float = 0.01) -> Any:
    """Poll ``cond`` every ``interval`` s until it returns something truthy, and return that;
    raise AssertionError (naming ``what``) once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
