"""Workflows for tests/test_flow_cli.py (module-level, so the node's workers import them)."""

from __future__ import annotations

from typing import Any, Dict

from pipeproc import flow


def add(a: int, b: int) -> int:
    return a + b


@flow.workflow(name="cli-ok")
def ok(ctx: flow.Context, n: int) -> Dict[str, Any]:
    """One step, one log: finishes with ``{"n": n + 1}``."""
    x = ctx.step("add", add, n, 1)
    ctx.log("added", x=x)
    return {"n": x}


@flow.workflow(name="cli-boom", max_failures=1)
def boom(ctx: flow.Context) -> None:
    """A step, then an exception: ``failed`` after its only attempt."""
    ctx.step("first", add, 1, 2)
    raise RuntimeError("kaboom")


@flow.workflow(name="cli-wait")
def waits(ctx: flow.Context) -> Any:
    """Waits for the ``go`` signal and returns its payload."""
    return ctx.wait_signal("go")
