"""A client connection and the I/O loop that serves every connection.

Owns:

* :class:`Conn`: one connection — its authkey handshake (a short-lived thread), its read
  buffer (filled by the I/O loop), its reply path (non-blocking ``send``; a backlog of
  unsent replies is flushed by a thread of its own, and a peer that reads nothing for
  ``MAX_BACKLOG`` bytes loses its connection), and the node state tied to it (a worker's
  claims, live procs' hidden procs) that the node releases when it finishes;
* :class:`IOLoop`: one thread, epoll through ``selectors``, reads every authenticated
  connection, cuts frames, decodes each request and runs its handler from the node's op
  table (``node.ops``), then starts one write round for what the pass queued
  (``node.writer.kick``); it busy-polls briefly for a lone client's next request;
* :func:`drop_stalled`: the sweep that closes connections stalled in the middle of a frame.

May import: ``_protocol`` (frames, replies), ``_platform`` (peer credentials, unread bytes,
giving memory back), ``_store`` (damage errors), ``errors`` and the standard library. The
I/O loop reaches the rest of the node only through the node object it is given
(``ops``, ``writer``, ``store``, ``max_frame``, ``busy_poll``, ``shutdown``); it never
imports ``_handlers``, ``_writer``, ``_waits`` or ``_node``.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from multiprocessing import AuthenticationError
from multiprocessing.connection import answer_challenge, deliver_challenge
from typing import Any, Callable, Dict, Iterable, List, Optional

from . import _platform
from ._protocol import RECV_BUFFER, decode, err_reply, ok_reply
from ._store import DAMAGE_ERRORS, damaged
from .errors import PipeProcError

log = logging.getLogger("pipeproc.node")

_HEADER = struct.Struct("!i")
_DONTWAIT = socket.MSG_DONTWAIT
MAX_BACKLOG = 256 * 1024 * 1024
TRIM_AFTER = 16 * 1024 * 1024  # bytes of dropped replies worth a malloc_trim
HANDSHAKE_TIMEOUT = 10.0  # seconds a peer has to complete the authkey handshake
_HANDSHAKE_TV = struct.pack("ll", int(HANDSHAKE_TIMEOUT), 0)
_NO_TV = struct.pack("ll", 0, 0)
# Under durability "full" the I/O loop commits inline only when a single connection has
# been talking to the node for at least this long (and 4 commit durations).
SOLO_WINDOW = 0.002


class Malformed(Exception):
    """A request that does not follow the protocol: its sender loses the connection."""


class Conn:
    """One client connection: its read state (served by the I/O loop) and its reply path."""

    _ids = itertools.count(1)

    def __init__(self, c: Any, authkey: bytes, ready: Callable[["Conn"], None],
                 closed: Callable[["Conn"], None]) -> None:
        self.c = c
        self._authkey = authkey
        self._ready = ready      # authenticated: the I/O loop serves it from now on
        self._closed = closed    # finished: the node releases what it held
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
        self.parked = False  # its last request waits for something (see IOLoop._solo)
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
        c = self.c
        try:
            self.sock = socket.socket(fileno=os.dup(c.fileno()))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _HANDSHAKE_TV)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _HANDSHAKE_TV)
            deliver_challenge(c, self._authkey)
            answer_challenge(c, self._authkey)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TV)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TV)
        except (AuthenticationError, OSError, EOFError, ValueError) as exc:
            if self.sock is not None:
                log.warning("refused a connection from %s: authentication failed (%s)",
                            _platform.peer(self.sock), exc)
            self.finish()
            return
        except BaseException:
            self.finish()
            raise
        self._ready(self)

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
        self._closed(self)
        if self.dropped_bytes > TRIM_AFTER:
            _platform.give_back_memory()

    def reply(self, rid: int, result: Any) -> None:
        self.send(ok_reply(rid, result))

    def fail(self, rid: int, exc: PipeProcError) -> None:
        self.send(err_reply(rid, exc.code, exc.message))


class IOLoop:
    """One thread reads every authenticated connection (epoll through ``selectors``).

    A pass reads what each ready socket has (one ``recv`` per socket), decodes the
    complete frames and runs their handlers: reads are answered at once; writes queue up
    in the writer, and the pass ends by starting one write round for all of them (group
    commit without any thread hand-off under ``durability="fast"``; the writer thread
    takes the round under ``"full"``, so an fsync never stalls the loop). A thread per
    connection costs a wake-up and a GIL hand-off per request; this does not.
    """

    def __init__(self, node: Any) -> None:
        self.node = node
        self.sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._new: List[Conn] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.last_conn = 0      # the connection of the last request served
        #: connection id -> (when it last sent a request, the connection); a commit is
        #: inline (``solo``) when no connection but the last one has talked within the
        #: window, not counting those whose request is parked (they wait, they do not talk)
        self.talk: Dict[int, tuple] = {}
        self._thread = threading.Thread(target=self._run, name="io", daemon=True)

    def start(self) -> None:
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
        node = self.node
        select = self.sel.select
        writer = node.writer
        writer.loop_thread = threading.get_ident()  # its writes wait for the end of a pass
        kick = writer.kick
        spin = node.busy_poll
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
            solo = self._solo(max(SOLO_WINDOW, 4 * writer.commit_time))
            try:
                kick(solo)
            except Exception:  # pragma: no cover
                log.exception("the I/O loop failed to start a write round")
            pass_end = time.monotonic()
            if spin and solo and gap < 4 * spin:
                # one connection alone, talking back to back: its next request comes
                # sooner than a sleeping thread would wake up for it (the node's ``busy_poll``)
                spin_until = pass_end + spin

    def _solo(self, window: float) -> bool:
        """No connection but the last one talked within ``window`` (stale entries go) and
        is not parked."""
        talk = self.talk
        if len(talk) == 1 and self.last_conn in talk:  # the common case: one talker
            return True
        now = time.monotonic()
        solo = True
        for cid, (t, c) in list(talk.items()):
            if now - t > window:
                del talk[cid]
            elif cid != self.last_conn and not c.parked:
                solo = False
        return solo

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
            conn.parked = False
            self.talk[conn.id] = (time.monotonic(), conn)
            self.last_conn = conn.id
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


def drop_stalled(conns: Iterable[Conn], stall_timeout: float, now: float) -> None:
    """Close the connections stalled mid-request past ``stall_timeout`` (the node's timer
    thread): a peer that announced a frame and stopped sending would hold it forever."""
    for conn in conns:
        since = conn.progress
        if since and now - since > stall_timeout and not conn.closed:
            if _platform.unread(conn.sock):  # the peer did send: the I/O loop was busy, not it
                continue
            log.warning("connection %d (%s) stalled in the middle of a request for more "
                        "than %g s; closing it", conn.id,
                        _platform.peer(conn.sock) if conn.sock is not None else "?",
                        stall_timeout)
            conn.close()  # the I/O loop sees the end of the stream and drops it
