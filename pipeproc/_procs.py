"""The proc state machine and the GC rule, as functions of (transaction view, now, request).

A proc record is a dict persisted as msgpack in the ``procs`` database:

``topic, offset, created_at, start`` (the topic's next sequence at creation, for ``"$>"``),
``claimed, acked, prev`` (ranges ``[lo_ms, lo_seq, hi_ms, hi_seq]`` or ``None``: the last
claimed, last acked and previous claimed ranges), ``last_claimed_at, last_acked_at`` (ms),
``status`` (``"active"``/``"disabled"``), ``reclaims, max_reclaims, reclaim_timeout``
(seconds, ``-1`` for never), ``on_max`` and ``tbase`` (ms from which a pending claim's
timeout counts: its claim, or the resume that re-armed it). Optional keys: ``last_error``
(the last failure of the proc's consumer, see :func:`error_info`) and ``disabled_by``
(``"max_reclaims"`` or ``"user"``, while disabled: a stage that died is not a stage that
was stopped on purpose).
``cdig`` (digest of the pending claim's ids), ``cnum`` (the claim counter: +1 on every claim, so
the same logs claimed again are another claim; it starts at ``created_at << 20`` so a proc
destroyed and created again does not reuse a counter value) and ``live`` (``True`` only for a
live proc's hidden proc, set by the node's ``create_live``; records of older stores have no
``live``/``cnum``).

A claim is *pending* while ``claimed != acked``. Every function here checks all its error
conditions before it changes anything, and returns the new record through
``tx.put_proc`` so a whole state change is one write of the group commit.

Part of the pure core (node side): no socket, thread, subprocess or lmdb, no clock (time
comes as ``tx.now``; deadlines are the caller's). May import: ``_ids``, ``_records``,
``errors``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from . import _ids
from ._records import ids_digest, record_ms
from .errors import (
    InvalidAck,
    InvalidProc,
    NothingToReclaim,
    ProcAlreadyActive,
    ProcAlreadyDisabled,
    ProcIsDisabled,
    ProcNameNotUnique,
    StaleClaim,
)

Range = Optional[List[int]]  # [lo_ms, lo_seq, hi_ms, hi_seq]

STATE_FIELDS = (
    "name", "topic", "offset", "created_at", "last_claimed_at", "last_acked_at",
    "last_claimed_range", "last_acked_range", "previous_claimed_range", "status",
    "reclaims", "max_reclaims", "reclaim_timeout", "on_max_reclaims_reached", "last_error",
)


def range_str(r: Range) -> str:
    """``"first_id..last_id"`` for a stored range, ``""`` for none."""
    if not r:
        return ""
    return f"{r[0]}-{r[1]}..{r[2]}-{r[3]}"


def state(name: str, rec: dict) -> list:
    """The wire form of a ``ProcState`` (values in ``STATE_FIELDS`` order)."""
    return [
        name, rec["topic"], rec["offset"], rec["created_at"], rec["last_claimed_at"],
        rec["last_acked_at"], range_str(rec["claimed"]), range_str(rec["acked"]),
        range_str(rec["prev"]), rec["status"], rec["reclaims"], rec["max_reclaims"],
        rec["reclaim_timeout"], rec["on_max"], rec.get("last_error"),
    ]


def pending(rec: dict) -> bool:
    """Whether the proc holds a claim that is neither acked nor reclaimed."""
    return rec["claimed"] is not None and rec["claimed"] != rec["acked"]


def new_record(topic: str, offset: str, now: int, start: int, max_reclaims: int,
               reclaim_timeout: float, on_max: str) -> dict:
    return {
        "topic": topic, "offset": offset, "created_at": now, "start": start,
        "claimed": None, "acked": None, "prev": None,
        "last_claimed_at": 0, "last_acked_at": 0, "status": "active", "reclaims": 0,
        "max_reclaims": max_reclaims, "reclaim_timeout": reclaim_timeout, "on_max": on_max,
        "tbase": 0, "cnum": int(now) << 20, "live": False,
    }


def position(view: Any, rec: dict) -> int:
    """The next sequence the proc would claim, ignoring a pending claim."""
    meta = view.topic(rec["topic"])
    first = meta.first if meta is not None else 0
    if rec["acked"] is not None:
        return max(rec["acked"][3] + 1, first)
    off = _ids.parse_offset(rec["offset"])
    kind = off[0]
    if kind == ">":
        return first
    if kind == "$>":
        return max(rec["start"], first)
    if kind == "seq":
        return max(off[1], first)  # type: ignore[misc]
    if meta is None:
        return 0
    # "<ms>-<seq>": the first log after that id; "<ms>": the first log with ms >= it.
    return _ids.lower_seq(off, kind == "id", meta.first, meta.next,  # type: ignore[arg-type]
                          lambda q: view.ms_at(meta.tid, q))


def lag(view: Any, rec: dict) -> int:
    """Logs committed to the proc's topic and not yet acked by it."""
    meta = view.topic(rec["topic"])
    if meta is None:
        return 0
    return max(0, meta.next - position(view, rec))


