"""SPEC §1-8 on both backends (SCALE.md §2: "What is the same"): every test here runs once on
a fresh LMDB node and once on a fresh namespace of a private ``redis-server`` (the ``both``
fixture of conftest.py; the Redis half is skipped, with the reason, without a
``redis-server``).

Most of the behaviour tests of this project are already written against a client only (the
``any_node`` / ``node`` fixtures, no node-specific calls). They are not copied here: the
tables below name them, and each runs with the client of the backend under test, so that the
two backends are held to the very same assertions, and a later change to one of those tests
applies to both. Tests that only read a prepared topic share one store per backend and module
(``shared_stepped``, ``shared_seeded``, ``shared_store``) instead of preparing it per test.
The tests written here are those whose original needs the node (a second client by
address, a restart) or that nothing covered yet.

Left out on purpose: restarts of the store (``test_procs_persist_across_restart`` ... : a
Redis namespace has no restart; the Redis-only tests kill and restart the server instead),
node processes, locations, sockets and the GC (SCALE.md §3: its timers differ).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, Iterable, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeproc
from pipeproc import Log
from helpers import wait_until
from redis_server import fresh_namespace

import test_bad_input as tb
import test_bounds_model as bm
import test_commit_read as cr
import test_gc as tg
import test_live_procs as tl
import test_procs as tp
import test_sysproc_failures as tsf
import test_sysproc_update as tsu
import test_system_procs as tsp

pytestmark = pytest.mark.timeout(60)

lives = tl.lives  # the fixture: live procs a test opens, cancelled at its end
Reader = tl.Reader


def _cases(module: Any, names: Iterable[str]) -> List[Any]:
    """``pytest.param`` of the named test functions of ``module`` (id: the function's name)."""
    return [pytest.param(getattr(module, n), id=n) for n in names]


def _with(module: Any, name: str, arg: str, values: Iterable[Any],
          ids: Callable[[int, Any], str] = lambda i, v: str(i)) -> List[Any]:
    """One case per value of a test parametrized over ``arg`` in its own module."""
    fn = getattr(module, name)
    return [pytest.param(functools.partial(fn, **{arg: v}), id=f"{name}[{ids(i, v)}]")
            for i, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------
# stores shared by read-only tests: one per backend and module
# ---------------------------------------------------------------------------------------------


def _shared(request: Any, tmp_path_factory: Any, label: str):
    """A client of a fresh store of the backend ``request.param`` that lives for the module
    (a node with no workers, or a fresh namespace of the session's redis-server)."""
    if request.param == "node":
        pp = pipeproc.spawn(tmp_path_factory.mktemp(label) / "store", workers=0)
        return pp, pp.shutdown
    server = request.getfixturevalue("redis_server")
    pp = pipeproc.connect(redis=server.url(), namespace=fresh_namespace(label))
    return pp, pp.close


@pytest.fixture(scope="module", params=["node", "redis"])
def shared_stepped(request, tmp_path_factory):
    """test_commit_read's stepped topic "t" (three batches at three ms) on each backend."""
    pp, end = _shared(request, tmp_path_factory, "stepped")
    try:
        yield cr._make_stepped(pp)
    finally:
        end()


@pytest.fixture(scope="module", params=["node", "redis"])
def shared_seeded(request, tmp_path_factory):
    """test_bad_input's seeded store (topic "t" and a sentinel topic) on each backend."""
    pp, end = _shared(request, tmp_path_factory, "seeded")
    try:
        yield tb._seed(pp)
    finally:
        end()


@pytest.fixture(scope="module", params=["node", "redis"])
def shared_store(request, tmp_path_factory):
    """An empty store on each backend, for tests that use topics of their own."""
    pp, end = _shared(request, tmp_path_factory, "shared")
    try:
        yield pp
    finally:
        end()


# ---------------------------------------------------------------------------------------------
# SPEC §1, §2, §4: commit, ids, bodies, topics, range (tests of test_commit_read / test_bad_input)
# ---------------------------------------------------------------------------------------------

COMMIT_READ = _cases(cr, [
    "test_commit_single_returns_id_string",
    "test_commit_list_always_returns_list",
    "test_per_topic_sequences_from_zero",
    "test_batch_shares_one_ms_and_ms_never_decreases",
    "test_ids_returned_match_range",
    "test_logs_are_log_namedtuples",
    "test_body_value_types_preserved",
    "test_tuples_come_back_as_lists",
    "test_batch_bodies_round_trip_in_order",
    "test_8mib_body_round_trips",
    "test_topics_and_length",
    "test_iter_range_partial_consumption",
    "test_node_keeps_running_after_read_errors",
]) + _with(cr, "test_batch_with_one_invalid_log_writes_nothing", "bad", [
    {"topic": "bad topic", "body": {}}, {"topic": "ok", "body": {1, 2}},
    {"topic": "ok", "body": None}, {"topic": "ok"}, {"topic": "", "body": {}},
]) + _with(cr, "test_body_round_trip", "body", cr.ROUND_TRIP) + _with(
    cr, "test_unknown_topic_is_invalid_topic", "call",
    ["range", "revrange", "length", "iter_range"], ids=lambda i, v: v,
) + _cases(tb, ["test_good_topic_names", "test_limits_of_ints_are_accepted"])


@pytest.mark.parametrize("case", COMMIT_READ)
def test_commit_and_read(both, case):
    case(both)


STEPPED = _cases(cr, [
    "test_range_whole_topic",
    "test_range_full_id_bounds",
    "test_range_full_id_need_not_exist",
    "test_range_timestamp_bounds_inclusive",
    "test_range_seq_bounds",
    "test_mixed_bound_forms",
    "test_seq_bounds_are_per_topic",
    "test_limit_from_starting_side",
    "test_wrong_order_gives_empty",
    "test_revrange_bodies_and_full_ids",
    "test_iter_range_is_lazy_iterator_matching_range",
]) + _with(cr, "test_seq_bound_that_does_not_exist", "bound",
           [":9", ":100", ":18446744073709551615"], ids=lambda i, v: v) + _with(
    cr, "test_no_limit_values", "limit", [None, 0, -1, -100], ids=lambda i, v: str(v),
) + _with(cr, "test_bad_bound_strings", "bad", cr.BAD_BOUNDS) + _with(
    cr, "test_non_string_bounds_are_invalid_argument", "bad",
    [0, 5, 1.5, b"1-0", [":1"], (":0",), {"a": 1}, True],
)


@pytest.mark.parametrize("case", STEPPED)
def test_range_bounds(shared_stepped, case):
    case(shared_stepped)


def test_revrange_limit_1_is_newest(both):
    cr.test_revrange_limit_1_is_newest(cr._make_stepped(both))


SEEDED = _with(tb, "test_bad_topic_names", "topic", tb.BAD_TOPICS) + _with(
    tb, "test_non_string_topics", "topic", [None, 5, b"t", ["t"], 1.5],
) + [pytest.param(functools.partial(tb.test_unsupported_bodies, body=b, type_name=t),
                  id=f"test_unsupported_bodies[{t}{i}]")
     for i, (b, t) in enumerate(tb.BAD_BODIES)] + _cases(tb, [
         "test_missing_topic", "test_missing_body",
     ]) + _with(tb, "test_logs_that_are_not_mappings", "log",
                [5, "t", None, b"log", 1.5, ["t", {}], ("t", {})]) + _with(
    tb, "test_commit_argument_not_a_log_or_list", "arg", [5, "t", None, b"x", 1.5],
) + _with(tb, "test_bad_limit", "limit", ["5", 1.5, [1], {"n": 1}, b"1"]) + _with(
    tb, "test_huge_limit_and_page_size", "value", [2**63, 2**64, 2**70, -(2**70)],
) + _with(tb, "test_bad_page_size", "page_size", [0, -1, "10", 1.5, [10]])


@pytest.mark.parametrize("case", SEEDED)
def test_bad_input_writes_nothing(shared_seeded, case):
    case(shared_seeded)


def _model(test):
    """A test of test_bounds_model run with fewer examples (its own settings are for the node
    suite; the model is the same)."""
    inner = test.hypothesis.inner_test
    return settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])(
        given(plan=bm.plan_strategy, data=st.data())(inner))


