"""The synchronous client: :class:`PipeProc`, :func:`spawn` and :func:`connect`.

The client is thin: it validates arguments, encodes each body once, sends a msgpack
request and decodes the reply. It keeps a small pool of connections so that the threads of
one process can share a client and a blocking call (``wait_for_procs``, a live proc waiting)
holds one connection without holding up the others.
"""

from __future__ import annotations

import itertools
import math
import os
import select
import subprocess
import sys
import threading
import time
import socket
import struct
import weakref
from multiprocessing.connection import (
    AuthenticationError,
    Connection,
    answer_challenge,
    deliver_challenge,
)
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import msgpack

from . import _ids, _private, _procs
from ._protocol import ERR, REPLY_LIMIT, Channel, decode, encode_body, pack
from .errors import (
    AuthFailed,
    ConnectionLost,
    InvalidArgument,
    InvalidLogFormat,
    InvalidProcessor,
    NoActiveNode,
    PipeProcError,
    Timeout,
    from_code,
)

DEFAULT_LOCATION = "./pipeproc_data"
DEFAULT_GC = {"min_prune_time": 30.0, "interval": 30.0}
DEFAULT_PAGE = 1000


class Log(NamedTuple):
    """One log: its id ``"<ms>-<seq>"`` and its body.

    Example:
        >>> Log("1518951480106-0", {"greeting": "hello"}).id
        '1518951480106-0'
    """

    id: str
    body: Any


class _ClaimedLog(Log):
    """A :class:`Log` returned by ``proc`` (count 1): it also carries the identity of its
    claim, ``_claim = (proc name, claim counter)``, which ``claimed=`` sends along, so that
    the same logs claimed again later are another claim (SPEC §5). It compares, hashes,
    prints and pickles as the Log it is."""

    def __repr__(self) -> str:
        return f"Log(id={self.id!r}, body={self.body!r})"


class _ClaimedList(list):
    """The ``list[Log]`` returned by ``proc`` (count > 1), carrying its claim's identity
    (``_claim``) as :class:`_ClaimedLog` does."""


def _with_claim(logs: Any, claim: tuple) -> Any:
    """``logs`` (a list of Logs, or one Log) as the objects ``proc`` returns."""
    if isinstance(logs, list):
        out: Any = _ClaimedList(logs)
    else:
        out = _ClaimedLog(logs[0], logs[1])
    out._claim = claim
    return out


class ProcState(NamedTuple):
    """The state of a proc, as returned by ``inspect_proc`` and friends.

    Ranges are ``"first_id..last_id"`` or ``""``; times are epoch ms (0 for never);
    ``reclaim_timeout`` is in seconds (-1 for never).
    """

    name: str
    topic: str
    offset: str
    created_at: int
    last_claimed_at: int
    last_acked_at: int
    last_claimed_range: str
    last_acked_range: str
    previous_claimed_range: str
    status: str
    reclaims: int
    max_reclaims: int
    reclaim_timeout: float
    on_max_reclaims_reached: str
    #: ``None``, or the last failure of the proc's consumer (a system proc's processor
    #: exception, dead worker or time limit): a dict with ``type``, ``message``,
    #: ``traceback`` (when there is one), ``at`` (ms) and ``range`` (``"a..b"``).
    last_error: Optional[dict] = None


class AckCommit(NamedTuple):
    """The result of ``ack_commit``: the acked range and the committed id(s)."""

    acked: str
    id: Union[str, List[str]]


def _logs(rows: list) -> List[Log]:
    return [Log(f"{ms}-{seq}", body) for ms, seq, body in rows]


def _claim_key(logs: Any, name: Optional[str] = None) -> Optional[list]:
    """The wire form of ``claimed=``: the ids' range, count and digest, plus the claim
    counter when ``logs`` are what ``proc`` returned (Logs built by hand carry no
    identity: they match the pending claim by their ids alone). Logs another proc than
    ``name`` claimed get a counter that matches no claim (the node answers ``stale_claim``
    after its other checks, in the SPEC's order).
    """
    if logs is None:
        return None
    claim = getattr(logs, "_claim", None)
    if claim is None and isinstance(logs, list) and logs:
        claim = getattr(logs[0], "_claim", None)
    if isinstance(logs, Log) or (isinstance(logs, tuple) and not isinstance(logs, list)
                                 and len(logs) == 2 and isinstance(logs[0], str)):
        items = [logs]
    elif isinstance(logs, list) and logs:
        items = logs
    else:
        raise InvalidArgument("claimed= takes the Log or list of Logs that proc() returned")
    ids = []
    for item in items:
        try:
            ids.append(_ids.parse_id(item[0]))
        except (PipeProcError, TypeError, IndexError, KeyError):
            raise InvalidArgument("claimed= takes the Log or list of Logs that proc() returned") from None
    key = _procs.claimed_key(ids)
    if claim is not None and isinstance(claim[1], int):
        key.append(claim[1] if name is None or claim[0] == name else -1)
    return key


