"""Runs from the application's side (FLOW.md §3): :class:`Engine`, :class:`Run`,
:class:`RunInfo` and :class:`Event`.

An engine is a thin face over a :class:`pipeproc.PipeProc`: every method is one request to
the node (``fstart``, ``finfo``, ``fresult``, ``fsignal``...), which owns the runs. Any
number of engines in any number of processes may share a node.

Client side: imports ``pipeproc._client`` (the ``PipeProc`` it wraps), ``pipeproc.flow._replay``,
``pipeproc.flow._defs``, ``pipeproc.errors`` and the standard library.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

from .._client import PipeProc
from ..errors import InvalidArgument, InvalidRun, RunIdConflict, Timeout
from ._replay import first_event
from ._defs import (
    Workflow,
    check_label,
    check_name,
    check_seconds,
    encode_payload,
    lookup,
    public_error,
    run_error,
)

STATUSES = ("pending", "running", "waiting", "finished", "failed", "aborted", "cancelled",
            "rejected")


class RunInfo(NamedTuple):
    """What a run is (``run.info()``, ``engine.runs()``); times are epoch ms."""

    id: str
    workflow: str
    status: str
    attempt: int
    created_at: int
    updated_at: int
    error: Optional[Dict[str, Any]]
    parent_id: Optional[str]
    version: str


class Event(NamedTuple):
    """One event of a run's history (FLOW.md §3's table)."""

    seq: int
    type: str
    name: str
    ts: int
    pos: Optional[int]
    data: Dict[str, Any]


def _info(raw: list) -> RunInfo:
    return RunInfo(raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], public_error(raw[6]),
                   raw[7], raw[8])


class Run:
    """A handle on one run: ``run.<m>(...)`` equals ``engine.<m>(run.id, ...)``.

    Attributes:
        id: the run's id.
        created: ``True`` when the ``start`` that returned it created the run.
    """

    def __init__(self, engine: "Engine", run_id: str, created: bool = False) -> None:
        self.engine = engine
        self.id = run_id
        self.created = created

    def status(self) -> str:
        """The run's status now."""
        return self.engine._info(self.id).status

    def info(self) -> RunInfo:
        """The run's :class:`RunInfo`."""
        return self.engine._info(self.id)

    def result(self, timeout: Optional[float] = None) -> Any:
        """Block until the run ends: its result when ``finished``; else raises
        ``RunFailed``, ``RunAborted``, ``RunCancelled`` or ``RunRejected``; after
        ``timeout`` seconds, ``pipeproc.Timeout``."""
        return self.engine._result(self.id, timeout)

    def signal(self, name: str, payload: Any = None) -> None:
        """Send the run a signal (recorded before this returns)."""
        self.engine.signal(self.id, name, payload)

    def cancel(self) -> bool:
        """Cancel the run; ``False`` when it had already ended."""
        return self.engine.cancel(self.id)

    def resume(self) -> None:
        """Take a failed, aborted or cancelled run back to ``pending``."""
        self.engine.resume(self.id)

    def history(self) -> List[Event]:
        """The run's events, in recorded order."""
        return self.engine.history(self.id)

    def kv(self) -> dict:
        """The run's key-value map as recorded."""
        return self.engine.kv(self.id)

    def __repr__(self) -> str:
        return f"<flow.Run {self.id!r}>"


