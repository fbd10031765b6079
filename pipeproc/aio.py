"""The asyncio client: :class:`AsyncPipeProc`, :func:`spawn`, :func:`connect`, :class:`AsyncLiveProc`.

The async twin of :class:`pipeproc.PipeProc`: the same method names, arguments, return
values and errors, as coroutines. Each method is a thin call into :mod:`pipeproc._calls`,
the core both clients share (argument checks, request builders, reply shaping, docstrings),
so both clients accept and refuse exactly the same things. The stream itself (framing,
authkey handshake, the reader task) is :mod:`pipeproc._aio_conn`.

Client side: imports ``_aio_conn``, ``_aio_live`` (:class:`AsyncLiveProc`, re-exported
here), ``_calls``, ``_docs``, ``_spawn``, ``_protocol`` and ``errors``; never a node-side
module.

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
import itertools
import subprocess
import time
from typing import (
    Any,
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from . import _calls, _docs, _rclient, _spawn
from ._calls import (
    DEFAULT_BACKOFF,
    DEFAULT_PAGE,
    MIN_FRAME,
    RANGE_PAGE,
    WAIT_SLACK,
    AckCommit,
    Call,
    Claimed,
    Log,
    Page,
    ProcState,
    T,
    _CLIENTS,
    _NodeRef,
    _check_request_size,
    documented,
)
from ._aio_live import AsyncLiveProc
from ._aio_conn import _Conn, _response  # noqa: F401 - _response: tests import it from here
from ._protocol import BUSY_POLL, ERR, pack
from ._rops import Ops
from .errors import (
    ConnectionLost,
    InvalidArgument,
    NoActiveNode,
    PipeProcError,
    Timeout,
    from_code,
)

__all__ = ["AsyncPipeProc", "AsyncLiveProc", "spawn", "connect"]

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
                 location: Optional[str] = None, busy_poll: float = BUSY_POLL,
                 backend: Optional[Ops] = None) -> None:
        #: the Redis transport (``connect(redis=...)``): each call runs on a worker thread
        #: (redis-py's blocking client), so the event loop never blocks; or None: a node
        self._backend = backend
        self._rcalls = _rclient.AsyncCalls(backend) if backend is not None else None
        self._address = address
        self._authkey = bytes(authkey)
        self._process = process
        self._location = location
        self._rids = itertools.count(1)
        self._conn: Optional[_Conn] = None
        self._conn_lock: Optional[asyncio.Lock] = None
        self._closed = False
        self._max_frame: Optional[int] = None
        #: checked and kept for ``connect()``'s symmetry: an asyncio stream waits in the
        #: event loop, it never busy-polls
        self._busy_poll = busy_poll
        _CLIENTS.add(self)

    # ------------------------------------------------------------------ connection

    @property
    def namespace(self) -> Optional[str]:
        """The Redis namespace of a client opened with ``redis=`` (``None`` for a node)."""
        return None if self._backend is None else self._backend.namespace

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
        if self._backend is not None:
            self._backend = self._backend.reopen()
            self._rcalls = _rclient.AsyncCalls(self._backend)

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

    async def _call(self, op: Optional[str], *args: Any,
                    orphan: Optional[Callable[[list], None]] = None) -> Any:
        """Send one request and await its reply.

        ``orphan`` handles a reply that comes back after the caller was cancelled.
        """
        if self._backend is not None:
            assert self._rcalls is not None
            return await self._rcalls.call(op or "", args, orphan)
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
        if self._rcalls is not None:
            self._rcalls.send_quietly(op, args)
            return
        c = self._conn
        if c is not None and c.alive and not self._closed:
            try:
                c.send([next(self._rids), op, *args])
            except (OSError, RuntimeError):  # pragma: no cover - transport closing
                pass

    async def _run(self, call: Call[T]) -> T:
        """Send a built request (:mod:`pipeproc._calls`) and shape its reply."""
        if call.op is None:
            return call.shape(None)
        if call.within is None:
            return call.shape(await self._call(call.op, *call.args))
        try:
            reply = await asyncio.wait_for(self._call(call.op, *call.args),
                                           call.within + WAIT_SLACK)
        except asyncio.TimeoutError as exc:
            if isinstance(exc, PipeProcError):  # the node's own answer
                raise
            raise Timeout(f"the node did not answer wait_for_procs within {call.within} s") from None
        return call.shape(reply)

    @documented
    async def close(self) -> None:
        self._closed = True
        if self._rcalls is not None:
            await asyncio.to_thread(self._rcalls.close)
        c, self._conn = self._conn, None
        if c is not None:
            await c.close()

    @documented
    async def shutdown(self, timeout: float = 30.0) -> None:
        if self._backend is not None:  # the local supervisor and its workers; data stays
            proc, self._process = self._process, None
            if proc is not None:
                await asyncio.to_thread(_rclient.stop_supervisor, proc, timeout)
            await self.close()
            return
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

    @documented
    async def commit(self, logs: Union[dict, Sequence[dict]]) -> Union[str, List[str]]:
        return await self._run(_calls.commit(logs))

    async def _pages(self, call: Optional[Call[Any]]) -> AsyncGenerator[List[Log], None]:
        while call is not None:
            logs, call = await self._run(call)
            yield logs

    async def _collect(self, call: Call[Page]) -> List[Log]:
        out: List[Log] = []
        pages = self._pages(call)
        try:
            async for page in pages:
                out.extend(page)
        finally:
            await pages.aclose()
        return out

    @documented
    async def range(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
                    limit: Optional[int] = None, exclusive: bool = False) -> List[Log]:
        return await self._collect(
            _calls.range_pages(topic, start, end, limit, exclusive, False, RANGE_PAGE))

    @documented
    async def revrange(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
                       limit: Optional[int] = None, exclusive: bool = False) -> List[Log]:
        return await self._collect(
            _calls.range_pages(topic, start, end, limit, exclusive, True, RANGE_PAGE))

    @documented
    async def iter_range(self, topic: str, start: Optional[str] = None,
                         end: Optional[str] = None, limit: Optional[int] = None,
                         exclusive: bool = False, *, page_size: int = DEFAULT_PAGE,
                         reverse: bool = False) -> AsyncIterator[Log]:
        page_size = _calls._check_page_size(page_size)
        pages = self._pages(
            _calls.range_pages(topic, start, end, limit, exclusive, bool(reverse), page_size))
        try:
            async for page in pages:
                for item in page:
                    yield item
        finally:
            await pages.aclose()

    @documented
    async def length(self, topic: str) -> int:
        return await self._run(_calls.length(topic))

    @documented
    async def topics(self) -> List[str]:
        return await self._run(_calls.topics())

    @documented
    async def stats(self) -> Dict[str, Any]:
        return await self._run(_calls.stats())

    # ------------------------------------------------------------------ procs

    @documented
    async def proc(self, topic: str, *, name: str, offset: str = ">", count: int = 1,
                   max_reclaims: int = 10, reclaim_timeout: Optional[float] = 10.0,
                   on_max_reclaims_reached: str = "disable") -> Claimed:
        return await self._run(_calls.proc(
            topic, name, offset, count, max_reclaims, reclaim_timeout, on_max_reclaims_reached))

    @documented
    async def ack(self, name: str, *, claimed: Any = None) -> str:
        return await self._run(_calls.ack(name, claimed))

    @documented
    async def ack_commit(self, name: str, log_or_logs: Union[dict, Sequence[dict]], *,
                         claimed: Any = None) -> AckCommit:
        return await self._run(_calls.ack_commit(name, log_or_logs, claimed))

    @documented
    async def reclaim(self, name: str, *, claimed: Any = None) -> str:
        return await self._run(_calls.reclaim(name, claimed))

    @documented
    async def inspect_proc(self, name: str) -> ProcState:
        return await self._run(_calls.proc_state("inspect", name))

    @documented
    async def disable_proc(self, name: str) -> ProcState:
        return await self._run(_calls.proc_state("disable", name))

    @documented
    async def resume_proc(self, name: str) -> ProcState:
        return await self._run(_calls.proc_state("resume", name))

    @documented
    async def destroy_proc(self, name: str) -> ProcState:
        return await self._run(_calls.proc_state("destroy", name))

    @documented
    async def wait_for_procs(self, names: Optional[Sequence[str]] = None,
                             timeout: Optional[float] = None) -> None:
        await self._run(_calls.wait_for_procs(names, timeout))

    @documented
    async def available_proc(self, specs: Sequence[dict]) -> Optional[Tuple[str, Any]]:
        return await self._run(_calls.available_proc(specs))

    # ------------------------------------------------------------------ system and live procs

    @documented
    async def system_proc(self, *, name: str, from_: Union[str, Sequence[str]], processor: Any,
                          to: Union[str, Sequence[str], None] = None, offset: str = ">",
                          count: int = 1, max_reclaims: int = 10,
                          reclaim_timeout: Optional[float] = 10.0,
                          on_max_reclaims_reached: str = "disable",
                          backoff: Tuple[float, float] = DEFAULT_BACKOFF,
                          ) -> Union[ProcState, List[ProcState]]:
        return await self._run(_calls.system_proc(
            name, from_, processor, to, offset, count, max_reclaims, reclaim_timeout,
            on_max_reclaims_reached, backoff))

    @documented
    async def live_proc(self, topic: str, *, mode: str = "live", count: int = 1) -> "AsyncLiveProc":
        live = AsyncLiveProc(self, topic, mode=mode, count=count)
        await live._create()
        return live


# ------------------------------------------------------------------ spawn and connect

async def spawn(location: Any = None, *, memory: bool = False, workers: int = 1,
                worker_concurrency: int = 1, worker_restart_after: int = 0, gc: Any = False,
                durability: str = "full", address: Any = None, authkey: Optional[bytes] = None,
                max_map_size: Optional[int] = None, max_frame_size: Optional[int] = None,
                log_level: Optional[str] = None, timeout: float = 60.0,
                busy_poll: float = BUSY_POLL, redis: Optional[str] = None,
                namespace: Optional[str] = None, allow: Optional[Sequence[str]] = None,
                redis_options: Optional[Dict[str, Any]] = None) -> AsyncPipeProc:
    if redis is not None or namespace is not None or allow is not None or redis_options is not None:
        ns = _rclient.check_redis_args(redis, namespace, location=location, memory=memory,
                                       address=address, authkey=authkey)
        assert redis is not None
        backend, proc = await asyncio.to_thread(
            lambda: _rclient.start_local(
                redis, ns, workers=workers, worker_concurrency=worker_concurrency,
                worker_restart_after=worker_restart_after, gc=gc, durability=durability,
                allow=None if allow is None else list(allow), redis_options=redis_options,
                log_level=log_level, timeout=timeout))
        return AsyncPipeProc(backend.safe_url, b"", process=proc, backend=backend)
    cfg = _spawn.node_cfg(
        location, memory=memory, workers=workers, worker_concurrency=worker_concurrency,
        worker_restart_after=worker_restart_after, gc=gc, durability=durability,
        address=address, authkey=authkey, max_map_size=max_map_size,
        max_frame_size=max_frame_size, log_level=log_level, busy_poll=busy_poll)
    # the node is started by the same code as the sync client's, in a thread, so the event
    # loop keeps running meanwhile
    node = await asyncio.to_thread(_spawn.start_node, cfg, timeout)
    pp = AsyncPipeProc(node.address, node.authkey, process=node.process,
                       location=node.location, busy_poll=float(busy_poll))
    try:
        await pp._connection()
    except BaseException:
        await asyncio.to_thread(_spawn.kill_node, node.process)
        raise
    return pp


spawn.__doc__ = f"""Start a node process and return an async client connected to it.

    The same arguments as :func:`pipeproc.spawn` (the node is started by the same code, in
    a thread, so the event loop keeps running meanwhile).