def _encode_logs(logs: Sequence[Any]) -> list:
    out = []
    last = None
    for item in logs:
        if not isinstance(item, dict):
            raise InvalidLogFormat(f"a log is a dict with 'topic' and 'body', got {type(item).__name__!r}")
        topic = item.get("topic")
        if topic != last or last is None:  # batches mostly repeat a topic: check it once
            last = _ids.check_topic(topic)
        if "body" not in item:
            raise InvalidLogFormat("a log needs a body (a dict, a list or bytes)")
        out.append([last, encode_body(item["body"])])
    return out


def _check_limit(limit: Any) -> int:
    if limit is None:
        return 0
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidArgument(f"limit must be an int or None, got {type(limit).__name__}")
    return 0 if limit >= 2**62 else max(limit, 0)  # beyond any topic: no limit


def _check_bound(value: Any) -> Any:
    if value is not None:
        _ids.parse_bound(value)
    return value


MAX_COUNT = 2**31 - 1
MAX_TIMEOUT = 10 * 365 * 24 * 3600.0  # seconds; beyond that, use -1 (never)


def _check_count(count: Any) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise InvalidArgument(f"count must be an int >= 1, got {count!r}")
    return count


def _check_opts(max_reclaims: Any, reclaim_timeout: Any, on_max: Any) -> tuple:
    if isinstance(max_reclaims, bool) or not isinstance(max_reclaims, int) or not (
            1 <= max_reclaims <= MAX_COUNT or max_reclaims == -1):
        raise InvalidArgument(f"max_reclaims must be >= 1 or -1, got {max_reclaims!r}")
    if reclaim_timeout is None:
        reclaim_timeout = -1
    if isinstance(reclaim_timeout, bool) or not isinstance(reclaim_timeout, (int, float)) or not (
            0 < reclaim_timeout <= MAX_TIMEOUT or reclaim_timeout == -1):
        raise InvalidArgument(f"reclaim_timeout must be > 0, -1 or None, got {reclaim_timeout!r}")
    if on_max not in ("disable", "continue"):
        raise InvalidArgument("on_max_reclaims_reached must be 'disable' or 'continue'")
    return max_reclaims, float(reclaim_timeout), on_max


DEFAULT_BACKOFF = (0.1, 30.0)


def _check_backoff(backoff: Any) -> List[float]:
    """``system_proc``'s ``backoff``: ``(first delay, cap)`` in seconds, ``0 <= first <= cap``."""
    if (not isinstance(backoff, (tuple, list)) or len(backoff) != 2
            or any(isinstance(x, bool) or not isinstance(x, (int, float))
                   or not math.isfinite(x) for x in backoff)
            or not 0 <= backoff[0] <= backoff[1] <= MAX_TIMEOUT):
        raise InvalidArgument(
            f"backoff is (first delay, cap) in seconds with 0 <= first <= cap, got {backoff!r}")
    return [float(backoff[0]), float(backoff[1])]


def _check_offset(offset: Any) -> str:
    _ids.parse_offset(offset)
    return offset


HANDSHAKE_TIMEOUT = 5.0
#: Requests up to this size never ask the node for its frame limit (always accepted).
MIN_FRAME = 64 * 1024
_NO_TIMEOUT = struct.pack("ll", 0, 0)


