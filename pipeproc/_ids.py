"""Ids, names, range bounds and proc offsets: parsing, formatting and resolution (pure functions).

A log id is ``"<ms>-<seq>"``. Within one topic both ``ms`` and ``seq`` never decrease along
the log, so ``(ms, seq)`` is strictly increasing with ``seq``: every bound form resolves to a
sequence number by a binary search over the stored sequences ``[first, nxt)`` — O(log n)
lookups of a log's ``ms``, never a scan.

Part of the pure core, shared by both sides. May import: ``errors`` and the standard
library's ``re``.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Tuple, Union

from .errors import (
    InvalidArgument,
    InvalidProcName,
    InvalidRangeOffset,
    InvalidToneIdSearch,
    InvalidTopicFormat,
)

MAX_U64 = 2**64 - 1
_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]{1,200}", re.ASCII)
_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})", re.ASCII)
_MS_RE = re.compile(r"[0-9]{1,20}", re.ASCII)
_SEQ_RE = re.compile(r":([0-9]{1,20})", re.ASCII)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# A parsed bound: ("id", ms, seq) | ("ms", ms) | ("seq", seq)
Bound = Union[Tuple[str, int, int], Tuple[str, int]]
# A parsed offset: (">",) | ("$>",) | a Bound
Offset = Union[Tuple[str], Bound]


def check_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid topic name, else raise ``invalid_topic_format``."""
    if not isinstance(topic, str) or _TOPIC_RE.fullmatch(topic) is None:
        raise InvalidTopicFormat(
            f"topic must match ^[A-Za-z0-9_-]{{1,200}}$, got {_short(topic)}"
        )
    return topic


def check_proc_name(name: object) -> str:
    """Return ``name`` if it is a valid proc name, else raise ``invalid_proc_name``."""
    if (not isinstance(name, str) or not 1 <= len(name) <= 200 or _CONTROL_RE.search(name)
            or not _encodable(name)):
        raise InvalidProcName(
            f"proc name must be 1-200 characters without control characters, got {_short(name)}"
        )
    return name


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def parse_id(log_id: str) -> Tuple[int, int]:
    """Parse a full id ``"<ms>-<seq>"`` into ``(ms, seq)``; ``invalid_range_offset`` otherwise."""
    bound = parse_bound(log_id)
    if bound[0] != "id":
        raise InvalidRangeOffset(f"not a full log id: {log_id!r}")
    return bound[1], bound[2]  # type: ignore[misc]


def parse_bound(value: object) -> Bound:
    """Parse a range bound.

    Returns ``("id", ms, seq)``, ``("ms", ms)`` or ``("seq", seq)``.

    Raises:
        InvalidArgument: ``value`` is not a string.
        InvalidRangeOffset: the string is none of the forms.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"a range bound must be a string or None, got {type(value).__name__}")
    m = _ID_RE.fullmatch(value)
    if m:
        ms, seq = int(m.group(1)), int(m.group(2))
        if ms <= MAX_U64 and seq <= MAX_U64:
            return ("id", ms, seq)
    elif _MS_RE.fullmatch(value):
        ms = int(value)
        if ms <= MAX_U64:
            return ("ms", ms)
    else:
        m = _SEQ_RE.fullmatch(value)
        if m and int(m.group(1)) <= MAX_U64:
            return ("seq", int(m.group(1)))
    raise InvalidRangeOffset(
        f"invalid range bound {value!r}: expected '<ms>-<seq>', '<ms>' or ':<seq>'"
    )


def parse_offset(value: object) -> Offset:
    """Parse a proc offset: ``">"``, ``"$>"`` or any bound form."""
    if value == ">" or value == "$>":
        return (value,)  # type: ignore[return-value]
    if not isinstance(value, str):
        raise InvalidArgument(f"a proc offset must be a string, got {type(value).__name__}")
    try:
        return parse_bound(value)
    except InvalidRangeOffset:
        raise InvalidRangeOffset(
            f"invalid proc offset {value!r}: expected '>', '$>', ':<seq>', '<ms>-<seq>' or '<ms>'"
        ) from None


def bisect(lo: int, hi: int, pred: Callable[[int], bool]) -> int:
    """First ``q`` in ``[lo, hi)`` with ``pred(q)`` true (pred monotone), or ``hi``."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def lower_seq(bound: Optional[Bound], exclusive: bool, first: int, nxt: int,
              ms_at: Callable[[int], int]) -> int:
    """The first sequence a lower bound admits (may be ``nxt``: nothing)."""
    if bound is None:
        return first
    kind = bound[0]
    if kind == "seq":
        seq = bound[1]
        _check_exists(seq, first, nxt)
        return seq + 1 if exclusive else seq
    if kind == "ms":
        ms = bound[1]
        return bisect(first, nxt, lambda q: ms_at(q) >= ms)
    bms, bseq = bound[1], bound[2]  # type: ignore[misc]
    if exclusive:
        return bisect(first, nxt, lambda q: (ms_at(q), q) > (bms, bseq))
    return bisect(first, nxt, lambda q: (ms_at(q), q) >= (bms, bseq))


def upper_seq(bound: Optional[Bound], exclusive: bool, first: int, nxt: int,
              ms_at: Callable[[int], int]) -> int:
    """The last sequence an upper bound admits (may be ``first - 1``: nothing)."""
    if bound is None:
        return nxt - 1
    kind = bound[0]
    if kind == "seq":
        seq = bound[1]
        _check_exists(seq, first, nxt)
        return seq - 1 if exclusive else seq
    if kind == "ms":
        ms = bound[1]
        return bisect(first, nxt, lambda q: ms_at(q) > ms) - 1
    bms, bseq = bound[1], bound[2]  # type: ignore[misc]
    if exclusive:
        return bisect(first, nxt, lambda q: (ms_at(q), q) >= (bms, bseq)) - 1
    return bisect(first, nxt, lambda q: (ms_at(q), q) > (bms, bseq)) - 1


def resolve_range(lower: Optional[Bound], upper: Optional[Bound], exclusive: bool,
                  first: int, nxt: int, ms_at: Callable[[int], int]) -> Tuple[int, int]:
    """Resolve a (lower, upper) bound pair over stored sequences ``[first, nxt)``.

    Returns ``(lo, hi)``, inclusive; ``lo > hi`` means an empty range. ``:seq`` bounds are
    checked for existence even when the other bound already makes the range empty.
    """
    lo = lower_seq(lower, exclusive, first, nxt, ms_at)
    hi = upper_seq(upper, exclusive, first, nxt, ms_at)
    return max(lo, first), min(hi, nxt - 1)


def _check_exists(seq: int, first: int, nxt: int) -> None:
    if not first <= seq < nxt:
        raise InvalidToneIdSearch(f"no log with sequence {seq} (stored: {first}..{nxt - 1})")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
