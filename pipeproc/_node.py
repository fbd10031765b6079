"""The node process: listener, connections, the writer role, notifications, timers.

Started by :func:`pipeproc.spawn` as ``python -m pipeproc._node`` (a fresh interpreter: the
store is never inherited through ``fork`` and the application's main module is never
re-executed). Its configuration arrives on stdin; stdin then stays open as a lifeline:
EOF means the spawning process is gone, and the node shuts down.

Threads:

* one accept thread, and a short-lived thread per new connection for the authkey handshake
  (bounded by HANDSHAKE_TIMEOUT);
* the **I/O loop** thread (``IOLoop``, epoll): reads every authenticated connection,
  decodes requests, serves reads inline (each in its own read transaction) and queues
  writes; at the end of each pass it starts one write round for all of them;
* the **writer role**: one write transaction at a time, taken by a lock. Under
  ``durability="fast"`` the I/O loop runs the round itself (no thread hand-off); under
  ``"full"`` the dedicated writer thread does, so the loop keeps reading during an fsync,
  and requests arriving meanwhile are committed together by the next round in one
  transaction and one fsync (group commit). Timer callbacks that write commit inline when
  the writer is idle;
* a flush thread per connection only while it has a backlog of unsent replies;
* a timer thread (reclaim timeouts, wait timeouts, GC ticks, the parent watch);
* the worker supervisor (``_supervisor``), when ``workers > 0``.

Waiting consumers (workers, live procs, ``wait_for_procs``) park their request here; after
every commit the writer wakes those whose topics or procs it touched. Nothing polls.
"""

from __future__ import annotations

import errno
import heapq
import math
import itertools
import logging
import os
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import (
    AuthenticationError,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from typing import Any, Callable, Dict, List, Optional

import lmdb
import msgpack

from . import _ids, _private, _procs
from ._protocol import (
    BUSY_POLL,
    MAX_FRAME,
    RECV_BUFFER,
    array_header,
    decode,
    err_reply,
    ok_reply,
    ok_reply_raw,
    page,
)
from ._store import DAMAGE_ERRORS, PAGE_MAX_LOGS, Store, damaged
from .errors import (
    InternalError,
    InvalidAck,
    InvalidArgument,
    InvalidLogFormat,
    InvalidTopic,
    PipeProcError,
    StorageFull,
    StoreCorrupted,
)

log = logging.getLogger("pipeproc.node")

_HEADER = struct.Struct("!i")
_DONTWAIT = socket.MSG_DONTWAIT
# Per thread: ``loop`` (the I/O loop: its writes wait for the end of its pass, see
# Writer.kick) and ``conn`` (the connection being served: the group commit window counts
# the connections that write back to back).
_tls = threading.local()
MAX_BACKLOG = 256 * 1024 * 1024
LIVE_PREFIX = "liveproc-"
#: In the location: written once its store exists (a missing store is then damage).
STORE_MARKER = "store.created"
MAX_TIMEOUT = 10 * 365 * 24 * 3600.0  # seconds; beyond: use -1 (never)
# back-off of a system proc between deliveries of a claim after a failure: (first delay,
# cap) in seconds, the delay doubling with each failure in a row (system_proc(backoff=...))
DEFAULT_BACKOFF = (0.1, 30.0)
# A GC pass runs in steps of at most this much work per write round.
GC_DELETES_PER_ROUND = 20_000
GC_SECONDS_PER_ROUND = 0.005
# Group commit window: at most this long, and this fraction of the last commit's duration.
GATHER_MAX = 0.0005
GATHER_FRACTION = 0.5
# Rounds a thread that committed inline serves for requests queued meanwhile.
INLINE_ROUNDS = 4
# Under durability "full" the I/O loop commits inline only when a single connection has
# been talking to the node for at least this long (and 4 commit durations).
SOLO_WINDOW = 0.002


HANDSHAKE_TIMEOUT = 10.0  # seconds a peer has to complete the authkey handshake
_HANDSHAKE_TV = struct.pack("ll", int(HANDSHAKE_TIMEOUT), 0)
_NO_TV = struct.pack("ll", 0, 0)
# Seconds an authenticated peer may stall in the middle of a request (no byte of it
# arriving) before it is disconnected; ``PIPEPROC_STALL_TIMEOUT`` overrides it (tests).
STALL_TIMEOUT = 30.0


def _stall_timeout() -> float:
    try:
        value = float(os.environ.get("PIPEPROC_STALL_TIMEOUT", STALL_TIMEOUT))
    except ValueError:
        value = STALL_TIMEOUT
    return value if value > 0 and math.isfinite(value) else STALL_TIMEOUT


def _unread(sock: Optional[socket.socket]) -> int:
    """Bytes received on ``sock`` and not read yet (0 when unknown)."""
    try:
        import fcntl
        import termios
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,  # type: ignore[union-attr]
                                              b"\0\0\0\0"))[0]
    except (OSError, ValueError, AttributeError):
        return 0


def _peer(sock: socket.socket) -> str:
    """Who is at the other end: ``host:port`` over TCP, ``pid/uid`` over a Unix socket."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            return f"pid {pid} (uid {uid})"
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "an unknown peer"


class Malformed(Exception):
    """A request that does not follow the protocol: its sender loses the connection."""


def _int(v: Any, name: str, lo: Optional[int] = None) -> int:
    if type(v) is not int or (lo is not None and v < lo):
        raise Malformed(f"{name} must be an int")
    return v


# The first byte of a body: a map, an array or bin (SPEC: a dict, a list or bytes).
_BODY_HEADS = frozenset(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF, 0xC4, 0xC5, 0xC6}
# Stored records are read back inside a few levels of envelope (record, page, reply):
# a body is checked inside as many, so that it can always be decoded again.
_HEADROOM = b"\x91" * 8
# A body shorter than this cannot nest close to msgpack's depth limit (1024): one byte a level.
_DEEP = 1000


def _valid_body(b: Any) -> bytes:
    """A body must be the bytes of exactly one msgpack map, array or bin, decodable inside
    a reply (checked, never kept decoded)."""
    if type(b) is not bytes:
        raise InvalidLogFormat("a log body must arrive msgpack-encoded")
    if not b or b[0] not in _BODY_HEADS:
        raise InvalidLogFormat("a log body must be a dict, a list or bytes")
    try:  # a short body cannot nest deep enough to need the headroom
        msgpack.unpackb(b if len(b) < _DEEP else _HEADROOM + b, strict_map_key=False)
    except Exception:
        raise InvalidLogFormat("a log body is not one valid msgpack object "
                               "(or is nested too deeply)") from None
    return b


def _items(raw: Any) -> List[tuple]:
    """``[[topic, body], ...]`` checked: topic names, and every body as in
    :func:`_valid_body`, the whole batch in one pass of a msgpack ``Unpacker``."""
    if type(raw) is not list:
        raise Malformed("logs must be a list")
    if len(raw) == 1:  # the common single log: the plain check is cheaper
        it = raw[0]
        if type(it) is not list or len(it) != 2:
            raise Malformed("a log must be [topic, body]")
        return [(_ids.check_topic(it[0]), _valid_body(it[1]))]
    items = []
    last = None
    unpacker = msgpack.Unpacker(strict_map_key=False, max_buffer_size=0)
    for it in raw:
        if type(it) is not list or len(it) != 2:
            raise Malformed("a log must be [topic, body]")
        topic, body = it
        if topic != last or last is None:  # batches mostly repeat a topic: check it once
            last = _ids.check_topic(topic)
        if type(body) is not bytes:
            raise InvalidLogFormat("a log body must arrive msgpack-encoded")
        if not body or body[0] not in _BODY_HEADS:
            raise InvalidLogFormat("a log body must be a dict, a list or bytes")
        if len(body) >= _DEEP:  # only a body this long can nest deep enough to matter
            _valid_body(body)
        unpacker.feed(body)
        items.append((last, body))
    end = 0
    try:
        for _, body in items:  # each body is exactly one object: skip it, land on its end
            unpacker.skip()
            end += len(body)
            if unpacker.tell() != end:
                raise ValueError("misaligned")
    except Exception:
        raise InvalidLogFormat("a log body is not one valid msgpack object") from None
    return items


def _bound(v: Any) -> Optional[_ids.Bound]:
    return None if v is None else _ids.parse_bound(v)


def _wait_timeout(v: Any) -> Optional[float]:
    """A wait's timeout: ``None`` or a finite number of seconds >= 0."""
    if v is None:
        return None
    if type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v <= MAX_TIMEOUT:
        raise InvalidArgument("timeout must be a finite number >= 0 or None")
    return float(v)


def _claimed(v: Any) -> Optional[list]:
    if v is None:
        return None
    if type(v) is not list or len(v) not in (6, 7) or any(type(x) is not int for x in v):
        raise InvalidArgument("claimed must identify a claim")
    return v


def _backoff(v: Any) -> List[float]:
    """A system proc's ``backoff``: ``[first, cap]`` seconds, ``0 <= first <= cap``."""
    if v is None:
        return list(DEFAULT_BACKOFF)
    if (type(v) is not list or len(v) != 2
            or any(type(x) not in (int, float) or not math.isfinite(x) for x in v)
            or not 0 <= v[0] <= v[1] <= MAX_TIMEOUT):
        raise InvalidArgument("backoff is (first delay, cap) in seconds, 0 <= first <= cap")
    return [float(v[0]), float(v[1])]


def _opts(max_reclaims: Any, reclaim_timeout: Any, on_max: Any) -> tuple:
    if type(max_reclaims) is not int or not (max_reclaims >= 1 or max_reclaims == -1):
        raise InvalidArgument("max_reclaims must be >= 1 or -1")
    if reclaim_timeout is None:
        reclaim_timeout = -1
    if (type(reclaim_timeout) not in (int, float) or not math.isfinite(reclaim_timeout)
            or not (0 < reclaim_timeout <= MAX_TIMEOUT or reclaim_timeout == -1)):
        raise InvalidArgument("reclaim_timeout must be > 0, -1 or None")
    if on_max not in ("disable", "continue"):
        raise InvalidArgument("on_max_reclaims_reached must be 'disable' or 'continue'")
    return max_reclaims, float(reclaim_timeout), on_max


# ------------------------------------------------------------------------- connections

