"""The open store: the LMDB environment, its opening and loading, map growth and the
GC's reserves.

Only the node process opens the store (:class:`Store`, one per node process). Opening
checks the files before LMDB maps them (:func:`~pipeproc._layout.check_files`, the page
walk of :mod:`pipeproc._damage`), loads the topic, proc and system proc records into memory,
upgrades an older format in place, and undoes a store whose creation failed. The map grows
on demand (:meth:`Store.grow`); part of a capped map and a reserve file on disk are kept
for the GC, so that a full store can always be collected.

What the bytes mean (key layout, record encoding, sealing) is :mod:`pipeproc._layout`;
reads and write transactions (:class:`Reader`, :class:`WriteTx`, re-exported here) are
:mod:`pipeproc._txn`.

Node side. May import: ``_layout``, ``_txn``, ``_damage``, ``_records``, ``errors``, lmdb,
msgpack and the standard library.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Set

import lmdb
import msgpack

from ._damage import proc_problem, walk_pages
from ._layout import (  # log_key, name_key: re-exported (tools and tests use _store's)
    FORMAT_VERSION,
    TopicMeta,
    check_files,
    last_record,
    log_key,
    name_key,
    pack_named,
    unpack_named,
)
from ._records import CRC_RESIDUE, crc32, record_ms
from ._txn import PAGE_MAX_BYTES, PAGE_MAX_LOGS, Reader, WriteTx
from .errors import StorageFull, StoreCorrupted

__all__ = ["Store", "Reader", "WriteTx", "TopicMeta", "FORMAT_VERSION", "PAGE_MAX_LOGS",
           "PAGE_MAX_BYTES", "DAMAGE_ERRORS", "damaged", "log_key", "name_key", "check_files",
           "write_marker"]

log = logging.getLogger("pipeproc.store")

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
        self.db_runs = self.env.open_db(b"runs")
        self.db_meta = self.env.open_db(b"meta")
        self.topics: Dict[str, TopicMeta] = {}
        self.procs: Dict[str, dict] = {}
        self.sysprocs: Dict[str, dict] = {}
        self.runs: Dict[str, dict] = {}  # workflow runs by id (pipeproc.flow; _flows)
        self.journals: Set[str] = set()  # their journals' topics: the GC never collects them
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
                last = last_record(logs, meta.tid)
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
                name, rec = unpack_named("proc", key, value, sealed)
                bad = proc_problem(rec)
                if bad:
                    raise StoreCorrupted(f"the record of proc {name!r} is damaged ({bad}): "
                                         "run `pipeproc check`; restore it from a backup")
                self.procs[name] = rec
            for key, value in txn.cursor(db=self.db_sysprocs):
                name, rec = unpack_named("system proc", key, value, sealed)
                self.sysprocs[name] = rec
            for key, value in txn.cursor(db=self.db_runs):
                name, rec = unpack_named("run", key, value, sealed)
                self.runs[name] = rec
                self.journals.add(rec["topic"])
            if not sealed:  # format 2: seal the topic, proc and system proc records
                for name, meta in self.topics.items():
                    txn.put(name.encode(), meta.pack(), db=self.db_topics)
                for table, db in ((self.procs, self.db_procs), (self.sysprocs, self.db_sysprocs)):
                    for name, rec in table.items():
                        key = name_key(name)
                        txn.put(key, pack_named(name, key, rec), db=db)
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
