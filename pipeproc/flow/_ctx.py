"""The contexts a workflow gets (FLOW.md §2): :class:`Context` (sync workflows),
:class:`AsyncContext` (``async def``: ``step``, ``sleep``, ``wait_signal``, ``signal``,
``child`` and ``start`` are awaited, each taking its position when called) and :class:`KV`
(``ctx.kv``) — thin faces over one :class:`~pipeproc.flow._replay.Attempt`.

Client side: imports ``pipeproc.flow._replay``, ``pipeproc.flow._defs``, ``pipeproc.errors``
and the standard library.
"""

from __future__ import annotations

import asyncio
import inspect
import random as _random
import time
import uuid as _uuid
from typing import Any, Callable, Optional

from ._defs import Retry, check_label
from ._replay import Attempt, _check_fn

class _Face:
    """What both contexts share: the attributes and the plain (non-waiting) calls."""

    def __init__(self, att: Attempt) -> None:
        self._att = att
        self.run_id: str = att.run_id
        self.workflow: str = att.workflow
        self.attempt: int = att.attempt
        self.parent_id: Optional[str] = att.parent
        self.kv = KV(att)

    def patched(self, change_id: str) -> bool:
        """``True`` the first time the run reaches this (records a marker); ``False`` in a
        run that had already gone past here without it."""
        return self._att.patched(change_id)

    def now(self) -> float:
        """Epoch seconds, recorded (identical on replay)."""
        return self._att.value("now", time.time)

    def random(self) -> float:
        """A float in [0, 1), recorded (identical on replay)."""
        return self._att.value("random", _random.random)

    def uuid(self) -> str:
        """A uuid4 hex string, recorded (identical on replay)."""
        return self._att.value("uuid", lambda: _uuid.uuid4().hex)

    def log(self, message: str, **fields: Any) -> None:
        """Record ``message`` and ``fields`` once, as a ``log`` event."""
        self._att.log(message, fields)


class KV:
    """The run's key-value map (``ctx.kv``): ``get``/``items`` see earlier positions only."""

    def __init__(self, att: Attempt) -> None:
        self._att = att

    def get(self, key: str, default: Any = None) -> Any:
        self._att.guard()
        check_label(key, "a kv key")
        return self._att.kv.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._att.kv_op("set", key, value)

    def incr(self, key: str, n: int = 1) -> int:
        return self._att.kv_op("incr", key, n=n)

    def delete(self, key: str) -> None:
        self._att.kv_op("delete", key)

    def items(self) -> dict:
        self._att.guard()
        return dict(self._att.kv)


class Context(_Face):
    """The context of a sync workflow (FLOW.md §2)."""

    def step(self, name: str, fn: Callable, /, *args: Any, retry: Optional[Retry] = None,
             **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once for the run: its result is recorded before this
        returns, and every replay returns the record."""
        att = self._att
        check_label(name, "a step name")
        _check_fn(fn)
        pos, rec = att.step_start(name, retry)
        if rec is not None:
            return att.recorded(rec)
        tries = att.tries_before(pos)
        while True:
            tries += 1
            try:
                result = fn(*args, **kwargs)
                if inspect.isawaitable(result):  # an async fn in a sync workflow
                    result = att.loop_of().run_until_complete(_awaited(result))
            except Exception as exc:
                time.sleep(att.retry_wait(pos, name, retry, exc, tries))
                continue
            return att.step_done(pos, name, result)

    def sleep(self, name: str, seconds: float) -> None:
        """Wait ``seconds`` durably (no worker held)."""
        self._att.sleep(name, seconds)

    def wait_signal(self, name: str, timeout: Optional[float] = None) -> Any:
        """The payload of the next signal ``name`` (``None`` after ``timeout``)."""
        return self._att.wait_signal(name, timeout)

    def signal(self, run_id: str, name: str, payload: Any = None) -> None:
        """Send a signal to another run, once."""
        self._att.send(run_id, name, payload)

    def child(self, workflow: Any, /, *args: Any, id: Optional[str] = None,
              **kwargs: Any) -> Any:
        """Start a child run and wait for its result (no worker held)."""
        att = self._att
        cid = att.start_child("child", workflow, args, kwargs, id)
        done, result = att.child_outcome(cid)
        if done:
            return result
        raise att.suspend(child=cid)

    def start(self, workflow: Any, /, *args: Any, id: Optional[str] = None,
              **kwargs: Any) -> str:
        """Start another run (no parent link, no wait); returns its id."""
        return self._att.start_child("start", workflow, args, kwargs, id)


class AsyncContext(_Face):
    """The context of an ``async def`` workflow: ``step``, ``sleep``, ``wait_signal``,
    ``signal``, ``child`` and ``start`` are awaited; each takes its position when called."""

    def step(self, name: str, fn: Callable, /, *args: Any, retry: Optional[Retry] = None,
             **kwargs: Any) -> Any:
        att = self._att
        check_label(name, "a step name")
        _check_fn(fn)
        pos, rec = att.step_start(name, retry)

        async def run() -> Any:
            if rec is not None:
                return att.recorded(rec)
            tries = att.tries_before(pos)
            while True:
                tries += 1
                try:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:
                    await asyncio.sleep(att.retry_wait(pos, name, retry, exc, tries))
                    continue
                return att.step_done(pos, name, result)
        return run()

    def sleep(self, name: str, seconds: float) -> Any:
        return _now(lambda: self._att.sleep(name, seconds))

    def wait_signal(self, name: str, timeout: Optional[float] = None) -> Any:
        return _now(lambda: self._att.wait_signal(name, timeout))

    def signal(self, run_id: str, name: str, payload: Any = None) -> Any:
        return _now(lambda: self._att.send(run_id, name, payload))

    def child(self, workflow: Any, /, *args: Any, id: Optional[str] = None,
              **kwargs: Any) -> Any:
        att = self._att
        try:
            cid = att.start_child("child", workflow, args, kwargs, id)
        except BaseException as exc:
            return _raise(exc)

        async def wait() -> Any:
            done, result = att.child_outcome(cid)
            if done:
                return result
            raise att.suspend(child=cid)
        return wait()

    def start(self, workflow: Any, /, *args: Any, id: Optional[str] = None,
              **kwargs: Any) -> Any:
        return _now(lambda: self._att.start_child("start", workflow, args, kwargs, id))


def _now(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` now (its position is taken at the call) and return an awaitable of its
    outcome."""
    try:
        value = fn()
    except BaseException as exc:
        return _raise(exc)

    async def done() -> Any:
        return value
    return done()


async def _raise(exc: BaseException) -> Any:
    raise exc


async def _awaited(aw: Any) -> Any:
    return await aw
