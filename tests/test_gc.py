"""GC (SPEC §8): off by default; age-based pruning of topics without procs; the
"two positions behind" rule with procs; procs that have not claimed twice and disabled procs
protect everything from their position on; topics, counters and procs stay.

The GC runs on a timer, so every check waits on a condition with a deadline. To know that
at least one *complete* GC pass ran after some point (before asserting that something was
*not* collected), :func:`gc_passes` commits a log to a proc-less probe topic and waits until
it is collected, twice: the second probe was committed after the pass that collected the
first one had started, so the pass collecting it started after that point.
"""

from __future__ import annotations

import functools
import time

import pytest

import pipeproc
import helpers

wait_until = functools.partial(helpers.wait_until, timeout=15.0)  # this module's deadline

FAST_GC = {"min_prune_time": 0.0, "interval": 0.02}  # a pass every 20 ms: short waits
PROBE = "gcprobe"


def seq(log_id: str) -> int:
    return int(log_id.split("-")[1])


def ms(log_id: str) -> int:
    return int(log_id.split("-")[0])


def now_ms() -> int:
    return int(time.time() * 1000)


def commit_n(pp, topic: str, n: int, start: int = 0) -> list[str]:
    return pp.commit([{"topic": topic, "body": {"i": start + i}} for i in range(n)])


def stored_seqs(pp, topic: str) -> list[int]:
    return [seq(log.id) for log in pp.range(topic)]


def first_stored(pp, topic: str):
    logs = pp.range(topic, limit=1)
    return seq(logs[0].id) if logs else None


def gc_passes(pp, n: int = 2, timeout: float = 15.0) -> None:
    """Return once at least one full GC pass ran entirely after this call started."""
    for _ in range(n):
        pid = pp.commit({"topic": PROBE, "body": {"probe": True}})
        wait_until(lambda: pp.range(PROBE, start=pid) == [], timeout=timeout,
                   what="probe log collected")


STATE_FIELDS = (
    "name", "topic", "offset", "created_at", "last_claimed_at", "last_acked_at",
    "last_claimed_range", "last_acked_range", "previous_claimed_range", "status",
    "reclaims", "max_reclaims", "reclaim_timeout", "on_max_reclaims_reached",
)


def state_of(pp, name: str) -> dict:
    st = pp.inspect_proc(name)
    return {f: getattr(st, f) for f in STATE_FIELDS}


def register(pp, topic: str, name: str, **kw) -> None:
    """Create a proc before its topic has logs, so that no GC pass can run in between."""
    kw.setdefault("reclaim_timeout", -1)
    assert pp.proc(topic, name=name, **kw) is None


def claim_and_ack(pp, topic: str, name: str, times: int, count: int = 1) -> None:
    for _ in range(times):
        got = pp.proc(topic, name=name, count=count, reclaim_timeout=-1)
        assert got is not None
        pp.ack(name, claimed=got)


# ---------------------------------------------------------------- off by default


@pytest.mark.parametrize("gc", [None, False])
def test_gc_off_by_default(spawner, gc):
    pp = spawner() if gc is None else spawner(gc=gc)
    ids = commit_n(pp, "t", 5)
    commit_n(pp, PROBE, 1)
    pp.proc("t", name="p", count=5, reclaim_timeout=-1)
    pp.ack("p")
    pp.proc("t", name="p")  # nothing more; a proc that is done with everything
    time.sleep(1.0)  # a GC (if one ran) with any sensible interval would have had time
    assert [log.id for log in pp.range("t")] == ids
    assert pp.stats()["topics"]["t"]["stored"] == 5
    assert len(pp.range(PROBE)) == 1


# ---------------------------------------------------------------- topics without procs


