"""pipeproc.flow runs (FLOW.md §2–3): start (idempotent, concurrent starters in several
processes), statuses, result and its timeout, signals (buffered, timed, racing the timeout),
cancel, resume, delete, ``runs()``, the history's events, kv, log, patched, replayed
now/random/uuid, children, non-determinism, step retries, Reject, max_failures, and async
workflows.

Most tests share one node with two workers (``shared``, one per module: a node with workers
takes a while to start); each test uses run ids and files of its own. Tests that restart a
node, need a node without workers, or must be alone on a node start their own.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

import helpers
import pipeproc
from pipeproc import flow
from procmods import flowmods as fm

pytestmark = pytest.mark.timeout(90)

wait_until = functools.partial(helpers.wait_until, timeout=20.0)
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SOON = 2.0  # "within a second" (FLOW.md), with a second of slack for a loaded machine
RESULT = 30.0  # result() timeouts: generous, the runs themselves are short
STATUSES = ("pending", "running", "waiting", "finished", "failed", "aborted", "cancelled",
            "rejected")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One node with two workers for the module, and an engine on it."""
    loc = tmp_path_factory.mktemp("flowruns") / "store"
    pp = pipeproc.spawn(loc, workers=2, durability="fast")
    try:
        eng = flow.Engine(pp)
        try:
            yield pp, eng
        finally:
            eng.close()
    finally:
        pp.shutdown()


@pytest.fixture
def eng(shared):
    return shared[1]


@pytest.fixture
def out(tmp_path):
    """The path of a side-effect file (steps append lines to it)."""
    return str(tmp_path / "out.txt")


def uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def wait_status(run, status, timeout=20.0):
    return wait_until(lambda: run.status() == status, timeout=timeout,
                      what=f"run {run.id} {status} (is {run.status()})")


def events(run, type_=None):
    return [e for e in run.history() if type_ is None or e.type == type_]


def statuses(run):
    return [e.name for e in events(run, "status")]


def env_with_tests(**extra):
    pp = os.pathsep.join([ROOT, TESTS] + ([os.environ["PYTHONPATH"]]
                                          if os.environ.get("PYTHONPATH") else []))
    return dict(os.environ, PYTHONPATH=pp, **extra)


# ---------------------------------------------------------------- start and result


def test_a_run_finishes_with_its_result_and_info(eng):
    t0 = time.time()
    run = eng.start(fm.add, 1, 2)
    assert run.created is True
    assert run.result(timeout=RESULT) == 3
    t1 = time.time()
    assert run.status() == "finished"
    info = run.info()
    assert (info.id, info.workflow, info.status, info.attempt, info.error, info.parent_id,
            info.version) == (run.id, "procmods.flowmods:add", "finished", 1, None, None, "1")
    assert isinstance(info.created_at, int) and isinstance(info.updated_at, int)
    assert t0 * 1000 - 1000 <= info.created_at <= info.updated_at <= t1 * 1000 + 1000
    assert eng.run(run.id).info() == info
    assert eng.run(run.id).result(timeout=1) == 3
    assert statuses(run)[0] == "pending" and statuses(run)[-1] == "finished"
    assert "running" in statuses(run)


def test_ctx_attributes(eng):
    run = eng.start(fm.whoami)
    assert run.result(timeout=RESULT) == [run.id, fm.whoami.name, None, 1]


def test_sync_context_step_functions_and_occurrences(eng, out):
    run = eng.start(fm.ctx_kind, out)
    assert run.result(timeout=RESULT) == [True, False, "A", {"v": 1}, [0, 1, 2]]
    assert fm.read_lines(out) == ["plain", "kw", "same0", "same1", "same2", "kind"]
    assert [(e.name, e.pos) for e in events(run, "step")] == [
        ("a", 0), ("kw", 1), ("same", 2), ("same", 3), ("same", 4)]


def test_an_async_step_function_in_a_sync_workflow(eng, out):
    run = eng.start(fm.sync_with_async_fn, out)
    assert run.result(timeout=RESULT) == "A"
    assert fm.read_lines(out) == ["async-fn"]


def test_bad_arguments_of_ctx_calls(eng):
    run = eng.start(fm.ctx_bad_args)
    assert run.result(timeout=RESULT) == [
        "invalid_argument", "invalid_argument", "invalid_argument", "invalid_argument",
        "invalid_argument", "invalid_argument", "invalid_payload", "invalid_argument",
        "invalid_workflow", "invalid_argument", "invalid_argument"]


MAIN_SCRIPT = """
import sys
import pipeproc
from pipeproc import flow


def double(x):
    return x * 2


@flow.workflow()
def main_wf(ctx, x):
    return ctx.step("double", double, x)


if __name__ == "__main__":
    with pipeproc.spawn(sys.argv[1], workers=1) as pp:
        with flow.Engine(pp) as eng:
            run = eng.start(main_wf, 21)
            print(main_wf.name, run.result(timeout=30), flush=True)
"""


@pytest.mark.timeout(90)
def test_a_workflow_of_the_main_script(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(MAIN_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                         env=env_with_tests())
    assert res.returncode == 0, res.stderr
    name, value = res.stdout.split()
    assert name.endswith(":main_wf") and value == "42"


def test_a_workflow_with_a_custom_name_runs_by_its_import_path(eng):
    run = eng.start("custom name / not a module path", {"x": 1})
    assert run.result(timeout=RESULT) == {"x": 1}
    assert run.info().workflow == "custom name / not a module path"


def test_arguments_and_results_are_payloads_after_a_round_trip(eng):
    run = eng.start(fm.add, a=(1,), b=[2])
    assert run.result(timeout=RESULT) == [1, 2]  # the tuple came in as a list
    first = run.history()[0]
    assert (first.type, first.name, first.pos) == ("status", "pending", None)
    assert first.data["args"] == [] and first.data["kwargs"] == {"a": [1], "b": [2]}
    # a step's value is the round-tripped payload the first time already
    t = eng.start(fm.tuple_step)
    assert t.result(timeout=RESULT) == ["list", "list", [1, [2, 3]]]


def test_start_of_an_existing_id_starts_nothing_whatever_its_status(eng, out):
    rid = uid("once")
    r1 = eng.start(fm.count_once, out, "first", id=rid)
    r2 = eng.start(fm.count_once, out, "second", id=rid)  # pending or running
    assert r1.result(timeout=RESULT) == "first"
    r3 = eng.start(fm.count_once, out, "third", id=rid)  # finished
    assert (r1.created, r2.created, r3.created) == (True, False, False)
    assert r2.id == r3.id == rid
    assert r3.result(timeout=1) == "first"
    assert fm.read_lines(out) == ["first"]
    with pytest.raises(flow.RunIdConflict):
        eng.start(fm.add, 1, 2, id=rid)
    # a failed run is returned as it is too (not started again)
    bad = eng.start(fm.boom, "x", id=uid("boom"))
    with pytest.raises(flow.RunFailed):
        bad.result(timeout=RESULT)
    again = eng.start(fm.boom, "y", id=bad.id)
    assert again.created is False and again.status() == "failed"
    assert again.info().attempt == 1


STARTER = r"""
import json, os, sys, time
import pipeproc
from pipeproc import flow
from procmods import flowmods as fm
loc, path, go = sys.argv[1:4]
ids = sys.argv[4:]
pp = pipeproc.connect(loc)
eng = flow.Engine(pp)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
created = {}
for rid in ids:
    created[rid] = eng.start(fm.count_once, path, f"{rid} {os.getpid()}", id=rid).created
eng.close()
pp.close()
print(json.dumps(created), flush=True)
"""


@pytest.mark.timeout(120)
def test_concurrent_starters_in_several_processes_create_one_run(shared, tmp_path):
    pp, eng = shared
    path, go = str(tmp_path / "out"), str(tmp_path / "go")
    ids = [uid("race") for _ in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(pp.location), path, go, *ids],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env_with_tests(), cwd=ROOT)
             for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        open(go, "w").close()
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rid in ids:
        assert sorted(o[rid] for o in outs) == [False, False, False, True], rid
        tag = eng.run(rid).result(timeout=RESULT)
        assert [line for line in fm.read_lines(path) if line.startswith(rid)] == [tag]
    assert len(fm.read_lines(path)) == len(ids)


