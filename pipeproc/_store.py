"""The LMDB store: environment, key layout, write transactions and paged reads.

Only the node process opens the store. Layout (named databases opened at start):

========= ============================== ===============================================
db        key                            value
========= ============================== ===============================================
topics    topic name (utf-8)             msgpack ``[tid, next_seq, first_seq, created_ms]``
                                         (``next_seq`` as of the last write of the record)
logs      tid (u32 BE) + seq (u64 BE)    log record (see ``_records.record``) + its CRC-32
procs     proc name (utf-8) [#]_         msgpack proc record (``_procs``)
sysprocs  system proc name (utf-8) [#]_  msgpack system proc definition
meta      key                            format version, clock, next topic id, ``unchecked``
========= ============================== ===============================================

.. [#] A name longer than LMDB's key limit (511 bytes of UTF-8: a 200-character name in
   CJK or emoji) is keyed ``0xff`` + its SHA-256 and its record carries the full name under
   ``"_name"`` (``0xff`` never starts UTF-8, so the two kinds of keys never collide).

Format 3 stores every log record followed by its CRC-32 (``_records.stored_record``) and
every read checks it (:class:`~pipeproc.StoreCorrupted` naming topic and seq on a mismatch,
never the damaged bytes). A format-2 store is upgraded in place at opening without
rewriting a log: the meta key ``unchecked`` keeps, per topic id, the first sequence written
with a checksum; the older records (no checksum) are served as before until the GC
collects them.

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

Node side. May import: ``_ids``, ``_records``, ``_damage``, ``errors``, lmdb, msgpack and
the standard library.
"""

from __future__ import annotations

import errno
import hashlib
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
from ._damage import proc_problem, walk_pages
from ._records import _CRC, CRC_RESIDUE, CRC_SIZE, crc32, record_ms, stored_record
from .errors import StorageFull, StoreCorrupted

log = logging.getLogger("pipeproc.store")

FORMAT_VERSION = 3
#: LMDB's key size limit (the default of its build); longer names are keyed by a digest.
MAX_KEY = 511
_DIGEST_KEY = b"\xff"
_KEY = struct.Struct(">IQ")
PAGE_MAX_LOGS = 10_000
PAGE_MAX_BYTES = 4 * 1024 * 1024
INITIAL_MAP = 1 << 30  # address space only; grows on demand
#: A file of this size, allocated next to a disk store, that only the GC may give up: on a
#: full disk a delete still needs new pages (copy-on-write, the freelist).
DISK_RESERVE = 2 << 20
RESERVE_FILE = "gc-reserve"
# With writemap the whole map is allocated on disk (in RAM for a memory store): start
# small, then double (by 1 GiB at most).
WRITEMAP_INITIAL_MAP = 16 << 20


#: LMDB errors that mean the store's pages are damaged (not a bad request, not a bug)
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
                 lmdb.IncompatibleError, lmdb.PanicError)


def damaged(exc: BaseException, path: Optional[str]) -> StoreCorrupted:
    """The :class:`StoreCorrupted` for an LMDB error of :data:`DAMAGE_ERRORS`."""
    log.error("store %s is damaged: %s", path, exc)
    return StoreCorrupted(f"the store at {path} is damaged ({exc}): run `pipeproc check`; "
                          "restore it from a backup")


def log_key(tid: int, seq: int) -> bytes:
    """The key of a log in the ``logs`` database."""
    return _KEY.pack(tid, seq)


def name_key(name: str) -> bytes:
    """The key of a proc or system proc: its UTF-8, or a digest when that is too long."""
    key = name.encode()
    return key if len(key) <= MAX_KEY else _DIGEST_KEY + hashlib.sha256(key).digest()


def seal(data: bytes) -> bytes:
    """``data`` followed by its CRC-32 (topic, proc and system proc records, format 3)."""
    return data + _CRC.pack(crc32(data))


def unseal(value: Any) -> Any:
    """The data of a sealed record; ``ValueError`` when its checksum fails."""
    if crc32(value) != CRC_RESIDUE:
        raise ValueError("its checksum fails")
    return value[:-CRC_SIZE]


def _pack_named(name: str, key: bytes, rec: dict) -> bytes:
    if key[:1] == _DIGEST_KEY:
        rec = dict(rec, _name=name)
    return seal(msgpack.packb(rec, use_bin_type=True))


