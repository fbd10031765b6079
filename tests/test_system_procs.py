"""System procs and workers (SPEC §6): processors run by the node's worker processes.

Processors live in tests/procmods/ (importable by workers as ``"procmods.<module>:<fn>"``,
since workers get the spawning process's sys.path and working directory).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pipeproc
from helpers import pid_alive
from procmods import sysmods
from helpers import wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
M = "procmods.sysmods"


# ---------------------------------------------------------------- helpers


def length(pp, topic: str) -> int:
    """Length of ``topic``, 0 when it has never had a commit."""
    try:
        return pp.length(topic)
    except pipeproc.PipeProcError as e:
        assert e.code == "invalid_topic"
        return 0


def wait_len(pp, topic: str, n: int, timeout: float = 10.0) -> list:
    wait_until(lambda: length(pp, topic) >= n, timeout, what=f"{n} logs in {topic!r}")
    logs = pp.range(topic)
    assert len(logs) == n, f"{topic!r} has {len(logs)} logs, expected {n}"
    return logs


def bodies(pp, topic: str) -> list:
    return [lg.body for lg in pp.range(topic)] if length(pp, topic) else []


def commit_ns(pp, topic: str, ns, **extra) -> list:
    return pp.commit([{"topic": topic, "body": {"n": n, **extra}} for n in ns])


def ms(log_id: str) -> int:
    return int(log_id.split("-")[0])


def acked_up_to(pp, name: str, last_id: str) -> bool:
    st = pp.inspect_proc(name)
    return st.last_acked_range.endswith(".." + last_id)


def code_of(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except pipeproc.PipeProcError as e:
        return e.code
    return None


def rel(path: str) -> str:
    """``path`` relative to the working directory (processor paths are resolved against it)."""
    return os.path.relpath(path, os.getcwd())


# ---------------------------------------------------------------- pipelines and results


def test_pipeline_of_two_system_procs_keeps_order(spawner):
    pp = spawner(workers=2)
    pp.system_proc(name="stage1", from_="numbers", processor=f"{M}:inc", to="mid")
    pp.system_proc(name="stage2", from_="mid", processor=f"{M}:double", to="final")
    for n in range(30):  # thirty separate commits
        pp.commit({"topic": "numbers", "body": {"n": n}})
    logs = wait_len(pp, "final", 30, timeout=15)
    assert [lg.body for lg in logs] == [{"n": (n + 1) * 2} for n in range(30)]
    assert [lg.body for lg in pp.range("mid")] == [{"n": n + 1} for n in range(30)]
    assert [int(lg.id.split("-")[1]) for lg in logs] == list(range(30))
    pp.wait_for_procs(["stage1", "stage2"], timeout=10)
    st = pp.stats()
    assert st["procs"]["stage1"]["lag"] == 0 and st["procs"]["stage2"]["lag"] == 0


def test_multi_topic_to_gets_each_result_atomically_with_the_ack(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="fan", from_="in", processor=f"{M}:double", to=["x", "y"])
    ids = commit_ns(pp, "in", range(5))
    xs = wait_len(pp, "x", 5)
    ys = wait_len(pp, "y", 5)
    assert [lg.body for lg in xs] == [{"n": 2 * n} for n in range(5)]
    assert [lg.body for lg in ys] == [{"n": 2 * n} for n in range(5)]
    # each result went to x and y in the same write (one ms per write request) ...
    assert [ms(a.id) for a in xs] == [ms(b.id) for b in ys]
    wait_until(lambda: acked_up_to(pp, "fan", ids[-1]), what="last log acked")
    st = pp.inspect_proc("fan")
    # ... and that write also acked the claim: the last ack happened in the write of the last result
    assert st.last_acked_at == ms(xs[-1].id) == ms(ys[-1].id)
    assert st.last_acked_range == f"{ids[-1]}..{ids[-1]}"


def test_list_result_is_one_log_per_element_per_topic(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="split", from_="in", processor=f"{M}:two_bodies", to=["x", "y"])
    commit_ns(pp, "in", [1, 2])
    want = [{"n": 1, "k": 0}, {"n": 1, "k": 1}, {"n": 2, "k": 0}, {"n": 2, "k": 1}]
    xs = wait_len(pp, "x", 4)
    ys = wait_len(pp, "y", 4)
    assert [lg.body for lg in xs] == want
    assert [lg.body for lg in ys] == want
    # the elements of one result share one write
    assert ms(xs[0].id) == ms(xs[1].id) == ms(ys[0].id) == ms(ys[1].id)


def test_list_of_one_list_is_one_log_with_a_list_body(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="lst", from_="in", processor=f"{M}:one_list_body", to="out")
    commit_ns(pp, "in", [7, 8])
    logs = wait_len(pp, "out", 2)
    assert [lg.body for lg in logs] == [[7, "a", "b"], [8, "a", "b"]]


def test_none_result_acks_and_commits_nothing(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="nothing", from_="in", processor=f"{M}:returns_none", to="out")
    ids = commit_ns(pp, "in", range(3))
    wait_until(lambda: acked_up_to(pp, "nothing", ids[-1]), what="all logs acked")
    pp.wait_for_procs(["nothing"], timeout=10)
    assert "out" not in pp.topics()
    assert pp.stats()["procs"]["nothing"]["lag"] == 0


def test_no_to_discards_results_and_acks(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="sink", from_="in", processor=f"{M}:double")
    ids = commit_ns(pp, "in", range(4))
    wait_until(lambda: acked_up_to(pp, "sink", ids[-1]), what="all logs acked")
    assert pp.topics() == ["in"]
    assert pp.length("in") == 4
    assert pp.stats()["system_procs"]["sink"]["to"] == []


def test_async_processor(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="aio", from_="in", processor=f"{M}:async_double", to="out")
    commit_ns(pp, "in", range(3))
    logs = wait_len(pp, "out", 3)
    assert [lg.body for lg in logs] == [{"n": 2 * n, "async": True} for n in range(3)]


def test_count_hands_a_batch(spawner):
    pp = spawner(workers=1)
    ids = commit_ns(pp, "in", range(12))  # all there before the procs exist
    pp.system_proc(name="summ", from_="in", processor=f"{M}:batch_summary", to="sum", count=5)
    pp.system_proc(name="each", from_="in", processor=f"{M}:batch_each", to="each_out", count=5)
    summ = wait_len(pp, "sum", 3)
    assert [lg.body["ns"] for lg in summ] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert [lg.body["ids"] for lg in summ] == [ids[0:5], ids[5:10], ids[10:12]]
    assert all(lg.body["is_list"] and lg.body["all_logs"] for lg in summ)
    each = wait_len(pp, "each_out", 12)
    assert [lg.body for lg in each] == [{"n": 10 * n} for n in range(12)]
    wait_until(lambda: acked_up_to(pp, "summ", ids[-1]), what="summ acked")
    assert pp.inspect_proc("summ").last_acked_range == f"{ids[10]}..{ids[11]}"


# ---------------------------------------------------------------- failures


def test_raising_processor_reclaims_then_disables(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="bad", from_="in", processor=f"{M}:boom", to="out", max_reclaims=3)
    commit_ns(pp, "in", [1])
    wait_until(lambda: pp.inspect_proc("bad").status == "disabled", timeout=10,
               what="proc disabled")
    st = pp.inspect_proc("bad")
    assert st.reclaims == 3
    assert st.last_acked_range == ""
    workers = pp.stats()["workers"]
    assert sum(w["failures"] for w in workers) == 3
    assert sum(w["executions"] for w in workers) == 3
    assert "out" not in pp.topics()
    assert pp.stats()["procs"]["bad"]["status"] == "disabled"


def test_raising_processor_gets_the_same_log_again(spawner, tmp_path):
    pp = spawner(workers=1)
    pp.system_proc(name="flaky", from_="in", processor=f"{M}:flaky", to="out", max_reclaims=5)
    ids = pp.commit([{"topic": "in", "body": {"n": 1, "counter": str(tmp_path / "c"), "fails": 2}},
                     {"topic": "in", "body": {"n": 2, "counter": str(tmp_path / "d"), "fails": 0}}])
    logs = wait_len(pp, "out", 2)
    assert [lg.body for lg in logs] == [{"n": 1, "attempt": 3}, {"n": 2, "attempt": 1}]
    wait_until(lambda: acked_up_to(pp, "flaky", ids[-1]), what="acked")
    st = pp.inspect_proc("flaky")
    assert st.status == "active" and st.reclaims == 0  # an ack resets reclaims
    assert sum(w["failures"] for w in pp.stats()["workers"]) == 2


# ---------------------------------------------------------------- processor references


@pytest.mark.parametrize("how", ["import_string", "file_path", "file_path_func", "function"])
def test_processor_references(spawner, how):
    pp = spawner(workers=1)
    byfile = os.path.join(HERE, "procmods", "byfile.py")
    processor, via = {
        "import_string": (f"{M}:double", None),
        "file_path": (rel(byfile), "process"),
        "file_path_func": (rel(byfile) + ":other", "other"),
        "function": (sysmods.double, None),
    }[how]
    pp.system_proc(name="p", from_="in", processor=processor, to="out")
    commit_ns(pp, "in", [3, 4])
    logs = wait_len(pp, "out", 2)
    if via is None:
        assert [lg.body for lg in logs] == [{"n": 6}, {"n": 8}]
    else:
        assert [lg.body for lg in logs] == [{"n": 3, "via": via}, {"n": 4, "via": via}]
    stored = pp.stats()["system_procs"]["p"]["processor"]
    if how == "function":
        assert stored == f"{M}:double"
    if how.startswith("file_path"):
        assert os.path.isabs(stored.split(":")[0])  # resolved against the caller's cwd


def _make_closure():
    factor = 3

    def closure(log):
        return {"n": log.body["n"] * factor}
    return closure


def _make_nested():
    def nested(log):
        return log.body
    return nested


@pytest.mark.parametrize("kind", ["lambda", "closure", "nested", "missing_module",
                                  "missing_function", "missing_file", "missing_file_func",
                                  "file_missing_function", "not_callable"])
def test_invalid_processor_refused_and_nothing_created(node, kind):
    processor = {
        "lambda": lambda log: log.body,
        "closure": _make_closure(),
        "nested": _make_nested(),
        "missing_module": "procmods.no_such_module:f",
        "missing_function": f"{M}:no_such_function",
        "missing_file": rel(os.path.join(HERE, "procmods", "no_such_file.py")),
        "missing_file_func": rel(os.path.join(HERE, "procmods", "no_such_file.py")) + ":f",
        "file_missing_function": rel(os.path.join(HERE, "procmods", "byfile.py")) + ":nope",
        "not_callable": 42,
    }[kind]
    with pytest.raises(pipeproc.PipeProcError) as ei:
        node.system_proc(name="inv", from_="in", processor=processor, to="out")
    assert ei.value.code == "invalid_processor"
    st = node.stats()
    assert "inv" not in st["procs"]
    assert "inv" not in st.get("system_procs", {})
    assert code_of(node.inspect_proc, "inv") == "invalid_proc"
    with pytest.raises(pipeproc.PipeProcError) as ei:  # also for a list of topics
        node.system_proc(name="inv", from_=["a", "b"], processor=processor)
    assert ei.value.code == "invalid_processor"
    assert not {"inv", "inv__a", "inv__b"} & set(node.stats()["procs"])


# ---------------------------------------------------------------- definitions


def test_from_list_creates_one_proc_per_topic(spawner):
    pp = spawner(workers=1)
    states = pp.system_proc(name="multi", from_=["a", "b"], processor=f"{M}:double", to="out")
    assert isinstance(states, list)
    assert [(s.name, s.topic) for s in states] == [("multi__a", "a"), ("multi__b", "b")]
    procs = pp.stats()["procs"]
    assert procs["multi__a"]["topic"] == "a" and procs["multi__b"]["topic"] == "b"
    assert "multi" not in procs
    assert "multi" in pp.stats()["system_procs"]
    pp.commit([{"topic": "a", "body": {"n": 1}}, {"topic": "b", "body": {"n": 2}}])
    logs = wait_len(pp, "out", 2)
    assert sorted(lg.body["n"] for lg in logs) == [2, 4]


def test_creating_again_keeps_the_proc_and_updates_the_definition(spawner):
    """SPEC §6 (issue 13 item 2): the proc (position, options) is unchanged, the definition
    (processor, to, count) is the new one; see tests/test_sysproc_update.py."""
    pp = spawner(workers=0)
    first = pp.system_proc(name="once", from_="in", processor=f"{M}:double", to="out",
                           max_reclaims=4)
    definition = pp.stats()["system_procs"]["once"]
    time.sleep(0.01)  # a later clock reading
    again = pp.system_proc(name="once", from_="in", processor=f"{M}:inc", to=["x", "y"],
                           max_reclaims=7, offset="$>")
    assert again == first
    assert again.created_at == first.created_at and again.max_reclaims == 4
    updated = pp.stats()["system_procs"]["once"]
    assert updated["processor"] == f"{M}:inc" and updated["to"] == ["x", "y"]
    assert {k: v for k, v in updated.items() if k not in ("processor", "to", "updated_at")} \
        == {k: v for k, v in definition.items() if k not in ("processor", "to")}
    firsts = pp.system_proc(name="twice", from_=["a", "b"], processor=f"{M}:double")
    assert pp.system_proc(name="twice", from_=["a", "b"], processor=f"{M}:double") == firsts


def test_destroy_proc_removes_the_system_proc(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="gone", from_="a", processor=f"{M}:double", to="out_gone")
    pp.system_proc(name="kept", from_="b", processor=f"{M}:double", to="out_kept")
    commit_ns(pp, "a", range(3))
    commit_ns(pp, "b", range(3))
    wait_len(pp, "out_gone", 3)
    wait_len(pp, "out_kept", 3)
    pp.wait_for_procs(["gone", "kept"], timeout=10)
    st = pp.destroy_proc("gone")
    assert st.name == "gone"
    stats = pp.stats()
    assert "gone" not in stats["system_procs"] and "gone" not in stats["procs"]
    assert "kept" in stats["system_procs"]
    # more work for both; the kept one shows the pipeline is alive
    commit_ns(pp, "a", range(3, 8))
    commit_ns(pp, "b", range(3, 8))
    wait_len(pp, "out_kept", 8)
    pp.wait_for_procs(["kept"], timeout=10)
    assert pp.length("out_gone") == 3
    assert "gone" not in pp.stats()["procs"]  # workers did not bring it back


def test_destroy_one_proc_of_a_multi_topic_system_proc(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="mt", from_=["a", "b"], processor=f"{M}:double", to="out")
    pp.destroy_proc("mt__a")
    stats = pp.stats()
    assert "mt" not in stats["system_procs"]
    assert "mt__a" not in stats["procs"]
    pp.system_proc(name="alive", from_="c", processor=f"{M}:double", to="out_c")
    pp.commit([{"topic": "a", "body": {"n": 1}}, {"topic": "b", "body": {"n": 2}},
               {"topic": "c", "body": {"n": 3}}])
    wait_len(pp, "out_c", 1)
    pp.wait_for_procs(timeout=10)
    assert length(pp, "out") == 0


# ---------------------------------------------------------------- worker crashes


def test_worker_dying_mid_log_is_restarted_and_the_log_redone(spawner, tmp_path):
    pp = spawner(workers=1)
    pid0 = pp.stats()["workers"][0]["pid"]
    pp.system_proc(name="crashy", from_="in", processor=f"{M}:die_once", to="out",
                   reclaim_timeout=60)
    flag = tmp_path / "died"
    t0 = time.monotonic()
    pp.commit([{"topic": "in", "body": {"n": 1, "flag": str(flag)}},
               {"topic": "in", "body": {"n": 2}}])
    logs = wait_len(pp, "out", 2, timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 10  # far less than reclaim_timeout=60: the dead worker's claim was reclaimed at once
    assert flag.exists() and int(flag.read_text()) == pid0  # the first worker did die on it
    assert [lg.body["n"] for lg in logs] == [1, 2]
    assert all(lg.body["pid"] != pid0 for lg in logs)
    w = wait_until(lambda: (lambda w: w if w["restarts"] >= 1 else None)(pp.stats()["workers"][0]))
    assert w["pid"] != pid0 and w["pid"] == logs[0].body["pid"]
    st = pp.inspect_proc("crashy")
    assert st.status == "active" and st.reclaims == 0


def test_log_that_kills_its_worker_every_time_disables_the_proc(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="killer", from_="in", processor=f"{M}:die_always", to="out",
                   max_reclaims=2, reclaim_timeout=60)
    pp.system_proc(name="fine", from_="ok", processor=f"{M}:double", to="ok_out")
    commit_ns(pp, "in", [1])
    wait_until(lambda: pp.inspect_proc("killer").status == "disabled", timeout=15,
               what="killer proc disabled")
    assert pp.inspect_proc("killer").reclaims == 2
    # the worker is back and does other work; it is not stuck on the bad log
    commit_ns(pp, "ok", [5])
    assert [lg.body for lg in wait_len(pp, "ok_out", 1, timeout=10)] == [{"n": 10}]
    restarts = pp.stats()["workers"][0]["restarts"]
    assert restarts == 2
    pp.wait_for_procs(["fine"], timeout=10)
    with pytest.raises(pipeproc.PipeProcError) as e:  # a dead stage is not a finished one
        pp.wait_for_procs(timeout=10)
    assert e.value.code == "proc_is_disabled" and "killer" in e.value.message
    assert pp.stats()["workers"][0]["restarts"] == restarts
    assert "out" not in pp.topics()


def test_worker_killed_while_idle_is_restarted(spawner):
    pp = spawner(workers=1)
    w0 = pp.stats()["workers"][0]
    os.kill(w0["pid"], signal.SIGKILL)
    w = wait_until(lambda: (lambda w: w if w["restarts"] >= 1 and w["alive"] else None)(
        pp.stats()["workers"][0]), what="worker restarted")
    assert w["pid"] != w0["pid"]
    pp.system_proc(name="after", from_="in", processor=f"{M}:tag_pid", to="out")
    commit_ns(pp, "in", [1])
    assert wait_len(pp, "out", 1)[0].body["pid"] == w["pid"]


def test_timed_out_worker_claim_is_redone_once(spawner, tmp_path):
    """A processor slower than reclaim_timeout (its time limit): the claim times out, the
    slow worker is recycled (so its late outcome can never be written) and the log redone."""
    pp = spawner(workers=1, worker_concurrency=2)
    pp.system_proc(name="slow", from_="in", processor=f"{M}:slow_once", to="out",
                   reclaim_timeout=0.5)
    ids = pp.commit([{"topic": "in", "body": {"n": 1, "flag": str(tmp_path / "f"), "sleep": 2.0}}])
    logs = wait_len(pp, "out", 1, timeout=10)
    assert logs[0].body == {"n": 1, "slow": False}
    wait_until(lambda: pp.stats()["workers"][0]["restarts"] >= 1, timeout=10,
               what="the slow worker recycled")
    pp.wait_for_procs(["slow"], timeout=10)
    assert [lg.body for lg in pp.range("out")] == [{"n": 1, "slow": False}]
    st = pp.inspect_proc("slow")
    assert st.last_acked_range == f"{ids[0]}..{ids[0]}" and st.status == "active"
    assert st.last_error["type"] == "TimeLimitExceeded"


def test_system_proc_options(spawner):
    pp = spawner(workers=1)
    commit_ns(pp, "in", [1, 2])
    st = pp.system_proc(name="late", from_="in", processor=f"{M}:double", to="out", offset="$>",
                        max_reclaims=3, reclaim_timeout=4.5, on_max_reclaims_reached="continue")
    assert (st.name, st.topic, st.offset, st.max_reclaims, st.reclaim_timeout,
            st.on_max_reclaims_reached) == ("late", "in", "$>", 3, 4.5, "continue")
    commit_ns(pp, "in", [3])
    assert [lg.body for lg in wait_len(pp, "out", 1)] == [{"n": 6}]
    for bad in [dict(count=0), dict(max_reclaims=0), dict(reclaim_timeout=0),
                dict(on_max_reclaims_reached="explode"), dict(offset="nope")]:
        with pytest.raises(pipeproc.PipeProcError) as ei:
            pp.system_proc(name="bad", from_="in", processor=f"{M}:double", **bad)
        assert ei.value.code in ("invalid_argument", "invalid_range_offset"), bad
    assert "bad" not in pp.stats()["procs"]


def test_relative_file_path_against_callers_cwd(spawner, tmp_path, monkeypatch):
    pp = spawner(workers=1)
    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "rel_proc.py").write_text("def process(log):\n    return {'rel': log.body['n']}\n")
    monkeypatch.chdir(d)  # after spawn: workers have another cwd
    pp.system_proc(name="rel", from_="in", processor="rel_proc.py", to="out")
    commit_ns(pp, "in", [4])
    assert [lg.body for lg in wait_len(pp, "out", 1)] == [{"rel": 4}]
    assert pp.stats()["system_procs"]["rel"]["processor"].startswith(str(d))


def test_file_processor_that_cannot_be_imported_is_refused(node, tmp_path):
    """SPEC §6: "anything workers could not import fails with invalid_processor at creation"
    -- a file whose top level fails to import defines ``process`` but cannot be loaded."""
    bad = tmp_path / "bad_import.py"
    bad.write_text("import no_such_module_pipeproc_test\n\ndef process(log):\n    return log.body\n")
    with pytest.raises(pipeproc.PipeProcError) as ei:
        node.system_proc(name="badimp", from_="in", processor=str(bad), to="out")
    assert ei.value.code == "invalid_processor"
    assert "badimp" not in node.stats()["procs"]


# ---------------------------------------------------------------- restart and options


def test_system_procs_run_again_after_restart(spawner, tmp_path):
    loc = tmp_path / "restart"
    pp = spawner(loc, workers=1)
    pp.system_proc(name="fan", from_="in", processor=f"{M}:double", to=["x", "y"])
    pp.system_proc(name="mf", from_=["p", "q"], processor=f"{M}:batch_each", to="pq", count=2)
    commit_ns(pp, "in", range(3))
    wait_len(pp, "x", 3)
    wait_len(pp, "y", 3)
    pp.wait_for_procs(timeout=10)
    pp.shutdown()

    pp = spawner(loc, workers=1)
    assert set(pp.stats()["system_procs"]) == {"fan", "mf"}
    commit_ns(pp, "in", range(3, 6))
    pp.commit([{"topic": "p", "body": {"n": 10}}, {"topic": "q", "body": {"n": 20}}])
    want = [{"n": 2 * n} for n in range(6)]
    assert [lg.body for lg in wait_len(pp, "x", 6)] == want
    assert [lg.body for lg in wait_len(pp, "y", 6)] == want
    assert sorted(lg.body["n"] for lg in wait_len(pp, "pq", 2)) == [100, 200]


def test_worker_concurrency_runs_loops_at_once(spawner):
    pp = spawner(workers=1, worker_concurrency=2)
    # two procs (one pending claim each) so that both loops of the one worker have work
    pp.system_proc(name="conc", from_=["a", "b"], processor=f"{M}:slow_interval", to="out")
    pp.commit([{"topic": t, "body": {"n": n, "sleep": 0.4}} for n in range(3) for t in ("a", "b")])
    logs = wait_len(pp, "out", 6, timeout=15)
    spans = sorted((lg.body["start"], lg.body["end"]) for lg in logs)
    assert len({lg.body["pid"] for lg in logs}) == 1
    overlaps = sum(1 for (s1, e1), (s2, e2) in zip(spans, spans[1:]) if s2 < e1)
    assert overlaps >= 1, f"no two executions ran at once: {spans}"


def test_worker_restart_after_recycles_workers(spawner):
    pp = spawner(workers=1, worker_restart_after=3)
    pid0 = pp.stats()["workers"][0]["pid"]
    pp.system_proc(name="rec", from_="in", processor=f"{M}:tag_pid", to="out")
    commit_ns(pp, "in", range(10))
    logs = wait_len(pp, "out", 10, timeout=15)
    assert [lg.body["n"] for lg in logs] == list(range(10))
    pids = [lg.body["pid"] for lg in logs]
    # at most 3 executions per worker process
    assert pids[0] == pid0
    for i in range(0, 10, 3):
        assert len(set(pids[i:i + 3])) == 1
    assert len(set(pids)) == 4
    wait_until(lambda: pp.stats()["workers"][0]["restarts"] >= 3, what="3 restarts")
    w = pp.stats()["workers"][0]
    assert w["pid"] != pid0
    assert sum(x["failures"] for x in pp.stats()["workers"]) == 0


# ---------------------------------------------------------------- application script


SCRIPT = '''
import os
import sys

import pipeproc

FACTOR = 3
LOC = {loc!r}
MARK = {mark!r}


def triple(log):
    return {{"n": log.body["n"] * FACTOR}}


open(MARK, "a").write("ran\\n")  # a top-level side effect: must happen once, not in workers
pp = pipeproc.spawn(LOC, workers=2)
pp.system_proc(name="triple", from_="in", processor=triple, to="out")
pp.commit([{{"topic": "in", "body": {{"n": n}}}} for n in range(5)])
import time
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    try:
        if pp.length("out") == 5:
            break
    except pipeproc.PipeProcError:
        pass
    time.sleep(0.02)
print("OUT", [lg.body["n"] for lg in pp.range("out")], flush=True)
pp.shutdown()
'''


@pytest.mark.parametrize("run", ["path", "dash_m"])
def test_function_from_unguarded_application_script(tmp_path, run):
    """``python app.py`` and ``python -m app``: neither the caller (checking the processor) nor
    the workers may execute the application's main module again."""
    script = tmp_path / "app.py"
    mark = tmp_path / "mark.txt"
    script.write_text(SCRIPT.format(loc=str(tmp_path / "store"), mark=str(mark)))
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(script)] if run == "path" else [sys.executable, "-m", "app"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=40)
    assert proc.returncode == 0, proc.stderr
    assert "OUT [0, 3, 6, 9, 12]" in proc.stdout, (proc.stdout, proc.stderr)
    assert mark.read_text() == "ran\n"  # the workers did not run the script again


