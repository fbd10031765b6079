"""The worker supervisor (inside the node): start, watch, restart and stop worker processes.

Workers are started as ``python -m pipeproc._workers`` (a fresh interpreter, never a fork of
the node, which has the store open). A worker that exits is restarted — at once after a
planned recycle (``worker_restart_after``), with a growing back-off when it keeps crashing.
The claims a dead worker held are reclaimed by the node as soon as its connection drops.
A worker's stdin stays open as its lifeline: when the node dies, even by ``kill -9``, the
worker sees EOF and exits at once, also in the middle of a processor.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import msgpack

log = logging.getLogger("pipeproc.supervisor")

READY_TIMEOUT = 60.0
GRACE = 10.0


class Slot:
    """One worker position: its current process and its figures."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Optional[subprocess.Popen] = None
        self.pid = 0
        self.executions = 0
        self.failures = 0
        self.restarts = 0
        self.connected = 0  # connections said hello for the current process
        self.started_at = 0.0
        self.recycling = False  # killed by the node (a processor past its time limit)


class Supervisor:
    """Keeps ``workers`` worker processes running for a node."""

    def __init__(self, node: Any, cfg: dict) -> None:
        self.node = node
        self.cfg = cfg
        self.slots = [Slot(i) for i in range(cfg["workers"])]
        self.lock = threading.Condition()
        self.stopping = False

    # -- lifecycle

    def start(self) -> None:
        """Start every worker and wait until each has connected all its loops."""
        for slot in self.slots:
            self._launch(slot)
        deadline = time.monotonic() + READY_TIMEOUT
        need = max(1, self.cfg.get("worker_concurrency", 1))
        with self.lock:
            while any(s.connected < need for s in self.slots):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("workers did not connect within %.0f s", READY_TIMEOUT)
                    break
                self.lock.wait(left)

    def _launch(self, slot: Slot) -> None:
        node = self.node
        wcfg = {
            "address": node.address, "authkey": node.authkey, "slot": slot.index,
            "concurrency": max(1, self.cfg.get("worker_concurrency", 1)),
            "restart_after": self.cfg.get("worker_restart_after", 0),
            "sys_path": self.cfg.get("sys_path") or [], "cwd": self.cfg.get("cwd"),
            "log_level": self.cfg.get("log_level"),
        }
        data = msgpack.packb(wcfg, use_bin_type=True)
        proc = subprocess.Popen([sys.executable, "-m", "pipeproc._workers"],
                                stdin=subprocess.PIPE, cwd=self.cfg.get("cwd") or None)
        assert proc.stdin is not None
        proc.stdin.write(len(data).to_bytes(4, "big") + data)
        proc.stdin.flush()  # stdin stays open: the worker's lifeline (EOF: the node is gone)
        with self.lock:
            slot.proc = proc
            slot.pid = proc.pid
            slot.connected = 0
            slot.started_at = time.monotonic()
        threading.Thread(target=self._watch, args=(slot, proc), name=f"watch-{slot.index}",
                         daemon=True).start()

    def _watch(self, slot: Slot, proc: subprocess.Popen) -> None:
        code = proc.wait()
        try:
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        with self.lock:
            if self.stopping or slot.proc is not proc:
                return
            slot.restarts += 1
            lived = time.monotonic() - slot.started_at
            recycled, slot.recycling = slot.recycling, False
        if recycled:
            code, lived = 0, 0.0  # planned: restart at once
        elif code != 0:
            log.warning("worker %d (pid %d) died with code %s; restarting", slot.index,
                        proc.pid, code)
        delay = 0.0 if (code == 0 or lived > 5) else min(5.0, 0.1 * (2 ** min(slot.restarts, 6)))
        if delay:
            time.sleep(delay)
        with self.lock:
            if self.stopping:
                return
        try:
            self._launch(slot)
        except OSError:  # pragma: no cover
            log.exception("cannot restart worker %d", slot.index)

    def recycle(self, index: int, pid: int) -> None:
        """Kill worker ``index`` if it is still process ``pid`` (its processor ran past its
        time limit and must not finish later); it is restarted at once."""
        with self.lock:
            if not 0 <= index < len(self.slots) or self.stopping:
                return
            slot = self.slots[index]
            if slot.pid != pid or slot.proc is None or slot.proc.poll() is not None:
                return
            slot.recycling = True
            proc = slot.proc
        log.warning("worker %d (pid %d) is recycled: a processor ran past its time limit "
                    "(reclaim_timeout)", index, pid)
        try:
            proc.kill()
        except OSError:  # pragma: no cover - already gone
            pass

    def hello(self, index: int, pid: int) -> None:
        with self.lock:
            if 0 <= index < len(self.slots) and self.slots[index].pid == pid:
                self.slots[index].connected += 1
                self.lock.notify_all()

    def count(self, index: int, failed: bool) -> None:
        with self.lock:
            if 0 <= index < len(self.slots):
                slot = self.slots[index]
                slot.executions += 1
                if failed:
                    slot.failures += 1

    def stop(self) -> None:
        """Let in-flight processors finish (up to a grace period), then kill what is left."""
        with self.lock:
            self.stopping = True
            procs = [s.proc for s in self.slots if s.proc is not None]
        deadline = time.monotonic() + GRACE
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stats(self) -> List[Dict[str, Any]]:
        with self.lock:
            return [{"pid": s.pid, "executions": s.executions, "failures": s.failures,
                     "restarts": s.restarts, "alive": s.proc is not None and s.proc.poll() is None}
                    for s in self.slots]
