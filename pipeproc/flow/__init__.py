"""Durable workflows on the log (FLOW.md): steps that run once, retries, durable sleep,
signals, child runs — with zero infrastructure, on the node's worker pool.

Example::

    from pipeproc import flow

    @flow.workflow()
    def order(ctx: flow.Context, order_id: str) -> dict:
        paid = ctx.step("charge", charge_card, order_id, retry=flow.Retry(max_attempts=3))
        ctx.sleep("cool-off", 5)
        ok = ctx.wait_signal("approval", timeout=3600)
        return {"paid": paid, "approved": ok}

    with pipeproc.spawn("./data", workers=2) as pp:
        engine = flow.Engine(pp)
        run = engine.start(order, "o-1", id="order-o-1")
        run.signal("approval", True)
        print(run.result(timeout=60))

A run's journal is a topic of the node's store; a step's result is committed before
``ctx.step`` returns, and a completed step never runs again (kill -9 included, with
``durability="full"``). See docs/flow.md for the design and the README for the rules of
deterministic workflow code.
"""

from ..errors import (
    InvalidArgument,
    InvalidPayload,
    InvalidRun,
    InvalidState,
    InvalidWorkflow,
    NonDeterminism,
    PayloadTooLarge,
    Reject,
    RunAborted,
    RunCancelled,
    RunError,
    RunFailed,
    RunIdConflict,
    RunRejected,
    StepFailed,
    Timeout,
)
from ._ctx import KV, AsyncContext, Context
from ._defs import Retry, Suspend, Workflow, workflow
from ._engine import Engine, Event, Run, RunInfo

__all__ = [
    "workflow", "Workflow", "Retry", "Context", "AsyncContext", "KV", "Suspend", "Engine",
    "Run", "RunInfo", "Event", "InvalidWorkflow", "InvalidPayload", "PayloadTooLarge",
    "InvalidRun", "RunIdConflict", "InvalidState", "NonDeterminism", "StepFailed", "Reject",
    "RunError", "RunFailed", "RunAborted", "RunCancelled", "RunRejected", "InvalidArgument",
    "Timeout",
]