def test_run_keeps_the_version_and_max_failures_it_was_started_with(shared, tmp_path):
    """A run started by a process whose workflow has version 7 and max_failures 1 keeps
    them, although the workers import it with version 1 and max_failures 3."""
    pp, eng = shared
    path = str(tmp_path / "out")
    script = ("import sys, pipeproc\nfrom pipeproc import flow\n"
              "from procmods import flowmods as fm\n"
              "pp = pipeproc.connect(sys.argv[1])\neng = flow.Engine(pp)\n"
              "print(eng.start(fm.configurable, sys.argv[2]).id, flush=True)\n"
              "eng.close()\npp.close()\n")
    res = subprocess.run([sys.executable, "-c", script, str(pp.location), path],
                         capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=env_with_tests(FLOWMODS_VERSION="7", FLOWMODS_MAX_FAILURES="1"))
    assert res.returncode == 0, res.stderr
    rid = res.stdout.strip()
    run = eng.run(rid)
    with pytest.raises(flow.RunFailed):
        run.result(timeout=RESULT)
    info = run.info()
    assert (info.version, info.attempt, info.status) == ("7", 1, "failed")
    assert fm.read_lines(path) == ["attempt 1"]
    # the same workflow started here: version 1, three attempts
    path2 = str(tmp_path / "out2")
    run2 = eng.start(fm.configurable, path2)
    with pytest.raises(flow.RunFailed):
        run2.result(timeout=RESULT)
    assert (run2.info().version, run2.info().attempt) == ("1", 3)
    assert fm.read_lines(path2) == ["attempt 1", "attempt 2", "attempt 3"]


def test_a_workflow_workers_cannot_import_fails_at_once(eng, tmp_path):
    mod = f"flowhidden_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(
        "from pipeproc import flow\n\n\n@flow.workflow()\ndef hidden(ctx):\n    return 1\n")
    sys.path.insert(0, str(tmp_path))  # after the node started: its workers do not have it
    try:
        m = importlib.import_module(mod)
    finally:
        sys.path.remove(str(tmp_path))
    try:
        run = eng.start(m.hidden)
        with pytest.raises(flow.RunFailed) as e:
            run.result(timeout=RESULT)
        assert e.value.error_code == "invalid_workflow"
        assert run.info().attempt == 1 and run.info().error["code"] == "invalid_workflow"
    finally:
        sys.modules.pop(mod, None)


# ---------------------------------------------------------------- statuses, result timeout


def test_statuses_running_waiting_finished_and_result_timeout(eng, out, tmp_path):
    gate = str(tmp_path / "gate")
    run = eng.start(fm.gate_then_signal, out, gate)
    wait_until(lambda: any(x.startswith("g:start") for x in fm.read_lines(out)),
               what="the gated step to start")
    assert run.status() == "running"
    with pytest.raises(pipeproc.Timeout) as e:
        run.result(timeout=0.2)
    assert e.value.code == "timeout"
    open(gate, "w").close()
    wait_status(run, "waiting")
    with pytest.raises(pipeproc.Timeout):
        run.result(timeout=0.2)
    t0 = time.monotonic()
    run.signal("go", {"v": 1})
    assert run.result(timeout=RESULT) == {"v": 1}
    assert time.monotonic() - t0 < SOON  # a waiting run continues within a second
    names = statuses(run)
    assert names[0] == "pending" and names[-1] == "finished"
    assert {"running", "waiting"} <= set(names) and set(names) <= set(STATUSES)
    for e in events(run, "status"):
        assert "attempt" in e.data and "error" in e.data and e.pos is None


def test_waiting_runs_hold_no_worker(eng):
    waiters = [eng.start(fm.collect_signals, ["w"]) for _ in range(3)]  # 2 workers
    parents = [eng.start(fm.parent_of_waiter) for _ in range(2)]  # waiting on children
    for w in waiters + parents:
        wait_status(w, "waiting")
    children = [eng.run(f"{p.id}/{fm.collect_signals.name}-0") for p in parents]
    for c in children:
        wait_status(c, "waiting")
    assert eng.start(fm.add, 2, 2).result(timeout=RESULT) == 4
    for w in waiters:
        w.signal("w", 1)
    for c in children:
        c.signal("c", 2)
    for w in waiters:
        assert w.result(timeout=RESULT) == [1]
    for p in parents:
        assert p.result(timeout=RESULT) == [2]


def test_at_most_workers_times_concurrency_runs_execute_at_once(eng, out):
    runs = [eng.start(fm.hold_step, out, f"h{i}", 0.3) for i in range(4)]
    for r in runs:
        r.result(timeout=RESULT)
    marks = []
    for line in fm.read_lines(out):
        tag, kind, t = line.split()
        marks.append((float(t), 1 if kind == "start" else -1))
    assert len(marks) == 8
    level = top = 0
    for _, d in sorted(marks, key=lambda m: (m[0], m[1])):
        level += d
        top = max(top, level)
    assert top <= 2


# ---------------------------------------------------------------- failures


def test_failed_run_raises_run_failed_with_the_error(eng):
    run = eng.start(fm.boom, "bad thing")
    with pytest.raises(flow.RunFailed) as e:
        run.result(timeout=RESULT)
    err = e.value
    assert isinstance(err, flow.RunError) and err.code == "run_failed"
    assert (err.run_id, err.error_type, err.error_message, err.error_code) == (
        run.id, "ValueError", "bad thing", None)
    info = run.info()
    assert (info.status, info.attempt) == ("failed", 1)
    assert info.error == {"type": "ValueError", "message": "bad thing", "code": None}