class Conn:
    """One client connection: its read state (served by the I/O loop) and its reply path."""

    _ids = itertools.count(1)

    def __init__(self, node: "Node", c: Any) -> None:
        self.node = node
        self.c = c
        self.id = next(Conn._ids)
        self.sock: Optional[socket.socket] = None
        self.lock = threading.Lock()
        self.backlog: deque = deque()
        self.backlog_bytes = 0
        self.flusher: Optional[threading.Thread] = None
        self.closed = False
        self.finished = False
        self.dropped_bytes = 0  # unsent replies thrown away at close
        self.worker: Optional[dict] = None  # set by "hello_worker"
        self.claims: Dict[str, list] = {}   # worker claims: proc name -> claimed key
        self.live: set = set()              # hidden live procs owned by this connection
        self.recycled = False  # a worker the node killed (time limit): see conn_closed
        # read state, owned by the I/O loop: a buffer of frames [start, end), or a frame
        # larger than the buffer being filled (big, growing as its bytes arrive up to
        # big_need). The buffer is allocated when the loop takes the connection: a peer
        # that never authenticates costs none.
        self.buf = bytearray()
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.big: Optional[bytearray] = None
        self.big_need = 0
        # when bytes of an incomplete frame last arrived (0.0: no frame in progress); a
        # connection stalled mid-frame past the node's stall timeout is dropped
        self.progress = 0.0

    # -- replies (from any thread; never block the caller on a slow reader)

    def send(self, data: bytes) -> None:
        frame = _HEADER.pack(len(data)) + data
        with self.lock:
            if self.closed:
                return
            if self.backlog:
                self._queue(frame)
                return
            try:
                n = self.sock.send(frame, socket.MSG_DONTWAIT)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._close_locked()
                return
            if n < len(frame):
                self._queue(frame[n:])

    def _queue(self, frame: bytes) -> None:
        self.backlog.append(frame)
        self.backlog_bytes += len(frame)
        if self.backlog_bytes > MAX_BACKLOG:
            log.warning("connection %d does not read its replies; closing it", self.id)
            self._close_locked()
            return
        if self.flusher is None:
            self.flusher = threading.Thread(target=self._flush, name=f"flush-{self.id}",
                                            daemon=True)
            self.flusher.start()

    def _flush(self) -> None:
        while True:
            with self.lock:
                if not self.backlog or self.closed:
                    self.flusher = None
                    return
                frame = self.backlog[0]
            try:
                self.sock.sendall(frame)  # type: ignore[union-attr]
            except OSError:
                with self.lock:
                    self._close_locked()
                    self.flusher = None
                return
            with self.lock:
                if self.closed:  # the backlog was thrown away meanwhile
                    self.flusher = None
                    return
                self.backlog.popleft()
                self.backlog_bytes -= len(frame)

    def _close_locked(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.dropped_bytes = self.backlog_bytes
        self.backlog.clear()
        self.backlog_bytes = 0
        try:
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        with self.lock:
            self._close_locked()

    # -- authentication (its own short-lived thread), then the I/O loop serves it

    def handshake(self) -> None:
        """Authenticate the peer (bounded by HANDSHAKE_TIMEOUT), then hand the connection
        to the node's I/O loop; a refused peer is closed here."""
        node = self.node
        c = self.c
        try:
            self.sock = socket.socket(fileno=os.dup(c.fileno()))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _HANDSHAKE_TV)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _HANDSHAKE_TV)
            deliver_challenge(c, node.authkey)
            answer_challenge(c, node.authkey)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TV)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TV)
        except (AuthenticationError, OSError, EOFError, ValueError) as exc:
            if self.sock is not None:
                log.warning("refused a connection from %s: authentication failed (%s)",
                            _peer(self.sock), exc)
            self.finish()
            return
        except BaseException:
            self.finish()
            raise
        node.io.add(self)

    def finish(self) -> None:
        """Release the connection's sockets and its node state (once, at the end)."""
        if self.finished:
            return
        self.finished = True
        self.close()
        try:
            self.c.close()
        except OSError:
            pass
        if self.sock is not None:
            self.sock.close()
        self.node.conn_closed(self)
        if self.dropped_bytes > TRIM_AFTER:
            _give_back_memory()

    def reply(self, rid: int, result: Any) -> None:
        self.send(ok_reply(rid, result))

    def fail(self, rid: int, exc: PipeProcError) -> None:
        self.send(err_reply(rid, exc.code, exc.message))



def _give_back_memory() -> None:
    """Return freed memory to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Dropping a client that never read its replies frees up to MAX_BACKLOG at once; glibc
    keeps such memory in the arena of the thread that allocated it (the I/O loop) unless
    asked to give it back."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            import ctypes.util
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
TRIM_AFTER = 16 * 1024 * 1024  # bytes of dropped replies worth a malloc_trim


# ------------------------------------------------------------------------- the I/O loop

class IOLoop:
    """One thread reads every authenticated connection (epoll through ``selectors``).

    A pass reads what each ready socket has (one ``recv`` per socket), decodes the
    complete frames and runs their handlers: reads are answered at once; writes queue up
    in the writer, and the pass ends by starting one write round for all of them (group
    commit without any thread hand-off under ``durability="fast"``; the writer thread
    takes the round under ``"full"``, so an fsync never stalls the loop). A thread per
    connection costs a wake-up and a GIL hand-off per request; this does not.
    """

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._new: List[Conn] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.last_conn = 0      # the connection of the last request served
        self.switched = 0.0     # when the last request from another connection came
        self._thread = threading.Thread(target=self._run, name="io", daemon=True)
        self._thread.start()

    def add(self, conn: Conn) -> None:
        """Serve an authenticated connection (from its handshake thread)."""
        with self._lock:
            self._new.append(conn)
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the wake-up byte is already pending: the loop will look
            pass

    def _run(self) -> None:
        _tls.loop = True
        node = self.node
        select = self.sel.select
        writer = node.writer
        kick = writer.kick
        spin = BUSY_POLL
        spin_until = 0.0
        pass_end = 0.0
        while True:
            try:
                if spin_until:  # busy-poll for the lone client's next request first
                    events = select(0)
                    while not events and time.monotonic() < spin_until:
                        events = select(0)
                    spin_until = 0.0
                    if not events:
                        events = select()
                else:
                    events = select()
            except InterruptedError:  # pragma: no cover - retried by Python already
                continue
            except Exception:  # pragma: no cover - the selector itself failed: stop cleanly
                log.critical("the I/O loop failed; stopping the node", exc_info=True)
                threading.Thread(target=node.shutdown, daemon=True).start()
                return
            gap = time.monotonic() - pass_end  # from the end of the last pass
            for key, _ in events:
                conn = key.data
                try:
                    if conn is None:
                        self._accept_new()
                    else:
                        self._readable(conn)
                except Exception:  # pragma: no cover - a bug must not stop the loop
                    log.exception("the I/O loop failed on %s",
                                  "new connections" if conn is None else f"connection {conn.id}")
                    if conn is not None:
                        self._drop(conn)
            # solo: every request of the last few commit durations came from one
            # connection (see Writer.kick)
            solo = time.monotonic() - self.switched > max(SOLO_WINDOW, 4 * writer.commit_time)
            try:
                kick(solo)
            except Exception:  # pragma: no cover
                log.exception("the I/O loop failed to start a write round")
            pass_end = time.monotonic()
            if spin and solo and gap < 4 * spin:
                # one connection alone, talking back to back: its next request comes
                # sooner than a sleeping thread would wake up for it (see BUSY_POLL)
                spin_until = pass_end + spin

    def _accept_new(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            new, self._new = self._new, []
        for conn in new:
            conn.buf = bytearray(RECV_BUFFER)
            conn.view = memoryview(conn.buf)
            try:
                self.sel.register(conn.sock, selectors.EVENT_READ, conn)  # type: ignore[arg-type]
            except (KeyError, ValueError, OSError):
                conn.finish()

    def _drop(self, conn: Conn) -> None:
        try:
            self.sel.unregister(conn.sock)  # type: ignore[arg-type]
        except (KeyError, ValueError, OSError):
            pass
        conn.finish()

    def _readable(self, conn: Conn) -> None:
        """Read once from a ready connection and serve the complete frames it holds."""
        sock = conn.sock
        try:
            if conn.big is not None:  # a frame larger than the buffer, being filled
                # it grows by what arrives (through the connection's buffer), never by what
                # the peer announced: a peer that announces 60 MiB and stalls costs what
                # it sent
                k = sock.recv_into(conn.view, min(len(conn.buf), conn.big_need - len(conn.big)),  # type: ignore[union-attr]
                                   _DONTWAIT)
                if not k:
                    raise EOFError
                conn.big += conn.view[:k]
                if len(conn.big) < conn.big_need:
                    conn.progress = time.monotonic()
                    return
                frame, conn.big = conn.big, None
                conn.progress = 0.0
                if not self._serve(conn, frame):
                    self._drop(conn)
                return
            buf = conn.buf
            if conn.start == conn.end:
                conn.start = conn.end = 0
            elif conn.start > len(buf) >> 1 or conn.end == len(buf):
                # make room: move the partial frame to the front first
                n = conn.end - conn.start
                buf[:n] = buf[conn.start:conn.end]
                conn.start, conn.end = 0, n
            k = sock.recv_into(conn.view[conn.end:], 0, _DONTWAIT)  # type: ignore[union-attr]
            if not k:
                raise EOFError
        except (BlockingIOError, InterruptedError):
            return
        except (EOFError, OSError) as exc:
            if not isinstance(exc, EOFError) and not conn.closed:
                log.info("connection %d dropped: %s", conn.id, exc)
            self._drop(conn)
            return
        conn.end += k
        limit = self.node.max_frame
        view = conn.view
        while not conn.closed:
            avail = conn.end - conn.start
            if avail < 4:
                break
            (n,) = _HEADER.unpack_from(buf, conn.start)
            if n < 0 or n > limit:
                shown = "more than 2 GiB" if n < 0 else f"{n} bytes"
                msg = f"a frame of {shown} is above the limit of {limit} bytes"
                log.warning("connection %d refused: %s", conn.id, msg)
                conn.send(err_reply(None, "invalid_argument", f"request refused: {msg}"))
                self._drop(conn)
                return
            if 4 + n > len(buf):  # larger than the buffer: it gets its own
                conn.big = bytearray(buf[conn.start + 4:conn.end])
                conn.big_need = n
                conn.start = conn.end = 0
                conn.progress = time.monotonic()
                return  # not complete: avail <= len(buf) < 4 + n
            if avail < 4 + n:
                if conn.start + 4 + n > len(buf):  # the rest would not fit behind it
                    buf[:avail] = buf[conn.start:conn.end]
                    conn.start, conn.end = 0, avail
                break
            s = conn.start + 4
            conn.start = s + n
            if not self._serve(conn, view[s:s + n]):
                self._drop(conn)
                return
        if conn.closed:
            self._drop(conn)
            return
        conn.progress = time.monotonic() if conn.end > conn.start else 0.0

    def _serve(self, conn: Conn, data: Any) -> bool:
        """Decode and run one request; ``False``: it was malformed (drop the sender)."""
        rid = None
        try:
            req = decode(data)
            if type(req) is not list or len(req) < 2 or type(req[0]) is not int:
                raise Malformed("a request is [rid, op, *args]")
            rid = req[0]
            handler = self.node.ops.get(req[1]) if type(req[1]) is str else None
            if handler is None:
                raise Malformed(f"unknown op {req[1]!r}")
            if conn.id != self.last_conn:
                self.last_conn = conn.id
                self.switched = time.monotonic()
            _tls.conn = conn.id
            handler(conn, rid, *req[2:])
        except PipeProcError as exc:
            conn.send(err_reply(rid, exc.code, exc.message))
        except DAMAGE_ERRORS as exc:  # the store's fault, not the request's: keep the peer
            err = damaged(exc, self.node.store.path)
            conn.send(err_reply(rid, err.code, err.message))
        except Exception as exc:  # malformed: costs the sender its connection
            log.warning("connection %d sent a malformed request (%s: %.200s); "
                        "closing it", conn.id, type(exc).__name__, str(exc))
            return False
        return True


# ------------------------------------------------------------------------- timers

class Timers:
    """A heap of (when, callback) served by one thread that sleeps until the earliest."""

    def __init__(self) -> None:
        self._heap: list = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
        self._thread.start()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the timer thread at monotonic time ``when`` (finite)."""
        if not math.isfinite(when):
            raise ValueError("a timer needs a finite time")
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            if self._heap[0][2] is fn:
                self._cond.notify()

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(time.monotonic() + delay, fn)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(None if not self._heap else self._heap[0][0] - now)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # pragma: no cover - a timer must never kill the thread
                log.exception("timer callback failed")


