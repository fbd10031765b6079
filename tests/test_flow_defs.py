"""pipeproc.flow definitions and argument checks (FLOW.md §1, §3 start/Engine, §4): the
``workflow`` decorator, ``Retry``, payloads, ids, and the engine's argument errors.

Most of it needs no node; what goes through an ``Engine`` uses a node without workers
(runs stay ``pending``), which is all argument checks need.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest

import helpers
import pipeproc
from pipeproc import errors, flow
from procmods import flowmods as fm

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024


# ---------------------------------------------------------------- module-level functions
# (valid workflow functions of an importable module: this test module)


def plain_fn(ctx, x):
    return x


def custom_fn(ctx):
    return None


def dup_a(ctx):
    return "a"


def dup_b(ctx):
    return "b"


async def async_fn(ctx):
    return None


def opt_fn(ctx):
    return None


class Holder:
    def method(self, ctx):
        return None


DECORATED: dict = {}


def decorate_once(fn, **kw):
    """Decorate a module-level function at most once per process (names are unique)."""
    key = (fn.__name__, tuple(sorted(kw.items())))
    if key not in DECORATED:
        DECORATED[key] = flow.workflow(**kw)(fn)
    return DECORATED[key]


# ---------------------------------------------------------------- the API surface


def test_flow_exports_the_contract_names():
    for name in ("workflow", "Workflow", "Retry", "Context", "AsyncContext", "Suspend",
                 "Engine", "Run", "RunInfo", "Event"):
        assert hasattr(flow, name), name


@pytest.mark.parametrize("name,code,base", [
    ("InvalidWorkflow", "invalid_workflow", errors.PipeProcArgumentError),
    ("InvalidPayload", "invalid_payload", errors.PipeProcArgumentError),
    ("PayloadTooLarge", "payload_too_large", errors.PipeProcArgumentError),
    ("InvalidRun", "invalid_run", LookupError),
    ("RunIdConflict", "run_id_conflict", pipeproc.PipeProcError),
    ("InvalidState", "invalid_state", pipeproc.PipeProcError),
    ("NonDeterminism", "non_determinism", pipeproc.PipeProcError),
    ("StepFailed", "step_failed", pipeproc.PipeProcError),
    ("Reject", "rejected", pipeproc.PipeProcError),
    ("RunFailed", "run_failed", errors.RunError),
    ("RunAborted", "run_aborted", errors.RunError),
    ("RunCancelled", "run_cancelled", errors.RunError),
    ("RunRejected", "run_rejected", errors.RunError),
])
def test_error_classes_are_exported_with_their_codes(name, code, base):
    cls = getattr(flow, name)
    assert cls is getattr(errors, name)
    assert cls.code == code
    assert issubclass(cls, base) and issubclass(cls, pipeproc.PipeProcError)
    assert errors.from_code(code, "m").__class__ is cls
    assert issubclass(flow.RunError, pipeproc.PipeProcError)


def test_suspend_is_a_base_exception_not_an_exception():
    assert issubclass(flow.Suspend, BaseException)
    assert not issubclass(flow.Suspend, Exception)


def test_run_errors_carry_run_id_and_error_fields():
    e = flow.RunFailed("m", run_id="r", error_type="ValueError", error_message="x",
                       error_code=None)
    assert (e.run_id, e.error_type, e.error_message, e.error_code) == ("r", "ValueError",
                                                                        "x", None)


# ---------------------------------------------------------------- the decorator


def test_decorator_returns_a_workflow_with_defaults():
    wf = decorate_once(plain_fn)
    assert isinstance(wf, flow.Workflow)
    assert wf.name == f"{__name__}:plain_fn"
    assert wf.version == "1"
    assert wf.max_failures == 3
    assert wf.lease == 60.0
    assert wf.validate is None
    assert wf.fn is plain_fn


def test_decorator_options_are_kept():
    wf = decorate_once(custom_fn, name="my flow", version="2024-1", max_failures=1,
                       lease=0.5, validate=fm.reject_bad)
    assert (wf.name, wf.version, wf.max_failures, wf.lease) == ("my flow", "2024-1", 1, 0.5)
    assert wf.validate is fm.reject_bad and wf.fn is custom_fn


def test_async_def_is_a_workflow_too():
    wf = decorate_once(async_fn)
    assert isinstance(wf, flow.Workflow) and wf.fn is async_fn


def test_module_workflows_default_name_is_module_qualname():
    assert fm.add.name == "procmods.flowmods:add"
    assert fm.named.name == "custom name / not a module path"


def _closure():
    def inner(ctx):
        return None
    return inner


@pytest.mark.parametrize("what", ["lambda", "closure", "method", "bound method", "not callable"])
def test_invalid_workflow_functions(what):
    target = {
        "lambda": lambda ctx: None,
        "closure": _closure(),
        "method": Holder.method,
        "bound method": Holder().method,
        "not callable": 42,
    }[what]
    with pytest.raises(flow.InvalidWorkflow) as e:
        flow.workflow()(target)
    assert e.value.code == "invalid_workflow"


def test_method_decorated_in_class_body_is_invalid():
    with pytest.raises(flow.InvalidWorkflow):
        class C:
            @flow.workflow()
            def m(self, ctx):
                return None


def test_a_second_workflow_with_the_same_name_fails():
    decorate_once(dup_a, name="dup name")
    with pytest.raises(flow.InvalidWorkflow) as e:
        flow.workflow(name="dup name")(dup_b)
    assert e.value.code == "invalid_workflow"


def test_a_name_taken_by_a_default_name_fails():
    with pytest.raises(flow.InvalidWorkflow):
        flow.workflow(name=fm.add.name)(dup_b)  # "procmods.flowmods:add" exists already


@pytest.mark.parametrize("kw", [
    {"max_failures": 0}, {"max_failures": -1}, {"max_failures": 1.5}, {"max_failures": "3"},
    {"max_failures": None},
    {"lease": 0}, {"lease": -1.0}, {"lease": "60"}, {"lease": None},
    {"version": 1}, {"version": None},
    {"validate": 5}, {"validate": "module:fn"},
    {"name": 5},
])
def test_bad_decorator_options(kw):
    with pytest.raises(pipeproc.InvalidArgument) as e:
        flow.workflow(**kw)(opt_fn)
    assert e.value.code == "invalid_argument"


def test_int_lease_and_other_good_options_are_accepted():
    wf = decorate_once(opt_fn, lease=2, max_failures=1, version="v")
    assert wf.lease == 2 and wf.max_failures == 1


# ---------------------------------------------------------------- Retry


def test_retry_good_values():
    flow.Retry()
    flow.Retry(intervals=[])
    flow.Retry(intervals=[0, 0.5, 2])
    flow.Retry(initial=0, factor=1, max_interval=0, max_attempts=1)
    flow.Retry(transient=fm.only_os_errors)


@pytest.mark.parametrize("kw", [
    {"intervals": [-0.1]}, {"intervals": [0.1, -1]}, {"intervals": ["1"]}, {"intervals": 1.0},
    {"intervals": "abc"},
    {"initial": -0.1}, {"initial": "0.1"},
    {"factor": 0.5}, {"factor": 0}, {"factor": "2"},
    {"max_interval": -1}, {"max_interval": "30"},
    {"max_attempts": 0}, {"max_attempts": -2}, {"max_attempts": 1.5}, {"max_attempts": "5"},
    {"transient": 5}, {"transient": "yes"},
])
def test_bad_retry_values(kw):
    with pytest.raises(pipeproc.InvalidArgument) as e:
        flow.Retry(**kw)
    assert e.value.code == "invalid_argument"


# ---------------------------------------------------------------- Engine and start checks


@pytest.fixture
def eng(node):
    """An engine on a node without workers (runs stay pending)."""
    with flow.Engine(node) as e:
        yield e


@pytest.mark.parametrize("bad", [None, "not a node", 5, object()])
def test_engine_needs_a_pipeproc(bad):
    with pytest.raises(pipeproc.InvalidArgument):
        flow.Engine(bad)


def test_several_engines_share_a_node(node):
    e1 = flow.Engine(node)
    e2 = flow.Engine(node)
    try:
        r = e1.start(fm.echo, 1, id="shared-1")
        assert e2.run("shared-1").status() == "pending"
        assert [i.id for i in e2.runs()] == ["shared-1"]
        assert r.created is True
    finally:
        e1.close()
        e2.close()


def test_start_returns_a_pending_run_with_a_uuid4_hex_id(eng):
    run = eng.start(fm.echo, 1)
    assert run.created is True
    assert re.fullmatch(r"[0-9a-f]{32}", run.id)
    assert uuid.UUID(hex=run.id).version == 4
    assert run.status() == "pending"
    assert isinstance(run.created, bool)
    info = run.info()
    assert isinstance(info, flow.RunInfo)
    assert (info.id, info.workflow, info.status, info.parent_id, info.version, info.error) == (
        run.id, fm.echo.name, "pending", None, "1", None)
    other = eng.start(fm.echo, 1)
    assert other.id != run.id


def test_start_by_name(eng):
    run = eng.start("procmods.flowmods:echo", 7, id="by-name")
    assert run.created and run.info().workflow == "procmods.flowmods:echo"
    assert eng.start(fm.named.name, 1).info().workflow == "custom name / not a module path"


@pytest.mark.parametrize("wf", ["no.such:workflow", "", 5, None, fm.echo.fn, object()])
def test_start_of_something_that_is_not_a_workflow(eng, wf):
    with pytest.raises(flow.InvalidWorkflow) as e:
        eng.start(wf, 1)
    assert e.value.code == "invalid_workflow"
    assert eng.runs() == []


@pytest.mark.parametrize("rid", ["", "x" * 201, "a\nb", "a\tb", "nul\x00", "esc\x1b", "del\x7f",
                                 5, b"bytes", ["list"]])
def test_start_with_a_bad_id(eng, rid):
    with pytest.raises(pipeproc.InvalidArgument) as e:
        eng.start(fm.echo, 1, id=rid)
    assert e.value.code == "invalid_argument"
    assert eng.runs() == []


def test_ids_of_200_characters_and_any_printable_text_are_fine(eng):
    for rid in ("x" * 200, "a/b c:d-é✓", "1"):
        run = eng.start(fm.echo, 1, id=rid)
        assert run.id == rid and run.created
        assert eng.run(rid).info().id == rid


@pytest.mark.parametrize("args,kwargs,typename", [
    (({1, 2},), {}, "set"),
    ((object(),), {}, "object"),
    ((), {"x": {1}}, "set"),
    (([1, {"deep": frozenset()}],), {}, "frozenset"),
    ((fm.echo,), {}, "Workflow"),
])
def test_start_arguments_must_be_payloads(eng, args, kwargs, typename):
    with pytest.raises(flow.InvalidPayload) as e:
        eng.start(fm.echo, *args, **kwargs)
    assert e.value.code == "invalid_payload"
    assert typename in str(e.value)
    assert eng.runs() == []


def test_payloads_round_trip(eng):
    """Scalars, None, bytes, nested lists and dicts are payloads; tuples come back lists."""
    args = [None, True, 1, -2**40, 1.5, "s", b"\x00\xff", [1, [2]], {"a": {"b": [None]}},
            (1, 2)]
    run = eng.start(fm.echo, args, id="payloads")
    first = run.history()[0]
    assert first.type == "status" and first.name == "pending"
    assert first.data["args"] == [args[:-1] + [[1, 2]]]
    assert first.data["kwargs"] == {}


def test_arguments_over_a_mib_together_are_too_large(eng):
    big = "x" * (600 * 1024)
    with pytest.raises(flow.PayloadTooLarge) as e:
        eng.start(fm.add, big, big)  # each fits, together they do not
    assert e.value.code == "payload_too_large"
    with pytest.raises(flow.PayloadTooLarge):
        eng.start(fm.add, big, b=big)
    with pytest.raises(flow.PayloadTooLarge):
        eng.start(fm.echo, b"y" * (MB + 1))
    assert eng.runs() == []
    run = eng.start(fm.echo, "z" * (MB - 4096))  # just under: fine
    assert run.created


def test_checks_come_in_order_workflow_id_arguments(eng):
    with pytest.raises(flow.InvalidWorkflow):
        eng.start("no.such:wf", {1}, id="")
    with pytest.raises(pipeproc.InvalidArgument) as e:
        eng.start(fm.echo, {1}, id="")
    assert e.value.code == "invalid_argument"
    with pytest.raises(flow.InvalidPayload):
        eng.start(fm.echo, {1}, id="fine")


def test_reserved_keywords_retry_and_id(eng):
    """``id`` is the start's own keyword, never passed to the workflow."""
    run = eng.start(fm.validated, "a", id="kw-id", y="b")
    assert run.id == "kw-id"
    first = run.history()[0]
    assert first.data["args"] == ["a"] and first.data["kwargs"] == {"y": "b"}


