"""Registering a system proc again (SPEC §6, issue 13 item 2): the same name and ``from_``
update the definition from the next claim on; another ``from_`` is ``proc_name_not_unique``."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import time

import pytest

import pipeproc
import helpers

wait_until = functools.partial(helpers.wait_until, timeout=15.0)  # this module's deadline

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
M = "procmods.sysmods"


def length(pp, topic: str) -> int:
    try:
        return pp.length(topic)
    except pipeproc.PipeProcError as e:
        assert e.code == "invalid_topic"
        return 0


def test_same_name_and_topic_updates_processor_to_and_count(spawner):
    pp = spawner(workers=1)
    first = pp.system_proc(name="s", from_="in", processor=f"{M}:double", to="out",
                           max_reclaims=4)
    pp.commit([{"topic": "in", "body": {"n": 5}}])
    wait_until(lambda: length(pp, "out") == 1, what="first result")
    assert pp.range("out")[0].body == {"n": 10}
    pp.wait_for_procs(timeout=10)

    again = pp.system_proc(name="s", from_="in", processor=f"{M}:inc", to="out2",
                           max_reclaims=7, offset="$>")
    # the proc keeps its position and its frozen options
    assert again.created_at == first.created_at
    assert again.max_reclaims == 4 and again.offset == first.offset
    assert again.last_acked_range != ""
    d = pp.stats()["system_procs"]["s"]
    assert d["processor"] == f"{M}:inc" and d["to"] == ["out2"] and d["count"] == 1

    pp.commit([{"topic": "in", "body": {"n": 7}}])
    wait_until(lambda: length(pp, "out2") == 1, what="result of the new definition")
    assert [lg.body for lg in pp.range("out2")] == [{"n": 8}]  # only the new log
    pp.wait_for_procs(timeout=10)
    assert length(pp, "out") == 1  # the old `to` gets nothing more

    # count is part of the definition too
    pp.system_proc(name="s", from_="in", processor=f"{M}:batch_summary", to="out3", count=3)
    pp.commit([{"topic": "in", "body": {"n": n}} for n in range(3)])
    wait_until(lambda: length(pp, "out3") >= 1, what="batch result")
    pp.wait_for_procs(timeout=10)
    ns = [x for lg in pp.range("out3") for x in lg.body["ns"]]
    assert ns == [0, 1, 2] and all(lg.body["is_list"] for lg in pp.range("out3"))


def test_same_name_on_another_topic_is_not_unique(spawner):
    pp = spawner(workers=0)
    pp.system_proc(name="s", from_="in", processor=f"{M}:double", to="out")
    with pytest.raises(pipeproc.PipeProcError) as ei:
        pp.system_proc(name="s", from_="other", processor=f"{M}:double", to="out")
    assert ei.value.code == "proc_name_not_unique"
    pp.system_proc(name="m", from_=["a", "b"], processor=f"{M}:double")
    for from_ in (["a"], ["a", "c"], "a"):
        with pytest.raises(pipeproc.PipeProcError) as ei:
            pp.system_proc(name="m", from_=from_, processor=f"{M}:double")
        assert ei.value.code == "proc_name_not_unique"
    assert pp.stats()["system_procs"]["s"]["topics"] == ["in"]
    # a multi-topic system proc is updated with the same list
    states = pp.system_proc(name="m", from_=["a", "b"], processor=f"{M}:inc", to="o")
    assert [s.name for s in states] == ["m__a", "m__b"]
    assert pp.stats()["system_procs"]["m"]["processor"] == f"{M}:inc"


def test_updating_a_disabled_proc_does_not_resume_it(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="s", from_="in", processor=f"{M}:double", to="out")
    pp.disable_proc("s")
    st = pp.system_proc(name="s", from_="in", processor=f"{M}:inc", to="out")
    assert st.status == "disabled"
    pp.commit([{"topic": "in", "body": {"n": 5}}])
    pp.resume_proc("s")
    wait_until(lambda: length(pp, "out") == 1, what="result after resume_proc")
    assert pp.range("out")[0].body == {"n": 6}  # the new processor (inc, not double)


def test_update_is_logged_with_old_and_new(tmp_path):
    script = textwrap.dedent(f"""
        import pipeproc
        with pipeproc.spawn({str(tmp_path / 'store')!r}, workers=0, log_level="INFO") as pp:
            pp.system_proc(name="s", from_="in", processor="{M}:double", to="out")
            pp.system_proc(name="s", from_="in", processor="{M}:inc", to="out2")
        print("DONE", flush=True)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "system proc s updated" in ln]
    assert len(lines) == 1, proc.stderr
    assert "INFO" in lines[0]
    assert f"{M}:double" in lines[0] and f"{M}:inc" in lines[0]
    assert "'out'" in lines[0] and "'out2'" in lines[0]
