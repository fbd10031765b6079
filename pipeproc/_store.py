"""The LMDB store: environment, key layout, write transactions and paged reads.

Only the node process opens the store. Layout (named databases opened at start):

========= ============================== ===============================================
db        key                            value
========= ============================== ===============================================
topics    topic name (utf-8)             msgpack ``[tid, next_seq, first_seq, created_ms]``
                                         (``next_seq`` as of the last write of the record)
logs      tid (u32 BE) + seq (u64 BE)    log record (see ``_protocol.record``)
procs     proc name (utf-8)              msgpack proc record (``_procs``)
sysprocs  system proc name (utf-8)       msgpack system proc definition
meta      key                            format version, clock, next topic id
========= ============================== ===============================================

A commit writes only its log records: a topic's record is written when the topic is
created and when the GC moves ``first_seq``, and the ``clock`` key only along with it. A
topic's next sequence is ``max(next_seq of its record, last stored seq + 1)`` (one cursor
step), and the clock at opening is the maximum of the stored clock and the stamp of every
topic's last record: the GC, which may delete a topic's last log, stores the clock in the
same transaction. This keeps a single-log commit to the pages of one B-tree (format 2).

Stored sequences of a topic are always contiguous, ``[first_seq, next_seq)``: commits append
at the end and the GC only removes a prefix. Bound resolution is therefore a binary search
over sequences, and a page is a cursor walk of exactly ``n`` records.

Writes happen in :class:`WriteTx` objects, one LMDB write transaction each, opened and
committed by whichever thread holds the node's writer role. Topic and proc records are kept
in memory (:attr:`Store.topics`, :attr:`Store.procs`), authoritative for the writer: a
transaction reads them through an overlay and the overlay is merged only after the commit
succeeded, so an aborted transaction leaves no trace in memory either.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from contextlib import contextmanager
from itertools import islice
from typing import Any, Dict, Iterator, List, Optional, Tuple

import lmdb
import msgpack

from . import _ids
from ._protocol import record, record_ms

log = logging.getLogger("pipeproc.store")

FORMAT_VERSION = 2
_KEY = struct.Struct(">IQ")
PAGE_MAX_LOGS = 10_000
PAGE_MAX_BYTES = 4 * 1024 * 1024
INITIAL_MAP = 1 << 30  # address space only; grows on demand
# With writemap the whole map is allocated on disk (in RAM for a memory store): start
# small, then double (by 1 GiB at most).
WRITEMAP_INITIAL_MAP = 16 << 20


def log_key(tid: int, seq: int) -> bytes:
    """The key of a log in the ``logs`` database."""
    return _KEY.pack(tid, seq)


def _last_record(cur: lmdb.Cursor, tid: int) -> Optional[Tuple[int, Any]]:
    """``(seq, record)`` of topic ``tid``'s last stored log, or ``None``."""
    if cur.set_range(_KEY.pack(tid + 1, 0)):
        if not cur.prev():
            return None
    elif not cur.last():
        return None
    t, seq = _KEY.unpack(cur.key())
    return (seq, cur.value()) if t == tid else None


class TopicMeta:
    """A topic's record: id, next sequence, first stored sequence, creation time."""

    __slots__ = ("tid", "next", "first", "created")

    def __init__(self, tid: int, nxt: int, first: int, created: int) -> None:
        self.tid, self.next, self.first, self.created = tid, nxt, first, created

    def copy(self) -> "TopicMeta":
        return TopicMeta(self.tid, self.next, self.first, self.created)

    def pack(self) -> bytes:
        return msgpack.packb([self.tid, self.next, self.first, self.created])

    @classmethod
    def unpack(cls, data: Any) -> "TopicMeta":
        tid, nxt, first, created = msgpack.unpackb(data)
        return cls(tid, nxt, first, created)


