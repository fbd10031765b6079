"""What both clients share: argument checks, request builders and reply shaping.

:class:`pipeproc.PipeProc` and :class:`pipeproc.aio.AsyncPipeProc` are twins over this core,
the way httpx's ``Client`` and ``AsyncClient`` share ``BaseClient``: each public method is
one line, ``build request -> send -> shape reply``::

    def commit(self, logs):                 # PipeProc (sync)
        return self._run(_calls.commit(logs))

    async def commit(self, logs):           # AsyncPipeProc
        return await self._run(_calls.commit(logs))

A builder checks the arguments (raising before anything is sent), encodes them and returns a
:class:`Call`: the wire op and arguments, and the function that turns the node's reply into
the public result (``Log``, ``ProcState``, ``AckCommit``, claim identity). Sending is the
client's own business (a pool of blocking channels, or one pipelined asyncio stream).

The public docstrings are written once, in :mod:`pipeproc._docs`, and attached to both
clients' methods by :func:`documented`, so that they cannot drift apart.

Client side: imports ``_ids``, ``_records``, ``_protocol``, ``_processors``, ``_docs`` and
``errors``; never a node-side module.
"""

from __future__ import annotations

import math
import os
import uuid
import weakref
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from . import _docs, _ids, _records
from ._processors import processor_ref
from ._protocol import encode_body
from .errors import InvalidArgument, InvalidLogFormat, PipeProcError

#: Logs per round trip of ``iter_range`` (default).
DEFAULT_PAGE = 1000
#: Logs per round trip of ``range`` / ``revrange``.
RANGE_PAGE = 10_000
#: ``system_proc``'s default ``backoff``: (first delay, cap) in seconds.
DEFAULT_BACKOFF = (0.1, 30.0)
MAX_COUNT = 2**31 - 1
MAX_TIMEOUT = 10 * 365 * 24 * 3600.0  # seconds; beyond that, use -1 (never)
#: Requests up to this size never ask the node for its frame limit (always accepted).
MIN_FRAME = 64 * 1024
#: How long past a wait's own timeout the client waits for the node's answer before it
#: gives up by itself (a node that is stopped or hung never answers).
WAIT_SLACK = 1.0


# ------------------------------------------------------------------ what calls return

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

    _claim: Tuple[str, Optional[int]]

    def __repr__(self) -> str:
        return f"Log(id={self.id!r}, body={self.body!r})"


class _ClaimedList(list):
    """The ``list[Log]`` returned by ``proc`` (count > 1), carrying its claim's identity
    (``_claim``) as :class:`_ClaimedLog` does."""

    _claim: Tuple[str, Optional[int]]


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


Claimed = Union[Log, List[Log], None]


def _logs(rows: list) -> List[Log]:
    return [Log(f"{ms}-{seq}", body) for ms, seq, body in rows]


def _with_claim(logs: Any, claim: Tuple[str, Optional[int]]) -> Any:
    """``logs`` (a list of Logs, or one Log) as the objects ``proc`` returns."""
    out: Any
    if isinstance(logs, list):
        out = _ClaimedList(logs)
    else:
        out = _ClaimedLog(logs[0], logs[1])
    out._claim = claim
    return out


def _claim_result(res: Any, count: int, name: str) -> Claimed:
    """A claim's reply ``[rows, claim counter]`` as what ``proc`` returns."""
    if res is None:
        return None
    logs = _logs(res[0])
    claim = (name, res[1] if len(res) > 1 else None)
    return _with_claim(logs if count > 1 else logs[0], claim)  # type: ignore[no-any-return]


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
    items: Sequence[Any]
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
    key = _records.claimed_key(ids)
    if claim is not None and isinstance(claim[1], int):
        key.append(claim[1] if name is None or claim[0] == name else -1)
    return key


def _held(last: Any) -> Optional[int]:
    """The claim counter of a live proc's last delivery (``None`` before the first): the
    node answers ``invalid_ack`` when that very claim is still pending."""
    claim = getattr(last, "_claim", None)
    return claim[1] if claim is not None and isinstance(claim[1], int) else None


# ------------------------------------------------------------------ argument checks

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


