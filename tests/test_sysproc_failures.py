"""A failing system proc is loud and does not burn its retries (issue 13 items 1 and 3,
issue 14 items 7 and 9): back-off between deliveries, ``last_error``, ERROR logs,
``wait_for_procs`` over a dead stage, the time limit of a processor, store failures that
are not the processor's, and reclaim deadlines on a monotonic clock."""

from __future__ import annotations

import functools
import asyncio
import os
import subprocess
import sys
import time

import pytest

import pipeproc
from pipeproc import aio
import helpers

wait_until = functools.partial(helpers.wait_until, timeout=20.0)  # this module's deadline

M = "procmods.sysfail_mods"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1024 * 1024


class Stderr:
    """What the node (a child process writing to our fd 2) logged so far."""

    def __init__(self, capfd):
        self.capfd = capfd
        self.text = ""

    def read(self) -> str:
        self.text += self.capfd.readouterr().err
        return self.text

    def wait_for(self, *parts: str, timeout: float = 20.0) -> str:
        return wait_until(lambda: all(p in self.read() for p in parts) and self.text,
                          timeout=timeout, what=f"node stderr containing {parts}")


# ---------------------------------------------------------------- back-off and last_error


def test_failing_processor_backs_off_records_last_error_and_logs(spawner, capfd):
    err = Stderr(capfd)
    pp = spawner(workers=1)
    pp.system_proc(name="bad", from_="in", processor=f"{M}:fails", to="out", max_reclaims=3,
                   backoff=(0.25, 0.5))
    t0 = time.monotonic()
    [lid] = pp.commit([{"topic": "in", "body": {"n": 7}}])
    wait_until(lambda: pp.inspect_proc("bad").status == "disabled", what="proc disabled")
    elapsed = time.monotonic() - t0
    # three deliveries with back-offs of 0.25 s and 0.5 s between them (not ~3 ms)
    assert elapsed >= 0.75
    st = pp.inspect_proc("bad")
    assert st.reclaims == 3
    e = st.last_error
    assert e["type"] == "ValueError" and e["message"] == "cannot handle n=7"
    assert "Traceback" in e["traceback"] and "in fails" in e["traceback"]
    assert e["range"] == f"{lid}..{lid}" and e["at"] >= int(lid.split("-")[0])
    assert pp.stats()["procs"]["bad"]["last_error"] == e
    assert sum(w["executions"] for w in pp.stats()["workers"]) == 3
    # WARNINGs naming proc and logs (the first with its traceback), then an ERROR with the
    # traceback saying the proc is disabled
    text = err.wait_for("ERROR", "DISABLED")
    assert text.count(f"WARNING system proc 'bad' failed on logs {lid}..{lid}") == 2
    assert "delivered again in 0.2 s" in text and "delivered again in 0.5 s" in text
    error_part = text[text.index("ERROR"):]
    assert f"'bad' failed on logs {lid}..{lid}" in error_part
    assert "is DISABLED" in error_part and "Traceback" in error_part
    assert "ValueError: cannot handle n=7" in error_part


def test_a_processor_workers_cannot_import_is_backed_off_and_reported(spawner, tmp_path):
    """The issue's ModuleNotFoundError case: the workers cannot load the processor."""
    mod = tmp_path / "gone.py"
    mod.write_text("def process(log):\n    return log.body\n")
    pp = spawner(workers=1)
    pp.system_proc(name="imp", from_="in", processor=str(mod), max_reclaims=2,
                   backoff=(0.3, 0.3))
    mod.unlink()  # registered, then gone before a worker imports it
    t0 = time.monotonic()
    pp.commit({"topic": "in", "body": {"n": 1}})
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.wait_for_procs(timeout=30)
    assert time.monotonic() - t0 >= 0.3
    assert e.value.code == "proc_is_disabled" and "InvalidProcessor" in e.value.message
    err = pp.inspect_proc("imp").last_error
    assert err["type"] == "InvalidProcessor" and "gone.py" in err["message"]