def _unpack_named(db: str, key: Any, value: Any, sealed: bool = True) -> Tuple[str, dict]:
    """``(name, record)`` of a stored proc or system proc; StoreCorrupted when damaged."""
    key = bytes(key)
    try:
        rec = msgpack.unpackb(unseal(value) if sealed else value, strict_map_key=False)
        if type(rec) is not dict:
            raise ValueError(f"a {type(rec).__name__}, not a map")
        if key[:1] == _DIGEST_KEY:
            name = rec.pop("_name")
            if name_key(name) != key:
                raise ValueError("its name does not match its key")
        else:
            name = key.decode()
        return name, rec
    except Exception as exc:
        shown = key.decode(errors="replace") if key[:1] != _DIGEST_KEY else key[1:9].hex()
        raise StoreCorrupted(
            f"the record of {db} {shown[:80]!r} is damaged ({type(exc).__name__}: {exc}): "
            "run `pipeproc check`; restore the store from a backup") from None


_META_MAGIC = 0xBEEFC0DE
_META_VERSION = 1
_META_HEAD = 16  # the page header before an LMDB meta record


def _read_meta(fd: int, offset: int) -> Optional[Tuple[int, int, int]]:
    """``(page size, last page number, txn id)`` of the LMDB meta page at ``offset``, or
    ``None`` when it is not one (64-bit layout: magic, version, address, mapsize, 2 dbs)."""
    raw = os.pread(fd, _META_HEAD + 144, offset)
    if len(raw) < _META_HEAD + 144:
        return None
    magic, version = struct.unpack_from("<II", raw, _META_HEAD)
    if magic != _META_MAGIC or version != _META_VERSION:
        return None
    psize = struct.unpack_from("<I", raw, _META_HEAD + 24)[0]  # free db's md_pad
    last_pg, txnid = struct.unpack_from("<QQ", raw, _META_HEAD + 120)
    return psize, last_pg, txnid


