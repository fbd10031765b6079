"""One claim through its processor: what a worker does with a job, on either backend.

A job is ``[proc name, processor ref, to topics, many, rows, claim key]``; the outcome is
``[name, key, "ack" | "commit" | "reclaim", data]``: nothing to write, the bodies to commit
with the ack (``[[topic, encoded body], ...]``, topic-major as SPEC §6 says), or the failure
(``type``, ``message``, ``traceback``). Used by the node's workers (:mod:`pipeproc._workers`)
and the Redis backend's (:mod:`pipeproc._rworkers`).

Also what both kinds of worker process do at start: read their configuration from stdin
(:func:`read_cfg`), set up logging, working directory and ``sys.path``
(:func:`setup_process`), and watch stdin as their lifeline (:func:`start_lifeline`).

Client side: imports ``_calls`` (``Log``), ``_processors``, ``_protocol`` and msgpack.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import threading
import traceback
from typing import Any, Dict, Optional

import msgpack

from ._calls import Log
from ._processors import load
from ._protocol import encode_body

log = logging.getLogger("pipeproc.worker")

#: guards the counters of a worker's loops (threads of one process)
stats_lock = threading.Lock()


class Runner:
    """Runs jobs for one processing loop; async processors run on its own event loop."""

    def __init__(self, stats: Dict[str, int]) -> None:
        self.stats = stats
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def execute(self, job: list) -> list:
        """Run ``job``'s processor on its logs; the outcome to report."""
        name, ref, tos, many, rows, key = job
        logs = [Log(f"{ms}-{seq}", body) for ms, seq, body in rows]
        with stats_lock:
            self.stats["executions"] += 1
        try:
            fn = load(ref)
            result = fn(logs if many else logs[0])
            if inspect.isawaitable(result):
                if self.loop is None:
                    self.loop = asyncio.new_event_loop()
                result = self.loop.run_until_complete(result)
            if result is None or not tos:
                return [name, key, "ack", None]
            bodies = result if isinstance(result, list) else [result]
            items = [[t, encode_body(b)] for t in tos for b in bodies]
            return [name, key, "commit", items]
        except Exception as exc:
            with stats_lock:
                self.stats["failures"] += 1
            # the failure is logged where it is recorded (the node, or the Redis worker once
            # its reclaim is written), naming the proc and the logs
            log.debug("processor %s failed on %s: %s: %s", ref,
                      logs[0].id if logs else "?", type(exc).__name__, exc)
            return [name, key, "reclaim", {"type": type(exc).__name__, "message": str(exc),
                                           "traceback": traceback.format_exc()}]

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()
            self.loop = None


def read_cfg() -> Dict[str, Any]:
    """A worker process's configuration: a 4-byte length and msgpack on stdin (the parent
    keeps stdin open afterwards, as the lifeline). Exits at once when the parent went away
    before it finished sending it."""
    stdin = sys.stdin.buffer
    try:
        size = int.from_bytes(stdin.read(4), "big")
        return dict(msgpack.unpackb(stdin.read(size), raw=False))
    except (ValueError, OSError, msgpack.UnpackException):
        os._exit(3)


def setup_process(cfg: Dict[str, Any], who: str) -> None:
    """Logging on stderr, the spawning process's working directory and ``sys.path`` (so
    that the application's own modules are importable)."""
    logging.basicConfig(level=cfg.get("log_level") or "WARNING", stream=sys.stderr,
                        format=f"%(asctime)s pipeproc-{who}[%(process)d] %(levelname)s %(message)s")
    if cfg.get("cwd"):
        try:
            os.chdir(cfg["cwd"])
        except OSError:
            pass
    for p in reversed(cfg.get("sys_path") or []):
        if p not in sys.path:
            sys.path.insert(0, p)


def start_lifeline() -> None:
    """The parent keeps our stdin open; EOF means it is gone: stop now, even mid-processor
    (the claim is reclaimed and delivered again: at-least-once)."""
    def run() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os._exit(3)
    threading.Thread(target=run, name="lifeline", daemon=True).start()


def new_stats() -> Dict[str, Any]:
    """A worker's counters (shared by its loops)."""
    return {"executions": 0, "failures": 0}