_range_matches_model = _model(bm.test_range_matches_model)
_mirror_images = _model(bm.test_range_and_revrange_are_mirror_images)


def test_range_matches_the_model(shared_store):
    _range_matches_model(shared_store)


def test_range_and_revrange_are_mirror_images(shared_store):
    _mirror_images(shared_store)


def test_commit_returns_ids_of_the_server_clock_and_per_topic_seqs(both):
    """ids are "<ms>-<seq>": ms the store's clock (never decreasing, shared by a batch), seq
    the log's position in its own topic, also across a batch spanning topics."""
    pp = both
    ids = []
    for n in range(5):
        ids += pp.commit([{"topic": "x", "body": {"n": n}}, {"topic": "y", "body": [n]},
                          {"topic": "x", "body": bytes([n])}])
    assert [int(i.split("-")[1]) for i in ids[0::3]] == [0, 2, 4, 6, 8]
    assert [int(i.split("-")[1]) for i in ids[1::3]] == [0, 1, 2, 3, 4]
    ms = [int(i.split("-")[0]) for i in ids]
    assert ms == sorted(ms)
    assert all(len({ms[k], ms[k + 1], ms[k + 2]}) == 1 for k in range(0, len(ms), 3))
    assert [log.body for log in pp.range("y")] == [[n] for n in range(5)]
    assert pp.range("x", start=":1", end=":1") == [Log(ids[2], b"\x00")]


