"""Plain-text and JSON formatting shared by the CLI and the demo: an aligned table, byte
sizes and times, log lines, the proc table, the stats text, and the workflow runs'
table and history.

Imports nothing of the package: ``cli``, ``_cli_commands`` and ``_demo`` use it, so that
neither the CLI nor the demo imports the other at module level. Client side.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any, Dict, Iterable, Optional, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain aligned text table; columns whose index is in ``right`` are right-aligned."""
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()
    lines = [fmt(headers)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _jsonable(value: Any) -> Any:
    """Bodies may hold bytes; JSON output carries them as base64 strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dumps(value: Any, *, indent: Optional[int] = None) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False, indent=indent,
                      separators=None if indent else (",", ":"))


def log_obj(lg: Any) -> dict:
    """A Log as a JSON object; a bytes body is base64 and flagged with ``encoding``."""
    out = {"id": lg.id, "body": _jsonable(lg.body)}
    if isinstance(lg.body, (bytes, bytearray)):
        out["encoding"] = "base64"
    return out


BODY_WIDTH = 200  # characters of a body shown by range/tail without --json


def shorten(text: str, width: int = BODY_WIDTH) -> str:
    """``text`` cut to ``width`` characters with an ellipsis and the full size."""
    if len(text) <= width:
        return text
    return f"{text[:width]}… ({len(text)} chars; --json for all)"


def log_line(lg: Any, as_json: bool) -> str:
    """One log per line: JSON (complete), or ``ID<TAB>body`` with a long body shortened."""
    if as_json:
        return dumps(log_obj(lg))
    if isinstance(lg.body, (bytes, bytearray)):
        return f"{lg.id}\t{shorten('base64:' + base64.b64encode(bytes(lg.body)).decode('ascii'))}"
    return f"{lg.id}\t{shorten(dumps(lg.body))}"


def human_ms(ms: int) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def short_error(err: Any, width: int = 48) -> str:
    """A proc's ``last_error`` in one short cell: ``Type: message`` truncated, or ``-``."""
    if not isinstance(err, dict):
        return "-"
    text = f"{err.get('type')}: {err.get('message')}".replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def procs_table(procs: Dict[str, dict]) -> str:
    rows = [[name, p.get("topic"), p.get("status"), p.get("pending") or "-",
             p.get("reclaims"), p.get("lag"), short_error(p.get("last_error"))]
            for name, p in sorted(procs.items())]
    return table(["NAME", "TOPIC", "STATUS", "PENDING CLAIM", "RECLAIMS", "LAG", "LAST ERROR"],
                 rows, right=(4, 5))


def stats_text(st: dict) -> str:
    node = st.get("node", {})
    r = st.get("redis")
    if r is not None and not node:  # the Redis backend: no node
        lines = [
            f"redis     {r.get('url')}  namespace {r.get('namespace')}  "
            f"version {r.get('redis_version', '?')}  durability {r.get('durability', '?')}",
            f"server    appendonly {r.get('appendonly', 'unknown')}  appendfsync "
            f"{r.get('appendfsync', 'unknown')}  maxmemory-policy "
            f"{r.get('maxmemory-policy', 'unknown')}",
        ]
    else:
        lines = _node_lines(node)
    workers = st.get("workers", [])
    lines.append("")
    if workers:
        lines.append(table(["WORKER PID", "HOST", "EXECUTIONS", "FAILURES"],
                           [[w.get("pid"), w.get("host", "-"), w.get("executions"),
                             w.get("failures")] for w in workers],
                           right=(2, 3)))
    else:
        lines.append("(no workers)")
    return _stats_rest(st, lines)


def _node_lines(node: dict) -> list:
    return [
        f"node      pid {node.get('pid')}  up {node.get('uptime', 0):.0f} s  "
        f"durability {node.get('durability', '?')}  "
        f"store {human_bytes(node.get('store_bytes', 0))}"
        + ("  (memory)" if node.get("memory") else "")
        + f"  connections {node.get('connections', '?')}",
        f"location  {node.get('location')}",
    ]


def _stats_rest(st: dict, lines: list) -> str:
    topics = st.get("topics", {})
    if topics:
        lines.append("")
        lines.append(table(["TOPIC", "LENGTH", "STORED"],
                           [[t, v.get("length"), v.get("stored")] for t, v in sorted(topics.items())],
                           right=(1, 2)))
    procs = st.get("procs", {})
    if procs:
        lines.append("")
        lines.append(procs_table(procs))
    return "\n".join(lines)


# --------------------------------------------------------------------------- workflow runs

def as_dict(value: Any) -> Dict[str, Any]:
    """A ``flow.RunInfo`` / ``flow.Event`` (a named tuple or a dataclass) or a dict as a dict."""
    if isinstance(value, dict):
        return dict(value)
    if hasattr(value, "_asdict"):
        return dict(value._asdict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return dict(vars(value))


def run_error(err: Any, width: int = 60) -> str:
    """A run's ``error`` in one cell: ``Type: message`` (cut to ``width``), or ``-``."""
    return short_error(err, width)


def runs_table(runs: Sequence[Dict[str, Any]]) -> str:
    """``pipeproc runs``: ID WORKFLOW STATUS ATTEMPT UPDATED ERROR, one run a row."""
    rows = [[r.get("id"), r.get("workflow"), r.get("status"), r.get("attempt"),
             human_ms(r.get("updated_at") or 0), run_error(r.get("error"))] for r in runs]
    return table(["ID", "WORKFLOW", "STATUS", "ATTEMPT", "UPDATED", "ERROR"], rows, right=(3,))


DATA_WIDTH = 120  # characters of an event's data shown by `pipeproc run` without --json


def _clock_ms(ms: Any) -> str:
    """``HH:MM:SS.mmm`` of an epoch-ms time (the date is in the run's info)."""
    if not ms:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{int(ms) % 1000:03d}"


def history_table(events: Sequence[Dict[str, Any]]) -> str:
    """A run's history, one event a line: SEQ TIME POS TYPE NAME DATA (data as JSON)."""
    rows = [[e.get("seq"), _clock_ms(e.get("ts")), "-" if e.get("pos") is None else e.get("pos"),
             e.get("type"), e.get("name") or "-", shorten(dumps(e.get("data") or {}), DATA_WIDTH)]
            for e in events]
    return table(["SEQ", "TIME", "POS", "TYPE", "NAME", "DATA"], rows, right=(0, 2))


def run_text(info: Dict[str, Any], events: Sequence[Dict[str, Any]],
             result: Any = None, has_result: bool = False) -> str:
    """``pipeproc run ID``: the run's info (``field: value`` lines), its result when it
    finished, then its history (one event a line)."""
    lines = []
    for k, v in info.items():
        if k == "error":
            if isinstance(v, dict):
                code = f" ({v.get('code')})" if v.get("code") else ""
                v = f"{v.get('type')}: {v.get('message')}{code}"
            else:
                v = "-"
        elif k.endswith("_at"):
            v = f"{v} ({human_ms(v)})" if v else "-"
        elif v is None or v == "":
            v = "-"
        lines.append(f"{k + ':':<12} {v}")
    if has_result:
        lines.append(f"{'result:':<12} {shorten(dumps(result))}")
    lines.append("")
    lines.append(f"history ({len(events)} events):")
    lines.append(history_table(events))
    return "\n".join(lines)