# ---------------------------------------------------------------- idempotent start, validate


def test_start_of_an_existing_id_returns_it_and_starts_nothing(eng):
    r1 = eng.start(fm.echo, 1, id="same")
    r2 = eng.start(fm.echo, 2, id="same")
    assert (r1.created, r2.created) == (True, False)
    assert r2.id == "same"
    assert len(eng.runs()) == 1
    assert eng.history("same")[0].data["args"] == [1]
    with pytest.raises(flow.RunIdConflict) as e:
        eng.start(fm.add, 1, 2, id="same")
    assert e.value.code == "run_id_conflict"
    with pytest.raises(flow.RunIdConflict):
        eng.start(fm.add.name, 1, 2, id="same")


def test_validate_runs_in_the_caller_and_rejects(eng):
    fm.VALIDATE_CALLS.clear()
    ok = eng.start(fm.validated, "good", y=2, id="v-ok")
    assert fm.VALIDATE_CALLS == [(os.getpid(), ["good"], {"y": 2})]
    assert ok.created and ok.status() == "pending"
    bad = eng.start(fm.validated, "bad", id="v-bad")
    assert bad.created is True
    assert bad.status() == "rejected"
    info = bad.info()
    assert info.error == {"type": "ValueError", "message": "bad argument", "code": None}
    with pytest.raises(flow.RunRejected) as e:
        bad.result(timeout=5)
    assert e.value.run_id == "v-bad" and e.value.error_type == "ValueError"
    assert e.value.error_message == "bad argument" and e.value.code == "run_rejected"
    # an existing id: validate is not called, the run is returned as it is
    fm.VALIDATE_CALLS.clear()
    again = eng.start(fm.validated, "bad", id="v-ok")
    assert again.created is False and again.status() == "pending"
    assert fm.VALIDATE_CALLS == []
    assert eng.start(fm.validated, "good", id="v-bad").status() == "rejected"


