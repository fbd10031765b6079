"""Procs (SPEC §5) through the public API: claim, ack, ack_commit, reclaim, timeouts,
disable / resume / destroy, offsets, claim identity, wait_for_procs, available_proc, stats.

Readings of the SPEC where it is silent (kept consistent with PipeProc's source):

- after a reclaim (manual or by timeout) ``last_claimed_range`` is restored to the last
  acked range, which is what ``reclaim`` returns ("restored last claimed range");
- a claim pending when a disk node stops is still pending after the restart (procs are
  persisted as they are; only a dead *worker*'s claims are reclaimed at once);
- ``ack(name, claimed=...)`` with nothing pending but something acked before fails with
  ``stale_claim`` (the pending claim is not exactly those logs), while ``ack(name)`` without
  ``claimed=`` returns the last acked range; with nothing ever acked it is ``invalid_ack``
  (the state errors are checked in the order §2 lists them);
- "the same logs again" after a reclaim is checked with an unchanged ``count``;
- ``available_proc`` serves only the procs it is given (a worker must never run another
  proc's logs), and never a disabled one;
- an option that is valid but absurd (``count=2**70``, ``reclaim_timeout=inf``) may be
  refused with ``invalid_argument`` or honoured, but never escapes as a non-PipeProcError
  nor wedges the node (SPEC §2 and §9: bad input never crashes the node).
"""

from __future__ import annotations

import threading
import time

import pytest

import pipeproc
from pipeproc import Log
from helpers import wait_until

# ---------------------------------------------------------------- helpers


def seq(log_id: str) -> int:
    return int(log_id.split("-")[1])


def ms(log_id: str) -> int:
    return int(log_id.split("-")[0])


def rng(first: str, last: str | None = None) -> str:
    return f"{first}..{last if last is not None else first}"


def commit_n(pp, topic: str, n: int, start: int = 0) -> list[str]:
    """Commit ``n`` logs with bodies {"i": start..start+n-1}; returns their ids."""
    if n == 0:
        return []
    return pp.commit([{"topic": topic, "body": {"i": start + i}} for i in range(n)])


def code_of(fn, *args, **kw) -> str | None:
    """Run ``fn`` and return the PipeProcError code it raised (None when it did not raise)."""
    try:
        fn(*args, **kw)
    except pipeproc.PipeProcError as e:
        return e.code
    return None


STATE_FIELDS = (
    "name", "topic", "offset", "created_at", "last_claimed_at", "last_acked_at",
    "last_claimed_range", "last_acked_range", "previous_claimed_range", "status",
    "reclaims", "max_reclaims", "reclaim_timeout", "on_max_reclaims_reached",
)


def state_dict(st) -> dict:
    return {f: getattr(st, f) for f in STATE_FIELDS}


def ids_of(result) -> list[str]:
    if result is None:
        return []
    if isinstance(result, list):
        return [log.id for log in result]
    return [result.id]


# ---------------------------------------------------------------- claim / ack basics


def test_claim_pending_ack_and_next(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 3)
    log = pp.proc("t", name="p")
    assert isinstance(log, Log)
    assert log.id == ids[0] and log.body == {"i": 0}
    # one pending claim: further calls get nothing until ack / reclaim
    assert pp.proc("t", name="p") is None
    assert pp.proc("t", name="p", count=3) is None
    assert pp.ack("p") == rng(ids[0])
    # ack with nothing pending returns the last acked range unchanged
    assert pp.ack("p") == rng(ids[0])
    nxt = pp.proc("t", name="p")
    assert nxt.id == ids[1] and nxt.body == {"i": 1}
    assert pp.ack("p") == rng(ids[1])
    assert pp.ack("p") == rng(ids[1])
    assert pp.proc("t", name="p").id == ids[2]
    assert pp.ack("p") == rng(ids[2])
    assert pp.proc("t", name="p") is None  # topic drained
    new = commit_n(pp, "t", 1, start=3)
    assert pp.proc("t", name="p").id == new[0]


def test_ack_of_a_multi_log_claim_returns_first_dot_dot_last(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 5)
    got = pp.proc("t", name="p", count=3)
    assert ids_of(got) == ids[:3]
    assert pp.ack("p") == rng(ids[0], ids[2])
    assert pp.ack("p") == rng(ids[0], ids[2])
    got = pp.proc("t", name="p", count=3)
    assert ids_of(got) == ids[3:]
    assert pp.ack("p") == rng(ids[3], ids[4])


def test_ack_with_nothing_ever_acked_is_invalid_ack(any_node):
    pp = any_node
    assert pp.proc("t", name="p") is None  # topic does not exist yet: creates the proc
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack("p")
    assert e.value.code == "invalid_ack"
    commit_n(pp, "t", 2)
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack("p")  # logs exist, but nothing claimed
    assert e.value.code == "invalid_ack"
    st = pp.inspect_proc("p")
    assert st.last_acked_range == "" and st.last_claimed_range == ""
    # a claim reclaimed before any ack leaves nothing acked either
    log = pp.proc("t", name="p")
    pp.reclaim("p")
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack("p")
    assert e.value.code == "invalid_ack"
    assert pp.proc("t", name="p") == log


def test_reclaim_return_values_and_redelivery(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 4)
    first = pp.proc("t", name="p")
    assert pp.reclaim("p") == ""  # never acked
    again = pp.proc("t", name="p")
    assert again == first
    assert pp.ack("p") == rng(ids[0])
    claim = pp.proc("t", name="p", count=2)
    assert ids_of(claim) == ids[1:3]
    assert pp.reclaim("p") == rng(ids[0])  # the last acked range
    st = pp.inspect_proc("p")
    assert st.reclaims == 1
    assert st.last_claimed_range == rng(ids[0]) == st.last_acked_range
    assert pp.proc("t", name="p", count=2) == claim  # the same logs again
    assert pp.ack("p") == rng(ids[1], ids[2])
    assert pp.inspect_proc("p").reclaims == 0  # ack resets reclaims


def test_nothing_to_reclaim(any_node):
    pp = any_node
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.reclaim("p")
    assert e.value.code == "invalid_proc"
    pp.proc("t", name="p")  # created, nothing to claim
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.reclaim("p")
    assert e.value.code == "nothing_to_reclaim"
    commit_n(pp, "t", 2)
    pp.proc("t", name="p")
    pp.ack("p")
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.reclaim("p")
    assert e.value.code == "nothing_to_reclaim"
    pp.proc("t", name="p")
    pp.reclaim("p")
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.reclaim("p")  # already reclaimed
    assert e.value.code == "nothing_to_reclaim"
    assert pp.inspect_proc("p").reclaims == 1


# ---------------------------------------------------------------- max_reclaims / policy