def deadline(rec: dict) -> Optional[int]:
    """When the pending claim times out (ms), or ``None``."""
    if not pending(rec) or rec["status"] != "active":
        return None
    timeout = rec["reclaim_timeout"]
    if timeout is None or timeout < 0:
        return None
    return rec["tbase"] + int(timeout * 1000)


def _get(tx: Any, name: str) -> dict:
    rec = tx.proc(name)
    if rec is None:
        raise InvalidProc(f"proc {name!r} does not exist")
    return rec


def _reclaimed(rec: dict, error: Optional[dict] = None, count: bool = True) -> dict:
    """The record after one reclaim (manual or by timeout): counts, maybe disables.

    ``error`` (see :func:`error_info`) becomes the proc's ``last_error``; ``count=False``
    drops the claim without counting it (a failure that is not the consumer's)."""
    new = dict(rec)
    new["claimed"] = rec["acked"]
    if error is not None:
        new["last_error"] = error
    if not count:
        return new
    new["reclaims"] = rec["reclaims"] + 1
    if (rec["max_reclaims"] != -1 and new["reclaims"] >= rec["max_reclaims"]
            and rec["on_max"] == "disable"):
        new["status"] = "disabled"
        new["disabled_by"] = "max_reclaims"
    return new


def error_info(kind: str, message: str, at: int, rng: Range,
               traceback: Optional[str] = None) -> dict:
    """A ``last_error``: what failed (``type``, ``message``, ``traceback`` when there is
    one), when (``at``, ms) and on which logs (``range``, ``"a..b"``)."""
    out: dict = {"type": kind, "message": message}
    if traceback:
        out["traceback"] = traceback
    out["at"] = at
    out["range"] = range_str(rng)
    return out


def dead(view: Any, rec: Optional[dict]) -> bool:
    """A proc disabled by ``max_reclaims`` while it still has work: a dead stage."""
    if rec is None or rec["status"] != "disabled" or rec.get("disabled_by") != "max_reclaims":
        return False
    meta = view.topic(rec["topic"])
    if meta is None:
        return False
    return pending(rec) or position(view, rec) < meta.next


def first_dead(view: Any, names: Optional[Sequence[str]], procs: dict) -> Optional[str]:
    """The first named (default: any) proc that is :func:`dead`, or ``None``."""
    for name in (procs.keys() if names is None else names):
        if dead(view, procs.get(name)):
            return name
    return None