# ---------------------------------------------------------------------------------------------
# SPEC §5: procs (tests of test_procs)
# ---------------------------------------------------------------------------------------------

PROCS = _cases(tp, [
    "test_claim_pending_ack_and_next",
    "test_ack_of_a_multi_log_claim_returns_first_dot_dot_last",
    "test_ack_with_nothing_ever_acked_is_invalid_ack",
    "test_reclaim_return_values_and_redelivery",
    "test_nothing_to_reclaim",
    "test_max_reclaims_disable_in_the_same_call",
    "test_max_reclaims_continue_never_disables",
    "test_max_reclaims_unlimited",
    "test_ack_resets_reclaims",
    "test_disable_resume_keeps_pending_claim",
    "test_resume_resets_reclaims_keeping_claim",
    "test_unknown_proc_is_invalid_proc_everywhere",
    "test_options_frozen_at_creation_count_per_call",
    "test_count_above_one_returns_lists",
    "test_proc_name_not_unique_across_topics",
    "test_offset_dollar_is_by_sequence",
    "test_offset_dollar_fixed_at_creation",
    "test_offset_seq",
    "test_offset_full_id_is_first_log_after_it",
    "test_offset_timestamp_is_first_log_with_ms_at_least",
    "test_ack_commit_single_and_list",
    "test_ack_commit_without_pending_claim_is_invalid_ack_and_writes_nothing",
    "test_ack_commit_bad_log_acks_nothing",
    "test_claimed_identity_ack",
    "test_claimed_with_nothing_pending",
    "test_claimed_list_with_a_wrong_middle_log_is_stale",
    "test_destroyed_proc_starts_fresh",
    "test_proc_state_attributes",
    "test_error_check_order",
    "test_good_edge_options",
    "test_unusual_but_valid_proc_names",
    "test_bad_topic_on_proc",
    "test_unencodable_proc_name_is_a_pipeproc_error",
    "test_available_proc_creates_then_round_robins",
    "test_available_proc_count_and_options",
    "test_available_proc_argument_errors",
    "test_available_proc_serves_only_listed_active_procs",
    "test_stats_procs",
    "test_infinite_reclaim_timeout_does_not_wedge_the_node",
]) + _with(tp, "test_proc_on_missing_topic_is_created_and_waits", "offset",
           [">", "$>", ":0"], ids=lambda i, v: v) + _with(
    tp, "test_invalid_offset_creates_nothing", "offset", tp.BAD_OFFSETS, ids=lambda i, v: repr(v),
) + _with(tp, "test_bad_options_are_invalid_argument", "opts", tp.BAD_OPTIONS,
          ids=lambda i, v: repr(v)) + _with(
    tp, "test_bad_proc_names", "name", tp.BAD_NAMES, ids=lambda i, v: repr(v)[:20],
) + _with(tp, "test_huge_options_fail_cleanly_or_work", "opts",
          [{"count": 2**70}, {"max_reclaims": 2**70}, {"reclaim_timeout": 1e300},
           {"count": 2**40}], ids=lambda i, v: repr(v)) + _with(
    tsp, "test_invalid_processor_refused_and_nothing_created", "kind",
    ["lambda", "closure", "nested", "missing_module", "missing_function", "missing_file",
     "missing_file_func", "file_missing_function", "not_callable"], ids=lambda i, v: v)


