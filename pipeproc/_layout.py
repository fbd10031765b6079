"""The store's format: key layout, record encoding and sealing, and the file check done
before LMDB maps a data file.

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

This module owns what the bytes of a store mean; :mod:`pipeproc._store` opens and grows the
store, :mod:`pipeproc._txn` reads and writes it, :mod:`pipeproc._check` verifies it with no
node running.

Node side. May import: ``_records``, ``errors``, lmdb (a cursor's type), msgpack and the
standard library.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any, Optional, Tuple

import lmdb
import msgpack

from ._records import _CRC, CRC_RESIDUE, CRC_SIZE, crc32
from .errors import StoreCorrupted

FORMAT_VERSION = 3
#: LMDB's key size limit (the default of its build); longer names are keyed by a digest.
MAX_KEY = 511
_DIGEST_KEY = b"\xff"
#: a log's key: topic id (u32 BE) + sequence (u64 BE)
LOG_KEY = struct.Struct(">IQ")


def log_key(tid: int, seq: int) -> bytes:
    """The key of a log in the ``logs`` database."""
    return LOG_KEY.pack(tid, seq)


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


def pack_named(name: str, key: bytes, rec: dict) -> bytes:
    """A proc or system proc record as stored under ``key`` (:func:`name_key`), sealed."""
    if key[:1] == _DIGEST_KEY:
        rec = dict(rec, _name=name)
    return seal(msgpack.packb(rec, use_bin_type=True))


def unpack_named(db: str, key: Any, value: Any, sealed: bool = True) -> Tuple[str, dict]:
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


def last_record(cur: lmdb.Cursor, tid: int) -> Optional[Tuple[int, Any]]:
    """``(seq, record)`` of topic ``tid``'s last stored log, or ``None``."""
    if cur.set_range(LOG_KEY.pack(tid + 1, 0)):
        if not cur.prev():
            return None
    elif not cur.last():
        return None
    t, seq = LOG_KEY.unpack(cur.key())
    return (seq, cur.value()) if t == tid else None


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