def test_failed_attempts_back_off_and_max_failures_fails_the_run(eng, out):
    run = eng.start(fm.attempts_fail, out)
    with pytest.raises(flow.RunFailed) as e:
        run.result(timeout=RESULT)
    assert e.value.error_message == "every attempt fails"
    lines = [x.split() for x in fm.read_lines(out)]
    assert [x[1] for x in lines] == ["1", "2", "3"]
    t = [float(x[2]) for x in lines]
    assert t[1] - t[0] >= 0.09 and t[2] - t[1] >= 0.18  # 0.1 s, doubling
    assert t[2] - t[0] < 10
    info = run.info()
    assert (info.status, info.attempt) == ("failed", 3)
    failed_statuses = [e for e in events(run, "status") if e.data.get("error")]
    assert failed_statuses and all(e.data["error"]["type"] == "ValueError"
                                   for e in failed_statuses)


@pytest.mark.parametrize("cls,code", [("NonDeterminism", "non_determinism"),
                                      ("InvalidPayload", "invalid_payload"),
                                      ("PayloadTooLarge", "payload_too_large"),
                                      ("RunIdConflict", "run_id_conflict"),
                                      ("InvalidWorkflow", "invalid_workflow")])
def test_some_errors_fail_the_run_at_once(eng, out, cls, code):
    run = eng.start(fm.fail_with, out, cls, "m")
    with pytest.raises(flow.RunFailed) as e:
        run.result(timeout=RESULT)
    assert e.value.error_code == code and e.value.error_type == cls
    assert e.value.error_message == "m"  # str(exc) without the code prefix
    assert fm.read_lines(out) == ["attempt 1"]
    assert run.info().attempt == 1
    assert run.info().error == {"type": cls, "message": "m", "code": code}


def test_other_pipeproc_errors_are_ordinary_failures(eng, out):
    run = eng.start(fm.fail_with, out, "InvalidState", "m")
    with pytest.raises(flow.RunFailed):
        run.result(timeout=RESULT)
    assert fm.read_lines(out) == ["attempt 1", "attempt 2", "attempt 3"]
    assert run.info().error == {"type": "InvalidState", "message": "m", "code": "invalid_state"}


@pytest.mark.parametrize("kind,code", [("set", "invalid_payload"), ("big", "payload_too_large")])
def test_a_return_value_that_is_not_a_payload_fails_the_run(eng, kind, code):
    run = eng.start(fm.bad_return, kind)
    with pytest.raises(flow.RunFailed) as e:
        run.result(timeout=RESULT)
    assert e.value.error_code == code
    assert run.info().attempt == 1
    if kind == "set":
        assert "set" in e.value.error_message


@pytest.mark.parametrize("kind", ["step_result", "start_args", "kv_value", "log_fields"])
def test_payload_errors_inside_a_run_fail_it_at_once(eng, kind):
    run = eng.start(fm.bad_inside, kind)
    with pytest.raises(flow.RunFailed) as e:
        run.result(timeout=RESULT)
    assert e.value.error_code == "invalid_payload"
    assert run.info().attempt == 1


def test_reject_ends_the_run_rejected_at_once(eng):
    run = eng.start(fm.rejecter, "no thanks")
    with pytest.raises(flow.RunRejected) as e:
        run.result(timeout=RESULT)
    assert e.value.code == "run_rejected"
    assert (e.value.error_type, e.value.error_message, e.value.error_code) == (
        "Reject", "no thanks", "rejected")
    info = run.info()
    assert (info.status, info.attempt) == ("rejected", 1)
    assert info.error == {"type": "Reject", "message": "no thanks", "code": "rejected"}


def test_an_attempt_silent_for_its_lease_is_interrupted_and_aborts(eng, out):
    t0 = time.monotonic()
    run = eng.start(fm.slow_step, out, 2.5)  # lease 1.0, max_failures 1
    with pytest.raises(flow.RunAborted) as e:
        run.result(timeout=RESULT)
    assert time.monotonic() - t0 < 2.4  # it did not wait for the slow step
    assert e.value.code == "run_aborted"
    assert (e.value.error_type, e.value.error_code) == ("Interrupted", "interrupted")
    info = run.info()
    assert info.status == "aborted"
    assert info.error["type"] == "Interrupted" and info.error["code"] == "interrupted"


def test_waiting_does_not_count_against_the_lease(eng):
    run = eng.start(fm.wait_beyond_lease)  # lease 0.5, max_failures 1
    assert run.result(timeout=RESULT) == [None, True, 1]
    assert run.info().attempt == 1


def test_a_retry_wait_inside_the_attempt_is_no_heartbeat(eng, out):
    """FLOW.md: "every record renews it, a retry wait inside the attempt does not count"
    (read as: the wait renews nothing), so a 0.9 s wait under a 0.5 s lease interrupts."""
    run = eng.start(fm.retry_wait_beyond_lease, out)  # lease 0.5, one 0.9 s retry wait
    with pytest.raises(flow.RunAborted) as e:
        run.result(timeout=RESULT)
    assert e.value.error_code == "interrupted"
    assert retries(run) == [(0, "t", 1, pytest.approx(0.9))]


# ---------------------------------------------------------------- step retries


def retries(run):
    return [(e.pos, e.name, e.data["attempt"], e.data["wait"]) for e in events(run, "retry")]


def try_times(out):
    return [float(x.split()[1]) for x in fm.read_lines(out)]


def test_retry_intervals(eng, out):
    run = eng.start(fm.retrying, out, "t", 2, {"intervals": [0.05, 0.1]}, False)
    assert run.result(timeout=RESULT) == "ok"
    assert retries(run) == [(0, "t", 1, pytest.approx(0.05)), (0, "t", 2, pytest.approx(0.1))]
    for e in events(run, "retry"):
        assert "ValueError" in str(e.data["error"]) and "failed" in str(e.data["error"])
    t = try_times(out)
    assert len(t) == 3
    assert t[1] - t[0] >= 0.045 and t[2] - t[1] >= 0.095
    [step] = events(run, "step")
    assert (step.name, step.pos, step.data["result"]) == ("t", 0, "ok")
    assert run.info().attempt == 1


def test_retry_intervals_exhausted_raise_from_step_and_a_caught_failure_is_recorded(eng, out):
    run = eng.start(fm.retrying, out, "t", 99, {"intervals": [0.01]}, True)
    assert run.result(timeout=RESULT) == ["caught", "t try 2 failed"]
    assert len(try_times(out)) == 2
    [failed] = events(run, "step_failed")
    assert (failed.name, failed.pos) == ("t", 0)
    assert "t try 2 failed" in str(failed.data["error"])
    assert events(run, "step") == []


def test_empty_intervals_and_no_retry_mean_one_try(eng, tmp_path):
    for i, spec in enumerate(({"intervals": []}, None)):
        out = str(tmp_path / f"out{i}")
        run = eng.start(fm.retrying, out, "t", 99, spec, True)
        assert run.result(timeout=RESULT) == ["caught", "t try 1 failed"]
        assert len(try_times(out)) == 1 and retries(run) == []