@pytest.mark.parametrize("case", PROCS)
def test_procs(both, case):
    case(both)


# reclaim_timeout and wait_for_procs: these wait on conditions (claims timing out, threads)
TIMED = _cases(tp, [
    "test_stale_holder_after_timeout_and_reissue",
    "test_claim_times_out_without_anyone_calling",
    "test_timeout_counts_toward_max_reclaims",
    "test_timed_out_claim_is_redelivered_by_next_proc_call",
    "test_a_claim_made_before_the_previous_claims_timer_fires_still_times_out",
    "test_a_proc_created_again_with_a_shorter_timeout_times_out_at_its_own_deadline",
    "test_disabled_claim_does_not_time_out",
    "test_wait_for_procs_returns_when_all_done",
    "test_wait_for_procs_default_all",
    "test_wait_for_procs_times_out",
    "test_wait_for_procs_ignores_unknown_disabled_and_topicless",
    "test_wait_for_procs_returns_when_proc_destroyed_or_disabled",
]) + _cases(tsf, ["test_wait_for_procs_on_a_user_proc_disabled_by_max_reclaims"])


@pytest.mark.parametrize("case", TIMED)
def test_timed_procs(both, case):
    case(both)


def test_a_claim_after_a_manual_reclaim_is_another_claim(both):
    """claimed= names one claim: the same logs claimed again after a reclaim are another."""
    pp = both
    ids = tp.commit_n(pp, "t", 3)
    first = pp.proc("t", name="p", count=2)
    assert pp.reclaim("p", claimed=first) == ""
    second = pp.proc("t", name="p", count=2)
    assert second == first  # the same logs...
    before = tp.state_dict(pp.inspect_proc("p"))
    for call in (lambda: pp.ack("p", claimed=first),
                 lambda: pp.reclaim("p", claimed=first),
                 lambda: pp.ack_commit("p", {"topic": "out", "body": {}}, claimed=first)):
        with pytest.raises(pipeproc.StaleClaim):  # ...but another claim
            call()
    assert tp.state_dict(pp.inspect_proc("p")) == before
    assert "out" not in pp.topics()
    assert pp.ack("p", claimed=second) == tp.rng(ids[0], ids[1])


def test_claim_times_out_after_a_short_reclaim_timeout(both):
    """A claim of reclaim_timeout=0.3 s is reclaimed by the store (nobody calls), counts a
    reclaim, and the next proc call delivers it again as another claim."""
    pp = both
    ids = tp.commit_n(pp, "t", 2)
    t0 = time.monotonic()
    log = pp.proc("t", name="p", reclaim_timeout=0.3)
    st = wait_until(lambda: (s := pp.inspect_proc("p")).reclaims == 1 and s, timeout=10,
                    what="the claim timing out")
    assert time.monotonic() - t0 >= 0.25
    assert st.last_claimed_range == "" and st.status == "active"
    again = pp.proc("t", name="p")
    assert again == log and again.id == ids[0]
    with pytest.raises(pipeproc.StaleClaim):
        pp.ack("p", claimed=log)
    assert pp.ack("p", claimed=again) == tp.rng(ids[0])


def test_ack_commit_is_atomic_and_returns_ids(both):
    pp = both
    ids = tp.commit_n(pp, "in", 2)
    claim = pp.proc("in", name="p", count=2)
    # a bad log anywhere in the list: nothing acked, nothing committed
    with pytest.raises(pipeproc.InvalidLogFormat):
        pp.ack_commit("p", [{"topic": "a", "body": {}}, {"topic": "b", "body": 1.5}],
                      claimed=claim)
    assert pp.topics() == ["in"]
    assert pp.inspect_proc("p").last_acked_range == ""
    res = pp.ack_commit("p", [{"topic": "a", "body": {"k": 0}}, {"topic": "b", "body": [1]},
                              {"topic": "a", "body": b"2"}], claimed=claim)
    assert res.acked == tp.rng(ids[0], ids[1])
    assert [tp.seq(i) for i in res.id] == [0, 0, 1]
    assert len({tp.ms(i) for i in res.id}) == 1
    assert pp.range("a") == [Log(res.id[0], {"k": 0}), Log(res.id[2], b"2")]
    assert pp.range("b") == [Log(res.id[1], [1])]
    assert pp.ack("p") == res.acked


