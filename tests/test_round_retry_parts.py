"""A write round run again changes nothing twice and loses nothing: the node's parts,
in-process (regression tests of an independent review of the retry undo, session 7).

* a GC step whose round is aborted (map grown, or the GC's reserve) and run again still
  collects the topics the aborted try had taken off its pass;
* the end of a workflow attempt that a full store refused is written again by its own
  worker's request once the store has room (not left to an unrelated wake-up or the lease);
* an attempt put back in ``live`` by an aborted round keeps its lease.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import lmdb
import msgpack
import pytest

from pipeproc._flows import Flows
from pipeproc._node import Node
from pipeproc._store import Store
from pipeproc._syshandlers import SysHandlers
from pipeproc._waits import Deadlines, SysDefs, Timers, Waits
from pipeproc._writer import Writer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("path", ["grown", "reserve"])
def test_a_gc_step_run_again_after_map_full_still_collects(tmp_path, path):
    store = Store(str(tmp_path / "s"))
    tx = store.begin()
    tx.append([("a", b"\x01")] * 5 + [("b", b"\x01")] * 5)
    tx.commit()
    real_begin, fails = store.begin, [1]

    def begin(now=None):
        tx = real_begin(now)
        if fails:  # the first try of the round: its commit finds the map full
            fails.pop()

            def commit():
                raise lmdb.MapFullError("injected")
            tx.commit = commit
        return tx
    store.begin = begin
    if path == "grown":
        grown = [1]
        store.grow = lambda for_gc=False: bool(grown and grown.pop())
    else:  # a full store: only the GC may grow, into the reserve
        store.grow = lambda for_gc=False: bool(for_gc)
        store.recycle_pages = lambda: False
        store.leave_reserve = lambda: None
    host = SimpleNamespace(store=store, gc_min_prune=-1.0, _gc_pass=None)
    writer = Writer(store, False, lambda tx: None)
    got = []
    try:
        writer.submit(lambda tx: Node._gc(host, tx), lambda ok, v: got.append((ok, v)),
                      gc=True)
        assert got == [(True, False)]
        assert (store.topics["a"].first, store.topics["b"].first) == (5, 5)
    finally:
        store.close()


class FakeConn:
    _n = 0

    def __init__(self, slot):
        FakeConn._n += 1
        self.id = FakeConn._n
        self.worker = {"slot": slot, "pid": 1000 + slot}
        self.lock = threading.Lock()
        self.claims, self.live = {}, set()
        self.closed = self.parked = False
        self.sent = []

    def send(self, data):
        self.sent.append(data)

    def reply(self, rid, value):
        self.sent.append((rid, value))

    def fail(self, rid, err):
        self.sent.append((rid, err))


def test_a_refused_attempt_end_is_written_again_when_the_store_has_room(tmp_path):
    store = Store(str(tmp_path / "s"))
    full = threading.Event()
    real_begin = store.begin

    def begin(now=None):
        tx = real_begin(now)
        if full.is_set():
            def commit():
                raise lmdb.MapFullError("injected: the store is full")
            tx.commit = commit
        return tx
    store.begin = begin
    store.grow = lambda for_gc=False: False
    store.recycle_pages = lambda: False
    stopping = threading.Event()
    timers = Timers()
    sysdefs = SysDefs(store)

    def after_commit(tx):
        sysdefs.committed(tx)
        flows.after_commit(tx)
        waits.after_commit(tx.touched_topics, tx.touched_procs)
    writer = Writer(store, False, after_commit)
    waits = Waits(store, writer, timers, sysdefs)
    deadlines = Deadlines(store, writer, timers, sysdefs, waits)
    sys_ = SysHandlers(store, writer, timers, waits, deadlines, sysdefs, stopping)
    flows = Flows(store, writer, timers, waits, stopping)
    sys_.flows = flows
    timers.start()
    writer.start()
    try:
        writer.submit(lambda tx: flows._start(tx, "r1", "wf", "ref", msgpack.packb(["start"]),
                                              3, 60.0, "v", None, None), lambda ok, v: None)
        a, b = FakeConn(0), FakeConn(1)
        sys_.op_work(b, 1, None, True)        # one worker claims r1 ...
        holder, idle = (b, a) if "r1" in flows.live and flows.live["r1"].conn is b else (a, b)
        sys_.op_work(idle, 1, None, True)     # ... the other worker parks, idle
        assert "r1" in flows.live and (idle.id, 1) in waits.claims
        token = flows.live["r1"].token
        full.set()  # the attempt's end arrives while the store is full: storage_full
        sys_.op_work(holder, 2, {"run": "r1", "token": token, "events": [],
                                 "end": {"kind": "finished", "result": 1}}, True)
        full.clear()  # room again (a GC pass, a deleted topic)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and store.runs["r1"]["status"] != "finished":
            time.sleep(0.05)
        assert store.runs["r1"]["status"] == "finished", (
            store.runs["r1"]["status"], "r1" in flows.live, sorted(waits.claims))
    finally:
        stopping.set()
        timers.stop()
        writer.stop()
        store.close()


def _claimed_run(tmp_path, lease: float):
    """A store, the workflow runs' part around it (timers started; the writer runs rounds
    inline) and run ``r1`` claimed by a worker connection: ``(store, timers, writer,
    flows, conn, attempt)``."""
    store = Store(str(tmp_path / "s"))
    timers = Timers()
    writer = Writer(store, False, lambda tx: flows.after_commit(tx))
    flows = Flows(store, writer, timers, Waits(store, writer, timers, SysDefs(store)),
                  threading.Event())
    conn = type("C", (), {"closed": False})()
    timers.start()
    writer.submit(lambda tx: flows._start(tx, "r1", "wf", "ref", msgpack.packb(["s"]), 3,
                                          lease, "v", None, None), lambda ok, v: None)
    writer.submit(lambda tx: flows.claim(tx, 1, conn), lambda ok, v: None)
    return store, timers, writer, flows, conn, flows.live["r1"]


def test_an_attempt_made_live_again_by_an_abort_keeps_its_lease(tmp_path):
    store, timers, writer, flows, conn, att = _claimed_run(tmp_path, 0.3)
    try:

        def end_then_fail(tx):  # the end is applied, then the round fails (an abort)
            flows.apply(tx, conn, {"run": "r1", "token": att.token, "events": [],
                                   "end": {"kind": "finished", "result": 1}})
            time.sleep(0.6)  # the lease check fires meanwhile: the attempt is not live
            raise RuntimeError("injected")
        got = []
        writer.submit(end_then_fail, lambda ok, v: got.append(ok))
        assert got == [False] and flows.live.get("r1") is att  # undone: live again
        time.sleep(1.0)  # two leases: the attempt, silent, must have been interrupted
        assert "r1" not in flows.live
    finally:
        timers.stop()
        store.close()


def test_an_aborted_write_leaves_the_attempt_and_the_counters_as_they_were(tmp_path):
    """A signal to a live attempt, its record (lease deadline, update time) and a fenced
    write, all in a round that is then aborted: nothing of it stays in memory."""
    store, timers, writer, flows, conn, att = _claimed_run(tmp_path, 60.0)
    try:
        before = (att.deadline, att.updated, set(att.signals), flows.fenced, att.wrote)

        def then_fail(tx):
            flows._signal(tx, "r1", "go", msgpack.packb(1))
            assert flows.apply(tx, conn, {"run": "r1", "token": att.token,
                                          "events": [msgpack.packb(["e"])]}) == "ok"
            assert flows.apply(tx, conn, {"run": "r1", "token": att.token + 99,
                                          "events": []}) == "fenced"
            raise RuntimeError("injected: the round fails")
        got = []
        writer.submit(then_fail, lambda ok, v: got.append(ok))
        assert got == [False]
        assert flows.live.get("r1") is att
        assert (att.deadline, att.updated, set(att.signals), flows.fenced, att.wrote) == before
    finally:
        timers.stop()
        store.close()