@pytest.mark.timeout(90)
def test_claims_of_a_crashed_nodes_workers_are_reclaimed_at_restart(spawner, tmp_path):
    """Regression (stress suite): after a node crash, the claims its (dead) workers held
    waited for reclaim_timeout; a restarted node reclaims them at once."""
    loc = tmp_path / "store"
    flag = str(tmp_path / "flag")
    pp = spawner(loc, workers=1)
    pp.system_proc(name="slow", from_="in", processor=f"{M}:slow_once", to="out",
                   reclaim_timeout=3600)
    pp.commit({"topic": "in", "body": {"n": 1, "flag": flag, "sleep": 60}})
    wait_until(lambda: os.path.exists(flag), what="the processor started")
    assert pp.inspect_proc("slow").last_claimed_range != ""
    stats = pp.stats()
    os.kill(stats["node"]["pid"], signal.SIGKILL)

    # the worker, 60 s into its processor, stops at once: its lifeline (stdin) closed
    wait_until(lambda: not any(pid_alive(w["pid"]) for w in stats["workers"]), timeout=10,
               what="the dead node's worker exited")
    pp2 = spawner(loc, workers=1)
    pp2.wait_for_procs(timeout=30)
    assert [x.body for x in pp2.range("out")] == [{"n": 1, "slow": False}]
    st = pp2.inspect_proc("slow")
    assert st.status == "active" and st.reclaims == 0