def _check_count(count: Any) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise InvalidArgument(f"count must be an int >= 1, got {count!r}")
    return count


def _check_opts(max_reclaims: Any, reclaim_timeout: Any, on_max: Any) -> Tuple[int, float, str]:
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
    return offset  # type: ignore[no-any-return]


def _check_page_size(page_size: Any) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise InvalidArgument("page_size must be an int >= 1")
    return min(page_size, 1 << 30)


def _check_request_size(size: int, limit: int) -> None:
    """A request above the node's frame limit fails here, before anything is sent."""
    if size > limit:
        raise InvalidArgument(
            f"a request of {size} bytes is above the node's limit of {limit} bytes "
            "(spawn(max_frame_size=...)); commit less per call")


def live_spec(topic: str, mode: str, count: int) -> Tuple[str, str]:
    """Check a live proc's arguments; its hidden proc's name and offset (both clients)."""
    _ids.check_topic(topic)
    if mode not in ("live", "all"):
        raise InvalidArgument("mode is 'live' or 'all'")
    _check_count(count)
    return f"liveproc-{uuid.uuid4()}", (">" if mode == "all" else "$>")


# ------------------------------------------------------------------ requests

T = TypeVar("T")


def _same(result: Any) -> Any:
    return result


class Call(Generic[T]):
    """One request to send and how to shape its reply.

    ``op`` is ``None`` for a call answered without the node (``shape(None)`` is the
    result); ``within`` bounds the wait for the reply (``wait_for_procs``: its timeout, past
    which, plus :data:`WAIT_SLACK`, the node's own timeout answer is overdue)."""

    __slots__ = ("op", "args", "shape", "within")

    def __init__(self, op: Optional[str], args: tuple, shape: Callable[[Any], T] = _same,
                 within: Optional[float] = None) -> None:
        self.op = op
        self.args = args
        self.shape = shape
        self.within = within

    def __repr__(self) -> str:
        return f"Call({self.op!r}, {self.args!r})"


#: A page of a range: its logs and the call for the next page (``None``: the last).
Page = Tuple[List[Log], Optional["Call[Any]"]]


def _nothing(result: Any) -> None:
    return None


def _one_id(r: Any) -> str:
    return f"{r[0]}-{r[1]}"


def _many_ids(r: Any) -> List[str]:
    ms = r[0]
    return [f"{ms}-{s}" for s in r[1]]


def commit(logs: Any) -> Call[Union[str, List[str]]]:
    if isinstance(logs, dict):
        item = _encode_logs([logs])[0]
        return Call("c1", (item[0], item[1]), _one_id)
    if isinstance(logs, (list, tuple)):
        items = _encode_logs(logs)
        if not items:
            return Call(None, (), lambda _: [])
        return Call("c", (items,), _many_ids)
    raise InvalidLogFormat(f"commit takes a log dict or a list of them, got {type(logs).__name__!r}")


def _page_reply(topic: str, reverse: bool, page_size: int) -> Callable[[Any], Page]:
    """A page's reply ``[rows, tail]`` as ``(logs, the call for the next page or None)``."""
    def shape(reply: Any) -> Page:
        rows, tail = reply
        if tail is None:
            return _logs(rows), None
        lo, hi, left = tail
        return _logs(rows), Call("page", (topic, lo, hi, left, reverse, page_size), shape)
    return shape


def range_pages(topic: str, start: Any, end: Any, limit: Any, exclusive: bool, reverse: bool,
                page_size: int) -> Call[Page]:
    """The first page of a range; its result is ``(logs, next page's Call or None)``."""
    _ids.check_topic(topic)
    _check_bound(start)
    _check_bound(end)
    n = _check_limit(limit)
    return Call("range", (topic, start, end, n, bool(exclusive), reverse, page_size),
                _page_reply(topic, reverse, page_size))


def length(topic: str) -> Call[int]:
    _ids.check_topic(topic)
    return Call("length", (topic,))


def topics() -> Call[List[str]]:
    return Call("topics", ())


def stats() -> Call[Dict[str, Any]]:
    return Call("stats", ())


