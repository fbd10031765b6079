"""Workflow runs on the node (``pipeproc.flow``): what the log alone cannot give.

A run's **journal** is a topic of the store (``journal_topic(id)``), one log per event
(``[type, name, pos, data]``, FLOW.md §3's history), appended in the same write
transactions as everything else. What the node adds (see docs/architecture.md, "Workflow
runs"):

* the **run record** (``runs`` database, one per id): workflow, status, attempts, wait —
  the index that makes ``start`` idempotent under concurrent starters (one write
  transaction checks and creates) and that the node needs to act on its own;
* **dispatch**: runs ready to execute are handed to idle worker loops in the same ``work``
  round trip as system proc claims (:meth:`Flows.claim`), each attempt with a token (its
  attempt number); everything an attempt writes carries the token and is refused once the
  node has taken the run back (**fencing**: lease expired, worker died, cancelled);
* **leases** (an attempt that writes nothing for ``lease`` seconds is interrupted) and
  **timers** (sleeps, signal timeouts, back-offs between attempts), armed from the run
  records at start, so they fire with no ``Engine`` in any process and after a restart;
* **wake-ups**: a signal, a child's end or a timer moves a waiting run back to ``pending``
  in the transaction that records the cause.

A claimed run's ``running`` status is written with the attempt's first record (or its
end), so a claim costs no commit of its own: a 10-step run is its start, its ten steps and
its end.

The clients' ops on runs are :mod:`pipeproc._flowops`.

Node side. May import: ``_handlers`` (body validation), ``_conn``, ``_store``,
``_writer``, ``_waits``, ``_protocol``, ``errors``, msgpack and the standard library.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from typing import Any, Dict, List, Optional, Set

import msgpack

from ._conn import Conn, Malformed
from ._handlers import _valid_body
from ._protocol import array_header, err_reply, ok_reply_raw
from ._store import Store
from ._waits import Timers, Waits
from ._writer import Writer
from .errors import InvalidRun, RunIdConflict

log = logging.getLogger("pipeproc.flow")

STATUSES = ("pending", "running", "waiting", "finished", "failed", "aborted", "cancelled",
            "rejected")
TERMINAL = frozenset(("finished", "failed", "aborted", "cancelled", "rejected"))
RESUMABLE = frozenset(("failed", "aborted", "cancelled"))
#: back-off between failed attempts: first wait and cap (seconds), doubling
ATTEMPT_BACKOFF = (0.1, 30.0)


def journal_topic(run_id: str) -> str:
    """The topic holding a run's journal (a digest: run ids are not topic names)."""
    return "flow-" + hashlib.sha256(run_id.encode()).hexdigest()[:40]


def _event(kind: str, name: str, pos: Optional[int], data: dict) -> bytes:
    return msgpack.packb([kind, name, pos, data], use_bin_type=True)


def next_attempt(rec: dict) -> int:
    """The attempt number of the run's next execution: a new one after a start, a failed
    attempt or a resume; the same one after a wait."""
    return rec["attempt"] + 1 if rec.get("new", True) or rec["attempt"] == 0 else rec["attempt"]


def info(run_id: str, rec: dict, att: Optional["Attempt"] = None) -> list:
    """What clients see of a run (``RunInfo``), as a list."""
    status = "running" if att is not None else rec["status"]
    attempt = att.attempt if att is not None else rec["attempt"]
    updated = max(rec["updated"], att.updated) if att is not None else rec["updated"]
    return [run_id, rec["wf"], status, attempt, rec["created"], updated, rec["error"],
            rec["parent"], rec["version"]]


def _restore_times(att: "Attempt", times: tuple) -> None:
    """Undo an aborted write's move of an attempt's lease deadline and update time."""
    att.deadline, att.updated = times


#: the ends of an attempt a worker reports (``apply``)
END_KINDS = ("finished", "rejected", "failed", "suspend", "cancelled")


class Attempt:
    """A claimed run: its token (unique per claim), its attempt number, its worker's
    connection, its lease."""

    __slots__ = ("token", "attempt", "conn", "lease", "deadline", "wrote", "signals", "updated")

    def __init__(self, token: int, attempt: int, conn: Conn, lease: float) -> None:
        self.token = token
        self.attempt = attempt
        self.conn = conn
        self.lease = lease
        self.deadline = time.monotonic() + lease
        self.wrote = False          # the ``running`` status is written with the first record
        self.updated = 0            # when it last recorded something (epoch ms)
        self.signals: Set[str] = set()  # names of signals that arrived during the attempt