def _check_claimed(rec: dict, claimed: Optional[Sequence[int]]) -> None:
    """``claimed`` is ``[lo_ms, lo_seq, hi_ms, hi_seq, n, digest]`` as sent by a client,
    plus the claim counter ``cnum`` when the client knows it (logs returned by ``proc``):
    then only that very claim matches, not the same logs claimed again."""
    if claimed is None:
        return
    c = rec["claimed"]
    if (not pending(rec) or list(claimed[:4]) != c or claimed[4] != c[3] - c[1] + 1
            or claimed[5] != rec.get("cdig")
            or (len(claimed) > 6 and claimed[6] != rec.get("cnum", 0))):
        raise StaleClaim(
            "the given logs are not the proc's pending claim "
            f"({range_str(c) if pending(rec) else 'nothing pending'})"
        )


def ensure(tx: Any, name: str, topic: str, offset: str, max_reclaims: int,
           reclaim_timeout: float, on_max: str) -> dict:
    """The proc's record, created (with these frozen options) when missing."""
    rec = tx.proc(name)
    if rec is None:
        meta = tx.topic(topic)
        rec = new_record(topic, offset, tx.now, meta.next if meta else 0, max_reclaims,
                         reclaim_timeout, on_max)
        tx.put_proc(name, rec)
    elif rec["topic"] != topic:
        raise ProcNameNotUnique(f"proc {name!r} already exists on topic {rec['topic']!r}")
    return rec


def expire(tx: Any, name: str, rec: dict, due: Optional[Any] = None) -> dict:
    """Reclaim the pending claim if its timeout has passed (one write).

    ``due(name, rec) -> bool`` decides instead of the store clock when given (the node keeps
    monotonic deadlines: a step back of the wall clock must not freeze timeouts)."""
    if due is not None:
        if deadline(rec) is not None and due(name, rec):
            rec = _reclaimed(rec)
            tx.put_proc(name, rec)
        return rec
    due_ms = deadline(rec)
    if due_ms is not None and tx.now >= due_ms:
        rec = _reclaimed(rec)
        tx.put_proc(name, rec)
    return rec


def claim(tx: Any, name: str, rec: dict, count: int) -> Optional[List[Any]]:
    """Claim up to ``count`` logs for an active proc with nothing pending.

    Returns the stored records of the claim, or ``None`` (pending, or nothing to claim).
    """
    if rec["status"] != "active" or pending(rec):
        return None
    meta = tx.topic(rec["topic"])
    if meta is None:
        return None
    lo = position(tx, rec)
    if lo >= meta.next:
        return None
    hi = min(lo + count - 1, meta.next - 1)
    records = tx.records(meta, lo, hi, count, False, max_bytes=1 << 62)

    new = dict(rec)
    new["prev"] = rec["claimed"]
    new["claimed"] = [record_ms(records[0]), lo, record_ms(records[-1]), hi]
    new["cdig"] = ids_digest(r[2:10] + r[11:19] for r in records)
    new["cnum"] = rec.get("cnum", 0) + 1
    new["last_claimed_at"] = tx.now
    new["tbase"] = tx.now
    tx.put_proc(name, new)
    return records


def proc(tx: Any, name: str, topic: str, offset: str, count: int, max_reclaims: int,
         reclaim_timeout: float, on_max: str, due: Optional[Any] = None) -> Optional[List[Any]]:
    """``pp.proc``: create if needed, expire a timed-out claim, claim."""
    rec = ensure(tx, name, topic, offset, max_reclaims, reclaim_timeout, on_max)
    if rec["status"] != "active":
        raise ProcIsDisabled(f"proc {name!r} is disabled")
    rec = expire(tx, name, rec, due)
    return claim(tx, name, rec, count)


def ack(tx: Any, name: str, claimed: Optional[Sequence[int]]) -> str:
    """``pp.ack``: make the pending claim the acked range."""
    rec = _get(tx, name)
    if not pending(rec):
        if rec["acked"] is None:
            raise InvalidAck(f"proc {name!r} has nothing pending and never acked")
        _check_claimed(rec, claimed)  # claimed= names no pending claim: stale
        return range_str(rec["acked"])
    _check_claimed(rec, claimed)
    new = dict(rec)
    new["acked"] = rec["claimed"]
    new["reclaims"] = 0
    new["last_acked_at"] = tx.now
    tx.put_proc(name, new)
    return range_str(new["acked"])


