"""Workflows of the flow benchmarks F1–F6 (pipeproc side), imported by the node's workers.

Not run directly; `.venv/bin/python -m benchmarks.flow` starts runs of them. The workers find
this module the way they find ``benchmarks.processors`` (W5): ``spawn`` hands them the
spawner's ``sys.path`` and working directory, and the suite is run from the repository root
with ``-m``, so ``benchmarks`` is importable there.

The DBOS twins of these workflows are in ``benchmarks/dbos_flow.py`` (with copies of the step
functions, so that the DBOS side does not need ``pipeproc.flow``).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, List

from pipeproc import flow


# ------------------------------------------------------------------ step functions

def noop(k: int) -> int:
    """A trivial step: returns its argument."""
    return k


def wall_clock() -> float:
    """A step that returns the wall clock (epoch seconds) when it runs."""
    return time.time()


def side_effect(path: str, run_id: str, k: int) -> str:
    """A step with a side effect outside any workflow engine: appends the line
    ``"<run id> <k> <nonce>"`` to ``path`` (``O_APPEND``: lines of concurrent writers never
    interleave) and returns the nonce, so the execution whose result was recorded can be told
    from re-executions (see ``benchmarks.flow.reexecutions``)."""
    nonce = uuid.uuid4().hex
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{run_id} {k} {nonce}\n".encode())
    finally:
        os.close(fd)
    return nonce


# ------------------------------------------------------------------ workflows

@flow.workflow()
def steps(ctx: flow.Context, n: int) -> int:
    """F1, F2, F3: ``n`` no-op steps one after another."""
    for k in range(n):
        ctx.step("noop", noop, k)
    return n


@flow.workflow()
def sleeper(ctx: flow.Context, seconds: float) -> float:
    """F4: a durable sleep; returns the lateness of the wake-up (seconds): when the step after
    the sleep ran, minus (the time the sleep was called + ``seconds``)."""
    t = ctx.now()
    ctx.sleep("nap", seconds)
    woke = ctx.step("woke", wall_clock)
    return woke - (t + seconds)


@flow.workflow()
def waiter(ctx: flow.Context) -> Any:
    """F5: waits for the signal ``go`` and returns its payload."""
    return ctx.wait_signal("go", timeout=120.0)


@flow.workflow()
def effects(ctx: flow.Context, path: str, n: int, go: str = "") -> List[str]:
    """F6: ``n`` steps with a side effect each; returns the recorded nonces, in order. When
    ``go`` names a file, waits first until it exists (a start barrier of the benchmark, not a
    ctx call: the node is killed mid-run rather than while the runs are still being started;
    the DBOS twin waits the same way)."""
    if go:
        deadline = time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.001)
    return [ctx.step("effect", side_effect, path, ctx.run_id, k) for k in range(n)]
