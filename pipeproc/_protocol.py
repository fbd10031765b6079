"""Wire format shared by the node and the clients.

Frames are ``multiprocessing.connection`` byte messages (4-byte length + payload) after its
HMAC authkey handshake. Every payload is msgpack, never pickle:

* request: ``[rid, op, *args]`` — ``rid`` an int chosen by the client (pipelining: replies
  may come back out of order and are matched by ``rid``);
* reply: ``[rid, 0, result]`` or ``[rid, 1, [code, message]]``.

Log bodies are msgpack-encoded **once**, by the client, and travel inside requests as msgpack
``bin``. The node stores them as they are, in a *log record*::

    0x93 0xcf <ms: u64 BE> 0xcf <seq: u64 BE> <body msgpack bytes>

which is itself the msgpack encoding of ``[ms, seq, body]``. A page of logs is therefore
sent as an array header followed by the stored records concatenated, and the client decodes
the whole page in one ``unpackb`` call; the node never decodes a body.
"""

from __future__ import annotations

import struct
from typing import Any, List

import msgpack

from .errors import InvalidLogFormat

OK = 0
ERR = 1

#: Frames larger than this are refused (the sender loses its connection).
MAX_FRAME = 64 * 1024 * 1024

_RECORD_HEAD = struct.Struct(">BBQBQ")  # 0x93 0xcf ms 0xcf seq
RECORD_HEAD_SIZE = _RECORD_HEAD.size  # 19


def record(ms: int, seq: int, body: bytes) -> bytes:
    """The stored form of a log: the msgpack of ``[ms, seq, body]`` with ``body`` pre-encoded."""
    return _RECORD_HEAD.pack(0x93, 0xCF, ms, 0xCF, seq) + body


def record_ms(value: Any) -> int:
    """The ms stamp of a stored log record (bytes or memoryview)."""
    return int.from_bytes(value[2:10], "big")


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _reject(obj: object) -> Any:
    raise InvalidLogFormat(
        f"log body holds a value of unsupported type {type(obj).__name__!r}; bodies carry "
        "dict, list, tuple, str, bytes, int, float, bool and None"
    )


def encode_body(body: object) -> bytes:
    """Validate and msgpack-encode one log body (client side, once per log).

    Raises:
        InvalidLogFormat: the body is missing, ``None``, not a dict/list/bytes, or holds a
            value msgpack cannot carry (named in the message).
    """
    if not isinstance(body, (dict, list, tuple, bytes, bytearray, memoryview)):
        raise InvalidLogFormat(
            f"a log body must be a dict, a list or bytes, got {type(body).__name__!r}"
        )
    try:
        return msgpack.packb(body, use_bin_type=True, default=_reject)
    except InvalidLogFormat:
        raise
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidLogFormat(f"log body cannot be encoded: {exc}") from None


def decode(data: bytes) -> Any:
    """Decode a msgpack payload (an envelope, or a body with the reply)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


def pack(obj: object) -> bytes:
    """Encode an envelope."""
    return msgpack.packb(obj, use_bin_type=True)


def ok_reply(rid: int, result: object) -> bytes:
    """A success reply."""
    return msgpack.packb([rid, OK, result], use_bin_type=True)


def ok_reply_raw(rid: int, raw_result: bytes) -> bytes:
    """A success reply whose result is already msgpack-encoded (pages of stored records)."""
    return b"\x93" + msgpack.packb(rid) + b"\x00" + raw_result


def err_reply(rid: int, code: str, message: str) -> bytes:
    """An error reply."""
    return msgpack.packb([rid, ERR, [code, message]], use_bin_type=True)


def page(records: List[Any], tail: object) -> bytes:
    """The raw encoding of ``[[record, ...], tail]`` built from stored records without decoding."""
    return b"\x92" + array_header(len(records)) + b"".join(records) + msgpack.packb(tail)