def test_max_reclaims_disable_in_the_same_call(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 2)
    pp.proc("t", name="p", max_reclaims=2)
    assert pp.reclaim("p") == ""
    st = pp.inspect_proc("p")
    assert st.status == "active" and st.reclaims == 1
    assert pp.proc("t", name="p").id == ids[0]
    pp.reclaim("p")  # reaches max_reclaims: disabled by this very call
    st = pp.inspect_proc("p")
    assert st.status == "disabled" and st.reclaims == 2
    for call in (lambda: pp.proc("t", name="p"), lambda: pp.reclaim("p")):
        with pytest.raises(pipeproc.PipeProcError) as e:
            call()
        assert e.value.code == "proc_is_disabled"
    assert pp.stats()["procs"]["p"]["status"] == "disabled"
    # resume resets the count; the dropped claim is delivered again
    st = pp.resume_proc("p")
    assert st.status == "active" and st.reclaims == 0
    assert pp.proc("t", name="p").id == ids[0]


def test_max_reclaims_continue_never_disables(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 1)
    for i in range(4):
        log = pp.proc("t", name="p", max_reclaims=1, on_max_reclaims_reached="continue")
        assert log.id == ids[0]
        pp.reclaim("p")
        st = pp.inspect_proc("p")
        assert st.status == "active"
        assert st.reclaims == i + 1
    assert pp.proc("t", name="p").id == ids[0]
    pp.ack("p")
    assert pp.inspect_proc("p").reclaims == 0


def test_max_reclaims_unlimited(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 1)
    for i in range(12):
        assert pp.proc("t", name="p", max_reclaims=-1).id == ids[0]
        pp.reclaim("p")
    st = pp.inspect_proc("p")
    assert st.status == "active" and st.reclaims == 12 and st.max_reclaims == -1


def test_ack_resets_reclaims(any_node):
    pp = any_node
    commit_n(pp, "t", 2)
    for _ in range(3):
        pp.proc("t", name="p", max_reclaims=5)
        pp.reclaim("p")
    assert pp.inspect_proc("p").reclaims == 3
    pp.proc("t", name="p")
    pp.ack("p")
    assert pp.inspect_proc("p").reclaims == 0
    # the counter starts over: 5 more reclaims are needed to disable
    for _ in range(4):
        pp.proc("t", name="p")
        pp.reclaim("p")
    assert pp.inspect_proc("p").status == "active"
    pp.proc("t", name="p")
    pp.reclaim("p")
    assert pp.inspect_proc("p").status == "disabled"


# ---------------------------------------------------------------- disable / resume


def test_disable_resume_keeps_pending_claim(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 3)
    log = pp.proc("t", name="p", reclaim_timeout=-1)
    st = pp.disable_proc("p")
    assert st.name == "p" and st.status == "disabled"
    assert st.last_claimed_range == rng(ids[0])
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.disable_proc("p")
    assert e.value.code == "proc_already_disabled"
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("t", name="p")
    assert e.value.code == "proc_is_disabled"
    st = pp.resume_proc("p")
    assert st.status == "active" and st.reclaims == 0
    assert st.last_claimed_range == rng(ids[0])
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.resume_proc("p")
    assert e.value.code == "proc_already_active"
    assert pp.proc("t", name="p") is None  # the claim is still pending
    assert pp.ack("p", claimed=log) == rng(ids[0])
    assert pp.proc("t", name="p").id == ids[1]


def test_resume_resets_reclaims_keeping_claim(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 2)
    pp.proc("t", name="p", max_reclaims=5, reclaim_timeout=-1)
    pp.reclaim("p")
    pp.proc("t", name="p")
    pp.reclaim("p")
    log = pp.proc("t", name="p")  # pending
    assert pp.inspect_proc("p").reclaims == 2
    pp.disable_proc("p")
    st = pp.resume_proc("p")
    assert st.reclaims == 0 and st.status == "active"
    assert st.last_claimed_range == rng(ids[0])
    assert pp.proc("t", name="p") is None
    assert pp.ack("p", claimed=log) == rng(ids[0])


def test_unknown_proc_is_invalid_proc_everywhere(any_node):
    pp = any_node
    commit_n(pp, "t", 1)
    calls = {
        "inspect_proc": lambda: pp.inspect_proc("nope"),
        "disable_proc": lambda: pp.disable_proc("nope"),
        "resume_proc": lambda: pp.resume_proc("nope"),
        "destroy_proc": lambda: pp.destroy_proc("nope"),
        "ack": lambda: pp.ack("nope"),
        "reclaim": lambda: pp.reclaim("nope"),
        "ack_commit": lambda: pp.ack_commit("nope", {"topic": "out", "body": {"x": 1}}),
    }
    for label, call in calls.items():
        assert code_of(call) == "invalid_proc", label
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.length("out")
    assert e.value.code == "invalid_topic"  # the failed ack_commit wrote nothing


# ---------------------------------------------------------------- options


def test_options_frozen_at_creation_count_per_call(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 10)
    first = pp.proc("t", name="p", offset=":2", count=2, max_reclaims=2, reclaim_timeout=30.0,
                    on_max_reclaims_reached="disable")
    assert ids_of(first) == ids[2:4]
    pp.reclaim("p")
    # later values of the frozen options are ignored
    again = pp.proc("t", name="p", offset=">", count=2, max_reclaims=50, reclaim_timeout=0.1,
                    on_max_reclaims_reached="continue")
    assert again == first
    st = pp.inspect_proc("p")
    assert st.offset == ":2"
    assert st.max_reclaims == 2
    assert st.reclaim_timeout == 30.0
    assert st.on_max_reclaims_reached == "disable"
    time.sleep(0.4)  # longer than the ignored reclaim_timeout=0.1
    assert pp.inspect_proc("p").reclaims == 1  # not reclaimed by the ignored 0.1 s timeout
    pp.reclaim("p")  # second reclaim reaches the frozen max_reclaims=2 with "disable"
    assert pp.inspect_proc("p").status == "disabled"
    pp.resume_proc("p")
    assert pp.proc("t", name="p", count=2) == first
    pp.ack("p")
    # count applies to each call
    one = pp.proc("t", name="p", count=1)
    assert isinstance(one, Log) and one.id == ids[4]
    pp.ack("p")
    three = pp.proc("t", name="p", count=3)
    assert ids_of(three) == ids[5:8]


def test_count_above_one_returns_lists(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 4)
    got = pp.proc("t", name="p", count=3)
    assert isinstance(got, list) and all(isinstance(x, Log) for x in got)
    assert [x.body for x in got] == [{"i": 0}, {"i": 1}, {"i": 2}]
    pp.ack("p")
    got = pp.proc("t", name="p", count=3)
    assert isinstance(got, list) and ids_of(got) == ids[3:4]  # a list even for one log
    pp.ack("p")
    assert pp.proc("t", name="p", count=3) is None
    more = commit_n(pp, "t", 2, start=4)
    got = pp.proc("t", name="p", count=1)
    assert isinstance(got, Log) and got.id == more[0]


