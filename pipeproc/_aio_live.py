"""Live procs of the asyncio client: :class:`AsyncLiveProc` (SPEC §7), the twin of
:class:`pipeproc.LiveProc`.

Its waits are parked requests on the client's one connection (:meth:`AsyncPipeProc._call`
with an ``orphan`` callback that hands back a claim arriving after its caller was
cancelled).

Client side: imports ``_calls`` and ``errors`` (the client hands itself in: this module
never imports ``aio``, which re-exports :class:`AsyncLiveProc`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable, List, Optional, Union

from . import _calls
from ._calls import AckCommit, ProcState, _claim_key, documented, live_spec
from ._protocol import ERR
from .errors import ConnectionLost, InvalidProc, NoActiveNode, PipeProcError

log = logging.getLogger("pipeproc.aio")


class AsyncLiveProc:
    """Logs of a topic delivered as they are committed (``async for``), with explicit acks.

    Created by :meth:`AsyncPipeProc.live_proc`. It runs on a hidden proc
    ``liveproc-<uuid>`` owned by the client's connection (the node destroys it when that
    connection goes away). Its waits are parked requests on the client's connection, so they
    hold up none of the client's other calls. Iteration ends after :meth:`cancel` or
    :meth:`destroy`. A wait that is cancelled hands a claim that arrives afterwards back to
    the node (reclaimed, so it is delivered again).

    Example:
        >>> import asyncio, tempfile
        >>> import pipeproc.aio
        >>> async def main():
        ...     async with await pipeproc.aio.spawn(tempfile.mkdtemp(), workers=0) as pp:
        ...         live = await pp.live_proc("events", mode="all")
        ...         await pp.commit({"topic": "events", "body": {"n": 1}})
        ...         async for log in live:
        ...             await live.ack()
        ...             break
        ...         await live.cancel()
        ...         return log.body
        >>> asyncio.run(main())
        {'n': 1}
    """

    def __init__(self, pp: Any, topic: str, *, mode: str = "live",
                 count: int = 1) -> None:
        self.name, self.offset = live_spec(topic, mode, count)
        self._pp = pp
        self.topic = topic
        self.mode = mode
        self.count = count
        self._last: Any = None
        self._cancelled = False
        self._task: Optional[asyncio.Task] = None

    async def _create(self) -> None:
        await self._pp._run(_calls.create_live(self.topic, self.name, self.offset))

    def _hand_back(self, reply: list) -> None:
        """A claim answered to a wait whose caller was cancelled: reclaim it."""
        if reply[1] == ERR or reply[2] is None:
            return
        try:
            key = _claim_key(_calls._claim_result(reply[2], self.count, self.name), self.name)
        except PipeProcError:  # pragma: no cover - an empty claim
            return
        self._pp._send_quietly("reclaim", self.name, key)

    # -- delivery

    def __aiter__(self) -> "AsyncLiveProc":
        return self

    async def __anext__(self) -> Any:
        """Wait until logs are claimed for this live proc (a Log, or a list when count > 1).

        Raises:
            StopAsyncIteration: the live proc was cancelled or destroyed.
            InvalidAck: the last delivery is neither acked nor reclaimed (call ``ack()``
                or ``reclaim()`` first: waiting would be forever).
            ConnectionLost: the node went away (also a clean shutdown): never a normal end.
        """
        if self._cancelled:
            raise StopAsyncIteration
        call = _calls.live_next(self.topic, self.name, self.offset, self.count, self._last)
        try:
            res = await self._pp._call(call.op, *call.args, orphan=self._hand_back)
        except (NoActiveNode, ConnectionLost):
            if self._cancelled:
                raise StopAsyncIteration from None
            raise
        logs = call.shape(res)
        if logs is None:
            raise StopAsyncIteration
        self._last = logs
        return logs

    def changes(self, callback: Callable[["AsyncLiveProc", Any], Any]) -> "AsyncLiveProc":
        """Call ``callback(live, logs)`` for each delivery, in a task of the running loop.

        The callback may be a plain function or a coroutine function; it acks explicitly.
        An exception in it reclaims the logs. :meth:`cancel` stops the task.

        Returns:
            This live proc.
        """
        async def run() -> None:
            try:
                async for logs in self:
                    try:
                        res = callback(self, logs)
                        if inspect.isawaitable(res):
                            await res
                    except Exception:
                        log.exception("live proc callback failed; reclaiming")
                        try:
                            await self.reclaim()
                        except PipeProcError:
                            pass
            except PipeProcError as exc:
                if not self._cancelled:
                    log.warning("live proc %s stopped: %s", self.name, exc)
        self._task = asyncio.get_running_loop().create_task(run(), name=self.name)
        return self

    # -- proc operations on the hidden proc

    @documented
    async def ack(self) -> str:
        return await self._pp.ack(self.name, claimed=self._last)

    @documented
    async def ack_commit(self, log_or_logs: Union[dict, List[dict]]) -> AckCommit:
        return await self._pp.ack_commit(self.name, log_or_logs, claimed=self._last)

    @documented
    async def reclaim(self) -> str:
        return await self._pp.reclaim(self.name, claimed=self._last)

    @documented
    async def inspect(self) -> ProcState:
        return await self._pp.inspect_proc(self.name)

    @documented
    async def disable(self) -> ProcState:
        return await self._pp.disable_proc(self.name)

    @documented
    async def resume(self) -> ProcState:
        return await self._pp.resume_proc(self.name)

    @documented
    async def destroy(self) -> ProcState:
        return await self._pp.destroy_proc(self.name)

    async def cancel(self) -> None:
        """Stop delivery and destroy the hidden proc (waits for a :meth:`changes` task)."""
        if self._cancelled:
            return
        self._cancelled = True
        try:
            await self._pp.destroy_proc(self.name)
        except (InvalidProc, NoActiveNode, ConnectionLost):
            pass
        t, self._task = self._task, None
        if t is not None and t is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(t), 5)
            except asyncio.TimeoutError:  # pragma: no cover - a node that stopped answering
                t.cancel()

    async def __aenter__(self) -> "AsyncLiveProc":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.cancel()

    def __repr__(self) -> str:
        return f"<AsyncLiveProc {self.name} on {self.topic!r} mode={self.mode}>"
