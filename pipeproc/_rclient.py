"""The synchronous client over Redis: :class:`RedisPipeProc`, ``connect(redis=...)`` and
``spawn(redis=...)`` (SCALE.md).

:class:`RedisPipeProc` *is* a :class:`pipeproc.PipeProc`: every public method is the
same one line over :mod:`pipeproc._calls`; only the transport differs. ``_call`` hands the
op to :class:`pipeproc._rbackend.Backend`, which answers it with a server-side script and
the same reply shape as the node. A live proc gets a channel of its own
(:class:`_Channel`), a dedicated Redis connection for its blocking waits.

Client side: imports ``_client``, ``_calls``, ``_rbackend``, ``_protocol`` and ``errors``.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional

from ._calls import WAIT_SLACK, Call, T
from ._client import PipeProc
from ._protocol import ERR, OK, decode, pack
from ._rbackend import DEFAULT_NAMESPACE, LIVE_LEASE_MS, Backend
from .errors import NoActiveNode, PipeProcError


class _Channel:
    """What a live proc takes for a connection: frames in, frames out, answered by the
    backend on a Redis connection of its own (closing it interrupts a blocking wait)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.conn = backend.r.client()  # a Redis client on a private connection
        self.conn.connection_pool = backend._redis_mod.ConnectionPool(
            connection_class=backend.pool.connection_class,
            **backend.pool.connection_kwargs)
        self.closed = False
        self._reply: Optional[bytes] = None
        self.sock = self  # close() through ``sock`` too (what the node client does)

    def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise OSError("closed")
        rid, op, *args = decode(data)
        try:
            value = self.backend.handle(op, args, conn=self.conn,
                                        cancelled=lambda: self.closed)
            self._reply = pack([rid, OK, value])
        except PipeProcError as exc:
            if self.closed:
                raise OSError("closed") from None
            self._reply = pack([rid, ERR, [exc.code, exc.message]])

    def recv_bytes(self, maxlength: Optional[int] = None) -> bytes:
        reply, self._reply = self._reply, None
        if reply is None:
            raise EOFError("no reply")
        return reply

    def close(self) -> None:
        self.closed = True
        try:
            self.conn.connection_pool.disconnect()
        except Exception:  # noqa: BLE001
            pass


class RedisPipeProc(PipeProc):
    """A :class:`pipeproc.PipeProc` whose store is a Redis namespace (SCALE.md).

    Returned by ``pipeproc.connect(redis=...)`` and ``pipeproc.spawn(redis=...)``; the
    methods, results and errors are those of the embedded node's client.
    ``shutdown()`` stops the local workers a spawn started (the data stays in Redis).
    """

    def __init__(self, backend: Backend, *, process: Optional[subprocess.Popen] = None) -> None:
        super().__init__(backend.safe_url, b"", process=process, location=None)
        self._backend = backend
        self._lease_stop = threading.Event()
        self._lease_thread: Optional[threading.Thread] = None

    @property
    def namespace(self) -> str:
        """The Redis namespace this client works in."""
        return self._backend.namespace

    def _connect(self, timeout: float = 0.0) -> Any:
        if self._closed:
            raise NoActiveNode("this client is closed")
        self._start_leases()
        return _Channel(self._backend)

    def _start_leases(self) -> None:
        """Renew this client's live procs' leases while it lives (a thread, started with
        the first live proc)."""
        if self._lease_thread is not None:
            return

        def run() -> None:
            while not self._lease_stop.wait(LIVE_LEASE_MS / 3000):
                try:
                    self._backend.renew_leases()
                except PipeProcError:
                    pass
        self._lease_thread = threading.Thread(target=run, name="pipeproc-leases", daemon=True)
        self._lease_thread.start()

    def _forked(self) -> None:
        self._backend = Backend.__new__(Backend).__class__(
            self._backend.url, self._backend.namespace, None, self._backend.durability)
        self._process = None
        self._lease_thread = None

    def _call(self, op: Optional[str], *args: Any) -> Any:
        if self._closed:
            raise NoActiveNode("this client is closed")
        return self._backend.handle(op or "", args)

    def _call_within(self, timeout: float, op: Optional[str], *args: Any) -> Any:
        return self._call(op, *args)

    def _run(self, call: Call[T]) -> T:
        if call.op is None:
            return call.shape(None)
        return call.shape(self._call(call.op, *call.args))

    def _frame_limit(self) -> int:
        return 1 << 62

    def close(self) -> None:
        """Disconnect this client (the data stays in Redis; local workers keep running)."""
        self._closed = True
        self._lease_stop.set()
        self._backend.close()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the local supervisor and workers this client spawned, then close."""
        proc = self._process
        self._process = None
        if proc is not None:
            stop_supervisor(proc, timeout)
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected"
        return f"<PipeProc {state} to Redis {self._backend.safe_url} namespace {self.namespace!r}>"


def stop_supervisor(proc: subprocess.Popen, timeout: float) -> None:
    """Stop a local supervisor: close its stdin (its lifeline), then SIGTERM, then kill."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_REFUSED = ("location", "memory", "address", "authkey")


def refuse_node_args(**given: Any) -> None:
    """With ``redis=``, the node's own arguments are refused (SCALE.md §1)."""
    from .errors import InvalidArgument
    bad = [k for k, v in given.items() if v not in (None, False)]
    if bad:
        raise InvalidArgument(f"{', '.join(bad)} cannot be used with redis= "
                              "(the store is the Redis namespace)")