# ------------------------------------------------------------------------- the writer

class Writer:
    """The writer role: one write transaction at a time, group commit of queued requests.

    ``submit(fn, done)``: ``fn(tx)`` runs inside a write transaction and returns a result or
    raises a ``PipeProcError`` having written nothing; ``done(ok, value)`` runs after the
    commit (durable), in the writer's thread.
    """

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.store = node.store
        self._lock = threading.Lock()
        self._queue: List[tuple] = []
        self._busy = False
        self._handoff = threading.Condition(self._lock)
        self._handed = False
        self._stopped = False
        # Group commit window (durable stores only): connections that wrote recently are
        # expected to write again; a round waits a little for them (see _take).
        self._durable = node.cfg.get("durability", "full") == "full" and not node.store.memory
        self._recent: Dict[int, float] = {}
        self._arrive = threading.Condition(self._lock)
        self._gathering = False
        self._expected = 0
        self.commit_time = 0.0  # duration of the last commit (seconds)
        self.rounds = 0    # write transactions committed
        self.requests = 0  # write requests they held
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def submit(self, fn: Callable, done: Callable) -> None:
        with self._lock:
            if not self._stopped:
                self._queue.append((fn, done))
                if self._durable:
                    conn = getattr(_tls, "conn", None)
                    if conn is not None:
                        self._recent[conn] = time.monotonic()
                if self._busy:
                    if self._gathering and len(self._queue) >= self._expected:
                        self._arrive.notify()  # the round is complete: start it now
                    return
                if getattr(_tls, "loop", False):
                    return  # the I/O loop starts the round at the end of its pass (kick)
                self._busy = True
                jobs = self._take()
            else:
                jobs = None
        if jobs is None:
            from .errors import NoActiveNode
            done(False, NoActiveNode("the node is shutting down"))
            return
        self._round(jobs)
        self._after_inline()

    def kick(self, solo: bool) -> None:
        """Start a round for what the I/O loop queued during its pass.

        Inline on a fast store (no thread hand-off). On a durable one, on the writer
        thread (the loop keeps reading during the fsync, and the writer may wait a little
        to gather more requests) — unless ``solo``: one connection alone has been talking
        to the node lately, so nobody waits behind the fsync and the hand-off would only
        add a thread wake-up to each of its calls."""
        with self._lock:
            if self._busy or not self._queue:
                return
            self._busy = True
            if self._durable and not self._stopped and not solo:
                self._handed = True
                self._handoff.notify()
                return
            jobs = self._take(gather=False)
        self._round(jobs)
        self._after_inline()

    def _after_inline(self) -> None:
        """After a round run inline: serve what queued meanwhile (a few rounds at most, then
        the writer thread takes over), or release the writer role."""
        for _ in range(INLINE_ROUNDS):
            with self._lock:
                if not self._queue:
                    self._busy = False
                    return
                if self._durable:
                    break
                jobs = self._take()
            self._round(jobs)
        with self._lock:
            if self._queue:
                self._handed = True
                self._handoff.notify()
            else:
                self._busy = False

    def _take(self, gather: bool = True) -> List[tuple]:
        """The queued jobs for the next round (lock held).

        On a durable store a commit costs an fsync whatever it holds, so before a round
        starts with fewer requests than connections that are writing back to back, it
        waits briefly (a fraction of the last commit's duration) for their next request:
        otherwise concurrent writers fall into alternating half-empty rounds. (Never on
        the I/O loop, ``gather=False``: it is the one that would read them.)
        """
        if gather and self._durable and self._recent:
            now = time.monotonic()
            window = max(0.002, 4 * self.commit_time)
            recent = self._recent
            for k in [k for k, t in recent.items() if now - t > window]:
                del recent[k]
            expected = self._expected = len(recent)
            if len(self._queue) < expected:
                deadline = now + min(GATHER_MAX, GATHER_FRACTION * self.commit_time)
                self._gathering = True
                try:
                    while len(self._queue) < expected and not self._stopped:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._arrive.wait(left)
                finally:
                    self._gathering = False
        jobs = self._queue
        self._queue = []
        return jobs

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._handed and not self._stopped:
                    self._handoff.wait()
                if self._stopped and not self._handed:
                    return
                self._handed = False
            while True:
                with self._lock:
                    if not self._queue:
                        self._busy = False
                        break
                    jobs = self._take()
                self._round(jobs)

    def stop(self) -> None:
        """Refuse new requests, finish the queued ones, stop the thread."""
        with self._lock:
            self._stopped = True
            self._handoff.notify()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                if not self._busy and not self._queue:
                    break
            time.sleep(0.002)
        self._thread.join(timeout=1)

    def idle(self) -> bool:
        with self._lock:
            return not self._busy and not self._queue

    def _round(self, jobs: List[tuple]) -> None:
        store = self.store
        recycled = False
        reserve = False  # grown into the GC's reserve for this round
        while True:
            tx = store.begin()
            results = []
            try:
                for fn, done in jobs:
                    try:
                        results.append((done, True, fn(tx)))
                    except PipeProcError as exc:
                        results.append((done, False, exc))
                t0 = time.monotonic()
                tx.commit()
                self.commit_time = time.monotonic() - t0
                self.rounds += 1
                self.requests += len(jobs)
            except lmdb.MapFullError:
                tx.abort()
                if store.grow():
                    continue
                if not recycled and store.recycle_pages():
                    recycled = True  # pages freed by the last commit are reusable now
                    continue
                gc = self.node._gc
                if not reserve and all(fn == gc for fn, _ in jobs) and store.grow(for_gc=True):
                    reserve = True  # a full store: the GC alone may use the reserve
                    log.warning("store full: the GC uses the map's reserve")
                    continue
                capped = store.max_map_size is not None and \
                    store.env.info()["map_size"] >= store.map_limit()
                self._one_by_one(jobs, StorageFull(
                    "the store reached its maximum map size" if capped
                    else "the disk of the store is full: the store cannot grow"))
                return
            except DAMAGE_ERRORS as exc:
                tx.abort()
                self._one_by_one(jobs, damaged(exc, store.path))
                return
            except Exception as exc:
                tx.abort()
                full = isinstance(exc, lmdb.Error) and (
                    "No space" in str(exc)
                    # LMDB turns a short write (a full disk) into EIO
                    or isinstance(exc, lmdb.DiskError) or "Input/output" in str(exc)
                ) and ("No space" in str(exc) or store.disk_full())
                if full and not reserve and all(fn == self.node._gc for fn, _ in jobs) \
                        and store.release_disk_reserve():
                    reserve = True  # a full disk: the GC alone may use the reserve file
                    continue
                if not full:
                    log.exception("a write request failed unexpectedly")
                err = (StorageFull(f"the disk of the store is full: {exc}") if full
                       else InternalError(f"{type(exc).__name__}: {exc}"))
                self._one_by_one(jobs, err)
                return
            break
        if reserve:
            store.leave_reserve()
        for done, ok, value in results:
            try:
                done(ok, value)
            except Exception:  # pragma: no cover
                log.exception("reply failed")
        try:
            self.node.after_commit(tx)
        except Exception:  # a notification bug must never wedge the writer role
            log.exception("post-commit notifications failed")

    def _one_by_one(self, jobs: List[tuple], err: PipeProcError) -> None:
        if len(jobs) == 1:
            try:
                jobs[0][1](False, err)
            except Exception:  # pragma: no cover
                log.exception("reply failed")
            return
        for job in jobs:  # isolate the culprit: every other request still goes through
            self._round([job])


# ------------------------------------------------------------------------- the node

