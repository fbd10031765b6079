"""Processors of the demo pipeline (``pipeproc demo``), run by the node's workers.

The pipeline, one system proc per stage::

    raw ──parse (count=100)──▶ parsed ──enrich (count=100)──▶ enriched ──aggregate (count=500)──▶ totals

Each function is importable as ``"pipeproc.demo_processors:<name>"``, which is how the
system procs refer to them. Every stage carries ``raw_ms`` (the millisecond part of the raw
log's id, the node's clock at commit) so the demo can measure commit-to-final-stage latency
from the ids of the ``totals`` logs without trusting any other process's clock.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List

METHODS = ("GET", "GET", "GET", "GET", "POST", "PUT", "DELETE")
PATHS = ("/", "/login", "/cart", "/search", "/api/items", "/api/items/42", "/static/app.js",
         "/checkout", "/api/users", "/health")
STATUSES = (200, 200, 200, 200, 200, 200, 201, 204, 301, 304, 400, 401, 404, 500, 503)
COUNTRIES = ("FR", "DE", "US", "JP", "BR", "IN", "GB", "NG", "CA", "AU")
REGIONS = {"FR": "europe", "DE": "europe", "GB": "europe", "US": "americas", "CA": "americas",
           "BR": "americas", "JP": "asia", "IN": "asia", "NG": "africa", "AU": "oceania"}


def make_line(i: int) -> str:
    """A synthetic access-log line, deterministic in ``i`` (what the demo commits to ``raw``)."""
    r = random.Random(i)
    ip = f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"
    return (f'{ip} {r.choice(COUNTRIES)} "{r.choice(METHODS)} {r.choice(PATHS)} HTTP/1.1" '
            f"{r.choice(STATUSES)} {r.randrange(80, 60_000)} {r.randrange(1, 900)}ms")


def parse(logs: Any) -> Any:
    """Stage 1 (``count=100``): split raw access-log lines into fields, one log each.

    Takes one ``Log`` (a system proc with ``count=1``) or a list of them (``count > 1``)
    and returns one body, or the list of bodies, accordingly.
    """
    if isinstance(logs, list):
        return [parse_line(log) for log in logs]
    return parse_line(logs)


def parse_line(log: Any) -> Dict[str, Any]:
    """Parse the line of one raw log."""
    line = log.body["line"]
    head, request, tail = line.split('"')
    ip, country = head.split()
    method, path, _proto = request.split()
    status, size, duration = tail.split()
    return {"raw_ms": int(log.id.split("-", 1)[0]), "n": log.body["n"], "ip": ip,
            "country": country, "method": method, "path": path, "status": int(status),
            "bytes": int(size), "duration_ms": int(duration[:-2])}


def enrich(logs: List[Any]) -> List[Dict[str, Any]]:
    """Stage 2 (``count=100``): one enriched log per parsed log of the batch."""
    out = []
    for log in logs:
        b = dict(log.body)
        b["region"] = REGIONS.get(b["country"], "other")
        b["kind"] = ("api" if b["path"].startswith("/api") else
                     "static" if b["path"].startswith("/static") else "page")
        b["error"] = b["status"] >= 500
        b["slow"] = b["duration_ms"] > 500
        out.append(b)
    return out


def aggregate(logs: List[Any]) -> Dict[str, Any]:
    """Stage 3 (``count=500``): one summary log per batch of enriched logs.

    A returned dict is one log; ``raw_ms`` lists the raw commit times of the batch.
    """
    by_status: Dict[str, int] = {}
    by_region: Dict[str, int] = {}
    total_bytes = errors = slow = 0
    for log in logs:
        b = log.body
        by_status[str(b["status"])] = by_status.get(str(b["status"]), 0) + 1
        by_region[b["region"]] = by_region.get(b["region"], 0) + 1
        total_bytes += b["bytes"]
        errors += b["error"]
        slow += b["slow"]
    return {"count": len(logs), "first": logs[0].body["n"], "last": logs[-1].body["n"],
            "by_status": by_status, "by_region": by_region, "bytes": total_bytes,
            "errors": errors, "slow": slow, "raw_ms": [log.body["raw_ms"] for log in logs]}
