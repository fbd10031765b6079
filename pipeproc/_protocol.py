"""Wire format shared by the node and the clients.

Frames are ``multiprocessing.connection`` byte messages (4-byte length + payload) after its
HMAC authkey handshake. Every payload is msgpack, never pickle:

* request: ``[rid, op, *args]`` — ``rid`` an int chosen by the client (pipelining: replies
  may come back out of order and are matched by ``rid``);
* reply: ``[rid, 0, result]`` or ``[rid, 1, [code, message]]``.

Log bodies are msgpack-encoded **once**, by the client, and travel inside requests as msgpack
``bin``. The node stores them as they are, in a *log record*::

    0x93 0xcf <ms: u64 BE> 0xcf <seq: u64 BE> <body msgpack bytes>

which is itself the msgpack encoding of ``[ms, seq, body]``. The store keeps it followed by
its CRC-32 (``zlib.crc32``, 4 bytes little-endian: see :func:`pipeproc._records.stored_record`) and serves the
record without those 4 bytes once the checksum holds (store format 3). A page of logs is therefore
sent as an array header followed by the stored records concatenated, and the client decodes
the whole page in one ``unpackb`` call; the node never decodes a body.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Connection,
    answer_challenge,
    deliver_challenge,
)
from typing import Any, List, Optional

import msgpack

from .errors import AuthFailed, InvalidLogFormat, NoActiveNode

OK = 0
ERR = 1

#: Frames larger than this are refused (the sender loses its connection); the node's limit
#: is configurable (``spawn(max_frame_size=...)``).
MAX_FRAME = 64 * 1024 * 1024
#: Replies come from the authenticated node: any size the wire format carries.
REPLY_LIMIT = 0x7FFFFFFF
RECV_BUFFER = 256 * 1024


#: Busy-poll window (seconds), the default of ``spawn(busy_poll=...)`` and
#: ``connect(busy_poll=...)``. Waking a thread that sleeps in ``recv`` costs tens of µs on
#: a virtual machine (the idle vCPU must be woken), often more than the node's work for a
#: request; a reply expected within this window is polled for instead. 50 µs measured best
#: (benchmarks/RESULTS.md). The library reads no environment variable for it: the CLI reads
#: ``PIPEPROC_BUSY_POLL_US`` and passes the keyword.
BUSY_POLL = 50e-6
#: The largest busy-poll window accepted (seconds).
MAX_BUSY_POLL = 0.01
_LEN = struct.Struct("!i")

def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _reject(obj: object) -> Any:
    if isinstance(obj, int):  # msgpack's packer hands an int it cannot carry to ``default``
        raise InvalidLogFormat(
            f"log body holds the int {_short_int(obj)}, out of msgpack's range "
            "[-2**63, 2**64): store it as a str (or bytes) instead"
        )
    raise InvalidLogFormat(
        f"log body holds a value of unsupported type {type(obj).__name__!r}; bodies carry "
        "dict, list, tuple, str, bytes, int, float, bool and None"
    )


def _short_int(n: int) -> str:
    text = str(n) if n.bit_length() < 4000 else f"{'-' if n < 0 else ''}2**{n.bit_length() - 1}+…"
    return text if len(text) <= 40 else f"{text[:20]}…{text[-8:]} ({len(text)} digits)"


_local = threading.local()


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
        packer = _local.packer
    except AttributeError:  # a Packer per thread (they are not thread-safe); packb makes
        packer = _local.packer = msgpack.Packer(use_bin_type=True, default=_reject)  # one per call
    try:
        data = packer.pack(body)  # resets itself when it raises
        if len(data) > 1 << 20:  # do not keep a big body's buffer alive in the thread
            del _local.packer
        return data
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


#: the request id of a frame the node sends unasked (to a worker loop: a run it executes
#: was cancelled, ``[PUSH, OK, ["cancel", run, token]]``)
PUSH = -1


def ok_reply(rid: int, result: object) -> bytes:
    """A success reply."""
    return msgpack.packb([rid, OK, result], use_bin_type=True)


def ok_reply_raw(rid: int, raw_result: bytes) -> bytes:
    """A success reply whose result is already msgpack-encoded (pages of stored records)."""
    return b"\x93" + msgpack.packb(rid) + b"\x00" + raw_result


def err_reply(rid: Optional[int], code: str, message: str) -> bytes:
    """An error reply."""
    return msgpack.packb([rid, ERR, [code, message]], use_bin_type=True)


def page(records: List[Any], tail: object) -> bytes:
    """The raw encoding of ``[[record, ...], tail]`` built from stored records without decoding."""
    return b"\x92" + array_header(len(records)) + b"".join(records) + msgpack.packb(tail)



class FrameTooLarge(OSError):
    """A peer announced a frame above the receiver's limit."""