def proc(topic: str, name: str, offset: Any, count: Any, max_reclaims: Any,
         reclaim_timeout: Any, on_max_reclaims_reached: Any) -> Call[Claimed]:
    _ids.check_topic(topic)
    _ids.check_proc_name(name)
    _check_offset(offset)
    _check_count(count)
    opts = _check_opts(max_reclaims, reclaim_timeout, on_max_reclaims_reached)
    return Call("proc", (topic, name, offset, count, *opts),
                lambda r: _claim_result(r, count, name))


def ack(name: str, claimed: Any) -> Call[str]:
    _ids.check_proc_name(name)
    return Call("ack", (name, _claim_key(claimed, name)))


def ack_commit(name: str, log_or_logs: Any, claimed: Any) -> Call[AckCommit]:
    _ids.check_proc_name(name)
    single = isinstance(log_or_logs, dict)
    if not single and not isinstance(log_or_logs, (list, tuple)):
        raise InvalidLogFormat("ack_commit takes a log dict or a list of them")
    items = _encode_logs([log_or_logs] if single else log_or_logs)

    def shape(r: Any) -> AckCommit:
        acked, ms, seqs = r
        ids = [f"{ms}-{s}" for s in seqs]
        return AckCommit(acked, ids[0] if single else ids)
    return Call("ackc", (name, items, _claim_key(claimed, name)), shape)


def reclaim(name: str, claimed: Any) -> Call[str]:
    _ids.check_proc_name(name)
    return Call("reclaim", (name, _claim_key(claimed, name)))


def _state(r: Any) -> ProcState:
    return ProcState(*r)


def proc_state(op: str, name: str) -> Call[ProcState]:
    """``inspect`` / ``disable`` / ``resume`` / ``destroy``: a proc's state back."""
    _ids.check_proc_name(name)
    return Call(op, (name,), _state)


def wait_for_procs(names: Any, timeout: Any) -> Call[None]:
    if names is not None:
        if isinstance(names, str):
            names = [names]
        names = list(names)
        for n in names:
            _ids.check_proc_name(n)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout < 0):
        raise InvalidArgument("timeout must be a finite number >= 0 or None")
    return Call("wait_idle", (names, timeout), _nothing, timeout)


def available_proc(specs: Any) -> Call[Optional[Tuple[str, Any]]]:
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

    def shape(res: Any) -> Optional[Tuple[str, Any]]:
        if res is None:
            return None
        name, many, rows = res
        return name, _claim_result(rows, 2 if many else 1, name)
    return Call("avail", (wire,), shape)


def system_proc(name: str, from_: Any, processor: Any, to: Any, offset: Any, count: Any,
                max_reclaims: Any, reclaim_timeout: Any, on_max_reclaims_reached: Any,
                backoff: Any) -> Call[Union[ProcState, List[ProcState]]]:
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

    def shape(states: Any) -> Union[ProcState, List[ProcState]]:
        out = [ProcState(*s) for s in states]
        return out if multi else out[0]
    return Call("sysproc", (name, topics, multi, ref, tos, offset, count, *opts, wire_backoff),
                shape)


def create_live(topic: str, name: str, offset: str) -> Call[Any]:
    """The hidden proc of a live proc (already checked by :func:`live_spec`)."""
    return Call("create_live", (topic, name, offset))


def live_next(topic: str, name: str, offset: str, count: int, last: Any) -> Call[Claimed]:
    """A live proc's wait for its next delivery; the shaped result is ``None`` at the end."""
    return Call("live", (topic, name, offset, count, None, _held(last)),
                lambda r: _claim_result(r, count, name))


# ------------------------------------------------------------------ the clients' common base

F = TypeVar("F", bound=Callable[..., Any])


def documented(fn: F) -> F:
    """Attach the public docstring written once in :mod:`pipeproc._docs` (keyed by the
    method's qualified name without the class: ``commit``, ``LiveProc.ack`` is ``live.ack``)
    to a method of either client."""
    owner, _, name = fn.__qualname__.rpartition(".")
    key = f"live.{name}" if owner.endswith("LiveProc") else name
    fn.__doc__ = _docs.DOCS[key]
    return fn


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
