"""Defining workflows (FLOW.md §1) and the values they carry (§4).

Owns :func:`workflow` / :class:`Workflow` (and the process's registry of workflows by name),
:class:`Retry`, :class:`Suspend`, payload checks (:func:`encode_payload`) and the error
shapes of runs (:func:`error_info`, :func:`rebuild`, :func:`run_error`).

Client side: imports ``pipeproc._processors`` (the ``__mp_main__`` rule for scripts),
``pipeproc.errors``, msgpack and the standard library.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import math
import os
import re
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import msgpack

from .._processors import MAIN_MODULE, SCRIPT
from ..errors import (
    CODES,
    InvalidArgument,
    InvalidPayload,
    InvalidWorkflow,
    PayloadTooLarge,
    PipeProcError,
    RunAborted,
    RunCancelled,
    RunError,
    RunFailed,
    RunRejected,
    StepFailed,
)

#: the largest encoded payload (a run's arguments counted together)
MAX_PAYLOAD = 1_048_576
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Suspend(BaseException):
    """Raised by a ctx call when the run must wait (sleep, signal, child, retry back-off):
    it unwinds the workflow function, which runs again from the top when the run continues.

    A ``BaseException`` (like ``KeyboardInterrupt``): ``except Exception`` does not catch it;
    ``finally`` blocks run. A ctx call made while it unwinds raises it again."""


# ------------------------------------------------------------------------- payloads

def _type_name(value: Any) -> str:
    return type(value).__module__ + "." + type(value).__qualname__ \
        if type(value).__module__ != "builtins" else type(value).__name__


def _bad(obj: Any) -> Any:
    raise InvalidPayload(f"a payload is what msgpack carries (dict, list, tuple, str, bytes, "
                         f"int, float, bool, None); got {_type_name(obj)}")


def encode_payload(value: Any, what: str = "payload") -> bytes:
    """msgpack-encode a payload (FLOW.md §4).

    Raises:
        InvalidPayload: a value msgpack cannot carry (its type named).
        PayloadTooLarge: the encoding is over 1 MiB.
    """
    try:
        data = msgpack.packb(value, use_bin_type=True, default=_bad, strict_types=False)
    except InvalidPayload as exc:
        raise InvalidPayload(f"{what}: {exc.message}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidPayload(f"{what} cannot be encoded: {exc}") from None
    if len(data) > MAX_PAYLOAD:
        raise PayloadTooLarge(f"{what} is {len(data):,} bytes encoded, over the limit of "
                              f"{MAX_PAYLOAD:,}")
    return data


def decode_payload(data: bytes, what: str = "payload") -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (TypeError, ValueError) as exc:  # e.g. a dict with tuple keys (lists on return)
        raise InvalidPayload(f"{what} cannot be read back as it was written ({exc}): map keys "
                             "must be str, int, float, bool, None or bytes") from None


def round_trip(value: Any, what: str = "payload") -> Any:
    """The value as every replay sees it (tuples come back as lists)."""
    return decode_payload(encode_payload(value, what), what)


def check_name(value: Any, what: str) -> str:
    """A str of 1-200 characters without control characters."""
    if not isinstance(value, str) or not 1 <= len(value) <= 200 or _CONTROL_RE.search(value):
        raise InvalidArgument(f"{what} must be a str of 1-200 characters without control "
                              f"characters, got {value!r:.80}")
    return value


def check_label(value: Any, what: str) -> str:
    """A str of 1-200 characters (step, sleep, signal names; kv keys)."""
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        raise InvalidArgument(f"{what} must be a str of 1-200 characters, got {value!r:.80}")
    return value


def check_seconds(value: Any, what: str, positive: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0 or (positive and value == 0)):
        raise InvalidArgument(f"{what} must be a number of seconds {'> 0' if positive else '>= 0'}"
                              f", got {value!r:.80}")
    return float(value)


# ------------------------------------------------------------------------- errors of runs

def error_info(exc: BaseException) -> Dict[str, Any]:
    """``RunInfo.error``'s shape: type, message (without the code prefix), code."""
    if isinstance(exc, PipeProcError):
        return {"type": type(exc).__name__, "message": exc.message, "code": exc.code,
                "module": type(exc).__module__}
    return {"type": type(exc).__name__, "message": str(exc), "code": getattr(exc, "code", None)
            if isinstance(getattr(exc, "code", None), str) else None,
            "module": type(exc).__module__}