def open_connection(address: Any, authkey: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> Channel:
    """Connect and authenticate (``multiprocessing.connection`` handshake), never hanging:
    connect and handshake are bounded by ``timeout`` seconds. Returns the framed channel.

    Raises:
        NoActiveNode: nothing answered in time. AuthFailed: the key was refused.
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
    return Channel(s)


#: How long past a wait's own timeout the client waits for the node's answer before it
#: gives up by itself (a node that is stopped or hung never answers).
WAIT_SLACK = 1.0

#: Every client of this process, reset in a child after ``os.fork()`` (see ``_forked``).
_CLIENTS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        try:
            client._forked()
        except Exception:  # pragma: no cover - never fail a fork
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _NodeRef:
    """What both clients know of their node: its address, key and location."""

    _address: Any
    _authkey: bytes
    _location: Optional[str]

    @property
    def address(self) -> Any:
        """The address the node is bound to: a Unix socket path or ``(host, port)``."""
        return self._address

    @property
    def authkey(self) -> bytes:
        """The node's authentication key (give it to :func:`connect` with ``address``)."""
        return self._authkey

    @property
    def location(self) -> Optional[str]:
        """The node's location directory, when known."""
        return self._location


def _check_request_size(size: int, limit: int) -> None:
    """A request above the node's frame limit fails here, before anything is sent."""
    if size > limit:
        raise InvalidArgument(
            f"a request of {size} bytes is above the node's limit of {limit} bytes "
            "(spawn(max_frame_size=...)); commit less per call")


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
                 location: Optional[str] = None) -> None:
        self._address = address
        self._authkey = authkey
        self._process = process
        self._location = location
        self._idle: List[Any] = []
        self._lock = threading.Lock()
        self._rids = itertools.count(1)
        self._closed = False
        self._conns: set = set()
        self._max_frame: Optional[int] = None
        _CLIENTS.add(self)

    # ------------------------------------------------------------------ connection

    def _connect(self, timeout: float = HANDSHAKE_TIMEOUT) -> Any:
        c = open_connection(self._address, self._authkey, timeout)
        with self._lock:
            self._conns.add(c)
        return c

    def _acquire(self, timeout: float = HANDSHAKE_TIMEOUT) -> Any:
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
        if self._max_frame is None:
            self._max_frame = int(self._call("limits")["max_frame_size"])
        return self._max_frame

    def _call(self, op: str, *args: Any) -> Any:
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

    def _call_within(self, timeout: float, op: str, *args: Any) -> Any:
        """:meth:`_call` bounded by ``timeout`` seconds, for a node that may not answer
        (stopped, overloaded): connect, send and reply all count.

        Raises:
            Timeout: no reply in time (the connection is dropped: it is out of step).
        """
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

    def close(self) -> None:
        """Disconnect this client; the node keeps running."""
        self._closed = True
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
            self._idle.clear()
        for c in conns:
            try:
                c.close()
            except OSError:
                pass

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the node (its workers too) and close the store, then disconnect.

        Args:
            timeout: seconds for the whole shutdown: the request and the node process's
                exit. A node that has not exited by then (stopped, hung) is killed.
        """
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
        return f"<PipeProc {state} to {self._address!r}>"

    # ------------------------------------------------------------------ commit and read

    def commit(self, logs: Union[dict, Sequence[dict]]) -> Union[str, List[str]]:
        """Commit one log (returns its id) or a list of logs atomically (returns a list of ids).

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
            ms, seq = self._call("c1", item[0], item[1])
            return f"{ms}-{seq}"
        if isinstance(logs, (list, tuple)):
            items = _encode_logs(logs)
            if not items:
                return []
            ms, seqs = self._call("c", items)
            return [f"{ms}-{s}" for s in seqs]
        raise InvalidLogFormat(f"commit takes a log dict or a list of them, got {type(logs).__name__!r}")

    def _range(self, topic: str, start: Any, end: Any, limit: Any, exclusive: bool,
               reverse: bool, page_size: int) -> Iterator[List[Log]]:
        _ids.check_topic(topic)
        _check_bound(start)
        _check_bound(end)
        n = _check_limit(limit)
        rows, tail = self._call("range", topic, start, end, n, bool(exclusive), reverse, page_size)
        yield _logs(rows)
        while tail is not None:
            lo, hi, left = tail
            rows, tail = self._call("page", topic, lo, hi, left, reverse, page_size)
            yield _logs(rows)

    def range(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
              limit: Optional[int] = None, exclusive: bool = False) -> List[Log]:
        """Logs of ``topic`` from ``start`` up to ``end`` (oldest first).

        Args:
            topic: the topic name.
            start: lower bound: ``"<ms>-<seq>"``, ``"<ms>"`` or ``":<seq>"`` (None: the start).
            end: upper bound, same forms (None: the end).
            limit: at most this many logs (None, 0 or negative: no limit).
            exclusive: exclude the bound logs themselves (full-id and ``:seq`` bounds).

        Raises:
            InvalidTopic: the topic never had a commit.
            InvalidRangeOffset, InvalidToneIdSearch, InvalidArgument: bad bounds.
        """
        out: List[Log] = []
        for chunk in self._range(topic, start, end, limit, exclusive, False, 10_000):
            out.extend(chunk)
        return out

    def revrange(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
                 limit: Optional[int] = None, exclusive: bool = False) -> List[Log]:
        """Like :meth:`range`, newest first: ``start`` is the upper bound, ``end`` the lower.

        ``revrange(topic, limit=1)`` is the newest log.
        """
        out: List[Log] = []
        for chunk in self._range(topic, start, end, limit, exclusive, True, 10_000):
            out.extend(chunk)
        return out

    def iter_range(self, topic: str, start: Optional[str] = None, end: Optional[str] = None,
                   limit: Optional[int] = None, exclusive: bool = False, *,
                   page_size: int = DEFAULT_PAGE, reverse: bool = False) -> Iterator[Log]:
        """Yield the logs of a range lazily, fetching ``page_size`` logs per round trip."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise InvalidArgument("page_size must be an int >= 1")
        page_size = min(page_size, 1 << 30)
        for chunk in self._range(topic, start, end, limit, exclusive, bool(reverse), page_size):
            yield from chunk

    def length(self, topic: str) -> int:
        """The number of logs ever committed to ``topic`` (also after the GC removed some)."""
        _ids.check_topic(topic)
        return self._call("length", topic)

    def topics(self) -> List[str]:
        """The names of all topics, sorted."""
        return self._call("topics")

    def stats(self) -> Dict[str, Any]:
        """Node, workers, topics and procs figures (see the SPEC §3)."""
        return self._call("stats")

    # ------------------------------------------------------------------ procs

    def proc(self, topic: str, *, name: str, offset: str = ">", count: int = 1,
             max_reclaims: int = 10, reclaim_timeout: Optional[float] = 10.0,
             on_max_reclaims_reached: str = "disable") -> Union[Log, List[Log], None]:
        """Claim the next logs of ``topic`` for the proc ``name`` (created on first use).

        Returns:
            A ``Log`` (``count == 1``), a list of logs (``count > 1``), or ``None`` when a
            claim is pending or nothing is left to claim.
        """
        _ids.check_topic(topic)
        _ids.check_proc_name(name)
        _check_offset(offset)
        _check_count(count)
        opts = _check_opts(max_reclaims, reclaim_timeout, on_max_reclaims_reached)
        res = self._call("proc", topic, name, offset, count, *opts)
        return _claim_result(res, count, name)

    def ack(self, name: str, *, claimed: Any = None) -> str:
        """Ack the pending claim; returns the acked range ``"first..last"``."""
        _ids.check_proc_name(name)
        return self._call("ack", name, _claim_key(claimed, name))

    def ack_commit(self, name: str, log_or_logs: Union[dict, Sequence[dict]], *,
                   claimed: Any = None) -> AckCommit:
        """Ack the pending claim and commit log(s) in one atomic write."""
        _ids.check_proc_name(name)
        single = isinstance(log_or_logs, dict)
        if not single and not isinstance(log_or_logs, (list, tuple)):
            raise InvalidLogFormat("ack_commit takes a log dict or a list of them")
        items = _encode_logs([log_or_logs] if single else log_or_logs)
        acked, ms, seqs = self._call("ackc", name, items, _claim_key(claimed, name))
        ids = [f"{ms}-{s}" for s in seqs]
        return AckCommit(acked, ids[0] if single else ids)

    def reclaim(self, name: str, *, claimed: Any = None) -> str:
        """Drop the pending claim (its logs will be delivered again); returns the last
        acked range (``""`` if the proc never acked)."""
        _ids.check_proc_name(name)
        return self._call("reclaim", name, _claim_key(claimed, name))

    def inspect_proc(self, name: str) -> ProcState:
        """The proc's current state."""
        _ids.check_proc_name(name)
        return ProcState(*self._call("inspect", name))

    def disable_proc(self, name: str) -> ProcState:
        """Disable the proc (proc / reclaim then fail with ``proc_is_disabled``)."""
        _ids.check_proc_name(name)
        return ProcState(*self._call("disable", name))

    def resume_proc(self, name: str) -> ProcState:
        """Re-activate a disabled proc; resets reclaims, keeps a pending claim."""
        _ids.check_proc_name(name)
        return ProcState(*self._call("resume", name))

    def destroy_proc(self, name: str) -> ProcState:
        """Delete the proc (and its system proc, if any); returns its last state."""
        _ids.check_proc_name(name)
        return ProcState(*self._call("destroy", name))

    def wait_for_procs(self, names: Optional[Sequence[str]] = None,
                       timeout: Optional[float] = None) -> None:
        """Block until every named (default: all) active proc on an existing topic has no
        pending claim and nothing left to claim.

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
            self._call("wait_idle", names, timeout)
        else:
            self._call_within(timeout + WAIT_SLACK, "wait_idle", names, timeout)

    def available_proc(self, specs: Sequence[dict]) -> Optional[Tuple[str, Any]]:
        """Claim work from the first listed proc that does not exist yet, otherwise round
        robin over the listed procs that have work. Returns ``(name, Log | list[Log])``."""
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
        res = self._call("avail", wire)
        if res is None:
            return None
        name, many, rows = res
        return name, _claim_result(rows, 2 if many else 1, name)

    # ------------------------------------------------------------------ system and live procs

    def system_proc(self, *, name: str, from_: Union[str, Sequence[str]], processor: Any,
                    to: Union[str, Sequence[str], None] = None, offset: str = ">", count: int = 1,
                    max_reclaims: int = 10, reclaim_timeout: Optional[float] = 10.0,
                    on_max_reclaims_reached: str = "disable",
                    backoff: Tuple[float, float] = DEFAULT_BACKOFF,
                    ) -> Union[ProcState, List[ProcState]]:
        """Register a processor run by the node's workers on ``from_``'s logs (SPEC §6).

        Called again with the same ``name`` and ``from_``, it updates the definition
        (``processor``, ``to``, ``count``, ``backoff``) from the next claim on; the proc keeps
        its position, its options and its status (a disabled proc stays disabled until
        ``resume_proc``).
        The same ``name`` with another ``from_`` raises ``proc_name_not_unique``.

        A failed delivery (the processor raised, its worker died, or it ran longer than
        ``reclaim_timeout``, which is the processor's time limit) is counted toward
        ``max_reclaims`` and delivered again after a back-off: ``backoff=(first, cap)``
        seconds, doubling with each failure in a row (default 0.1 s up to 30 s; ``(0, 0)``:
        none). It is persisted with the system proc.

        Returns:
            The proc's state, or a list of states (one per topic) when ``from_`` is a list.
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
        states = self._call("sysproc", name, topics, multi, ref, tos, offset, count, *opts,
                            wire_backoff)
        out = [ProcState(*s) for s in states]
        return out if multi else out[0]

    def live_proc(self, topic: str, *, mode: str = "live", count: int = 1) -> "LiveProc":
        """Follow ``topic`` from this process (SPEC §7); see :class:`LiveProc`."""
        from ._live import LiveProc
        return LiveProc(self, topic, mode=mode, count=count)


def _claim_result(res: Any, count: int, name: str) -> Union[Log, List[Log], None]:
    """A claim's reply ``[rows, claim counter]`` as what ``proc`` returns."""
    if res is None:
        return None
    logs = _logs(res[0])
    claim = (name, res[1] if len(res) > 1 else None)
    return _with_claim(logs if count > 1 else logs[0], claim)


# ------------------------------------------------------------------ spawn and connect

def _location(location: Any) -> str:
    if location is None:
        location = DEFAULT_LOCATION
    if not isinstance(location, (str, os.PathLike)):
        raise InvalidArgument("location must be a path")
    return os.path.abspath(os.fspath(location))


def _gc_settings(gc: Any) -> Optional[dict]:
    if gc is False or gc is None:
        return None
    if gc is True:
        return dict(DEFAULT_GC)
    if not isinstance(gc, dict) or set(gc) - set(DEFAULT_GC):
        raise InvalidArgument("gc is True, False or {'min_prune_time': s, 'interval': s}")
    out = dict(DEFAULT_GC, **gc)
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "interval" and v <= 0):
            raise InvalidArgument(f"gc {k} must be a number of seconds")
    return out