@pytest.mark.parametrize("memory", [False, True], ids=["disk", "memory"])
def test_gc_prunes_topics_without_procs(spawner, memory):
    pp = spawner(gc=FAST_GC, memory=memory)
    ids = commit_n(pp, "t", 5)
    assert pp.stats()["topics"]["t"]["stored"] == 5
    wait_until(lambda: pp.range("t") == [], what="topic t collected")
    assert pp.length("t") == 5
    assert "t" in pp.topics()
    st = pp.stats()["topics"]["t"]
    assert st["length"] == 5 and st["stored"] == 0
    assert pp.revrange("t", limit=1) == []
    for i in (0, 2, 4):
        with pytest.raises(pipeproc.PipeProcError) as e:
            pp.range("t", start=f":{i}")
        assert e.value.code == "invalid_tone_id_search"
    # the counter goes on
    new = commit_n(pp, "t", 2, start=5)
    assert [seq(i) for i in new] == [5, 6]
    assert ms(new[0]) >= ms(ids[-1])
    wait_until(lambda: pp.range("t") == [], what="new logs collected")
    assert pp.length("t") == 7


def test_gc_respects_min_prune_time(spawner):
    prune = 1.2  # > the 0.7 s between the old and the young logs, with a margin
    pp = spawner(gc={"min_prune_time": prune, "interval": 0.1})
    old = commit_n(pp, "t", 3)
    wait_until(lambda: now_ms() > ms(old[0]) + 700, what="old logs aged")
    young = commit_n(pp, "t", 3, start=3)
    if now_ms() - ms(old[-1]) < prune * 1000 - 200:
        assert stored_seqs(pp, "t") == [0, 1, 2, 3, 4, 5]
    wait_until(lambda: first_stored(pp, "t") == 3, what="old logs collected")
    # collected only once older than min_prune_time
    assert now_ms() - ms(old[-1]) >= prune * 1000 - 5
    if now_ms() - ms(young[0]) < prune * 1000 - 200:
        assert stored_seqs(pp, "t") == [3, 4, 5]
    assert pp.stats()["topics"]["t"]["stored"] in (3, 0)
    wait_until(lambda: pp.range("t") == [], what="young logs collected in turn")
    assert pp.length("t") == 6


def test_gc_keeps_working_after_ticks_with_no_topic(spawner):
    pp = spawner(gc=FAST_GC)
    time.sleep(6 * FAST_GC["interval"])  # several GC ticks find no topic at all (PipeProc's GC stopped here)
    commit_n(pp, "t", 3)
    wait_until(lambda: pp.range("t") == [], what="collected after empty ticks")
    commit_n(pp, "u", 2)
    wait_until(lambda: pp.range("u") == [], what="still collecting later")
    # and when every topic got emptied, it still goes on
    time.sleep(3 * FAST_GC["interval"])
    commit_n(pp, "t", 1, start=3)
    wait_until(lambda: pp.range("t") == [], what="collecting after topics were emptied")
    assert pp.length("t") == 4


# ---------------------------------------------------------------- topics with procs


def test_gc_two_positions_behind_the_claimed_range(spawner):
    pp = spawner(gc=FAST_GC)
    register(pp, "t", "p")
    commit_n(pp, "t", 10)
    claim_and_ack(pp, "t", "p", 5)  # claimed and acked 0..4
    pp.proc("t", name="p", reclaim_timeout=-1)  # claims 5: previous_claimed_range is 4..4
    st = pp.inspect_proc("p")
    assert seq(st.previous_claimed_range.split("..")[0]) == 4
    wait_until(lambda: first_stored(pp, "t") == 4, what="logs before 4 collected")
    gc_passes(pp)
    assert stored_seqs(pp, "t") == list(range(4, 10))
    assert pp.stats()["topics"]["t"]["stored"] == 6
    assert pp.length("t") == 10
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.range("t", start=":3")
    assert e.value.code == "invalid_tone_id_search"
    assert pp.range("t", start=":4")[0].body == {"i": 4}
    # the proc goes on as if nothing happened
    pp.ack("p")
    assert pp.proc("t", name="p").body == {"i": 6}  # previous_claimed_range 5..5
    wait_until(lambda: first_stored(pp, "t") == 5, what="log 4 collected")
    gc_passes(pp)
    assert stored_seqs(pp, "t") == list(range(5, 10))
    assert pp.inspect_proc("p").status == "active"


