"""The workers' claims skip the system procs known to have nothing to claim (issue 17).

A claim that finds a system proc active, with no claim pending and no log past its
position, marks it empty (``_waits.mark_empty``); the mark is recorded only when that
write commits, and dropped by the first commit that touches the proc's topic or its
record, or changes any system proc (``SysDefs.committed``). A worker's claim then costs
O(system procs with work) instead of O(system procs).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import msgpack
import pytest

from pipeproc import _procs
from pipeproc._store import Store
from pipeproc._syshandlers import SysHandlers
from pipeproc._waits import Deadlines, SysDefs, Timers, Waits, mark_empty
from pipeproc._writer import Job, Writer
from helpers import wait_until

M = "procmods.sysmods"


def _tx(touched_topics=(), touched_procs=(), sysprocs=None):
    return SimpleNamespace(touched_topics=set(touched_topics), touched_procs=set(touched_procs),
                           sysprocs=sysprocs or {})


def _defs() -> SysDefs:
    return SysDefs(SimpleNamespace(sysprocs={}))  # type: ignore[arg-type]


def test_a_mark_is_kept_only_once_its_write_commits():
    defs = _defs()
    tx = _tx()
    mark_empty(tx, "s1", "t1")
    assert defs.empty == {}  # not before the commit
    defs.committed(tx)
    assert defs.empty == {"s1": "t1"}
    defs.committed(_tx())  # an unrelated commit keeps it
    assert defs.empty == {"s1": "t1"}


def test_a_commit_to_the_topic_drops_every_mark_on_it():
    defs = _defs()
    tx = _tx()
    mark_empty(tx, "s1", "t1")
    mark_empty(tx, "s2", "t1")
    mark_empty(tx, "s3", "t2")
    defs.committed(tx)
    defs.committed(_tx(touched_topics={"t1"}))
    assert defs.empty == {"s3": "t2"}
    defs.committed(_tx(touched_topics={"t2"}))
    assert defs.empty == {}


def test_a_change_of_the_proc_record_drops_its_mark():
    defs = _defs()
    tx = _tx()
    mark_empty(tx, "s1", "t1")
    mark_empty(tx, "s2", "t1")
    defs.committed(tx)
    defs.committed(_tx(touched_procs={"s1"}))
    assert defs.empty == {"s2": "t1"}
    defs.committed(_tx(touched_topics={"t1"}))  # the topic index was kept right
    assert defs.empty == {}


def test_a_mark_made_before_a_write_to_its_topic_in_the_same_round_is_dropped():
    defs = _defs()
    tx = _tx(touched_topics={"t1"})  # a later request of the round appended to t1
    mark_empty(tx, "s1", "t1")
    defs.committed(tx)
    assert defs.empty == {}


def test_a_change_of_any_system_proc_drops_every_mark():
    defs = _defs()
    tx = _tx()
    mark_empty(tx, "s1", "t1")
    defs.committed(tx)
    tx2 = _tx(sysprocs={"other": {}})
    mark_empty(tx2, "s2", "t2")
    defs.committed(tx2)
    assert defs.empty == {}


# -------------------------------------------- in-process: a claim in the round that fed it

def _chain(tmp_path, stages):
    """A store with system procs ``(name, from, to)`` and the node's parts around it."""
    store = Store(str(tmp_path / "s"))
    tx = store.begin()
    for name, src, dst in stages:
        _procs.ensure(tx, name, src, ">", 3, 30.0, "disable")
        tx.put_sysproc(name, {"procs": [name], "topics": [src], "processor": "m:f",
                              "to": [dst], "count": 1, "multi": False,
                              "created_at": tx.now, "backoff": [0.1, 30.0]})
    tx.commit()
    sysdefs, timers = SysDefs(store), Timers()
    writer = Writer(store, False, sysdefs.committed)
    waits = Waits(store, writer, timers, sysdefs)
    deadlines = Deadlines(store, writer, timers, sysdefs, waits)
    sysh = SysHandlers(store, writer, timers, waits, deadlines, sysdefs, threading.Event())
    out: list = []

    def run(*fns):
        """One write round of these jobs; the last job's value."""
        writer._round([Job(fn, lambda ok, v: out.append(v)) for fn in fns])
        return out[-1]
    return store, sysdefs, sysh, run


