"""Every failure pipeproc raises, and the code <-> class table used on both sides of the socket.

The tree::

    PipeProcError                      .code is one of the SPEC's error codes
    ├── PipeProcArgumentError          (also ValueError and TypeError) bad arguments
    │   ├── InvalidTopicFormat         invalid_topic_format
    │   ├── InvalidLogFormat           invalid_log_format
    │   ├── InvalidProcName            invalid_proc_name
    │   ├── InvalidArgument            invalid_argument
    │   ├── InvalidRangeOffset         invalid_range_offset
    │   └── InvalidProcessor           invalid_processor
    ├── InvalidTopic                   invalid_topic          (also LookupError)
    ├── InvalidToneIdSearch            invalid_tone_id_search (also LookupError)
    ├── InvalidProc                    invalid_proc           (also LookupError)
    ├── ProcNameNotUnique              proc_name_not_unique
    ├── ProcIsDisabled                 proc_is_disabled
    ├── ProcAlreadyDisabled            proc_already_disabled
    ├── ProcAlreadyActive              proc_already_active
    ├── NothingToReclaim               nothing_to_reclaim
    ├── InvalidAck                     invalid_ack
    ├── StaleClaim                     stale_claim
    ├── NodeAlreadyActive              node_already_active
    ├── StorageFull                    storage_full
    ├── StoreCorrupted                 store_corrupted
    ├── NoActiveNode                   no_active_node         (also ConnectionError)
    ├── AuthFailed                     auth_failed            (also ConnectionError)
    ├── ConnectionLost                 connection_lost        (also ConnectionError)
    ├── Timeout                        timeout                (also TimeoutError)
    ├── InternalError                  internal_error: a bug in pipeproc, reported, never a crash
    │
    │   workflows (``pipeproc.flow``, FLOW.md §4):
    ├── PipeProcArgumentError
    │   ├── InvalidWorkflow            invalid_workflow
    │   ├── InvalidPayload             invalid_payload
    │   └── PayloadTooLarge            payload_too_large
    ├── InvalidRun                     invalid_run            (also LookupError)
    ├── RunIdConflict                  run_id_conflict
    ├── InvalidState                   invalid_state
    ├── NonDeterminism                 non_determinism
    ├── StepFailed                     step_failed
    ├── Reject                         rejected
    └── RunError                       a run ended otherwise than finished
        ├── RunFailed                  run_failed
        ├── RunAborted                 run_aborted
        ├── RunCancelled               run_cancelled
        └── RunRejected                run_rejected

Errors cross the socket as ``(code, message)`` and are rebuilt with :func:`from_code`, so
a client catches the same class the node raised.

Example:
    >>> import pipeproc
    >>> try:
    ...     raise pipeproc.errors.from_code("invalid_topic", "topic 'x' does not exist")
    ... except pipeproc.PipeProcError as e:
    ...     print(e.code)
    invalid_topic
"""

from __future__ import annotations

__all__ = [
    "PipeProcError",
    "PipeProcArgumentError",
    "InvalidTopicFormat",
    "InvalidLogFormat",
    "InvalidProcName",
    "InvalidArgument",
    "InvalidRangeOffset",
    "InvalidProcessor",
    "InvalidTopic",
    "InvalidToneIdSearch",
    "InvalidProc",
    "ProcNameNotUnique",
    "InvalidWorkflow", "InvalidPayload", "PayloadTooLarge", "InvalidRun", "RunIdConflict",
    "InvalidState", "NonDeterminism", "StepFailed", "Reject", "RunError", "RunFailed",
    "RunAborted", "RunCancelled", "RunRejected",
    "ProcIsDisabled",
    "ProcAlreadyDisabled",
    "ProcAlreadyActive",
    "NothingToReclaim",
    "InvalidAck",
    "StaleClaim",
    "NodeAlreadyActive",
    "StorageFull",
    "StoreCorrupted",
    "NoActiveNode",
    "AuthFailed",
    "ConnectionLost",
    "Timeout",
    "InternalError",
    "from_code",
    "CODES",
]


