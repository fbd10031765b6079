"""pipeproc: an embedded, multi-process commit-log processor.

Spawn one node process that owns an LMDB store of topics; commit logs, read them back and
consume them with procs from any process; let a supervised worker pool run processors.

Example:
    >>> import pipeproc, tempfile
    >>> with pipeproc.spawn(tempfile.mkdtemp(), workers=0) as pp:
    ...     ids = pp.commit([{"topic": "numbers", "body": {"n": 1}},
    ...                      {"topic": "numbers", "body": {"n": 2}}])
    ...     [log.body["n"] for log in pp.range("numbers")]
    [1, 2]
"""

from . import errors
from ._client import AckCommit, Log, PipeProc, ProcState, connect, spawn
from ._live import LiveProc
from .errors import (
    AuthFailed,
    ConnectionLost,
    InternalError,
    InvalidAck,
    InvalidArgument,
    InvalidLogFormat,
    InvalidProc,
    InvalidProcessor,
    InvalidProcName,
    InvalidRangeOffset,
    InvalidToneIdSearch,
    InvalidTopic,
    InvalidTopicFormat,
    NoActiveNode,
    NodeAlreadyActive,
    NothingToReclaim,
    PipeProcArgumentError,
    PipeProcError,
    ProcAlreadyActive,
    ProcAlreadyDisabled,
    ProcIsDisabled,
    ProcNameNotUnique,
    StaleClaim,
    StorageFull,
    StoreCorrupted,
    Timeout,
)

__version__ = "0.1.0"

__all__ = [
    "spawn", "connect", "PipeProc", "Log", "ProcState", "AckCommit", "LiveProc", "errors",
    "PipeProcError", "PipeProcArgumentError", "InvalidTopicFormat", "InvalidLogFormat",
    "InvalidProcName", "InvalidArgument", "InvalidRangeOffset", "InvalidProcessor",
    "InvalidTopic", "InvalidToneIdSearch", "InvalidProc", "ProcNameNotUnique",
    "ProcIsDisabled", "ProcAlreadyDisabled", "ProcAlreadyActive", "NothingToReclaim",
    "InvalidAck", "StaleClaim", "NodeAlreadyActive", "StorageFull", "StoreCorrupted",
    "NoActiveNode",
    "AuthFailed", "ConnectionLost", "Timeout", "InternalError", "__version__",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "pipeproc"
del _name, _obj