def test_backoff_keyword_is_validated_and_persisted(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc, workers=0)
    for bad in [(-1, 1), (2, 1), (1,), "0.1", (float("nan"), 1), (True, 1), (0.1, float("inf")),
                None]:
        with pytest.raises(pipeproc.PipeProcError) as e:
            pp.system_proc(name="x", from_="in", processor=f"{M}:echo", backoff=bad)
        assert e.value.code == "invalid_argument"
    pp.system_proc(name="x", from_="in", processor=f"{M}:echo", backoff=(0.5, 2))
    pp.system_proc(name="y", from_="in2", processor=f"{M}:echo")
    assert pp.stats()["system_procs"]["x"]["backoff"] == [0.5, 2.0]
    assert pp.stats()["system_procs"]["y"]["backoff"] == [0.1, 30.0]
    pp.shutdown()
    pp2 = spawner(loc, workers=0)
    assert pp2.stats()["system_procs"]["x"]["backoff"] == [0.5, 2.0]
    assert pp2.inspect_proc("x").last_error is None
    # registering it again updates the back-off with the rest of the definition
    pp2.system_proc(name="x", from_="in", processor=f"{M}:echo", backoff=(1, 4))
    assert pp2.stats()["system_procs"]["x"]["backoff"] == [1.0, 4.0]


async def check_backoff_and_dead_stage(a) -> None:
    """With an asyncio client ``a``: a bad back-off is refused; a stage whose processor
    always fails ends disabled, and ``wait_for_procs`` says so with the last error."""
    with pytest.raises(pipeproc.PipeProcError) as e:
        await a.system_proc(name="b", from_="in", processor=f"{M}:fails", backoff=(3, 1))
    assert e.value.code == "invalid_argument"
    await a.system_proc(name="b", from_="in", processor=f"{M}:fails", max_reclaims=2,
                        backoff=(0.05, 0.05))
    await a.commit({"topic": "in", "body": {"n": 1}})
    with pytest.raises(pipeproc.PipeProcError) as e:
        await a.wait_for_procs(timeout=30)
    assert e.value.code == "proc_is_disabled"
    assert "'b'" in e.value.message and "ValueError" in e.value.message
    st = await a.inspect_proc("b")
    assert st.last_error["type"] == "ValueError"


def test_aio_system_proc_backoff_and_dead_stage(spawner):
    pp = spawner(workers=1)

    async def main():
        a = await aio.connect(address=pp.address, authkey=pp.authkey)
        try:
            await check_backoff_and_dead_stage(a)
        finally:
            await a.close()
    asyncio.run(main())


def test_cli_procs_and_inspect_show_the_last_error(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc, workers=1)
    pp.system_proc(name="bad", from_="in", processor=f"{M}:fails", max_reclaims=1)
    [lid] = pp.commit([{"topic": "in", "body": {"n": 3}}])
    wait_until(lambda: pp.inspect_proc("bad").status == "disabled", what="disabled")
    env = dict(os.environ, PYTHONPATH=ROOT)

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "pipeproc", "--location", str(loc), *args],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout
    header, row = cli("procs").splitlines()
    assert header.split()[-2:] == ["LAST", "ERROR"]
    assert row.split()[:3] == ["bad", "in", "disabled"]
    assert row.endswith("ValueError: cannot handle n=3")
    text = cli("inspect", "bad")
    line = next(ln for ln in text.splitlines() if ln.startswith("last_error:"))
    assert line.split(None, 1)[1] == "ValueError: cannot handle n=3"
    assert "on logs:" in text and f"{lid}..{lid}" in text
    assert "traceback:" in text and "in fails" in text and "Traceback" in text


# ---------------------------------------------------------------- wait_for_procs


def test_wait_for_procs_raises_over_a_dead_stage(spawner):
    pp = spawner(workers=1)
    pp.system_proc(name="bad", from_="in", processor=f"{M}:fails", to="out", max_reclaims=2,
                   backoff=(0.05, 0.05))
    pp.system_proc(name="good", from_="ok", processor=f"{M}:echo", to="ok_out")
    pp.commit([{"topic": "in", "body": {"n": 1}}, {"topic": "ok", "body": {"n": 2}}])
    # it becomes disabled while we wait: not a success
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.wait_for_procs(timeout=30)
    assert e.value.code == "proc_is_disabled"
    assert "'bad'" in e.value.message and "ValueError: cannot handle n=1" in e.value.message
    assert "resume_proc('bad')" in e.value.message
    # already dead: at once, also when named
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.wait_for_procs(["bad"], timeout=30)
    assert e.value.code == "proc_is_disabled"
    pp.wait_for_procs(["good"], timeout=30)  # other procs are still waited for normally
    # a proc disabled on purpose is simply not waited for
    pp.resume_proc("bad")
    pp.disable_proc("bad")
    pp.wait_for_procs(timeout=30)


