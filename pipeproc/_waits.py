"""Everything in the node that waits: timers, parked requests, claim deadlines, back-offs.

Owns:

* :class:`Timers`: a heap of ``(when, callback)`` on one thread (monotonic clock);
* :class:`Waits`: the **parked requests** — claims that found nothing (workers, live
  procs: retried by the writer when a commit touches what they wait for) and
  ``wait_for_procs`` (answered when its procs are idle) — and the **wake-ups after a
  commit**;
* :class:`Deadlines`: the **reclaim timers** (one per proc, at the monotonic deadline of
  its pending claim: never the wall clock, which may step back) and the **back-offs** of
  system procs after a failure, with the failure's log line;
* :class:`SysDefs`: the system proc definitions by proc name (which claims are a
  processor's time limit, which parked workers a commit can serve);
* the notes a write leaves for after its commit (:func:`note`).

May import: ``_procs``, ``_writer`` (the writer it submits retries to), ``_store`` (types),
``errors`` and the standard library. Never ``_conn``, ``_handlers`` or ``_node``: a parked
request holds its connection as an opaque object with ``closed``, ``id``, ``reply``,
``fail`` and ``send``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _procs
from ._store import Store
from ._writer import Writer
from .errors import PipeProcError, ProcIsDisabled, Timeout

log = logging.getLogger("pipeproc.node")

# back-off of a system proc between deliveries of a claim after a failure: (first delay,
# cap) in seconds, the delay doubling with each failure in a row (system_proc(backoff=...))
DEFAULT_BACKOFF = (0.1, 30.0)


# ------------------------------------------------------------------------- timers

class Timers:
    """A heap of (when, callback) served by one thread that sleeps until the earliest.

    ``__init__`` sets state only: :meth:`start` starts the thread, :meth:`stop` stops it.
    Timers added before the start wait for it."""

    def __init__(self) -> None:
        self._heap: list = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="timers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the timer thread at monotonic time ``when`` (finite)."""
        if not math.isfinite(when):
            raise ValueError("a timer needs a finite time")
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            if self._heap[0][2] is fn:
                self._cond.notify()

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(time.monotonic() + delay, fn)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(None if not self._heap else self._heap[0][0] - now)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # pragma: no cover - a timer must never kill the thread
                log.exception("timer callback failed")


# ------------------------------------------------------------------------- system procs

