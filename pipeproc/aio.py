"""The asyncio client: :class:`AsyncPipeProc`, :func:`spawn`, :func:`connect`, :class:`AsyncLiveProc`.

The async twin of :class:`pipeproc.PipeProc`: the same method names, arguments, return
values and errors, as coroutines. Arguments are validated and bodies encoded by the same
helpers as the sync client, so both clients accept and refuse exactly the same things.

One client holds **one connection** and pipelines on it: every call sends
``[rid, op, *args]`` and awaits a future; a reader task matches each reply to its future by
``rid`` (the node answers out of order: writes after their group commit, waits when they
are satisfied). Any number of coroutines may await calls on one client at once, and a
blocking call (``wait_for_procs``, a live proc waiting for logs) is just a parked request on
that connection: it holds up nothing else. A client belongs to the event loop it was
created in.

**Cancellation.** Cancelling a call (``task.cancel()``, ``asyncio.wait_for`` running out)
drops its future; a reply that arrives later for it is discarded and the connection stays in
step, so the client remains usable. The request may already have reached the node, though:
**a cancelled** ``commit`` **(or ack, reclaim, …) may still have happened** — read back (for
instance with ``revrange``) before retrying if duplicates matter. A cancelled ``proc`` may
likewise have claimed logs: the claim stays pending until ``reclaim`` or its
``reclaim_timeout``. A live proc whose wait is cancelled hands back a claim that arrives
afterwards (it is reclaimed and delivered again), so no log is lost.

If the connection drops, calls in flight fail with ``connection_lost`` and the next call
opens a new connection (``no_active_node`` if the node is gone).

**Fork.** An event loop must not cross ``os.fork()``. A client inherited by a forked child
forgets its parent's connection (without closing it) and connects anew on its first call
from the loop the child runs (``asyncio.run``); replies are matched to requests by id, and
one that matches no request is never returned to a caller.

Example:
    >>> import asyncio, tempfile
    >>> import pipeproc.aio
    >>> async def main():
    ...     async with await pipeproc.aio.spawn(tempfile.mkdtemp(), workers=0) as pp:
    ...         ids = await asyncio.gather(
    ...             *(pp.commit({"topic": "numbers", "body": {"n": n}}) for n in range(100)))
    ...         logs = await pp.range("numbers")
    ...         claimed = await pp.proc("numbers", name="summer", count=100)
    ...         await pp.ack("summer", claimed=claimed)
    ...         return len(ids), sum(log.body["n"] for log in logs)
    >>> asyncio.run(main())
    (100, 4950)
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import itertools
import math
import logging
import os
import struct
import subprocess
import time
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import msgpack

from . import _client, _ids
from ._client import (
    DEFAULT_BACKOFF,
    DEFAULT_PAGE,
    HANDSHAKE_TIMEOUT,
    MIN_FRAME,
    _NodeRef,
    _check_request_size,
    AckCommit,
    Log,
    ProcState,
    _check_bound,
    _check_count,
    _check_limit,
    _check_offset,
    _check_backoff,
    _check_opts,
    _claim_key,
    _claim_result,
    _encode_logs,
    _logs,
)
from ._protocol import ERR, REPLY_LIMIT, decode, pack
from ._live import _held
from .errors import (
    AuthFailed,
    ConnectionLost,
    InvalidArgument,
    InvalidLogFormat,
    InvalidProc,
    NoActiveNode,
    PipeProcError,
    Timeout,
    from_code,
)

__all__ = ["AsyncPipeProc", "AsyncLiveProc", "spawn", "connect"]

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
                   timeout: float = HANDSHAKE_TIMEOUT) -> "_Conn":
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


# ------------------------------------------------------------------ the client

#: Connections a forked child inherited from its parent: referenced for good, so that
#: collecting them never closes (or warns about) what belongs to the parent.
_FORKED_LEFTOVERS: List[Any] = []


class AsyncPipeProc(_NodeRef):
    """An asyncio client of a pipeproc node (returned by :func:`spawn` and :func:`connect`).

    Every method of :class:`pipeproc.PipeProc` is here as a coroutine, with the same
    arguments, results and errors; ``iter_range`` is an async generator. Calls from many
    coroutines are pipelined on one connection. Use it with ``async with`` to shut the node
    down (spawning client) or disconnect (connecting client) on exit.

    Example:
        >>> import asyncio, tempfile
        >>> import pipeproc.aio
        >>> async def main():
        ...     async with await pipeproc.aio.spawn(tempfile.mkdtemp(), workers=0) as pp:
        ...         await pp.commit({"topic": "greetings", "body": {"hello": "world"}})
        ...         return (await pp.range("greetings"))[0].body
        >>> asyncio.run(main())
        {'hello': 'world'}
    """

    def __init__(self, address: Any, authkey: bytes, *,
                 process: Optional[subprocess.Popen] = None,
                 location: Optional[str] = None) -> None:
        self._address = address
        self._authkey = bytes(authkey)
        self._process = process
        self._location = location
        self._rids = itertools.count(1)
        self._conn: Optional[_Conn] = None
        self._conn_lock: Optional[asyncio.Lock] = None
        self._closed = False
        self._max_frame: Optional[int] = None
        _client._CLIENTS.add(self)

    # ------------------------------------------------------------------ connection

    def _forked(self) -> None:
        """In a child after ``os.fork()``: the connection (and its event loop) are the
        parent's. Forget them — kept referenced, never closed or shut down, so nothing of
        the parent's is touched — and connect anew on the next call, from the loop the child
        runs (an event loop itself must not cross a fork). The child is not the spawner."""
        if self._conn is not None:
            _FORKED_LEFTOVERS.append(self._conn)
        self._conn = None
        self._conn_lock = None
        self._process = None

    async def _connection(self) -> _Conn:
        if self._closed:
            raise NoActiveNode("this client is closed")
        c = self._conn
        if c is not None and c.alive:
            return c
        if self._conn_lock is None:
            self._conn_lock = asyncio.Lock()
        async with self._conn_lock:
            if self._closed:
                raise NoActiveNode("this client is closed")
            c = self._conn
            if c is None or not c.alive:
                if c is not None:
                    await c.close()
                c = self._conn = await _Conn.open(self._address, self._authkey)
            return c

    async def _call(self, op: str, *args: Any,
                    orphan: Optional[Callable[[list], None]] = None) -> Any:
        """Send one request and await its reply.

        ``orphan`` handles a reply that comes back after the caller was cancelled.
        """
        rid = next(self._rids)
        data = pack([rid, op, *args])
        if len(data) > MIN_FRAME:
            if self._max_frame is None:
                self._max_frame = int((await self._call("limits"))["max_frame_size"])
            _check_request_size(len(data), self._max_frame)
        conn = await self._connection()
        fut = asyncio.get_running_loop().create_future()
        conn.pending[rid] = fut
        try:
            if not conn.alive:  # lost since: the reader has failed everything pending
                raise ConnectionResetError("the connection is closed")
            conn.send_data(data)
            await conn.writer.drain()
            reply = await fut
        except BaseException as exc:
            if conn.pending.pop(rid, None) is not None:
                if orphan is not None and conn.alive:
                    conn.orphans[rid] = orphan
            elif (orphan is not None and fut.done() and not fut.cancelled()
                  and fut.exception() is None):
                orphan(fut.result())  # the reply came in, but our caller is gone
            if isinstance(exc, (ConnectionError, OSError)):
                if self._closed:
                    raise NoActiveNode("this client is closed") from None
                raise ConnectionLost(f"the node went away during {op}: {exc}") from None
            raise
        if reply[1] == ERR:
            code, message = reply[2]
            raise from_code(code, message)
        return reply[2]

    def _send_quietly(self, op: str, *args: Any) -> None:
        """Fire a request whose reply nobody waits for (it is discarded on arrival)."""
        c = self._conn
        if c is not None and c.alive and not self._closed:
            try:
                c.send([next(self._rids), op, *args])
            except (OSError, RuntimeError):  # pragma: no cover - transport closing
                pass

    async def close(self) -> None:
        """Disconnect this client; the node keeps running. Calls in flight fail with
        ``no_active_node``."""
        self._closed = True
        c, self._conn = self._conn, None
        if c is not None:
            await c.close()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the node (its workers too) and close the store, then disconnect.

        Args:
            timeout: seconds for the whole shutdown: the request and the node process's
                exit. A node that has not exited by then (stopped, hung) is killed.
        """
        deadline = time.monotonic() + timeout
        if not self._closed:
            try:
                await asyncio.wait_for(self._call("shutdown"), timeout)
            except (PipeProcError, asyncio.TimeoutError):
                pass
        await self.close()
        proc, self._process = self._process, None
        if proc is not None:
            def wait() -> None:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.stdin is not None:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
            await asyncio.to_thread(wait)

    async def __aenter__(self) -> "AsyncPipeProc":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._process is not None:
            await self.shutdown()
        else:
            await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected"
        return f"<AsyncPipeProc {state} to {self._address!r}>"

    # ------------------------------------------------------------------ commit and read

    async def commit(self, logs: Union[dict, Sequence[dict]]) -> Union[str, List[str]]:
        """Commit one log (returns its id) or a list of logs atomically (returns a list of ids).

        A commit whose await is cancelled may still have been written.

        Args:
            logs: ``{"topic": str, "body": dict | list | bytes}`` or a list of such dicts,
                possibly to several topics: all of a list are written or none.

        Returns:
            The id ``"<ms>-<seq>"``, or the list of ids in the order given.

        Raises:
            InvalidTopicFormat, InvalidLogFormat: before anything is written.
        """
        if isinstance(logs, dict):
            item = _encode_logs([logs])[0]
            ms, seq = await self._call("c1", item[0], item[1])
            return f"{ms}-{seq}"
        if isinstance(logs, (list, tuple)):
            items = _encode_logs(logs)
            if not items:
                return []
            ms, seqs = await self._call("c", items)
            return [f"{ms}-{s}" for s in seqs]
        raise InvalidLogFormat(f"commit takes a log dict or a list of them, got {type(logs).__name__!r}")

    async def _range(self, topic: str, start: Any, end: Any, limit: Any, exclusive: bool,
                     reverse: bool, page_size: int) -> AsyncIterator[List[Log]]:
        _ids.check_topic(topic)
        _check_bound(start)
        _check_bound(end)
        n = _check_limit(limit)
        rows, tail = await self._call("range", topic, start, end, n, bool(exclusive), reverse,
                                      page_size)
        yield _logs(rows)
        while tail is not None:
            lo, hi, left = tail
            rows, tail = await self._call("page", topic, lo, hi, left, reverse, page_size)
            yield _logs(rows)

    async def _collect(self, topic: str, start: Any, end: Any, limit: Any, exclusive: bool,
                       reverse: bool) -> List[Log]:
        out: List[Log] = []
        pages = self._range(topic, start, end, limit, exclusive, reverse, 10_000)
        try:
            async for chunk in pages:
                out.extend(chunk)
        finally:
            await pages.aclose()
        return out

    async def range(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
                    limit: Optional[int] = None, exclusive: bool = False) -> List[Log]:
        """Logs of ``topic`` from ``start`` up to ``end`` (oldest first).

        Args:
            topic: the topic name.
            start: lower bound: ``"<ms>-<seq>"``, ``"<ms>"`` or ``":<seq>"`` (None: the start).
            end: upper bound, same forms (None: the end).
            limit: at most this many logs (None, 0 or negative: no limit).
            exclusive: exclude the bound logs themselves (full-id and ``:seq`` bounds).

        Returns:
            The logs, oldest first.

        Raises:
            InvalidTopic: the topic never had a commit.
            InvalidRangeOffset, InvalidToneIdSearch, InvalidArgument: bad bounds.
        """
        return await self._collect(topic, start, end, limit, exclusive, False)

    async def revrange(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
                       limit: Optional[int] = None, exclusive: bool = False) -> List[Log]:
        """Like :meth:`range`, newest first: ``start`` is the upper bound, ``end`` the lower.

        ``await revrange(topic, limit=1)`` is the newest log.

        Returns:
            The logs, newest first.
        """
        return await self._collect(topic, start, end, limit, exclusive, True)

    async def iter_range(self, topic: str, start: Optional[str] = None,
                         end: Optional[str] = None, limit: Optional[int] = None,
                         exclusive: bool = False, *, page_size: int = DEFAULT_PAGE,
                         reverse: bool = False) -> AsyncIterator[Log]:
        """Yield the logs of a range lazily (``async for``), fetching ``page_size`` logs per
        round trip.

        Args:
            topic, start, end, limit, exclusive: as for :meth:`range`.
            page_size: logs per round trip (>= 1).
            reverse: walk newest first, as :meth:`revrange`.

        Yields:
            Each :class:`~pipeproc.Log` of the range.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise InvalidArgument("page_size must be an int >= 1")
        pages = self._range(topic, start, end, limit, exclusive, bool(reverse), page_size)
        try:
            async for chunk in pages:
                for item in chunk:
                    yield item
        finally:
            await pages.aclose()

    async def length(self, topic: str) -> int:
        """The number of logs ever committed to ``topic`` (also after the GC removed some).

        Raises:
            InvalidTopic: the topic never had a commit.
        """
        _ids.check_topic(topic)
        return await self._call("length", topic)

    async def topics(self) -> List[str]:
        """The names of all topics, sorted."""
        return await self._call("topics")

    async def stats(self) -> Dict[str, Any]:
        """Node, workers, topics and procs figures (see the SPEC §3)."""
        return await self._call("stats")

    # ------------------------------------------------------------------ procs

    async def proc(self, topic: str, *, name: str, offset: str = ">", count: int = 1,
                   max_reclaims: int = 10, reclaim_timeout: Optional[float] = 10.0,
                   on_max_reclaims_reached: str = "disable") -> Union[Log, List[Log], None]:
        """Claim the next logs of ``topic`` for the proc ``name`` (created on first use).

        Args:
            topic: the topic to consume.
            name: the proc's name (unique across topics).
            offset: where the first claim starts (frozen at creation; SPEC §5).
            count: logs per claim (>= 1).
            max_reclaims, reclaim_timeout, on_max_reclaims_reached: frozen at creation.

        Returns:
            A ``Log`` (``count == 1``), a list of logs (``count > 1``), or ``None`` when a
            claim is pending or nothing is left to claim.

        Raises:
            ProcNameNotUnique, ProcIsDisabled, InvalidRangeOffset, InvalidArgument.
        """
        _ids.check_topic(topic)
        _ids.check_proc_name(name)
        _check_offset(offset)
        _check_count(count)
        opts = _check_opts(max_reclaims, reclaim_timeout, on_max_reclaims_reached)
        res = await self._call("proc", topic, name, offset, count, *opts)
        return _claim_result(res, count, name)

    async def ack(self, name: str, *, claimed: Any = None) -> str:
        """Ack the pending claim; returns the acked range ``"first..last"``.

        Args:
            name: the proc.
            claimed: the ``Log`` / list that ``proc`` returned: act only on that claim.

        Raises:
            InvalidProc, InvalidAck, StaleClaim.
        """
        _ids.check_proc_name(name)
        return await self._call("ack", name, _claim_key(claimed, name))

    async def ack_commit(self, name: str, log_or_logs: Union[dict, Sequence[dict]], *,
                         claimed: Any = None) -> AckCommit:
        """Ack the pending claim and commit log(s) in one atomic write.

        Returns:
            ``AckCommit(acked, id)``; ``id`` is a list when a list was given.

        Raises:
            InvalidProc, InvalidAck, StaleClaim, InvalidLogFormat, InvalidTopicFormat.
        """
        _ids.check_proc_name(name)
        single = isinstance(log_or_logs, dict)
        if not single and not isinstance(log_or_logs, (list, tuple)):
            raise InvalidLogFormat("ack_commit takes a log dict or a list of them")
        items = _encode_logs([log_or_logs] if single else log_or_logs)
        acked, ms, seqs = await self._call("ackc", name, items, _claim_key(claimed, name))
        ids = [f"{ms}-{s}" for s in seqs]
        return AckCommit(acked, ids[0] if single else ids)

    async def reclaim(self, name: str, *, claimed: Any = None) -> str:
        """Drop the pending claim (its logs will be delivered again).

        Returns:
            The last acked range (``""`` if the proc never acked).

        Raises:
            InvalidProc, ProcIsDisabled, NothingToReclaim, StaleClaim.
        """
        _ids.check_proc_name(name)
        return await self._call("reclaim", name, _claim_key(claimed, name))

    async def inspect_proc(self, name: str) -> ProcState:
        """The proc's current state.

        Raises:
            InvalidProc: no such proc.
        """
        _ids.check_proc_name(name)
        return ProcState(*await self._call("inspect", name))

    async def disable_proc(self, name: str) -> ProcState:
        """Disable the proc (proc / reclaim then fail with ``proc_is_disabled``).

        Raises:
            InvalidProc, ProcAlreadyDisabled.
        """
        _ids.check_proc_name(name)
        return ProcState(*await self._call("disable", name))

    async def resume_proc(self, name: str) -> ProcState:
        """Re-activate a disabled proc; resets reclaims, keeps a pending claim.

        Raises:
            InvalidProc, ProcAlreadyActive.
        """
        _ids.check_proc_name(name)
        return ProcState(*await self._call("resume", name))

    async def destroy_proc(self, name: str) -> ProcState:
        """Delete the proc (and its system proc, if any); returns its last state.

        Raises:
            InvalidProc: no such proc.
        """
        _ids.check_proc_name(name)
        return ProcState(*await self._call("destroy", name))

    async def wait_for_procs(self, names: Optional[Sequence[str]] = None,
                             timeout: Optional[float] = None) -> None:
        """Wait until every named (default: all) active proc on an existing topic has no
        pending claim and nothing left to claim. Other calls proceed meanwhile.

        Args:
            names: proc names (unknown ones are ignored), or None for all.
            timeout: seconds, or None to wait as long as it takes.

        Raises:
            Timeout: ``timeout`` seconds passed first (also when the node does not answer
                at all: the client gives up at ``timeout`` + 1 s).
            ProcIsDisabled: a proc it waits for is (or becomes) disabled by
                ``max_reclaims`` with work left (a dead stage); the message names it and its
                last error. A proc disabled by ``disable_proc`` is not waited for.
        """
        if names is not None:
            if isinstance(names, str):
                names = [names]
            names = list(names)
            for n in names:
                _ids.check_proc_name(n)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout < 0):
            raise InvalidArgument("timeout must be a finite number >= 0 or None")
        if timeout is None:
            await self._call("wait_idle", names, timeout)
            return
        try:
            await asyncio.wait_for(self._call("wait_idle", names, timeout),
                                   timeout + _client.WAIT_SLACK)
        except asyncio.TimeoutError as exc:
            if isinstance(exc, PipeProcError):  # the node's own answer
                raise
            raise Timeout(f"the node did not answer wait_for_procs within {timeout} s") from None

    async def available_proc(self, specs: Sequence[dict]) -> Optional[Tuple[str, Any]]:
        """Claim work from the first listed proc that does not exist yet, otherwise round
        robin over the listed procs that have work.

        Args:
            specs: ``[{"topic": …, "name": …, "offset": …, "count": …, …}, …]``.

        Returns:
            ``(name, Log | list[Log])``, or None when no listed proc has work.
        """
        if not isinstance(specs, (list, tuple)):
            raise InvalidArgument("available_proc takes a list of proc specs")
        wire = []
        for s in specs:
            if not isinstance(s, dict):
                raise InvalidArgument("a proc spec is a dict")
            _ids.check_topic(s.get("topic"))
            _ids.check_proc_name(s.get("name"))
            offset = _check_offset(s.get("offset", ">"))
            count = _check_count(s.get("count", 1))
            opts = _check_opts(s.get("max_reclaims", 10), s.get("reclaim_timeout", 10.0),
                               s.get("on_max_reclaims_reached", "disable"))
            wire.append([s["topic"], s["name"], offset, count, *opts])
        res = await self._call("avail", wire)
        if res is None:
            return None
        name, many, rows = res
        return name, _claim_result(rows, 2 if many else 1, name)

    # ------------------------------------------------------------------ system and live procs

    async def system_proc(self, *, name: str, from_: Union[str, Sequence[str]], processor: Any,
                          to: Union[str, Sequence[str], None] = None, offset: str = ">",
                          count: int = 1, max_reclaims: int = 10,
                          reclaim_timeout: Optional[float] = 10.0,
                          on_max_reclaims_reached: str = "disable",
                          backoff: Tuple[float, float] = DEFAULT_BACKOFF,
                          ) -> Union[ProcState, List[ProcState]]:
        """Register a processor run by the node's workers on ``from_``'s logs (SPEC §6).

        Called again with the same ``name`` and ``from_``, it updates the definition
        (``processor``, ``to``, ``count``, ``backoff``) from the next claim on; the proc keeps
        its position, its options and its status (a disabled proc stays disabled until
        ``resume_proc``).
        The same ``name`` with another ``from_`` raises ``proc_name_not_unique``.

        ``backoff=(first, cap)``: seconds between deliveries of a claim after a failure,
        doubling with each failure in a row (see :meth:`PipeProc.system_proc`).

        Returns:
            The proc's state, or a list of states (one per topic) when ``from_`` is a list.

        Raises:
            InvalidProcessor: ``processor`` cannot be imported by workers.
        """
        from ._workers import processor_ref
        _ids.check_proc_name(name)
        multi = not isinstance(from_, str)
        topics = [from_] if not multi else list(from_)
        if not topics:
            raise InvalidArgument("from_ needs at least one topic")
        for t in topics:
            _ids.check_topic(t)
        tos = [] if to is None else ([to] if isinstance(to, str) else list(to))
        for t in tos:
            _ids.check_topic(t)
        _check_offset(offset)
        _check_count(count)
        opts = _check_opts(max_reclaims, reclaim_timeout, on_max_reclaims_reached)
        wire_backoff = _check_backoff(backoff)
        ref = processor_ref(processor)
        states = await self._call("sysproc", name, topics, multi, ref, tos, offset, count, *opts,
                                  wire_backoff)
        out = [ProcState(*s) for s in states]
        return out if multi else out[0]

    async def live_proc(self, topic: str, *, mode: str = "live", count: int = 1) -> "AsyncLiveProc":
        """Follow ``topic`` from this process (SPEC §7); see :class:`AsyncLiveProc`.

        Args:
            topic: the topic to follow.
            mode: ``"live"`` (logs committed after this call) or ``"all"`` (from the start).
            count: logs per delivery (a list when > 1).

        Returns:
            The live proc, its hidden proc created on the node.
        """
        live = AsyncLiveProc(self, topic, mode=mode, count=count)
        await live._create()
        return live


# ------------------------------------------------------------------ live procs

class AsyncLiveProc:
    """Logs of a topic delivered as they are committed (``async for``), with explicit acks.

    Created by :meth:`AsyncPipeProc.live_proc`. It runs on a hidden proc
    ``liveproc-<uuid>`` owned by the client's connection (the node destroys it when that
    connection goes away). Its waits are parked requests on the client's connection, so they
    hold up none of the client's other calls. Iteration ends after :meth:`cancel` or
    :meth:`destroy`. A wait that is cancelled hands a claim that arrives afterwards back to
    the node (reclaimed, so it is delivered again).

    Example:
        >>> import asyncio, tempfile
        >>> import pipeproc.aio
        >>> async def main():
        ...     async with await pipeproc.aio.spawn(tempfile.mkdtemp(), workers=0) as pp:
        ...         live = await pp.live_proc("events", mode="all")
        ...         await pp.commit({"topic": "events", "body": {"n": 1}})
        ...         async for log in live:
        ...             await live.ack()
        ...             break
        ...         await live.cancel()
        ...         return log.body
        >>> asyncio.run(main())
        {'n': 1}
    """

    def __init__(self, pp: AsyncPipeProc, topic: str, *, mode: str = "live",
                 count: int = 1) -> None:
        from ._live import live_spec
        self.name, self.offset = live_spec(topic, mode, count)
        self._pp = pp
        self.topic = topic
        self.mode = mode
        self.count = count
        self._last: Any = None
        self._cancelled = False
        self._task: Optional[asyncio.Task] = None

    async def _create(self) -> None:
        await self._pp._call("create_live", self.topic, self.name, self.offset)

    def _hand_back(self, reply: list) -> None:
        """A claim answered to a wait whose caller was cancelled: reclaim it."""
        if reply[1] == ERR or reply[2] is None:
            return
        try:
            key = _claim_key(_claim_result(reply[2], self.count, self.name), self.name)
        except PipeProcError:  # pragma: no cover - an empty claim
            return
        self._pp._send_quietly("reclaim", self.name, key)

    # -- delivery

    def __aiter__(self) -> "AsyncLiveProc":
        return self

    async def __anext__(self) -> Any:
        """Wait until logs are claimed for this live proc (a Log, or a list when count > 1).

        Raises:
            StopAsyncIteration: the live proc was cancelled or destroyed.
            InvalidAck: the last delivery is neither acked nor reclaimed (call ``ack()``
                or ``reclaim()`` first: waiting would be forever).
            ConnectionLost: the node went away (also a clean shutdown): never a normal end.
        """
        if self._cancelled:
            raise StopAsyncIteration
        try:
            res = await self._pp._call("live", self.topic, self.name, self.offset, self.count,
                                       None, _held(self._last), orphan=self._hand_back)
        except (NoActiveNode, ConnectionLost):
            if self._cancelled:
                raise StopAsyncIteration from None
            raise
        if res is None:
            raise StopAsyncIteration
        logs = _claim_result(res, self.count, self.name)
        self._last = logs
        return logs

    def changes(self, callback: Callable[["AsyncLiveProc", Any], Any]) -> "AsyncLiveProc":
        """Call ``callback(live, logs)`` for each delivery, in a task of the running loop.

        The callback may be a plain function or a coroutine function; it acks explicitly.
        An exception in it reclaims the logs. :meth:`cancel` stops the task.

        Returns:
            This live proc.
        """
        async def run() -> None:
            try:
                async for logs in self:
                    try:
                        res = callback(self, logs)
                        if inspect.isawaitable(res):
                            await res
                    except Exception:
                        log.exception("live proc callback failed; reclaiming")
                        try:
                            await self.reclaim()
                        except PipeProcError:
                            pass
            except PipeProcError as exc:
                if not self._cancelled:
                    log.warning("live proc %s stopped: %s", self.name, exc)
        self._task = asyncio.get_running_loop().create_task(run(), name=self.name)
        return self

    # -- proc operations on the hidden proc

    async def ack(self) -> str:
        """Ack the last delivery.

        Returns:
            The acked range ``"first..last"``.
        """
        return await self._pp.ack(self.name, claimed=self._last)

    async def ack_commit(self, log_or_logs: Union[dict, List[dict]]) -> AckCommit:
        """Ack the last delivery and commit log(s), atomically.

        Returns:
            ``AckCommit(acked, id)``.
        """
        return await self._pp.ack_commit(self.name, log_or_logs, claimed=self._last)

    async def reclaim(self) -> str:
        """Hand the last delivery back; it is delivered again.

        Returns:
            The last acked range.
        """
        return await self._pp.reclaim(self.name, claimed=self._last)

    async def inspect(self) -> ProcState:
        """The hidden proc's state."""
        return await self._pp.inspect_proc(self.name)

    async def disable(self) -> ProcState:
        """Disable the hidden proc (delivery pauses until :meth:`resume`)."""
        return await self._pp.disable_proc(self.name)

    async def resume(self) -> ProcState:
        """Resume the hidden proc."""
        return await self._pp.resume_proc(self.name)

    async def destroy(self) -> ProcState:
        """Destroy the hidden proc (delivery ends)."""
        return await self._pp.destroy_proc(self.name)

    async def cancel(self) -> None:
        """Stop delivery and destroy the hidden proc (waits for a :meth:`changes` task)."""
        if self._cancelled:
            return
        self._cancelled = True
        try:
            await self._pp.destroy_proc(self.name)
        except (InvalidProc, NoActiveNode, ConnectionLost):
            pass
        t, self._task = self._task, None
        if t is not None and t is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(t), 5)
            except asyncio.TimeoutError:  # pragma: no cover - a node that stopped answering
                t.cancel()

    async def __aenter__(self) -> "AsyncLiveProc":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.cancel()

    def __repr__(self) -> str:
        return f"<AsyncLiveProc {self.name} on {self.topic!r} mode={self.mode}>"