def test_retry_exponential_back_off_with_max_attempts(eng, out):
    spec = {"max_attempts": 3, "initial": 0.02, "factor": 3.0, "max_interval": 0.05}
    run = eng.start(fm.retrying, out, "t", 99, spec, True)
    assert run.result(timeout=RESULT) == ["caught", "t try 3 failed"]
    assert retries(run) == [(0, "t", 1, pytest.approx(0.02)), (0, "t", 2, pytest.approx(0.05))]
    t = try_times(out)
    assert len(t) == 3 and t[1] - t[0] >= 0.018 and t[2] - t[1] >= 0.045


def test_retry_default_max_attempts_is_five(eng, out):
    run = eng.start(fm.retrying, out, "t", 99, {"initial": 0.01, "factor": 1.0}, True)
    assert run.result(timeout=RESULT) == ["caught", "t try 5 failed"]
    assert [r[2:] for r in retries(run)] == [(k, pytest.approx(0.01)) for k in (1, 2, 3, 4)]


def test_retry_intervals_make_max_attempts_ignored(eng, out):
    run = eng.start(fm.retrying, out, "t", 99, {"intervals": [0, 0], "max_attempts": 9}, True)
    assert run.result(timeout=RESULT) == ["caught", "t try 3 failed"]


def test_transient_decides_what_is_retried(eng, tmp_path):
    out1, out2 = str(tmp_path / "o1"), str(tmp_path / "o2")
    r1 = eng.start(fm.retrying, out1, "t", 99,
                   {"max_attempts": 5, "initial": 0.01, "transient": "only_os_errors"}, True)
    r2 = eng.start(fm.retrying, out2, "t", 99,
                   {"max_attempts": 2, "initial": 0.01, "transient": "everything"}, True)
    assert r1.result(timeout=RESULT) == ["caught", "t try 1 failed"]
    assert r2.result(timeout=RESULT) == ["caught", "t try 2 failed"]
    assert len(try_times(out1)) == 1 and retries(r1) == []
    assert len(try_times(out2)) == 2


def test_tries_multiply_with_attempts(eng, out):
    run = eng.start(fm.retrying_mf2, out, {"intervals": [0.01]})  # 2 tries x 2 attempts
    with pytest.raises(flow.RunFailed) as e:
        run.result(timeout=RESULT)
    assert (e.value.error_type, e.value.error_message) == ("ValueError", "t try 4 failed")
    assert len(try_times(out)) == 4
    assert run.info().attempt == 2
    assert events(run, "step_failed") == []  # it escaped: nothing recorded at its position


@pytest.mark.parametrize("which,exc,code", [("reject", flow.RunRejected, "rejected"),
                                            ("nondeterminism", flow.RunFailed,
                                             "non_determinism")])
def test_reject_and_non_determinism_from_a_step_are_never_retried(eng, out, which, exc, code):
    run = eng.start(fm.step_raises, out, which)
    with pytest.raises(exc) as e:
        run.result(timeout=RESULT)
    assert e.value.error_code == code
    assert fm.read_lines(out) == ["s"]
    assert run.info().attempt == 1 and retries(run) == []


def test_a_retry_wait_of_a_second_or_more_is_a_durable_timer(eng, out):
    run = eng.start(fm.retrying, out, "t", 1, {"intervals": [1.0]}, False)
    wait_until(lambda: retries(run), what="the retry record")
    assert run.status() == "waiting"  # no worker held during the wait
    assert run.result(timeout=RESULT) == "ok"
    assert retries(run) == [(0, "t", 1, pytest.approx(1.0))]
    t = try_times(out)
    assert len(t) == 2 and t[1] - t[0] >= 0.95


@pytest.mark.parametrize("local", [False, True])
def test_a_caught_step_failure_replays_with_the_same_type_and_message(eng, out, local):
    run = eng.start(fm.caught_replay, out, local)
    res = run.result(timeout=RESULT)
    assert fm.count(out, "bad") == 1  # never executed again
    seen = [json.loads(x[len("seen "):]) for x in fm.read_lines(out) if x.startswith("seen ")]
    assert len(seen) >= 2  # the first attempt, and at least the one after fail_once
    if local:
        assert seen[0] == ["Weird", "odd failure"]
        assert res[0] == "StepFailed" and "odd failure" in res[1]
        assert all(s[0] == "StepFailed" for s in seen[1:])
    else:
        assert res == ["ValueError", "bad failed"]
        assert all(s == res for s in seen)
    [failed] = events(run, "step_failed")
    assert (failed.name, failed.pos) == ("bad", 0)
    assert run.info().attempt == 2


def test_a_caught_failure_is_not_recorded_when_the_attempt_fails_before_the_next_record(
        eng, out):
    run = eng.start(fm.caught_then_crash, out)
    assert run.result(timeout=RESULT) == "done"
    assert fm.count(out, "bad") == 2  # tried again by the second attempt
    assert [(e.type, e.name, e.pos) for e in run.history() if e.pos is not None] == [
        ("step_failed", "bad", 0), ("step", "after", 1)]


# ---------------------------------------------------------------- signals


def test_signals_before_the_first_attempt_are_buffered_in_arrival_order(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc, workers=0)
    with flow.Engine(pp) as eng:
        run = eng.start(fm.collect_signals, ["b", "a", "a", "a"])
        rid = run.id
        eng.signal(rid, "a", 1)
        run.signal("a", 2)
        run.signal("b", "x")
        eng.signal(rid, "a", {"three": [3]})
        assert [(e.name, e.pos, e.data["payload"]) for e in events(run, "signal")] == [
            ("a", None, 1), ("a", None, 2), ("b", None, "x"), ("a", None, {"three": [3]})]
        assert run.status() == "pending"
    pp.shutdown()
    pp2 = spawner(loc, workers=1)
    with flow.Engine(pp2) as eng:
        assert eng.run(rid).result(timeout=RESULT) == ["x", 1, 2, {"three": [3]}]
        waits = [(e.name, e.pos, e.data["payload"], e.data["timed_out"])
                 for e in eng.history(rid) if e.type == "wait"]
        assert waits == [("b", 0, "x", False), ("a", 1, 1, False), ("a", 2, 2, False),
                         ("a", 3, {"three": [3]}, False)]


def test_signals_arriving_during_a_step_are_buffered(eng, out, tmp_path):
    gate = str(tmp_path / "gate")
    run = eng.start(fm.gate_then_signal, out, gate)
    wait_until(lambda: fm.count(out, "g:start"), what="the gated step")
    run.signal("go", "early")
    run.signal("go", "second")
    open(gate, "w").close()
    assert run.result(timeout=RESULT) == "early"