def test_wait_for_procs_on_a_user_proc_disabled_by_max_reclaims(node):
    node.commit([{"topic": "t", "body": {"n": 1}}])
    assert node.proc("t", name="p", max_reclaims=1) is not None
    node.reclaim("p")
    assert node.inspect_proc("p").status == "disabled"
    with pytest.raises(pipeproc.PipeProcError) as e:
        node.wait_for_procs(timeout=5)
    assert e.value.code == "proc_is_disabled" and "'p'" in e.value.message


# ---------------------------------------------------------------- the time limit


def test_processor_always_slower_than_its_time_limit_ends_disabled(spawner, tmp_path, capfd):
    err = Stderr(capfd)
    pp = spawner(workers=1)
    pid0 = pp.stats()["workers"][0]["pid"]
    mark = tmp_path / "mark"
    pp.system_proc(name="slow", from_="in", processor=f"{M}:too_slow", to="out",
                   reclaim_timeout=0.3, max_reclaims=2, backoff=(0.05, 0.05))
    [lid] = pp.commit([{"topic": "in", "body": {"n": 1, "sleep": 3.0, "mark": str(mark)}}])
    t0 = time.monotonic()
    wait_until(lambda: pp.inspect_proc("slow").status == "disabled", timeout=20,
               what="slow proc disabled")
    disabled_at = time.monotonic()  # every attempt started before this
    assert time.monotonic() - t0 < 2.9  # it did not wait for the slow processor to finish
    st = pp.inspect_proc("slow")
    assert st.reclaims == 2
    assert st.last_error["type"] == "TimeLimitExceeded"
    assert st.last_error["range"] == f"{lid}..{lid}"
    assert "reclaim_timeout=0.3" in st.last_error["message"]
    # each slow attempt's worker was recycled (killed and restarted)
    w = wait_until(lambda: (lambda w: w if w["restarts"] >= 2 and w["alive"] else None)(
        pp.stats()["workers"][0]), what="worker restarted twice")
    assert w["pid"] != pid0
    text = err.wait_for("TimeLimitExceeded", "DISABLED")
    assert f"'slow' failed on logs {lid}..{lid}" in text and "recycled" in text
    # a killed attempt never finishes later (past its 3 s sleep: no mark, nothing committed)
    time.sleep(max(0.0, disabled_at + 3.5 - time.monotonic()))
    assert not mark.exists() and "out" not in pp.topics()
    # the worker still serves other procs
    pp.system_proc(name="fine", from_="ok", processor=f"{M}:echo", to="ok_out")
    pp.commit({"topic": "ok", "body": {"n": 5}})
    pp.wait_for_procs(["fine"], timeout=20)
    assert [x.body for x in pp.range("ok_out")] == [{"n": 5}]


def test_time_limit_recycle_does_not_count_the_workers_other_claims(spawner, tmp_path):
    """A worker with two loops is killed for one loop's slow claim: the other loop's claim
    (within its own limit) is delivered again without counting toward its max_reclaims."""
    pp = spawner(workers=1, worker_concurrency=2)
    pp.system_proc(name="slow", from_="a", processor=f"{M}:too_slow", to="out",
                   reclaim_timeout=0.5, max_reclaims=1)
    pp.system_proc(name="patient", from_="b", processor=f"{M}:too_slow", to="out2",
                   reclaim_timeout=60, max_reclaims=1)
    pp.commit({"topic": "b", "body": {"n": 2, "sleep": 1.5, "mark": str(tmp_path / "b")}})
    wait_until(lambda: pp.inspect_proc("patient").last_claimed_range, what="patient claimed")
    pp.commit({"topic": "a", "body": {"n": 1, "sleep": 30, "mark": str(tmp_path / "a")}})
    wait_until(lambda: pp.inspect_proc("slow").status == "disabled", what="slow disabled")
    pp.wait_for_procs(["patient"], timeout=30)
    st = pp.inspect_proc("patient")
    assert st.status == "active" and st.reclaims == 0 and st.last_error is None
    assert [x.body for x in pp.range("out2")] == [{"n": 2}]