def test_gc_two_positions_behind_with_multi_log_claims(spawner):
    pp = spawner(gc=FAST_GC)
    register(pp, "t", "p")
    commit_n(pp, "t", 12)
    claim_and_ack(pp, "t", "p", 2, count=3)  # 0..2, 3..5
    pp.proc("t", name="p", count=3, reclaim_timeout=-1)  # 6..8 pending, previous 3..5
    wait_until(lambda: first_stored(pp, "t") == 3, what="logs before 3 collected")
    gc_passes(pp)
    assert stored_seqs(pp, "t") == list(range(3, 12))
    # a reclaim leaves previous_claimed_range as it was: nothing more is collected
    pp.reclaim("p")
    gc_passes(pp)
    assert stored_seqs(pp, "t") == list(range(3, 12))
    assert [x.body["i"] for x in pp.proc("t", name="p", count=3)] == [6, 7, 8]
    gc_passes(pp)
    assert first_stored(pp, "t") >= 3
    assert set(range(6, 12)) <= set(stored_seqs(pp, "t"))


def test_gc_proc_that_has_not_claimed_twice_protects_its_position(spawner):
    pp = spawner(gc=FAST_GC)
    register(pp, "never", "n", offset=">")
    register(pp, "once", "o")
    register(pp, "idle", "i", offset=":2")
    commit_n(pp, "never", 4)
    assert pp.proc("never", name="n", offset=">", reclaim_timeout=-1).body["i"] == 0
    pp.reclaim("n")  # claimed once and reclaimed: still at the beginning
    commit_n(pp, "once", 4)
    claim_and_ack(pp, "once", "o", 1)  # claimed once (0), acked: position 1
    commit_n(pp, "idle", 4)
    got = pp.proc("idle", name="i", offset=":2", reclaim_timeout=-1)  # claims 2: first claim
    assert got.body["i"] == 2
    commit_n(pp, "none", 1)  # no procs: collected, proves passes ran
    pp.proc("later", name="l")  # a proc on a topic that has no log yet
    wait_until(lambda: pp.range("none") == [], what="proc-less topic collected")
    gc_passes(pp)
    assert stored_seqs(pp, "never") == [0, 1, 2, 3]
    assert set(range(1, 4)) <= set(stored_seqs(pp, "once"))
    assert set(range(2, 4)) <= set(stored_seqs(pp, "idle"))
    commit_n(pp, "later", 3)
    gc_passes(pp)
    assert stored_seqs(pp, "later") == [0, 1, 2]
    assert [x.body["i"] for x in pp.proc("later", name="l", count=3)] == [0, 1, 2]
    assert pp.proc("never", name="n").body == {"i": 0}


def test_gc_disabled_proc_protects_its_position(spawner):
    pp = spawner(gc=FAST_GC)
    register(pp, "t", "p")
    register(pp, "u", "q")
    commit_n(pp, "t", 10)
    claim_and_ack(pp, "t", "p", 5)  # 0..4 acked
    pp.proc("t", name="p", reclaim_timeout=-1)  # 5 pending, previous 4..4
    pp.disable_proc("p")
    commit_n(pp, "u", 10)
    pp.proc("u", name="q", reclaim_timeout=-1)  # disabled before claiming twice
    pp.disable_proc("q")
    gc_passes(pp, 3)
    assert set(range(5, 10)) <= set(stored_seqs(pp, "t"))
    assert stored_seqs(pp, "u") == list(range(10))
    assert pp.length("t") == 10
    # once resumed and moving again, the normal rule applies
    pp.resume_proc("p")
    pp.ack("p")
    claim_and_ack(pp, "t", "p", 2)  # 6, 7
    pp.proc("t", name="p", reclaim_timeout=-1)  # 8 pending, previous 7..7
    wait_until(lambda: first_stored(pp, "t") == 7, what="collected after resume")
    assert stored_seqs(pp, "t") == [7, 8, 9]