class Gate:
    """Readers share it; map growth (``set_mapsize``) takes it alone (LMDB requires no open
    transaction in the process while the map is resized)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Store:
    """An open pipeproc store (one per node process)."""

    def __init__(self, path: Optional[str], *, memory: bool = False, durability: str = "full",
                 max_map_size: Optional[int] = None) -> None:
        self.memory = memory
        self._tmpdir: Optional[str] = None
        if memory:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            self._tmpdir = tempfile.mkdtemp(prefix="pipeproc-mem-", dir=base)
            path = self._tmpdir
        assert path is not None
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        self.path = path
        self.max_map_size = max_map_size
        durable = durability == "full" and not memory
        # Without fsync (durability "fast", memory stores) LMDB writes straight into its
        # shared map (writemap): a commit makes no system call. Only over preallocated
        # space, though: a write into a hole of a full filesystem would be a SIGBUS.
        self.writemap = not durable
        self._data_fd: Optional[int] = None
        self.env = self._open(path, durable)
        if self.writemap:
            try:
                self._data_fd = os.open(os.path.join(path, "data.mdb"), os.O_RDWR)
                os.posix_fallocate(self._data_fd, 0, self.env.info()["map_size"])
            except OSError as exc:  # no room, or a filesystem that cannot preallocate
                log.warning("store not preallocated (%s): commits write through the file", exc)
                if self._data_fd is not None:
                    os.close(self._data_fd)
                    self._data_fd = None
                self.env.close()
                self.writemap = False
                self.env = self._open(path, durable)
        if memory:
            # The mapping stays valid after the unlink: nothing of a memory store survives
            # the node, not even after kill -9.
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        self.gate = Gate()
        self.db_topics = self.env.open_db(b"topics")
        self.db_logs = self.env.open_db(b"logs")
        self.db_procs = self.env.open_db(b"procs")
        self.db_sysprocs = self.env.open_db(b"sysprocs")
        self.db_meta = self.env.open_db(b"meta")
        self.topics: Dict[str, TopicMeta] = {}
        self.procs: Dict[str, dict] = {}
        self.sysprocs: Dict[str, dict] = {}
        self.last_ms = 0
        self.next_tid = 1
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- opening

    def _open(self, path: str, durable: bool) -> lmdb.Environment:
        """Open the environment at its initial map size (``writemap`` as set)."""
        initial = WRITEMAP_INITIAL_MAP if self.writemap else INITIAL_MAP
        map_size = initial if self.max_map_size is None else min(initial, self.max_map_size)
        return lmdb.open(
            path, map_size=map_size, max_dbs=8, max_readers=4096, mode=0o600,
            sync=durable, metasync=durable, readahead=False, lock=True,
            writemap=self.writemap,
        )

    def _load(self) -> None:
        with self.env.begin(write=True) as txn:
            version = txn.get(b"format", db=self.db_meta)
            if version is None:
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=self.db_meta)
            elif int(version) > FORMAT_VERSION:
                raise RuntimeError(
                    f"store format {int(version)} is newer than this pipeproc ({FORMAT_VERSION})"
                )
            elif int(version) < FORMAT_VERSION:
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=self.db_meta)
            clock = txn.get(b"clock", db=self.db_meta)
            last_ms = int(clock) if clock else 0
            tid = txn.get(b"next_tid", db=self.db_meta)
            self.next_tid = int(tid) if tid else 1
            logs = txn.cursor(db=self.db_logs)
            for key, value in txn.cursor(db=self.db_topics):
                meta = TopicMeta.unpack(value)
                last = _last_record(logs, meta.tid)
                if last is not None:
                    meta.next = max(meta.next, last[0] + 1)
                    last_ms = max(last_ms, record_ms(last[1]))
                self.topics[bytes(key).decode()] = meta
            self.last_ms = last_ms
            for key, value in txn.cursor(db=self.db_procs):
                self.procs[bytes(key).decode()] = msgpack.unpackb(value, strict_map_key=False)
            for key, value in txn.cursor(db=self.db_sysprocs):
                self.sysprocs[bytes(key).decode()] = msgpack.unpackb(value, strict_map_key=False)

    def close(self) -> None:
        """Close the environment (after every writer and reader is done)."""
        self.env.close()
        if self._data_fd is not None:
            os.close(self._data_fd)
            self._data_fd = None

    def now_ms(self) -> int:
        """The node clock for the next write: wall clock, never below the last stamp used."""
        now = time.time_ns() // 1_000_000
        return now if now > self.last_ms else self.last_ms

    # ---------------------------------------------------------------- writes

    def begin(self, now: Optional[int] = None) -> "WriteTx":
        """Open a write transaction (the caller holds the writer role)."""
        return WriteTx(self, self.now_ms() if now is None else now)

    def grow(self) -> bool:
        """Double the map size (by 1 GiB at most when it is preallocated); ``False`` when
        ``max_map_size`` forbids it, or there is no room for it."""
        current = self.env.info()["map_size"]
        new = current * 2 if self._data_fd is None else current + min(current, 1 << 30)
        if self.max_map_size is not None:
            if current >= self.max_map_size:
                return False
            new = min(new, self.max_map_size)
        if self._data_fd is not None:  # writemap: the map only ever covers allocated space
            try:
                os.posix_fallocate(self._data_fd, 0, new)
            except OSError as exc:
                log.warning("store cannot grow to %d MiB: %s", new >> 20, exc)
                return False
        with self.gate.exclusive():
            self.env.set_mapsize(new)
        log.info("store map grown to %d MiB", new >> 20)
        return True

    def recycle_pages(self) -> bool:
        """Commit a minimal transaction so that the pages freed by the last commit (by
        the GC, a destroyed proc...) become reusable: LMDB keeps them for the previous
        snapshot until one more write transaction commits. ``False`` if even that failed."""
        try:
            with self.env.begin(write=True) as txn:
                txn.put(b"recycle", b"", db=self.db_meta)
        except lmdb.Error:
            return False
        return True

    # ---------------------------------------------------------------- reads

    @contextmanager
    def reader(self) -> Iterator["Reader"]:
        """A read transaction (MVCC snapshot; never waits for the writer)."""
        with self.gate.shared():
            txn = self.env.begin(buffers=True)
            try:
                yield Reader(self, txn)
            finally:
                txn.abort()


class _View:
    """Log lookups shared by read and write transactions."""

    txn: lmdb.Transaction
    store: Store

    def topic(self, name: str) -> Optional[TopicMeta]:  # pragma: no cover - overridden
        raise NotImplementedError

    def ms_at(self, tid: int, seq: int) -> int:
        value = self.txn.get(log_key(tid, seq), db=self.store.db_logs)
        if value is None:  # pragma: no cover - contiguity is an invariant
            raise RuntimeError(f"log {tid}:{seq} missing")
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
        for value in islice(it, n):
            out.append(value)
            size += len(value)
            if size >= max_bytes:
                break
        return out


class Reader(_View):
    """A read transaction."""

    def __init__(self, store: Store, txn: lmdb.Transaction) -> None:
        self.store, self.txn = store, txn

    def topic(self, name: str) -> Optional[TopicMeta]:
        value = self.txn.get(name.encode(), db=self.store.db_topics)
        if value is None:
            return None
        meta = TopicMeta.unpack(value)
        last = _last_record(self.txn.cursor(db=self.store.db_logs), meta.tid)
        if last is not None and last[0] >= meta.next:
            meta.next = last[0] + 1
        return meta


class WriteTx(_View):
    """One LMDB write transaction plus overlays of the in-memory topic and proc records.

    Operations check everything that can fail before they write anything, so an operation
    that raises a :class:`~pipeproc.PipeProcError` leaves the transaction as it found it and
    the other requests of the group commit go on.
    """

    def __init__(self, store: Store, now: int) -> None:
        self.store = store
        self.now = now
        self.txn = store.env.begin(write=True)
        self.topics: Dict[str, TopicMeta] = {}
        self.procs: Dict[str, Optional[dict]] = {}
        self.sysprocs: Dict[str, Optional[dict]] = {}
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
            put(_KEY.pack(meta.tid, seq), record(now, seq, body), db=db)  # type: ignore[union-attr]
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

    # -- end

    def flush(self) -> None:
        """Write the overlays into the transaction (before commit)."""
        s = self.store
        put, delete = self.txn.put, self.txn.delete
        for name in self.persist:
            put(name.encode(), self.topics[name].pack(), db=s.db_topics)
        for name, rec in self.procs.items():
            if rec is None:
                delete(name.encode(), db=s.db_procs)
            else:
                put(name.encode(), msgpack.packb(rec, use_bin_type=True), db=s.db_procs)
        for name, rec in self.sysprocs.items():
            if rec is None:
                delete(name.encode(), db=s.db_sysprocs)
            else:
                put(name.encode(), msgpack.packb(rec, use_bin_type=True), db=s.db_sysprocs)
        if self.next_tid != s.next_tid:
            put(b"next_tid", str(self.next_tid).encode(), db=s.db_meta)
        if self.persist:  # the GC may delete a topic's last log: keep its stamp here
            clock = max(s.last_ms, self.now) if self.stamped else s.last_ms
            put(b"clock", str(clock).encode(), db=s.db_meta)

    def commit(self) -> None:
        """Commit (fsync under durability "full"), then publish the overlays in memory."""
        self.flush()
        self.txn.commit()
        s = self.store
        s.topics.update(self.topics)
        for table, overlay in ((s.procs, self.procs), (s.sysprocs, self.sysprocs)):
            for name, rec in overlay.items():
                if rec is None:
                    table.pop(name, None)
                else:
                    table[name] = rec
        s.next_tid = self.next_tid
        if self.stamped and self.now > s.last_ms:
            s.last_ms = self.now

    def abort(self) -> None:
        self.txn.abort()