def test_proc_name_not_unique_across_topics(any_node):
    pp = any_node
    commit_n(pp, "a", 2)
    commit_n(pp, "b", 2)
    assert pp.proc("a", name="p").body == {"i": 0}
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("b", name="p")
    assert e.value.code == "proc_name_not_unique"
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("never_committed", name="p")
    assert e.value.code == "proc_name_not_unique"
    assert pp.inspect_proc("p").topic == "a"
    assert pp.ack("p") is not None  # the original proc is untouched
    pp.destroy_proc("p")
    assert pp.proc("b", name="p").body == {"i": 0}  # the name is free again
    assert pp.inspect_proc("p").topic == "b"


@pytest.mark.parametrize("offset", [">", "$>", ":0"])
def test_proc_on_missing_topic_is_created_and_waits(any_node, offset):
    pp = any_node
    assert pp.proc("later", name="p", offset=offset) is None
    st = pp.inspect_proc("p")
    assert st.name == "p" and st.topic == "later" and st.status == "active"
    assert st.offset == offset
    assert st.last_claimed_range == "" and st.last_acked_range == ""
    assert "p" in pp.stats()["procs"]
    # creating a proc does not create its topic
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.length("later")
    assert e.value.code == "invalid_topic"
    assert pp.proc("later", name="p") is None
    ids = commit_n(pp, "later", 2)
    got = pp.proc("later", name="p", count=5)
    assert ids_of(got) == ids


# ---------------------------------------------------------------- offsets


def test_offset_dollar_is_by_sequence(any_node):
    pp = any_node
    commit_n(pp, "t", 3)
    assert pp.proc("t", name="p", offset="$>") is None
    assert pp.proc("t", name="p", offset="$>") is None
    # committed right after creation, possibly in the same millisecond: still delivered
    new = commit_n(pp, "t", 2, start=3)
    got = pp.proc("t", name="p", count=5)
    assert ids_of(got) == new
    assert pp.inspect_proc("p").offset == "$>"


def test_offset_dollar_fixed_at_creation(any_node):
    pp = any_node
    commit_n(pp, "t", 2)
    pp.proc("t", name="p", offset="$>")
    mid = commit_n(pp, "t", 3, start=2)  # after creation: all of these are delivered
    got = pp.proc("t", name="p", offset="$>", count=10)
    assert ids_of(got) == mid
    pp.reclaim("p")
    assert ids_of(pp.proc("t", name="p", count=10)) == mid


def test_offset_seq(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 5)
    assert pp.proc("t", name="zero", offset=":0").id == ids[0]
    assert pp.proc("t", name="gt", offset=">").id == ids[0]
    assert pp.proc("t", name="two", offset=":2").id == ids[2]
    pp.ack("two")
    assert pp.proc("t", name="two").id == ids[3]
    # a sequence that does not exist yet is waited for
    assert pp.proc("t", name="seven", offset=":7") is None
    commit_n(pp, "t", 2, start=5)  # seqs 5, 6
    assert pp.proc("t", name="seven", count=5) is None
    new = commit_n(pp, "t", 2, start=7)  # seqs 7, 8
    got = pp.proc("t", name="seven", count=5)
    assert ids_of(got) == new
    assert seq(got[0].id) == 7
    pp.ack("seven")
    last = commit_n(pp, "t", 1, start=9)
    assert pp.proc("t", name="seven").id == last[0]


def test_offset_full_id_is_first_log_after_it(any_node):
    pp = any_node
    a = commit_n(pp, "t", 1)[0]
    wait_until(lambda: time.time() * 1000 > ms(a) + 2, what="clock moved")
    rest = commit_n(pp, "t", 3, start=1)
    assert ms(rest[0]) > ms(a)
    assert pp.proc("t", name="p1", offset=a).id == rest[0]
    assert pp.proc("t", name="p2", offset=rest[1]).id == rest[2]
    # the id need not exist: compared by (ms, seq)
    assert pp.proc("t", name="p3", offset=f"{ms(a)}-99").id == rest[0]
    assert pp.proc("t", name="p4", offset="0-0").id == a
    # after the last log: waits for the next one
    assert pp.proc("t", name="p5", offset=rest[2]) is None
    new = commit_n(pp, "t", 1, start=4)
    assert pp.proc("t", name="p5").id == new[0]


def test_offset_timestamp_is_first_log_with_ms_at_least(any_node):
    pp = any_node
    a = commit_n(pp, "t", 2)
    wait_until(lambda: time.time() * 1000 > ms(a[0]) + 2, what="clock moved")
    b = commit_n(pp, "t", 2, start=2)
    assert ms(b[0]) > ms(a[0])
    assert pp.proc("t", name="p1", offset=str(ms(a[0]))).id == a[0]
    assert pp.proc("t", name="p2", offset=str(ms(b[0]))).id == b[0]
    assert pp.proc("t", name="p3", offset=str(ms(a[0]) + 1)).id == b[0]
    assert pp.proc("t", name="p4", offset="0").id == a[0]
    got = pp.proc("t", name="p5", offset=str(ms(b[0])), count=5)
    assert ids_of(got) == b


BAD_OFFSETS = ["", "abc", ":", ":x", ":-1", "1-", "-1", "1-2-3", ">>", "$", "<", "1.5", "1-x"]


@pytest.mark.parametrize("offset", BAD_OFFSETS)
def test_invalid_offset_creates_nothing(any_node, offset):
    pp = any_node
    commit_n(pp, "t", 2)
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("t", name="p", offset=offset)
    assert e.value.code == "invalid_range_offset"
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.inspect_proc("p")
    assert e.value.code == "invalid_proc"
    assert "p" not in pp.stats()["procs"]
    # the name is still free, with a good offset
    assert pp.proc("t", name="p", offset=":1").body == {"i": 1}


# ---------------------------------------------------------------- ack_commit


def test_ack_commit_single_and_list(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 3)
    log = pp.proc("t", name="p")
    res = pp.ack_commit("p", {"topic": "out", "body": {"n": log.body["i"] + 1}})
    assert res.acked == rng(ids[0])
    assert isinstance(res.id, str) and seq(res.id) == 0
    assert res == pipeproc.AckCommit(acked=rng(ids[0]), id=res.id)
    assert pp.range("out") == [Log(res.id, {"n": 1})]
    st = pp.inspect_proc("p")
    assert st.last_acked_range == rng(ids[0]) and st.last_claimed_range == rng(ids[0])
    got = pp.proc("t", name="p", count=2)
    res = pp.ack_commit("p", [{"topic": "out", "body": {"n": 2}}, {"topic": "out2", "body": [1]},
                              {"topic": "out", "body": {"n": 3}}])
    assert res.acked == rng(ids[1], ids[2]) == rng(got[0].id, got[1].id)
    assert isinstance(res.id, list) and [seq(i) for i in res.id] == [1, 0, 2]
    assert [x.body for x in pp.range("out")] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert pp.range("out2") == [Log(res.id[1], [1])]
    # a one-element list still gives a list of ids
    commit_n(pp, "t", 1, start=3)
    pp.proc("t", name="p")
    res = pp.ack_commit("p", [{"topic": "out", "body": {"n": 4}}])
    assert isinstance(res.id, list) and len(res.id) == 1 and seq(res.id[0]) == 3
    assert pp.ack("p") == res.acked  # nothing pending: the last acked range


