"""The concepts both sides share about stored logs and claims: pure, no I/O.

Owns:

* the **stored record** of a log: the msgpack of ``[ms, seq, body]`` with the body kept as
  the client encoded it (:func:`record`), followed in the store by its CRC-32
  (:func:`stored_record`, :func:`record_ok`, format 3);
* the **claim identity**: the 64-bit digest of a claim's ids (:func:`ids_digest`) and the
  ``claimed=`` key a consumer sends back with its ack (:func:`claimed_key`).

May import: the standard library's ``struct``, ``zlib``, ``hashlib`` only. Part of the pure
core: no socket, thread, subprocess, lmdb, clock. ``_protocol`` and ``_procs`` re-export
these names for code that still imports them from there.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any, List, Sequence, Tuple

_RECORD_HEAD = struct.Struct(">BBQBQ")  # 0x93 0xcf ms 0xcf seq
RECORD_HEAD_SIZE = _RECORD_HEAD.size  # 19


def record(ms: int, seq: int, body: bytes) -> bytes:
    """The stored form of a log: the msgpack of ``[ms, seq, body]`` with ``body`` pre-encoded."""
    return _RECORD_HEAD.pack(0x93, 0xCF, ms, 0xCF, seq) + body


_CRC = struct.Struct("<I")
#: Bytes of the checksum that follows a stored record (store format 3).
CRC_SIZE = _CRC.size
#: ``zlib.crc32`` of any bytes followed by their own CRC-32 in little-endian order: checking
#: a stored record is one ``crc32`` call over the whole stored value.
CRC_RESIDUE = 0x2144DF1C
crc32 = zlib.crc32


def stored_record(ms: int, seq: int, body: bytes) -> bytes:
    """The stored form of a log (format 3): :func:`record` followed by its CRC-32."""
    rec = _RECORD_HEAD.pack(0x93, 0xCF, ms, 0xCF, seq) + body
    return rec + _CRC.pack(crc32(rec))


def record_ok(value: Any) -> bool:
    """Whether a stored record (format 3) is intact: its CRC-32 holds."""
    return crc32(value) == CRC_RESIDUE


def record_ms(value: Any) -> int:
    """The ms stamp of a stored log record (bytes or memoryview)."""
    return int.from_bytes(value[2:10], "big")


def ids_digest(packed: Any) -> int:
    """A 64-bit digest of a claim's ids, each given as ``ms (u64 BE) + seq (u64 BE)``: the
    first 8 bytes of their SHA-1 (the Redis backend's scripts compute the same with
    ``redis.sha1hex``; a claim identity, not a security boundary)."""
    return int.from_bytes(hashlib.sha1(b"".join(packed)).digest()[:8], "big")


def claimed_key(ids: Sequence[Tuple[int, int]]) -> List[int]:
    """The ``claimed=`` identity of a list of ``(ms, seq)``:
    ``[lo_ms, lo_seq, hi_ms, hi_seq, n, digest of every id]`` — it matches a pending claim
    only when every log is exactly the claim's."""
    lo, hi = ids[0], ids[-1]
    try:
        digest = ids_digest(ms.to_bytes(8, "big") + seq.to_bytes(8, "big") for ms, seq in ids)
    except OverflowError:
        digest = 0
    return [lo[0], lo[1], hi[0], hi[1], len(ids), digest]