def public_error(err: Optional[dict]) -> Optional[dict]:
    """The error as ``RunInfo.error`` shows it (type, message, code)."""
    if err is None:
        return None
    return {"type": err.get("type"), "message": err.get("message"), "code": err.get("code")}


def rebuild(err: dict) -> BaseException:
    """The exception a recorded step failure raises on replay: the same type and message,
    or :class:`StepFailed` when the type cannot be rebuilt."""
    code, typ, msg = err.get("code"), err.get("type") or "Exception", err.get("message") or ""
    if code in CODES and CODES[code].__name__ == typ:
        return CODES[code](msg)
    cls: Any = None
    mod = err.get("module")
    if mod in (None, "builtins"):
        cls = getattr(builtins, typ, None)
    else:
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = importlib.import_module(mod)
            except Exception:
                m = None
        cls = getattr(m, typ, None) if m is not None else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        args = err.get("args")
        for a in ([args] if isinstance(args, list) else []) + [[msg]]:
            try:
                exc = cls(*a)
            except Exception:
                continue
            if str(exc) == msg or isinstance(exc, PipeProcError):
                return exc
    return StepFailed(f"{typ}: {msg}")


_RUN_ERRORS = {"failed": RunFailed, "aborted": RunAborted, "cancelled": RunCancelled,
               "rejected": RunRejected}


def run_error(run_id: str, status: str, err: Optional[dict]) -> RunError:
    """What ``result()`` raises for a run that ended ``status``."""
    err = err or {}
    cls = _RUN_ERRORS.get(status, RunFailed)
    detail = f": {err.get('type')}: {err.get('message')}" if err.get("type") else ""
    return cls(f"run {run_id!r} {status}{detail}", run_id=run_id, error_type=err.get("type"),
               error_message=err.get("message"), error_code=err.get("code"))


# ------------------------------------------------------------------------- Retry

