"""Replaying an attempt (FLOW.md §2): positions, records, and what is written when.

An attempt gets the run's journal as it was when the run was claimed. :class:`Attempt`
replays it: every ctx call that takes a position (0, 1, ...) finds the record of that
position and returns its outcome without executing anything, or — past the recorded ones —
executes and records. Records are written through ``write`` (the node's ``frec``), which
is refused once the node has taken the run back (fenced off) or cancelled it; values of
``now``/``random``/``uuid``/``kv``/``log``/``patched`` wait in a buffer until the next write,
which is never later than the next step's start.

:class:`~pipeproc.flow._ctx.Context` (sync workflows) and
:class:`~pipeproc.flow._ctx.AsyncContext` (``async def``) are thin faces over one
:class:`Attempt`.

Client side: imports ``pipeproc.flow._defs``, ``pipeproc.errors``, msgpack and the standard
library.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack

from ..errors import InvalidArgument, InvalidRun, NonDeterminism, PipeProcError, Reject
from ._defs import (
    Retry,
    Suspend,
    Workflow,
    check_label,
    check_name,
    check_seconds,
    encode_payload,
    error_info,
    lookup,
    public_error,
    rebuild,
    round_trip,
    run_error,
)

#: a retry wait shorter than this happens inside the attempt; longer ones are durable timers
INLINE_WAIT = 1.0
TERMINAL = ("finished", "failed", "aborted", "cancelled", "rejected")
_NAMED = ("step", "sleep", "wait_signal", "child", "start", "kv")
# call kind -> the event types that are its final record at a position
_FINAL = {"step": ("step", "step_failed"), "sleep": ("sleep",), "wait_signal": ("wait",),
          "signal": ("send",), "child": ("child",), "start": ("start",), "now": ("now",),
          "random": ("random",), "uuid": ("uuid",), "kv": ("kv",), "log": ("log",)}
_KIND_OF = {t: k for k, ts in _FINAL.items() for t in ts}
_AUX = ("retry", "timer")  # events at a position that are not its final record


class Fenced(BaseException):
    """The node took the run back (lease expired, worker gone) or cancelled it: this attempt
    records nothing more and unwinds."""


class Cancelled(Fenced):
    """The run was cancelled while this attempt ran (the node pushed it): the attempt stops
    at its next ctx call and ends the run ``cancelled``."""


def ev(kind: str, name: str, pos: Optional[int], data: dict) -> bytes:
    return msgpack.packb([kind, name, pos, data], use_bin_type=True)


def _describe(kind: str, name: str) -> str:
    return f"{kind} {name!r}" if kind in _NAMED else kind


class Attempt:
    """One attempt of a run: the journal replayed, the buffer of unwritten records."""

    def __init__(self, run_id: str, attempt: int, workflow: str, parent: Optional[str],
                 records: List[list], write: Callable[..., str],
                 call: Callable[..., Any],
                 loop_of: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.loop_of = loop_of
        self.cancelled = cancelled
        self.run_id = run_id
        self.attempt = attempt
        self.workflow = workflow
        self.parent = parent
        self.write_fn = write
        self.call = call
        self.finals: Dict[int, Tuple[str, str, dict, int]] = {}
        self.aux: Dict[int, List[Tuple[str, str, dict, int, int]]] = {}
        #: the outcome of each child the run saw end (position -> [status, result, error]),
        #: kept by the node in the run's record (not an event: the history has one
        #: ``child`` event per call); ``seen_new``: seen by this attempt, not yet written
        self.seen: Dict[int, list] = {}
        self.seen_new: Dict[int, list] = {}
        self.signals: Dict[str, List[Any]] = {}
        self.patches: set = set()
        self.max_pos = -1
        # tries of a step count its ``retry`` events of this attempt: those after the
        # attempt's ``status running`` event (none yet: a new attempt, no tries so far)
        self.wait: Dict[str, Any] = {}
        self.args: list = []
        self.kwargs: dict = {}
        epoch: Optional[int] = None
        last_seq = -1
        for ms, seq, body in records:
            kind, name, pos, data = body
            last_seq = seq
            if kind == "status":
                if seq == 0 or "args" in data:
                    self.args, self.kwargs = data.get("args") or [], data.get("kwargs") or {}
                if name == "running" and data.get("attempt") == attempt and epoch is None:
                    epoch = seq
            elif kind == "signal":
                self.signals.setdefault(name, []).append(data.get("payload"))
            elif kind == "patched":
                self.patches.add(name)
            elif pos is not None:
                self.max_pos = max(self.max_pos, pos)
                if kind in _AUX:
                    self.aux.setdefault(pos, []).append((kind, name, data, ms, seq))
                else:
                    self.finals[pos] = (kind, name, data, ms)
        self.epoch = last_seq if epoch is None else epoch
        self.last_seq = last_seq
        self.pos = 0
        self.buffer: List[bytes] = []
        self.kv: Dict[str, Any] = {}
        self.consumed: Dict[str, int] = {}
        self.child_k: Dict[str, int] = {}
        self.child_pos: Dict[str, int] = {}  # child id -> its position
        self.unwinding: Optional[BaseException] = None
        self.fatal: Optional[PipeProcError] = None

    # ------------------------------------------------------------------ positions

    def guard(self) -> None:
        if self.unwinding is not None:
            raise self.unwinding
        if self.fatal is not None:
            raise self.fatal

    def take(self, kind: str, name: str = "") -> Tuple[int, Optional[tuple]]:
        """The next position, and its final record (checked against the call)."""
        self.guard()
        pos = self.pos
        self.pos += 1
        rec = self.finals.get(pos)
        if rec is None and self.cancelled():  # FLOW.md: cancelled at its next ctx call
            self.unwinding = Cancelled("the run was cancelled")
            raise self.unwinding
        if rec is None:
            aux = self.aux.get(pos)
            if aux:  # a step being retried, a timed wait waiting
                rk = "step" if aux[0][0] == "retry" else "wait_signal"
                if rk != kind or aux[0][1] != name:
                    self._mismatch(pos, rk, aux[0][1], kind, name)
            return pos, None
        rkind = _KIND_OF.get(rec[0], rec[0])
        if rkind != kind or (kind in _NAMED and rec[1] != name):
            self._mismatch(pos, rkind, rec[1], kind, name)
        return pos, rec

    def _mismatch(self, pos: int, rkind: str, rname: str, kind: str, name: str) -> None:
        exc = NonDeterminism(f"position {pos}: the run recorded {_describe(rkind, rname)}, "
                             f"the code calls {_describe(kind, name)}")
        self.fatal = exc
        raise exc

    def suspend(self, **wait: Any) -> Suspend:
        exc = Suspend(wait)
        self.wait = wait
        self.unwinding = exc
        return exc

    # ------------------------------------------------------------------ writing

    def record(self, kind: str, name: str, pos: Optional[int], data: dict) -> None:
        self.buffer.append(ev(kind, name, pos, data))

    def flush(self, own: Optional[bytes] = None, starts: Optional[list] = None,
              sends: Optional[list] = None) -> None:
        """Write the buffer (then ``own``, the calling position's record, with its starts
        or sends) now; unwind when fenced off or cancelled. When the node refuses the
        write (an unknown run to signal, a conflicting child id), the buffer is kept for
        the next write and the error is raised from the call."""
        events = self.buffer + ([own] if own is not None else [])
        r = self.write_fn(events, starts or [], sends or [], self.seen_new)  # raises: none
        self.buffer = []
        self.seen_new = {}
        if r != "ok":
            self.unwinding = Fenced(r)
            raise self.unwinding

    # ------------------------------------------------------------------ steps

    def step_start(self, name: str, retry: Optional[Retry]) -> Tuple[int, Any]:
        """Begin a step: ``(pos, None)`` to execute, or ``(pos, ("result", v))`` /
        ``(pos, ("raise", exc))`` from its record (or a durable retry wait still running)."""
        if retry is not None and not isinstance(retry, Retry):
            raise InvalidArgument("retry must be a flow.Retry or None")
        pos, rec = self.take("step", name)
        if rec is not None:
            if rec[0] == "step":
                return pos, ("result", rec[2].get("result"))
            return pos, ("raise", rebuild(dict(rec[2].get("error") or {},
                                               module=rec[2].get("module"),
                                               args=rec[2].get("args"))))
        tries = [a for a in self.aux.get(pos, ()) if a[0] == "retry" and a[4] > self.epoch]
        if tries:
            last = tries[-1]
            due = last[3] / 1000.0 + float(last[2].get("wait") or 0)
            if time.time() < due:
                raise self.suspend(due=int(due * 1000) + 1)
        if self.buffer:
            self.flush()
        return pos, None

    def step_failed_try(self, pos: int, name: str, retry: Optional[Retry], exc: Exception,
                        tries: int) -> Optional[float]:
        """A try failed: the wait before the next one (recorded), or ``None``: exhausted."""
        if (retry is None or isinstance(exc, (Reject, NonDeterminism))
                or tries >= retry.tries or not retry.retries(exc)):
            err = error_info(exc)
            self.record("step_failed", name, pos, {"error": public_error(err),
                                                   "module": err.get("module"),
                                                   "args": _args_of(exc)})
            return None
        wait = retry.wait(tries)
        self.record("retry", name, pos, {"attempt": tries, "error": public_error(error_info(exc)),
                                         "wait": wait})
        self.flush()
        return wait

    @staticmethod
    def recorded(outcome: Tuple[str, Any]) -> Any:
        """A step's outcome from its record: its result, or its recorded failure raised."""
        if outcome[0] == "result":
            return outcome[1]
        raise outcome[1]

    def retry_wait(self, pos: int, name: str, retry: Optional[Retry], exc: Exception,
                   tries: int) -> float:
        """After a failed try: the wait (under ``INLINE_WAIT``) before the next one, inside
        the attempt; raises ``exc`` when the tries are exhausted, ``Suspend`` for a longer
        (durable) wait."""
        wait = self.step_failed_try(pos, name, retry, exc, tries)
        if wait is None:
            raise exc
        if wait >= INLINE_WAIT:
            raise self.suspend(due=int((time.time() + wait) * 1000) + 1) from None
        return wait

    def step_done(self, pos: int, name: str, result: Any) -> Any:
        value = round_trip(result, f"the result of step {name!r}")
        self.record("step", name, pos, {"result": value})
        self.flush()
        return value

    def tries_before(self, pos: int) -> int:
        return len([a for a in self.aux.get(pos, ()) if a[0] == "retry" and a[4] > self.epoch])

    # ------------------------------------------------------------------ waits

    def sleep(self, name: str, seconds: float) -> None:
        check_label(name, "a sleep name")
        seconds = check_seconds(seconds, "seconds")  # bad arguments take no position
        pos, rec = self.take("sleep", name)
        if rec is not None:
            due = rec[2]["due"]
        else:
            due = time.time() + seconds
            self.record("sleep", name, pos, {"due": due})
        if time.time() >= due:
            return
        raise self.suspend(due=int(due * 1000) + 1)

    def wait_signal(self, name: str, timeout: Optional[float]) -> Any:
        check_label(name, "a signal name")
        if timeout is not None:
            timeout = check_seconds(timeout, "timeout")
        pos, rec = self.take("wait_signal", name)
        if rec is not None:
            if not rec[2].get("timed_out"):
                self.consumed[name] = self.consumed.get(name, 0) + 1
            return rec[2].get("payload")
        k = self.consumed.get(name, 0)
        queue = self.signals.get(name, [])
        if k < len(queue):
            self.consumed[name] = k + 1
            self.record("wait", name, pos, {"payload": queue[k], "timed_out": False})
            return queue[k]
        due = None
        if timeout is not None:
            timers = [a for a in self.aux.get(pos, ()) if a[0] == "timer"]
            if timers:
                due = timers[0][2]["due"]
            else:
                due = time.time() + timeout
                if timeout > 0:
                    self.record("timer", name, pos, {"due": due})
            if time.time() >= due:
                # signals recorded since the claim are not in the journal we replay: look
                # before deciding that the timeout won
                self.fresh_signals()
                if k < len(self.signals.get(name, [])):
                    payload = self.signals[name][k]
                    self.consumed[name] = k + 1
                    self.record("wait", name, pos, {"payload": payload, "timed_out": False})
                    return payload
                self.flush(ev("wait", name, pos, {"payload": None, "timed_out": True}))
                return None
        raise self.suspend(sig=name, due=None if due is None else int(due * 1000) + 1)

    def fresh_signals(self) -> None:
        """Add the signals recorded since the journal was read (``fhist``)."""
        for ms, seq, body in self.call("fhist", self.run_id):
            if seq > self.last_seq:
                self.last_seq = seq
                if body[0] == "signal":
                    self.signals.setdefault(body[1], []).append(body[3].get("payload"))

    # ------------------------------------------------------------------ other runs

    def send(self, run_id: str, name: str, payload: Any) -> None:
        check_label(name, "a signal name")
        if not isinstance(run_id, str) or not run_id:
            raise InvalidRun(f"no run with id {run_id!r:.80}")
        value = round_trip(payload, "a signal payload")
        pos, rec = self.take("signal", name)
        if rec is not None:
            return
        self.flush(ev("send", name, pos, {"to": run_id, "payload": value}),
                   sends=[[run_id, name, encode_payload(value)]])

    def start_child(self, kind: str, workflow: Any, args: tuple, kwargs: dict,
                    rid: Optional[str]) -> str:
        """``child``/``start``: the run's id, recorded with the run's creation (the node
        creates it, or finds it, in the same write). For a ``child`` the outcome the parent
        sees first is kept too (``child_outcome``), so that every replay sees it."""
        wf = lookup(workflow)
        if rid is not None:
            check_name(rid, "a run id")
        k = self.child_k.get(wf.name, 0)
        self.child_k[wf.name] = k + 1
        pos, rec = self.take(kind, wf.name)
        if rec is not None:
            self.child_pos[rec[2]["id"]] = pos
            return rec[2]["id"]
        if rid is None:
            rid = default_child_id(self.run_id, wf.name, k)
        self.child_pos[rid] = pos
        first, rejected = first_event(wf, args, kwargs)
        start = [rid, wf.name, wf.ref, first, wf.max_failures, wf.lease, wf.version,
                 self.run_id if kind == "child" else None, rejected]
        self.flush(ev(kind, wf.name, pos, {"id": rid}), starts=[start])
        return rid

    def child_outcome(self, cid: str) -> Tuple[bool, Any]:
        """``(True, result)`` when the child finished; raises its ``RunError``; ``(False,
        None)`` while it runs. The outcome seen first is kept (written with the run's next
        write into its record): replays see it, even if the child is resumed or deleted
        later."""
        pos = self.child_pos[cid]
        seen = self.seen.get(pos)
        if seen is not None:
            status, result, err = seen
            if status == "finished":
                return True, result
            raise run_error(cid, status, err)
        info, last = self.call("fresult", cid, 0)
        status = info[2]
        if status not in TERMINAL:
            return False, None
        data = (last or [None, None, [None, None, None, {}]])[2][3]
        outcome = [status, data.get("result") if status == "finished" else None,
                   None if status == "finished" else info[6]]
        self.seen[pos] = self.seen_new[pos] = outcome
        if status == "finished":
            return True, outcome[1]
        raise run_error(cid, status, info[6])

    # ------------------------------------------------------------------ values

    def value(self, kind: str, make: Callable[[], Any]) -> Any:
        pos, rec = self.take(kind)
        if rec is not None:
            return rec[2]["value"]
        v = make()
        self.record(kind, "", pos, {"value": v})
        return v

    def kv_op(self, op: str, key: str, value: Any = None, n: int = 1) -> Any:
        check_label(key, "a kv key")
        if op == "incr":
            if isinstance(n, bool) or not isinstance(n, int):
                raise InvalidArgument(f"kv.incr takes an int, got {n!r:.80}")
            cur = self.kv.get(key, 0)
            if isinstance(cur, bool) or not isinstance(cur, int):
                raise InvalidArgument(f"kv key {key!r} holds {type(cur).__name__}, not an int")
        pos, rec = self.take("kv", key)
        if rec is not None:
            op, value = rec[2]["op"], rec[2].get("value")
        else:
            if op == "set":
                value = round_trip(value, f"the value of kv key {key!r}")
            elif op == "incr":
                value = self.kv.get(key, 0) + n
            self.record("kv", key, pos, {"op": op, "value": value})
        if op == "delete":
            self.kv.pop(key, None)
        else:
            self.kv[key] = value
        return value

    def log(self, message: str, fields: dict) -> None:
        if not isinstance(message, str):
            raise InvalidArgument("a log message is a str")
        pos, rec = self.take("log", message)
        if rec is None:
            self.record("log", message, pos, {"fields": round_trip(fields, "log fields")})

    def patched(self, change_id: str) -> bool:
        self.guard()
        if not isinstance(change_id, str) or not 1 <= len(change_id) <= 200:
            raise InvalidArgument(f"a change id is a str of 1-200 characters, got "
                                  f"{change_id!r:.80}")
        if change_id in self.patches:
            return True
        if self.pos <= self.max_pos:  # the run went past here before without the marker
            return False
        self.patches.add(change_id)
        self.record("patched", change_id, None, {})
        return True