class PipeProcError(Exception):
    """Root of every error pipeproc raises; ``.code`` is the SPEC's error code."""

    code: str = "internal_error"

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(message, *args)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}" if self.message else self.code

    def __reduce__(self):  # keep pickling (e.g. by test runners) working for every subclass
        return (type(self), (self.message,))


class PipeProcArgumentError(PipeProcError, ValueError, TypeError):
    """A call's arguments are malformed; raised before anything is written.

    It is both a ``ValueError`` and a ``TypeError`` so either builtin catches it.
    """


class InvalidTopicFormat(PipeProcArgumentError):
    """A topic name does not match ``^[A-Za-z0-9_-]{1,200}$``."""

    code = "invalid_topic_format"


class InvalidLogFormat(PipeProcArgumentError):
    """A log or its body is missing or holds a type msgpack cannot carry."""

    code = "invalid_log_format"


class InvalidProcName(PipeProcArgumentError):
    """A proc name is empty, longer than 200 characters or holds control characters."""

    code = "invalid_proc_name"


class InvalidArgument(PipeProcArgumentError):
    """Any other argument has the wrong type or value."""

    code = "invalid_argument"


class InvalidRangeOffset(PipeProcArgumentError):
    """A range bound or proc offset is not one of the forms of SPEC §4."""

    code = "invalid_range_offset"


class InvalidProcessor(PipeProcArgumentError):
    """A system proc processor cannot be loaded by the workers."""

    code = "invalid_processor"


class InvalidTopic(PipeProcError, LookupError):
    """range / revrange / length of a topic that never had a commit."""

    code = "invalid_topic"


class InvalidToneIdSearch(PipeProcError, LookupError):
    """A ``:seq`` bound names a sequence that does not exist (never committed, or collected)."""

    code = "invalid_tone_id_search"


class InvalidProc(PipeProcError, LookupError):
    """The named proc does not exist."""

    code = "invalid_proc"


class ProcNameNotUnique(PipeProcError):
    """The proc name is already used on another topic."""

    code = "proc_name_not_unique"


class ProcIsDisabled(PipeProcError):
    """proc / reclaim on a disabled proc."""

    code = "proc_is_disabled"


class ProcAlreadyDisabled(PipeProcError):
    """disable_proc on a proc that is already disabled."""

    code = "proc_already_disabled"


class ProcAlreadyActive(PipeProcError):
    """resume_proc on a proc that is already active."""

    code = "proc_already_active"


class NothingToReclaim(PipeProcError):
    """reclaim with no pending claim."""

    code = "nothing_to_reclaim"


class InvalidAck(PipeProcError):
    """ack with nothing pending and nothing ever acked; ack_commit with nothing pending."""

    code = "invalid_ack"


class StaleClaim(PipeProcError):
    """``claimed=`` logs are not exactly the proc's pending claim."""

    code = "stale_claim"


class NodeAlreadyActive(PipeProcError):
    """spawn on a location (or address) that a running node already owns."""

    code = "node_already_active"


class StorageFull(PipeProcError):
    """The store cannot grow (disk or map full); nothing of that request was written."""

    code = "storage_full"


class StoreCorrupted(PipeProcError):
    """The store is damaged: a record whose checksum fails, a record that cannot be decoded,
    or files of an existing store missing or truncated. The message names what and where
    (topic and seq, proc, or file path); damaged data is never returned as data.
    ``pipeproc check`` lists every damaged record."""

    code = "store_corrupted"


class NoActiveNode(PipeProcError, ConnectionError):
    """A call on a client that is not connected, or a connect with no node there."""

    code = "no_active_node"


class AuthFailed(PipeProcError, ConnectionError):
    """connect with the wrong authkey."""

    code = "auth_failed"


