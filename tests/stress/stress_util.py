"""Counters and RSS sampling shared by the stress tests and their summary.

Tests import this module as ``stress_util`` (tests/stress is put on
``sys.path``); ``conftest.py`` imports the same module object to print the
summary at the end of ``make stress``. ``wait_until`` is tests/helpers.py's.
"""

from __future__ import annotations

import collections
import threading
from typing import Dict, List

from helpers import wait_until  # noqa: F401 - the one wait_until, re-exported for stress tests

STATS: "collections.Counter[str]" = collections.Counter()
PEAK_KIB: Dict[str, int] = {}
LINES: List[str] = []
_LOCK = threading.Lock()


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to the summary counter ``name`` (e.g. ``"crashes injected"``)."""
    with _LOCK:
        STATS[name] += n


def report(line: str) -> None:
    """Add a free-form line (a measured figure) to the summary."""
    with _LOCK:
        LINES.append(line)


def rss_anon_kib(pid: int) -> int:
    """Anonymous resident memory of ``pid`` in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def record_rss(pid: int, label: str = "node") -> int:
    """Sample ``pid``'s anonymous RSS, keep the peak per label; returns KiB."""
    kib = rss_anon_kib(pid)
    with _LOCK:
        if kib > PEAK_KIB.get(label, 0):
            PEAK_KIB[label] = kib
    return kib