class Channel:
    """A framed byte stream on a connected socket, in ``multiprocessing.connection``'s wire
    format (a 4-byte big-endian length, then the payload), after its authkey handshake.

    Reads go through a buffer: a frame that fits costs one ``recv`` system call (a
    ``Connection`` costs two, plus a selector to know whether more is waiting), and
    :attr:`pending` tells whether the peer already sent more (it pipelines).
    """

    __slots__ = ("sock", "_buf", "_view", "_start", "_end", "spin", "_wait")

    def __init__(self, sock: socket.socket, spin: Optional[float] = None) -> None:
        self.sock = sock
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        #: busy-poll window for a frame that is not there yet (see BUSY_POLL)
        self.spin = BUSY_POLL if spin is None else spin
        self._wait = 0.0  # moving average of how long frames took to arrive (seconds)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> bool:
        """Bytes of a next frame are already buffered."""
        return self._end > self._start

    def readable_now(self) -> bool:
        """Bytes of a next frame are buffered or arrive without waiting (one non-blocking
        ``recv``; a worker loop looks for a frame the node pushed)."""
        if self._end > self._start:
            return True
        if self._start == self._end:
            self._start = self._end = 0
        try:
            k = self.sock.recv_into(self._view[self._end:], 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        if not k:
            raise EOFError("the peer closed the connection")
        self._end += k
        return True

    def send_bytes(self, data: Any) -> None:
        """Send one frame (one system call for small frames)."""
        n = len(data)
        if n > 0x7FFFFFFF:
            raise FrameTooLarge(f"a frame of {n} bytes is too large to send")
        if n <= 65536:
            self.sock.sendall(_LEN.pack(n) + data)
        else:
            self.sock.sendall(_LEN.pack(n))
            self.sock.sendall(data)

    def _fill(self, need: int) -> None:
        """Read until ``need`` bytes from ``_start`` are buffered (``need`` fits the buffer)."""
        if self._start + need > len(self._buf):  # move the partial frame to the front
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        if self._start == self._end and self.spin:
            self._await_frame()
        while self._end - self._start < need:
            k = self.sock.recv_into(self._view[self._end:])
            if not k:
                raise EOFError("the peer closed the connection")
            self._end += k

    def _await_frame(self) -> None:
        """Wait for the first bytes of the next frame: busy-poll first while frames have
        been arriving within the window on average (a quick node, not shared by several
        busy clients), then sleep in ``recv``."""
        t0 = time.monotonic()
        if self._wait < self.spin:
            until = t0 + self.spin
            view = self._view[self._end:]
            while True:
                try:
                    k = self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    if time.monotonic() < until:
                        continue
                    break
                if not k:
                    raise EOFError("the peer closed the connection")
                self._end += k
                break
        if self._start == self._end:
            k = self.sock.recv_into(self._view[self._end:])
            if not k:
                raise EOFError("the peer closed the connection")
            self._end += k
        self._wait = 0.75 * self._wait + 0.25 * (time.monotonic() - t0)

    def recv_bytes(self, maxlength: Optional[int] = None) -> Any:
        """The next frame's payload: a memoryview valid until the next call, or bytes.

        Raises:
            EOFError: the peer closed. FrameTooLarge: the announced length is above
                ``maxlength`` (nothing more of it is read; drop the connection).
        """
        if self._start == self._end:
            self._start = self._end = 0
        self._fill(4)
        (n,) = _LEN.unpack_from(self._buf, self._start)
        limit = MAX_FRAME if maxlength is None else maxlength
        if n < 0 or n > limit:
            shown = "more than 2 GiB" if n < 0 else f"{n} bytes"
            raise FrameTooLarge(f"a frame of {shown} is above the limit of {limit} bytes")
        if 4 + n <= len(self._buf):
            self._fill(4 + n)
            start = self._start + 4
            self._start = start + n
            return self._view[start:start + n]
        out = bytearray(n)  # a frame larger than the buffer: read it into its own buffer
        have = self._end - self._start - 4
        out[:have] = self._buf[self._start + 4:self._end]
        self._start = self._end = 0
        view = memoryview(out)
        while have < n:
            k = self.sock.recv_into(view[have:])
            if not k:
                raise EOFError("the peer closed the connection mid-frame")
            have += k
        return out

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ the client's connect

#: A client's bound on connect + authkey handshake (seconds), unless told otherwise.
CONNECT_TIMEOUT = 5.0
_NO_TIMEOUT = struct.pack("ll", 0, 0)


def open_connection(address: Any, authkey: bytes, timeout: float = CONNECT_TIMEOUT,
                    busy_poll: Optional[float] = None) -> Channel:
    """Connect to a node and authenticate (``multiprocessing.connection`` handshake), never
    hanging: connect and handshake are bounded by ``timeout`` seconds.

    Args:
        address: a Unix socket path or ``(host, port)``.
        authkey: the node's key.
        timeout: seconds for connect and handshake together.
        busy_poll: the channel's busy-poll window in seconds (``None``: :data:`BUSY_POLL`).

    Returns:
        The framed channel.

    Raises:
        NoActiveNode: nothing answered in time.
        AuthFailed: the key was refused.
    """
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        secs = max(timeout, 0.001)
        tv = struct.pack("ll", int(secs), int((secs % 1) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    except OSError as exc:
        sock.close()
        raise NoActiveNode(f"no node at {address!r}: {exc}") from None
    c = Connection(sock.detach())
    try:
        answer_challenge(c, authkey)
        deliver_challenge(c, authkey)
    except AuthenticationError:
        c.close()
        raise AuthFailed("the node refused the authkey") from None
    except (OSError, EOFError) as exc:
        c.close()
        raise NoActiveNode(f"no node answered at {address!r}: {exc}") from None
    s = socket.socket(fileno=os.dup(c.fileno()))
    c.close()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TIMEOUT)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TIMEOUT)
    return Channel(s, spin=busy_poll)