class Engine:
    """Start and follow workflow runs on a node (FLOW.md §3).

    Example:
        >>> from pipeproc import flow
        >>> engine = flow.Engine(pp)                                  # doctest: +SKIP
        >>> engine.start(order, "o-1", id="order-1").result(timeout=10)  # doctest: +SKIP

    Raises:
        InvalidArgument: ``pp`` is not a :class:`pipeproc.PipeProc`.
    """

    def __init__(self, pp: PipeProc) -> None:
        if not isinstance(pp, PipeProc):
            raise InvalidArgument(f"Engine takes a pipeproc.PipeProc, got {pp!r:.80}")
        self.pp = pp

    def close(self) -> None:
        """Nothing to release (the node owns the runs); for symmetry with ``with``."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, op: str, *args: Any) -> Any:
        return self.pp._call(op, *args)

    # ------------------------------------------------------------------ runs

    def start(self, workflow: Union[Workflow, str], /, *args: Any, id: Optional[str] = None,
              **kwargs: Any) -> Run:
        """Start a run of ``workflow`` (idempotent by ``id``); ``run.created`` says whether
        this call created it.

        Raises:
            InvalidWorkflow: not a workflow, or an unknown name.
            InvalidArgument: a bad id.
            InvalidPayload, PayloadTooLarge: the arguments.
            RunIdConflict: the id names a run of another workflow.
        """
        wf = lookup(workflow)
        run_id = uuid.uuid4().hex if id is None else check_name(id, "a run id")
        encode_payload([list(args), kwargs], "the workflow's arguments")
        if id is not None and wf.validate is not None:
            # validate runs only for a new run: look first (fstart decides atomically)
            existing = self._call("finfo", run_id)
            if existing is not None:
                return self._existing(run_id, existing, wf)
        first, rejected = first_event(wf, args, kwargs)
        raw, created = self._call("fstart", run_id, wf.name, wf.ref, first, wf.max_failures,
                                  wf.lease, wf.version, None, rejected)
        if not created:
            return self._existing(run_id, raw, wf)
        return Run(self, run_id, True)

    def _existing(self, run_id: str, raw: list, wf: Workflow) -> Run:
        if raw[1] != wf.name:
            raise RunIdConflict(f"run {run_id!r} exists as a run of workflow {raw[1]!r}, "
                                f"not {wf.name!r}")
        return Run(self, run_id, False)

    def run(self, id: str) -> Run:
        """A handle on an existing run.

        Raises:
            InvalidRun: no run has that id.
        """
        self._info(id)
        return Run(self, id, False)

    def _info(self, run_id: str) -> RunInfo:
        if not isinstance(run_id, str):
            raise InvalidRun(f"no run with id {run_id!r:.80}")
        raw = self._call("finfo", run_id)
        if raw is None:
            raise InvalidRun(f"no run with id {run_id!r}")
        return _info(raw)

    def _result(self, run_id: str, timeout: Optional[float]) -> Any:
        if timeout is not None:
            timeout = check_seconds(timeout, "timeout")
        if not isinstance(run_id, str):
            raise InvalidRun(f"no run with id {run_id!r:.80}")
        raw, last = self._call("fresult", run_id, timeout)
        info = _info(raw)
        if info.status == "finished":
            return last[2][3].get("result")
        if timeout == 0 and info.status not in ("failed", "aborted", "cancelled", "rejected"):
            raise Timeout(f"run {run_id!r} is {info.status}")
        raise run_error(run_id, info.status, info.error)

    def signal(self, id: str, name: str, payload: Any = None) -> None:
        """Record a signal for run ``id`` (kept for a failed, aborted or cancelled run;
        dropped for a finished or rejected one).

        Raises:
            InvalidRun: no run has that id.
            InvalidArgument: a bad name.
            InvalidPayload, PayloadTooLarge: the payload.
        """
        check_label(name, "a signal name")
        data = encode_payload(payload, "a signal payload")
        if not isinstance(id, str):
            raise InvalidRun(f"no run with id {id!r:.80}")
        self._call("fsignal", id, name, data)

    def cancel(self, id: str) -> bool:
        """Cancel run ``id``: ``False`` when it had already ended."""
        return bool(self._call("fcancel", self._id(id)))

    def resume(self, id: str) -> None:
        """Take a failed, aborted or cancelled run back to ``pending`` (``invalid_state``
        otherwise)."""
        self._call("fresume", self._id(id))

    def delete(self, id: str) -> None:
        """Remove a terminal run and its journal (``invalid_state`` otherwise)."""
        self._call("fdelete", self._id(id))

    def history(self, id: str) -> List[Event]:
        """Run ``id``'s events, in recorded order."""
        rows = self._call("fhist", self._id(id))
        return [Event(seq, body[0], body[1], ms, body[2], body[3]) for ms, seq, body in rows]

    def kv(self, id: str) -> dict:
        """Run ``id``'s key-value map as recorded."""
        out: dict = {}
        for e in self.history(id):
            if e.type == "kv":
                if e.data.get("op") == "delete":
                    out.pop(e.name, None)
                else:
                    out[e.name] = e.data.get("value")
        return out

    def runs(self, status: Union[str, Sequence[str], None] = None,
             workflow: Union[Workflow, str, None] = None,
             limit: Optional[int] = None) -> List[RunInfo]:
        """Every run matching the filters, oldest first (the newest ``limit`` of them).

        Raises:
            InvalidArgument: an unknown status, or a bad limit.
        """
        statuses: Optional[List[str]] = None
        if status is not None:
            if isinstance(status, str):
                statuses = [status]
            elif isinstance(status, (list, tuple, set, frozenset)):
                statuses = list(status)
            else:
                raise InvalidArgument(f"status must be a status or a list of them, got "
                                      f"{status!r:.80}")
            for s in statuses:
                if not isinstance(s, str) or s not in STATUSES:
                    raise InvalidArgument(f"unknown status {s!r} (one of {', '.join(STATUSES)})")
        name = None
        if workflow is not None:
            name = workflow.name if isinstance(workflow, Workflow) else workflow
            if not isinstance(name, str):
                raise InvalidArgument(f"workflow must be a Workflow or a name, got {workflow!r:.80}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise InvalidArgument(f"limit must be an int >= 1, got {limit!r:.80}")
        return [_info(r) for r in self._call("fruns", statuses, name, limit)]

    @staticmethod
    def _id(run_id: Any) -> str:
        if not isinstance(run_id, str):
            raise InvalidRun(f"no run with id {run_id!r:.80}")
        return run_id