def test_a_timed_wait_returns_none_after_its_timeout(eng):
    t0 = time.time()
    run = eng.start(fm.timed_wait, 0.4)
    v, waited = run.result(timeout=RESULT)
    assert v is None
    assert 0.4 - 0.01 <= waited < 0.4 + SOON
    [timer] = events(run, "timer")
    [wait] = events(run, "wait")
    assert (timer.name, timer.pos, wait.name, wait.pos) == ("s", 1, "s", 1)
    assert t0 + 0.4 - 0.05 <= timer.data["due"] <= time.time()
    assert wait.data["timed_out"] is True and wait.data["payload"] is None
    assert timer.seq < wait.seq


def test_a_timed_wait_returns_a_signal_that_comes_in_time(eng):
    run = eng.start(fm.timed_wait, 30.0)
    wait_status(run, "waiting")
    t0 = time.monotonic()
    run.signal("s", 7)
    v, waited = run.result(timeout=RESULT)
    assert v == 7 and waited < 30 and time.monotonic() - t0 < SOON
    [wait] = events(run, "wait")
    assert wait.data["timed_out"] is False and wait.data["payload"] == 7


def test_signal_and_timeout_racing_have_one_outcome_that_replays(eng, tmp_path):
    runs = []
    for i, delta in enumerate((-0.04, -0.01, 0.0, 0.01, 0.04)):
        path = str(tmp_path / f"out{i}")
        runs.append([eng.start(fm.race, path, 0.5), delta, path])
    for item in runs:
        run = item[0]
        timer = wait_until(lambda: events(run, "timer"), what="the timed wait")[0]
        item.append(timer.data["due"])
    for run, delta, path, due in sorted(runs, key=lambda r: r[3] + r[1]):
        time.sleep(max(0.0, due + delta - time.time()))
        run.signal("s", "P")
    for run, delta, path, due in runs:
        v1, v2 = run.result(timeout=RESULT)
        assert sorted([v1, v2], key=str) == sorted(["P", None], key=str), (v1, v2)
        w = [e for e in events(run, "wait")]
        assert [e.pos for e in w] == [0, 1]
        assert w[0].data["timed_out"] is (v1 is None)  # the replay saw the recorded outcome
        assert w[0].data["payload"] == v1 and w[1].data["payload"] == v2
        assert len(events(run, "signal")) == 1
        assert fm.read_lines(path) == ["race"]  # one failed attempt: the replay happened


def test_signal_to_a_finished_run_is_dropped(eng):
    run = eng.start(fm.echo, 1)
    run.result(timeout=RESULT)
    before = run.history()
    assert eng.signal(run.id, "s", 1) is None
    assert run.history() == before


def test_signal_to_a_failed_run_is_kept_for_its_resume(eng, out, tmp_path):
    flag = str(tmp_path / "flag")
    run = eng.start(fm.fail_until_flag, out, flag)
    with pytest.raises(flow.RunFailed):
        run.result(timeout=RESULT)
    assert run.info().attempt == 1
    run.signal("s", 42)
    assert [e.data["payload"] for e in events(run, "signal")] == [42]
    open(flag, "w").close()
    run.resume()
    assert run.result(timeout=RESULT) == 42
    assert run.info().attempt == 2 and run.status() == "finished"
    assert fm.read_lines(out) == ["first"]  # the recorded step was skipped
    with pytest.raises(flow.InvalidState):
        run.resume()


def test_send_from_a_run_is_recorded_once_and_unknown_ids_raise_invalid_run(eng, out):
    peer = eng.start(fm.collect_signals, ["ping", "end"])
    run = eng.start(fm.sender, out, peer.id)
    assert run.result(timeout=RESULT) == ["invalid_run", True]
    assert fm.read_lines(out) == ["s", "sender"]  # a second attempt replayed the send
    [send] = events(run, "send")
    assert (send.name, send.pos, send.data["to"], send.data["payload"]) == (
        "ping", 0, peer.id, {"p": 1})
    peer.signal("end", "e")
    assert peer.result(timeout=RESULT) == [{"p": 1}, "e"]
    assert [e.name for e in events(peer, "signal")] == ["ping", "end"]


# ---------------------------------------------------------------- cancel, resume, delete


def test_cancel_a_waiting_run_then_resume_it(eng):
    run = eng.start(fm.collect_signals, ["a"])
    wait_status(run, "waiting")
    t0 = time.monotonic()
    assert run.cancel() is True
    wait_status(run, "cancelled", timeout=10)
    assert time.monotonic() - t0 < SOON
    with pytest.raises(flow.RunCancelled) as e:
        run.result(timeout=RESULT)
    assert e.value.code == "run_cancelled" and e.value.run_id == run.id
    assert run.cancel() is False and eng.cancel(run.id) is False
    run.signal("a", 5)  # kept for a cancelled run
    attempt = run.info().attempt
    eng.resume(run.id)
    assert run.result(timeout=RESULT) == [5]
    assert run.info().attempt == attempt + 1


def test_cancel_a_running_run_lets_its_step_complete_first(eng, out, tmp_path):
    gate = str(tmp_path / "gate")
    run = eng.start(fm.two_steps_gated, out, gate)
    wait_until(lambda: fm.count(out, "one:start"), what="step one")
    assert run.cancel() is True
    assert run.status() == "running"  # cancelled at its next ctx call
    open(gate, "w").close()
    wait_status(run, "cancelled")
    [one] = events(run, "step")
    assert (one.name, one.data["result"]) == ("one", 1)
    assert "two" not in fm.read_lines(out)
    run.resume()
    assert run.result(timeout=RESULT) == 3
    assert fm.count(out, "one:start") == 1 and fm.read_lines(out).count("two") == 1


def test_cancel_of_a_terminal_run_returns_false(eng):
    run = eng.start(fm.echo, 1)
    run.result(timeout=RESULT)
    assert run.cancel() is False
    assert run.status() == "finished"


def test_resume_counts_failed_attempts_from_zero_again(eng, out):
    run = eng.start(fm.always_fails_after_step, out)  # max_failures 2
    with pytest.raises(flow.RunFailed):
        run.result(timeout=RESULT)
    assert run.info().attempt == 2
    run.resume()
    with pytest.raises(flow.RunFailed):
        run.result(timeout=RESULT)
    assert wait_status(run, "failed") is not None
    assert run.info().attempt == 4
    assert fm.read_lines(out) == ["s", "attempt 1", "attempt 2", "attempt 3", "attempt 4"]


def test_resume_of_other_statuses_is_invalid_state(eng, tmp_path):
    waiting = eng.start(fm.collect_signals, ["x"])
    wait_status(waiting, "waiting")
    with pytest.raises(flow.InvalidState) as e:
        waiting.resume()
    assert e.value.code == "invalid_state"
    rejected = eng.start(fm.validated, "bad")
    with pytest.raises(flow.InvalidState):
        eng.resume(rejected.id)
    done = eng.start(fm.echo, 1)
    done.result(timeout=RESULT)
    with pytest.raises(flow.InvalidState):
        done.resume()
    waiting.signal("x", 1)
    assert waiting.result(timeout=RESULT) == [1]


