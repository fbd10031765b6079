"""The Redis transport of both clients: opening, local workers, live procs' channels.

A :class:`pipeproc.PipeProc` (and a :class:`pipeproc.aio.AsyncPipeProc`) opened with
``redis=`` holds an :class:`pipeproc._rops.Ops` instead of a node connection: its
``_call`` hands each op to the backend, which answers it with a server-side script and the
node's reply shape. Everything else (the public methods, argument checks, reply shaping:
:mod:`pipeproc._calls`) is the same code as for a node. This module holds what opening a
Redis namespace needs (SCALE.md §1):

* :func:`open_backend` (``connect(redis=...)``) and :func:`start_local`
  (``spawn(redis=...)``: the backend plus a local supervisor and its workers);
* :class:`Channel`, what a live proc takes for a connection (a Redis connection of its own
  for its blocking waits: closing it interrupts a wait);
* :class:`Leases`, the thread that keeps a client's live procs' leases;
* :func:`refuse_node_args`, :func:`stop_supervisor`.

Client side: imports ``_rops``, ``_rbackend``, ``_rworkers``, ``_protocol`` and ``errors``
(never ``_client`` or ``aio``: they import this module).
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from . import _rworkers
from ._protocol import ERR, OK, decode, pack
from ._rbackend import DEFAULT_NAMESPACE, LIVE_LEASE_MS
from ._rops import Ops
from .errors import InvalidArgument, NoActiveNode, PipeProcError

__all__ = ["AsyncCalls", "Channel", "Leases", "open_backend", "start_local", "stop_supervisor",
           "refuse_node_args", "DEFAULT_NAMESPACE"]


class Channel:
    """What a live proc takes for a connection: frames in, frames out, answered by the
    backend on a Redis connection of its own (closing it interrupts a blocking wait)."""

    def __init__(self, backend: Ops) -> None:
        self.backend = backend
        redis = backend._redis_mod
        pool = redis.ConnectionPool(connection_class=backend.pool.connection_class,
                                    **backend.pool.connection_kwargs)
        self.conn = redis.Redis(connection_pool=pool)
        self.closed = False
        self._reply: Optional[bytes] = None
        self.sock = self  # what callers close on a node channel

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
        """End the channel: a wait on it ends at its next look (a doorbell ring, or
        ``CANCEL_CHECK``), and Backend.block refuses to start one. Only idle connections
        are closed here: closing one another thread is reading or still opening races with
        redis-py (a read that never returns)."""
        self.closed = True
        self.conn.pp_closed = True
        try:
            self.conn.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # noqa: BLE001 - closing anyway
            pass


class Leases:
    """Renews a client's live procs' leases while the client lives (a daemon thread,
    started with the first live proc; a crashed client's hidden procs go when their lease
    runs out, so they never hold the GC)."""

    def __init__(self, backend: Ops) -> None:
        self.backend = backend
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.thread is not None:
            return

        def run() -> None:
            while not self.stop.wait(LIVE_LEASE_MS / 3000):
                try:
                    self.backend.renew_leases()
                except PipeProcError:
                    pass
        self.thread = threading.Thread(target=run, name="pipeproc-leases", daemon=True)
        self.thread.start()


def refuse_node_args(**given: Any) -> None:
    """With ``redis=``, the node's own arguments are refused (SCALE.md §1)."""
    bad = [k for k, v in given.items() if v not in (None, False)]
    if bad:
        raise InvalidArgument(f"{', '.join(bad)} cannot be used with redis= "
                              "(the store is the Redis namespace)")


def check_redis_args(redis: Optional[str], namespace: Optional[str], **node_args: Any) -> str:
    """The namespace to open (``None``: the default); the node's arguments refused."""
    if redis is None:
        raise InvalidArgument("namespace=, allow= and redis_options= go with redis=")
    refuse_node_args(**node_args)
    return DEFAULT_NAMESPACE if namespace is None else namespace


def open_backend(url: str, namespace: str, redis_options: Optional[Dict[str, Any]] = None,
                 durability: str = "full", timeout: float = 5.0) -> Ops:
    """``connect(redis=...)``: the namespace's backend, the server checked."""
    return Ops(url, namespace, redis_options, durability, timeout)


