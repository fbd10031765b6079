"""Live procs: follow a topic from the application's own process (SPEC §7).

A live proc runs on a hidden proc ``liveproc-<uuid>`` created by ``live_proc()`` itself.
It holds a connection of its own for its blocking waits, and the node ties the hidden proc
to that connection: ``cancel()`` destroys it, and so does the node if the application dies,
so hidden procs never pile up on disk or hold back the GC.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any, Callable, Iterator, List, Optional, Union

from . import _ids
from ._protocol import ERR, REPLY_LIMIT, decode, pack
from .errors import ConnectionLost, InvalidArgument, InvalidProc, NoActiveNode, PipeProcError, from_code

log = logging.getLogger("pipeproc.live")


def _held(last: Any) -> Optional[int]:
    """The claim counter of a live proc's last delivery (``None`` before the first): the
    node answers ``invalid_ack`` when that very claim is still pending."""
    claim = getattr(last, "_claim", None)
    return claim[1] if claim is not None and isinstance(claim[1], int) else None


def live_spec(topic: str, mode: str, count: int) -> tuple:
    """Check a live proc's arguments; its hidden proc's name and offset (both clients)."""
    from ._client import _check_count
    _ids.check_topic(topic)
    if mode not in ("live", "all"):
        raise InvalidArgument("mode is 'live' or 'all'")
    _check_count(count)
    return f"liveproc-{uuid.uuid4()}", (">" if mode == "all" else "$>")


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
        self._conn = pp._connect()
        self._request("create_live", topic, self.name, self.offset)

    def _request(self, op: str, *args: Any) -> Any:
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
        try:
            res = self._request("live", self.topic, self.name, self.offset, self.count, None,
                                _held(self._last))
        except ConnectionLost:
            if self._cancelled:
                raise StopIteration from None
            raise
        if res is None:
            raise StopIteration
        from ._client import _claim_result
        logs = _claim_result(res, self.count, self.name)
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

    def ack(self) -> str:
        """Ack the last delivery."""
        return self._pp.ack(self.name, claimed=self._last)

    def ack_commit(self, log_or_logs: Union[dict, List[dict]]) -> Any:
        """Ack the last delivery and commit log(s), atomically."""
        return self._pp.ack_commit(self.name, log_or_logs, claimed=self._last)

    def reclaim(self) -> str:
        """Hand the last delivery back; it is delivered again."""
        return self._pp.reclaim(self.name, claimed=self._last)

    def inspect(self) -> Any:
        """The hidden proc's state."""
        return self._pp.inspect_proc(self.name)

    def disable(self) -> Any:
        return self._pp.disable_proc(self.name)

    def resume(self) -> Any:
        return self._pp.resume_proc(self.name)

    def destroy(self) -> Any:
        """Destroy the hidden proc (delivery ends)."""
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