def check_ack_commit(tx: Any, name: str, claimed: Optional[Sequence[int]]) -> dict:
    """The checks of ``ack_commit`` (before its logs are written)."""
    rec = _get(tx, name)
    if not pending(rec):
        raise InvalidAck(f"proc {name!r} has no pending claim to ack")
    _check_claimed(rec, claimed)
    return rec


def reclaim(tx: Any, name: str, claimed: Optional[Sequence[int]],
            error: Optional[dict] = None) -> str:
    """``pp.reclaim``: drop the pending claim, count it, maybe disable (``error``: the
    consumer's failure, kept as ``last_error``; its ``at`` and ``range`` are filled here)."""
    rec = _get(tx, name)
    if rec["status"] != "active":
        raise ProcIsDisabled(f"proc {name!r} is disabled")
    if not pending(rec):
        raise NothingToReclaim(f"proc {name!r} has no pending claim")
    _check_claimed(rec, claimed)
    if error is not None:
        error = error_info(error["type"], error["message"], tx.now, rec["claimed"],
                           error.get("traceback"))
    new = _reclaimed(rec, error)
    tx.put_proc(name, new)
    return range_str(new["acked"])


def disable(tx: Any, name: str) -> list:
    rec = _get(tx, name)
    if rec["status"] == "disabled":
        raise ProcAlreadyDisabled(f"proc {name!r} is already disabled")
    new = dict(rec, status="disabled", disabled_by="user")
    tx.put_proc(name, new)
    return state(name, new)


def resume(tx: Any, name: str) -> list:
    rec = _get(tx, name)
    if rec["status"] == "active":
        raise ProcAlreadyActive(f"proc {name!r} is already active")
    new = dict(rec, status="active", reclaims=0, tbase=tx.now)
    new.pop("disabled_by", None)
    tx.put_proc(name, new)
    return state(name, new)


def destroy(tx: Any, name: str) -> list:
    rec = _get(tx, name)
    tx.put_proc(name, None)
    return state(name, rec)


def busy(view: Any, rec: Optional[dict]) -> bool:
    """An active proc on an existing topic with a pending claim or something left to claim."""
    if rec is None or rec["status"] != "active":
        return False
    meta = view.topic(rec["topic"])
    if meta is None:
        return False
    return pending(rec) or position(view, rec) < meta.next


def first_busy(view: Any, names: Optional[Sequence[str]], procs: dict) -> Optional[str]:
    """The first named (default: any) proc that is :func:`busy`, or ``None``."""
    for name in (procs.keys() if names is None else names):
        if busy(view, procs.get(name)):
            return name
    return None


def idle(view: Any, names: Optional[Sequence[str]], procs: dict) -> bool:
    """``wait_for_procs``' condition: every named (default: all) active proc on an existing
    topic has no pending claim and nothing left to claim."""
    return first_busy(view, names, procs) is None


def gc_upto(view: Any, topic: str, meta: Any, procs_on_topic: List[dict], cutoff_ms: int) -> int:
    """The GC rule: the first sequence of ``topic`` to keep.

    Logs older than ``cutoff_ms`` go, except from the first log of each active proc's
    previous claimed range on; a proc that has not claimed twice, or is disabled, protects
    everything from its position on.
    """
    keep = meta.next
    for rec in procs_on_topic:
        keep = min(keep, position(view, rec))
        if rec["prev"] is not None:
            keep = min(keep, rec["prev"][1])
        if pending(rec):
            keep = min(keep, rec["claimed"][1])
    if keep <= meta.first:
        return meta.first
    return _ids.bisect(meta.first, keep, lambda q: view.ms_at(meta.tid, q) >= cutoff_ms)