# ------------------------------------------------------------------ spawn and connect

async def spawn(location: Any = None, *, memory: bool = False, workers: int = 1,
                worker_concurrency: int = 1, worker_restart_after: int = 0, gc: Any = False,
                durability: str = "full", address: Any = None, authkey: Optional[bytes] = None,
                max_map_size: Optional[int] = None, max_frame_size: Optional[int] = None,
                log_level: Optional[str] = None, timeout: float = 60.0) -> AsyncPipeProc:
    """Start a node process and return an async client connected to it.

    The same arguments as :func:`pipeproc.spawn` (the node is started by the same code, in
    a thread, so the event loop keeps running meanwhile).

    Args:
        location: the node's directory (``None``: ``./pipeproc_data``, or a private
            temporary directory with ``memory=True``).
        memory: keep the store in memory; nothing of it persists.
        workers: worker processes running system procs (0: none).
        worker_concurrency: processor loops per worker.
        worker_restart_after: recycle a worker after this many executions (0: never).
        gc: ``False``, ``True`` or ``{"min_prune_time": s, "interval": s}``.
        durability: ``"full"`` (fsync per request) or ``"fast"`` (no fsync).
        address: a Unix socket path, or ``("127.0.0.1", port)`` for TCP (port 0: any).
        authkey: the key clients must present (default: a random one).
        max_map_size: cap of the store's size in bytes (``storage_full`` beyond it; its last
            1/16, 512 KiB to 64 MiB, is kept for the GC).
        max_frame_size: the largest request the node accepts, in bytes (default 64 MiB).
        log_level: the node's log level on stderr (default WARNING).
        timeout: seconds to wait for the node to be ready.

    Returns:
        A connected :class:`AsyncPipeProc`; ``await shutdown()`` stops the node.

    Raises:
        NodeAlreadyActive: a running node owns the location or address.
    """
    sync = await asyncio.to_thread(
        _client.spawn, location, memory=memory, workers=workers,
        worker_concurrency=worker_concurrency, worker_restart_after=worker_restart_after,
        gc=gc, durability=durability, address=address, authkey=authkey,
        max_map_size=max_map_size, max_frame_size=max_frame_size, log_level=log_level,
        timeout=timeout)
    proc = sync._process
    sync._process = None  # the async client owns the node process from now on
    sync.close()
    pp = AsyncPipeProc(sync.address, sync.authkey, process=proc, location=sync.location)
    try:
        await pp._connection()
    except BaseException:
        if proc is not None:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        raise
    return pp