def test_a_stage_is_claimed_in_the_round_whose_outcome_fed_it(tmp_path):
    """A worker's outcome appends to the next stage's topic; its claim in the same round
    takes that stage (not skipped on the mark the round is about to drop, which would
    park the worker and cost a wake-up and another write round, a sync under "full")."""
    store, sysdefs, sysh, run = _chain(tmp_path, [("s1", "a", "b"), ("s2", "b", "c")])
    try:
        assert run(lambda tx: sysh._claim_any(tx, 1)) is None
        assert set(sysdefs.empty) == {"s1", "s2"}
        run(lambda tx: tx.append([("a", msgpack.packb({"n": 1}))]))
        name, key, _ = run(lambda tx: sysh._claim_any(tx, 2))
        assert name == "s1"

        def work(tx):  # op_work's attempt: the outcome, then the next claim
            sysh._apply_outcome(tx, "s1", key, "commit", [("b", msgpack.packb({"n": 2}))])
            return sysh._claim_any(tx, 3)
        got = run(work)
        assert got is not None and got[0] == "s2", "s2 skipped: the worker would park"
    finally:
        store.close()


def test_a_claim_sees_a_log_committed_earlier_in_its_own_round(tmp_path):
    """A client's commit and a worker's claim in one round (one pass of the I/O loop)."""
    store, sysdefs, sysh, run = _chain(tmp_path, [("s", "t", "o")])
    try:
        assert run(lambda tx: sysh._claim_any(tx, 1)) is None and "s" in sysdefs.empty
        got = run(lambda tx: tx.append([("t", msgpack.packb({"n": 1}))]),
                  lambda tx: sysh._claim_any(tx, 2))
        assert got is not None and got[0] == "s"
        assert "s" not in sysdefs.empty
    finally:
        store.close()


def test_a_marked_stage_is_not_read_by_the_next_claims(tmp_path):
    """The skip itself: once marked, a drained stage is not looked at again (its record
    is not read) until a commit touches it."""
    store, sysdefs, sysh, run = _chain(tmp_path, [("s", "t", "o")])
    try:
        assert run(lambda tx: sysh._claim_any(tx, 1)) is None and "s" in sysdefs.empty
        reads = []

        def counting(tx):
            real = tx.proc
            tx.proc = lambda name: (reads.append(name), real(name))[1]
            return sysh._claim_any(tx, 2)
        assert run(counting) is None
        assert reads == []
        run(lambda tx: tx.append([("t", msgpack.packb({"n": 1}))]))
        got = run(counting)
        assert got is not None and got[0] == "s" and "s" in reads
    finally:
        store.close()


def _length(pp, topic):
    try:
        return pp.length(topic)
    except Exception as exc:
        assert getattr(exc, "code", None) == "invalid_topic"
        return 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("durability", ["fast", "full"])
def test_every_idle_stage_wakes_up_for_its_next_log(spawner, durability):
    """Twelve stages, each drained (so marked empty) and then fed one log at a time, in
    an order unlike the workers' round robin: each log is processed."""
    pp = spawner(workers=2, durability=durability)
    k = 12
    for i in range(k):
        pp.system_proc(name=f"s{i}", from_=f"t{i}", processor=f"{M}:inc", to=f"o{i}")
        pp.commit({"topic": f"t{i}", "body": {"n": 0}})
    for i in range(k):
        wait_until(lambda: _length(pp, f"o{i}") == 1, 20, what=f"first log of stage {i}")
    pp.wait_for_procs(timeout=20)
    for rnd in range(1, 4):
        for i in sorted(range(k), key=lambda i: (i * 7 + rnd) % k):
            pp.commit({"topic": f"t{i}", "body": {"n": rnd}})
            wait_until(lambda: _length(pp, f"o{i}") == rnd + 1, 20,
                       what=f"log {rnd} of stage {i}")
    for i in range(k):
        assert [lg.body["n"] for lg in pp.range(f"o{i}")] == [1, 2, 3, 4]


@pytest.mark.timeout(60)
def test_a_resumed_stage_is_claimed_again(spawner):
    """A stage disabled with logs waiting, then resumed, goes on (its record changed)."""
    pp = spawner(workers=1)
    pp.system_proc(name="s", from_="t", processor=f"{M}:inc", to="o")
    pp.commit({"topic": "t", "body": {"n": 0}})
    wait_until(lambda: _length(pp, "o") == 1, 20, what="the first log")
    pp.wait_for_procs(["s"], timeout=20)
    pp.disable_proc("s")
    pp.commit([{"topic": "t", "body": {"n": n}} for n in (1, 2)])
    pp.resume_proc("s")
    wait_until(lambda: _length(pp, "o") == 3, 20, what="the logs committed while disabled")
    assert [lg.body["n"] for lg in pp.range("o")] == [1, 2, 3]
