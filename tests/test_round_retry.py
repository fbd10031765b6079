"""A write round run again in a fresh transaction changes nothing twice and loses nothing.

When the map fills during a round, the writer aborts the transaction, grows the map and
runs the round's requests again (the same happens request by request to isolate a
failing one). What the requests changed in the node's memory in the aborted try is
undone (``WriteTx.on_abort``), and what a request carries (a worker's outcome, the end
of a workflow attempt) is applied in the try that commits. Here the node fails every
third commit with ``MapFullError`` (``PIPEPROC_TEST_MAPFULL_EVERY``, read only by the
node's ``main()``), so most rounds of these runs are retried.

Found by a review: before, the end of a workflow attempt was consumed by the aborted try,
and the attempt was dropped from the node's memory, so the run never ended.
"""

from __future__ import annotations

import threading

import msgpack
import pytest

import pipeproc
from pipeproc import flow
from pipeproc._flows import Flows
from pipeproc._conn import Malformed
from pipeproc._store import Store
from pipeproc._waits import SysDefs, Timers, Waits
from pipeproc._writer import Writer
from procmods import flowmods as fm
from helpers import wait_until

pytestmark = pytest.mark.timeout(120)
M = "procmods.sysmods"


@pytest.fixture
def retrying(tmp_path, monkeypatch):
    """A node (2 workers) whose every third commit is retried after a map-full error."""
    monkeypatch.setenv("PIPEPROC_TEST_MAPFULL_EVERY", "3")
    pp = pipeproc.spawn(tmp_path / "store", workers=2)
    try:
        yield pp
    finally:
        pp.shutdown()


def test_workflow_runs_end_when_their_rounds_are_retried(retrying, tmp_path):
    pp = retrying
    path = str(tmp_path / "effects")
    eng = flow.Engine(pp)
    handles = [eng.start(fm.three_ticks, path, f"r{i}", id=f"r{i}") for i in range(12)]
    for h in handles:
        assert h.result(timeout=60) == 3
    lines = fm.read_lines(path)
    for i in range(12):
        for j in range(3):  # each completed step ran once: no attempt failed
            assert lines.count(f"r{i}-{j}") == 1, (i, j, lines)


def test_system_procs_process_every_log_once_when_rounds_are_retried(retrying):
    pp = retrying
    pp.system_proc(name="stage1", from_="numbers", processor=f"{M}:inc", to="mid")
    pp.system_proc(name="stage2", from_="mid", processor=f"{M}:double", to="final")
    for n in range(40):
        pp.commit({"topic": "numbers", "body": {"n": n}})
    wait_until(lambda: _length(pp, "final") >= 40, 60, what="40 logs in final")
    pp.wait_for_procs(["stage1", "stage2"], timeout=30)
    assert [lg.body for lg in pp.range("final")] == [{"n": (n + 1) * 2} for n in range(40)]
    assert [lg.body for lg in pp.range("mid")] == [{"n": n + 1} for n in range(40)]


def test_commits_and_claims_when_rounds_are_retried(retrying):
    pp = retrying
    ids = [pp.commit({"topic": "t", "body": {"n": n}}) for n in range(60)]
    assert [lg.id for lg in pp.range("t")] == ids
    got = []
    while True:
        logs = pp.proc("t", name="p", count=7)
        if logs is None:
            break
        got += [lg.body["n"] for lg in logs]
        pp.ack("p")
    assert got == list(range(60))


def _length(pp, topic):
    try:
        return pp.length(topic)
    except pipeproc.PipeProcError as exc:
        assert exc.code == "invalid_topic"
        return 0


@pytest.mark.parametrize("bad", [{"end": {"kind": "no such end"}}, {"seen": [1, 2]}],
                         ids=["unknown end", "seen not a map"])
def test_a_malformed_attempt_record_is_refused_before_anything_is_written(tmp_path, bad):
    """The writer's contract: a request refused with an error has written nothing (its
    round goes on for the others). ``Flows.apply`` checks the end's kind and ``seen``
    before it writes the attempt's events."""
    store = Store(str(tmp_path / "s"))
    timers = Timers()
    writer = Writer(store, False, lambda tx: None)
    flows = Flows(store, writer, timers, Waits(store, writer, timers, SysDefs(store)),
                  threading.Event())
    conn = object()
    try:
        tx = store.begin()
        flows._start(tx, "r1", "wf", "ref", msgpack.packb(["start"]), 3, 30.0, "v", None, None)
        tx.commit()
        flows.after_commit(tx)
        tx = store.begin()
        assert flows.claim(tx, 1, conn) is not None  # the attempt is live
        tx.commit()
        token = flows.live["r1"].token
        tx = store.begin()
        with pytest.raises(Malformed):
            flows.apply(tx, conn, {"run": "r1", "token": token,
                                   "events": [msgpack.packb(["step"])], **bad})
        assert not tx.wrote and not tx.touched_topics and not tx.runs
        assert "r1" in flows.live  # the attempt goes on
        tx.abort()
    finally:
        timers.stop()
        store.close()
