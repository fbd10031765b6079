"""A worker process on Redis (``spawn(redis=...)``, ``pipeproc workers``): :class:`Worker`.

A worker runs ``worker_concurrency`` loops. Each loop sends ``work`` scripts that carry the
outcome of its last claim and take the next one (round robin over the system procs this
worker may run), and blocks on the doorbell when there is nothing to do. A worker runs
only processors that ``allow`` permits and that it can import; others are skipped by this
worker, logged once, and never counted as failures. It sends a heartbeat every second; a
worker declared dead (its heartbeats late) gets no new claim and exits. Its supervisor is
:mod:`pipeproc._rworkers`; :func:`main` is the entry point of both processes.

Client side: imports ``_rworkers``, ``_execute``, ``_rops``, ``_rbackend``, ``_records``,
``_processors`` and ``errors``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import msgpack

from ._execute import Runner, new_stats, read_cfg, setup_process, start_lifeline
from ._processors import load
from ._rbackend import WORKER_DEAD_MS
from ._records import claimed_key
from ._rops import _key_args, _rows
from ._rworkers import RECYCLED, HEARTBEAT, _backend, allowed, supervisor_main
from .errors import ConnectionLost, NoActiveNode, PipeProcError

log = logging.getLogger("pipeproc.workers")


class Worker:
    """One worker process: ``concurrency`` loops over one backend, and a heartbeat."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.cfg = cfg
        self.backend = _backend(cfg)
        #: the slot's registration, and this process as the holder of its claims
        self.reg = f"{cfg['id']}/{cfg['slot']}"
        self.wid = f"{self.reg}/{os.getpid()}"
        self.allow = list(cfg.get("allow") or [])
        self.stats = new_stats()
        self.stopping = threading.Event()
        self._defs: Dict[str, dict] = {}
        self._refused: Dict[str, str] = {}  # processor ref -> why this worker skips it
        self._listed: Optional[Tuple[List[str], str]] = None  # (procs it may run, version)
        self._lock = threading.Lock()

    def names(self) -> Tuple[List[str], str]:
        """The procs of system procs this worker may run (allowed and importable), and the
        version of the system procs they were listed from (read first: a change after it
        makes the ``work`` script answer ``again``, never a missed wake-up)."""
        try:
            ver = self.backend.r.get(self.backend.P + ":sysver")
            raw = self.backend.r.hgetall(self.backend.P + ":sys")
        except self.backend._redis_mod.RedisError as exc:
            raise self.backend._error(exc) from None
        names = []
        for _, v in sorted(raw.items()):
            d = msgpack.unpackb(v, raw=False)
            ref = d["processor"]
            if not self.can_run(ref, d):
                continue
            names += d["procs"]
        return names, (ver.decode() if ver else "0")

    def can_run(self, ref: str, d: dict) -> bool:
        why = self._refused.get(ref)
        if why is None and ref not in self._defs:
            if not allowed(ref, self.allow):
                why = f"not permitted by allow={self.allow!r}"
            else:
                try:
                    load(ref)
                except Exception as exc:  # noqa: BLE001 - any import failure
                    why = f"cannot be imported on this host: {type(exc).__name__}: {exc}"
            with self._lock:
                if why is None:
                    self._defs[ref] = d
                elif ref not in self._refused:
                    self._refused[ref] = why
                    log.warning("worker %s skips the procs %s of processor %s: %s", self.wid,
                                d.get("procs"), ref, why)
        return why is None

    def run(self) -> None:
        cfg = self.cfg
        info = ["pid", os.getpid(), "host", socket.gethostname(), "slot", cfg["slot"],
                "supervisor", cfg["id"], "restarts", cfg.get("restarts", 0)]
        self.backend.script("hello", self.reg, *info)
        threading.Thread(target=self._heartbeat, daemon=True).start()
        loops = [threading.Thread(target=self._guarded_loop, name=f"loop-{i}", daemon=True)
                 for i in range(max(1, cfg.get("concurrency", 1)))]
        for t in loops:
            t.start()
        for t in loops:
            t.join()

    def _heartbeat(self) -> None:
        while not self.stopping.wait(HEARTBEAT):
            try:
                if not self.backend.script("beat", self.reg, write=False):
                    log.error("worker %s was declared dead (heartbeats late by more than "
                              "%d ms): its claims were reclaimed; exiting", self.wid,
                              WORKER_DEAD_MS)
                    os._exit(4)
            except PipeProcError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _guarded_loop(self) -> None:
        """A loop; anything that ends it other than running out ``worker_restart_after``
        (a processor calling ``sys.exit``, an unexpected error) ends the whole worker as a
        death: its supervisor reclaims its claims, counted, and restarts it."""
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - SystemExit from user code included
            log.error("worker %s: a processing loop ended: %s: %s (the worker exits; its "
                      "claims are reclaimed and counted)", self.wid, type(exc).__name__, exc)
            logging.shutdown()
            os._exit(1)

    def _loop(self) -> None:
        runner = Runner(self.stats)  # the processor call, shared with the node's workers
        done: Optional[list] = None
        rr = 0
        limit = self.cfg.get("restart_after") or 0
        while True:
            if limit and self.stats["executions"] >= limit:
                if done is not None:  # the last outcome, and no new claim
                    self._work_retrying(done, 0, take=False)
                self.stopping.set()
                return
            res = self._work_retrying(done, rr)
            if res[0] == b"gone":
                log.error("worker %s was declared dead (heartbeats late by more than %d ms): "
                          "its claims were reclaimed; exiting", self.wid, WORKER_DEAD_MS)
                os._exit(4)
            if done is not None and done[2] == "reclaim":
                self._failed(done, res[-1])
            done = None
            kind = res[0].decode()
            if kind == "again":  # the system procs changed: list them again at once
                self._listed = None
                continue
            if kind == "job":
                _, pn, idx, ref, tos, many, cnum, es, _note = res
                rr = int(idx)
                name, ref = pn.decode(), ref.decode()
                tos = [t.decode() if isinstance(t, bytes) else t for t in (tos or [])]
                claim = self._claim_key(es, int(cnum))
                if not self.can_run(ref, {"procs": [name]}):
                    done = [name, claim, "release", None]
                    continue
                job = [name, ref, tos, bool(int(many)), _rows(es), claim]
                done = runner.execute(job)
                continue
            bell_id, wake, now = res[1].decode(), res[2].decode(), int(res[3])
            wait = 30.0
            if wake:
                wait = min(wait, max(0.0, (int(wake) - now) / 1000.0) + 0.002)
            try:
                self.backend.block(bell_id, wait)
            except PipeProcError as exc:  # transient: the next work request retries
                log.warning("worker %s: waiting for work failed: %s", self.wid, exc)
                self.stopping.wait(0.5)

    def listed(self) -> Tuple[List[str], str]:
        """The system procs this worker may run, listed again only after the ``work``
        script said they changed (``again``): no round trip per claim."""
        if self._listed is None:
            self._listed = self.names()
        return self._listed

    def _work_retrying(self, done: Optional[list], rr: int, take: bool = True) -> Any:
        """The ``work`` script, sent again (same request id: applied once) while Redis is
        unreachable; the outcome of the last claim is never lost in between. ``take=False``:
        report the outcome only (a recycling worker takes no new work)."""
        rid = self.backend._rid()
        delay = 0.1
        while True:
            try:
                listed = self.listed()
                return self._work(done, listed if take else ([], listed[1]), rr, rid)
            except (ConnectionLost, NoActiveNode) as exc:
                log.warning("worker %s: Redis unreachable (%s); trying again in %.1f s",
                            self.wid, exc, delay)
            except PipeProcError as exc:
                log.error("worker %s: the work request failed: %s; trying again in %.1f s",
                          self.wid, exc, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)

    def _failed(self, done: list, note: Any) -> None:
        """Say that a processor failed (WARNING, with its traceback), and at ERROR when the
        failure disabled its proc (a stage that stops never stops silently)."""
        name, key, _, err = done
        rng = f"{key[0]}-{key[1]}..{key[2]}-{key[3]}"
        note = note.decode() if isinstance(note, bytes) else str(note)
        if note == "dropped":
            log.warning("system proc %r: the failure on logs %s came after its claim was "
                        "reclaimed (timeout?): not counted", name, rng)
            return
        status, fails, most, delay_ms = (note.split() + ["active", "1", "10", "0"])[:4]
        detail = f"{err.get('type')}: {err.get('message')}"
        tb = (err.get("traceback") or "").rstrip()
        if status == "disabled":
            log.error("system proc %r failed on logs %s: %s\nsystem proc %r is DISABLED: %s "
                      "failure(s) in a row reached max_reclaims=%s; its logs wait until "
                      "resume_proc(%r)%s", name, rng, detail, name, fails, most, name,
                      ("\n" + tb) if tb else "")
            return
        limit = "unlimited" if most == "-1" else most
        log.warning("system proc %r failed on logs %s (failure %s in a row, max_reclaims=%s): "
                    "%s; delivered again in %.1f s%s", name, rng, fails, limit, detail,
                    int(delay_ms) / 1000.0, ("\n" + tb) if tb and fails in ("0", "1") else "")
        if tb and fails not in ("0", "1"):
            log.debug("traceback of %r's failure on %s:\n%s", name, rng, tb)

    @staticmethod
    def _claim_key(entries: Any, cnum: int) -> list:
        ids = []
        for e in entries:
            ms, _, seq = e[0].partition(b"-")
            ids.append((int(ms), int(seq)))
        return claimed_key(ids) + [cnum]

    def _work(self, done: Optional[list], listed: Tuple[List[str], str], rr: int,
              rid: Optional[Any] = None) -> Any:
        names, ver = listed
        kind, name, key, err, items = "", "", [""] * 7, b"", []
        if done is not None:
            name, key, kind, data = done
            if kind == "commit":
                for t, b in data:
                    items += [t, b]
            elif kind == "reclaim":
                err = msgpack.packb(data)
            key = _key_args(key)
        return self.backend.script("work", self.wid, kind, name, *key, err, rr, ver,
                                   len(names), *names, *items, rid=rid)


def worker_main() -> None:
    cfg = read_cfg()
    setup_process(cfg, "worker")
    start_lifeline()
    try:
        Worker(cfg).run()
    except PipeProcError as exc:
        log.error("worker stopped: %s", exc)
        logging.shutdown()
        os._exit(2)
    logging.shutdown()
    # every loop ran out worker_restart_after: its supervisor releases what it still holds
    # (not counted); any other exit, 0 included, is a death that counts
    os._exit(RECYCLED)


def main(kind: str) -> None:
    """Entry point of a supervisor or worker process (``kind``)."""
    {"supervisor": supervisor_main, "worker": worker_main}[kind]()