def test_resume_keeps_a_sleeps_due_time(eng):
    run = eng.start(fm.nap, 1.2)
    wait_status(run, "waiting")
    run.cancel()
    wait_status(run, "cancelled")
    [sleep] = events(run, "sleep")
    due = sleep.data["due"]
    time.sleep(max(0.0, due + 0.1 - time.time()))  # the sleep fell due while cancelled
    resumed = time.time()
    run.resume()
    woke = run.result(timeout=RESULT)
    assert woke >= due - 0.01
    assert woke - resumed < 1.0  # a new 1.2 s sleep from the resume would end later
    assert [e.data["due"] for e in events(run, "sleep")] == [due]


def test_delete_frees_the_id(eng, out):
    rid = uid("del")
    r = eng.start(fm.count_once, out, "a", id=rid)
    assert r.result(timeout=RESULT) == "a"
    eng.delete(rid)
    for call in (eng.run, eng.history, eng.kv):
        with pytest.raises(flow.InvalidRun):
            call(rid)
    assert rid not in [i.id for i in eng.runs()]
    r2 = eng.start(fm.count_once, out, "b", id=rid)
    assert r2.created is True
    assert r2.result(timeout=RESULT) == "b"
    assert fm.read_lines(out) == ["a", "b"]
    assert r2.history()[0].data["args"] == [out, "b"]
    with pytest.raises(flow.InvalidRun):
        eng.delete(uid("never-was"))


def test_delete_of_a_run_that_is_not_terminal_or_whose_parent_is_not(eng):
    p = eng.start(fm.parent_then_wait)
    cid = f"{p.id}/{fm.echo.name}-0"
    wait_until(lambda: events(p, "child"), what="the child's record")
    child = eng.run(cid)
    assert child.result(timeout=RESULT) == "c"
    assert p.status() in ("pending", "running", "waiting")  # it waits for "go"
    with pytest.raises(flow.InvalidState):
        eng.delete(p.id)  # waiting
    with pytest.raises(flow.InvalidState):
        eng.delete(cid)  # its parent is waiting
    p.signal("go", "x")
    assert p.result(timeout=RESULT) == ["c", "x"]
    eng.delete(cid)
    eng.delete(p.id)
    with pytest.raises(flow.InvalidRun):
        eng.run(p.id)


def test_cancelling_a_parent_does_not_cancel_its_child(eng):
    p = eng.start(fm.parent_of_waiter)
    cid = f"{p.id}/{fm.collect_signals.name}-0"
    wait_status(p, "waiting")  # on its child, which exists then
    child = eng.run(cid)
    wait_status(child, "waiting")
    assert child.info().parent_id == p.id
    assert p.cancel() is True
    wait_status(p, "cancelled")
    assert child.status() == "waiting"
    with pytest.raises(flow.InvalidState):
        eng.delete(cid)  # not terminal itself
    child.signal("c", 1)
    assert child.result(timeout=RESULT) == [1]
    eng.delete(cid)  # its parent is terminal (cancelled)


# ---------------------------------------------------------------- runs()


def test_runs_filters_limit_and_order(node):
    with flow.Engine(node) as eng:
        def start(wf, *a, **k):
            r = eng.start(wf, *a, **k)
            time.sleep(0.003)  # distinct creation times
            return r

        start(fm.add, 1, 1, id="a1")
        start(fm.add, 1, 2, id="a2")
        start(fm.validated, "bad", id="v1")  # rejected
        start(fm.add, 1, 3, id="a3")
        c1 = start(fm.collect_signals, ["x"], id="c1")
        assert c1.cancel() is True
        wait_status(c1, "cancelled", timeout=10)

        def ids(infos):
            assert all(isinstance(i, flow.RunInfo) for i in infos)
            return [i.id for i in infos]

        assert ids(eng.runs()) == ["a1", "a2", "v1", "a3", "c1"]
        assert ids(eng.runs(limit=2)) == ["a3", "c1"]
        assert ids(eng.runs(limit=1)) == ["c1"]
        assert ids(eng.runs(limit=50)) == ["a1", "a2", "v1", "a3", "c1"]
        assert ids(eng.runs(status="pending")) == ["a1", "a2", "a3"]
        assert ids(eng.runs(status=["rejected", "cancelled"])) == ["v1", "c1"]
        assert ids(eng.runs(status=["cancelled"])) == ["c1"]
        assert ids(eng.runs(status="finished")) == []
        assert ids(eng.runs(workflow=fm.add)) == ["a1", "a2", "a3"]
        assert ids(eng.runs(workflow=fm.add.name, limit=2)) == ["a2", "a3"]
        assert ids(eng.runs(workflow=fm.add, status="pending", limit=1)) == ["a3"]
        assert ids(eng.runs(workflow=fm.collect_signals, status="pending")) == []
        assert ids(eng.runs(status=list(STATUSES))) == ["a1", "a2", "v1", "a3", "c1"]
        for s in STATUSES:
            eng.runs(status=s)
        by_id = {i.id: i for i in eng.runs()}
        assert by_id["v1"].status == "rejected" and by_id["a1"].status == "pending"
        assert by_id["a1"].workflow == fm.add.name
        assert by_id["a2"] == eng.run("a2").info()


# ---------------------------------------------------------------- history


