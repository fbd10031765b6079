"""Executing one attempt of a run, in a worker loop (FLOW.md §3, "Execution").

The worker loop hands :func:`execute` the claim the node sent (the run, its token and its
journal) and a ``call(op, *args)`` over its own connection; the attempt's records go to the
node with ``frec``, its end comes back as the outcome the loop sends with its next ``work``
request (one round trip: the end of this attempt and the next claim).

Client side: imports ``pipeproc.flow._ctx``, ``pipeproc.flow._replay``,
``pipeproc.flow._defs``, ``pipeproc._processors``, ``pipeproc.errors`` and the standard
library.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable, Dict, Optional

from .._processors import load
from ..errors import (
    InvalidPayload,
    InvalidWorkflow,
    NonDeterminism,
    PayloadTooLarge,
    PipeProcError,
    Reject,
    RunIdConflict,
)
from ._ctx import AsyncContext, Context
from ._replay import Attempt, Cancelled, Fenced
from ._defs import Suspend, Workflow, error_info, round_trip

log = logging.getLogger("pipeproc.flow")

#: errors that end a run ``failed`` at once, without another attempt (FLOW.md §3)
FATAL = (NonDeterminism, InvalidPayload, PayloadTooLarge, RunIdConflict, InvalidWorkflow)


def execute(claim: list, call: Callable[..., Any],
            cancelled: Callable[[str, int], bool] = lambda run, token: False
            ) -> Optional[Dict[str, Any]]:
    """Run one attempt; returns the end to send with the next ``work`` request (``None``
    when the attempt was fenced off: it records nothing more).

    An attempt that needs an event loop (an ``async def`` workflow, an async step ``fn``)
    gets its own, closed at the attempt's end after cancelling what is left on it (the
    other members of an ``asyncio.gather`` that raised ``Suspend``): nothing of an attempt
    runs on after it."""
    loops: list = []

    def loop_of() -> asyncio.AbstractEventLoop:
        if not loops:
            loops.append(asyncio.new_event_loop())
        return loops[0]
    try:
        return _execute(claim, call, loop_of, cancelled)
    finally:
        if loops:
            _close(loops[0])


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks left on ``loop``, let them finish unwinding, close it."""
    try:
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in left:
            t.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except BaseException:  # noqa: B902 - best effort: the loop goes anyway
        log.debug("closing an attempt's event loop", exc_info=True)
    finally:
        loop.close()


def _execute(claim: list, call: Callable[..., Any],
             loop_of: Callable[[], asyncio.AbstractEventLoop],
             cancelled: Callable[[str, int], bool]) -> Optional[Dict[str, Any]]:
    run_id, token, wf_name, ref, parent, seen, attempt, records = claim

    def write(events: list, starts: list, sends: list, seen_new: dict) -> str:
        return call("frec", {"run": run_id, "token": token, "events": events,
                             "starts": starts, "sends": sends, "seen": seen_new or None})

    att = Attempt(run_id, attempt, wf_name, parent, records, write, call, loop_of,
                  lambda: cancelled(run_id, token))
    att.seen = {int(k): v for k, v in (seen or {}).items()}
    base: Dict[str, Any] = {"run": run_id, "token": token}
    try:
        obj = load(ref)
        wf = obj if isinstance(obj, Workflow) else None
        fn = wf.fn if wf is not None else obj
    except PipeProcError as exc:
        err = InvalidWorkflow(f"workflow {wf_name!r} cannot be imported by the workers "
                              f"({ref}): {exc.message}")
        return dict(base, events=[], end={"kind": "failed", "fatal": True,
                                          "error": _public(error_info(err))})
    try:
        if inspect.iscoroutinefunction(fn):
            result = loop_of().run_until_complete(fn(AsyncContext(att), *att.args, **att.kwargs))
        else:
            result = fn(Context(att), *att.args, **att.kwargs)
            if inspect.isawaitable(result):
                result = loop_of().run_until_complete(result)
        if att.fatal is not None:
            raise att.fatal
        if att.unwinding is not None:
            raise att.unwinding
        value = round_trip(result, "the workflow's result")
    except Suspend:
        return dict(base, events=att.buffer, seen=att.seen_new or None,
                    end={"kind": "suspend", "wait": att.wait})
    except Cancelled:
        return dict(base, events=att.buffer, seen=att.seen_new or None,
                    end={"kind": "cancelled"})
    except Fenced as f:
        log.info("run %r attempt %d stops: %s", run_id, attempt, f)
        return None
    except Reject as exc:
        return dict(base, events=[], end={"kind": "rejected", "error": _public(error_info(exc))})
    except BaseException as exc:  # noqa: B902 - the attempt's end, whatever it was
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if att.fatal is not None and att.fatal is not exc and not isinstance(exc, FATAL):
            exc = att.fatal
        fatal = isinstance(exc, FATAL)
        log.warning("run %r attempt %d failed: %s: %s", run_id, attempt, type(exc).__name__,
                    exc)
        return dict(base, events=[], end={"kind": "failed", "fatal": fatal,
                                          "error": _public(error_info(exc))})
    return dict(base, events=att.buffer, seen=att.seen_new or None,
                end={"kind": "finished", "result": value})


def _public(err: dict) -> dict:
    return {"type": err.get("type"), "message": err.get("message"), "code": err.get("code")}