def test_ack_commit_without_pending_claim_is_invalid_ack_and_writes_nothing(any_node):
    pp = any_node
    commit_n(pp, "t", 2)
    pp.proc("t", name="p")  # claims log 0
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack_commit("fresh_never_claims", {"topic": "out", "body": {}})
    assert e.value.code == "invalid_proc"
    pp.proc("empty", name="q")  # exists, nothing to claim
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack_commit("q", {"topic": "out", "body": {"x": 1}})
    assert e.value.code == "invalid_ack"
    assert "out" not in pp.topics()
    # also when something was acked before (unlike ack)
    pp.ack("p")
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack_commit("p", [{"topic": "out", "body": {"x": 1}}, {"topic": "t", "body": {"x": 2}}])
    assert e.value.code == "invalid_ack"
    assert "out" not in pp.topics()
    assert pp.length("t") == 2


def test_ack_commit_bad_log_acks_nothing(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 1)
    pp.proc("t", name="p")
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack_commit("p", [{"topic": "out", "body": {"ok": 1}}, {"topic": "out", "body": None}])
    assert e.value.code == "invalid_log_format"
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack_commit("p", {"topic": "bad topic!", "body": {}})
    assert e.value.code == "invalid_topic_format"
    st = pp.inspect_proc("p")
    assert st.last_acked_range == "" and st.last_claimed_range == rng(ids[0])
    assert "out" not in pp.topics()
    assert pp.ack_commit("p", {"topic": "out", "body": {"ok": 2}}).acked == rng(ids[0])


# ---------------------------------------------------------------- claim identity


def test_claimed_identity_ack(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 6)
    log = pp.proc("t", name="p")
    before = state_dict(pp.inspect_proc("p"))
    for wrong in (Log(ids[1], {"i": 1}), [Log(ids[1], {"i": 1})], Log("1-12345", {"i": 0})):
        with pytest.raises(pipeproc.PipeProcError) as e:
            pp.ack("p", claimed=wrong)
        assert e.value.code == "stale_claim"
    assert state_dict(pp.inspect_proc("p")) == before
    assert pp.ack("p", claimed=log) == rng(ids[0])

    claim = pp.proc("t", name="p", count=3)
    before = state_dict(pp.inspect_proc("p"))
    for wrong in (claim[:2], claim[1:], claim[0], claim + [Log(ids[4], {"i": 4})], log):
        with pytest.raises(pipeproc.PipeProcError) as e:
            pp.ack("p", claimed=wrong)
        assert e.value.code == "stale_claim"
        with pytest.raises(pipeproc.PipeProcError) as e:
            pp.reclaim("p", claimed=wrong)
        assert e.value.code == "stale_claim"
        with pytest.raises(pipeproc.PipeProcError) as e:
            pp.ack_commit("p", {"topic": "out", "body": {}}, claimed=wrong)
        assert e.value.code == "stale_claim"
    assert state_dict(pp.inspect_proc("p")) == before
    assert "out" not in pp.topics()
    assert pp.reclaim("p", claimed=list(claim)) == rng(ids[0])
    assert pp.inspect_proc("p").reclaims == 1
    claim = pp.proc("t", name="p", count=3)
    assert ids_of(claim) == ids[1:4]
    res = pp.ack_commit("p", {"topic": "out", "body": {"done": 3}}, claimed=claim)
    assert res.acked == rng(ids[1], ids[3])
    assert pp.length("out") == 1


def test_claimed_with_nothing_pending(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 2)
    log = pp.proc("t", name="p")
    pp.ack("p", claimed=log)
    # the claim was acked: acking it again with claimed= is not the pending claim
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack("p", claimed=log)
    assert e.value.code == "stale_claim"
    assert pp.ack("p") == rng(ids[0])
    assert pp.inspect_proc("p").last_acked_range == rng(ids[0])
    assert pp.proc("t", name="p").id == ids[1]


def test_stale_holder_after_timeout_and_reissue(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 3)
    holder_a = pp.proc("t", name="p", reclaim_timeout=0.5)
    assert holder_a.id == ids[0]
    wait_until(lambda: pp.inspect_proc("p").reclaims == 1, what="claim timed out")
    holder_b = pp.proc("t", name="p")
    assert holder_b == holder_a  # re-issued to B
    assert pp.ack("p", claimed=holder_b) == rng(ids[0])
    holder_b2 = pp.proc("t", name="p")
    assert holder_b2.id == ids[1]
    # A wakes up and acks its old claim: refused, nothing changes
    before = state_dict(pp.inspect_proc("p"))
    for call in (lambda: pp.ack("p", claimed=holder_a),
                 lambda: pp.ack_commit("p", {"topic": "out", "body": {}}, claimed=holder_a),
                 lambda: pp.reclaim("p", claimed=holder_a)):
        with pytest.raises(pipeproc.PipeProcError) as e:
            call()
        assert e.value.code == "stale_claim"
    after = state_dict(pp.inspect_proc("p"))
    assert after == before
    assert after["last_acked_range"] == rng(ids[0])
    assert after["last_claimed_range"] == rng(ids[1])
    assert "out" not in pp.topics()
    assert pp.ack("p", claimed=holder_b2) == rng(ids[1])


# ---------------------------------------------------------------- reclaim timeout


def test_claim_times_out_without_anyone_calling(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 2)
    t0 = time.monotonic()
    log = pp.proc("t", name="p", reclaim_timeout=0.5, max_reclaims=10)
    st = wait_until(lambda: (s := pp.inspect_proc("p")).reclaims >= 1 and s, timeout=10,
                    what="automatic reclaim")
    assert time.monotonic() - t0 >= 0.45
    assert st.reclaims == 1 and st.status == "active"
    assert st.last_claimed_range == st.last_acked_range == ""
    assert pp.stats()["procs"]["p"]["status"] == "active"
    again = pp.proc("t", name="p")
    assert again == log
    assert pp.inspect_proc("p").reclaims == 1
    wait_until(lambda: pp.inspect_proc("p").reclaims == 2, what="second automatic reclaim")
    third = pp.proc("t", name="p")
    assert third == log
    with pytest.raises(pipeproc.StaleClaim):  # the same logs, another claim (SPEC §5)
        pp.ack("p", claimed=log)
    assert pp.ack("p", claimed=third) == rng(ids[0])
    assert pp.inspect_proc("p").reclaims == 0


