"""The synchronous client: :class:`PipeProc`, :func:`spawn` and :func:`connect`.

The client is thin: each public method builds its request with :mod:`pipeproc._calls`
(argument checks, bodies encoded once), sends it and shapes the reply there too; the
asyncio client (:mod:`pipeproc.aio`) is its twin over the same core. What is this module's
own is the transport: a small pool of connections (:class:`pipeproc._protocol.Channel`) so
that the threads of one process can share a client and a blocking call
(``wait_for_procs``, a live proc waiting) holds one connection without holding up the others.

Client side: imports ``_calls``, ``_docs``, ``_live``, ``_spawn``, ``_protocol`` and
``errors``; never a node-side module.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

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
    T,
    Log,
    ProcState,
    _CLIENTS,
    _NodeRef,
    _check_request_size,
    documented,
)
from ._calls import _ClaimedList, _ClaimedLog  # noqa: F401 - their pickles name this module
from ._live import LiveProc
from ._protocol import BUSY_POLL, ERR, REPLY_LIMIT, Channel, decode, open_connection, pack
from ._spawn import HANDSHAKE_TIMEOUT
from ._rops import Ops
from .errors import ConnectionLost, InvalidArgument, NoActiveNode, PipeProcError, Timeout, from_code

__all__ = ["PipeProc", "spawn", "connect", "Log", "ProcState", "AckCommit", "open_connection"]


class PipeProc(_NodeRef):
    """A client of a pipeproc node (returned by :func:`spawn` and :func:`connect`).

    Safe to share between the threads of a process. Use it as a context manager to shut the
    node down (spawning client) or disconnect (connecting client) on exit.

    Example:
        >>> import pipeproc, tempfile
        >>> with pipeproc.spawn(tempfile.mkdtemp(), workers=0) as pp:
        ...     first = pp.commit({"topic": "greetings", "body": {"hello": "world"}})
        ...     print(pp.range("greetings")[0].body)
        {'hello': 'world'}
    """

    def __init__(self, address: Any, authkey: bytes, *, process: Optional[subprocess.Popen] = None,
                 location: Optional[str] = None, busy_poll: float = BUSY_POLL,
                 backend: Optional[Ops] = None) -> None:
        #: the Redis transport (``connect(redis=...)``), or None: a node over a socket
        self._backend = backend
        self._leases = _rclient.Leases(backend) if backend is not None else None
        self._address = address
        self._authkey = authkey
        self._process = process
        self._location = location
        self._idle: List[Channel] = []
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._closed = False
        self._conns: set[Channel] = set()
        self._max_frame: Optional[int] = None
        self._busy_poll = busy_poll
        _CLIENTS.add(self)

    # ------------------------------------------------------------------ connection

    @property
    def namespace(self) -> Optional[str]:
        """The Redis namespace of a client opened with ``redis=`` (``None`` for a node)."""
        return None if self._backend is None else self._backend.namespace

    def _connect(self, timeout: float = HANDSHAKE_TIMEOUT) -> Any:
        if self._backend is not None:  # a live proc's channel: a Redis connection of its own
            if self._closed:
                raise NoActiveNode("this client is closed")
            assert self._leases is not None
            self._leases.start()
            return _rclient.Channel(self._backend)
        c = open_connection(self._address, self._authkey, timeout, self._busy_poll)
        with self._lock:
            self._conns.add(c)
        return c

    def _acquire(self, timeout: float = HANDSHAKE_TIMEOUT) -> Channel:
        if self._closed:
            raise NoActiveNode("this client is closed")
        try:
            return self._idle.pop()
        except IndexError:
            return self._connect(timeout)

    def _forked(self) -> None:
        """In a child after ``os.fork()``: the inherited connections are the parent's. Close
        our copies of their descriptors (never shut them down: that would cut the parent
        off) and open connections of our own on the next call. The child is not the
        spawner: leaving a ``with`` block there disconnects and leaves the node running."""
        conns, self._conns, self._idle = self._conns, set(), []
        self._lock = threading.Lock()
        self._process = None
        if self._backend is not None:  # the pool's sockets are the parent's: a new one
            b = self._backend
            self._backend = b.reopen()
            self._leases = _rclient.Leases(self._backend)
        for c in conns:
            try:
                c.sock.close()
            except OSError:
                pass

    def _release(self, c: Any) -> None:
        if self._closed or len(self._idle) >= 8:
            self._drop(c)
        else:
            self._idle.append(c)

    def _drop(self, c: Any) -> None:
        with self._lock:
            self._conns.discard(c)
        try:
            c.close()
        except OSError:
            pass

    def _frame_limit(self) -> int:
        if self._backend is not None:
            return 1 << 62  # Redis' own limit applies (proto-max-bulk-len)
        if self._max_frame is None:
            self._max_frame = int(self._call("limits")["max_frame_size"])
        return self._max_frame

    def _call(self, op: Optional[str], *args: Any) -> Any:
        if self._backend is not None:
            if self._closed:
                raise NoActiveNode("this client is closed")
            try:
                return self._backend.handle(op or "", args)
            except PipeProcError:
                if self._closed:  # closed meanwhile, by another thread
                    raise NoActiveNode("this client is closed") from None
                raise
        rid = next(self._rids)
        data = pack([rid, op, *args])
        if len(data) > MIN_FRAME:
            _check_request_size(len(data), self._frame_limit())
        c = self._acquire()
        try:
            c.send_bytes(data)
            reply = decode(c.recv_bytes(REPLY_LIMIT))
        except (OSError, EOFError) as exc:
            self._drop(c)
            if self._closed:
                raise NoActiveNode("this client is closed") from None
            raise ConnectionLost(f"the node went away during {op}: {exc}") from None
        except BaseException:
            self._drop(c)  # interrupted mid-call: the connection is out of step
            raise
        if reply[0] != rid:
            self._mismatch(c, rid, reply)
        self._release(c)
        if reply[1] == ERR:
            code, message = reply[2]
            raise from_code(code, message)
        return reply[2]

    def _mismatch(self, c: Any, rid: int, reply: Any) -> None:
        """A reply that is not to our request is never returned: the connection is out of
        step (or shared with another process), so it is dropped."""
        self._drop(c)
        if reply[0] is None and reply[1] == ERR:  # the node refused the request itself
            code, message = reply[2]
            raise from_code(code, message)
        raise ConnectionLost(
            f"a reply to another request (id {reply[0]!r}, not {rid}) came on this client's "
            "connection; it was closed (is a connection shared across a fork?)")

    def _call_within(self, timeout: float, op: Optional[str], *args: Any) -> Any:
        """:meth:`_call` bounded by ``timeout`` seconds, for a node that may not answer
        (stopped, overloaded): connect, send and reply all count.

        Raises:
            Timeout: no reply in time (the connection is dropped: it is out of step).
        """
        if self._backend is not None:  # the backend's waits end by themselves
            return self._call(op, *args)
        rid = next(self._rids)
        data = pack([rid, op, *args])
        deadline = time.monotonic() + timeout
        c = self._acquire(max(0.001, min(timeout, HANDSHAKE_TIMEOUT)))
        try:
            c.sock.settimeout(max(0.001, deadline - time.monotonic()))
            c.send_bytes(data)
            reply = decode(c.recv_bytes(REPLY_LIMIT))
            c.sock.settimeout(None)
        except socket.timeout:
            self._drop(c)
            raise Timeout(f"the node did not answer {op} within {timeout} s") from None
        except (OSError, EOFError) as exc:
            self._drop(c)
            if self._closed:
                raise NoActiveNode("this client is closed") from None
            raise ConnectionLost(f"the node went away during {op}: {exc}") from None
        except BaseException:
            self._drop(c)
            raise
        if reply[0] != rid:
            self._mismatch(c, rid, reply)
        self._release(c)
        if reply[1] == ERR:
            code, message = reply[2]
            raise from_code(code, message)
        return reply[2]

    def _run(self, call: Call[T]) -> T:
        """Send a built request (:mod:`pipeproc._calls`) and shape its reply."""
        if call.op is None:
            return call.shape(None)
        if call.within is not None:
            return call.shape(self._call_within(call.within + WAIT_SLACK, call.op, *call.args))
        return call.shape(self._call(call.op, *call.args))

    @documented
    def close(self) -> None:
        self._closed = True  # first: a call in flight then ends with no_active_node
        if self._backend is not None:
            if self._leases is not None:
                self._leases.stop.set()
            self._backend.close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
            self._idle.clear()
        for c in conns:
            try:
                c.close()
            except OSError:
                pass

    @documented
    def shutdown(self, timeout: float = 30.0) -> None:
        if self._backend is not None:  # the local supervisor and its workers; data stays
            proc, self._process = self._process, None
            if proc is not None:
                _rclient.stop_supervisor(proc, timeout)
            self.close()
            return
        deadline = time.monotonic() + timeout
        if not self._closed:
            try:
                self._call_within(timeout, "shutdown")
            except PipeProcError:
                pass
        self.close()
        proc = self._process
        if proc is not None:
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
            self._process = None

    def __enter__(self) -> "PipeProc":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None:
            self.shutdown()
        else:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected"
        if self._backend is not None:
            return (f"<PipeProc {state} to Redis {self._backend.safe_url} namespace "
                    f"{self.namespace!r}>")
        return f"<PipeProc {state} to {self._address!r}>"

    # ------------------------------------------------------------------ commit and read

    @documented
    def commit(self, logs: Union[dict, Sequence[dict]]) -> Union[str, List[str]]:
        return self._run(_calls.commit(logs))

    def _pages(self, call: Optional[Call[Any]]) -> Iterator[List[Log]]:
        while call is not None:
            logs, call = self._run(call)
            yield logs

    @documented
    def range(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
              limit: Optional[int] = None, exclusive: bool = False) -> List[Log]:
        call = _calls.range_pages(topic, start, end, limit, exclusive, False, RANGE_PAGE)
        return [log for page in self._pages(call) for log in page]

    @documented
    def revrange(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
                 limit: Optional[int] = None, exclusive: bool = False) -> List[Log]:
        call = _calls.range_pages(topic, start, end, limit, exclusive, True, RANGE_PAGE)
        return [log for page in self._pages(call) for log in page]

    @documented
    def iter_range(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
                   limit: Optional[int] = None, exclusive: bool = False, *,
                   page_size: int = DEFAULT_PAGE, reverse: bool = False) -> Iterator[Log]:
        page_size = _calls._check_page_size(page_size)
        call = _calls.range_pages(topic, start, end, limit, exclusive, bool(reverse), page_size)
        for page in self._pages(call):
            yield from page

    @documented
    def length(self, topic: str) -> int:
        return self._run(_calls.length(topic))

    @documented
    def topics(self) -> List[str]:
        return self._run(_calls.topics())

    @documented
    def stats(self) -> Dict[str, Any]:
        return self._run(_calls.stats())

    # ------------------------------------------------------------------ procs

    @documented
    def proc(self, topic: str, *, name: str, offset: str = ">", count: int = 1,
             max_reclaims: int = 10, reclaim_timeout: Optional[float] = 10.0,
             on_max_reclaims_reached: str = "disable") -> Claimed:
        return self._run(_calls.proc(topic, name, offset, count, max_reclaims,
                                     reclaim_timeout, on_max_reclaims_reached))

    @documented
    def ack(self, name: str, *, claimed: Any = None) -> str:
        return self._run(_calls.ack(name, claimed))

    @documented
    def ack_commit(self, name: str, log_or_logs: Union[dict, Sequence[dict]], *,
                   claimed: Any = None) -> AckCommit:
        return self._run(_calls.ack_commit(name, log_or_logs, claimed))

    @documented
    def reclaim(self, name: str, *, claimed: Any = None) -> str:
        return self._run(_calls.reclaim(name, claimed))

    @documented
    def inspect_proc(self, name: str) -> ProcState:
        return self._run(_calls.proc_state("inspect", name))

    @documented
    def disable_proc(self, name: str) -> ProcState:
        return self._run(_calls.proc_state("disable", name))

    @documented
    def resume_proc(self, name: str) -> ProcState:
        return self._run(_calls.proc_state("resume", name))

    @documented
    def destroy_proc(self, name: str) -> ProcState:
        return self._run(_calls.proc_state("destroy", name))

    @documented
    def wait_for_procs(self, names: Optional[Sequence[str]] = None,
                       timeout: Optional[float] = None) -> None:
        self._run(_calls.wait_for_procs(names, timeout))

    @documented
    def available_proc(self, specs: Sequence[dict]) -> Optional[Tuple[str, Any]]:
        return self._run(_calls.available_proc(specs))

    # ------------------------------------------------------------------ system and live procs

    @documented
    def system_proc(self, *, name: str, from_: Union[str, Sequence[str]], processor: Any,
                    to: Union[str, Sequence[str], None] = None, offset: str = ">", count: int = 1,
                    max_reclaims: int = 10, reclaim_timeout: Optional[float] = 10.0,
                    on_max_reclaims_reached: str = "disable",
                    backoff: Tuple[float, float] = DEFAULT_BACKOFF,
                    ) -> Union[ProcState, List[ProcState]]:
        return self._run(_calls.system_proc(
            name, from_, processor, to, offset, count, max_reclaims, reclaim_timeout,
            on_max_reclaims_reached, backoff))

    @documented
    def live_proc(self, topic: str, *, mode: str = "live", count: int = 1) -> LiveProc:
        return LiveProc(self, topic, mode=mode, count=count)


# ------------------------------------------------------------------ spawn and connect

def spawn(location: Any = None, *, memory: bool = False, workers: int = 1,
          worker_concurrency: int = 1, worker_restart_after: int = 0, gc: Any = False,
          durability: str = "full", address: Any = None, authkey: Optional[bytes] = None,
          max_map_size: Optional[int] = None, max_frame_size: Optional[int] = None,
          log_level: Optional[str] = None, timeout: float = 60.0,
          busy_poll: float = BUSY_POLL, redis: Optional[str] = None,
          namespace: Optional[str] = None, allow: Optional[Sequence[str]] = None,
          redis_options: Optional[Dict[str, Any]] = None) -> PipeProc:
    if redis is not None or namespace is not None or allow is not None or redis_options is not None:
        ns = _rclient.check_redis_args(redis, namespace, location=location, memory=memory,
                                       address=address, authkey=authkey)
        assert redis is not None
        backend, proc = _rclient.start_local(
            redis, ns, workers=workers, worker_concurrency=worker_concurrency,
            worker_restart_after=worker_restart_after, gc=gc, durability=durability,
            allow=None if allow is None else list(allow), redis_options=redis_options,
            log_level=log_level, timeout=timeout)
        return PipeProc(backend.safe_url, b"", process=proc, backend=backend)
    cfg = _spawn.node_cfg(
        location, memory=memory, workers=workers, worker_concurrency=worker_concurrency,
        worker_restart_after=worker_restart_after, gc=gc, durability=durability,
        address=address, authkey=authkey, max_map_size=max_map_size,
        max_frame_size=max_frame_size, log_level=log_level, busy_poll=busy_poll)
    node = _spawn.start_node(cfg, timeout)
    pp = PipeProc(node.address, node.authkey, process=node.process, location=node.location,
                  busy_poll=float(busy_poll))
    try:
        pp._release(pp._connect())
    except BaseException:
        _spawn.kill_node(node.process)
        raise
    return pp


spawn.__doc__ = f"""Start a node process and return a client connected to it.