def test_history_events_table(eng, out):
    peer = eng.start(fm.collect_signals, ["ping"])
    t0 = time.time()
    run = eng.start(fm.tour, out, peer=peer.id)
    run.signal("go", {"g": 1})
    res = run.result(timeout=RESULT)
    t1 = time.time()
    rid = run.id
    assert peer.result(timeout=RESULT) == [{"p": 1}]
    ev = run.history()
    assert all(isinstance(e, flow.Event) for e in ev)
    assert [e.seq for e in ev] == list(range(len(ev)))
    assert all(isinstance(e.ts, int) and t0 * 1000 - 1000 <= e.ts <= t1 * 1000 + 1000
               for e in ev)
    assert [e.ts for e in ev] == sorted(e.ts for e in ev)
    assert all(isinstance(e.data, dict) for e in ev)
    first = ev[0]
    assert (first.type, first.name, first.pos) == ("status", "pending", None)
    assert first.data["args"] == [out] and first.data["kwargs"] == {"peer": peer.id}
    assert [e.name for e in ev if e.type == "status"][-1] == "finished"
    echo0, echo1 = f"{rid}/{fm.echo.name}-0", f"{rid}/{fm.echo.name}-1"
    positioned = [(e.type, e.name, e.pos) for e in ev if e.pos is not None]
    assert positioned == [
        ("step", "add", 0), ("retry", "bad", 1), ("step_failed", "bad", 1),
        ("sleep", "nap", 2), ("wait", "go", 3), ("timer", "never", 4), ("wait", "never", 4),
        ("child", fm.echo.name, 5), ("start", fm.echo.name, 6), ("now", "", 7),
        ("random", "", 8), ("uuid", "", 9), ("kv", "k", 10), ("kv", "n", 11), ("kv", "k", 12),
        ("log", "hello", 13), ("send", "ping", 14), ("step", "last", 15)]
    others = [(e.type, e.name, e.pos) for e in ev if e.pos is None and e.type != "status"]
    assert others == [("signal", "go", None), ("patched", "p1", None)]
    by = {(e.type, e.pos): e for e in ev}
    sig = next(e for e in ev if e.type == "signal")
    assert sig.data["payload"] == {"g": 1} and sig.seq < by[("wait", 3)].seq
    assert by[("step", 0)].data["result"] == 3
    retry = by[("retry", 1)]
    assert retry.data["attempt"] == 1 and retry.data["wait"] == pytest.approx(0.01)
    assert "bad failed" in str(retry.data["error"])
    err = str(by[("step_failed", 1)].data["error"])
    assert "ValueError" in err and "bad failed" in err
    assert t0 <= by[("sleep", 2)].data["due"] <= t1
    assert by[("wait", 3)].data["payload"] == {"g": 1}
    assert by[("wait", 3)].data["timed_out"] is False
    assert t0 <= by[("timer", 4)].data["due"] <= t1
    assert by[("wait", 4)].data["payload"] is None and by[("wait", 4)].data["timed_out"] is True
    assert by[("child", 5)].data["id"] == echo0
    assert by[("start", 6)].data["id"] == echo1 == res["started"]
    assert by[("now", 7)].data["value"] == res["now"]
    assert by[("random", 8)].data["value"] == res["random"]
    assert by[("uuid", 9)].data["value"] == res["uuid"]
    assert (by[("kv", 10)].data["op"], by[("kv", 10)].data["value"]) == ("set", {"a": 1})
    assert (by[("kv", 11)].data["op"], by[("kv", 11)].data["value"]) == ("incr", 2)
    assert by[("kv", 12)].data["op"] == "delete"
    assert by[("log", 13)].data["fields"] == {"x": 1}
    assert (by[("send", 14)].data["to"], by[("send", 14)].data["payload"]) == (
        peer.id, {"p": 1})
    patched = next(e for e in ev if e.type == "patched")
    assert patched.data == {}
    assert by[("step", 15)].data["result"] == "end"
    # what the function saw
    assert res["add"] == 3 and res["bad"] == "bad failed" and res["go"] == {"g": 1}
    assert res["never"] is None and res["child"] == 5 and res["incr"] == 2
    assert res["patched"] is True and t0 <= res["now"] <= t1
    assert 0 <= res["random"] < 1 and uuid.UUID(hex=res["uuid"]).version == 4
    assert re.fullmatch(r"[0-9a-f]{32}", res["uuid"])
    assert fm.read_lines(out).count("bad") == 2 and fm.read_lines(out).count("last") == 1
    assert eng.run(echo0).info().parent_id == rid
    assert eng.run(echo1).result(timeout=RESULT) == 6
    assert eng.run(echo1).info().parent_id is None
    assert run.kv() == {"n": 2}


# ---------------------------------------------------------------- kv, log, entropy, patched


def test_kv_and_log_are_recorded_once_and_replayed(eng, out):
    run = eng.start(fm.kv_flow, out)
    res = run.result(timeout=RESULT)
    assert res == ["missing", 1, 6, {"a": [1, 2]}, {"k": {"a": [1, 2]}, "n": 6},
                   ["invalid_argument", "invalid_argument", "invalid_argument",
                    "invalid_payload"], "gone"]
    assert fm.read_lines(out) == ["kv"]  # the second attempt replayed everything
    assert eng.kv(run.id) == run.kv() == {"n": 6, "s": "text"}
    logs = events(run, "log")
    assert [(e.name, e.data["fields"]) for e in logs] == [("kv done", {"n": 6})]
    incrs = [e.data["value"] for e in events(run, "kv") if e.data["op"] == "incr"]
    assert incrs == [1, 6]


def test_kv_from_outside_while_the_run_waits(eng):
    run = eng.start(fm.kv_then_wait)
    wait_status(run, "waiting")
    assert eng.kv(run.id) == run.kv() == {"a": 1, "b": 3}
    run.signal("go")
    assert run.result(timeout=RESULT) == {"a": 1, "b": 3}


def test_now_random_uuid_are_identical_on_replay(eng, out):
    t0 = time.time()
    run = eng.start(fm.entropy, out)
    vals, used = run.result(timeout=RESULT)
    assert vals == used  # what the step used in attempt 1 is what attempt 2 saw
    now, rnd, uid_ = vals
    assert t0 - 1 <= now <= time.time() + 1
    assert 0 <= rnd < 1 and uuid.UUID(hex=uid_).version == 4
    assert [e.data["value"] for e in run.history() if e.type in ("now", "random", "uuid")] == vals
    assert fm.read_lines(out) == ["use", "entropy"]


def test_patched_marks_new_runs_and_not_old_ones(eng, out, tmp_path):
    flag = str(tmp_path / "deployed")
    old = eng.start(fm.patchy, out, flag)
    wait_status(old, "waiting")  # recorded: one (0), old (1); waits at 2
    open(flag, "w").close()  # the new code is deployed
    new = eng.start(fm.patchy, out, flag)
    wait_status(new, "waiting")
    old.signal("go")
    new.signal("go")
    assert old.result(timeout=RESULT) == "old"
    assert new.result(timeout=RESULT) == "new"  # the replay saw patched() True again
    assert events(old, "patched") == []
    [mark] = events(new, "patched")
    assert (mark.name, mark.pos, mark.data) == ("fix", None, {})
    assert [(e.name, e.pos) for e in events(new, "step")] == [("one", 0), ("new", 1)]
    lines = fm.read_lines(out)
    assert (lines.count("one"), lines.count("old"), lines.count("new")) == (2, 1, 1)


def test_patched_change_ids(eng):
    run = eng.start(fm.patched_ids)
    assert run.result(timeout=RESULT) == ["invalid_argument"] * 3 + [True]


# ---------------------------------------------------------------- non-determinism


@pytest.mark.parametrize("mode,catch", [("rename", False), ("rename", True), ("kind", False),
                                        ("kv", False), ("now", False), ("sleep", False),
                                        ("child", False)])
def test_non_determinism_fails_the_run_at_once(eng, tmp_path, mode, catch):
    flag = str(tmp_path / "changed")
    run = eng.start(fm.nondet, flag, mode, catch)
    wait_status(run, "waiting")
    open(flag, "w").close()
    run.signal("go")
    with pytest.raises(flow.RunFailed) as e:
        run.result(timeout=RESULT)
    assert (e.value.error_type, e.value.error_code) == ("NonDeterminism", "non_determinism")
    info = run.info()
    assert (info.status, info.attempt) == ("failed", 1)
    msg = info.error["message"]
    assert msg == e.value.error_message
    if mode == "rename":
        assert msg == "position 1: the run recorded step 'charge', the code calls step 'refund'"
    else:
        assert msg.startswith("position 1: the run recorded ")
    if mode == "kind":
        assert "step 'charge'" in msg and "sleep 'charge'" in msg
    elif mode == "kv":
        assert "'a'" in msg and "'b'" in msg
    elif mode == "now":
        assert "now" in msg and "random" in msg
    elif mode == "sleep":
        assert "sleep 'a'" in msg and "sleep 'b'" in msg
    elif mode == "child":
        assert fm.echo.name in msg and fm.whoami.name in msg