def test_timeout_counts_toward_max_reclaims(any_node):
    pp = any_node
    commit_n(pp, "t", 1)
    pp.proc("t", name="p", reclaim_timeout=0.2, max_reclaims=1)
    st = wait_until(lambda: (s := pp.inspect_proc("p")).status == "disabled" and s,
                    what="disabled by timeout")
    assert st.reclaims == 1
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("t", name="p")
    assert e.value.code == "proc_is_disabled"


def test_timed_out_claim_is_redelivered_by_next_proc_call(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 4)
    claim = pp.proc("t", name="p", reclaim_timeout=0.3, count=2)
    deadline = time.monotonic() + 10
    again = None
    while again is None and time.monotonic() < deadline:
        again = pp.proc("t", name="p", count=2)
        time.sleep(0.02)
    assert again == claim and ids_of(again) == ids[:2]
    assert pp.inspect_proc("p").reclaims == 1


def test_a_claim_made_before_the_previous_claims_timer_fires_still_times_out(any_node):
    """One reclaim timer per proc: the timer of an acked claim re-arms itself for the
    proc's next claim, which then times out at its own deadline, not earlier."""
    pp = any_node
    ids = commit_n(pp, "t", 3)
    first = pp.proc("t", name="p", reclaim_timeout=0.6, max_reclaims=10)
    pp.ack("p", claimed=first)
    time.sleep(0.3)  # the first claim's timer is still pending (fires at ~0.6 s)
    t1 = time.monotonic()
    second = pp.proc("t", name="p")
    assert second.id == ids[1]
    st = wait_until(lambda: (s := pp.inspect_proc("p")).reclaims >= 1 and s, timeout=10,
                    what="the second claim timing out")
    assert time.monotonic() - t1 >= 0.55  # its own deadline, not the first claim's
    assert st.last_acked_range == rng(ids[0])
    assert pp.proc("t", name="p") == second  # redelivered


def test_a_proc_created_again_with_a_shorter_timeout_times_out_at_its_own_deadline(any_node):
    pp = any_node
    commit_n(pp, "t", 2)
    pp.proc("t", name="p", reclaim_timeout=30.0)  # a pending claim with a far deadline
    pp.destroy_proc("p")
    t0 = time.monotonic()
    claim = pp.proc("t", name="p", reclaim_timeout=0.3, max_reclaims=10)
    wait_until(lambda: pp.inspect_proc("p").reclaims >= 1, timeout=10,
               what="the new proc's claim timing out")
    assert time.monotonic() - t0 < 10
    assert pp.proc("t", name="p") == claim


def test_disabled_claim_does_not_time_out(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 1)
    commit_n(pp, "u", 1)
    pp.proc("t", name="p", reclaim_timeout=0.3)
    pp.disable_proc("p")
    pp.proc("u", name="probe", reclaim_timeout=0.3)  # claimed after p: times out after it
    wait_until(lambda: pp.inspect_proc("probe").reclaims >= 1, what="probe timed out")
    time.sleep(0.3)
    st = pp.inspect_proc("p")
    assert st.status == "disabled"
    assert st.reclaims == 0
    assert st.last_claimed_range == rng(ids[0]) and st.last_acked_range == ""


# ---------------------------------------------------------------- destroy


def test_destroy_returns_last_state_and_only_that_proc(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc)
    ids = commit_n(pp, "t", 5)
    for name in ("p", "p1", "p10", "q"):
        pp.proc("t", name=name)
        pp.ack(name)
    pp.proc("t", name="p", count=2)
    pp.proc("t", name="p10")
    expect_p = state_dict(pp.inspect_proc("p"))
    others = {n: state_dict(pp.inspect_proc(n)) for n in ("p1", "p10", "q")}
    st = pp.destroy_proc("p")
    assert state_dict(st) == expect_p
    assert st.last_acked_range == rng(ids[0]) and st.last_claimed_range == rng(ids[1], ids[2])
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.inspect_proc("p")
    assert e.value.code == "invalid_proc"
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.destroy_proc("p")
    assert e.value.code == "invalid_proc"
    assert "p" not in pp.stats()["procs"]
    for n, s in others.items():
        assert state_dict(pp.inspect_proc(n)) == s
    assert pp.length("t") == 5 and len(pp.range("t")) == 5  # logs untouched
    pp.shutdown()
    pp = spawner(loc)
    for n, s in others.items():
        assert state_dict(pp.inspect_proc(n)) == s
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.inspect_proc("p")
    assert e.value.code == "invalid_proc"
    assert pp.proc("t", name="p1").id == ids[1]
    assert pp.ack("p10") == rng(ids[1])


def test_destroyed_proc_starts_fresh(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 3)
    pp.proc("t", name="p", offset=":1", max_reclaims=3)
    pp.ack("p")
    pp.proc("t", name="p")
    pp.reclaim("p")
    pp.destroy_proc("p")
    # a new proc, with the options of this call
    log = pp.proc("t", name="p", offset=">", max_reclaims=7)
    assert log.id == ids[0]
    st = pp.inspect_proc("p")
    assert st.offset == ">" and st.max_reclaims == 7 and st.reclaims == 0
    assert st.last_acked_range == "" and st.previous_claimed_range == ""
    assert st.last_claimed_range == rng(ids[0])


# ---------------------------------------------------------------- ProcState