class Retry:
    """How a step is tried again (FLOW.md §1).

    Args:
        intervals: waits in seconds (each ≥ 0): at most ``len(intervals) + 1`` tries,
            ``intervals[k]`` before try ``k + 2`` (``max_attempts`` is then ignored).
        initial, factor, max_interval: without ``intervals``, the wait before try ``k + 1``
            is ``min(initial * factor ** (k - 1), max_interval)``.
        max_attempts: tries at most (≥ 1), without ``intervals``.
        transient: ``transient(exc) -> bool``; an exception for which it returns false is
            not retried.

    Raises:
        InvalidArgument: a bad value.
    """

    __slots__ = ("intervals", "initial", "factor", "max_interval", "max_attempts", "transient")

    def __init__(self, intervals: Optional[Sequence[float]] = None, initial: float = 0.1,
                 factor: float = 2.0, max_interval: float = 30.0, max_attempts: int = 5,
                 transient: Optional[Callable[[BaseException], bool]] = None) -> None:
        if intervals is not None:
            if isinstance(intervals, (str, bytes)) or not hasattr(intervals, "__iter__"):
                raise InvalidArgument("intervals must be a list of seconds")
            intervals = [check_seconds(v, "each interval") for v in intervals]
        self.intervals: Optional[List[float]] = intervals
        self.initial = check_seconds(initial, "initial")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                or not math.isfinite(factor) or factor < 1:
            raise InvalidArgument(f"factor must be a number >= 1, got {factor!r}")
        self.factor = float(factor)
        self.max_interval = check_seconds(max_interval, "max_interval")
        if intervals is None and (isinstance(max_attempts, bool)
                                  or not isinstance(max_attempts, int) or max_attempts < 1):
            raise InvalidArgument(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        self.max_attempts = max_attempts
        if transient is not None and not callable(transient):
            raise InvalidArgument("transient must be a callable or None")
        self.transient = transient

    @property
    def tries(self) -> int:
        """Tries at most."""
        return len(self.intervals) + 1 if self.intervals is not None else self.max_attempts

    def wait(self, k: int) -> float:
        """Seconds to wait before try ``k + 1`` (``k`` ≥ 1: the try that failed)."""
        if self.intervals is not None:
            return self.intervals[k - 1]
        return min(self.initial * self.factor ** (k - 1), self.max_interval)

    def retries(self, exc: BaseException) -> bool:
        """Whether ``exc`` may be retried at all."""
        return self.transient is None or bool(self.transient(exc))

    def __repr__(self) -> str:
        if self.intervals is not None:
            return f"Retry(intervals={self.intervals!r})"
        return (f"Retry(initial={self.initial}, factor={self.factor}, "
                f"max_interval={self.max_interval}, max_attempts={self.max_attempts})")


# ------------------------------------------------------------------------- workflows

_registry: Dict[str, "Workflow"] = {}
_registry_lock = threading.Lock()


class Workflow:
    """A workflow: what :func:`workflow` returns (FLOW.md §1).

    Attributes:
        name: its name (default ``"module:qualname"``).
        version: a str recorded with each run.
        max_failures: failed attempts before the run ends (≥ 1).
        lease: seconds an attempt may go without recording anything.
        validate: called with the arguments by ``start`` in the caller, or ``None``.
        fn: the function.
        ref: the import path workers load it by.
    """

    def __init__(self, fn: Callable, name: str, version: str, max_failures: int, lease: float,
                 validate: Optional[Callable], ref: str) -> None:
        self.fn = fn
        self.name = name
        self.version = version
        self.max_failures = max_failures
        self.lease = lease
        self.validate = validate
        self.ref = ref
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function itself (no run, no journal): ``fn(*args, **kwargs)``."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<flow.Workflow {self.name!r} version={self.version!r}>"


def _ref_of(fn: Any) -> str:
    qual = getattr(fn, "__qualname__", "")
    module = getattr(fn, "__module__", None)
    if not inspect.isfunction(fn) or "<" in qual or "." in qual or module is None:
        raise InvalidWorkflow(f"{fn!r} is not a module-level function (lambdas, closures and "
                              "methods cannot be imported by workers)")
    if module in ("__main__", MAIN_MODULE):
        main = sys.modules.get(module)
        file = getattr(main, "__file__", None)
        if not file or not os.path.isfile(file):
            raise InvalidWorkflow(f"workflow {qual!r} is defined in an interactive session, "
                                  "which workers cannot import: define it in a module")
        return f"{SCRIPT}{os.path.abspath(file)}:{qual}"
    return f"{module}:{qual}"


def workflow(name: Optional[str] = None, version: str = "1", max_failures: int = 3,
             lease: float = 60.0, validate: Optional[Callable] = None
             ) -> Callable[[Callable], Workflow]:
    """Decorate a module-level function (sync or ``async def``) as a workflow.

    Example:
        >>> from pipeproc import flow
        >>> @flow.workflow(name="greet")
        ... def greet(ctx, who):
        ...     return ctx.step("hello", str.upper, who)

    Raises:
        InvalidWorkflow: not a module-level function, or a second workflow of that name.
        InvalidArgument: a bad option.
    """
    if callable(name) and not isinstance(name, str):  # @flow.workflow without parentheses
        return workflow()(name)  # type: ignore[return-value]
    if name is not None:
        check_name(name, "a workflow name")
    if not isinstance(version, str):
        raise InvalidArgument(f"version must be a str, got {version!r:.80}")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 1:
        raise InvalidArgument(f"max_failures must be an int >= 1, got {max_failures!r:.80}")
    lease = check_seconds(lease, "lease", positive=True)
    if validate is not None and not callable(validate):
        raise InvalidArgument("validate must be a callable or None")

    def decorate(fn: Callable) -> Workflow:
        if not callable(fn):
            raise InvalidWorkflow(f"a workflow is a function, got {fn!r:.80}")
        ref = _ref_of(fn)
        module = "__main__" if fn.__module__ == MAIN_MODULE else fn.__module__
        wf_name = name or f"{module}:{fn.__qualname__}"
        wf = Workflow(fn, wf_name, version, max_failures, lease, validate, ref)
        with _registry_lock:
            old = _registry.get(wf_name)
            if old is not None and old.ref != ref:
                raise InvalidWorkflow(f"a second workflow named {wf_name!r} in this process "
                                      f"({old.ref} and {ref})")
            _registry[wf_name] = wf
        return wf
    return decorate


def lookup(workflow: Any) -> Workflow:
    """A :class:`Workflow`, or the one registered under that name in this process."""
    if isinstance(workflow, Workflow):
        return workflow
    if isinstance(workflow, str):
        wf = _registry.get(workflow)
        if wf is not None:
            return wf
        raise InvalidWorkflow(f"no workflow named {workflow!r} in this process (import the "
                              "module that defines it first)")
    raise InvalidWorkflow(f"not a workflow: {workflow!r:.80}")