{_docs.SPAWN_ARGS}
    Returns:
        A connected :class:`PipeProc`; ``shutdown()`` stops the node.

    Raises:
        NodeAlreadyActive: a running node owns the location or address.
        NoActiveNode: the node did not become ready within ``timeout``.
        InvalidArgument: a bad argument (before anything is started).
    """


def connect(location: Any = None, *, address: Any = None, authkey: Optional[bytes] = None,
            timeout: float = 5.0, busy_poll: float = BUSY_POLL, redis: Optional[str] = None,
            namespace: Optional[str] = None, redis_options: Optional[Dict[str, Any]] = None,
            durability: str = "full") -> PipeProc:
    if redis is not None or namespace is not None or redis_options is not None:
        ns = _rclient.check_redis_args(redis, namespace, location=location, address=address,
                                       authkey=authkey)
        assert redis is not None
        backend = _rclient.open_backend(redis, ns, redis_options, durability, timeout)
        return PipeProc(backend.safe_url, b"", backend=backend)
    if durability != "full":
        raise InvalidArgument("connect(durability=...) is for redis=: a node's durability "
                              "is chosen by its spawn")
    spin = _spawn.check_busy_poll(busy_poll)
    retry = _spawn.Retry(location, address, timeout)
    while True:
        try:
            addr, key = _spawn.resolve_node(retry.loc, retry.address, authkey)
            pp = PipeProc(addr, key, location=retry.loc, busy_poll=spin)
            c = open_connection(addr, key, retry.attempt_timeout(), spin)
            with pp._lock:
                pp._conns.add(c)
            pp._release(c)
            return pp
        except NoActiveNode as exc:
            delay = retry.failed(exc)
        time.sleep(delay)


connect.__doc__ = f"""Connect to a running node, by its location or by ``address`` and ``authkey``.

    Retries until ``timeout`` seconds have passed while a node may be starting; never hangs.
    A location that exists but where no node runs or starts (nothing holds its lock) fails
    at once.

{_docs.CONNECT_ARGS}
    Returns:
        A connected :class:`PipeProc`.

    Raises:
        NoActiveNode: no node answered within ``timeout``, or none runs at ``location``.
        AuthFailed: the node refused the key.
    """
