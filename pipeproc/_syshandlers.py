"""The ops of system procs and of the workers that run them.

Owns :class:`SysHandlers`: ``system_proc`` (create, or update the definition), the
workers' ``hello_worker`` and ``work`` (the outcome of the last claim and the next claim,
round robin over the system procs with work, in one write), a worker outcome the store
refused (written again after a back-off), and the claims of a worker that died or was
recycled (reclaimed, or released without counting).

May import: ``_handlers`` (validation, ``write``), ``_ids``, ``_procs``, ``_protocol``,
``_store``, ``_conn``, ``_writer``, ``_waits``, ``errors``, msgpack and the standard library.
Never ``_node``: the node builds it and sets ``supervisor`` once the workers' supervisor
exists.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional

import msgpack

from . import _ids, _procs
from ._conn import Conn, Malformed
from ._handlers import _backoff, _claimed, _count, _failure, _int, _items, _opts, write
from ._protocol import array_header, ok_reply
from ._store import Store
from ._waits import DEFAULT_BACKOFF, Deadlines, SysDefs, Timers, Waits, mark_empty, note, skipped
from ._writer import Writer
from .errors import (
    InternalError,
    InvalidArgument,
    InvalidProcessor,
    PipeProcError,
    ProcNameNotUnique,
    StorageFull,
    StoreCorrupted,
)

log = logging.getLogger("pipeproc.node")


class SysHandlers:
    """System procs and workers: ``op_sysproc``, ``op_hello_worker``, ``op_work``."""

    def __init__(self, store: Store, writer: Writer, timers: Timers, waits: Waits,
                 deadlines: Deadlines, sysdefs: SysDefs, stopping: threading.Event) -> None:
        self.store = store
        self.writer = writer
        self.timers = timers
        self.waits = waits
        self.deadlines = deadlines
        self.sysdefs = sysdefs
        self.stopping = stopping
        self.supervisor: Any = None  # the workers' supervisor, set by the node
        self.flows: Any = None  # the workflow runs (``_flows.Flows``), set by the node
        self.rr = 0  # round robin position of the workers' claims
        self._store_fails = 0  # store failures in a row of claims for workers

    # ------------------------------------------------------------------ system procs

    def op_sysproc(self, conn: Conn, rid: int, name: Any, topics: Any, multi: Any, ref: Any,
                   tos: Any, offset: Any, count: Any, max_reclaims: Any, reclaim_timeout: Any,
                   on_max: Any, backoff: Any = None) -> None:
        _ids.check_proc_name(name)
        if type(topics) is not list or not topics or type(tos) is not list:
            raise InvalidArgument("from_ and to are topic names or lists of them")
        for t in topics + tos:
            _ids.check_topic(t)
        if type(ref) is not str or not ref:
            raise InvalidProcessor("processor must be an import string")
        _ids.parse_offset(offset)
        count = _count(count)
        opts = _opts(max_reclaims, reclaim_timeout, on_max)
        backoff = _backoff(backoff)
        names = [f"{name}__{t}" for t in topics] if multi else [name]
        for pn in names:
            _ids.check_proc_name(pn)

        def fn(tx: Any) -> list:
            existing = tx.sysproc(name)
            if existing is not None:
                return self._sysproc_again(tx, name, existing, names, topics, ref, tos, count,
                                           offset, opts, backoff)
            for pn, t in zip(names, topics):  # check everything before writing
                rec = tx.proc(pn)
                if rec is not None and rec["topic"] != t:
                    raise ProcNameNotUnique(f"proc {pn!r} already exists on topic {rec['topic']!r}")
            states = []
            for pn, t in zip(names, topics):
                rec = _procs.ensure(tx, pn, t, offset, *opts)
                states.append(_procs.state(pn, rec))
            tx.put_sysproc(name, {"procs": names, "topics": topics, "processor": ref,
                                  "to": tos, "count": count, "multi": bool(multi),
                                  "created_at": tx.now, "backoff": backoff})
            return states
        write(self.writer, conn, rid, fn)

    def _sysproc_again(self, tx: Any, name: str, existing: dict, names: list, topics: list,
                       ref: str, tos: list, count: int, offset: str, opts: tuple,
                       backoff: Optional[List[float]] = None) -> list:
        """``system_proc`` on a name that exists: same procs and topics update the definition
        (processor, ``to``, ``count``, ``backoff``; from the next claim on), anything else is
        ``proc_name_not_unique``. The procs keep their position and frozen options."""
        if existing["procs"] != names or existing["topics"] != topics:
            raise ProcNameNotUnique(
                f"system proc {name!r} already exists on topic(s) {existing['topics']!r} "
                f"(procs {existing['procs']!r}); a system proc is updated only with the same "
                "from_; destroy it first (destroy_proc) or choose another name")
        states = []
        for pn, t in zip(names, topics):
            rec = _procs.ensure(tx, pn, t, offset, *opts)
            states.append(_procs.state(pn, rec))
            kept = (rec["max_reclaims"], rec["reclaim_timeout"], rec["on_max"])
            if kept != tuple(opts) or rec["offset"] != offset:
                log.info("system proc %s: proc %s keeps its offset %r and options "
                         "max_reclaims=%s reclaim_timeout=%s on_max_reclaims_reached=%s "
                         "(the ones given again are ignored)", name, pn, rec["offset"], *kept)
        old = {k: existing[k] for k in ("processor", "to", "count")}
        old["backoff"] = existing.get("backoff") or list(DEFAULT_BACKOFF)
        new = {"processor": ref, "to": tos, "count": count,
               "backoff": backoff or list(DEFAULT_BACKOFF)}
        if new != old:
            d = dict(existing)
            d.update(new)
            d["updated_at"] = tx.now
            tx.put_sysproc(name, d)
            log.info("system proc %s updated from the next claim on: %s -> %s", name,
                     " ".join(f"{k}={v!r}" for k, v in old.items()),
                     " ".join(f"{k}={v!r}" for k, v in new.items()))
        return states

    # ------------------------------------------------------------------ workers

    def op_hello_worker(self, conn: Conn, rid: int, slot: Any, pid: Any) -> None:
        conn.worker = {"slot": _int(slot, "slot"), "pid": _int(pid, "pid")}
        if self.supervisor is not None:
            self.supervisor.hello(slot, pid)
        conn.reply(rid, None)

    def op_work(self, conn: Conn, rid: int, done: Any, more: Any) -> None:
        """A worker reports the outcome of its last claim and asks for the next one."""
        if conn.worker is None:
            raise Malformed("work from a connection that is not a worker")
        flow_end = None
        if type(done) is dict:  # the end of a workflow run's attempt (``_flows``)
            flow_end, done = done, None
        if done is not None:
            if type(done) is not list or len(done) != 4 or done[2] not in ("ack", "commit", "reclaim"):
                raise Malformed("bad work outcome")
            name, key, kind, items = done
            _ids.check_proc_name(name)
            key = _claimed(key)
            if kind == "commit":
                items = _items(items)
            elif kind == "reclaim":
                items = _failure(items)
            else:
                items = None
            if self.supervisor is not None:
                self.supervisor.count(conn.worker["slot"], kind == "reclaim")
        st: Dict[str, Any] = {"done": None if done is None else (name, key, kind, items),
                              "flow": flow_end}
        slot = conn.worker["slot"]

        def attempt(tx: Any) -> Any:
            d = st["done"]
            if d is not None:
                self._apply_outcome(tx, *d)
            end = st["flow"]
            if end is not None:  # kept until a commit holds it (a round may run again)
                try:
                    self.flows.apply(tx, conn, end)
                except PipeProcError as exc:
                    log.error("the end of an attempt of run %r was refused: %s",
                              end.get("run"), exc)
            if self.stopping.is_set() or not more:
                return ("exit", None, ok_reply(rid, "exit"))
            return self._claim_any(tx, rid, conn)

        def finish(ok: bool, value: Any) -> None:
            d = st["done"]
            st["done"] = None
            if st["flow"] is not None and not (ok or isinstance(value, StorageFull)):
                # not a full store: an end that fails to apply would fail every time; the
                # attempt's lease takes the run back
                log.error("the end of an attempt of run %r was dropped: %s",
                          st["flow"].get("run"), value)
            if ok or not isinstance(value, StorageFull):
                st["flow"] = None  # committed (or dropped); a full store: the next try
            if not ok and isinstance(value, (StorageFull, InternalError)):
                # the store refused the write: not the processor's fault. The node writes
                # the outcome again after a back-off; the worker waits for work meanwhile.
                if d is not None:
                    self._hold(d, value)
                    value = None
                else:
                    self._store_fails += 1
                    delay = min(DEFAULT_BACKOFF[1],
                                DEFAULT_BACKOFF[0] * 2.0 ** min(self._store_fails - 1, 64))
                    log.warning("the store refused a worker's claim (%s); trying again in "
                                "%.1f s", value, delay)
                    if st["flow"] is not None:  # this very request holds an attempt's end
                        def again() -> None:
                            if self.waits.cancel_claim(conn, rid):  # still parked
                                self.writer.submit(attempt, finish, conn.id)
                        self.timers.after(delay, again)
                    else:
                        self.timers.after(delay, lambda: self.waits.wake_sys(1))
                    value = None
                ok = True
            elif ok and value is not None:
                self._store_fails = 0
            if not ok:
                conn.fail(rid, value)
                return
            if value is None:
                self.waits.park(conn, rid, "sys", attempt, finish)
                return
            name, key, data = value
            if name is None:  # a workflow run
                conn.send(data)
                if conn.closed:  # the worker loop went away while we claimed for it
                    self.flows.conn_lost(conn)
                return
            if key is not None:
                with conn.lock:
                    orphan = conn.closed
                    if not orphan:
                        conn.claims[name] = key
                if orphan:  # the worker died while we claimed for it
                    self.writer.submit(
                        lambda tx: self.reclaim_dead(tx, {name: key}, conn.worker),
                        lambda ok, v: None)
                    return
            conn.send(data)

        d0 = st["done"]
        if d0 is not None:
            with conn.lock:
                conn.claims.pop(d0[0], None)
        self.writer.submit(attempt, finish, conn.id)

    def _apply_outcome(self, tx: Any, name: str, key: list, kind: str, items: Any) -> None:
        try:
            if kind == "ack":
                _procs.ack(tx, name, key)
            elif kind == "commit":
                _procs.check_ack_commit(tx, name, key)
                _procs.ack(tx, name, key)
                if items:
                    tx.append(items)
            else:
                _procs.reclaim(tx, name, key, items or {
                    "type": "ProcessorFailed", "message": "the processor failed"})
                new = tx.proc(name)
                note(tx, "failed", name, new, new["last_error"])
        except PipeProcError as exc:
            log.info("worker outcome for %s dropped: %s", name, exc)

    def _hold(self, outcome: tuple, err: PipeProcError) -> None:
        """The store refused a worker's outcome: write it again after a back-off (store
        failures are not the processor's: they never count toward max_reclaims, and the
        claim does not time out meanwhile). The stage resumes by itself once writes succeed."""
        name = outcome[0]
        entry = self.deadlines.held.get(name)
        if entry is None or entry[0] is not outcome:
            entry = self.deadlines.held[name] = [outcome, 0]
        entry[1] += 1
        sysdef = self.sysdefs.names().get(name) or {}
        first, cap = sysdef.get("backoff") or DEFAULT_BACKOFF
        first = first or DEFAULT_BACKOFF[0]
        delay = min(max(cap, first), first * 2.0 ** min(entry[1] - 1, 64))
        key = outcome[1]
        # WARNING at the first refusal (and every 20th), the retries in between at DEBUG
        (log.warning if entry[1] == 1 or entry[1] % 20 == 0 else log.debug)(
            "the store refused the outcome (%s) of system proc %r on logs %s-%s..%s-%s: "
            "%s: %s; writing it again in %.1f s (a store failure does not count toward "
            "max_reclaims; attempt %d)", outcome[2], name, key[0], key[1], key[2], key[3],
            err.code, err.message, delay, entry[1])

        def retry() -> None:
            if self.stopping.is_set():
                return
            self.writer.submit(lambda tx: self._apply_outcome(tx, *outcome), done)

        def done(ok: bool, value: Any) -> None:
            if not ok and isinstance(value, (StorageFull, InternalError)):
                self._hold(outcome, value)
                return
            if self.deadlines.held.get(name) is entry:
                del self.deadlines.held[name]
            if ok:
                log.warning("the store accepts writes again: the outcome of system proc %r "
                            "was written after %d attempt(s)", name, entry[1] + 1)
            else:
                log.error("the outcome of system proc %r was dropped: %s", name, value)
            self.deadlines.arm_timeout(name)
        self.timers.after(delay, retry)

    def _claim_any(self, tx: Any, rid: int, conn: Optional[Conn] = None) -> Any:
        """Claim for a worker: a ready workflow run, else from the system procs with work,
        round robin."""
        if self.flows is not None and self.flows.ready and conn is not None:
            data = self.flows.claim(tx, rid, conn)
            if data is not None:
                return (None, None, data)
        defs = self.sysdefs.names()
        names = self.sysdefs.sorted()
        empty = self.sysdefs.empty
        fresh = self.sysdefs.touched_marks(tx) if empty else ()
        n = len(names)
        for i in range(n):
            idx = (self.rr + i) % n
            name = names[idx]
            if name in empty and name not in fresh:
                continue  # nothing to claim since a commit, untouched since (this round too)
            rec = tx.proc(name)
            if (rec is None or rec["status"] != "active" or self.deadlines.in_backoff(name)
                    or name in skipped(tx)):
                continue
            d = defs[name]
            rec = self.deadlines.expire_rec(tx, name, rec)
            try:
                recs = _procs.claim(tx, name, rec, d["count"])
            except StoreCorrupted as exc:  # never deliverable: stop this proc, not the pool
                log.error("system proc %s disabled: %s", name, exc)
                _procs.disable(tx, name)
                continue
            if recs is None:  # claim wrote nothing: rec is the proc's record
                if rec["status"] == "active" and not _procs.pending(rec):
                    mark_empty(tx, name, rec["topic"])
                continue
            self.rr = idx + 1
            new = tx.proc(name)
            c = new["claimed"]
            key = c + [c[3] - c[1] + 1, new["cdig"], new["cnum"]]
            data = (b"\x93" + msgpack.packb(rid) + b"\x00\x96" + msgpack.packb(name)
                    + msgpack.packb(d["processor"]) + msgpack.packb(d["to"])
                    + (b"\xc3" if d["count"] > 1 else b"\xc2") + array_header(len(recs))
                    + b"".join(recs) + msgpack.packb(key))
            return (name, key, data)
        return None

    def reclaim_dead(self, tx: Any, claims: Dict[str, list], worker: Optional[dict]) -> None:
        """Reclaim (counted) the claims of a dead worker (``None``: of a node's earlier life)."""
        for name, key in claims.items():
            rec = tx.proc(name)
            if (rec is not None and _procs.pending(rec) and rec["claimed"] == key[:4]
                    and (len(key) < 7 or key[6] == rec.get("cnum"))):
                if worker is None:
                    msg = "the node stopped while a worker processed these logs"
                else:
                    msg = (f"worker {worker.get('slot')} (pid {worker.get('pid')}) died while "
                           "processing these logs")
                err = _procs.error_info("WorkerDied", msg, tx.now, rec["claimed"])
                new = _procs._reclaimed(rec, err)
                tx.put_proc(name, new)
                note(tx, "failed", name, new, err, worker is not None)

    def release(self, tx: Any, claims: Dict[str, list]) -> None:
        """Drop claims without counting them: their holder was stopped for another reason."""
        for name, key in claims.items():
            rec = tx.proc(name)
            if (rec is not None and _procs.pending(rec) and rec["claimed"] == key[:4]
                    and (len(key) < 7 or key[6] == rec.get("cnum"))):
                tx.put_proc(name, _procs._reclaimed(rec, count=False))
                log.info("proc %r: claim %s of a recycled worker delivered again (not counted)",
                         name, _procs.range_str(rec["claimed"]))