def test_log_messages_are_not_compared(eng, tmp_path):
    flag = str(tmp_path / "changed")
    run = eng.start(fm.nondet, flag, "log", False)
    wait_status(run, "waiting")
    open(flag, "w").close()
    run.signal("go")
    assert run.result(timeout=RESULT) == "finished"


# ---------------------------------------------------------------- children


def test_child_and_start_with_default_ids(eng):
    run = eng.start(fm.parent)
    res = run.result(timeout=RESULT)
    rid = run.id
    echo0, echo1 = f"{rid}/{fm.echo.name}-0", f"{rid}/{fm.echo.name}-1"
    add0, who0 = f"{rid}/{fm.add.name}-0", f"{rid}/{fm.whoami.name}-0"
    assert res == [1, 5, echo1, [who0, fm.whoami.name, rid, 1], rid, None]
    assert [(e.type, e.name, e.data["id"]) for e in run.history()
            if e.type in ("child", "start")] == [
        ("child", fm.echo.name, echo0), ("child", fm.add.name, add0),
        ("start", fm.echo.name, echo1), ("child", fm.whoami.name, who0)]
    for cid in (echo0, add0, who0):
        info = eng.run(cid).info()
        assert (info.parent_id, info.status) == (rid, "finished")
    started = eng.run(echo1)
    assert started.result(timeout=RESULT) == 3 and started.info().parent_id is None


def test_a_default_child_id_over_200_characters_is_shortened(eng):
    base = "p" * 180 + uuid.uuid4().hex[:15]
    results = []
    for tail in ("aaaaa", "bbbbb"):
        pid = base + tail
        assert len(pid) == 200
        run = eng.start(fm.parent_of_whoami, id=pid)
        child_id, name, parent_id, _ = run.result(timeout=RESULT)
        full = f"{pid}/{fm.whoami.name}-0"
        assert len(full) > 200
        assert child_id[:161] == full[:160] + "~"
        assert re.fullmatch(r"[0-9a-f]+", child_id[161:]) and len(child_id) <= 200
        assert parent_id == pid
        assert eng.run(child_id).info().parent_id == pid
        results.append(child_id)
    assert results[0] != results[1]  # the digest is of the whole id


@pytest.mark.parametrize("target,arg,expect", [
    ("boom", "child boom", ["RunFailed", "ValueError", "child boom", None, "run_failed"]),
    ("rejecter", "nope", ["RunRejected", "Reject", "nope", "rejected", "run_rejected"]),
])
def test_a_child_that_does_not_finish_raises_in_its_parent(eng, target, arg, expect):
    run = eng.start(fm.parent_catches, target, arg)
    res = run.result(timeout=RESULT)
    wf = {"boom": fm.boom, "rejecter": fm.rejecter}[target]
    assert res[0] == expect[0] and res[1] == f"{run.id}/{wf.name}-0"
    assert res[2:] == expect[1:]


def test_a_cancelled_child_raises_run_cancelled_in_its_parent(eng):
    run = eng.start(fm.parent_catches, "collect", ["c"])
    cid = f"{run.id}/{fm.collect_signals.name}-0"
    wait_status(run, "waiting")  # on its child, which exists then
    child = eng.run(cid)
    wait_status(child, "waiting")
    assert child.cancel() is True
    res = run.result(timeout=RESULT)
    assert res[0] == "RunCancelled" and res[1] == cid and res[5] == "run_cancelled"


def test_a_child_id_naming_an_existing_run(eng):
    c = eng.start(fm.collect_signals, ["x"])
    p = eng.start(fm.parent_adopts, c.id)
    wait_status(p, "waiting")
    wait_status(c, "waiting")
    c.signal("x", 9)
    assert p.result(timeout=RESULT) == [9]
    assert c.info().parent_id is None  # waited for as it is
    other = eng.start(fm.echo, 1)
    other.result(timeout=RESULT)
    p2 = eng.start(fm.parent_adopts, other.id)  # a run of another workflow
    with pytest.raises(flow.RunFailed) as e:
        p2.result(timeout=RESULT)
    assert e.value.error_code == "run_id_conflict"
    assert p2.info().attempt == 1


# ---------------------------------------------------------------- waiting is unwinding


def test_suspend_unwinds_through_finally_and_is_not_an_exception(eng, out):
    run = eng.start(fm.unwinding, out)
    assert run.result(timeout=RESULT) == "done"
    lines = fm.read_lines(out)
    assert not any(x.startswith("caught") for x in lines), lines
    assert any(x.startswith("finally ") and x.endswith(" True False") for x in lines), lines
    assert lines[-1] == "finally ok"


# ---------------------------------------------------------------- async workflows


def test_async_gather_takes_positions_in_call_order(eng, tmp_path):
    maps = []
    for i in range(2):
        out = str(tmp_path / f"out{i}")
        run = eng.start(fm.gather_flow, out)
        assert run.result(timeout=RESULT) == [1, 2, 3, True, True]
        maps.append({e.pos: e.name for e in events(run, "step")})
        lines = fm.read_lines(out)
        assert sorted(lines) == ["a", "b", "c", "gather"]  # each step executed once
        assert [(e.type, e.pos) for e in run.history() if e.pos is not None][0] == ("now", 0)
    assert maps == [{1: "a", 2: "b", 3: "c"}] * 2


def test_async_context_calls(eng, out):
    run = eng.start(fm.async_all, out)
    run.signal("s", "sig")
    res = run.result(timeout=RESULT)
    assert res == ["sig", "kid", f"{run.id}/{fm.echo.name}-1", 1, True, "bad failed", {"n": 1}]
    assert [e.type for e in run.history() if e.pos is not None and e.type != "timer"] == [
        "wait", "child", "start", "kv", "log", "step_failed", "sleep"]


# ---------------------------------------------------------------- timers without an engine


def test_timers_fire_with_no_engine_in_any_process(spawner, tmp_path):
    pp = spawner(tmp_path / "store", workers=1)
    out = str(tmp_path / "out")
    eng = flow.Engine(pp)
    run = eng.start(fm.nap_then_tick, out, 0.3)
    rid = run.id
    wait_status(run, "waiting")
    eng.close()
    wait_until(lambda: "woke" in fm.read_lines(out), timeout=10, what="the run to wake")
    with flow.Engine(pp) as e2:
        assert e2.run(rid).result(timeout=RESULT) == "woke"
