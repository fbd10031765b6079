"""Transactions over the store: paged, checked reads (:class:`Reader`) and write
transactions (:class:`WriteTx`) with their in-memory overlays.

Writes happen in :class:`WriteTx` objects, one LMDB write transaction each, opened
(:meth:`~pipeproc._store.Store.begin`) and committed by whichever thread holds the node's
writer role. Topic and proc records are kept in memory (``Store.topics``, ``Store.procs``),
authoritative for the writer: a transaction reads them through an overlay and the overlay is
merged only after the commit succeeded, so an aborted transaction leaves no trace in memory
either. Reads (:meth:`~pipeproc._store.Store.reader`) are MVCC snapshots that check every
record's checksum (see :mod:`pipeproc._layout` for what the bytes mean).

Node side. May import: ``_ids`` (bound resolution), ``_layout``, ``_records``, ``errors``,
lmdb (types), msgpack and the standard library; not ``_store`` (which imports this module):
what a transaction needs of the store is :class:`StoreState`.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple

import lmdb
import msgpack

from . import _ids
from ._layout import LOG_KEY, TopicMeta, last_record, log_key, name_key, pack_named
from ._records import CRC_RESIDUE, CRC_SIZE, crc32, record_ms, stored_record
from .errors import StoreCorrupted

#: at most this many logs, and about this many bytes, in one page of a read
PAGE_MAX_LOGS = 10_000
PAGE_MAX_BYTES = 4 * 1024 * 1024


class StoreState(Protocol):
    """What a transaction uses of the open :class:`~pipeproc._store.Store`: its LMDB
    environment and databases and its in-memory records."""

    path: str
    env: Any
    db_topics: Any
    db_logs: Any
    db_procs: Any
    db_sysprocs: Any
    db_runs: Any
    db_meta: Any
    topics: Dict[str, TopicMeta]
    procs: Dict[str, dict]
    sysprocs: Dict[str, dict]
    runs: Dict[str, dict]
    journals: Set[str]
    unchecked: Dict[int, int]
    next_tid: int
    last_ms: int
    damaged_reads: int

    def corrupted(self, tid: int, seq: int, what: str = ...) -> StoreCorrupted:
        ...


class _View:
    """Log lookups shared by read and write transactions."""

    txn: lmdb.Transaction
    store: StoreState

    def topic(self, name: str) -> Optional[TopicMeta]:  # pragma: no cover - overridden
        raise NotImplementedError

    def ms_at(self, tid: int, seq: int) -> int:
        value = self.txn.get(log_key(tid, seq), db=self.store.db_logs)
        if value is None:  # pragma: no cover - contiguity is an invariant
            raise self.store.corrupted(tid, seq, "is missing")
        if seq >= self.store.unchecked.get(tid, 0) and crc32(value) != CRC_RESIDUE:
            raise self.store.corrupted(tid, seq)
        return record_ms(value)

    def resolve(self, meta: TopicMeta, lower: Optional[_ids.Bound], upper: Optional[_ids.Bound],
                exclusive: bool) -> Tuple[int, int]:
        return _ids.resolve_range(lower, upper, exclusive, meta.first, meta.next,
                                  lambda q: self.ms_at(meta.tid, q))

    def records(self, meta: TopicMeta, lo: int, hi: int, limit: int, reverse: bool,
                max_bytes: int = PAGE_MAX_BYTES) -> List[Any]:
        """Up to ``limit`` stored records of ``[lo, hi]`` (from ``hi`` down when ``reverse``),
        stopping early past ``max_bytes``."""
        lo = max(lo, meta.first)
        hi = min(hi, meta.next - 1)
        n = min(hi - lo + 1, limit)
        if n <= 0:
            return []
        cur = self.txn.cursor(db=self.store.db_logs)
        if reverse:
            if not cur.set_key(log_key(meta.tid, hi)):
                return []
            it = cur.iterprev(keys=False, values=True)
        else:
            if not cur.set_key(log_key(meta.tid, lo)):
                return []
            it = cur.iternext(keys=False, values=True)
        out: List[Any] = []
        size = 0
        old = self.store.unchecked.get(meta.tid, 0)  # below: format 2, no checksum
        if old <= lo:
            for value in islice(it, n):
                if crc32(value) != CRC_RESIDUE:
                    raise self.store.corrupted(meta.tid, hi - len(out) if reverse else lo + len(out))
                out.append(value[:-CRC_SIZE])
                size += len(value)
                if size >= max_bytes:
                    break
            return out
        for value in islice(it, n):
            seq = hi - len(out) if reverse else lo + len(out)
            if seq >= old:
                if crc32(value) != CRC_RESIDUE:
                    raise self.store.corrupted(meta.tid, seq)
                value = value[:-CRC_SIZE]
            elif not _legacy_ok(value, seq):  # no checksum: at least never undecodable
                raise self.store.corrupted(meta.tid, seq, "cannot be decoded")
            out.append(value)
            size += len(value)
            if size >= max_bytes:
                break
        return out


def _legacy_ok(value: Any, seq: int) -> bool:
    """Whether a format-2 record (no checksum) decodes as ``[ms, seq, body]`` of ``seq``."""
    try:
        rec = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception:
        return False
    return type(rec) is list and len(rec) == 3 and rec[1] == seq and type(rec[0]) is int


class Reader(_View):
    """A read transaction."""

    def __init__(self, store: StoreState, txn: lmdb.Transaction) -> None:
        self.store, self.txn = store, txn

    def topic(self, name: str) -> Optional[TopicMeta]:
        value = self.txn.get(name.encode(), db=self.store.db_topics)
        if value is None:
            return None
        try:
            meta = TopicMeta.unpack(value)
        except Exception as exc:
            self.store.damaged_reads += 1
            raise StoreCorrupted(f"the record of topic {name!r} is damaged ({exc}): the store "
                                 f"at {self.store.path} is damaged (run `pipeproc check`)"
                                 ) from None
        last = last_record(self.txn.cursor(db=self.store.db_logs), meta.tid)
        if last is not None and last[0] >= meta.next:
            meta.next = last[0] + 1
        return meta


class WriteTx(_View):
    """One LMDB write transaction plus overlays of the in-memory topic and proc records.

    Operations check everything that can fail before they write anything, so an operation
    that raises a :class:`~pipeproc.PipeProcError` leaves the transaction as it found it and
    the other requests of the group commit go on.
    """

    def __init__(self, store: StoreState, now: int) -> None:
        self.store = store
        self.now = now
        self.txn = store.env.begin(write=True)
        self.topics: Dict[str, TopicMeta] = {}
        self.procs: Dict[str, Optional[dict]] = {}
        self.sysprocs: Dict[str, Optional[dict]] = {}
        self.runs: Dict[str, Optional[dict]] = {}
        #: topics dropped whole (a deleted workflow run's journal)
        self.dropped: set = set()
        #: what the workflow runs of this write left to do after the commit (``_flows``)
        self.flow_after: List[Any] = []
        #: what to do if this transaction is aborted (see :meth:`on_abort`)
        self.undo: List[Callable[[], None]] = []
        self.next_tid = store.next_tid
        self.stamped = False
        #: topics whose record must be written (created, or ``first`` moved)
        self.persist: set = set()
        #: topics that received logs, procs whose state changed (for notifications)
        self.touched_topics: set = set()
        self.touched_procs: set = set()

    # -- topics and logs

    def topic(self, name: str) -> Optional[TopicMeta]:
        meta = self.topics.get(name)
        if meta is None:
            meta = self.store.topics.get(name)
        return meta

    def topic_w(self, name: str) -> TopicMeta:
        """The topic's record for writing, created when missing."""
        meta = self.topics.get(name)
        if meta is None:
            base = self.store.topics.get(name)
            if base is None:
                meta = TopicMeta(self.next_tid, 0, 0, self.now)
                self.next_tid += 1
                self.persist.add(name)
            else:
                meta = base.copy()
            self.topics[name] = meta
        return meta

    def append(self, items: List[Tuple[str, bytes]]) -> List[int]:
        """Append logs (topic, encoded body); returns their sequences. All share ``now``."""
        now = self.now
        put = self.txn.put
        db = self.store.db_logs
        seqs = []
        last_topic = None
        meta = None
        for topic, body in items:
            if topic is not last_topic:
                meta = self.topic_w(topic)
                last_topic = topic
                self.touched_topics.add(topic)
            seq = meta.next  # type: ignore[union-attr]
            put(LOG_KEY.pack(meta.tid, seq), stored_record(now, seq, body), db=db)  # type: ignore[union-attr]
            meta.next = seq + 1  # type: ignore[union-attr]
            seqs.append(seq)
        self.stamped = True
        return seqs

    def delete_prefix(self, name: str, upto: int) -> int:
        """Delete a topic's stored logs with seq < ``upto``; returns how many."""
        meta = self.topic_w(name)
        upto = min(upto, meta.next)
        if upto <= meta.first:
            return 0
        cur = self.txn.cursor(db=self.store.db_logs)
        n = 0
        if cur.set_key(log_key(meta.tid, meta.first)):
            for _ in range(upto - meta.first):
                if not cur.delete():
                    break
                n += 1
        meta.first = upto
        self.persist.add(name)
        return n

    # -- procs

    def proc(self, name: str) -> Optional[dict]:
        if name in self.procs:
            return self.procs[name]
        return self.store.procs.get(name)

    def put_proc(self, name: str, rec: Optional[dict]) -> None:
        """Write (or delete, with ``None``) a proc record."""
        self.procs[name] = rec
        self.touched_procs.add(name)

    def sysproc(self, name: str) -> Optional[dict]:
        if name in self.sysprocs:
            return self.sysprocs[name]
        return self.store.sysprocs.get(name)

    def put_sysproc(self, name: str, rec: Optional[dict]) -> None:
        self.sysprocs[name] = rec

    # -- workflow runs (pipeproc.flow)

    def run(self, rid: str) -> Optional[dict]:
        if rid in self.runs:
            return self.runs[rid]
        return self.store.runs.get(rid)

    def put_run(self, rid: str, rec: Optional[dict]) -> None:
        """Write (or delete, with ``None``) a run record."""
        self.runs[rid] = rec

    def drop_topic(self, name: str) -> int:
        """Delete a topic whole: its logs and its record (a deleted run's journal)."""
        meta = self.topic(name)
        if meta is None:
            return 0
        n = self.delete_prefix(name, meta.next)
        self.persist.discard(name)
        self.topics.pop(name, None)
        self.dropped.add(name)
        return n

    # -- end

    def flush(self) -> None:
        """Write the overlays into the transaction (before commit)."""
        s = self.store
        put, delete = self.txn.put, self.txn.delete
        for name in self.persist:
            put(name.encode(), self.topics[name].pack(), db=s.db_topics)
        for name, rec in self.procs.items():
            key = name_key(name)
            if rec is None:
                delete(key, db=s.db_procs)
            else:
                put(key, pack_named(name, key, rec), db=s.db_procs)
        for table, db in ((self.sysprocs, s.db_sysprocs), (self.runs, s.db_runs)):
            for name, rec in table.items():
                key = name_key(name)
                if rec is None:
                    delete(key, db=db)
                else:
                    put(key, pack_named(name, key, rec), db=db)
        for name in self.dropped:
            delete(name.encode(), db=s.db_topics)
        if self.next_tid != s.next_tid:
            put(b"next_tid", str(self.next_tid).encode(), db=s.db_meta)
        if self.persist:  # the GC may delete a topic's last log: keep its stamp here
            clock = max(s.last_ms, self.now) if self.stamped else s.last_ms
            put(b"clock", str(clock).encode(), db=s.db_meta)

    @property
    def wrote(self) -> bool:
        """Whether the transaction changes anything (LMDB commits an empty one without a
        sync)."""
        return bool(self.stamped or self.persist or self.procs or self.sysprocs or self.runs
                    or self.dropped)

    def commit(self) -> None:
        """Commit (fsync under durability "full"), then publish the overlays in memory."""
        self.flush()
        self.txn.commit()
        s = self.store
        s.topics.update(self.topics)
        for name in self.dropped:
            s.topics.pop(name, None)
        for run, rec in self.runs.items():
            if rec is None:
                old = s.runs.get(run)
                if old is not None:
                    s.journals.discard(old["topic"])
            else:
                s.journals.add(rec["topic"])
        for table, overlay in ((s.procs, self.procs), (s.sysprocs, self.sysprocs),
                               (s.runs, self.runs)):
            for name, rec in overlay.items():
                if rec is None:
                    table.pop(name, None)
                else:
                    table[name] = rec
        s.next_tid = self.next_tid
        if self.stamped and self.now > s.last_ms:
            s.last_ms = self.now

    def on_abort(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if this transaction is aborted: it undoes a change of the node's
        memory made for this write (the writer runs a round again in a fresh transaction
        when the map grows, or request by request to isolate a failing one; what its
        requests changed in memory must not stay from the aborted try)."""
        self.undo.append(fn)

    def abort(self) -> None:
        self.txn.abort()