def test_proc_state_attributes(any_node):
    pp = any_node
    t_before = int(time.time() * 1000)
    assert pp.proc("t", name="p", offset="$>", count=2, max_reclaims=4, reclaim_timeout=5.0,
                   on_max_reclaims_reached="continue") is None
    st = pp.inspect_proc("p")
    for f in STATE_FIELDS:
        assert hasattr(st, f), f
    assert st.name == "p" and st.topic == "t" and st.offset == "$>"
    assert st.status == "active" and st.reclaims == 0
    assert st.max_reclaims == 4 and st.reclaim_timeout == 5.0
    assert st.on_max_reclaims_reached == "continue"
    assert isinstance(st.created_at, int)
    assert t_before - 5000 <= st.created_at <= int(time.time() * 1000) + 5000
    assert st.last_claimed_at == 0 and st.last_acked_at == 0
    assert st.last_claimed_range == "" == st.last_acked_range == st.previous_claimed_range

    ids = commit_n(pp, "t", 5)
    pp.proc("t", name="p", count=2)
    st = pp.inspect_proc("p")
    assert st.last_claimed_range == rng(ids[0], ids[1])
    assert st.previous_claimed_range == ""
    assert st.last_claimed_at >= st.created_at and st.last_acked_at == 0
    pp.ack("p")
    st = pp.inspect_proc("p")
    assert st.last_acked_range == rng(ids[0], ids[1]) == st.last_claimed_range
    assert st.last_acked_at >= st.last_claimed_at
    pp.proc("t", name="p", count=2)
    st = pp.inspect_proc("p")
    assert st.last_claimed_range == rng(ids[2], ids[3])
    assert st.previous_claimed_range == rng(ids[0], ids[1])
    pp.reclaim("p")
    st = pp.inspect_proc("p")
    assert st.previous_claimed_range == rng(ids[0], ids[1])  # left as it was
    assert st.last_claimed_range == rng(ids[0], ids[1])
    assert st.reclaims == 1

    defaults_log = pp.proc("t", name="d")
    assert defaults_log.id == ids[0]
    d = pp.inspect_proc("d")
    assert d.offset == ">" and d.max_reclaims == 10 and d.reclaim_timeout == 10.0
    assert d.on_max_reclaims_reached == "disable"
    assert d.last_claimed_range == rng(ids[0])


# ---------------------------------------------------------------- error order & arguments


def test_error_check_order(any_node):
    pp = any_node
    commit_n(pp, "t", 2)
    # arguments before invalid_proc
    assert code_of(pp.ack, "nope", claimed=42) == "invalid_argument"
    assert code_of(pp.reclaim, "nope", claimed="x") == "invalid_argument"
    assert code_of(pp.ack_commit, "nope", {"topic": "bad topic!", "body": {}}) \
        == "invalid_topic_format"
    assert code_of(pp.ack_commit, "nope", {"topic": "ok", "body": object()}) \
        == "invalid_log_format"
    assert code_of(pp.ack, "") == "invalid_proc_name"
    assert code_of(pp.inspect_proc, "a\x00b") == "invalid_proc_name"
    assert code_of(pp.ack, "nope") == "invalid_proc"
    # invalid_proc before state errors
    assert code_of(pp.ack, "nope", claimed=Log("1-0", {})) == "invalid_proc"
    assert code_of(pp.reclaim, "nope", claimed=Log("1-0", {})) == "invalid_proc"
    # proc_is_disabled before nothing_to_reclaim / stale_claim; arguments before it
    pp.proc("t", name="dis")
    pp.ack("dis")
    pp.disable_proc("dis")
    assert code_of(pp.reclaim, "dis") == "proc_is_disabled"
    assert code_of(pp.reclaim, "dis", claimed=Log("1-0", {})) == "proc_is_disabled"
    assert code_of(pp.proc, "t", name="dis", count=0) == "invalid_argument"
    assert code_of(pp.proc, "t", name="dis") == "proc_is_disabled"
    # state errors: nothing_to_reclaim / invalid_ack before stale_claim
    pp.proc("t", name="idle", offset=":5")  # nothing to claim yet
    assert code_of(pp.reclaim, "idle", claimed=Log("1-0", {})) == "nothing_to_reclaim"
    assert code_of(pp.ack, "idle", claimed=Log("1-0", {})) == "invalid_ack"
    assert code_of(pp.ack_commit, "idle", {"topic": "o", "body": {}},
                   claimed=Log("1-0", {})) == "invalid_ack"
    assert "o" not in pp.topics()


BAD_OPTIONS = [
    {"count": 0}, {"count": -1}, {"count": 1.5}, {"count": "2"},
    {"max_reclaims": 0}, {"max_reclaims": -2}, {"max_reclaims": 1.5},
    {"reclaim_timeout": 0}, {"reclaim_timeout": -2}, {"reclaim_timeout": "1"},
    {"on_max_reclaims_reached": "explode"}, {"on_max_reclaims_reached": None},
]


@pytest.mark.parametrize("opts", BAD_OPTIONS, ids=lambda o: repr(o))
def test_bad_options_are_invalid_argument(any_node, opts):
    pp = any_node
    commit_n(pp, "t", 1)
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("t", name="p", **opts)
    assert e.value.code == "invalid_argument"
    assert isinstance(e.value, ValueError)
    assert code_of(pp.inspect_proc, "p") == "invalid_proc"  # nothing created


def test_good_edge_options(any_node):
    pp = any_node
    commit_n(pp, "t", 1)
    assert pp.proc("t", name="a", max_reclaims=1, reclaim_timeout=-1).body == {"i": 0}
    assert pp.proc("t", name="b", max_reclaims=-1, reclaim_timeout=None).body == {"i": 0}
    assert ids_of(pp.proc("t", name="c", reclaim_timeout=30, count=1000)) == [pp.range("t")[0].id]
    assert pp.inspect_proc("b").max_reclaims == -1


BAD_NAMES = ["", "x" * 201, "a\nb", "a\x00b", "tab\there", "del\x7f", "esc\x1b[0m"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n)[:20])
def test_bad_proc_names(any_node, name):
    pp = any_node
    commit_n(pp, "t", 1)
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("t", name=name)
    assert e.value.code == "invalid_proc_name"
    assert pp.stats()["procs"] == {}


def test_unusual_but_valid_proc_names(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 1)
    names = ["x" * 200, "with space", "ünïcødé-名前", "a/b:c..d", "p#t#q", "-"]
    for n in names:
        assert pp.proc("t", name=n).id == ids[0]
        assert pp.ack(n) == rng(ids[0])
        assert pp.inspect_proc(n).name == n
    assert set(names) <= set(pp.stats()["procs"])


def test_bad_topic_on_proc(any_node):
    pp = any_node
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("bad topic!", name="p")
    assert e.value.code == "invalid_topic_format"
    assert code_of(pp.inspect_proc, "p") == "invalid_proc"


# ---------------------------------------------------------------- wait_for_procs


def test_wait_for_procs_returns_when_all_done(any_node):
    pp = any_node
    assert pp.proc("t", name="p") is None  # create before there is work
    ids = commit_n(pp, "t", 6)
    errors: list[BaseException] = []
    acked: list[str] = []

    def consume():
        try:
            deadline = time.monotonic() + 30
            while len(acked) < len(ids) and time.monotonic() < deadline:
                log = pp.proc("t", name="p")
                if log is None:
                    time.sleep(0.01)
                    continue
                time.sleep(0.03)  # "work"
                pp.ack("p", claimed=log)
                acked.append(log.id)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    th = threading.Thread(target=consume, daemon=True)
    th.start()
    try:
        pp.wait_for_procs(["p"], timeout=30)
        # everything done when it returned: the node holds the last ack, nothing pending
        # (the consumer's own list may lag: its ack reply and our wake-up race)
        state = pp.inspect_proc("p")
        assert state.last_acked_range == rng(ids[-1])
        assert state.last_claimed_range == state.last_acked_range
    finally:
        th.join(30)
    assert acked == ids
    assert not errors, errors


