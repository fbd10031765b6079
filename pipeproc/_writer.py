"""The writer role: one write transaction at a time, group commit of queued requests.

Owns the :class:`Writer` (its thread, the queue of :class:`Job`\\ s, the group-commit window,
growing the map or using the GC's reserve when the store is full, isolating the request
that fails a round) and nothing else: what a job writes is the caller's ``fn(tx)``, what
happens after a commit is the ``after_commit`` callback the node gives it.

May import: ``_store`` (damage errors), ``errors``, lmdb (its error types) and the standard
library. Never ``_conn``, ``_handlers``, ``_waits`` or ``_node`` (they call into it).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import lmdb

from ._store import DAMAGE_ERRORS, Store, damaged
from .errors import InternalError, NoActiveNode, PipeProcError, StorageFull

log = logging.getLogger("pipeproc.node")

# Group commit window: at most this long, and this fraction of the last commit's duration.
GATHER_MAX = 0.0005
GATHER_FRACTION = 0.5
# Rounds a thread that committed inline serves for requests queued meanwhile.
INLINE_ROUNDS = 4


def _abort(tx: Any) -> None:
    """Abort ``tx`` and undo what its requests changed in the node's memory (newest
    first; see ``WriteTx.on_abort``)."""
    try:
        tx.abort()
    finally:
        for fn in reversed(tx.undo):
            try:
                fn()
            except Exception:  # pragma: no cover - an undo bug must not wedge the writer
                log.exception("undoing an aborted write's change in memory failed")
        tx.undo.clear()


class Job:
    """One write request: ``fn(tx)`` runs in a write transaction (returns a value, or raises
    a ``PipeProcError`` having written nothing); ``done(ok, value)`` runs after the commit.
    ``gc``: a GC step (the only job allowed into the store's reserve when it is full)."""

    __slots__ = ("fn", "done", "gc")

    def __init__(self, fn: Callable[[Any], Any], done: Callable[[bool, Any], None],
                 gc: bool = False) -> None:
        self.fn = fn
        self.done = done
        self.gc = gc


class Writer:
    """The writer role: one write transaction at a time, group commit of queued requests.

    ``submit(fn, done)``: ``fn(tx)`` runs inside a write transaction and returns a result or
    raises a ``PipeProcError`` having written nothing; ``done(ok, value)`` runs after the
    commit (durable), in the writer's thread. ``after_commit(tx)`` runs after every commit.

    ``__init__`` sets state only; :meth:`start` starts the writer thread, :meth:`stop`
    finishes the queued requests and stops it.
    """

    def __init__(self, store: Store, durable: bool,
                 after_commit: Callable[[Any], None]) -> None:
        self.store = store
        self._after_commit = after_commit
        self._lock = threading.Lock()
        self._queue: List[Job] = []
        self._busy = False
        self._handoff = threading.Condition(self._lock)
        self._handed = False
        self._stopped = False
        # Group commit window (durable stores only): connections that wrote recently are
        # expected to write again; a round waits a little for them (see _take).
        self._durable = durable
        self._recent: Dict[int, float] = {}
        self._arrive = threading.Condition(self._lock)
        self._gathering = False
        self._expected = 0
        # The I/O loop's thread: its writes wait for the end of its pass (see kick).
        self.loop_thread: Optional[int] = None
        self.commit_time = 0.0  # duration of the last commit (seconds)
        self.rounds = 0    # write transactions committed that wrote something (each a sync)
        self.requests = 0  # write requests they held
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def submit(self, fn: Callable[[Any], Any], done: Callable[[bool, Any], None],
               conn: Optional[int] = None, gc: bool = False) -> None:
        """Queue a write (``conn``: the id of the connection it comes from, for the group
        commit window). On the I/O loop's thread it waits for the end of the loop's pass
        (:meth:`kick`); on another thread it runs at once when the writer role is free."""
        with self._lock:
            if not self._stopped:
                self._queue.append(Job(fn, done, gc))
                if self._durable and conn is not None:
                    self._recent[conn] = time.monotonic()
                if self._busy:
                    if self._gathering and len(self._queue) >= self._expected:
                        self._arrive.notify()  # the round is complete: start it now
                    return
                if threading.get_ident() == self.loop_thread:
                    return  # the I/O loop starts the round at the end of its pass (kick)
                self._busy = True
                jobs = self._take()
            else:
                jobs = None
        if jobs is None:
            done(False, NoActiveNode("the node is shutting down"))
            return
        self._round(jobs)
        self._after_inline()

    def kick(self, solo: bool) -> None:
        """Start a round for what the I/O loop queued during its pass.

        Inline on a fast store (no thread hand-off). On a durable one, on the writer
        thread (the loop keeps reading during the fsync, and the writer may wait a little
        to gather more requests) — unless ``solo``: one connection alone has been talking
        to the node lately, so nobody waits behind the fsync and the hand-off would only
        add a thread wake-up to each of its calls."""
        with self._lock:
            if self._busy or not self._queue:
                return
            self._busy = True
            if self._durable and not self._stopped and not solo:
                self._handed = True
                self._handoff.notify()
                return
            jobs = self._take(gather=False)
        self._round(jobs)
        self._after_inline()

    def _after_inline(self) -> None:
        """After a round run inline: serve what queued meanwhile (a few rounds at most, then
        the writer thread takes over), or release the writer role."""
        for _ in range(INLINE_ROUNDS):
            with self._lock:
                if not self._queue:
                    self._busy = False
                    return
                if self._durable:
                    break
                jobs = self._take()
            self._round(jobs)
        with self._lock:
            if self._queue:
                self._handed = True
                self._handoff.notify()
            else:
                self._busy = False

    def _take(self, gather: bool = True) -> List[Job]:
        """The queued jobs for the next round (lock held).

        On a durable store a commit costs an fsync whatever it holds, so before a round
        starts with fewer requests than connections that are writing back to back, it
        waits briefly (a fraction of the last commit's duration) for their next request:
        otherwise concurrent writers fall into alternating half-empty rounds. (Never on
        the I/O loop, ``gather=False``: it is the one that would read them.)
        """
        if gather and self._durable and self._recent:
            now = time.monotonic()
            window = max(0.002, 4 * self.commit_time)
            recent = self._recent
            for k in [k for k, t in recent.items() if now - t > window]:
                del recent[k]
            expected = self._expected = len(recent)
            if len(self._queue) < expected:
                deadline = now + min(GATHER_MAX, GATHER_FRACTION * self.commit_time)
                self._gathering = True
                try:
                    while len(self._queue) < expected and not self._stopped:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._arrive.wait(left)
                finally:
                    self._gathering = False
        jobs = self._queue
        self._queue = []
        return jobs

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._handed and not self._stopped:
                    self._handoff.wait()
                if self._stopped and not self._handed:
                    return
                self._handed = False
            while True:
                with self._lock:
                    if not self._queue:
                        self._busy = False
                        break
                    jobs = self._take()
                self._round(jobs)

    def stop(self) -> None:
        """Refuse new requests, finish the queued ones, stop the thread."""
        with self._lock:
            self._stopped = True
            self._handoff.notify()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if not self._busy and not self._queue:
                    break
            time.sleep(0.002)
        if self._thread.ident is not None:
            self._thread.join(timeout=1)

    def idle(self) -> bool:
        with self._lock:
            return not self._busy and not self._queue

    def _round(self, jobs: List[Job]) -> None:
        store = self.store
        recycled = False
        reserve = False  # grown into the GC's reserve for this round
        while True:
            tx = store.begin()
            results = []
            try:
                for job in jobs:
                    try:
                        results.append((job.done, True, job.fn(tx)))
                    except PipeProcError as exc:
                        results.append((job.done, False, exc))
                t0 = time.monotonic()
                wrote = tx.wrote
                tx.commit()
                if wrote:  # an empty transaction costs LMDB no sync: not counted
                    self.commit_time = time.monotonic() - t0
                    self.rounds += 1
                self.requests += len(jobs)
            except lmdb.MapFullError:
                _abort(tx)
                if store.grow():
                    continue
                if not recycled and store.recycle_pages():
                    recycled = True  # pages freed by the last commit are reusable now
                    continue
                if not reserve and all(job.gc for job in jobs) and store.grow(for_gc=True):
                    reserve = True  # a full store: the GC alone may use the reserve
                    log.warning("store full: the GC uses the map's reserve")
                    continue
                capped = store.max_map_size is not None and \
                    store.env.info()["map_size"] >= store.map_limit()
                self._one_by_one(jobs, StorageFull(
                    "the store reached its maximum map size" if capped
                    else "the disk of the store is full: the store cannot grow"))
                return
            except DAMAGE_ERRORS as exc:
                _abort(tx)
                self._one_by_one(jobs, damaged(exc, store.path))
                return
            except Exception as exc:
                _abort(tx)
                full = isinstance(exc, lmdb.Error) and (
                    "No space" in str(exc)
                    # LMDB turns a short write (a full disk) into EIO
                    or isinstance(exc, lmdb.DiskError) or "Input/output" in str(exc)
                ) and ("No space" in str(exc) or store.disk_full())
                if full and not reserve and all(job.gc for job in jobs) \
                        and store.release_disk_reserve():
                    reserve = True  # a full disk: the GC alone may use the reserve file
                    continue
                if not full:
                    log.exception("a write request failed unexpectedly")
                err = (StorageFull(f"the disk of the store is full: {exc}") if full
                       else InternalError(f"{type(exc).__name__}: {exc}"))
                self._one_by_one(jobs, err)
                return
            break
        if reserve:
            try:
                store.leave_reserve()
            except Exception:  # the round is committed: its replies must still go out
                log.exception("could not give the GC's reserve back to the map after a "
                              "GC round; ordinary writes may use it until the next one")
        for done, ok, value in results:
            try:
                done(ok, value)
            except Exception:  # pragma: no cover
                log.exception("reply failed")
        try:
            self._after_commit(tx)
        except Exception:  # a notification bug must never wedge the writer role
            log.exception("post-commit notifications failed")

    def _one_by_one(self, jobs: List[Job], err: PipeProcError) -> None:
        if len(jobs) == 1:
            try:
                jobs[0].done(False, err)
            except Exception:  # pragma: no cover
                log.exception("reply failed")
            return
        for job in jobs:  # isolate the culprit: every other request still goes through
            self._round([job])