def check_files(path: str, existed: bool) -> None:
    """Refuse, before LMDB maps it, a store whose ``data.mdb`` is missing (while ``existed``
    says a store was created there), empty, truncated or without LMDB's meta pages: LMDB
    would otherwise open it as a new empty store, or touch mapped pages past the end of the
    file (SIGBUS).

    Raises:
        StoreCorrupted: naming the file and what is wrong with it.
    """
    data = os.path.join(path, "data.mdb")
    hint = ("restore it from a backup; to start over with an empty store, move the "
            f"directory {path} away")
    try:
        fd = os.open(data, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        if existed:
            raise StoreCorrupted(f"the store's data file {data} is missing although a store "
                                 f"was created there: {hint}") from None
        return
    except OSError as exc:
        raise StoreCorrupted(f"the store's data file {data} cannot be opened: {exc}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise StoreCorrupted(f"the store's data file {data} is empty (0 bytes; truncated?): "
                                 f"{hint}")
        meta0 = _read_meta(fd, 0)
        meta1 = _read_meta(fd, meta0[0]) if meta0 and 512 <= meta0[0] <= 1 << 16 else None
        if meta0 is None or meta1 is None:
            raise StoreCorrupted(f"the store's data file {data} is damaged: its LMDB meta page "
                                 f"{0 if meta0 is None else 1} is not valid ({size} bytes): "
                                 f"{hint}")
        psize, last_pg, _ = max(meta0, meta1, key=lambda m: m[2])
        need = (last_pg + 1) * psize
        if size < need:
            raise StoreCorrupted(f"the store's data file {data} is truncated: {size} bytes, "
                                 f"its last page ends at {need}: {hint}")
    finally:
        os.close(fd)


def _last_record(cur: lmdb.Cursor, tid: int) -> Optional[Tuple[int, Any]]:
    """``(seq, record)`` of topic ``tid``'s last stored log, or ``None``."""
    if cur.set_range(_KEY.pack(tid + 1, 0)):
        if not cur.prev():
            return None
    elif not cur.last():
        return None
    t, seq = _KEY.unpack(cur.key())
    return (seq, cur.value()) if t == tid else None


def _remove_new(path: str) -> None:
    """Undo the files of a store whose creation failed (a full disk): a half-made store
    would pass for a damaged one at the next start."""
    for name in ("data.mdb", "lock.mdb", RESERVE_FILE):
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass


def _open_error(exc: BaseException, path: str) -> Exception:
    """The error for an LMDB failure while opening: damage, a full disk, or as it is."""
    if isinstance(exc, DAMAGE_ERRORS):
        return damaged(exc, path)
    text = str(exc)
    if "No space" in text or "Disk quota" in text or (
            "Input/output" in text and _disk_full(path)):
        return StorageFull(f"cannot open the store at {path}: the disk is full ({exc})")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def _disk_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _gc_reserve(max_map_size: int) -> int:
    """The part of a capped map kept for the GC: 1/16 of it, at least 512 KiB (at most a
    quarter of the map), at most 64 MiB."""
    return min(64 << 20, max(max_map_size // 16, min(512 << 10, max_map_size // 4)))


def write_marker(path: str) -> None:
    """Write the file that says a store was created (see :class:`Store`)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, f"pipeproc store format {FORMAT_VERSION}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class TopicMeta:
    """A topic's record: id, next sequence, first stored sequence, creation time."""

    __slots__ = ("tid", "next", "first", "created")

    def __init__(self, tid: int, nxt: int, first: int, created: int) -> None:
        self.tid, self.next, self.first, self.created = tid, nxt, first, created

    def copy(self) -> "TopicMeta":
        return TopicMeta(self.tid, self.next, self.first, self.created)

    def pack(self) -> bytes:
        return seal(msgpack.packb([self.tid, self.next, self.first, self.created]))

    @classmethod
    def unpack(cls, data: Any, sealed: bool = True) -> "TopicMeta":
        """Decode a stored topic record; ``ValueError`` (or a msgpack error) when damaged."""
        tid, nxt, first, created = msgpack.unpackb(unseal(data) if sealed else data)
        if not all(type(v) is int for v in (tid, nxt, first, created)) or first > nxt:
            raise ValueError(f"impossible values {[tid, nxt, first, created]}")
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
                 max_map_size: Optional[int] = None, marker: Optional[str] = None) -> None:
        """Open (or create) the store in directory ``path``.

        ``marker``: a file written once the store exists (the node keeps it in its
        location); while it exists a missing ``data.mdb`` is damage, not a new store.

        Raises:
            StoreCorrupted: the files of an existing store are missing, truncated or not
                LMDB's, or a topic or proc record cannot be decoded.
        """
        self.memory = memory
        self._tmpdir: Optional[str] = None
        if memory:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            self._tmpdir = tempfile.mkdtemp(prefix="pipeproc-mem-", dir=base)
            path = self._tmpdir
        assert path is not None
        fresh = False  # this open creates the store (undone if it fails)
        if not memory:
            fresh = not os.path.exists(os.path.join(path, "data.mdb"))
            existed = os.path.exists(os.path.join(path, "lock.mdb")) or (
                marker is not None and os.path.exists(marker))
            check_files(path, existed)
            if os.path.exists(os.path.join(path, "data.mdb")):
                problems = walk_pages(path, limit=3)
                if problems:  # LMDB would stop the node with an assertion on such a page
                    raise StoreCorrupted(
                        f"the store's data file {os.path.join(path, 'data.mdb')} is damaged: "
                        f"{'; '.join(problems)}: run `pipeproc check`; restore it from a "
                        "backup")
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        self.path = path
        self.max_map_size = max_map_size
        #: bytes of the map only the GC may use (see :meth:`grow`): past a full store, a
        #: delete still needs free pages for its copy-on-write and the freelist
        self.reserve = 0 if max_map_size is None else _gc_reserve(max_map_size)
        #: topic id -> first sequence stored with a checksum (older: format 2, unchecked)
        self.unchecked: Dict[int, int] = {}
        #: records that failed their checksum on a read since the node started
        self.damaged_reads = 0
        self._has_reserve = False
        self._reserve_warned = False
        durable = durability == "full" and not memory
        # Without fsync (durability "fast", memory stores) LMDB writes straight into its
        # shared map (writemap): a commit makes no system call. Only over preallocated
        # space, though: a write into a hole of a full filesystem would be a SIGBUS.
        self.writemap = not durable
        self._data_fd: Optional[int] = None
        try:
            self.env = self._open(path, durable)
        except lmdb.Error as exc:
            if fresh:
                _remove_new(path)
            raise _open_error(exc, path) from None
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
            shutil.rmtree(path, ignore_errors=True)
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
        except BaseException as exc:
            self.close()
            if fresh:
                _remove_new(path)
            if isinstance(exc, lmdb.Error):
                raise _open_error(exc, path) from None
            raise
        if marker is not None and not os.path.exists(marker):
            write_marker(marker)
        self.keep_disk_reserve()

    # ---------------------------------------------------------------- opening

    def _open(self, path: str, durable: bool) -> lmdb.Environment:
        """Open the environment at its initial map size (``writemap`` as set)."""
        initial = WRITEMAP_INITIAL_MAP if self.writemap else INITIAL_MAP
        map_size = initial if self.max_map_size is None else min(initial, self.map_limit())
        return lmdb.open(
            path, map_size=map_size, max_dbs=8, max_readers=4096, mode=0o600,
            sync=durable, metasync=durable, readahead=False, lock=True,
            writemap=self.writemap,
        )

    def _load(self) -> None:
        with self.env.begin(write=True) as txn:
            try:
                raw = txn.get(b"format", db=self.db_meta)
                version = None if raw is None else int(raw)
                clock = txn.get(b"clock", db=self.db_meta)
                last_ms = int(clock) if clock else 0
                tid = txn.get(b"next_tid", db=self.db_meta)
                self.next_tid = int(tid) if tid else 1
                unchecked = txn.get(b"unchecked", db=self.db_meta)
                if unchecked is not None:
                    self.unchecked = dict(msgpack.unpackb(unchecked, strict_map_key=False))
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise StoreCorrupted(f"the store's meta records at {self.path} cannot be "
                                     f"decoded ({exc}): restore it from a backup") from None
            if version is not None and version > FORMAT_VERSION:
                raise RuntimeError(
                    f"store format {version} is newer than this pipeproc ({FORMAT_VERSION})"
                )
            logs = txn.cursor(db=self.db_logs)
            for key, value in txn.cursor(db=self.db_topics):
                try:
                    name = bytes(key).decode()
                    meta = TopicMeta.unpack(value, sealed=version is None or version >= 3)
                except Exception as exc:
                    raise StoreCorrupted(
                        f"the topic record {bytes(key)[:60]!r} cannot be decoded "
                        f"({type(exc).__name__}: {exc}): restore the store from a backup"
                    ) from None
                last = _last_record(logs, meta.tid)
                if last is not None:
                    meta.next = max(meta.next, last[0] + 1)
                    checked = (version is None or version >= 3) and last[0] >= self.unchecked.get(
                        meta.tid, 0)
                    if checked:
                        if crc32(last[1]) == CRC_RESIDUE:
                            last_ms = max(last_ms, record_ms(last[1]))
                        else:  # served as store_corrupted; the clock does without it
                            log.error("log %s:%d of topic %r fails its checksum",
                                      meta.tid, last[0], name)
                    else:
                        last_ms = max(last_ms, record_ms(last[1]))
                self.topics[name] = meta
            self.last_ms = last_ms
            sealed = version is None or version >= 3
            for key, value in txn.cursor(db=self.db_procs):
                name, rec = _unpack_named("proc", key, value, sealed)
                bad = proc_problem(rec)
                if bad:
                    raise StoreCorrupted(f"the record of proc {name!r} is damaged ({bad}): "
                                         "run `pipeproc check`; restore it from a backup")
                self.procs[name] = rec
            for key, value in txn.cursor(db=self.db_sysprocs):
                name, rec = _unpack_named("system proc", key, value, sealed)
                self.sysprocs[name] = rec
            if not sealed:  # format 2: seal the topic, proc and system proc records
                for name, meta in self.topics.items():
                    txn.put(name.encode(), meta.pack(), db=self.db_topics)
                for table, db in ((self.procs, self.db_procs), (self.sysprocs, self.db_sysprocs)):
                    for name, rec in table.items():
                        key = name_key(name)
                        txn.put(key, _pack_named(name, key, rec), db=db)
            if version is not None and version < 3:
                # format 2 logs carry no checksum: remember where checked ones begin
                for meta in self.topics.values():
                    if meta.next > meta.first:
                        self.unchecked[meta.tid] = meta.next
                if self.unchecked:
                    txn.put(b"unchecked", msgpack.packb(self.unchecked), db=self.db_meta)
                    log.warning("store format %d upgraded to %d: %d logs of %d topics were "
                                "written without a checksum and are served unchecked until "
                                "collected", version, FORMAT_VERSION,
                                sum(m.next - m.first for m in self.topics.values()),
                                len(self.unchecked))
            if version != FORMAT_VERSION:
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=self.db_meta)

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

    def map_limit(self, for_gc: bool = False) -> int:
        """The largest map ordinary writes may use (``max_map_size`` less the GC's reserve);
        the GC may use all of ``max_map_size``."""
        if self.max_map_size is None:
            return 1 << 62
        return self.max_map_size if for_gc else self.max_map_size - self.reserve

    def grow(self, for_gc: bool = False) -> bool:
        """Double the map size (by 1 GiB at most when it is preallocated); ``False`` when
        ``max_map_size`` forbids it, or there is no room for it. Only a transaction of the
        GC alone (``for_gc``) may grow into the reserve kept for it, so that a store full of
        logs can always be collected."""
        current = self.env.info()["map_size"]
        new = current * 2 if self._data_fd is None else current + min(current, 1 << 30)
        if self.max_map_size is not None:
            limit = self.map_limit(for_gc)
            if current >= limit:
                return False
            new = min(new, limit)
        if self._data_fd is not None:  # writemap: the map only ever covers allocated space
            try:
                os.posix_fallocate(self._data_fd, 0, new)
            except OSError as exc:
                if not (for_gc and self.release_disk_reserve()):
                    log.warning("store cannot grow to %d MiB: %s", new >> 20, exc)
                    return False
                new = min(new, current + DISK_RESERVE)  # what the reserve file gave back
                try:
                    os.posix_fallocate(self._data_fd, 0, new)
                except OSError as exc2:
                    log.warning("store cannot grow to %d MiB for the GC: %s", new >> 20, exc2)
                    return False
        with self.gate.exclusive():
            self.env.set_mapsize(new)
        log.info("store map grown to %d MiB%s", new >> 20, " (GC reserve)" if for_gc else "")
        return True

    def _reserve_path(self) -> Optional[str]:
        return None if self.memory else os.path.join(self.path, RESERVE_FILE)

    def keep_disk_reserve(self) -> bool:
        """Make sure the reserve file (:data:`DISK_RESERVE` bytes allocated on disk, kept for
        the GC) exists; ``False`` when there is no room for it (tried again later)."""
        path = self._reserve_path()
        if path is None or self._has_reserve:
            return True
        fd = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                os.posix_fallocate(fd, 0, DISK_RESERVE)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, 0)
                chunk = b"\0" * 65536
                for _ in range(DISK_RESERVE // len(chunk)):
                    os.write(fd, chunk)
            os.fsync(fd)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
                fd = None
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if not self._reserve_warned:
                self._reserve_warned = True
                log.warning("no room for the GC's disk reserve (%d MiB) in %s: %s",
                            DISK_RESERVE >> 20, self.path, exc)
            return False
        finally:
            if fd is not None:
                os.close(fd)
        self._has_reserve = True
        self._reserve_warned = False
        return True

    def release_disk_reserve(self) -> bool:
        """Delete the reserve file so that the GC can write on a full disk; ``False`` when
        there was none."""
        path = self._reserve_path()
        if path is None or not self._has_reserve:
            return False
        try:
            os.unlink(path)
        except OSError:
            return False
        self._has_reserve = False
        log.warning("disk full: the GC uses the disk reserve of %s", self.path)
        return True

    def leave_reserve(self) -> None:
        """After a GC transaction used the reserve: give ordinary writes their limit back
        (LMDB keeps the map at least as large as the pages in use)."""
        limit = self.map_limit()
        if self.env.info()["map_size"] > limit:
            with self.gate.exclusive():
                self.env.set_mapsize(limit)

    def disk_full(self) -> bool:
        """Whether the filesystem of the store has (almost) no room left: LMDB reports a
        short write as EIO, this tells a full disk from a failing one."""
        return _disk_full(self.path)

    def corrupted(self, tid: int, seq: int, what: str = "fails its checksum") -> StoreCorrupted:
        """The error for a damaged log record (counted, and logged)."""
        name = next((n for n, m in self.topics.items() if m.tid == tid), f"#{tid}")
        self.damaged_reads += 1
        log.error("log %d of topic %r %s (store %s)", seq, name, what, self.path)
        return StoreCorrupted(
            f"log {seq} of topic {name!r} {what}: the store at {self.path} is damaged "
            "(run `pipeproc check`; restore from a backup)")

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

    def __init__(self, store: Store, txn: lmdb.Transaction) -> None:
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
            put(_KEY.pack(meta.tid, seq), stored_record(now, seq, body), db=db)  # type: ignore[union-attr]
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
            key = name_key(name)
            if rec is None:
                delete(key, db=s.db_procs)
            else:
                put(key, _pack_named(name, key, rec), db=s.db_procs)
        for name, rec in self.sysprocs.items():
            key = name_key(name)
            if rec is None:
                delete(key, db=s.db_sysprocs)
            else:
                put(key, _pack_named(name, key, rec), db=s.db_sysprocs)
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