async def connect(location: Any = None, *, address: Any = None, authkey: Optional[bytes] = None,
                  timeout: float = 5.0) -> AsyncPipeProc:
    """Connect to a running node, by its location or by ``address`` and ``authkey``.

    Retries until ``timeout`` seconds have passed while a node may be starting; never hangs.
    A location that exists but where no node runs or starts (nothing holds its lock) fails
    at once.

    Args:
        location: the node's directory (``None``: ``./pipeproc_data``), where its address
            and key are read from.
        address: the node's address (``pp.address``), instead of ``location``.
        authkey: the node's key (``pp.authkey``), with ``address``.
        timeout: seconds to keep trying.

    Returns:
        A connected :class:`AsyncPipeProc`.

    Raises:
        NoActiveNode: no node answered within ``timeout``, or none runs at ``location``.
        AuthFailed: the node refused the key.
    """
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout < 0):
        raise InvalidArgument("timeout must be a finite number of seconds")
    address = _client._address(address)
    loc = None if address is not None and location is None else _client._location(location)
    deadline = time.monotonic() + timeout
    delay = 0.01
    last: PipeProcError = NoActiveNode("no node")
    idle_since: Optional[float] = None
    while True:
        try:
            addr, key = _client.resolve_node(loc, address, authkey)
            if not isinstance(key, (bytes, bytearray)):
                raise InvalidArgument("authkey must be bytes")
            pp = AsyncPipeProc(addr, key, location=loc)
            left = deadline - time.monotonic()
            pp._conn = await _Conn.open(addr, pp.authkey, min(max(left, 0.05), HANDSHAKE_TIMEOUT))
            return pp
        except AuthFailed:
            raise
        except NoActiveNode as exc:
            last = exc
            if _client.node_starting(loc):
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= _client.IDLE_CHECK:
                raise _client.no_node_error(loc, exc)  # type: ignore[arg-type]
        if time.monotonic() + delay > deadline:
            raise NoActiveNode(f"{last.message} (gave up after {timeout} s)")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
