"""Live procs: follow a topic from the application's own process (SPEC §7).

A live proc runs on a hidden proc ``liveproc-<uuid>`` created by ``live_proc()`` itself.
It holds a connection of its own for its blocking waits, and the node ties the hidden proc
to that connection: ``cancel()`` destroys it, and so does the node if the application dies,
so hidden procs never pile up on disk or hold back the GC.

Client side: imports ``_calls``, ``_protocol`` and ``errors`` (the client hands itself in:
this module never imports ``_client``).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Iterator, List, Optional, Union

from . import _calls
from ._calls import AckCommit, ProcState, documented, live_spec
from ._protocol import ERR, REPLY_LIMIT, Channel, decode, pack
from .errors import ConnectionLost, InvalidProc, NoActiveNode, PipeProcError, from_code

log = logging.getLogger("pipeproc.live")


class LiveProc:
    """Logs of a topic delivered as they are committed, with explicit acks.

    Example:
        >>> import pipeproc, tempfile
        >>> with pipeproc.spawn(tempfile.mkdtemp(), workers=0) as pp:
        ...     live = pp.live_proc("events", mode="all")
        ...     _ = pp.commit({"topic": "events", "body": {"n": 1}})
        ...     for log in live:
        ...         print(log.body)
        ...         _ = live.ack()
        ...         break
        ...     live.cancel()
        {'n': 1}
    """

    def __init__(self, pp: Any, topic: str, *, mode: str = "live", count: int = 1) -> None:
        self.name, self.offset = live_spec(topic, mode, count)
        self._pp = pp
        self.topic = topic
        self.mode = mode
        self.count = count
        self._last: Any = None
        self._cancelled = False
        self._thread: Optional[threading.Thread] = None
        self._rid = 0
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._conn: Optional[Channel] = pp._connect()
        call = _calls.create_live(topic, self.name, self.offset)
        self._request(call.op, *call.args)

    def _request(self, op: Optional[str], *args: Any) -> Any:
        with self._lock:
            if self._conn is None:
                raise NoActiveNode("this live proc is cancelled")
            if os.getpid() != self._pid:  # its connection is the parent's (os.fork)
                raise NoActiveNode("a live proc belongs to the process that created it; "
                                   "create another one in this process")
            self._rid += 1
            try:
                self._conn.send_bytes(pack([self._rid, op, *args]))
                reply = decode(self._conn.recv_bytes(REPLY_LIMIT))
            except (OSError, EOFError, TypeError, AttributeError) as exc:
                if self._cancelled or self._pp._closed:
                    return None  # cancelled, or its client closed: delivery ends
                raise ConnectionLost(f"the node went away: {exc}") from None
        if reply[1] == ERR:
            raise from_code(*reply[2])
        return reply[2]

    # -- delivery

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        """Block until logs are claimed for this live proc (a Log, or a list when count > 1).

        Raises:
            InvalidAck: the last delivery is neither acked nor reclaimed (call ``ack()``
                or ``reclaim()`` first: waiting would be forever).
            ConnectionLost: the node went away (also a clean shutdown): never a normal end.
        """
        if self._cancelled:
            raise StopIteration
        call = _calls.live_next(self.topic, self.name, self.offset, self.count, self._last)
        try:
            res = self._request(call.op, *call.args)
        except ConnectionLost:
            if self._cancelled:
                raise StopIteration from None
            raise
        logs = call.shape(res)
        if logs is None:
            raise StopIteration
        self._last = logs
        return logs

    def changes(self, callback: Callable[["LiveProc", Any], Any]) -> "LiveProc":
        """Call ``callback(live, logs)`` on a background thread for each delivery.

        The callback acks explicitly; an exception in it reclaims the logs.
        """
        def run() -> None:
            try:
                for logs in self:
                    try:
                        callback(self, logs)
                    except Exception:
                        log.exception("live proc callback failed; reclaiming")
                        try:
                            self.reclaim()
                        except PipeProcError:
                            pass
            except PipeProcError as exc:
                if not self._cancelled:
                    log.warning("live proc %s stopped: %s", self.name, exc)
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        return self

    # -- proc operations on the hidden proc

    @documented
    def ack(self) -> str:
        return self._pp.ack(self.name, claimed=self._last)

    @documented
    def ack_commit(self, log_or_logs: Union[dict, List[dict]]) -> AckCommit:
        return self._pp.ack_commit(self.name, log_or_logs, claimed=self._last)

    @documented
    def reclaim(self) -> str:
        return self._pp.reclaim(self.name, claimed=self._last)

    @documented
    def inspect(self) -> ProcState:
        return self._pp.inspect_proc(self.name)

    @documented
    def disable(self) -> ProcState:
        return self._pp.disable_proc(self.name)

    @documented
    def resume(self) -> ProcState:
        return self._pp.resume_proc(self.name)

    @documented
    def destroy(self) -> ProcState:
        return self._pp.destroy_proc(self.name)

    def cancel(self) -> None:
        """Stop delivery and destroy the hidden proc."""
        if self._cancelled:
            return
        self._cancelled = True
        try:
            self._pp.destroy_proc(self.name)
        except (InvalidProc, NoActiveNode, ConnectionLost):
            pass
        # destroying the hidden proc answers a parked wait with "the end"; the iterating
        # thread then releases the connection and we close it
        if self._lock.acquire(timeout=5):
            try:
                conn, self._conn = self._conn, None
            finally:
                self._lock.release()
        else:  # pragma: no cover - a node that stopped answering
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)

    def __enter__(self) -> "LiveProc":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()

    def __repr__(self) -> str:
        return f"<LiveProc {self.name} on {self.topic!r} mode={self.mode}>"
