"""Regression tests for what an independent review of pipeproc.flow against FLOW.md found
(each failed before its fix)."""

from __future__ import annotations

import os
import signal

import pytest

import pipeproc
from pipeproc import flow
from procmods import flowreview as fr

from helpers import wait_until

pytestmark = pytest.mark.timeout(60)
RESULT = 20


def _node(tmp_path, workers):
    pp = pipeproc.spawn(tmp_path / "store", workers=workers)
    try:
        yield pp, flow.Engine(pp)
    finally:
        pp.shutdown()


@pytest.fixture
def eng2(tmp_path):
    yield from _node(tmp_path, 2)


@pytest.fixture
def eng1(tmp_path):
    """One worker: every attempt runs on the same worker process."""
    yield from _node(tmp_path, 1)


def test_resume_gives_a_step_its_tries_again(eng2, tmp_path):
    _, eng = eng2
    path = str(tmp_path / "tries")
    run = eng.start(fr.retry_resume, path)
    with pytest.raises(flow.RunFailed):
        run.result(timeout=RESULT)
    assert fr.count(path) == 3
    run.resume()
    assert run.info().attempt == 2  # resume: attempt + 1 at once
    with pytest.raises(flow.RunFailed):
        run.result(timeout=RESULT)
    assert fr.count(path) == 6


def test_a_child_outcome_seen_once_is_what_every_replay_sees(eng2, tmp_path):
    _, eng = eng2
    flag = str(tmp_path / "flag")
    run = eng.start(fr.parent, flag, id="P")
    wait_until(lambda: run.status() == "waiting", timeout=RESULT)  # caught, waits for go
    open(flag, "w").close()
    eng.resume(f"P/{fr.kid.name}-0")
    assert eng.run(f"P/{fr.kid.name}-0").result(timeout=RESULT) == "ok"
    run.signal("go")
    assert run.result(timeout=RESULT) == "caught"
    child = [e for e in run.history() if e.type == "child"]
    assert len(child) == 1 and child[0].data["id"] == f"P/{fr.kid.name}-0"


def test_tasks_left_by_a_suspended_async_attempt_do_not_run_on(eng1, tmp_path):
    _, eng = eng1
    path = str(tmp_path / "b")
    run = eng.start(fr.gather_suspend, path)
    wait_until(lambda: run.status() == "waiting", timeout=RESULT)
    assert eng.start(fr.busy).result(timeout=RESULT) == 1  # the same (only) worker
    assert run.result(timeout=RESULT) == 1  # step 'b' ran once


def test_a_due_wait_sees_a_signal_recorded_during_the_attempt(eng2, tmp_path):
    _, eng = eng2
    gate = str(tmp_path / "gate")
    run = eng.start(fr.poll, gate)
    wait_until(lambda: run.status() == "running", timeout=RESULT)
    run.signal("s", "x")
    open(gate, "w").close()
    assert run.result(timeout=RESULT) == "x"


def test_cancel_wins_over_an_attempt_that_only_buffers(eng2, tmp_path):
    _, eng = eng2
    gate = str(tmp_path / "gate")
    run = eng.start(fr.buffered, gate)
    wait_until(lambda: run.status() == "running", timeout=RESULT)
    assert run.cancel() is True
    open(gate, "w").close()
    with pytest.raises(flow.RunCancelled):
        run.result(timeout=RESULT)
    assert run.status() == "cancelled"


def test_a_cancelled_run_whose_worker_dies_is_not_run_again(eng2, tmp_path):
    _, eng = eng2
    path, gate = str(tmp_path / "ran"), str(tmp_path / "gate")
    run = eng.start(fr.dies, path, gate)
    wait_until(lambda: fr.count(path) == 1, timeout=RESULT)
    assert run.cancel() is True
    open(gate, "w").close()  # the worker exits mid-attempt
    with pytest.raises(flow.RunCancelled):
        run.result(timeout=RESULT)
    assert fr.count(path) == 1


def test_runs_are_listed_in_creation_order(eng2):
    _, eng = eng2
    ids = ["r9", "r5", "r7", "r1", "r3", "r8", "r2"]
    for i in ids:
        eng.start(fr.waits, id=i)
    assert [r.id for r in eng.runs()] == ids
    assert [r.id for r in eng.runs(limit=3)] == ids[-3:]


def test_a_recorded_key_error_is_a_key_error_on_replay(eng2):
    _, eng = eng2
    assert eng.start(fr.keyerror).result(timeout=RESULT) == "KeyError"


def test_a_result_msgpack_cannot_read_back_is_invalid_payload_at_once(eng2):
    _, eng = eng2
    run = eng.start(fr.tuple_keys_wf)
    with pytest.raises(flow.RunFailed) as ei:
        run.result(timeout=RESULT)
    assert ei.value.error_code == "invalid_payload"
    assert run.info().attempt == 1


def test_a_step_fn_that_is_not_callable_is_invalid_argument(eng2):
    _, eng = eng2
    assert eng.start(fr.not_callable).result(timeout=RESULT) == "invalid_argument"


def test_bare_decorator_and_intervals_ignore_max_attempts(eng2):
    _, eng = eng2
    assert isinstance(fr.bare, flow.Workflow)
    assert fr.bare.name == "procmods.flowreview:bare"
    assert eng.start(fr.bare).result(timeout=RESULT) == "bare"
    assert flow.Retry(intervals=[0.1], max_attempts=0).tries == 2


# ----------------------------------------------------------------- the second review


def test_a_cancelled_run_does_not_run_its_next_step(eng2, tmp_path):
    _, eng = eng2
    path, gate = str(tmp_path / "b-ran"), str(tmp_path / "gate")
    run = eng.start(fr.cancel_body, path, gate)
    wait_until(lambda: any(e.type == "step" for e in run.history()), timeout=RESULT)
    assert run.cancel() is True
    open(gate, "w").close()
    with pytest.raises(flow.RunCancelled):
        run.result(timeout=RESULT)
    assert not os.path.exists(path)  # step 'b' never ran
    assert [e.name for e in run.history() if e.type == "step"] == ["a"]


def test_patched_before_a_child_the_run_already_waits_on_is_false(eng2, tmp_path):
    _, eng = eng2
    flag = str(tmp_path / "flag")
    run = eng.start(fr.patch_child, flag, id="PC")
    wait_until(lambda: run.status() == "waiting", timeout=RESULT)
    assert [e.type for e in run.history() if e.pos is not None] == ["child"]
    open(flag, "w").close()  # the new code, with a patch before the child call
    eng.signal("pc-child-PC", "go", 1)
    assert run.result(timeout=RESULT) == "old"


def test_signal_names_are_any_str_of_1_to_200_characters(eng2):
    _, eng = eng2
    run = eng.start(fr.ctrl_signal)
    run.signal("a\tb", 7)
    assert run.result(timeout=RESULT) == 7


def test_bad_ctx_arguments_are_invalid_argument_and_take_no_position(eng2):
    _, eng = eng2
    run = eng.start(fr.bad_args)
    assert run.result(timeout=RESULT) == ["invalid_argument"] * 3
    steps = [e for e in run.history() if e.type == "step"]
    assert steps[0].pos == 0