def test_destroy_returns_last_state_and_only_that_proc(both):
    """test_procs' destroy test without the restart."""
    pp = both
    ids = tp.commit_n(pp, "t", 5)
    for name in ("p", "p1", "p10", "q"):
        pp.proc("t", name=name)
        pp.ack(name)
    pp.proc("t", name="p", count=2)
    pp.proc("t", name="p10")
    expect_p = tp.state_dict(pp.inspect_proc("p"))
    others = {n: tp.state_dict(pp.inspect_proc(n)) for n in ("p1", "p10", "q")}
    st = pp.destroy_proc("p")
    assert tp.state_dict(st) == expect_p
    assert st.last_acked_range == tp.rng(ids[0])
    assert st.last_claimed_range == tp.rng(ids[1], ids[2])
    assert tp.code_of(pp.inspect_proc, "p") == "invalid_proc"
    assert tp.code_of(pp.destroy_proc, "p") == "invalid_proc"
    assert tp.code_of(pp.disable_proc, "p") == "invalid_proc"
    assert "p" not in pp.stats()["procs"]
    for n, s in others.items():
        assert tp.state_dict(pp.inspect_proc(n)) == s
    assert pp.length("t") == 5 and len(pp.range("t")) == 5  # logs untouched
    assert pp.proc("t", name="p").id == ids[0]  # a fresh proc of that name


def test_inspect_disable_resume_destroy_errors_in_spec_order(both):
    pp = both
    tp.commit_n(pp, "t", 1)
    for call in (pp.inspect_proc, pp.disable_proc, pp.resume_proc, pp.destroy_proc):
        assert tp.code_of(call, "") == "invalid_proc_name"
        assert tp.code_of(call, "x" * 201) == "invalid_proc_name"
        assert tp.code_of(call, "nope") == "invalid_proc"
    pp.proc("t", name="p")
    assert tp.code_of(pp.resume_proc, "p") == "proc_already_active"
    assert pp.disable_proc("p").status == "disabled"
    assert tp.code_of(pp.disable_proc, "p") == "proc_already_disabled"
    # disabled: proc / reclaim refuse before looking at the claim
    assert tp.code_of(pp.proc, "t", name="p") == "proc_is_disabled"
    assert tp.code_of(pp.reclaim, "p") == "proc_is_disabled"
    assert pp.resume_proc("p").status == "active"
    st = pp.destroy_proc("p")
    assert st.name == "p" and st.topic == "t"
    assert tp.code_of(pp.inspect_proc, "p") == "invalid_proc"


def test_one_pending_claim_under_concurrent_callers(both, both_connect):
    """test_procs' test with a second client of the same store (any backend)."""
    pp = both
    other = both_connect()
    ids = tp.commit_n(pp, "t", 4)
    pp.proc("t", name="p")
    pp.ack("p")
    delivered: list = []
    for _ in range(3):
        barrier = threading.Barrier(8)
        results: list = []
        errors: list = []

        def worker(client):
            try:
                barrier.wait(10)
                results.append(client.proc("t", name="p"))
            except BaseException as e:  # noqa: BLE001 - reported below
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
        assert other.ack("p", claimed=got[0]) == tp.rng(got[0].id)
    assert delivered == ids[1:4]


def test_wait_for_procs_raises_for_a_dead_stage_with_work(both):
    """A proc disabled by max_reclaims while it still has work is a dead stage; a proc
    disabled on purpose is simply not waited for."""
    pp = both
    tp.commit_n(pp, "t", 2)
    pp.proc("t", name="dead", max_reclaims=1)
    pp.reclaim("dead")
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.wait_for_procs(["dead"], timeout=5)
    assert e.value.code == "proc_is_disabled" and "'dead'" in e.value.message
    pp.resume_proc("dead")
    pp.disable_proc("dead")
    pp.wait_for_procs(timeout=5)