class SysDefs:
    """proc name -> its system proc definition, cached until a commit changes them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: Optional[Tuple[Dict[str, dict], List[str]]] = None
        #: system proc name -> its topic, for the system procs found with nothing to claim
        #: (active, no claim pending, no log past their position) as of a commit, until a
        #: commit touches their topic or their record: the workers' claims skip them
        #: without reading them (unless the claim's own round touched them already), so a
        #: claim reads and checks only the system procs that may have work. Claims record
        #: marks in their transaction (:func:`mark_empty`); only :meth:`committed` (the
        #: writer role, after each commit) writes this.
        self.empty: Dict[str, str] = {}
        self._empty_by_topic: Dict[str, set] = {}

    def names(self) -> Dict[str, dict]:
        """proc name -> its system proc definition."""
        cache = self._cache
        if cache is None:
            out = {}
            for d in self.store.sysprocs.values():
                for pn in d["procs"]:
                    out[pn] = d
            cache = self._cache = (out, sorted(out))
        return cache[0]

    def sorted(self) -> List[str]:
        """The system procs' names, sorted (round robin order of the workers' claims)."""
        self.names()
        return self._cache[1]  # type: ignore[index]

    def touched_marks(self, tx: Any) -> set:
        """The marked system procs whose topic or record ``tx`` has touched so far (their
        marks go at its commit; a claim in ``tx`` must look at them). O(what ``tx``
        touched), not O(marks)."""
        out: set = set()
        by_topic = self._empty_by_topic
        for topic in tx.touched_topics:
            names = by_topic.get(topic)
            if names:
                out |= names
        empty = self.empty
        for name in tx.touched_procs:
            if name in empty:
                out.add(name)
        return out

    def committed(self, tx: Any) -> None:
        """After a commit: forget the cache when it changed system procs; record the
        system procs its claims found empty, then forget those whose topic or record it
        touched (a mark made before a later write of the same round is dropped too)."""
        if tx.sysprocs:
            self._cache = None
            self.empty.clear()
            self._empty_by_topic.clear()
            return
        empty = self.empty
        for name, topic in tx.__dict__.get("sys_empty", ()):
            empty[name] = topic
            self._empty_by_topic.setdefault(topic, set()).add(name)
        if not empty:
            return
        by_topic = self._empty_by_topic
        for topic in tx.touched_topics:
            names = by_topic.pop(topic, None)
            if names:
                for name in names:
                    empty.pop(name, None)
        for name in tx.touched_procs:
            topic = empty.pop(name, None)
            if topic is not None:
                names = by_topic.get(topic)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del by_topic[topic]


def mark_empty(tx: Any, name: str, topic: str) -> None:
    """A claim in ``tx`` found system proc ``name`` with nothing to claim (see
    :attr:`SysDefs.empty`; recorded only if ``tx`` commits)."""
    tx.__dict__.setdefault("sys_empty", []).append((name, topic))


def note(tx: Any, *note: Any) -> None:
    """Something to do once ``tx`` is committed (the node's ``after_commit`` reads
    :func:`notes`): a failure is logged and backed off, a worker recycled, only if its
    reclaim was written."""
    tx.__dict__.setdefault("sysfail_notes", []).append(note)
    if note[0] == "failed":  # not claimed again in the same write (its back-off)
        tx.__dict__.setdefault("sysfail_skip", set()).add(note[1])


def notes(tx: Any) -> List[tuple]:
    return tx.__dict__.get("sysfail_notes", ())


def skipped(tx: Any) -> Any:
    """The procs that failed earlier in this write: not claimed again in it."""
    return tx.__dict__.get("sysfail_skip", ())


# ------------------------------------------------------------------------- parked requests

class Parked:
    """A claim that found nothing: ``attempt`` is retried when a commit touches
    ``interest`` (a set of proc names, or ``"sys"``: any system proc)."""

    __slots__ = ("conn", "rid", "interest", "attempt", "done")

    def __init__(self, conn: Any, rid: int, interest: Any, attempt: Callable, done: Callable) -> None:
        self.conn = conn
        self.rid = rid
        self.interest = interest
        self.attempt = attempt
        self.done = done


class IdleWait:
    """A ``wait_for_procs``: ``hold`` is the busy proc that holds it back."""

    __slots__ = ("conn", "rid", "names", "hold")

    def __init__(self, conn: Any, rid: int, names: Optional[List[str]], hold: str) -> None:
        self.conn = conn
        self.rid = rid
        self.names = names
        self.hold = hold


class Waits:
    """Parked requests, and waking them after a commit."""

    def __init__(self, store: Store, writer: Writer, timers: Timers, sysdefs: SysDefs) -> None:
        self.store = store
        self.writer = writer
        self.timers = timers
        self.sysdefs = sysdefs
        self.lock = threading.Lock()
        self.idle: Dict[tuple, IdleWait] = {}     # (conn id, rid) -> wait_for_procs
        self.claims: Dict[tuple, Parked] = {}     # (conn id, rid) -> parked claim

    def park(self, conn: Any, rid: int, interest: Any, attempt: Callable,
             done: Callable) -> None:
        """Park a claim that found nothing (unless its connection is gone)."""
        with self.lock:
            if not conn.closed:
                conn.parked = True
                self.claims[(conn.id, rid)] = Parked(conn, rid, interest, attempt, done)

    def attempt(self, conn: Any, rid: int, interest: Any, attempt: Callable) -> None:
        """Run ``attempt(tx)`` in the writer; ``None`` parks the request until a commit
        touches ``interest``; otherwise its value is the reply's bytes."""

        def done(ok: bool, value: Any) -> None:
            if not ok:
                conn.fail(rid, value)
            elif value is None:
                self.park(conn, rid, interest, attempt, done)
            else:
                conn.send(value)

        self.writer.submit(attempt, done, conn.id)

    def retry(self, w: Parked) -> None:
        self.writer.submit(w.attempt, w.done)

    def cancel_claim(self, conn: Any, rid: int) -> bool:
        """Unpark a claim (its timeout); ``False``: it was not parked any more."""
        with self.lock:
            return self.claims.pop((conn.id, rid), None) is not None

    def wake_sys(self, n: int) -> None:
        """Wake up to ``n`` idle workers (they look for a system proc claim again)."""
        woken: List[Parked] = []
        with self.lock:
            for key, w in list(self.claims.items()):
                if len(woken) >= n:
                    break
                if w.interest == "sys":
                    woken.append(w)
                    del self.claims[key]
        for w in woken:
            self.retry(w)

    def wait_idle(self, conn: Any, rid: int, names: Optional[List[str]],
                  timeout: Optional[float]) -> None:
        """``wait_for_procs``: answer now when the procs are idle, else park until they
        are (or fail when one of them died, or at ``timeout``)."""
        key = (conn.id, rid)
        with self.store.reader() as r:
            gone = _procs.first_dead(r, names, self.store.procs)
            if gone is not None:
                raise self.dead_error(gone)
            with self.lock:
                hold = _procs.first_busy(r, names, self.store.procs)
                if hold is None:
                    conn.reply(rid, None)
                    return
                conn.parked = True
                self.idle[key] = IdleWait(conn, rid, names, hold)
        if timeout is not None:
            def expire() -> None:
                with self.lock:
                    w = self.idle.pop(key, None)
                if w is not None:
                    conn.fail(rid, Timeout(f"procs still busy after {timeout} s"))
            self.timers.after(float(timeout), expire)

    def dead_error(self, name: str) -> PipeProcError:
        """``proc_is_disabled`` for ``wait_for_procs`` over a dead stage."""
        rec = self.store.procs.get(name) or {}
        err = rec.get("last_error")
        last = (f"; last error on logs {err.get('range')}: {err.get('type')}: "
                f"{err.get('message')}" if err else "")
        return ProcIsDisabled(
            f"proc {name!r} was disabled after {rec.get('reclaims')} failed attempts in a row "
            f"(max_reclaims={rec.get('max_reclaims')}) with work left{last}. Fix the cause, "
            f"then resume_proc({name!r}) (pipeproc resume {name})")

    def drop_conn(self, conn_id: int) -> None:
        """Forget the requests a closed connection parked."""
        with self.lock:
            for table in (self.idle, self.claims):
                for key in [k for k in table if k[0] == conn_id]:
                    del table[key]

    def release_all(self) -> None:
        """At shutdown: every parked claim runs once more (workers get "exit", live procs
        their end)."""
        with self.lock:
            parked = list(self.claims.values())
            self.claims.clear()
        for w in parked:
            self.retry(w)

    def after_commit(self, topics: Any, procs: Any) -> None:
        """Wake the parked requests a commit may serve (it touched ``topics``, ``procs``)."""
        store = self.store
        if self.claims:
            sprocs = store.procs

            def touched(names: Any) -> bool:
                """A commit touched one of these procs, or the topic of one of them."""
                for n in names:
                    if n in procs:
                        return True
                    rec = sprocs.get(n)
                    if rec is not None and rec["topic"] in topics:
                        return True
                return False

            woken: List[Parked] = []
            sys_budget = -1
            with self.lock:
                for key, w in list(self.claims.items()):
                    interest = w.interest
                    if interest == "sys":
                        # Parked workers found no system proc to claim; only the system
                        # procs this commit touched can have become claimable, each by
                        # one worker: wake that many, not every idle worker.
                        if sys_budget < 0:
                            sys_budget = sum(
                                1 for n in self.sysdefs.sorted()
                                if (rec := sprocs.get(n)) is not None
                                and (n in procs or rec["topic"] in topics)
                                and rec["status"] == "active" and not _procs.pending(rec))
                        hit = sys_budget > 0
                        if hit:
                            sys_budget -= 1
                    else:
                        hit = touched(interest)
                    if hit:
                        woken.append(w)
                        del self.claims[key]
            for w in woken:
                self.retry(w)
        if procs and self.idle:
            done = []
            failed = []
            with store.reader() as r:
                with self.lock:
                    for key, iw in list(self.idle.items()):
                        # a proc it waits for died (disabled by max_reclaims with work left)
                        gone = _procs.first_dead(
                            r, [n for n in procs if iw.names is None or n in iw.names],
                            store.procs)
                        if gone is not None:
                            failed.append((iw.conn, iw.rid, self.dead_error(gone)))
                            del self.idle[key]
                            continue
                        # a waiter re-scans only once the proc that held it back is done
                        if _procs.busy(r, store.procs.get(iw.hold)):
                            continue
                        hold = _procs.first_busy(r, iw.names, store.procs)
                        if hold is None:
                            done.append((iw.conn, iw.rid))
                            del self.idle[key]
                        else:
                            iw.hold = hold
            for conn, rid in done:
                conn.reply(rid, None)
            for conn, rid, exc in failed:
                conn.fail(rid, exc)