class Flows:
    """The node's part of workflow runs: records, dispatch, leases, timers and wake-ups.

    Its in-memory state (``ready``, ``live``, the child index) changes only inside writer
    jobs and in :meth:`after_commit` (the writer's thread); timers and connection ends
    submit writer jobs."""

    def __init__(self, store: Store, writer: Writer, timers: Timers, waits: Waits,
                 stopping: threading.Event) -> None:
        self.store = store
        self.writer = writer
        self.timers = timers
        self.waits = waits
        self.stopping = stopping
        self.lock = threading.Lock()
        self.ready: deque = deque()
        self.queued: Set[str] = set()
        self.live: Dict[str, Attempt] = {}
        self.children: Dict[str, Set[str]] = {}   # child id -> parents waiting on it
        self.results: Dict[str, List[tuple]] = {}  # run id -> parked result requests
        self.interrupted = 0
        self.fenced = 0
        self.tokens = 0

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Recover at the node's start: attempts of an earlier life were interrupted;
        pending runs are queued, waiting ones get their timers and child waits back."""
        stale = [r for r, rec in self.store.runs.items() if rec["status"] == "running"]
        if stale:
            def fn(tx: Any) -> None:
                for r in stale:
                    rec = tx.run(r)
                    if rec is not None and rec["status"] == "running":
                        self._failed_attempt(tx, r, rec, {
                            "type": "Interrupted", "code": "interrupted",
                            "message": "the node stopped during the attempt"}, fatal=False,
                            interrupted=True)
            self.writer.submit(fn, lambda ok, v: None)
        now = int(time.time() * 1000)
        for r, rec in self.store.runs.items():
            if rec["status"] == "pending":
                self._queue(r, rec.get("due"), now)
            elif rec["status"] == "waiting":
                w = rec.get("wait") or {}
                if w.get("child") is not None:
                    child = self.store.runs.get(w["child"])
                    if child is None or child["status"] in TERMINAL:
                        self._timer(r, now)
                    else:
                        self.children.setdefault(w["child"], set()).add(r)
                if w.get("due") is not None:
                    self._timer(r, w["due"])
        if self.ready:
            self.waits.wake_sys(len(self.ready))

    def stats(self) -> Dict[str, Any]:
        counts: Dict[str, int] = {}
        with self.lock:
            live = set(self.live)
        for r, rec in list(self.store.runs.items()):
            s = "running" if r in live else rec["status"]
            counts[s] = counts.get(s, 0) + 1
        return {"runs": counts, "ready": len(self.ready), "interrupted": self.interrupted,
                "fenced": self.fenced}

    # ------------------------------------------------------------------ queue and timers

    def _queue(self, run: str, due: Optional[int], now: int) -> None:
        if due is not None and due > now:
            self._timer(run, due)
        elif run not in self.queued:
            self.queued.add(run)
            self.ready.append(run)

    def _timer(self, run: str, due_ms: int) -> None:
        delay = max(0.0, due_ms / 1000.0 - time.time())
        self.timers.after(delay, lambda: self._fire(run))

    def _fire(self, run: str) -> None:
        """A timer is due (timer thread): wake the run in a writer job."""
        if self.stopping.is_set():
            return

        def fn(tx: Any) -> None:
            rec = tx.run(run)
            if rec is None or run in self.live:
                return
            if rec["status"] == "pending":
                if rec.get("due") is None or rec["due"] <= tx.now:
                    tx.flow_after.append(("ready", run, None))
                else:
                    tx.flow_after.append(("timer", run, rec["due"]))
            elif rec["status"] == "waiting":
                w = rec.get("wait") or {}
                child = self.store.runs.get(w["child"]) if w.get("child") else None
                if ((w.get("due") is not None and w["due"] <= tx.now)
                        or (w.get("child") and (child is None or child["status"] in TERMINAL))):
                    self._set(tx, run, rec, "pending", wait=None)
                elif w.get("due") is not None:
                    tx.flow_after.append(("timer", run, w["due"]))
        self.writer.submit(fn, lambda ok, v: None)

    def after_commit(self, tx: Any) -> None:
        """After a commit (writer thread): queue what became ready, arm timers, answer the
        result requests of runs that ended, index child waits."""
        if not tx.flow_after:
            return
        now = int(time.time() * 1000)
        woken = 0
        for what, run, arg in tx.flow_after:
            if what == "ready":
                self._queue(run, None, now)
                woken += 1
            elif what == "timer":
                self._timer(run, arg)
            elif what == "child":
                self.children.setdefault(arg, set()).add(run)
            elif what == "end":
                self._answer(run)
        if woken:
            self.waits.wake_sys(woken)

    # ------------------------------------------------------------------ transitions

    def _set(self, tx: Any, run: str, rec: dict, status: str, error: Any = None,
             result: Any = None, **changes: Any) -> dict:
        """Write the run's new status (and its ``status`` event); note what follows."""
        new = dict(rec)
        new.update(changes)
        new["status"] = status
        new["updated"] = tx.now
        if status != "running":
            new["error"] = error
        data: dict = {"attempt": new["attempt"], "error": new["error"]}
        if status == "finished":
            data["result"] = result
        tx.append([(rec["topic"], _event("status", status, None, data))])
        tx.put_run(run, new)
        if status == "pending":
            tx.flow_after.append(("ready", run, None) if not new.get("due") or new["due"] <= tx.now
                                 else ("timer", run, new["due"]))
        elif status in TERMINAL:
            tx.flow_after.append(("end", run, None))
            parents = self.children.pop(run, None)
            if parents:
                tx.on_abort(lambda: self.children.setdefault(run, set()).update(parents))
            for parent in list(parents or ()):
                prec = tx.run(parent)
                if (prec is not None and prec["status"] == "waiting"
                        and (prec.get("wait") or {}).get("child") == run):
                    self._set(tx, parent, prec, "pending", wait=None, due=None)
        return new

    def _failed_attempt(self, tx: Any, run: str, rec: dict, error: dict, fatal: bool,
                        interrupted: bool = False) -> None:
        fails = rec.get("fails", 0) + 1
        if interrupted:
            self.interrupted += 1
            tx.on_abort(self._uncount_interrupted)
        if rec.get("cancel"):  # cancelled while running: no other attempt
            self._set(tx, run, rec, "cancelled", None, cancel=False, wait=None, due=None)
            return
        if fatal or fails >= rec["max_failures"]:
            status = "aborted" if interrupted and not fatal else "failed"
            log.error("run %r (%s) %s after %d failed attempt(s): %s: %s", run, rec["wf"],
                      status, fails, error.get("type"), error.get("message"))
            self._set(tx, run, rec, status, error, fails=fails, wait=None, due=None)
            return
        first, cap = ATTEMPT_BACKOFF
        delay = min(cap, first * 2.0 ** (fails - 1))
        log.warning("run %r (%s) attempt %d %s: %s: %s; attempt %d in %.1f s", run, rec["wf"],
                    rec["attempt"], "interrupted" if interrupted else "failed",
                    error.get("type"), error.get("message"), rec["attempt"] + 1, delay)
        self._set(tx, run, rec, "pending", error, fails=fails, wait=None, new=True,
                  due=tx.now + int(delay * 1000))

    def _drop_live(self, tx: Any, run: str, att: Attempt) -> None:
        """The attempt is over (in ``tx``; back if ``tx`` is aborted)."""
        if self._unlive(run, att):
            tx.on_abort(lambda: self._relive(run, att))

    def _relive(self, run: str, att: Attempt) -> None:
        with self.lock:
            if self.live.setdefault(run, att) is not att:
                return
        # while it was out of ``live`` its lease check may have fired (and stopped) and a
        # closed connection's conn_lost may have missed it
        self._arm_lease(run, att)
        if getattr(att.conn, "closed", False):
            self.interrupt(run, att, "the worker's connection closed during the attempt")

    def interrupt(self, run: str, att: Attempt, why: str) -> None:
        """Take the run back from its attempt (lease expired, worker gone): a writer job."""
        def fn(tx: Any) -> None:
            if self.live.get(run) is not att:
                return
            self._drop_live(tx, run, att)
            rec = tx.run(run)
            if rec is None or rec["status"] in TERMINAL:
                return
            rec = self._running(tx, run, rec, att)
            self._failed_attempt(tx, run, rec, {"type": "Interrupted", "code": "interrupted",
                                                "message": why}, fatal=False, interrupted=True)
        self.writer.submit(fn, lambda ok, v: None)

    def conn_lost(self, conn: Conn) -> None:
        """A connection ended: the attempts its worker loop held are interrupted."""
        with self.lock:
            held = [(r, a) for r, a in self.live.items() if a.conn is conn]
        for r, a in held:
            worker = conn.worker or {}
            self.interrupt(r, a, f"worker {worker.get('slot')} (pid {worker.get('pid')}) "
                                 "died during the attempt")

    def _arm_lease(self, run: str, att: Attempt) -> None:
        def check() -> None:
            if self.live.get(run) is not att or self.stopping.is_set():
                return
            if time.monotonic() >= att.deadline:
                log.warning("run %r: attempt %d recorded nothing for %.1f s (its lease): "
                            "interrupted", run, att.attempt, att.lease)
                self.interrupt(run, att, f"the attempt recorded nothing for {att.lease:g} s "
                                         "(its lease)")
            else:
                self.timers.at(att.deadline, check)
        self.timers.at(att.deadline, check)

    def _running(self, tx: Any, run: str, rec: dict, att: Attempt) -> dict:
        """The attempt's first write records its ``running`` status."""
        if att.wrote or rec["status"] == "running":
            return rec
        att.wrote = True
        tx.on_abort(lambda: setattr(att, "wrote", False))
        return self._set(tx, run, rec, "running", attempt=att.attempt, due=None, wait=None,
                         new=False)

    # ------------------------------------------------------------------ workers

    def _uncount_interrupted(self) -> None:
        self.interrupted -= 1  # the aborted try's count: the re-run counts again

    def _uncount_fenced(self) -> None:
        self.fenced -= 1

    def _requeue(self, run: str, queued: bool) -> None:
        """Undo a claim's take of ``run`` from the ready queue (its write was aborted)."""
        self.ready.appendleft(run)
        if queued:
            self.queued.add(run)

    def _unlive(self, run: str, att: Attempt) -> bool:
        """Take ``att`` out of ``live`` (``False``: it was not the run's live attempt)."""
        with self.lock:
            if self.live.get(run) is not att:
                return False
            del self.live[run]
            return True

    def claim(self, tx: Any, rid: int, conn: Conn) -> Optional[bytes]:
        """A ready run for an idle worker loop: the reply's bytes, or ``None``."""
        while self.ready:
            run = self.ready.popleft()
            queued = run in self.queued
            self.queued.discard(run)
            tx.on_abort(lambda run=run, queued=queued: self._requeue(run, queued))
            rec = tx.run(run)
            if rec is None or rec["status"] != "pending" or run in self.live:
                continue
            if rec.get("cancel"):
                self._set(tx, run, rec, "cancelled", None, cancel=False, wait=None, due=None)
                continue
            if rec.get("due") is not None and rec["due"] > tx.now:
                self._timer(run, rec["due"])
                continue
            meta = tx.topic(rec["topic"])
            recs = [] if meta is None else tx.records(meta, meta.first, meta.next - 1,
                                                     1 << 62, False, 1 << 62)
            self.tokens += 1
            att = Attempt(self.tokens, next_attempt(rec), conn, rec["lease"])
            with self.lock:
                self.live[run] = att
            tx.on_abort(lambda run=run, att=att: self._unlive(run, att))
            self._arm_lease(run, att)  # its check does nothing for an attempt not live
            head = [run, att.token, rec["wf"], rec["ref"], rec["parent"], rec.get("seen"),
                    att.attempt]
            body = (b"\x81" + msgpack.packb("flow") + array_header(len(head) + 1)
                    + b"".join(msgpack.packb(x, use_bin_type=True) for x in head)
                    + array_header(len(recs)) + b"".join(recs))
            return ok_reply_raw(rid, body)
        return None

    def apply(self, tx: Any, conn: Conn, msg: Any) -> Any:
        """What an attempt writes (``frec``, and its end with the worker's next ``work``):
        ``{"run", "token", "events": [bytes], "starts": [...], "sends": [...],
        "end": None | {...}}``. Returns ``"ok"``, ``"fenced"`` or ``"cancelled"``."""
        if type(msg) is not dict:
            raise Malformed("a flow record must be a map")
        run, token = msg.get("run"), msg.get("token")
        events = msg.get("events") or []
        if type(run) is not str or type(token) is not int or type(events) is not list:
            raise Malformed("a flow record needs run, token and events")
        for e in events:
            _valid_body(e)
        att = self.live.get(run)
        rec = tx.run(run)
        if att is None or att.token != token or att.conn is not conn or rec is None:
            self.fenced += 1
            tx.on_abort(self._uncount_fenced)
            log.info("run %r: a write of attempt %s was refused (fenced off)", run, token)
            return "fenced"
        end = msg.get("end")
        if end is not None and (type(end) is not dict or end.get("kind") not in END_KINDS):
            # checked before anything is written: a refused request writes nothing
            raise Malformed(f"unknown end of attempt {end!r:.100}")
        starts = msg.get("starts") or []
        sends = msg.get("sends") or []
        if end is None and rec.get("cancel") and (starts or sends):
            # cancelled before this call (a signal, a child, a start): it does not happen
            self._drop_live(tx, run, att)
            self._set(tx, run, rec, "cancelled", None, cancel=False, wait=None, due=None)
            return "cancelled"
        seen = msg.get("seen")
        if seen and type(seen) is not dict:  # checked before anything is written
            raise Malformed("seen must be a map")
        for s in starts:  # checked before anything is written
            self._check_start(tx, s)
        for s in sends:
            if type(s) is not list or len(s) != 3 or tx.run(s[0]) is None:
                raise InvalidRun(f"no run with id {s[0]!r}" if type(s) is list and s
                                 else "bad send")
        rec = self._running(tx, run, rec, att)
        if events:
            tx.append([(rec["topic"], e) for e in events])
        if seen:  # children's outcomes the attempt saw first: replays return them
            rec = dict(rec)
            rec["seen"] = dict(rec.get("seen") or {}, **{str(k): v for k, v in seen.items()})
            tx.put_run(run, rec)
        for s in starts:
            self._start(tx, *s)
        for to, name, payload in sends:
            self._signal(tx, to, name, payload)
        before = (att.deadline, att.updated)
        att.deadline = time.monotonic() + att.lease
        att.updated = tx.now  # the record is rewritten at status changes only
        tx.on_abort(lambda: _restore_times(att, before))
        rec = tx.run(run)
        if end is None:
            if rec.get("cancel"):
                self._drop_live(tx, run, att)
                self._set(tx, run, rec, "cancelled", None, cancel=False)
                return "cancelled"
            return "ok"
        self._drop_live(tx, run, att)
        kind = end.get("kind")
        if rec.get("cancel"):  # cancel() said True: the run ends cancelled, whatever came
            self._set(tx, run, rec, "cancelled", None, cancel=False, wait=None, due=None)
        elif kind == "finished":
            self._set(tx, run, rec, "finished", None, end.get("result"), cancel=False)
        elif kind == "rejected":
            self._set(tx, run, rec, "rejected", end.get("error"), cancel=False)
        elif kind == "failed":
            self._failed_attempt(tx, run, rec, end.get("error") or {}, bool(end.get("fatal")))
        elif kind == "suspend":
            self._suspend(tx, run, rec, att, end.get("wait") or {})
        elif kind == "cancelled":  # the attempt saw a cancel the record no longer has
            self._failed_attempt(tx, run, rec, {"type": "Cancelled", "code": None,
                                                "message": "the attempt saw a cancel"}, False)
        else:  # pragma: no cover - END_KINDS is checked first
            raise AssertionError(kind)
        return "ok"

    def _suspend(self, tx: Any, run: str, rec: dict, att: Attempt, wait: dict) -> None:
        due, sig, child = wait.get("due"), wait.get("sig"), wait.get("child")
        wake = ((due is not None and due <= tx.now) or (sig is not None and sig in att.signals)
                or (due is None and sig is None and child is None))
        if child is not None:
            crec = tx.run(child)
            if crec is None or crec["status"] in TERMINAL:
                wake = True
        if wake:
            self._set(tx, run, rec, "pending", None, wait=None, due=None)
            return
        self._set(tx, run, rec, "waiting", None, wait={"due": due, "sig": sig, "child": child},
                  due=None)
        if due is not None:
            tx.flow_after.append(("timer", run, due))
        if child is not None:
            tx.flow_after.append(("child", run, child))
            self.children.setdefault(child, set()).add(run)

    # ------------------------------------------------------------------ start and signals

    def _check_start(self, tx: Any, s: Any) -> None:
        if type(s) is not list or len(s) != 9:
            raise Malformed("a start is [id, workflow, ref, first event, max_failures, lease, "
                            "version, parent, rejected]")
        run, wf = s[0], s[1]
        if type(run) is not str or type(wf) is not str or type(s[2]) is not str:
            raise Malformed("bad start")
        _valid_body(s[3])
        rec = tx.run(run)
        if rec is not None and rec["wf"] != wf:
            raise RunIdConflict(f"run {run!r} exists as a run of workflow {rec['wf']!r}, "
                                f"not {wf!r}")

    def _start(self, tx: Any, run: str, wf: str, ref: str, first: bytes, max_failures: int,
               lease: float, version: str, parent: Optional[str],
               rejected: Optional[dict]) -> tuple:
        rec = tx.run(run)
        if rec is not None:
            return rec, False
        topic = journal_topic(run)
        if tx.topic(topic) is not None:  # a journal left without its record: start afresh
            tx.drop_topic(topic)
        rec = {"wf": wf, "ref": ref, "status": "pending", "attempt": 0, "fails": 0,
               "max_failures": max_failures, "lease": lease, "version": version,
               "created": tx.now, "updated": tx.now, "error": None, "parent": parent,
               "topic": topic, "wait": None, "due": None, "cancel": False, "new": True}
        tx.append([(topic, first)])
        rec["n"] = tx.topic(topic).tid  # creation order (runs() sorts by it)
        tx.put_run(run, rec)
        if rejected is not None:
            rec = self._set(tx, run, rec, "rejected", rejected)
        else:
            tx.flow_after.append(("ready", run, None))
        return rec, True

    def _signal(self, tx: Any, run: str, name: str, payload: bytes) -> bool:
        rec = tx.run(run)
        if rec is None:
            raise InvalidRun(f"no run with id {run!r}")
        if rec["status"] in ("finished", "rejected"):
            return False
        body = (b"\x94" + msgpack.packb("signal") + msgpack.packb(name) + b"\xc0"
                + b"\x81" + msgpack.packb("payload") + payload)
        tx.append([(rec["topic"], body)])
        att = self.live.get(run)
        if att is not None and name not in att.signals:
            att.signals.add(name)
            tx.on_abort(lambda: att.signals.discard(name))  # type: ignore[union-attr]
        w = rec.get("wait") or {}
        if rec["status"] == "waiting" and w.get("sig") == name:
            self._set(tx, run, rec, "pending", None, wait=None, due=None)
        return True

    # ------------------------------------------------------------------ ops (clients)

    def _info(self, run: str) -> Optional[list]:
        rec = self.store.runs.get(run)
        return None if rec is None else info(run, rec, self.live.get(run))

    def _answer(self, run: str) -> None:
        with self.lock:
            waiting = self.results.pop(run, [])
        for conn, rid, flag in waiting:
            with self.lock:
                if flag[0]:
                    continue
                flag[0] = True
            self._send_result(conn, rid, run)

    def _send_result(self, conn: Conn, rid: int, run: str) -> None:
        rec = self.store.runs.get(run)
        if rec is None:
            conn.send(err_reply(rid, "invalid_run", f"run {run!r} was deleted"))
            return
        last = b"\xc0"
        if rec["status"] in TERMINAL:
            with self.store.reader() as r:
                meta = r.topic(rec["topic"])
                if meta is not None and meta.next > meta.first:
                    last = r.records(meta, meta.next - 1, meta.next - 1, 1, False)[0]
        conn.send(ok_reply_raw(rid, b"\x92" + msgpack.packb(info(run, rec, self.live.get(run)),
                                                           use_bin_type=True) + last))
