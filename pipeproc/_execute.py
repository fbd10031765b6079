"""One claim through its processor: what a worker does with a job, on either backend.

A job is ``[proc name, processor ref, to topics, many, rows, claim key]``; the outcome is
``[name, key, "ack" | "commit" | "reclaim", data]``: nothing to write, the bodies to commit
with the ack (``[[topic, encoded body], ...]``, topic-major as SPEC §6 says), or the failure
(``type``, ``message``, ``traceback``). Used by the node's workers (:mod:`pipeproc._workers`)
and the Redis backend's (:mod:`pipeproc._rworkers`).

Client side: imports ``_calls`` (``Log``), ``_processors`` and ``_protocol``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import traceback
from typing import Any, Dict, Optional

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


def new_stats() -> Dict[str, Any]:
    """A worker's counters (shared by its loops)."""
    return {"executions": 0, "failures": 0}