# ------------------------------------------------------------------------- deadlines

class Deadlines:
    """Reclaim timers at monotonic claim deadlines, and system procs' back-offs."""

    def __init__(self, store: Store, writer: Writer, timers: Timers, sysdefs: SysDefs,
                 waits: Waits) -> None:
        self.store = store
        self.writer = writer
        self.timers = timers
        self.sysdefs = sysdefs
        self.waits = waits
        # proc name -> the claim deadline (monotonic s) its one pending reclaim timer fires at
        self._armed: Dict[str, float] = {}
        self._armed_lock = threading.Lock()
        # proc name -> (identity of its pending claim, monotonic deadline): deadlines never
        # use the wall clock (a step back would freeze them); a claim found pending at
        # start gets now + reclaim_timeout
        self._mono: Dict[str, tuple] = {}
        self._mono_lock = threading.Lock()
        # system proc name -> monotonic time its back-off after a failure ends
        self.backoff: Dict[str, float] = {}
        # system proc name -> [outcome, tries]: a worker's outcome the store refused
        # (storage_full...), written again by the node after a back-off (_syshandlers):
        # meanwhile its claim does not time out
        self.held: Dict[str, list] = {}

    def arm_timeout(self, name: str) -> None:
        """Make sure a timer fires at the proc's claim deadline (after a commit touched it).

        One timer per proc at a time: a proc that claims again before its timer fires
        keeps that timer, which re-arms itself for the later deadline when it fires
        (deadlines only move later, except for a proc destroyed and created again with a
        shorter timeout, which gets its own earlier timer). A timer per claim would pile
        up reclaim_timeout x claim rate entries and wake the timer thread once per claim.
        """
        rec = self.store.procs.get(name)
        if rec is None:
            with self._mono_lock:
                self._mono.pop(name, None)
            return
        due = self._mono_due(name, rec)
        if due is None:
            return
        with self._armed_lock:
            armed = self._armed.get(name)
            if armed is not None and armed <= due:
                return  # that timer fires first and re-arms for this deadline
            self._armed[name] = due
        self._arm(name, due)

    def _mono_due(self, name: str, rec: dict) -> Optional[float]:
        """The monotonic deadline of ``rec``'s pending claim (``None``: it has none).

        A claim is told apart from the earlier ones by its record (claim time, range, ids
        digest, reclaims); the first time the node sees it, its deadline is now +
        reclaim_timeout (the claim was just committed, or the node just started)."""
        if _procs.deadline(rec) is None:
            with self._mono_lock:
                self._mono.pop(name, None)
            return None
        ident = (rec["tbase"], tuple(rec["claimed"]), rec.get("cdig"), rec["reclaims"],
                 rec["last_claimed_at"])
        with self._mono_lock:
            e = self._mono.get(name)
            if e is None or e[0] != ident:
                e = self._mono[name] = (ident, time.monotonic() + rec["reclaim_timeout"])
        return e[1]

    def due(self, name: str, rec: dict) -> bool:
        """Whether ``rec``'s pending claim has timed out (monotonic clock)."""
        if name in self.held:
            return False  # the node writes its outcome again: not the consumer's delay
        due = self._mono_due(name, rec)
        return due is not None and time.monotonic() >= due

    def expire_rec(self, tx: Any, name: str, rec: dict) -> dict:
        """Reclaim ``rec``'s pending claim when it timed out. For a system proc that is its
        processor's time limit: say so, keep it as last_error, recycle the worker."""
        if not self.due(name, rec):
            return rec
        if name not in self.sysdefs.names():
            new = _procs.expire(tx, name, rec, lambda n, r: True)
            if new["status"] == "disabled":
                log.error("proc %r is DISABLED: its claim %s timed out and reclaims reached "
                          "max_reclaims=%d", name, _procs.range_str(rec["claimed"]),
                          new["max_reclaims"])
            return new
        err = _procs.error_info(
            "TimeLimitExceeded",
            f"the processor ran longer than reclaim_timeout={rec['reclaim_timeout']:g} s "
            "(a system proc's time limit); its worker was recycled", tx.now, rec["claimed"])
        new = _procs._reclaimed(rec, err)
        tx.put_proc(name, new)
        note(tx, "failed", name, new, err)
        note(tx, "recycle", name, rec["claimed"])
        return new

    def _arm(self, name: str, due: float) -> None:
        def fire() -> None:
            with self._armed_lock:
                if self._armed.get(name) != due:
                    return  # superseded by an earlier timer of this proc
                current = self.store.procs.get(name)
                now_due = None if current is None else self._mono_due(name, current)
                if now_due is not None and now_due > due:  # claimed again since: re-arm
                    self._armed[name] = now_due
                else:
                    del self._armed[name]
            if now_due is not None and now_due > due:
                self._arm(name, now_due)
            elif now_due is not None:
                self.writer.submit(lambda tx: self._expire(tx, name), lambda ok, v: None)
        self.timers.at(due + 0.001, fire)

    def _expire(self, tx: Any, name: str) -> None:
        rec = tx.proc(name)
        if (rec is not None and self.expire_rec(tx, name, rec) is rec
                and _procs.deadline(rec) is not None and name not in self.held):
            # not due yet (the timer ran early): the proc is unchanged, so no commit
            # re-arms its timer; arm it again here
            self.arm_timeout(name)

    # -- failures of system procs: the log line, the back-off

    def failed(self, name: str, new: dict, err: dict, backoff: bool = True) -> None:
        """Say that ``name``'s consumer failed (``new``: the record after the counted
        reclaim) and, for a system proc, hold its next delivery back."""
        sysdef = self.sysdefs.names().get(name)
        what = "system proc" if sysdef is not None else "proc"
        tb = err.get("traceback")
        detail = f"{err['type']}: {err['message']}"
        if new["status"] == "disabled":
            self.backoff.pop(name, None)
            log.error("%s %r failed on logs %s: %s\n%s %r is DISABLED: %d failure(s) in a row "
                      "reached max_reclaims=%d; its logs wait until resume_proc(%r)%s",
                      what, name, err["range"], detail, what, name, new["reclaims"],
                      new["max_reclaims"], name, ("\n" + tb.rstrip()) if tb else "")
            return
        delay = 0.0
        if sysdef is not None and backoff:
            first, cap = sysdef.get("backoff") or DEFAULT_BACKOFF
            delay = min(cap, first * 2.0 ** min(max(new["reclaims"], 1) - 1, 64))
        limit = "unlimited" if new["max_reclaims"] == -1 else str(new["max_reclaims"])
        log.warning("%s %r failed on logs %s (failure %d in a row, max_reclaims=%s): %s; "
                    "delivered again in %.1f s%s", what, name, err["range"], new["reclaims"],
                    limit, detail, delay,
                    ("\n" + tb.rstrip()) if tb and new["reclaims"] <= 1 else "")
        if tb and new["reclaims"] > 1:
            log.debug("traceback of %r's failure on %s:\n%s", name, err["range"], tb.rstrip())
        if delay > 0:
            until = time.monotonic() + delay
            self.backoff[name] = until
            self.timers.at(until, lambda: self._backoff_over(name, until))

    def in_backoff(self, name: str) -> bool:
        until = self.backoff.get(name)
        return until is not None and time.monotonic() < until

    def backoff_left(self, name: str) -> float:
        """Seconds left of ``name``'s back-off (0.0: none)."""
        return max(0.0, self.backoff.get(name, 0.0) - time.monotonic())

    def _backoff_over(self, name: str, until: float) -> None:
        """A back-off ended: wake an idle worker for the proc (if nothing replaced it)."""
        if self.backoff.get(name) == until:
            self.backoff.pop(name, None)
        self.waits.wake_sys(1)