class ConnectionLost(PipeProcError, ConnectionError):
    """The node went away during a call."""

    code = "connection_lost"


class Timeout(PipeProcError, TimeoutError):
    """A call given a timeout that ran out."""

    code = "timeout"


class InternalError(PipeProcError):
    """An unexpected failure inside pipeproc (a bug); the node keeps running."""

    code = "internal_error"


class InvalidWorkflow(PipeProcArgumentError):
    """Not a workflow, an unknown workflow name, or a workflow workers cannot import."""

    code = "invalid_workflow"


class InvalidPayload(PipeProcArgumentError):
    """A workflow argument, step result, signal payload or kv value msgpack cannot carry."""

    code = "invalid_payload"


class PayloadTooLarge(PipeProcArgumentError):
    """A payload whose encoding is over 1 MiB (a run's arguments counted together)."""

    code = "payload_too_large"


class InvalidRun(PipeProcError, LookupError):
    """A run id that names no run."""

    code = "invalid_run"


class RunIdConflict(PipeProcError):
    """A start with the id of an existing run of another workflow."""

    code = "run_id_conflict"


class InvalidState(PipeProcError):
    """An operation the run's status does not allow (resume, delete)."""

    code = "invalid_state"


class NonDeterminism(PipeProcError):
    """The workflow's code called something else than its run recorded at a position."""

    code = "non_determinism"


class StepFailed(PipeProcError):
    """The replay of a recorded step failure whose exception type cannot be rebuilt."""

    code = "step_failed"


class Reject(PipeProcError):
    """Raised by workflow code (or ``validate``) to reject a run: it ends ``rejected``."""

    code = "rejected"


class RunError(PipeProcError):
    """A run ended otherwise than ``finished``: what ``run.result()`` and ``ctx.child`` raise.

    Attributes:
        run_id: the run's id.
        error_type: the exception class name of the run's error (or ``None``).
        error_message: its message (or ``None``).
        error_code: its ``.code`` when it had one.
    """

    def __init__(self, message: str = "", run_id: str | None = None,
                 error_type: str | None = None, error_message: str | None = None,
                 error_code: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.error_type = error_type
        self.error_message = error_message
        self.error_code = error_code


class RunFailed(RunError):
    """The run ended ``failed``."""

    code = "run_failed"


class RunAborted(RunError):
    """The run ended ``aborted`` (its last attempt was interrupted)."""

    code = "run_aborted"


class RunCancelled(RunError):
    """The run was cancelled."""

    code = "run_cancelled"


class RunRejected(RunError):
    """The run was rejected (``flow.Reject`` or ``validate``)."""

    code = "run_rejected"


CODES: dict[str, type[PipeProcError]] = {
    cls.code: cls
    for cls in (
        InvalidTopicFormat, InvalidLogFormat, InvalidProcName, InvalidArgument,
        InvalidRangeOffset, InvalidProcessor, InvalidTopic, InvalidToneIdSearch, InvalidProc,
        ProcNameNotUnique, ProcIsDisabled, ProcAlreadyDisabled, ProcAlreadyActive,
        NothingToReclaim, InvalidAck, StaleClaim, NodeAlreadyActive, StorageFull,
        StoreCorrupted,
        NoActiveNode, AuthFailed, ConnectionLost, Timeout, InternalError,
        InvalidWorkflow, InvalidPayload, PayloadTooLarge, InvalidRun, RunIdConflict,
        InvalidState, NonDeterminism, StepFailed, Reject, RunFailed, RunAborted,
        RunCancelled, RunRejected,
    )
}


def from_code(code: str, message: str = "") -> PipeProcError:
    """Rebuild the error for ``code`` (as sent over the socket) with its message.

    Args:
        code: an error code such as ``"invalid_topic"``; unknown codes give ``InternalError``.
        message: the human-readable message.

    Returns:
        An instance of the matching :class:`PipeProcError` subclass.
    """
    cls = CODES.get(code, InternalError)
    return cls(message)