def test_validate_raising_reject_rejects(eng):
    wf_name = "defs validate reject"

    def _v(*a, **k):  # noqa: ANN001 - validate may be any callable (runs in the caller)
        raise flow.Reject("not today")

    wf = DECORATED.get(wf_name) or flow.workflow(name=wf_name, validate=_v)(dup_validate_fn)
    DECORATED[wf_name] = wf
    run = eng.start(wf, 1)
    assert run.created and run.status() == "rejected"
    assert run.info().error == {"type": "Reject", "message": "not today", "code": "rejected"}


def dup_validate_fn(ctx, x):
    return x


# ---------------------------------------------------------------- unknown ids, other arguments


def test_unknown_run_ids(eng):
    for call in (lambda: eng.run("nope"), lambda: eng.signal("nope", "s"),
                 lambda: eng.cancel("nope"), lambda: eng.resume("nope"),
                 lambda: eng.history("nope"), lambda: eng.kv("nope"),
                 lambda: eng.delete("nope")):
        with pytest.raises(flow.InvalidRun) as e:
            call()
        assert e.value.code == "invalid_run"
        assert isinstance(e.value, LookupError)


def test_signal_arguments(eng):
    run = eng.start(fm.collect_signals, ["s"], id="sig-args")
    for name in ("", "x" * 201, 5, None):
        with pytest.raises(pipeproc.InvalidArgument):
            eng.signal(run.id, name)
    with pytest.raises(flow.InvalidPayload):
        eng.signal(run.id, "s", {1, 2})
    with pytest.raises(flow.PayloadTooLarge):
        run.signal("s", b"x" * (MB + 1))
    assert [e for e in run.history() if e.type == "signal"] == []
    eng.signal(run.id, "y" * 200, None)
    run.signal("s", {"ok": [1]})
    sigs = [e for e in run.history() if e.type == "signal"]
    assert [(e.name, e.pos, e.data["payload"]) for e in sigs] == [
        ("y" * 200, None, None), ("s", None, {"ok": [1]})]