def test_stats_topics_and_procs_keys(both):
    pp = both
    assert pp.stats()["topics"] == {}
    tp.commit_n(pp, "t", 3)
    tp.commit_n(pp, "u", 1)
    pp.proc("t", name="p")
    stats = pp.stats()
    assert set(stats["topics"]) == {"t", "u"}
    assert stats["topics"]["t"]["length"] == 3 and stats["topics"]["t"]["stored"] == 3
    assert stats["topics"]["u"]["length"] == 1
    p = stats["procs"]["p"]
    assert (p["topic"], p["status"], p["lag"]) == ("t", "active", 3)
    live = pp.live_proc("u", mode="all")
    try:
        assert live.name in pp.stats()["procs"]
    finally:
        live.cancel()


# ---------------------------------------------------------------------------------------------
# SPEC §7: live procs (tests of test_live_procs)
# ---------------------------------------------------------------------------------------------

LIVE = _cases(tl, [
    "test_mode_live_delivers_only_later_commits",
    "test_mode_live_on_a_topic_that_does_not_exist_yet",
    "test_mode_all_from_the_beginning",
    "test_count_delivers_lists",
    "test_explicit_ack_needed_before_next_delivery",
    "test_changes_callback_on_a_thread_and_exception_reclaims",
    "test_callback_failing_forever_keeps_the_proc_active",
    "test_ack_commit",
    "test_reclaim_delivers_the_same_log_again",
    "test_inspect",
    "test_disable_and_resume",
])


@pytest.mark.parametrize("case", LIVE)
def test_live_procs(both, lives, case):
    case(both, lives)


LIVE_ALONE = _cases(tl, [
    "test_invalid_arguments",
    "test_cancel_stops_a_blocked_iterator_and_destroys_the_hidden_proc",
    "test_cancel_stops_a_changes_thread",
    "test_destroy_ends_delivery",
])


@pytest.mark.parametrize("case", LIVE_ALONE)
def test_live_proc_life(both, case):
    case(both)


def test_live_iterator_asked_again_without_ack_is_invalid_ack(both, lives):
    pp = both
    ids = tp.commit_n(pp, "t", 2)
    live = lives(pp, "t", mode="all")
    it = iter(live)
    assert next(it).id == ids[0]
    with pytest.raises(pipeproc.InvalidAck) as e:
        next(it)
    assert "ack()" in e.value.message and "reclaim()" in e.value.message
    assert live.ack() == tp.rng(ids[0])
    assert next(it).id == ids[1]
    live.reclaim()
    assert next(it).id == ids[1]  # the same log again, after a reclaim
    live.ack()
    live.cancel()
    assert list(it) == []
    assert live.name not in pp.stats()["procs"]


def test_client_close_destroys_its_live_procs(both, both_connect):
    pp = both
    other = both_connect()
    live = other.live_proc("t", mode="all")
    assert live.name in pp.stats()["procs"]
    other.close()
    wait_until(lambda: live.name not in pp.stats()["procs"], what="hidden proc destroyed")


# ---------------------------------------------------------------------------------------------
# SPEC §6 and §8: system procs, workers and the GC of a spawn (tests of test_system_procs,
# test_sysproc_update, test_sysproc_failures and test_gc, with ``both_spawner``)
# ---------------------------------------------------------------------------------------------

