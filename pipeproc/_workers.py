"""Worker processes: the worker loop (``python -m pipeproc._workers``).

A worker is a client of its node. Each of its ``worker_concurrency`` loops holds one
connection and sends ``work`` requests that carry the outcome of the previous claim (ack,
ack + commit, or reclaim) and ask for the next claim in the same round trip; the node answers
when it has a claim for it (the wait is a parked request, not a polling loop), or tells it to
exit. Processors are loaded by :mod:`pipeproc._processors`.

Client side: imports ``_execute`` (the processor call), ``flow._exec``, ``_protocol`` and ``errors``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ._execute import Runner, new_stats, read_cfg, setup_process, start_lifeline, stats_lock
from .flow._exec import execute as execute_flow
from ._protocol import ERR, PUSH, REPLY_LIMIT, decode, open_connection, pack
from .errors import PipeProcError, from_code

log = logging.getLogger("pipeproc.worker")


# ------------------------------------------------------------------------- the worker process

class _Loop:
    """One processing loop: a connection, an event loop for async processors."""

    def __init__(self, cfg: dict, index: int, stats: dict) -> None:
        self.cfg = cfg
        self.index = index
        self.stats = stats
        self.conn: Any = None
        self.rid = 0
        self.pushed: set = set()  # (run, token) of attempts whose run was cancelled
        self.runner = Runner(stats)

    def run(self) -> None:
        cfg = self.cfg
        address = cfg["address"]
        try:
            us = cfg.get("busy_poll_us")  # the node's busy_poll (spawn), when it passes it on
            c = open_connection(address if isinstance(address, str) else tuple(address),
                                cfg["authkey"], busy_poll=None if us is None else us / 1e6)
        except PipeProcError:
            return  # the node is gone (shutting down)
        self.conn = c
        done: Any = None
        try:
            c.send_bytes(pack([0, "hello_worker", cfg["slot"], os.getpid()]))
            decode(c.recv_bytes(REPLY_LIMIT))
            while True:
                self.rid += 1
                rid = self.rid
                more = True
                limit = cfg.get("restart_after") or 0
                if limit and self.stats["executions"] >= limit:
                    more = False
                c.send_bytes(pack([rid, "work", done, more]))
                reply = self.reply(rid)
                done = None
                if reply[1] == ERR:
                    log.error("work request failed: %s", reply[2])
                    return
                job = reply[2]
                if job is None or job == "exit":
                    return
                if type(job) is dict:  # a workflow run's attempt (pipeproc.flow)
                    with stats_lock:
                        self.stats["executions"] += 1
                    self.pushed.clear()
                    done = execute_flow(job["flow"], self.call, self.cancelled)
                else:
                    done = self.execute(job)
        except (EOFError, OSError):
            return  # the node went away
        finally:
            c.close()
            self.runner.close()

    def call(self, op: str, *args: Any) -> Any:
        """A request on this loop's connection, for a run's attempt (``frec``, ``fresult``)."""
        self.rid += 1
        rid = self.rid
        self.conn.send_bytes(pack([rid, op, *args]))
        reply = self.reply(rid)
        if reply[1] == ERR:
            raise from_code(*reply[2])
        return reply[2]

    def reply(self, rid: int) -> Any:
        """The reply to request ``rid``; frames the node pushed meanwhile (``PUSH``: a
        cancelled run's attempt) are kept aside."""
        while True:
            reply = decode(self.conn.recv_bytes(REPLY_LIMIT))
            if reply[0] == PUSH:
                self.pushed.add(tuple(reply[2][1:]))
                continue
            if reply[0] != rid:
                raise EOFError(f"reply {reply[0]!r} to request {rid}: out of step")
            return reply

    def cancelled(self, run: str, token: int) -> bool:
        """Whether the node pushed that this attempt's run was cancelled (no waiting)."""
        while self.conn.readable_now():
            reply = decode(self.conn.recv_bytes(REPLY_LIMIT))
            if reply[0] != PUSH:
                raise EOFError(f"a reply {reply[0]!r} nobody asked for: out of step")
            self.pushed.add(tuple(reply[2][1:]))
        return (run, token) in self.pushed

    def execute(self, job: list) -> list:
        return self.runner.execute(job)




def main() -> None:
    """Entry point of a worker process (``python -m pipeproc._workers``)."""
    cfg = read_cfg()
    setup_process(cfg, "worker")
    start_lifeline()
    stats = new_stats()
    loops = [_Loop(cfg, i, stats) for i in range(max(1, cfg.get("concurrency", 1)))]
    threads = [threading.Thread(target=lp.run, name=f"loop-{i}", daemon=True)
               for i, lp in enumerate(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
