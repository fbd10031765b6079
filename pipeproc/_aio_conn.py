"""The asyncio client's transport: one authenticated stream to the node, in
``multiprocessing.connection``'s framing and authkey handshake, and the reader task that
resolves each request's future by its ``rid``.

Client side: imports ``_protocol`` and ``errors``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import struct
from typing import Any, Callable, Dict, Optional, Tuple

from ._protocol import CONNECT_TIMEOUT, REPLY_LIMIT, decode, pack
from .errors import AuthFailed, ConnectionLost, NoActiveNode

log = logging.getLogger("pipeproc.aio")

# multiprocessing.connection framing and handshake (Lib/multiprocessing/connection.py):
# a frame is a 4-byte big-endian signed length then the payload (-1 announces an 8-byte
# length for payloads of 2 GiB or more); the handshake messages are such frames.
_HEADER = struct.Struct("!i")
_BIG_HEADER = struct.Struct("!Q")
_CHALLENGE = b"#CHALLENGE#"
_WELCOME = b"#WELCOME#"
_FAILURE = b"#FAILURE#"
_MESSAGE_LENGTH = 20
_HANDSHAKE_MAX = 256


# ------------------------------------------------------------------ framing and handshake

def _frame(data: bytes) -> bytes:
    n = len(data)
    if n > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _BIG_HEADER.pack(n) + data
    return _HEADER.pack(n) + data


async def _recv_frame(reader: asyncio.StreamReader, maxsize: int) -> bytes:
    (n,) = _HEADER.unpack(await reader.readexactly(4))
    if n == -1:
        (n,) = _BIG_HEADER.unpack(await reader.readexactly(8))
    if n < 0 or n > maxsize:
        raise OSError(f"bad message length {n}")
    return await reader.readexactly(n)


def _response(authkey: bytes, message: bytes) -> bytes:
    """The HMAC answer to a challenge: legacy MD5 (Python <= 3.11 nodes), or the
    ``{digest}``-prefixed form of newer multiprocessing versions.

    As in ``multiprocessing.connection``, a message of exactly 20 random bytes is legacy
    whatever its first byte: 1 in 256 of them starts with ``{`` and must not be parsed."""
    if len(message) != _MESSAGE_LENGTH and message.startswith(b"{"):
        end = message.find(b"}", 1, 21)
        if end > 1:
            try:
                name = message[1:end].decode("ascii")
                return (b"{" + name.encode("ascii") + b"}"
                        + hmac.new(authkey, message, name).digest())
            except (UnicodeDecodeError, ValueError):
                pass  # not a digest we know: the node refuses whatever we answer
    return hmac.new(authkey, message, "md5").digest()


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     authkey: bytes) -> None:
    """The client side of ``Client()``: ``answer_challenge`` then ``deliver_challenge``."""
    # answer_challenge: the node challenges us
    message = await _recv_frame(reader, _HANDSHAKE_MAX)
    if not message.startswith(_CHALLENGE):
        raise OSError("the peer did not start the authkey handshake")
    writer.write(_frame(_response(authkey, message[len(_CHALLENGE):])))
    if await _recv_frame(reader, _HANDSHAKE_MAX) != _WELCOME:
        raise AuthFailed("the node refused the authkey")
    # deliver_challenge: we challenge the node
    message = os.urandom(_MESSAGE_LENGTH)
    writer.write(_frame(_CHALLENGE + message))
    answer = await _recv_frame(reader, _HANDSHAKE_MAX)
    if hmac.compare_digest(answer, _response(authkey, message)):
        writer.write(_frame(_WELCOME))
    else:
        writer.write(_frame(_FAILURE))
        raise AuthFailed("the node does not hold this authkey")
    await writer.drain()


# ------------------------------------------------------------------ the connection

class _Conn:
    """One authenticated stream to the node and the reader task that dispatches replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: Dict[int, asyncio.Future] = {}
        # rids whose caller went away but whose reply still needs handling (live claims)
        self.orphans: Dict[int, Callable[[list], None]] = {}
        self.alive = True
        self.closing = False
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, address: Any, authkey: bytes,
                   timeout: float = CONNECT_TIMEOUT) -> "_Conn":
        """Connect and authenticate, bounded by ``timeout`` seconds (as the sync client).

        Raises:
            NoActiveNode: nothing answered in time. AuthFailed: the key was refused.
        """
        writer: Optional[asyncio.StreamWriter] = None

        async def establish() -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            nonlocal writer
            if isinstance(address, str):
                reader, writer = await asyncio.open_unix_connection(address)
            else:
                reader, writer = await asyncio.open_connection(address[0], address[1])
            await _handshake(reader, writer, bytes(authkey))
            return reader, writer

        try:
            reader, writer = await asyncio.wait_for(establish(), max(timeout, 0.001))
        except AuthFailed:
            if writer is not None:
                writer.close()
            raise
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            if writer is not None:
                writer.close()
            raise NoActiveNode(f"no node at {address!r}: {exc!r}") from None
        except BaseException:
            if writer is not None:
                writer.close()
            raise
        assert writer is not None
        return cls(reader, writer)

    def send(self, obj: Any) -> None:
        """Queue one request frame (synchronous: a frame is never split by a cancellation)."""
        self.writer.write(_frame(pack(obj)))

    def send_data(self, data: bytes) -> None:
        """Queue one already encoded request frame."""
        self.writer.write(_frame(data))

    async def _read_loop(self) -> None:
        reason = "the node closed the connection"
        try:
            while True:
                reply = decode(await _recv_frame(self.reader, REPLY_LIMIT))
                rid = reply[0]
                fut = self.pending.pop(rid, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(reply)
                    continue
                handler = self.orphans.pop(rid, None)
                if handler is not None:
                    try:
                        handler(reply)
                    except Exception:  # pragma: no cover - a bug in a handler
                        log.exception("handling a late reply failed")
        except asyncio.CancelledError:
            reason = "this client is closed"
        except (asyncio.IncompleteReadError, EOFError, OSError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                reason = f"the connection failed: {exc}"
        except Exception as exc:  # an undecodable reply: the stream cannot be trusted
            reason = f"a malformed reply ({type(exc).__name__}: {exc})"
        finally:
            self.alive = False
            self.orphans.clear()
            pending, self.pending = self.pending, {}
            for fut in pending.values():
                if not fut.done():
                    if self.closing:
                        fut.set_exception(NoActiveNode("this client is closed"))
                    else:
                        fut.set_exception(ConnectionLost(f"the node went away: {reason}"))
            self.writer.close()

    async def close(self) -> None:
        self.closing = True
        self.alive = False
        if not self.task.done():
            self.task.cancel()
            await asyncio.wait([self.task])  # the reader fails what is still pending
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ConnectionError):
            pass