def test_wait_for_procs_default_all(any_node):
    pp = any_node
    pp.proc("a", name="pa")
    pp.proc("b", name="pb")
    commit_n(pp, "a", 3)
    commit_n(pp, "b", 3)
    errors: list[BaseException] = []

    def consume():
        try:
            for _ in range(3):
                for t, n in (("a", "pa"), ("b", "pb")):
                    pp.proc(t, name=n)
                    time.sleep(0.02)
                    pp.ack(n)
        except BaseException as e:
            errors.append(e)

    th = threading.Thread(target=consume, daemon=True)
    th.start()
    try:
        pp.wait_for_procs(timeout=30)
        assert pp.proc("a", name="pa") is None and pp.proc("b", name="pb") is None
        assert pp.stats()["procs"]["pa"]["lag"] == 0
        assert pp.stats()["procs"]["pb"]["lag"] == 0
    finally:
        th.join(30)
    assert not errors, errors


def test_wait_for_procs_times_out(any_node):
    pp = any_node
    pp.proc("t", name="p")
    commit_n(pp, "t", 2)
    t0 = time.monotonic()
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.wait_for_procs(["p"], timeout=0.3)
    assert e.value.code == "timeout"
    assert isinstance(e.value, TimeoutError)
    assert 0.2 <= time.monotonic() - t0 < 10
    # a pending claim with nothing else left is still work in progress
    pp.proc("t", name="p", count=2)
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.wait_for_procs(timeout=0.3)
    assert e.value.code == "timeout"
    pp.ack("p")
    pp.wait_for_procs(["p"], timeout=5)
    pp.wait_for_procs(timeout=5)


def test_wait_for_procs_ignores_unknown_disabled_and_topicless(any_node):
    pp = any_node
    commit_n(pp, "t", 3)
    pp.proc("t", name="dis")
    pp.disable_proc("dis")  # disabled, with work and a pending claim
    pp.proc("no_such_topic", name="lonely")
    t0 = time.monotonic()
    pp.wait_for_procs(["unknown", "dis", "lonely"], timeout=5)
    pp.wait_for_procs(timeout=5)
    assert time.monotonic() - t0 < 4


# ---------------------------------------------------------------- available_proc


def test_available_proc_creates_then_round_robins(any_node):
    pp = any_node
    a = commit_n(pp, "ta", 4)
    b = commit_n(pp, "tb", 4)
    specs = [{"topic": "ta", "name": "pa", "offset": ">"},
             {"topic": "tb", "name": "pb", "offset": ">", "count": 1}]
    name, log = pp.available_proc(specs)
    assert name == "pa" and log.id == a[0]  # first listed, created
    assert pp.inspect_proc("pa").topic == "ta"
    # pa now has a pending claim; pb does not exist yet: created and served
    name, log = pp.available_proc(specs)
    assert name == "pb" and log.id == b[0]
    assert pp.available_proc(specs) is None  # both hold a pending claim
    pp.ack("pa")
    pp.ack("pb")
    served: dict[str, list[str]] = {"pa": [a[0]], "pb": [b[0]]}
    order = []
    while True:
        got = pp.available_proc(specs)
        if got is None:
            break
        name, log = got
        order.append(name)
        served[name].append(log.id)
        pp.ack(name, claimed=log)
        assert len(order) <= 6
    assert served == {"pa": a, "pb": b}
    # round robin: while both have work, neither is served twice in a row
    assert order[:6].count("pa") == 3
    for x, y in zip(order, order[1:]):
        assert x != y, order


def test_available_proc_count_and_options(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 5)
    specs = [{"topic": "t", "name": "p", "offset": ":1", "count": 3, "max_reclaims": 2}]
    name, logs = pp.available_proc(specs)
    assert name == "p" and isinstance(logs, list) and ids_of(logs) == ids[1:4]
    st = pp.inspect_proc("p")
    assert st.offset == ":1" and st.max_reclaims == 2
    assert pp.available_proc(specs) is None
    pp.ack("p", claimed=logs)
    name, logs = pp.available_proc(specs)
    assert ids_of(logs) == ids[4:5] and isinstance(logs, list)
    pp.ack("p")
    assert pp.available_proc(specs) is None


# ---------------------------------------------------------------- stats


def test_stats_procs(any_node):
    pp = any_node
    pp.proc("t", name="p")
    st = pp.stats()["procs"]["p"]
    assert st["topic"] == "t" and st["status"] == "active" and st["lag"] == 0
    commit_n(pp, "t", 5)
    assert pp.stats()["procs"]["p"]["lag"] == 5
    pp.proc("t", name="p", count=2)
    assert pp.stats()["procs"]["p"]["lag"] == 5  # claimed, not yet acked
    pp.ack("p")
    assert pp.stats()["procs"]["p"]["lag"] == 3
    pp.disable_proc("p")
    st = pp.stats()["procs"]["p"]
    assert st["status"] == "disabled" and st["lag"] == 3
    pp.resume_proc("p")
    pp.proc("t", name="p", count=10)
    pp.ack("p")
    st = pp.stats()["procs"]["p"]
    assert (st["topic"], st["status"], st["lag"]) == ("t", "active", 0)
    pp.destroy_proc("p")
    assert "p" not in pp.stats()["procs"]


# ---------------------------------------------------------------- persistence


def test_procs_persist_across_restart(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc)
    ids = commit_n(pp, "t", 6)
    pp.proc("t", name="acked", count=2, max_reclaims=3, reclaim_timeout=20.0,
            on_max_reclaims_reached="continue")
    pp.ack("acked")
    pp.proc("t", name="acked", count=1)
    pp.ack("acked")
    pp.proc("t", name="dis", offset=":3")
    pp.ack("dis")
    pp.disable_proc("dis")
    pp.proc("t", name="reclaimed", max_reclaims=5)
    pp.reclaim("reclaimed")
    pending = pp.proc("t", name="pending", offset=":4", count=2, reclaim_timeout=-1)
    pp.proc("t", name="future", offset="$>")
    pp.proc("not_yet", name="topicless")
    names = ["acked", "dis", "reclaimed", "pending", "future", "topicless"]
    before = {n: state_dict(pp.inspect_proc(n)) for n in names}
    pp.shutdown()

    pp = spawner(loc)
    after = {n: state_dict(pp.inspect_proc(n)) for n in names}
    assert after == before
    assert set(names) <= set(pp.stats()["procs"])
    assert pp.proc("t", name="acked").id == ids[3]
    assert code_of(pp.proc, "t", name="dis") == "proc_is_disabled"
    assert pp.resume_proc("dis").status == "active"
    assert pp.proc("t", name="dis").id == ids[4]
    assert pp.proc("t", name="reclaimed").id == ids[0]
    assert pp.inspect_proc("reclaimed").reclaims == 1
    assert pp.proc("t", name="pending") is None  # still pending after the restart
    assert pp.ack("pending", claimed=pending) == rng(ids[4], ids[5])
    assert pp.proc("t", name="future") is None
    new = commit_n(pp, "t", 1, start=6)
    assert pp.proc("t", name="future").id == new[0]
    assert code_of(pp.proc, "other", name="topicless") == "proc_name_not_unique"
    n = commit_n(pp, "not_yet", 1)
    assert pp.proc("not_yet", name="topicless").id == n[0]