def test_gc_lagging_proc_protects_shared_topic(spawner):
    pp = spawner(gc=FAST_GC)
    register(pp, "t", "fast")
    register(pp, "t", "slow")
    commit_n(pp, "t", 20)
    claim_and_ack(pp, "t", "fast", 15)
    pp.proc("t", name="fast", reclaim_timeout=-1)  # 15 pending, previous 14
    claim_and_ack(pp, "t", "slow", 2)
    pp.proc("t", name="slow", reclaim_timeout=-1)  # 2 pending, previous 1
    wait_until(lambda: first_stored(pp, "t") == 1, what="log 0 collected")
    gc_passes(pp)
    assert stored_seqs(pp, "t") == list(range(1, 20))
    assert [x.body["i"] for x in pp.range("t", start=":1", end=":3")] == [1, 2, 3]
    # the slow proc moves: more is collected, never past it
    pp.ack("slow")
    claim_and_ack(pp, "t", "slow", 3)  # 3, 4, 5
    pp.proc("t", name="slow", reclaim_timeout=-1)  # 6 pending, previous 5
    wait_until(lambda: first_stored(pp, "t") == 5, what="collected up to the slow proc")
    gc_passes(pp)
    assert stored_seqs(pp, "t") == list(range(5, 20))
    # a proc disabled on the shared topic still protects its position
    pp.disable_proc("slow")
    pp.ack("fast")
    gc_passes(pp)
    assert set(range(6, 20)) <= set(stored_seqs(pp, "t"))


# ---------------------------------------------------------------- what stays


def test_gc_keeps_topics_counters_and_procs(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc, gc=FAST_GC)
    register(pp, "t", "p")
    commit_n(pp, "t", 6)
    claim_and_ack(pp, "t", "p", 4)
    pp.proc("t", name="p", reclaim_timeout=-1)  # 4 pending, previous 3
    wait_until(lambda: first_stored(pp, "t") == 3, what="collected up to 3")
    state = state_of(pp, "p")
    commit_n(pp, "gone", 3)
    wait_until(lambda: pp.range("gone") == [], what="proc-less topic collected")
    assert {"t", "gone"} <= set(pp.topics())
    assert pp.length("t") == 6 and pp.length("gone") == 3
    topics = pp.stats()["topics"]
    assert topics["t"]["length"] == 6 and topics["t"]["stored"] == 3
    assert topics["gone"]["length"] == 3 and topics["gone"]["stored"] == 0
    assert state_of(pp, "p") == state
    assert seq(pp.commit({"topic": "gone", "body": {"i": 3}})) == 3
    # a ":N" offset whose log was collected starts at the oldest stored log
    assert pp.proc("t", name="late", offset=":1", reclaim_timeout=-1).body["i"] == 3
    pp.shutdown()
    pp = spawner(loc, gc=FAST_GC)
    assert pp.length("t") == 6 and pp.length("gone") == 4
    assert state_of(pp, "p") == state
    assert seq(pp.commit({"topic": "t", "body": {"i": 6}})) == 6
    assert first_stored(pp, "t") >= 3


def test_gc_after_destroy_proc_topic_is_proc_less(spawner):
    pp = spawner(gc=FAST_GC)
    register(pp, "t", "p")
    commit_n(pp, "t", 5)
    pp.proc("t", name="p", reclaim_timeout=-1)
    gc_passes(pp)
    assert stored_seqs(pp, "t") == [0, 1, 2, 3, 4]
    pp.destroy_proc("p")
    wait_until(lambda: pp.range("t") == [], what="collected once its only proc was destroyed")
    assert pp.length("t") == 5


def test_gc_with_procs_still_waits_for_min_prune_time(spawner):
    prune = 1.2
    pp = spawner(gc={"min_prune_time": prune, "interval": 0.1})
    register(pp, "t", "p")
    ids = commit_n(pp, "t", 10)
    claim_and_ack(pp, "t", "p", 5)
    pp.proc("t", name="p", reclaim_timeout=-1)  # previous_claimed_range 4..4
    if now_ms() - ms(ids[0]) < prune * 1000 - 300:
        assert stored_seqs(pp, "t") == list(range(10))
    wait_until(lambda: first_stored(pp, "t") == 4, what="collected once old enough")
    assert now_ms() - ms(ids[0]) >= prune * 1000 - 5
    assert pp.stats()["procs"]["p"]["lag"] == 5  # lag counts by sequence, not stored logs
    assert pp.inspect_proc("p").status == "active"