class Node:
    """The node: owns the store and serves clients until shutdown."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.location: str = cfg["location"]
        self.authkey: bytes = cfg["authkey"]
        self.max_frame: int = cfg.get("max_frame_size") or MAX_FRAME
        self.store = Store(
            None if cfg["memory"] else os.path.join(self.location, "store"),
            memory=cfg["memory"], durability=cfg["durability"],
            max_map_size=cfg.get("max_map_size"),
            marker=None if cfg["memory"] else os.path.join(self.location, STORE_MARKER),
        )
        self.timers = Timers()
        self.writer = Writer(self)
        self.io = IOLoop(self)
        self.conns: Dict[int, Conn] = {}
        self.conns_lock = threading.Lock()
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.shutdown_replies: List[tuple] = []
        # parked waiters
        self.wlock = threading.Lock()
        # (conn id, rid) -> [conn, rid, names, the busy proc that holds it back]
        self.idle_waiters: Dict[tuple, list] = {}
        self.claim_waiters: Dict[tuple, tuple] = {}  # (conn id, rid) -> (conn, rid, interest, attempt)
        self.rr = 0
        # proc name -> the claim deadline (monotonic s) its one pending reclaim timer fires at
        self._armed: Dict[str, float] = {}
        self._armed_lock = threading.Lock()
        # proc name -> (identity of its pending claim, monotonic deadline): deadlines never
        # use the wall clock (a step back would freeze them); a claim found pending at
        # start gets now + reclaim_timeout
        self._mono: Dict[str, tuple] = {}
        self._mono_lock = threading.Lock()
        # system proc name -> monotonic time its back-off after a failure ends
        self._backoff: Dict[str, float] = {}
        # system proc name -> [outcome, tries]: a worker's outcome the store refused
        # (storage_full...), written again by the node after a back-off
        self._held: Dict[str, list] = {}
        self._store_fails = 0  # store failures in a row of claims for workers
        self._sys_cache: Optional[tuple] = None
        self._gc_pass: Optional[deque] = None
        self.supervisor: Any = None
        self.ops: Dict[str, Callable] = {
            "ping": Node.op_ping, "limits": Node.op_limits, "c1": Node.op_commit1, "c": Node.op_commit,
            "range": Node.op_range, "page": Node.op_page, "length": Node.op_length,
            "topics": Node.op_topics, "stats": Node.op_stats,
            "proc": Node.op_proc, "ack": Node.op_ack, "ackc": Node.op_ack_commit,
            "reclaim": Node.op_reclaim, "inspect": Node.op_inspect,
            "disable": Node.op_disable, "resume": Node.op_resume, "destroy": Node.op_destroy,
            "avail": Node.op_available, "wait_idle": Node.op_wait_idle,
            "live": Node.op_live, "create_live": Node.op_create_live,
            "sysproc": Node.op_sysproc, "hello_worker": Node.op_hello_worker,
            "work": Node.op_work, "shutdown": Node.op_shutdown,
        }
        self.ops = {k: (lambda f: (lambda conn, rid, *a: f(self, conn, rid, *a)))(f)
                    for k, f in self.ops.items()}
        for name in list(self.store.procs):
            self.arm_timeout(name)
        # hidden live procs belong to connections of an earlier life of the node: gone
        stale = {n for n, rec in self.store.procs.items() if _is_live(n, rec)}
        if stale:
            self.writer.submit(lambda tx: self._drop_live(tx, stale), lambda ok, v: None)
        # system proc claims were held by the workers of an earlier life: they are dead
        sys_names = self.sys_names()
        held = {n: rec["claimed"] for n, rec in self.store.procs.items()
                if n in sys_names and _procs.pending(rec)}
        if held:
            self.writer.submit(lambda tx: self._reclaim_dead(tx, held, None), lambda ok, v: None)
        gc = cfg.get("gc")
        if gc:
            self.gc_min_prune = float(gc["min_prune_time"])
            self.gc_interval = float(gc["interval"])
            self.timers.after(self.gc_interval, self.gc_tick)
        self.stall_timeout = _stall_timeout()
        self.timers.after(self._stall_check(), self._drop_stalled)

    # -- serving

    def bind(self) -> None:
        address = self.cfg["address"]
        if address is None:
            path = os.path.join(self.location, "node.sock")
            if len(path.encode()) > 100:
                import tempfile
                rundir = tempfile.mkdtemp(prefix="pipeproc-")
                self.rundir = rundir
                path = os.path.join(rundir, "node.sock")
            if os.path.exists(path):
                os.unlink(path)  # stale socket of a dead node: we hold the lock now
            self.listener = Listener(path, "AF_UNIX", backlog=512)
            self.address: Any = path
        else:
            self.listener = Listener(tuple(address), "AF_INET", backlog=512)
            self.address = list(self.listener.address)

    def serve(self) -> None:
        threading.Thread(target=self._accept, name="accept", daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                c = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            conn = Conn(self, c)
            with self.conns_lock:
                self.conns[conn.id] = conn
            threading.Thread(target=conn.handshake, name=f"auth-{conn.id}", daemon=True).start()

    def _stall_check(self) -> float:
        return min(max(self.stall_timeout / 4, 0.25), 5.0)

    def _drop_stalled(self) -> None:
        """Drop the connections stalled mid-request past ``stall_timeout`` (timer thread):
        a peer that announced a frame and stopped sending would hold it forever."""
        if self.stopping.is_set():
            return
        now = time.monotonic()
        with self.conns_lock:
            conns = list(self.conns.values())
        for conn in conns:
            since = conn.progress
            if since and now - since > self.stall_timeout and not conn.closed:
                if _unread(conn.sock):  # the peer did send: the I/O loop was busy, not it
                    continue
                log.warning("connection %d (%s) stalled in the middle of a request for more "
                            "than %g s; closing it", conn.id,
                            _peer(conn.sock) if conn.sock is not None else "?",
                            self.stall_timeout)
                conn.close()  # the I/O loop sees the end of the stream and drops it
        self.timers.after(self._stall_check(), self._drop_stalled)

    def conn_closed(self, conn: Conn) -> None:
        with self.conns_lock:
            self.conns.pop(conn.id, None)
        with self.wlock:
            for table in (self.idle_waiters, self.claim_waiters):
                for key in [k for k in table if k[0] == conn.id]:
                    del table[key]
        with conn.lock:
            claims = dict(conn.claims)
            conn.claims.clear()
            live = set(conn.live)
            conn.live.clear()
        if claims and not self.writer.stopped:
            if conn.recycled:  # killed for another claim's time limit: these are not at fault
                self.writer.submit(lambda tx: self._release(tx, claims), lambda ok, v: None)
            else:
                self.writer.submit(lambda tx: self._reclaim_dead(tx, claims, conn.worker),
                                   lambda ok, v: None)
        if live and not self.writer.stopped:
            self.writer.submit(lambda tx: self._drop_live(tx, live), lambda ok, v: None)

    def _reclaim_dead(self, tx: Any, claims: Dict[str, list], worker: Optional[dict]) -> None:
        """Reclaim (counted) the claims of a dead worker (``None``: of a node's earlier life)."""
        for name, key in claims.items():
            rec = tx.proc(name)
            if (rec is not None and _procs.pending(rec) and rec["claimed"] == key[:4]
                    and (len(key) < 7 or key[6] == rec.get("cnum"))):
                if worker is None:
                    msg = "the node stopped while a worker processed these logs"
                else:
                    msg = (f"worker {worker.get('slot')} (pid {worker.get('pid')}) died while "
                           "processing these logs")
                err = _procs.error_info("WorkerDied", msg, tx.now, rec["claimed"])
                new = _procs._reclaimed(rec, err)
                tx.put_proc(name, new)
                self._note(tx, "failed", name, new, err, worker is not None)

    def _release(self, tx: Any, claims: Dict[str, list]) -> None:
        """Drop claims without counting them: their holder was stopped for another reason."""
        for name, key in claims.items():
            rec = tx.proc(name)
            if (rec is not None and _procs.pending(rec) and rec["claimed"] == key[:4]
                    and (len(key) < 7 or key[6] == rec.get("cnum"))):
                tx.put_proc(name, _procs._reclaimed(rec, count=False))
                log.info("proc %r: claim %s of a recycled worker delivered again (not counted)",
                         name, _procs.range_str(rec["claimed"]))

    # -- failures of system procs: logs, last_error, back-off

    @staticmethod
    def _note(tx: Any, *note: Any) -> None:
        """Something to do once ``tx`` is committed (see :meth:`_after_notes`): a failure
        is logged and backed off, a worker recycled, only if its reclaim was written."""
        tx.__dict__.setdefault("sysfail_notes", []).append(note)
        if note[0] == "failed":  # not claimed again in the same write (its back-off)
            tx.__dict__.setdefault("sysfail_skip", set()).add(note[1])

    def _after_notes(self, tx: Any) -> None:
        for note in tx.__dict__.get("sysfail_notes", ()):
            if note[0] == "failed":
                self._failed(*note[1:])
            elif note[0] == "recycle":
                self._recycle_holder(*note[1:])

    def _failed(self, name: str, new: dict, err: dict, backoff: bool = True) -> None:
        """Say that ``name``'s consumer failed (``new``: the record after the counted
        reclaim) and, for a system proc, hold its next delivery back."""
        sysdef = self.sys_names().get(name)
        what = "system proc" if sysdef is not None else "proc"
        tb = err.get("traceback")
        detail = f"{err['type']}: {err['message']}"
        if new["status"] == "disabled":
            self._backoff.pop(name, None)
            log.error("%s %r failed on logs %s: %s\n%s %r is DISABLED: %d failure(s) in a row "
                      "reached max_reclaims=%d; its logs wait until resume_proc(%r)%s",
                      what, name, err["range"], detail, what, name, new["reclaims"],
                      new["max_reclaims"], name, ("\n" + tb.rstrip()) if tb else "")
            return
        delay = 0.0
        if sysdef is not None and backoff:
            first, cap = sysdef.get("backoff") or DEFAULT_BACKOFF
            delay = min(cap, first * 2.0 ** min(max(new["reclaims"], 1) - 1, 64))
        limit = "unlimited" if new["max_reclaims"] == -1 else str(new["max_reclaims"])
        log.warning("%s %r failed on logs %s (failure %d in a row, max_reclaims=%s): %s; "
                    "delivered again in %.1f s%s", what, name, err["range"], new["reclaims"],
                    limit, detail, delay,
                    ("\n" + tb.rstrip()) if tb and new["reclaims"] <= 1 else "")
        if tb and new["reclaims"] > 1:
            log.debug("traceback of %r's failure on %s:\n%s", name, err["range"], tb.rstrip())
        if delay > 0:
            until = time.monotonic() + delay
            self._backoff[name] = until
            self.timers.at(until, lambda: self._backoff_over(name, until))

    def _in_backoff(self, name: str) -> bool:
        until = self._backoff.get(name)
        return until is not None and time.monotonic() < until

    def _backoff_over(self, name: str, until: float) -> None:
        """A back-off ended: wake an idle worker for the proc (if nothing replaced it)."""
        if self._backoff.get(name) == until:
            self._backoff.pop(name, None)
        self._wake_sys(1)

    def _wake_sys(self, n: int) -> None:
        """Wake up to ``n`` idle workers (they look for a system proc claim again)."""
        woken = []
        with self.wlock:
            for key, w in list(self.claim_waiters.items()):
                if len(woken) >= n:
                    break
                if w[2] == "sys":
                    woken.append(w)
                    del self.claim_waiters[key]
        for w in woken:
            self.writer_retry(w)

    def _recycle_holder(self, name: str, claimed: list) -> None:
        """Kill the worker that holds ``name``'s claim ``claimed`` (it ran past its time
        limit); its supervisor restarts it, and its late outcome can never be written."""
        with self.conns_lock:
            conns = list(self.conns.values())
        holder = None
        for c in conns:
            if c.worker is None:
                continue
            with c.lock:
                key = c.claims.get(name)
                if key is not None and key[:4] == claimed:
                    del c.claims[name]
                    holder = c.worker
                    break
        if holder is None:
            return
        for c in conns:  # every loop (connection) of that worker process
            if c.worker is not None and c.worker["pid"] == holder["pid"]:
                with c.lock:
                    c.recycled = True
        if self.supervisor is not None:
            self.supervisor.recycle(holder["slot"], holder["pid"])

    def _drop_live(self, tx: Any, names: set) -> None:
        """Destroy live procs' hidden procs; a proc without the live flag is never touched."""
        for name in names:
            rec = tx.proc(name)
            if rec is not None and _is_live(name, rec):
                tx.put_proc(name, None)

    def sys_names(self) -> Dict[str, dict]:
        """proc name -> its system proc definition (cached until system procs change)."""
        cache = self._sys_cache
        if cache is None:
            out = {}
            for d in self.store.sysprocs.values():
                for pn in d["procs"]:
                    out[pn] = d
            cache = self._sys_cache = (out, sorted(out))
        return cache[0]

    def sys_sorted(self) -> List[str]:
        """The system procs' names, sorted (round robin order of the workers' claims)."""
        self.sys_names()
        return self._sys_cache[1]  # type: ignore[index]

    # -- notifications (called by the writer after every commit)

    def after_commit(self, tx: Any) -> None:
        if tx.sysprocs:
            self._sys_cache = None
        self._after_notes(tx)
        topics, procs = tx.touched_topics, tx.touched_procs
        if not topics and not procs:
            return
        for name in procs:
            self.arm_timeout(name)
        store = self.store
        if self.claim_waiters:
            sprocs = store.procs

            def touched(names: Any) -> bool:
                """A commit touched one of these procs, or the topic of one of them."""
                for n in names:
                    if n in procs:
                        return True
                    rec = sprocs.get(n)
                    if rec is not None and rec["topic"] in topics:
                        return True
                return False

            woken = []
            sys_budget = -1
            with self.wlock:
                for key, w in list(self.claim_waiters.items()):
                    interest = w[2]
                    if interest == "sys":
                        # Parked workers found no system proc to claim; only the system
                        # procs this commit touched can have become claimable, each by
                        # one worker: wake that many, not every idle worker.
                        if sys_budget < 0:
                            sys_budget = sum(
                                1 for n in self.sys_sorted()
                                if (rec := sprocs.get(n)) is not None
                                and (n in procs or rec["topic"] in topics)
                                and rec["status"] == "active" and not _procs.pending(rec))
                        hit = sys_budget > 0
                        if hit:
                            sys_budget -= 1
                    else:
                        hit = touched(interest)
                    if hit:
                        woken.append(w)
                        del self.claim_waiters[key]
            for w in woken:
                self.writer_retry(w)
        if procs and self.idle_waiters:
            done = []
            failed = []
            with store.reader() as r:
                with self.wlock:
                    for key, w in list(self.idle_waiters.items()):
                        # a proc it waits for died (disabled by max_reclaims with work left)
                        gone = _procs.first_dead(
                            r, [n for n in procs if w[2] is None or n in w[2]], store.procs)
                        if gone is not None:
                            failed.append((w[0], w[1], self._dead_error(gone)))
                            del self.idle_waiters[key]
                            continue
                        # a waiter re-scans only once the proc that held it back is done
                        if _procs.busy(r, store.procs.get(w[3])):
                            continue
                        w[3] = _procs.first_busy(r, w[2], store.procs)
                        if w[3] is None:
                            done.append((w[0], w[1]))
                            del self.idle_waiters[key]
            for conn, rid in done:
                conn.reply(rid, None)
            for conn, rid, exc in failed:
                conn.fail(rid, exc)

    def _dead_error(self, name: str) -> PipeProcError:
        """``proc_is_disabled`` for ``wait_for_procs`` over a dead stage."""
        from .errors import ProcIsDisabled
        rec = self.store.procs.get(name) or {}
        err = rec.get("last_error")
        last = (f"; last error on logs {err.get('range')}: {err.get('type')}: "
                f"{err.get('message')}" if err else "")
        return ProcIsDisabled(
            f"proc {name!r} was disabled after {rec.get('reclaims')} failed attempts in a row "
            f"(max_reclaims={rec.get('max_reclaims')}) with work left{last}. Fix the cause, "
            f"then resume_proc({name!r}) (pipeproc resume {name})")

    def writer_retry(self, w: tuple) -> None:
        self.writer.submit(w[3], w[4])

    def _queue_attempt(self, conn: Conn, rid: int, interest: Any, attempt: Callable) -> None:
        """Run ``attempt(tx)`` in the writer; ``None`` parks the request until a commit
        touches ``interest`` (a set of proc names, or ``"sys"``: any system proc)."""

        def done(ok: bool, value: Any) -> None:
            if not ok:
                conn.fail(rid, value)
            elif value is None:
                with self.wlock:
                    if not conn.closed:
                        self.claim_waiters[(conn.id, rid)] = (conn, rid, interest, attempt, done)
            else:
                conn.send(value)

        self.writer.submit(attempt, done)

    def arm_timeout(self, name: str) -> None:
        """Make sure a timer fires at the proc's claim deadline (after a commit touched it).

        One timer per proc at a time: a proc that claims again before its timer fires
        keeps that timer, which re-arms itself for the later deadline when it fires
        (deadlines only move later, except for a proc destroyed and created again with a
        shorter timeout, which gets its own earlier timer). A timer per claim would pile
        up reclaim_timeout x claim rate entries and wake the timer thread once per claim.
        """
        rec = self.store.procs.get(name)
        if rec is None:
            with self._mono_lock:
                self._mono.pop(name, None)
            return
        due = self._mono_due(name, rec)
        if due is None:
            return
        with self._armed_lock:
            armed = self._armed.get(name)
            if armed is not None and armed <= due:
                return  # that timer fires first and re-arms for this deadline
            self._armed[name] = due
        self._arm(name, due)

    def _mono_due(self, name: str, rec: dict) -> Optional[float]:
        """The monotonic deadline of ``rec``'s pending claim (``None``: it has none).

        A claim is told apart from the earlier ones by its record (claim time, range, ids
        digest, reclaims); the first time the node sees it, its deadline is now +
        reclaim_timeout (the claim was just committed, or the node just started)."""
        if _procs.deadline(rec) is None:
            with self._mono_lock:
                self._mono.pop(name, None)
            return None
        ident = (rec["tbase"], tuple(rec["claimed"]), rec.get("cdig"), rec["reclaims"],
                 rec["last_claimed_at"])
        with self._mono_lock:
            e = self._mono.get(name)
            if e is None or e[0] != ident:
                e = self._mono[name] = (ident, time.monotonic() + rec["reclaim_timeout"])
        return e[1]

    def _due(self, name: str, rec: dict) -> bool:
        """Whether ``rec``'s pending claim has timed out (monotonic clock)."""
        if name in self._held:
            return False  # the node writes its outcome again: not the consumer's delay
        due = self._mono_due(name, rec)
        return due is not None and time.monotonic() >= due

    def _expire_rec(self, tx: Any, name: str, rec: dict) -> dict:
        """Reclaim ``rec``'s pending claim when it timed out. For a system proc that is its
        processor's time limit: say so, keep it as last_error, recycle the worker."""
        if not self._due(name, rec):
            return rec
        if name not in self.sys_names():
            new = _procs.expire(tx, name, rec, lambda n, r: True)
            if new["status"] == "disabled":
                log.error("proc %r is DISABLED: its claim %s timed out and reclaims reached "
                          "max_reclaims=%d", name, _procs.range_str(rec["claimed"]),
                          new["max_reclaims"])
            return new
        err = _procs.error_info(
            "TimeLimitExceeded",
            f"the processor ran longer than reclaim_timeout={rec['reclaim_timeout']:g} s "
            "(a system proc's time limit); its worker was recycled", tx.now, rec["claimed"])
        new = _procs._reclaimed(rec, err)
        tx.put_proc(name, new)
        self._note(tx, "failed", name, new, err)
        self._note(tx, "recycle", name, rec["claimed"])
        return new

    def _arm(self, name: str, due: float) -> None:
        def fire() -> None:
            with self._armed_lock:
                if self._armed.get(name) != due:
                    return  # superseded by an earlier timer of this proc
                current = self.store.procs.get(name)
                now_due = None if current is None else self._mono_due(name, current)
                if now_due is not None and now_due > due:  # claimed again since: re-arm
                    self._armed[name] = now_due
                else:
                    del self._armed[name]
            if now_due is not None and now_due > due:
                self._arm(name, now_due)
            elif now_due is not None:
                self.writer.submit(lambda tx: self._expire(tx, name), lambda ok, v: None)
        self.timers.at(due + 0.001, fire)

    def _expire(self, tx: Any, name: str) -> None:
        rec = tx.proc(name)
        if (rec is not None and self._expire_rec(tx, name, rec) is rec
                and _procs.deadline(rec) is not None and name not in self._held):
            # not due yet (the timer ran early): the proc is unchanged, so no commit
            # re-arms its timer; arm it again here
            self.arm_timeout(name)

    # -- GC

    def gc_tick(self) -> None:
        if self.stopping.is_set():
            return
        self.store.keep_disk_reserve()  # given up to the GC on a full disk: back when room
        self._gc_pass = None  # a new pass over every topic
        self.writer.submit(self._gc, self._gc_step_done)

    def _gc_step_done(self, ok: bool, more: Any) -> None:
        # A pass is cut into write rounds of bounded work; the requests that queued up
        # meanwhile are served between them (a pass collecting millions of logs, or
        # visiting thousands of topics, never holds the writer for long).
        if ok and more and not self.stopping.is_set():
            self.writer.submit(self._gc, self._gc_step_done)
        else:
            self._gc_pass = None
            self.timers.after(self.gc_interval, self.gc_tick)

    def _gc(self, tx: Any) -> bool:
        """One bounded step of a GC pass; ``True`` when the pass has more to do."""
        if self._gc_pass is None:
            self._gc_pass = deque(self.store.topics)
        todo = self._gc_pass
        cutoff = tx.now - int(self.gc_min_prune * 1000)
        by_topic: Dict[str, list] = {}
        procs = dict(self.store.procs)
        procs.update(tx.procs)  # procs created or changed earlier in this write round
        for rec in procs.values():
            if rec is not None:
                by_topic.setdefault(rec["topic"], []).append(rec)
        budget = GC_DELETES_PER_ROUND
        deadline = time.monotonic() + GC_SECONDS_PER_ROUND
        deleted = 0
        while todo and budget > 0:
            name = todo[0]
            meta = tx.topic(name)
            if meta is not None and meta.first < meta.next:
                try:
                    upto = _procs.gc_upto(tx, name, meta, by_topic.get(name, []), cutoff)
                except StoreCorrupted as exc:  # the other topics are still collected
                    log.error("the GC skips topic %r this pass: %s", name, exc)
                    todo.popleft()
                    continue
                if upto > meta.first + budget:
                    upto = meta.first + budget  # the rest of this topic in the next step
                else:
                    todo.popleft()
                if upto > meta.first:
                    n = tx.delete_prefix(name, upto)
                    deleted += n
                    budget -= n
            else:
                todo.popleft()
            if time.monotonic() >= deadline:
                break
        if deleted:
            log.debug("gc removed %d logs", deleted)
        return bool(todo)

    # -- shutdown

    def shutdown(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("shutting down")
        try:
            self.listener.close()
        except OSError:
            pass
        with self.wlock:
            parked = list(self.claim_waiters.values())
            self.claim_waiters.clear()
        for w in parked:  # parked workers get "exit", live procs their None
            self.writer_retry(w)
        if self.supervisor is not None:
            self.supervisor.stop()
        self.stopped.set()

    # ------------------------------------------------------------------ ops: reads

    def op_ping(self, conn: Conn, rid: int, *args: Any) -> None:
        conn.reply(rid, list(args))

    def op_limits(self, conn: Conn, rid: int) -> None:
        conn.reply(rid, {"max_frame_size": self.max_frame})

    def op_length(self, conn: Conn, rid: int, topic: Any) -> None:
        _ids.check_topic(topic)
        with self.store.reader() as r:
            meta = r.topic(topic)
        if meta is None:
            raise InvalidTopic(f"topic {topic!r} does not exist")
        conn.reply(rid, meta.next)

    def op_topics(self, conn: Conn, rid: int) -> None:
        conn.reply(rid, sorted(self.store.topics))

    def op_range(self, conn: Conn, rid: int, topic: Any, start: Any, end: Any, limit: Any,
                 exclusive: Any, reverse: Any, page_size: Any) -> None:
        _ids.check_topic(topic)
        lower, upper = _bound(start), _bound(end)
        if reverse:
            lower, upper = upper, lower
        limit = _int(limit, "limit")
        page_size = _int(page_size, "page_size", 1)
        with self.store.reader() as r:
            meta = r.topic(topic)
            if meta is None:
                raise InvalidTopic(f"topic {topic!r} does not exist")
            lo, hi = r.resolve(meta, lower, upper, bool(exclusive))
            conn.send(ok_reply_raw(rid, self._page(r, meta, topic, lo, hi, limit,
                                                   bool(reverse), page_size)))

    def op_page(self, conn: Conn, rid: int, topic: Any, lo: Any, hi: Any, limit: Any,
                reverse: Any, page_size: Any) -> None:
        _ids.check_topic(topic)
        lo, hi, limit = _int(lo, "lo"), _int(hi, "hi"), _int(limit, "limit")
        page_size = _int(page_size, "page_size", 1)
        with self.store.reader() as r:
            meta = r.topic(topic)
            if meta is None:
                raise InvalidTopic(f"topic {topic!r} does not exist")
            conn.send(ok_reply_raw(rid, self._page(r, meta, topic, lo, hi, limit,
                                                   bool(reverse), page_size)))

    @staticmethod
    def _page(r: Any, meta: Any, topic: str, lo: int, hi: int, limit: int, reverse: bool,
              page_size: int) -> bytes:
        """One page of ``[lo, hi]`` and the continuation ``[topic, lo, hi, limit]`` or None.
        ``limit <= 0`` means no limit."""
        n = min(page_size, PAGE_MAX_LOGS)
        if limit > 0:
            n = min(n, limit)
        recs = r.records(meta, lo, hi, n, reverse)
        tail = None
        if recs:
            last = int.from_bytes(recs[-1][11:19], "big")
            left = limit - len(recs) if limit > 0 else 0
            if limit <= 0 or left > 0:
                if reverse and last - 1 >= max(lo, meta.first):
                    tail = [max(lo, meta.first), last - 1, left]
                elif not reverse and last + 1 <= hi:
                    tail = [last + 1, hi, left]
            if limit > 0 and left <= 0:
                tail = None
        return page(recs, tail)

    def op_inspect(self, conn: Conn, rid: int, name: Any) -> None:
        _ids.check_proc_name(name)
        rec = self.store.procs.get(name)
        if rec is None:
            from .errors import InvalidProc
            raise InvalidProc(f"proc {name!r} does not exist")
        conn.reply(rid, _procs.state(name, rec))

    def op_stats(self, conn: Conn, rid: int) -> None:
        store = self.store
        with store.reader() as r:
            topics = {name: {"length": m.next, "stored": m.next - m.first,
                             "created_at": m.created}
                      for name, m in store.topics.items()}
            procs = {}
            for name, rec in list(store.procs.items()):
                procs[name] = {
                    "topic": rec["topic"], "status": rec["status"],
                    "pending": _procs.range_str(rec["claimed"]) if _procs.pending(rec) else "",
                    "reclaims": rec["reclaims"], "lag": _procs.lag(r, rec),
                    "last_acked_range": _procs.range_str(rec["acked"]),
                    "last_error": rec.get("last_error"),
                    # a system proc held back after a failure (seconds left), and a worker's
                    # outcome the store refused that the node writes again (attempts so far)
                    "backoff_left": max(0.0, self._backoff.get(name, 0.0) - time.monotonic()),
                    "store_retries": (self._held.get(name) or (None, 0))[1],
                }
        info = store.env.info()
        stat = store.env.stat()
        node = {
            "pid": os.getpid(), "uptime": time.time() - self.started,
            "location": self.location, "memory": store.memory,
            "durability": self.cfg["durability"], "address": self.address,
            "connections": len(self.conns), "map_size": info["map_size"],
            "store_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "write_transactions": self.writer.rounds, "write_requests": self.writer.requests,
            "damaged_reads": store.damaged_reads,
        }
        workers = self.supervisor.stats() if self.supervisor is not None else []
        conn.reply(rid, {"node": node, "workers": workers, "topics": topics, "procs": procs,
                         "system_procs": {n: dict(d) for n, d in store.sysprocs.items()}})

    # ------------------------------------------------------------------ ops: writes

    def _write(self, conn: Conn, rid: int, fn: Callable) -> None:
        def done(ok: bool, value: Any) -> None:
            if ok:
                conn.reply(rid, value)
            else:
                conn.fail(rid, value)
        self.writer.submit(fn, done)

    def op_commit1(self, conn: Conn, rid: int, topic: Any, body: Any) -> None:
        if type(topic) is not str or topic not in self.store.topics:  # known names are valid
            _ids.check_topic(topic)
        item = [(topic, _valid_body(body))]

        def fn(tx: Any) -> list:
            return [tx.now, tx.append(item)[0]]
        self._write(conn, rid, fn)

    def op_commit(self, conn: Conn, rid: int, raw: Any) -> None:
        items = _items(raw)
        if not items:
            conn.reply(rid, [0, []])
            return

        def fn(tx: Any) -> list:
            return [tx.now, tx.append(items)]
        self._write(conn, rid, fn)

    def op_proc(self, conn: Conn, rid: int, topic: Any, name: Any, offset: Any, count: Any,
                max_reclaims: Any, reclaim_timeout: Any, on_max: Any) -> None:
        _ids.check_topic(topic)
        _ids.check_proc_name(name)
        _ids.parse_offset(offset)
        count = _count(count)
        opts = _opts(max_reclaims, reclaim_timeout, on_max)

        def fn(tx: Any) -> Any:
            recs = _procs.proc(tx, name, topic, offset, count, *opts, due=self._due)
            return None if recs is None else page(recs, tx.proc(name)["cnum"])
        self._write_claim(conn, rid, fn, name)

    def _write_claim(self, conn: Conn, rid: int, fn: Callable, name: Optional[str]) -> None:
        def done(ok: bool, value: Any) -> None:
            if not ok:
                conn.fail(rid, value)
            elif value is None:
                conn.reply(rid, None)
            else:
                conn.send(ok_reply_raw(rid, value))
        self.writer.submit(fn, done)

    def op_ack(self, conn: Conn, rid: int, name: Any, claimed: Any) -> None:
        _ids.check_proc_name(name)
        claimed = _claimed(claimed)
        self._write(conn, rid, lambda tx: _procs.ack(tx, name, claimed))

    def op_ack_commit(self, conn: Conn, rid: int, name: Any, raw: Any, claimed: Any) -> None:
        _ids.check_proc_name(name)
        items = _items(raw)
        claimed = _claimed(claimed)

        def fn(tx: Any) -> list:
            _procs.check_ack_commit(tx, name, claimed)
            acked = _procs.ack(tx, name, claimed)
            return [acked, tx.now, tx.append(items) if items else []]
        self._write(conn, rid, fn)

    def op_reclaim(self, conn: Conn, rid: int, name: Any, claimed: Any) -> None:
        _ids.check_proc_name(name)
        claimed = _claimed(claimed)

        def fn(tx: Any) -> str:
            out = _procs.reclaim(tx, name, claimed)
            new = tx.proc(name)
            if new["status"] == "disabled":
                log.error("proc %r is DISABLED: %d reclaims in a row reached max_reclaims=%d",
                          name, new["reclaims"], new["max_reclaims"])
            return out
        self._write(conn, rid, fn)

    def op_disable(self, conn: Conn, rid: int, name: Any) -> None:
        _ids.check_proc_name(name)
        self._write(conn, rid, lambda tx: _procs.disable(tx, name))

    def op_resume(self, conn: Conn, rid: int, name: Any) -> None:
        _ids.check_proc_name(name)
        self._write(conn, rid, lambda tx: _procs.resume(tx, name))

    def op_destroy(self, conn: Conn, rid: int, name: Any) -> None:
        _ids.check_proc_name(name)

        def fn(tx: Any) -> list:
            st = _procs.destroy(tx, name)
            self.destroy_sysproc_of(tx, name)
            return st
        self._write(conn, rid, fn)

    def destroy_sysproc_of(self, tx: Any, proc_name: str) -> None:
        """Destroying a system proc's proc removes the system proc (and its other procs)."""
        for sname, d in list(self.store.sysprocs.items()):
            if proc_name in d["procs"] and tx.sysproc(sname) is not None:
                tx.put_sysproc(sname, None)
                for other in d["procs"]:
                    if other != proc_name and tx.proc(other) is not None:
                        tx.put_proc(other, None)

    def op_available(self, conn: Conn, rid: int, specs: Any) -> None:
        if type(specs) is not list:
            raise InvalidArgument("available_proc takes a list of proc specs")
        parsed = []
        for s in specs:
            if type(s) is not list or len(s) != 7:
                raise Malformed("a proc spec is [topic, name, offset, count, max, timeout, policy]")
            topic, name, offset, count = s[:4]
            _ids.check_topic(topic)
            _ids.check_proc_name(name)
            _ids.parse_offset(offset)
            parsed.append((topic, name, offset, _count(count), _opts(*s[4:])))

        def fn(tx: Any) -> Any:
            created = []
            for topic, name, offset, count, opts in parsed:
                if tx.proc(name) is None:
                    created.append(name)
                    _procs.ensure(tx, name, topic, offset, *opts)
                elif tx.proc(name)["topic"] != topic:
                    _procs.ensure(tx, name, topic, offset, *opts)  # raises not-unique
            order = [p for p in parsed if p[1] in created]
            n = len(parsed)
            start = self.rr % n if n else 0
            order += [parsed[(start + i) % n] for i in range(n) if parsed[(start + i) % n][1]
                      not in created]
            for topic, name, offset, count, opts in order:
                if self._in_backoff(name) or name in tx.__dict__.get("sysfail_skip", ()):
                    continue  # a system proc held back after a failure
                rec = self._expire_rec(tx, name, tx.proc(name))
                recs = _procs.claim(tx, name, rec, count)
                if recs is not None:
                    self.rr = (parsed.index((topic, name, offset, count, opts)) + 1)
                    return [name, count > 1, page(recs, tx.proc(name)["cnum"])]
            return None

        def done(ok: bool, value: Any) -> None:
            if not ok:
                conn.fail(rid, value)
            elif value is None:
                conn.reply(rid, None)
            else:
                name, many, raw = value
                conn.send(b"\x93" + msgpack.packb(rid) + b"\x00\x93"
                          + msgpack.packb(name) + (b"\xc3" if many else b"\xc2") + raw)
        self.writer.submit(fn, done)

    # ------------------------------------------------------------------ ops: waits

    def op_wait_idle(self, conn: Conn, rid: int, names: Any, timeout: Any) -> None:
        if names is not None and (type(names) is not list
                                  or any(type(n) is not str for n in names)):
            raise InvalidArgument("names must be a list of proc names or None")
        timeout = _wait_timeout(timeout)
        key = (conn.id, rid)
        with self.store.reader() as r:
            gone = _procs.first_dead(r, names, self.store.procs)
            if gone is not None:
                raise self._dead_error(gone)
            with self.wlock:
                hold = _procs.first_busy(r, names, self.store.procs)
                if hold is None:
                    conn.reply(rid, None)
                    return
                self.idle_waiters[key] = [conn, rid, names, hold]
        if timeout is not None:
            def expire() -> None:
                with self.wlock:
                    w = self.idle_waiters.pop(key, None)
                if w is not None:
                    from .errors import Timeout
                    conn.fail(rid, Timeout(f"procs still busy after {timeout} s"))
            self.timers.after(float(timeout), expire)

    def op_live(self, conn: Conn, rid: int, topic: Any, name: Any, offset: Any,
                count: Any, timeout: Any, held: Any = None) -> None:
        """A live proc's blocking claim: claims at once, or parks until there is work.

        ``held`` is the claim counter of the last delivery the client received (``None``:
        none yet): while that very claim is pending, asking for more is ``invalid_ack``. A
        pending claim the client never received (answered to a wait it cancelled, on its
        way back as a reclaim) parks the request as any other busy state does."""
        _ids.check_topic(topic)
        _ids.check_proc_name(name)
        _ids.parse_offset(offset)
        count = _count(count)
        timeout = _wait_timeout(timeout)
        if held is not None and type(held) is not int:
            raise InvalidArgument("held is the claim counter of the last delivery, or None")

        def attempt(tx: Any) -> Any:
            if self.stopping.is_set():  # not the end of the stream: the node goes away
                return err_reply(rid, "connection_lost", "the node is shutting down")
            rec = tx.proc(name)
            if rec is None or rec["topic"] != topic:
                return ok_reply(rid, None)  # cancelled (destroyed): the end
            if rec["status"] != "active":
                return None
            if held is not None and _procs.pending(rec) and rec.get("cnum") == held:
                # the client holds it and live procs never time out: waiting is forever
                raise InvalidAck(
                    f"live proc {name!r} still holds its last delivery "
                    f"({_procs.range_str(rec['claimed'])}): call ack() (or reclaim() to "
                    "have it delivered again) before asking for more")
            recs = _procs.claim(tx, name, rec, count)
            return None if recs is None else ok_reply_raw(rid, page(recs, tx.proc(name)["cnum"]))
        self._queue_attempt(conn, rid, {name}, attempt)
        if timeout is not None:
            def expire() -> None:
                with self.wlock:
                    w = self.claim_waiters.pop((conn.id, rid), None)
                if w is not None:
                    conn.reply(rid, None)
            self.timers.after(float(timeout), expire)

    def op_create_live(self, conn: Conn, rid: int, topic: Any, name: Any, offset: Any) -> None:
        """Create a live proc's hidden proc, owned by this connection (destroyed with it)."""
        _ids.check_topic(topic)
        _ids.check_proc_name(name)
        _ids.parse_offset(offset)

        def fn(tx: Any) -> list:
            rec = tx.proc(name)
            if rec is not None and not rec.get("live"):
                from .errors import ProcNameNotUnique
                raise ProcNameNotUnique(f"proc {name!r} exists and is not a live proc")
            rec = _procs.ensure(tx, name, topic, offset, -1, -1.0, "continue")
            if not rec.get("live"):  # the flag, not the name, tells a hidden proc
                rec = dict(rec, live=True)
                tx.put_proc(name, rec)
            return _procs.state(name, rec)

        def done(ok: bool, value: Any) -> None:
            if ok:
                with conn.lock:
                    if not conn.closed:
                        conn.live.add(name)
                conn.reply(rid, value)
            else:
                conn.fail(rid, value)
        self.writer.submit(fn, done)

    def op_sysproc(self, conn: Conn, rid: int, name: Any, topics: Any, multi: Any, ref: Any,
                   tos: Any, offset: Any, count: Any, max_reclaims: Any, reclaim_timeout: Any,
                   on_max: Any, backoff: Any = None) -> None:
        _ids.check_proc_name(name)
        if type(topics) is not list or not topics or type(tos) is not list:
            raise InvalidArgument("from_ and to are topic names or lists of them")
        for t in topics + tos:
            _ids.check_topic(t)
        if type(ref) is not str or not ref:
            from .errors import InvalidProcessor
            raise InvalidProcessor("processor must be an import string")
        _ids.parse_offset(offset)
        count = _count(count)
        opts = _opts(max_reclaims, reclaim_timeout, on_max)
        backoff = _backoff(backoff)
        names = [f"{name}__{t}" for t in topics] if multi else [name]
        for pn in names:
            _ids.check_proc_name(pn)

        def fn(tx: Any) -> list:
            existing = tx.sysproc(name)
            if existing is not None:
                return self._sysproc_again(tx, name, existing, names, topics, ref, tos, count,
                                           offset, opts, backoff)
            for pn, t in zip(names, topics):  # check everything before writing
                rec = tx.proc(pn)
                if rec is not None and rec["topic"] != t:
                    from .errors import ProcNameNotUnique
                    raise ProcNameNotUnique(f"proc {pn!r} already exists on topic {rec['topic']!r}")
            states = []
            for pn, t in zip(names, topics):
                rec = _procs.ensure(tx, pn, t, offset, *opts)
                states.append(_procs.state(pn, rec))
            tx.put_sysproc(name, {"procs": names, "topics": topics, "processor": ref,
                                  "to": tos, "count": count, "multi": bool(multi),
                                  "created_at": tx.now, "backoff": backoff})
            return states
        self._write(conn, rid, fn)

    def _sysproc_again(self, tx: Any, name: str, existing: dict, names: list, topics: list,
                       ref: str, tos: list, count: int, offset: str, opts: tuple,
                       backoff: Optional[List[float]] = None) -> list:
        """``system_proc`` on a name that exists: same procs and topics update the definition
        (processor, ``to``, ``count``, ``backoff``; from the next claim on), anything else is
        ``proc_name_not_unique``. The procs keep their position and frozen options."""
        if existing["procs"] != names or existing["topics"] != topics:
            from .errors import ProcNameNotUnique
            raise ProcNameNotUnique(
                f"system proc {name!r} already exists on topic(s) {existing['topics']!r} "
                f"(procs {existing['procs']!r}); a system proc is updated only with the same "
                "from_; destroy it first (destroy_proc) or choose another name")
        states = []
        for pn, t in zip(names, topics):
            rec = _procs.ensure(tx, pn, t, offset, *opts)
            states.append(_procs.state(pn, rec))
            kept = (rec["max_reclaims"], rec["reclaim_timeout"], rec["on_max"])
            if kept != tuple(opts) or rec["offset"] != offset:
                log.info("system proc %s: proc %s keeps its offset %r and options "
                         "max_reclaims=%s reclaim_timeout=%s on_max_reclaims_reached=%s "
                         "(the ones given again are ignored)", name, pn, rec["offset"], *kept)
        old = {k: existing[k] for k in ("processor", "to", "count")}
        old["backoff"] = existing.get("backoff") or list(DEFAULT_BACKOFF)
        new = {"processor": ref, "to": tos, "count": count,
               "backoff": backoff or list(DEFAULT_BACKOFF)}
        if new != old:
            d = dict(existing)
            d.update(new)
            d["updated_at"] = tx.now
            tx.put_sysproc(name, d)
            log.info("system proc %s updated from the next claim on: %s -> %s", name,
                     " ".join(f"{k}={v!r}" for k, v in old.items()),
                     " ".join(f"{k}={v!r}" for k, v in new.items()))
        return states

    def op_hello_worker(self, conn: Conn, rid: int, slot: Any, pid: Any) -> None:
        conn.worker = {"slot": _int(slot, "slot"), "pid": _int(pid, "pid")}
        if self.supervisor is not None:
            self.supervisor.hello(slot, pid)
        conn.reply(rid, None)

    def op_work(self, conn: Conn, rid: int, done: Any, more: Any) -> None:
        """A worker reports the outcome of its last claim and asks for the next one."""
        if conn.worker is None:
            raise Malformed("work from a connection that is not a worker")
        if done is not None:
            if type(done) is not list or len(done) != 4 or done[2] not in ("ack", "commit", "reclaim"):
                raise Malformed("bad work outcome")
            name, key, kind, items = done
            _ids.check_proc_name(name)
            key = _claimed(key)
            if kind == "commit":
                items = _items(items)
            elif kind == "reclaim":
                items = _failure(items)
            else:
                items = None
            if self.supervisor is not None:
                self.supervisor.count(conn.worker["slot"], kind == "reclaim")
        st = {"done": None if done is None else (name, key, kind, items)}
        slot = conn.worker["slot"]

        def attempt(tx: Any) -> Any:
            d = st["done"]
            if d is not None:
                self._apply_outcome(tx, *d)
            if self.stopping.is_set() or not more:
                return ("exit", None, ok_reply(rid, "exit"))
            return self._claim_any(tx, rid)

        def finish(ok: bool, value: Any) -> None:
            d = st["done"]
            st["done"] = None
            if not ok and isinstance(value, (StorageFull, InternalError)):
                # the store refused the write: not the processor's fault. The node writes
                # the outcome again after a back-off; the worker waits for work meanwhile.
                if d is not None:
                    self._hold(d, value)
                    value = None
                else:
                    self._store_fails += 1
                    delay = min(DEFAULT_BACKOFF[1],
                                DEFAULT_BACKOFF[0] * 2.0 ** min(self._store_fails - 1, 64))
                    log.warning("the store refused a worker's claim (%s); trying again in "
                                "%.1f s", value, delay)
                    self.timers.after(delay, lambda: self._wake_sys(1))
                    value = None
                ok = True
            elif ok and value is not None:
                self._store_fails = 0
            if not ok:
                conn.fail(rid, value)
                return
            if value is None:
                with self.wlock:
                    if not conn.closed:
                        self.claim_waiters[(conn.id, rid)] = (conn, rid, "sys", attempt, finish)
                        return
                return
            name, key, data = value
            if key is not None:
                with conn.lock:
                    orphan = conn.closed
                    if not orphan:
                        conn.claims[name] = key
                if orphan:  # the worker died while we claimed for it
                    self.writer.submit(lambda tx: self._reclaim_dead(tx, {name: key}),
                                       lambda ok, v: None)
                    return
            conn.send(data)

        d0 = st["done"]
        if d0 is not None:
            with conn.lock:
                conn.claims.pop(d0[0], None)
        self.writer.submit(attempt, finish)

    def _apply_outcome(self, tx: Any, name: str, key: list, kind: str, items: Any) -> None:
        try:
            if kind == "ack":
                _procs.ack(tx, name, key)
            elif kind == "commit":
                _procs.check_ack_commit(tx, name, key)
                _procs.ack(tx, name, key)
                if items:
                    tx.append(items)
            else:
                _procs.reclaim(tx, name, key, items or {
                    "type": "ProcessorFailed", "message": "the processor failed"})
                new = tx.proc(name)
                self._note(tx, "failed", name, new, new["last_error"])
        except PipeProcError as exc:
            log.info("worker outcome for %s dropped: %s", name, exc)

    def _hold(self, outcome: tuple, err: PipeProcError) -> None:
        """The store refused a worker's outcome: write it again after a back-off (store
        failures are not the processor's: they never count toward max_reclaims, and the
        claim does not time out meanwhile). The stage resumes by itself once writes succeed."""
        name = outcome[0]
        entry = self._held.get(name)
        if entry is None or entry[0] is not outcome:
            entry = self._held[name] = [outcome, 0]
        entry[1] += 1
        sysdef = self.sys_names().get(name) or {}
        first, cap = sysdef.get("backoff") or DEFAULT_BACKOFF
        first = first or DEFAULT_BACKOFF[0]
        delay = min(max(cap, first), first * 2.0 ** min(entry[1] - 1, 64))
        key = outcome[1]
        # WARNING at the first refusal (and every 20th), the retries in between at DEBUG
        (log.warning if entry[1] == 1 or entry[1] % 20 == 0 else log.debug)(
            "the store refused the outcome (%s) of system proc %r on logs %s-%s..%s-%s: "
            "%s: %s; writing it again in %.1f s (a store failure does not count toward "
            "max_reclaims; attempt %d)", outcome[2], name, key[0], key[1], key[2], key[3],
            err.code, err.message, delay, entry[1])

        def retry() -> None:
            if self.stopping.is_set():
                return
            self.writer.submit(lambda tx: self._apply_outcome(tx, *outcome), done)

        def done(ok: bool, value: Any) -> None:
            if not ok and isinstance(value, (StorageFull, InternalError)):
                self._hold(outcome, value)
                return
            if self._held.get(name) is entry:
                del self._held[name]
            if ok:
                log.warning("the store accepts writes again: the outcome of system proc %r "
                            "was written after %d attempt(s)", name, entry[1] + 1)
            else:
                log.error("the outcome of system proc %r was dropped: %s", name, value)
            self.arm_timeout(name)
        self.timers.after(delay, retry)

    def _claim_any(self, tx: Any, rid: int) -> Any:
        """Claim for a worker from the system procs with work, round robin."""
        defs = self.sys_names()
        names = self.sys_sorted()
        n = len(names)
        for i in range(n):
            idx = (self.rr + i) % n
            name = names[idx]
            rec = tx.proc(name)
            if (rec is None or rec["status"] != "active" or self._in_backoff(name)
                    or name in tx.__dict__.get("sysfail_skip", ())):
                continue
            d = defs[name]
            rec = self._expire_rec(tx, name, rec)
            try:
                recs = _procs.claim(tx, name, rec, d["count"])
            except StoreCorrupted as exc:  # never deliverable: stop this proc, not the pool
                log.error("system proc %s disabled: %s", name, exc)
                _procs.disable(tx, name)
                continue
            if recs is None:
                continue
            self.rr = idx + 1
            new = tx.proc(name)
            c = new["claimed"]
            key = c + [c[3] - c[1] + 1, new["cdig"], new["cnum"]]
            data = (b"\x93" + msgpack.packb(rid) + b"\x00\x96" + msgpack.packb(name)
                    + msgpack.packb(d["processor"]) + msgpack.packb(d["to"])
                    + (b"\xc3" if d["count"] > 1 else b"\xc2") + array_header(len(recs))
                    + b"".join(recs) + msgpack.packb(key))
            return (name, key, data)
        return None

    def op_shutdown(self, conn: Conn, rid: int) -> None:
        conn.reply(rid, None)
        threading.Thread(target=self.shutdown, daemon=True).start()


def _failure(v: Any) -> Optional[dict]:
    """A worker's report of a processor failure: ``{"type", "message", "traceback"}``."""
    if type(v) is not dict:
        return None
    out = {}
    for k, limit in (("type", 200), ("message", 2000), ("traceback", 20000)):
        x = v.get(k)
        if type(x) is str:
            out[k] = x[:limit] if len(x) <= limit else x[:limit - 3] + "..."
    if "type" not in out:
        return None
    out.setdefault("message", "")
    return out


_LEGACY_LIVE = re.compile(r"liveproc-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _is_live(name: str, rec: dict) -> bool:
    """A live proc's hidden proc: its record says so (``live``, set by ``create_live``).

    Records of stores written before the flag have no ``live`` key at all: there a hidden
    proc is told by what ``live_proc()`` always made — a ``liveproc-<uuid4>`` name and the
    hidden proc's options — so a user's own ``liveproc-…`` proc is never dropped."""
    if "live" in rec:
        return bool(rec["live"])
    return (_LEGACY_LIVE.fullmatch(name) is not None and rec.get("max_reclaims") == -1
            and rec.get("reclaim_timeout") == -1 and rec.get("on_max") == "continue")


def _count(count: Any) -> int:
    if type(count) is not int or count < 1:
        raise InvalidArgument("count must be an int >= 1")
    return count


# ------------------------------------------------------------------------- process main

def _lock_location(location: str) -> Optional[int]:
    import fcntl
    fd = _private.open_private(os.path.join(location, "node.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _write_private(path: str, data: bytes) -> None:
    """Write ``path`` atomically (a temporary file, then a rename); on failure nothing is
    left behind, and a full disk is :class:`StorageFull`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:  # left by a dead node that had our pid (we hold the lock); a link is not followed
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _private.NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"cannot write {path}: the disk is full ({exc.strerror})") from None
        raise


def _test_wall_clock(path: str) -> None:
    """Tests only (``PIPEPROC_TEST_WALL_CLOCK=<file>``): the node's wall clock is the real
    one plus the offset in ms written in ``file`` (read at most every 20 ms), so a test can
    step the wall clock back without root. Never set in production."""
    real_ns = time.time_ns
    state = [0.0, 0]

    def offset_ms() -> int:
        now = time.monotonic()
        if now - state[0] > 0.02:
            state[0] = now
            try:
                with open(path) as f:
                    state[1] = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
        return state[1]

    def fake_ns() -> int:
        return real_ns() + offset_ms() * 1_000_000

    time.time_ns = fake_ns  # type: ignore[assignment]
    time.time = lambda: fake_ns() / 1e9  # type: ignore[assignment]


def main() -> None:
    """Entry point of the node process (``python -m pipeproc._node``)."""
    os.umask(0o077)
    if os.environ.get("PIPEPROC_TEST_WALL_CLOCK"):
        _test_wall_clock(os.environ["PIPEPROC_TEST_WALL_CLOCK"])
    stdin = sys.stdin.buffer
    size = int.from_bytes(stdin.read(4), "big")
    cfg = msgpack.unpackb(stdin.read(size), raw=False)
    ready_fd = cfg["ready_fd"]
    level = cfg.get("log_level") or "WARNING"
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s pipeproc-node[%(process)d] %(levelname)s %(message)s")

    def report(msg: dict) -> None:
        try:
            os.write(ready_fd, msgpack.packb(msg, use_bin_type=True))
            os.close(ready_fd)
        except OSError:
            pass

    location = cfg["location"]
    try:
        _private.check_location(location, create=True)
        lock_fd = _lock_location(location)
        if lock_fd is None:
            report({"error": ["node_already_active",
                              f"a node is already running on {location}"]})
            return
        _private.check_entries(location, memory=cfg["memory"])
        if cfg.get("temp_location"):
            os.write(lock_fd, _private.TEMP_MARK)  # after the pid: what clean_stale_temp removes
            _private.clean_stale_temp(location)
        cfg["authkey"] = cfg.get("authkey") or os.urandom(32)
        node = Node(cfg)
        try:
            node.bind()
        except OSError as exc:
            report({"error": ["node_already_active", f"cannot bind {cfg['address']}: {exc}"]})
            return
        _write_private(os.path.join(location, "node.key"), cfg["authkey"])
        _write_private(os.path.join(location, "node.address"),
                       msgpack.packb({"address": node.address}))
        if cfg.get("workers", 0) > 0:
            from ._supervisor import Supervisor
            node.supervisor = Supervisor(node, cfg)
        node.serve()
        if node.supervisor is not None:
            node.supervisor.start()
    except PipeProcError as exc:
        log.error("node failed to start: %s", exc)
        report({"error": [exc.code, exc.message]})
        return
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("node failed to start: %s", exc)
            report({"error": ["storage_full", f"node failed to start: the disk is full: {exc}"]})
            return
        if isinstance(exc, lmdb.Error) and "No space" in str(exc):
            report({"error": ["storage_full", f"node failed to start: the disk is full: {exc}"]})
            return
        log.exception("node failed to start")
        report({"error": ["internal_error", f"node failed to start: {exc}"]})
        return

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=node.shutdown, daemon=True).start())

    def lifeline() -> None:  # EOF on stdin: the spawning process is gone
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        node.shutdown()
    if cfg.get("lifeline", True):
        threading.Thread(target=lifeline, name="lifeline", daemon=True).start()
        parent = os.getppid()

        def watch_parent() -> None:
            if os.getppid() != parent:
                node.shutdown()
            elif not node.stopping.is_set():
                node.timers.after(1.0, watch_parent)
        node.timers.after(1.0, watch_parent)

    report({"address": node.address, "authkey": node.authkey, "pid": os.getpid()})
    while not node.stopped.wait(3600):
        pass
    # graceful end: let in-flight writes finish, then close the store
    deadline = time.monotonic() + 10
    while not node.writer.idle() and time.monotonic() < deadline:
        time.sleep(0.005)
    node.timers.stop()
    with node.conns_lock:
        conns = list(node.conns.values())
    live = set()
    for c in conns:
        with c.lock:
            live |= c.live
            c.live.clear()
    if live:  # the live procs' connections die with the node: their hidden procs too
        node.writer.submit(lambda tx: node._drop_live(tx, live), lambda ok, v: None)
    for c in conns:
        c.close()
    node.writer.stop()
    with node.store.gate.exclusive():
        node.store.close()
    for name in ("node.address",):
        try:
            os.unlink(os.path.join(location, name))
        except OSError:
            pass
    if node.cfg["address"] is None:
        try:
            os.unlink(node.address)
        except OSError:
            pass
        if getattr(node, "rundir", None):
            import shutil
            shutil.rmtree(node.rundir, ignore_errors=True)
    if cfg.get("temp_location"):
        import shutil
        shutil.rmtree(location, ignore_errors=True)
    log.info("stopped")
    logging.shutdown()
    # daemon threads (connections, lifeline) may sit in blocking reads: leave without
    # running interpreter teardown against them
    os._exit(0)


if __name__ == "__main__":
    main()