SPAWNED = _cases(tsp, [
    "test_pipeline_of_two_system_procs_keeps_order",
    "test_multi_topic_to_gets_each_result_atomically_with_the_ack",
    "test_list_result_is_one_log_per_element_per_topic",
    "test_list_of_one_list_is_one_log_with_a_list_body",
    "test_none_result_acks_and_commits_nothing",
    "test_no_to_discards_results_and_acks",
    "test_async_processor",
    "test_count_hands_a_batch",
    "test_raising_processor_reclaims_then_disables",
    "test_from_list_creates_one_proc_per_topic",
    "test_creating_again_keeps_the_proc_and_updates_the_definition",
    "test_destroy_proc_removes_the_system_proc",
    "test_destroy_one_proc_of_a_multi_topic_system_proc",
    "test_system_proc_options",
    "test_worker_concurrency_runs_loops_at_once",
    "test_log_that_kills_its_worker_every_time_disables_the_proc",
    "test_worker_restart_after_recycles_workers",
]) + _cases(tsu, [
    "test_same_name_and_topic_updates_processor_to_and_count",
    "test_same_name_on_another_topic_is_not_unique",
    "test_updating_a_disabled_proc_does_not_resume_it",
]) + _cases(tsf, [
    "test_wait_for_procs_raises_over_a_dead_stage",
]) + _cases(tg, [
    "test_gc_keeps_working_after_ticks_with_no_topic",
    "test_gc_two_positions_behind_the_claimed_range",
    "test_gc_two_positions_behind_with_multi_log_claims",
    "test_gc_proc_that_has_not_claimed_twice_protects_its_position",
    "test_gc_disabled_proc_protects_its_position",
    "test_gc_lagging_proc_protects_shared_topic",
    "test_gc_after_destroy_proc_topic_is_proc_less",
    "test_gc_respects_min_prune_time",
    "test_gc_with_procs_still_waits_for_min_prune_time",
]) + [pytest.param(functools.partial(tg.test_gc_prunes_topics_without_procs, memory=False),
                   id="test_gc_prunes_topics_without_procs"),
      pytest.param(functools.partial(tg.test_gc_off_by_default, gc=False),
                   id="test_gc_off_by_default")]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", SPAWNED)
def test_spawned(both_spawner, case):
    case(both_spawner)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["import_string", "file_path", "file_path_func", "function"])
def test_processor_references(both_spawner, how):
    tsp.test_processor_references(both_spawner, how)


@pytest.mark.timeout(90)
def test_raising_processor_gets_the_same_log_again(both_spawner, tmp_path):
    tsp.test_raising_processor_gets_the_same_log_again(both_spawner, tmp_path)


# workers that die: test_system_procs' tests without the node's per-slot "restarts" counter


def _worker_pids(pp) -> set:
    return {w["pid"] for w in pp.stats()["workers"]}


@pytest.mark.timeout(60)
def test_worker_dying_mid_log_is_restarted_and_the_log_redone(both_spawner, tmp_path):
    pp = both_spawner(workers=1)
    (pid0,) = _worker_pids(pp)
    pp.system_proc(name="crashy", from_="in", processor=f"{tsp.M}:die_once", to="out",
                   reclaim_timeout=60)
    flag = tmp_path / "died"
    t0 = time.monotonic()
    pp.commit([{"topic": "in", "body": {"n": 1, "flag": str(flag)}},
               {"topic": "in", "body": {"n": 2}}])
    logs = tsp.wait_len(pp, "out", 2, timeout=10)
    assert time.monotonic() - t0 < 10  # the dead worker's claim was reclaimed at once
    assert flag.exists() and int(flag.read_text()) == pid0
    assert [lg.body["n"] for lg in logs] == [1, 2]
    assert all(lg.body["pid"] != pid0 for lg in logs)
    wait_until(lambda: _worker_pids(pp) == {logs[0].body["pid"]}, what="the new worker listed")
    st = pp.inspect_proc("crashy")
    assert st.status == "active" and st.reclaims == 0


@pytest.mark.timeout(60)
def test_log_that_kills_its_worker_every_time_disables_the_proc(both_spawner):
    pp = both_spawner(workers=1)
    pp.system_proc(name="killer", from_="in", processor=f"{tsp.M}:die_always", to="out",
                   max_reclaims=2, reclaim_timeout=60)
    pp.system_proc(name="fine", from_="ok", processor=f"{tsp.M}:double", to="ok_out")
    tsp.commit_ns(pp, "in", [1])
    wait_until(lambda: pp.inspect_proc("killer").status == "disabled", timeout=15,
               what="killer proc disabled")
    assert pp.inspect_proc("killer").reclaims == 2
    assert pp.inspect_proc("killer").last_error is not None
    tsp.commit_ns(pp, "ok", [5])
    assert [lg.body for lg in tsp.wait_len(pp, "ok_out", 1, timeout=10)] == [{"n": 10}]
    pp.wait_for_procs(["fine"], timeout=10)
    with pytest.raises(pipeproc.PipeProcError) as e:  # a dead stage is not a finished one
        pp.wait_for_procs(timeout=10)
    assert e.value.code == "proc_is_disabled" and "killer" in e.value.message
    assert "out" not in pp.topics()