{_docs.SPAWN_ARGS}
    Returns:
        A connected :class:`AsyncPipeProc`; ``await shutdown()`` stops the node.

    Raises:
        NodeAlreadyActive: a running node owns the location or address.
        NoActiveNode: the node did not become ready within ``timeout``.
        InvalidArgument: a bad argument (before anything is started).
    """


async def connect(location: Any = None, *, address: Any = None, authkey: Optional[bytes] = None,
                  timeout: float = 5.0, busy_poll: float = BUSY_POLL,
                  redis: Optional[str] = None, namespace: Optional[str] = None,
                  redis_options: Optional[Dict[str, Any]] = None,
                  durability: str = "full") -> AsyncPipeProc:
    if redis is not None or namespace is not None or redis_options is not None:
        ns = _rclient.check_redis_args(redis, namespace, location=location, address=address,
                                       authkey=authkey)
        assert redis is not None
        backend = await asyncio.to_thread(_rclient.open_backend, redis, ns, redis_options,
                                          durability, timeout)
        return AsyncPipeProc(backend.safe_url, b"", backend=backend)
    if durability != "full":
        raise InvalidArgument("connect(durability=...) is for redis=: a node's durability "
                              "is chosen by its spawn")
    spin = _spawn.check_busy_poll(busy_poll)
    retry = _spawn.Retry(location, address, timeout)
    while True:
        try:
            addr, key = _spawn.resolve_node(retry.loc, retry.address, authkey)
            if not isinstance(key, (bytes, bytearray)):
                raise InvalidArgument("authkey must be bytes")
            pp = AsyncPipeProc(addr, key, location=retry.loc, busy_poll=spin)
            pp._conn = await _Conn.open(addr, pp.authkey, retry.attempt_timeout())
            return pp
        except NoActiveNode as exc:
            delay = retry.failed(exc)
        await asyncio.sleep(delay)


connect.__doc__ = f"""Connect to a running node, by its location or by ``address`` and ``authkey``.

    Retries until ``timeout`` seconds have passed while a node may be starting; never hangs.
    A location that exists but where no node runs or starts (nothing holds its lock) fails
    at once.

{_docs.CONNECT_ARGS}
    Returns:
        A connected :class:`AsyncPipeProc`.

    Raises:
        NoActiveNode: no node answered within ``timeout``, or none runs at ``location``.
        AuthFailed: the node refused the key.
    """