# ---------------------------------------------------------------- store failures


@pytest.mark.timeout(120)
def test_storage_full_does_not_count_and_the_stage_resumes(spawner, tmp_path, capfd):
    err = Stderr(capfd)
    pp = spawner(workers=1, max_map_size=4 * MB, gc={"min_prune_time": 0, "interval": 0.1})
    assert pp.proc("fill", name="guard", reclaim_timeout=-1) is None
    go, runs = tmp_path / "go", tmp_path / "runs"
    pp.system_proc(name="big", from_="in", processor=f"{M}:wait_go_big", to="out",
                   reclaim_timeout=1.0, max_reclaims=2, backoff=(0.1, 0.5))
    [lid] = pp.commit([{"topic": "in", "body": {"n": 1, "go": str(go), "runs": str(runs),
                                                "size": 1_500_000}}])
    wait_until(lambda: runs.exists(), what="the processor started")
    n = 0
    with pytest.raises(pipeproc.PipeProcError) as e:
        while n < 1000:
            pp.commit({"topic": "fill", "body": os.urandom(1_000_000)})
            n += 1
    assert e.value.code == "storage_full"
    go.write_text("go")  # the processor returns a body the full store cannot take
    err.wait_for("refused the outcome", "'big'", "storage_full")
    assert pp.stats()["procs"]["big"]["store_retries"] >= 1
    time.sleep(2.5)  # > 2 x reclaim_timeout: the held claim does not time out
    st = pp.inspect_proc("big")
    assert st.status == "active" and st.reclaims == 0 and st.last_error is None
    assert st.last_acked_range == ""
    pp.destroy_proc("guard")  # the GC frees the store: the stage resumes by itself
    pp.wait_for_procs(["big"], timeout=60)
    assert [x.body["n"] for x in pp.range("out")] == [1]
    st = pp.inspect_proc("big")
    assert st.status == "active" and st.reclaims == 0
    assert st.last_acked_range == f"{lid}..{lid}"
    assert runs.read_text() == "x"  # the processor ran once: its outcome was kept
    assert "the store accepts writes again" in err.wait_for("accepts writes again")


# ---------------------------------------------------------------- monotonic deadlines


def test_wall_clock_step_back_does_not_freeze_reclaim_timeouts(spawner, tmp_path, monkeypatch):
    clock = tmp_path / "clock"
    clock.write_text("0")
    monkeypatch.setenv("PIPEPROC_TEST_WALL_CLOCK", str(clock))
    pp = spawner(workers=0)
    [a] = pp.commit([{"topic": "t", "body": {"n": 1}}])
    assert pp.proc("t", name="p", reclaim_timeout=0.2, max_reclaims=-1).id == a
    clock.write_text(str(-600_000))  # the wall clock steps back 10 minutes
    wait_until(lambda: pp.inspect_proc("p").reclaims == 1, timeout=5,
               what="the claim timed out after the step back")
    # a claim made after the step times out too; ids never go back
    assert pp.proc("t", name="p", reclaim_timeout=0.2, max_reclaims=-1).id == a
    wait_until(lambda: pp.inspect_proc("p").reclaims == 2, timeout=5, what="second timeout")
    [b] = pp.commit([{"topic": "t", "body": {"n": 2}}])
    assert tuple(map(int, b.split("-"))) > tuple(map(int, a.split("-")))


def test_claims_found_at_start_get_a_fresh_deadline(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc, workers=0)
    pp.commit([{"topic": "t", "body": {"n": 1}}])
    assert pp.proc("t", name="p", reclaim_timeout=0.5) is not None
    pp.shutdown()
    pp2 = spawner(loc, workers=0)
    t0 = time.monotonic()
    assert pp2.inspect_proc("p").last_claimed_range != ""
    wait_until(lambda: pp2.inspect_proc("p").reclaims == 1, timeout=10, what="timed out")
    assert time.monotonic() - t0 < 8