def _check_fn(fn: Any) -> None:
    if not callable(fn):
        raise InvalidArgument(f"a step's fn must be callable, got {fn!r:.80}")


def _args_of(exc: BaseException) -> Optional[list]:
    """The exception's arguments when they are a payload (to raise it again on replay)."""
    try:
        return round_trip(list(exc.args))
    except PipeProcError:
        return None


def default_child_id(run_id: str, wf_name: str, k: int) -> str:
    """``"<run id>/<workflow name>-<k>"``; over 200 characters: the first 160, ``~`` and a
    hex digest of the whole (SHA-256, its first 39 hex digits, so the id is 200 characters)."""
    rid = f"{run_id}/{wf_name}-{k}"
    if len(rid) > 200:
        # 160 + 1 + 39 = 200 characters: the id limit
        rid = rid[:160] + "~" + hashlib.sha256(rid.encode()).hexdigest()[:39]
    return rid


def first_event(wf: Workflow, args: tuple, kwargs: dict) -> Tuple[bytes, Optional[dict]]:
    """The first event of a run (``status pending`` with its arguments) and, when
    ``validate`` refuses them, the rejection."""
    encode_payload([list(args), kwargs], "the workflow's arguments")
    args_v, kwargs_v = round_trip([list(args), kwargs])
    rejected = None
    if wf.validate is not None:
        try:
            wf.validate(*args, **kwargs)
        except Exception as exc:
            rejected = error_info(exc)
            rejected.pop("module", None)
            if not isinstance(exc, Reject):
                rejected["code"] = rejected.get("code")
    return ev("status", "pending", None, {"attempt": 0, "error": None, "args": args_v,
                                          "kwargs": kwargs_v}), rejected
