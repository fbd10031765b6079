"""The workflow subcommands (FLOW.md §5): ``pipeproc runs`` and ``pipeproc run ID``.

Both connect to a running node by location (or address) like every other command and read
through the public API only: ``flow.Engine(pp).runs(...)``, ``engine.run(id).info()``,
``engine.history(id)``. :mod:`pipeproc.cli` imports this module lazily (the rest of the
command line does not pay for importing :mod:`pipeproc.flow`).

Client side. May import: the public API (``pipeproc``, ``pipeproc.flow``),
``_cli_commands``, ``_text``, ``errors`` and the standard library.
"""

from __future__ import annotations

import argparse
from typing import Any, List, Optional, Sequence

from . import flow
from ._cli_commands import RET_OK, UsageError, connect, out
from ._text import as_dict, dumps, run_text, runs_table

#: every status a run can have (FLOW.md §3), in lifecycle order
STATUSES = ("pending", "running", "waiting", "finished", "failed", "aborted", "cancelled",
            "rejected")


def parse_statuses(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``--status`` values (repeatable, each a comma list) as one list without repeats, or
    ``None`` for no filter; an unknown status is a usage error (exit 2)."""
    if not values:
        return None
    found: List[str] = []
    for value in values:
        for part in value.split(","):
            s = part.strip().lower()
            if not s:
                continue
            if s not in STATUSES:
                raise UsageError(f"unknown status {part.strip()!r} (one of: {', '.join(STATUSES)})")
            if s not in found:
                found.append(s)
    if not found:
        raise UsageError("--status needs a status (one of: " + ", ".join(STATUSES) + ")")
    return found


def cmd_runs(args: argparse.Namespace) -> int:
    """``pipeproc runs [--status S] [--workflow W] [--limit N] [--json]``: the runs, oldest
    first (the newest N with ``--limit``), as a table or a JSON list of RunInfo objects."""
    statuses = parse_statuses(args.status)
    with connect(args) as pp, flow.Engine(pp) as engine:
        infos = engine.runs(status=statuses, workflow=args.workflow or None, limit=args.limit)
    rows = [as_dict(i) for i in infos]
    if args.json:
        out(dumps(rows))
    else:
        out(runs_table(rows))
        if not rows:
            out("(no runs)")
    return RET_OK


def cmd_run(args: argparse.Namespace) -> int:
    """``pipeproc run ID [--json]``: the run's RunInfo (and its result when finished), then
    its history, one event a line; ``--json``: one object, the RunInfo's fields plus
    ``history`` (a list of events) and, for a finished run, ``result``. An id that names no
    run fails with ``invalid_run`` (exit 1)."""
    with connect(args) as pp, flow.Engine(pp) as engine:
        run = engine.run(args.id)
        info = as_dict(run.info())
        events = [as_dict(e) for e in engine.history(args.id)]
        has_result, result = False, None
        if info.get("status") == "finished":
            has_result, result = True, _result(run)
    if args.json:
        doc = dict(info)
        if has_result:
            doc["result"] = result
        doc["history"] = events
        out(dumps(doc))
    else:
        out(run_text(info, events, result, has_result))
    return RET_OK


def _result(run: Any) -> Any:
    """A finished run's return value (it is recorded, so this does not wait)."""
    return run.result(timeout=5.0)