def test_claim_timeout_survives_restart(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc)
    ids = commit_n(pp, "t", 2)
    log = pp.proc("t", name="p", reclaim_timeout=0.5)
    pp.shutdown()
    pp = spawner(loc)
    st = wait_until(lambda: (s := pp.inspect_proc("p")).reclaims == 1 and s, what="timed out")
    assert st.last_claimed_range == "" and st.status == "active"
    again = pp.proc("t", name="p")
    assert again == log
    assert pp.ack("p", claimed=again) == rng(ids[0])


# ---------------------------------------------------------------- concurrency


def test_one_pending_claim_under_concurrent_callers(any_node):
    pp = any_node
    other = pipeproc.connect(address=pp.address, authkey=pp.authkey)
    try:
        ids = commit_n(pp, "t", 4)
        pp.proc("t", name="p", count=1)  # create
        pp.ack("p")
        delivered: list[str] = []
        for _ in range(3):
            barrier = threading.Barrier(8)
            results: list = []
            errors: list[BaseException] = []

            def worker(client):
                try:
                    barrier.wait(10)
                    results.append(client.proc("t", name="p"))
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=worker, args=(pp if i % 2 else other,))
                       for i in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
            assert not errors, errors
            got = [r for r in results if r is not None]
            assert len(got) == 1, results
            delivered.append(got[0].id)
            assert other.ack("p", claimed=got[0]) == rng(got[0].id)  # ack from another client
        assert delivered == ids[1:4]
    finally:
        other.close()


def test_wait_for_procs_returns_when_proc_destroyed_or_disabled(any_node):
    pp = any_node
    commit_n(pp, "t", 3)
    for name, end in (("gone", pp.destroy_proc), ("off", pp.disable_proc)):
        pp.proc("t", name=name)
        done = threading.Event()
        errors: list[BaseException] = []

        def waiter(n=name):
            try:
                pp.wait_for_procs([n], timeout=20)
            except BaseException as e:
                errors.append(e)
            finally:
                done.set()

        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        time.sleep(0.2)
        assert not done.is_set()  # the proc has work: still waiting
        end(name)
        assert done.wait(10), f"wait_for_procs not released by {end.__name__}"
        th.join(10)
        assert not errors, errors


def test_available_proc_argument_errors(any_node):
    pp = any_node
    commit_n(pp, "t", 1)
    for specs in ([{"topic": "t"}], [{"name": "p"}], [{"topic": "t", "name": "p", "count": 0}],
                  [{"topic": "t", "name": "p", "offset": "bogus"}]):
        with pytest.raises(pipeproc.PipeProcError) as e:
            pp.available_proc(specs)
        assert isinstance(e.value, ValueError), e.value
    assert code_of(pp.inspect_proc, "p") == "invalid_proc"
    assert pp.available_proc([{"topic": "t", "name": "p"}])[1].body == {"i": 0}


# ---------------------------------------------------------------- hostile arguments


def within(seconds: float, fn, *args, **kw):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it takes too long."""
    out: dict = {}

    def go():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():
        raise AssertionError(f"{getattr(fn, '__name__', fn)} hung for more than {seconds}s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_claimed_list_with_a_wrong_middle_log_is_stale(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 3)
    claim = pp.proc("t", name="p", count=3)
    forged = Log(f"{ms(ids[1]) + 5}-{seq(ids[1])}", claim[1].body)  # same seq, other id
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.ack("p", claimed=[claim[0], forged, claim[2]])
    assert e.value.code == "stale_claim"
    assert pp.inspect_proc("p").last_acked_range == ""
    assert pp.ack("p", claimed=claim) == rng(ids[0], ids[2])


def test_infinite_reclaim_timeout_does_not_wedge_the_node(any_node):
    pp = any_node
    ids = commit_n(pp, "t", 2)
    try:
        log = within(5, pp.proc, "t", name="p", reclaim_timeout=float("inf"))
    except pipeproc.PipeProcError as e:  # refusing it is fine too
        assert e.code == "invalid_argument"
    else:
        assert log.id == ids[0]
    # whatever the answer, the node keeps serving everyone
    assert seq(within(5, pp.commit, {"topic": "t", "body": {"i": 2}})) == 2
    assert within(5, pp.proc, "t", name="q").id == ids[0]
    assert within(5, pp.ack, "q") == rng(ids[0])


@pytest.mark.parametrize("opts", [{"count": 2**70}, {"max_reclaims": 2**70},
                                  {"reclaim_timeout": 1e300}, {"count": 2**40}])
def test_huge_options_fail_cleanly_or_work(any_node, opts):
    pp = any_node
    ids = commit_n(pp, "t", 2)
    try:
        got = within(5, pp.proc, "t", name="p", **opts)
    except pipeproc.PipeProcError as e:
        assert e.code == "invalid_argument", e
    else:
        assert ids_of(got) == (ids if opts.get("count", 1) > 1 else ids[:1])
    assert within(5, pp.proc, "t", name="q").id == ids[0]


def test_unencodable_proc_name_is_a_pipeproc_error(any_node):
    pp = any_node
    commit_n(pp, "t", 1)
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.proc("t", name="a\ud800b")  # a lone surrogate: not valid text
    assert e.value.code in ("invalid_proc_name", "invalid_argument")
    assert pp.stats()["procs"] == {}


def test_available_proc_serves_only_listed_active_procs(any_node):
    pp = any_node
    commit_n(pp, "t", 3)
    pp.proc("t", name="manual")  # not listed: has work after its ack, never served
    pp.ack("manual")
    pp.proc("t", name="off")
    pp.ack("off")
    pp.disable_proc("off")  # listed but disabled
    specs = [{"topic": "t", "name": "off"}, {"topic": "t", "name": "w"}]
    served = []
    while (got := pp.available_proc(specs)) is not None:
        served.append((got[0], got[1].id))
        pp.ack(got[0], claimed=got[1])
        assert len(served) <= 3
    assert [n for n, _ in served] == ["w"] * 3
    assert pp.inspect_proc("manual").last_acked_range.endswith(pp.range("t")[0].id)
    assert pp.inspect_proc("off").status == "disabled"
