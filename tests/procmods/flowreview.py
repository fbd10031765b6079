"""Workflows of tests/test_flow_review.py (the independent review's findings)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pipeproc import flow


def bump(path: str) -> int:
    with open(path, "a") as f:
        f.write("x\n")
    with open(path) as f:
        return len(f.read().splitlines())


def count(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return len(f.read().splitlines())


def ident(x: Any) -> Any:
    return x


def always_fail(path: str) -> None:
    bump(path)
    raise ValueError("always")


@flow.workflow(name="review-retry-resume", max_failures=1)
def retry_resume(ctx: flow.Context, path: str) -> None:
    ctx.step("s", always_fail, path, retry=flow.Retry(max_attempts=3, initial=0.01))


@flow.workflow(name="review-kid", max_failures=1)
def kid(ctx: flow.Context, flag: str) -> str:
    if not os.path.exists(flag):
        raise ValueError("no flag yet")
    return "ok"


@flow.workflow(name="review-parent")
def parent(ctx: flow.Context, flag: str) -> Any:
    try:
        r = ctx.child(kid, flag)
    except flow.RunFailed:
        r = "caught"
    ctx.wait_signal("go")
    return r


async def aslow(path: str) -> int:
    await asyncio.sleep(0.5)
    return bump(path)


@flow.workflow(name="review-gather")
async def gather_suspend(ctx: flow.AsyncContext, path: str) -> int:
    await asyncio.gather(ctx.step("b", aslow, path), ctx.sleep("z", 1.0))
    return count(path)


@flow.workflow(name="review-busy")
async def busy(ctx: flow.AsyncContext) -> int:
    await asyncio.sleep(1.0)
    return 1


@flow.workflow(name="review-poll")
def poll(ctx: flow.Context, gate: str) -> Any:
    ctx.step("work", ident, 1)
    while not os.path.exists(gate):
        time.sleep(0.01)
    return ctx.wait_signal("s", timeout=0)


@flow.workflow(name="review-buffered")
def buffered(ctx: flow.Context, gate: str) -> str:
    ctx.step("a", ident, 1)
    while not os.path.exists(gate):
        ctx.kv.incr("i")
        ctx.now()
        time.sleep(0.01)
    return "done"


@flow.workflow(name="review-dies", max_failures=3)
def dies(ctx: flow.Context, path: str, gate: str) -> str:
    bump(path)
    while not os.path.exists(gate):
        time.sleep(0.01)
    os._exit(1)


@flow.workflow(name="review-waits")
def waits(ctx: flow.Context) -> Any:
    return ctx.wait_signal("never")


def kerr() -> None:
    raise KeyError("k")


@flow.workflow(name="review-keyerror")
def keyerror(ctx: flow.Context) -> str:
    try:
        ctx.step("k", kerr)
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        t = type(e).__name__
    ctx.sleep("z", 0.05)
    return t


def tuple_keys() -> dict:
    return {(1, 2): 3}


@flow.workflow(name="review-tuple-keys")
def tuple_keys_wf(ctx: flow.Context) -> Any:
    return ctx.step("tk", tuple_keys)


@flow.workflow(name="review-not-callable")
def not_callable(ctx: flow.Context) -> str:
    try:
        ctx.step("x", 5)
    except flow.InvalidArgument as e:  # the same class as pipeproc.InvalidArgument
        return e.code
    return "no error"


@flow.workflow
def bare(ctx: flow.Context) -> str:
    return "bare"


def touch(path: str) -> int:
    open(path, "w").close()
    return 1


@flow.workflow(name="review-cancel-body")
def cancel_body(ctx: flow.Context, path: str, gate: str) -> int:
    ctx.step("a", ident, 1)
    while not os.path.exists(gate):  # cancel() arrives here, between ctx calls
        time.sleep(0.01)
    ctx.step("b", touch, path)
    return 1


@flow.workflow(name="review-waiter")
def waiter(ctx: flow.Context) -> Any:
    return ctx.wait_signal("go")


@flow.workflow(name="review-patch-child")
def patch_child(ctx: flow.Context, flag: str) -> str:
    if os.path.exists(flag) and ctx.patched("p"):
        return "new"
    ctx.child(waiter, id="pc-child-" + ctx.run_id)
    return "old"


@flow.workflow(name="review-ctrl-signal")
def ctrl_signal(ctx: flow.Context) -> Any:
    return ctx.wait_signal("a\tb")


@flow.workflow(name="review-bad-args")
def bad_args(ctx: flow.Context) -> list:
    out = []
    for call in (lambda: ctx.kv.get(5), lambda: ctx.sleep("s", -1),
                 lambda: ctx.wait_signal("w", timeout=-1)):
        try:
            call()
            out.append("no error")
        except flow.InvalidArgument as e:
            out.append(e.code)
    ctx.step("first", ident, 1)
    return out