def _nonneg_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidArgument(f"{name} must be an int >= 0")
    return v


def _check_frame_size(v: Any) -> None:
    if v is not None and (_nonneg_int(v, "max_frame_size") < MIN_FRAME or v > 0x7FFFFFFF):
        raise InvalidArgument(f"max_frame_size must be between {MIN_FRAME} and 2**31 - 1 bytes")


def _address(address: Any) -> Any:
    if address is None or isinstance(address, str):
        return address
    if (isinstance(address, (tuple, list)) and len(address) == 2 and isinstance(address[0], str)
            and isinstance(address[1], int) and not isinstance(address[1], bool)
            and 0 <= address[1] <= 65535):
        return (address[0], address[1])
    raise InvalidArgument("address is a Unix socket path or a (host, port) tuple")


def spawn(location: Any = None, *, memory: bool = False, workers: int = 1,
          worker_concurrency: int = 1, worker_restart_after: int = 0, gc: Any = False,
          durability: str = "full", address: Any = None, authkey: Optional[bytes] = None,
          max_map_size: Optional[int] = None, max_frame_size: Optional[int] = None,
          log_level: Optional[str] = None, timeout: float = 60.0) -> PipeProc:
    """Start a node process and return a client connected to it.

    Args:
        location: the node's directory (created if missing; ``None``: ``./pipeproc_data``,
            or a private temporary directory with ``memory=True``).
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
            A larger request fails with ``invalid_argument`` before it is sent.
        log_level: the node's log level on stderr (default WARNING).
        timeout: seconds to wait for the node to be ready.

    Returns:
        A connected :class:`PipeProc`; ``shutdown()`` stops the node.

    Raises:
        NodeAlreadyActive: a running node owns the location or address.
    """
    temp_location = memory and location is None
    if temp_location:
        import tempfile
        loc = tempfile.mkdtemp(prefix="pipeproc-")
    else:
        loc = _location(location)
    if durability not in ("full", "fast"):
        raise InvalidArgument("durability is 'full' or 'fast'")
    _nonneg_int(workers, "workers")
    if _nonneg_int(worker_concurrency, "worker_concurrency") < 1:
        raise InvalidArgument("worker_concurrency must be >= 1")
    _nonneg_int(worker_restart_after, "worker_restart_after")
    if authkey is not None and not isinstance(authkey, (bytes, bytearray)):
        raise InvalidArgument("authkey must be bytes")
    if max_map_size is not None:
        _nonneg_int(max_map_size, "max_map_size")
    _check_frame_size(max_frame_size)
    cfg = {
        "location": loc, "memory": bool(memory), "workers": workers,
        "worker_concurrency": worker_concurrency, "worker_restart_after": worker_restart_after,
        "gc": _gc_settings(gc), "durability": durability, "address": _address(address),
        "authkey": bytes(authkey) if authkey else None, "max_map_size": max_map_size,
        "max_frame_size": max_frame_size, "sys_path": [p for p in sys.path if isinstance(p, str)], "cwd": os.getcwd(),
        "log_level": log_level, "temp_location": temp_location,
    }
    read_fd, write_fd = os.pipe()
    cfg["ready_fd"] = write_fd
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeproc._node"], stdin=subprocess.PIPE,
            pass_fds=(write_fd,), env=env, cwd=loc if os.path.isdir(loc) else None,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    try:
        data = msgpack.packb(cfg, use_bin_type=True)
        assert proc.stdin is not None
        proc.stdin.write(len(data).to_bytes(4, "big") + data)
        proc.stdin.flush()
        msg = _read_ready(read_fd, proc, timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        raise
    finally:
        os.close(read_fd)
    if "error" in msg:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
        code, message = msg["error"]
        raise from_code(code, message)
    addr = msg["address"]
    addr = tuple(addr) if isinstance(addr, list) else addr
    pp = PipeProc(addr, msg["authkey"], process=proc, location=loc)
    try:
        pp._release(pp._connect())
    except BaseException:
        proc.kill()
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        raise
    return pp


def _read_ready(fd: int, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoActiveNode(f"the node did not become ready within {timeout} s")
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
        elif proc.poll() is not None and not buf:
            break
    if not buf:
        raise NoActiveNode(f"the node process exited during start (code {proc.poll()})")
    return msgpack.unpackb(buf, raw=False)


IDLE_CHECK = 0.05  # seconds between the two looks that find no node at a location


def resolve_node(loc: Optional[str], address: Any, authkey: Optional[bytes]) -> Tuple[Any, bytes]:
    """The node's address and key: as given, else read from the location's files.

    Raises:
        NoActiveNode: the location holds no running node's files.
        InvalidArgument: the location, or a file read from it, is not private to this user
            (another user's, writable by others, a symbolic link).
    """
    if address is not None and authkey is not None:
        return address, authkey
    if loc is None:
        raise InvalidArgument("connect(address=...) needs the node's authkey= as well (or "
                              "location=, the node's directory, which holds its key)")
    try:
        _private.check_location(loc)
        info = msgpack.unpackb(_private.read_private(os.path.join(loc, "node.address")), raw=False)
        file_key = _private.read_private(os.path.join(loc, "node.key"))
    except OSError as exc:
        if address is not None and authkey is None and not os.path.exists(
                os.path.join(loc, "node.key")):
            raise NoActiveNode(
                f"no key for the node at {address!r}: {os.path.join(loc, 'node.key')} does not "
                "exist; pass authkey= (the node's key, pp.authkey) or location= (the node's "
                "directory, which holds its key file node.key)") from None
        raise NoActiveNode(f"no node at {loc}: {exc}") from None
    a = info["address"]
    if address is None:
        address = tuple(a) if isinstance(a, list) else a
    return address, authkey if authkey is not None else file_key


def node_starting(loc: Optional[str]) -> bool:
    """Whether a node may be running or starting at ``loc`` (``connect`` keeps trying).

    ``False`` only when the location exists and nothing holds its lock (``node.lock``, held by
    a node from its start to its end): no node is there and none is starting. When that cannot
    be told (no ``loc``, a location not created yet, no ``/proc/locks``), ``True``.
    """
    if loc is None or not os.path.isdir(loc):
        return True
    try:
        ino = str(os.stat(os.path.join(loc, "node.lock")).st_ino)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        with open("/proc/locks") as f:
            locks = f.read()
    except OSError:
        return True
    for line in locks.splitlines():
        # "3: FLOCK  ADVISORY  WRITE 12207 fe:00:2147199 0 EOF" (the device is not compared:
        # overlay file systems report another one; a false match only means waiting)
        parts = line.split()
        if "FLOCK" in parts and any(p.count(":") == 2 and p.rsplit(":", 1)[1] == ino
                                    for p in parts):
            return True
    return False


def no_node_error(loc: str, last: PipeProcError) -> NoActiveNode:
    """The error of a connect to a location where no node runs or starts."""
    return NoActiveNode(
        f"no node is running or starting at {loc} (nothing holds {os.path.join(loc, 'node.lock')}"
        f"): start one with pipeproc.spawn({loc!r}) or `pipeproc node --location {loc}` "
        f"({last.message})")


def connect(location: Any = None, *, address: Any = None, authkey: Optional[bytes] = None,
            timeout: float = 5.0) -> PipeProc:
    """Connect to a running node, by its location or by ``address`` and ``authkey``.

    Retries until ``timeout`` seconds have passed while a node may be starting; never hangs.
    A location that exists but where no node runs or starts (nothing holds its lock) fails
    at once.

    Raises:
        NoActiveNode: no node answered within ``timeout``, or none runs at ``location``.
        AuthFailed: the node refused the key.
    """
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout < 0):
        raise InvalidArgument("timeout must be a finite number of seconds")
    address = _address(address)
    loc = None if address is not None and location is None else _location(location)
    deadline = time.monotonic() + timeout
    delay = 0.01
    last: Exception = NoActiveNode("no node")
    idle_since: Optional[float] = None
    while True:
        try:
            addr, key = resolve_node(loc, address, authkey)
            pp = PipeProc(addr, key, location=loc)
            left = max(0.05, deadline - time.monotonic())
            c = open_connection(addr, key, min(left, HANDSHAKE_TIMEOUT))
            with pp._lock:
                pp._conns.add(c)
            pp._release(c)
            return pp
        except AuthFailed:
            raise
        except NoActiveNode as exc:
            last = exc
            if node_starting(loc):
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= IDLE_CHECK:  # seen twice: not a start race
                raise no_node_error(loc, exc)  # type: ignore[arg-type]
        if time.monotonic() + delay > deadline:
            raise NoActiveNode(f"{last.message} (gave up after {timeout} s)")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