def test_signal_to_a_rejected_run_is_dropped(eng):
    run = eng.start(fm.validated, "bad", id="rej-sig")
    before = run.history()
    assert eng.signal(run.id, "s", 1) is None
    assert run.history() == before


@pytest.mark.parametrize("kw", [{"status": "nope"}, {"status": ["pending", "nope"]},
                                {"status": 5}, {"limit": 0}, {"limit": -1}, {"limit": 1.5},
                                {"limit": "2"}])
def test_runs_arguments(eng, kw):
    with pytest.raises(pipeproc.InvalidArgument):
        eng.runs(**kw)


def test_result_timeout_on_a_pending_run(eng):
    run = eng.start(fm.echo, 1)
    with pytest.raises(pipeproc.Timeout) as e:
        run.result(timeout=0.2)
    assert e.value.code == "timeout"


def test_resume_and_delete_of_a_pending_run_are_invalid_state(eng):
    run = eng.start(fm.echo, 1)
    with pytest.raises(flow.InvalidState) as e:
        run.resume()
    assert e.value.code == "invalid_state"
    with pytest.raises(flow.InvalidState):
        eng.delete(run.id)
    assert run.status() == "pending"


def test_run_methods_equal_engine_methods(eng):
    run = eng.start(fm.collect_signals, ["a"], id="twin")
    run.signal("a", 1)
    assert run.history() == eng.history("twin")
    assert run.kv() == eng.kv("twin") == {}
    assert run.info() == eng.run("twin").info()
    assert run.status() == eng.run("twin").status() == "pending"
    assert isinstance(run, flow.Run) and isinstance(eng.run("twin"), flow.Run)
    ev = run.history()[0]
    assert isinstance(ev, flow.Event)
    assert (ev.seq, ev.type, ev.name, ev.pos) == (0, "status", "pending", None)
    assert ev.data["args"] == [["a"]] and ev.data["kwargs"] == {}
    assert isinstance(ev.ts, int)


def test_cancel_of_a_pending_run(eng):
    run = eng.start(fm.echo, 1)
    assert run.cancel() is True
    helpers.wait_until(lambda: run.status() == "cancelled", timeout=3, what="cancelled")
    assert run.cancel() is False
    assert eng.cancel(run.id) is False
    with pytest.raises(flow.RunCancelled):
        run.result(timeout=5)