def connect_redis(url: str, namespace: str = DEFAULT_NAMESPACE,
                  redis_options: Optional[Dict[str, Any]] = None, durability: str = "full",
                  timeout: float = 5.0) -> RedisPipeProc:
    """``pipeproc.connect(redis=...)``: a client of a Redis namespace."""
    return RedisPipeProc(Backend(url, namespace, redis_options, durability, timeout))


def spawn_redis(url: str, namespace: str = DEFAULT_NAMESPACE, *, workers: int = 1,
                worker_concurrency: int = 1, worker_restart_after: int = 0, gc: Any = False,
                durability: str = "full", allow: Optional[List[str]] = None,
                redis_options: Optional[Dict[str, Any]] = None, log_level: Optional[str] = None,
                timeout: float = 60.0) -> RedisPipeProc:
    """``pipeproc.spawn(redis=...)``: a client, plus a local supervisor and its workers."""
    from . import _rworkers
    backend = Backend(url, namespace, redis_options, durability, timeout=min(timeout, 10.0))
    cfg = _rworkers.supervisor_cfg(url, namespace, workers=workers,
                                   concurrency=worker_concurrency,
                                   restart_after=worker_restart_after, gc=gc,
                                   durability=durability, allow=allow,
                                   redis_options=redis_options, log_level=log_level)
    if cfg["gc"]:
        _rworkers.store_gc_settings(backend, cfg["gc"])
    proc = _rworkers.start_supervisor(cfg)
    pp = RedisPipeProc(backend, process=proc)
    try:
        _rworkers.wait_ready(backend, proc, cfg["id"], workers, timeout)
    except BaseException:
        stop_supervisor(proc, 5.0)
        backend.close()
        raise
    return pp


__all__ = ["RedisPipeProc", "connect_redis", "spawn_redis", "refuse_node_args",
           "WAIT_SLACK", "os", "time"]


# ------------------------------------------------------------------ the asyncio client

def _async_class() -> Any:
    """:class:`AsyncRedisPipeProc`, built on first use (``pipeproc.aio`` imports us lazily)."""
    global _ASYNC
    if _ASYNC is not None:
        return _ASYNC
    import asyncio

    from .aio import AsyncPipeProc

    class AsyncRedisPipeProc(AsyncPipeProc):
        """A :class:`pipeproc.aio.AsyncPipeProc` whose store is a Redis namespace.

        Each call runs the backend's script on a worker thread (redis-py's blocking client,
        ``asyncio.to_thread``), so the event loop never blocks and any number of coroutines
        may await calls at once. A call cancelled while its script runs may still have
        happened, as with the node; a claim that arrives for a cancelled live proc wait is
        handed back (reclaimed)."""

        def __init__(self, backend: Backend, process: Optional[subprocess.Popen] = None) -> None:
            super().__init__(backend.safe_url, b"", process=process)
            self._backend = backend

        @property
        def namespace(self) -> str:
            """The Redis namespace this client works in."""
            return self._backend.namespace

        async def _call(self, op: Optional[str], *args: Any, orphan: Any = None) -> Any:
            if self._closed:
                raise NoActiveNode("this client is closed")
            gone = threading.Event()
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(None, lambda: self._backend.handle(
                op or "", args, cancelled=gone.is_set))
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                gone.set()
                if orphan is not None:
                    def handed(f: Any) -> None:
                        if not f.cancelled() and f.exception() is None and f.result() is not None:
                            orphan([0, OK, f.result()])
                    fut.add_done_callback(handed)
                raise

        def _send_quietly(self, op: str, *args: Any) -> None:
            def run() -> None:
                try:
                    self._backend.handle(op, args)
                except PipeProcError:
                    pass
            threading.Thread(target=run, daemon=True).start()

        async def _run(self, call: Call[T]) -> T:
            if call.op is None:
                return call.shape(None)
            return call.shape(await self._call(call.op, *call.args))

        async def close(self) -> None:
            self._closed = True
            self._backend.close()

        async def shutdown(self, timeout: float = 30.0) -> None:
            proc, self._process = self._process, None
            if proc is not None:
                await asyncio.to_thread(stop_supervisor, proc, timeout)
            await self.close()

        def __repr__(self) -> str:
            state = "closed" if self._closed else "connected"
            return (f"<AsyncPipeProc {state} to Redis {self._backend.safe_url} namespace "
                    f"{self.namespace!r}>")

    _ASYNC = AsyncRedisPipeProc
    return _ASYNC


_ASYNC: Any = None


async def aio_connect_redis(url: str, namespace: str = DEFAULT_NAMESPACE,
                            redis_options: Optional[Dict[str, Any]] = None,
                            durability: str = "full", timeout: float = 5.0) -> Any:
    """``pipeproc.aio.connect(redis=...)``."""
    import asyncio
    backend = await asyncio.to_thread(Backend, url, namespace, redis_options, durability, timeout)
    return _async_class()(backend)


async def aio_spawn_redis(url: str, namespace: str = DEFAULT_NAMESPACE, **kw: Any) -> Any:
    """``pipeproc.aio.spawn(redis=...)``: the sync spawn in a thread, then an async client."""
    import asyncio
    pp = await asyncio.to_thread(spawn_redis, url, namespace, **kw)
    backend, proc = pp._backend, pp._process
    pp._process = None
    return _async_class()(backend, proc)
