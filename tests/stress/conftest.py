"""The stress suite (``make stress``): every test here is marked ``slow``.

Tests record what they did with :mod:`stress_util` (crashes injected,
operations verified, frames fuzzed, peak RSS, measured figures); the summary
is printed at the end of the run.
"""

from __future__ import annotations

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import stress_util  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    s = stress_util
    if not (s.STATS or s.PEAK_KIB or s.LINES):
        return
    tr = terminalreporter
    tr.section("pipeproc stress summary")
    for name in sorted(s.STATS):
        tr.write_line(f"{name:>36}: {s.STATS[name]:,}")
    for label in sorted(s.PEAK_KIB):
        tr.write_line(f"{'peak RssAnon ' + label:>36}: {s.PEAK_KIB[label] / 1024:.1f} MiB")
    for line in s.LINES:
        tr.write_line(line)