def start_local(url: str, namespace: str, *, workers: int = 1, worker_concurrency: int = 1,
                worker_restart_after: int = 0, gc: Any = False, durability: str = "full",
                allow: Optional[List[str]] = None,
                redis_options: Optional[Dict[str, Any]] = None,
                log_level: Optional[str] = None,
                timeout: float = 60.0) -> Tuple[Ops, subprocess.Popen]:
    """``spawn(redis=...)``: the backend, and a local supervisor with its workers, ready."""
    backend = Ops(url, namespace, redis_options, durability, timeout=min(timeout, 10.0))
    try:
        cfg = _rworkers.supervisor_cfg(url, namespace, workers=workers,
                                       concurrency=worker_concurrency,
                                       restart_after=worker_restart_after, gc=gc,
                                       durability=durability, allow=allow,
                                       redis_options=redis_options, log_level=log_level)
        if cfg["gc"]:
            _rworkers.store_gc_settings(backend, cfg["gc"])
    except BaseException:
        backend.close()
        raise
    proc = _rworkers.start_supervisor(cfg)
    try:
        _rworkers.wait_ready(backend, proc, cfg["id"], workers, timeout)
    except BaseException:
        stop_supervisor(proc, 5.0)
        backend.close()
        raise
    return backend, proc


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


def closed_error() -> NoActiveNode:
    return NoActiveNode("this client is closed")


class AsyncCalls:
    """How an asyncio client (:class:`pipeproc.aio.AsyncPipeProc`) calls the backend.

    * An ordinary op runs on a thread of this client's own executor (never the event
      loop's default one, which a few long waits could fill: SPEC §3, a blocking call never
      holds up the client's other calls).
    * A blocking op (``wait_for_procs``, a live proc's wait) runs on a thread of its own with
      a Redis connection of its own; cancelling it closes that connection, which ends the
      wait at once. A claim that arrives for a cancelled live wait goes to ``orphan``
      (handed back: reclaimed).
    * After ``close()``, every call, also one in flight, ends with ``no_active_node``.
    """

    BLOCKING = frozenset({"live", "wait_idle"})

    def __init__(self, backend: Ops) -> None:
        self.backend = backend
        self.closed = False
        self._executor: Optional[ThreadPoolExecutor] = None
        self._waiting: "set[Channel]" = set()  # the blocking calls' own connections
        self.leases = Leases(backend)  # started with the first live proc

    async def call(self, op: str, args: tuple, orphan: Optional[Any] = None) -> Any:
        if self.closed:
            raise closed_error()
        if op == "create_live":
            self.leases.start()
        loop = asyncio.get_running_loop()
        gone = threading.Event()
        conn: Optional[Channel] = None
        if op in self.BLOCKING:
            conn = Channel(self.backend)
            self._waiting.add(conn)
            fut: Any = loop.create_future()
            channel = conn

            def stop() -> bool:
                return gone.is_set() or self.closed or channel.closed

            def run() -> None:
                ok: bool
                out: Any
                try:
                    value = self.backend.handle(op, args, conn=channel.conn, cancelled=stop)
                    ok, out = True, value
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                    ok, out = False, exc
                finally:
                    channel.close()
                    self._waiting.discard(channel)

                def settle() -> None:
                    if fut.done():
                        return
                    if ok:
                        fut.set_result(out)
                    else:
                        fut.set_exception(out)
                try:
                    loop.call_soon_threadsafe(settle)
                except RuntimeError:  # the event loop is closed: nobody waits any more
                    pass
            threading.Thread(target=run, name=f"pipeproc-{op}", daemon=True).start()
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=32,
                                                    thread_name_prefix="pipeproc-redis")
            fut = loop.run_in_executor(self._executor, lambda: self.backend.handle(op, args))
        # an outcome nobody awaits any more is still retrieved (no "never retrieved" warning)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            result = await asyncio.shield(fut)
            if self.closed and conn is not None:
                raise closed_error()  # a wait cut short by close()
            return result
        except asyncio.CancelledError:
            gone.set()
            if conn is not None:  # the wait ends at the doorbell's ring
                conn.close()
                threading.Thread(target=self.backend.wake, daemon=True).start()
            if orphan is not None:
                def handed(f: Any) -> None:
                    if not f.cancelled() and f.exception() is None and f.result() is not None:
                        orphan([0, 0, f.result()])
                fut.add_done_callback(handed)
            raise
        except PipeProcError:
            if self.closed:
                raise closed_error() from None
            raise
        except Exception as exc:  # noqa: BLE001 - redis-py after a close, for instance
            if self.closed:
                raise closed_error() from None
            raise PipeProcError(f"the Redis backend failed during {op}: {exc}") from exc

    def send_quietly(self, op: str, args: tuple) -> None:
        """Fire an op whose result nobody waits for (a live proc's hand-back)."""
        def run() -> None:
            try:
                self.backend.handle(op, args)
            except PipeProcError:
                pass
        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self.leases.stop.set()
        for channel in list(self._waiting):  # the parked waits end at the ring below
            channel.close()
        if self._waiting:
            self.backend.wake()
        self.backend.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