@pytest.mark.timeout(60)
def test_worker_killed_while_idle_is_restarted(both_spawner):
    import os
    import signal

    pp = both_spawner(workers=1)
    (pid0,) = _worker_pids(pp)
    os.kill(pid0, signal.SIGKILL)
    (pid1,) = wait_until(lambda: (p := _worker_pids(pp)) and pid0 not in p and p,
                         what="worker restarted")
    pp.system_proc(name="after", from_="in", processor=f"{tsp.M}:tag_pid", to="out")
    tsp.commit_ns(pp, "in", [1])
    assert tsp.wait_len(pp, "out", 1)[0].body["pid"] == pid1


@pytest.mark.timeout(60)
def test_timed_out_worker_claim_is_redone_once(both_spawner, tmp_path):
    pp = both_spawner(workers=1, worker_concurrency=2)
    pp.system_proc(name="slow", from_="in", processor=f"{tsp.M}:slow_once", to="out",
                   reclaim_timeout=0.5)
    ids = pp.commit([{"topic": "in", "body": {"n": 1, "flag": str(tmp_path / "f"),
                                              "sleep": 2.0}}])
    logs = tsp.wait_len(pp, "out", 1, timeout=10)
    assert logs[0].body == {"n": 1, "slow": False}
    pp.wait_for_procs(["slow"], timeout=10)
    time.sleep(2.0)  # the slow first execution has ended by now: its late result is dropped
    assert [lg.body for lg in pp.range("out")] == [{"n": 1, "slow": False}]
    st = pp.inspect_proc("slow")
    assert st.last_acked_range == f"{ids[0]}..{ids[0]}" and st.status == "active"
    assert st.last_error["type"] == "TimeLimitExceeded"


# worker and failure tests of the node that now hold on Redis too (per-slot worker records,
# the node's failure log lines): the originals, run with both backends' spawns


@pytest.mark.timeout(90)
def test_worker_killed_while_idle_is_restarted_on_both(both_spawner):
    tsp.test_worker_killed_while_idle_is_restarted(both_spawner)


@pytest.mark.timeout(90)
def test_worker_dying_mid_log_original_on_both(both_spawner, tmp_path):
    tsp.test_worker_dying_mid_log_is_restarted_and_the_log_redone(both_spawner, tmp_path)


@pytest.mark.timeout(90)
def test_relative_file_path_on_both(both_spawner, tmp_path, monkeypatch):
    tsp.test_relative_file_path_against_callers_cwd(both_spawner, tmp_path, monkeypatch)


@pytest.mark.timeout(90)
def test_file_processor_that_cannot_be_imported_on_both(both, tmp_path):
    tsp.test_file_processor_that_cannot_be_imported_is_refused(both, tmp_path)


@pytest.mark.timeout(90)
def test_failing_processor_backs_off_and_logs_on_both(both_spawner, capfd):
    tsf.test_failing_processor_backs_off_records_last_error_and_logs(both_spawner, capfd)


@pytest.mark.timeout(90)
def test_always_slower_than_its_time_limit_on_both(both_spawner, tmp_path, capfd):
    tsf.test_processor_always_slower_than_its_time_limit_ends_disabled(both_spawner, tmp_path,
                                                                      capfd)


@pytest.mark.timeout(90)
def test_time_limit_recycle_other_claims_on_both(both_spawner, tmp_path):
    tsf.test_time_limit_recycle_does_not_count_the_workers_other_claims(both_spawner, tmp_path)


def test_available_proc_naming_one_proc_on_two_topics_creates_nothing(both):
    """Found by the protocol fuzzer: a refused available_proc wrote its first procs."""
    pp = both
    specs = [{"topic": "a", "name": "one"}, {"topic": "c", "name": "two"},
             {"topic": "a", "name": "two"}]
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.available_proc(specs)
    assert e.value.code == "proc_name_not_unique"
    assert "one" not in pp.stats()["procs"] and "two" not in pp.stats()["procs"]
