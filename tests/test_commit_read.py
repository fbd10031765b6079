"""SPEC §1, §2 and §4: ids, commit, range / revrange / length / topics / iter_range.

Bound semantics checked here by hand on small topics whose ids are known; the random
cross-check against a brute-force model lives in ``test_bounds_model.py``.
"""

from __future__ import annotations

import itertools
import time
import types

import pytest

import pipeproc


def _split(log_id: str) -> tuple[int, int]:
    ms, seq = log_id.split("-")
    return int(ms), int(seq)


def _seqs(logs) -> list[int]:
    return [_split(log.id)[1] for log in logs]


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# commit: return shapes and ids
# ---------------------------------------------------------------------------------------------


def test_commit_single_returns_id_string(any_node):
    before = _now_ms()
    log_id = any_node.commit({"topic": "t", "body": {"a": 1}})
    after = _now_ms()
    assert isinstance(log_id, str)
    ms, seq = _split(log_id)
    assert seq == 0
    # the node's clock in epoch ms (same machine; 1 ms of slack for rounding)
    assert before - 1 <= ms <= after + 1
    assert log_id == f"{ms}-{seq}"


def test_commit_list_always_returns_list(any_node):
    one = any_node.commit([{"topic": "t", "body": {"a": 1}}])
    assert isinstance(one, list) and len(one) == 1 and isinstance(one[0], str)
    assert _split(one[0])[1] == 0
    assert any_node.commit([]) == []
    # commit([]) writes nothing
    assert any_node.topics() == ["t"]
    assert any_node.length("t") == 1


def test_per_topic_sequences_from_zero(any_node):
    pp = any_node
    ids = [pp.commit({"topic": t, "body": {"i": i}}) for i, t in enumerate("abab")]
    assert [_split(i)[1] for i in ids] == [0, 0, 1, 1]
    batch = pp.commit([{"topic": t, "body": {}} for t in ["a", "a", "c", "b", "a", "c"]])
    assert [_split(i)[1] for i in batch] == [2, 3, 0, 2, 4, 1]
    assert pp.length("a") == 5
    assert pp.length("b") == 3
    assert pp.length("c") == 2
    assert _seqs(pp.range("a")) == [0, 1, 2, 3, 4]
    assert [log.body for log in pp.range("c")] == [{}, {}]


def test_batch_shares_one_ms_and_ms_never_decreases(any_node):
    pp = any_node
    last = 0
    for n in range(20):
        batch = pp.commit([{"topic": f"t{i % 3}", "body": {"n": n, "i": i}} for i in range(7)])
        ms_values = {_split(i)[0] for i in batch}
        assert len(ms_values) == 1, batch
        (ms,) = ms_values
        assert ms >= last
        last = ms
        single = pp.commit({"topic": "t0", "body": {"n": n}})
        assert _split(single)[0] >= last
        last = _split(single)[0]


def test_ids_returned_match_range(any_node):
    pp = any_node
    ids = pp.commit([{"topic": "a", "body": {"i": i}} for i in range(5)])
    ids.append(pp.commit({"topic": "a", "body": {"i": 5}}))
    logs = pp.range("a")
    assert [log.id for log in logs] == ids
    assert [log.body for log in logs] == [{"i": i} for i in range(6)]


def test_logs_are_log_namedtuples(node):
    log_id = node.commit({"topic": "t", "body": {"x": 1}})
    (log,) = node.range("t")
    assert isinstance(log, pipeproc.Log)
    assert isinstance(log, tuple)
    assert log.id == log_id and log.body == {"x": 1}
    assert log == pipeproc.Log(log_id, {"x": 1})
    assert log._fields == ("id", "body")
    (rlog,) = node.revrange("t")
    assert isinstance(rlog, pipeproc.Log) and rlog == log


# ---------------------------------------------------------------------------------------------
# atomic batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"topic": "bad topic", "body": {}},
        {"topic": "ok", "body": {1, 2}},
        {"topic": "ok", "body": None},
        {"topic": "ok"},
        {"topic": "", "body": {}},
    ],
    ids=["bad-topic", "set-body", "none-body", "missing-body", "empty-topic"],
)
def test_batch_with_one_invalid_log_writes_nothing(any_node, bad):
    pp = any_node
    pp.commit([{"topic": "a", "body": {"i": 0}}, {"topic": "b", "body": {"i": 0}}])
    batch = [
        {"topic": "a", "body": {"i": 1}},
        {"topic": "new", "body": {"i": 1}},
        bad,
        {"topic": "b", "body": {"i": 1}},
    ]
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.commit(batch)
    assert e.value.code in ("invalid_topic_format", "invalid_log_format")
    assert sorted(pp.topics()) == ["a", "b"]
    assert pp.length("a") == 1 and pp.length("b") == 1
    with pytest.raises(pipeproc.PipeProcError) as e2:
        pp.length("new")
    assert e2.value.code == "invalid_topic"
    # the counters did not move: the next commit continues at seq 1
    assert _split(pp.commit({"topic": "a", "body": {}}))[1] == 1


# ---------------------------------------------------------------------------------------------
# bodies
# ---------------------------------------------------------------------------------------------

ROUND_TRIP = [
    {"a": 1, "b": "x"},
    {},
    [],
    b"",
    b"\x00\xff\x10raw",
    [1, "two", 3.5, None, True, False, b"\x01"],
    {"min": -(2**63), "max": 2**64 - 1, "zero": 0, "neg": -1, "big": 2**63},
    {"floats": [0.0, -0.0, 1.5, -2.25, 1e308, 5e-324, float("inf"), float("-inf")]},
    {"nested": {"deep": [{"x": [1, [2, [3, {"y": b"z"}]]]}]}, "unicode": "héllo ✓ 日本"},
    {"s": "", "l": [[], {}], "n": None, "t": True},
    {"long": "x" * 10000, "bin": bytes(range(256)) * 10},
]


@pytest.mark.parametrize("body", ROUND_TRIP, ids=[f"body{i}" for i in range(len(ROUND_TRIP))])
def test_body_round_trip(any_node, body):
    log_id = any_node.commit({"topic": "t", "body": body})
    (log,) = any_node.range("t")
    assert log.id == log_id
    assert log.body == body
    assert type(log.body) is type(body)
    if isinstance(body, dict):
        for k, v in body.items():
            assert type(log.body[k]) is type(v)


def test_body_value_types_preserved(node):
    body = {"i": 1, "f": 1.0, "b": True, "n": None, "by": b"1", "s": "1", "l": [1]}
    node.commit({"topic": "t", "body": body})
    got = node.range("t")[0].body
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in body.items()}
    # bool stays bool, not int; bytes stay bytes, not str
    assert got["b"] is True
    assert got["by"] == b"1" and got["s"] == "1"


def test_tuples_come_back_as_lists(node):
    node.commit([
        {"topic": "t", "body": {"tup": (1, 2, (3, 4)), "empty": ()}},
        {"topic": "t", "body": [(1, "a"), ()]},
    ])
    logs = node.range("t")
    assert logs[0].body == {"tup": [1, 2, [3, 4]], "empty": []}
    assert type(logs[0].body["tup"]) is list and type(logs[0].body["tup"][2]) is list
    assert logs[1].body == [[1, "a"], []]


def test_batch_bodies_round_trip_in_order(node):
    bodies = [{"i": i, "data": b"x" * i} for i in range(50)]
    ids = node.commit([{"topic": "t", "body": b} for b in bodies])
    logs = node.range("t")
    assert [log.id for log in logs] == ids
    assert [log.body for log in logs] == bodies


def test_8mib_body_round_trips(node):
    big = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    node.commit({"topic": "big", "body": big})
    node.commit({"topic": "big", "body": {"payload": big, "n": 1}})
    logs = node.range("big")
    assert logs[0].body == big
    assert logs[1].body == {"payload": big, "n": 1}


# ---------------------------------------------------------------------------------------------
# topics / length
# ---------------------------------------------------------------------------------------------


def test_topics_and_length(any_node):
    pp = any_node
    assert pp.topics() == []
    names = ["b", "a", "A-1_x", "z" * 200]
    for n, name in enumerate(names):
        for _ in range(n + 1):
            pp.commit({"topic": name, "body": {}})
    assert sorted(pp.topics()) == sorted(names)
    assert isinstance(pp.topics(), list)
    for n, name in enumerate(names):
        assert pp.length(name) == n + 1
        last = pp.revrange(name, limit=1)[0]
        assert pp.length(name) == _split(last.id)[1] + 1


@pytest.mark.parametrize("call", ["range", "revrange", "length", "iter_range"])
def test_unknown_topic_is_invalid_topic(any_node, call):
    pp = any_node
    pp.commit({"topic": "exists", "body": {}})
    with pytest.raises(pipeproc.PipeProcError) as e:
        if call == "iter_range":
            list(pp.iter_range("nope"))
        else:
            getattr(pp, call)("nope")
    assert e.value.code == "invalid_topic"
    # raised in the node, it reaches the client as the same class
    assert isinstance(e.value, pipeproc.errors.InvalidTopic)
    # the node keeps running and loses nothing
    assert pp.length("exists") == 1


# ---------------------------------------------------------------------------------------------
# range / revrange bounds
# ---------------------------------------------------------------------------------------------


def _make_stepped(pp):
    """Topic "t": three batches of 3 logs at three distinct, strictly increasing ms.

    Returns (pp, ids, ms) where ids[seq] is the id of seq and ms = [ms0, ms1, ms2].
    """
    ids: list[str] = []
    ms: list[int] = []
    for b in range(3):
        if ms:
            # wait (bounded) for the node's clock to move past the previous batch's ms
            deadline = time.monotonic() + 5
            while _now_ms() <= ms[-1] + 1 and time.monotonic() < deadline:
                time.sleep(0.002)
        batch = pp.commit([{"topic": "t", "body": {"b": b, "k": k}} for k in range(3)])
        bms = _split(batch[0])[0]
        assert not ms or bms > ms[-1]
        ms.append(bms)
        ids.extend(batch)
    # a log on another topic in the same ms must not show up in "t"'s ranges
    pp.commit({"topic": "other", "body": {}})
    return pp, ids, ms


@pytest.fixture(scope="module", params=["disk", "memory"])
def stepped(request, tmp_path_factory):
    """The stepped topic (see :func:`_make_stepped`) on one disk and one memory node per module,
    shared by the tests that only read it (a test that writes uses ``fresh_stepped``)."""
    pp = pipeproc.spawn(tmp_path_factory.mktemp("stepped") / "store", workers=0,
                        memory=request.param == "memory")
    try:
        yield _make_stepped(pp)
    finally:
        pp.shutdown()


@pytest.fixture
def fresh_stepped(any_node):
    """The stepped topic on a node of the test's own."""
    return _make_stepped(any_node)


def test_range_whole_topic(stepped):
    pp, ids, _ = stepped
    assert [log.id for log in pp.range("t")] == ids
    assert [log.id for log in pp.revrange("t")] == ids[::-1]
    assert [log.id for log in pp.range("t", None, None)] == ids


def test_range_full_id_bounds(stepped):
    pp, ids, _ = stepped
    assert _seqs(pp.range("t", start=ids[2], end=ids[6])) == [2, 3, 4, 5, 6]
    assert _seqs(pp.range("t", start=ids[2], end=ids[6], exclusive=True)) == [3, 4, 5]
    assert _seqs(pp.range("t", start=ids[4])) == [4, 5, 6, 7, 8]
    assert _seqs(pp.range("t", end=ids[4])) == [0, 1, 2, 3, 4]
    assert _seqs(pp.range("t", end=ids[4], exclusive=True)) == [0, 1, 2, 3]
    assert _seqs(pp.range("t", start=ids[4], end=ids[4])) == [4]
    assert _seqs(pp.range("t", start=ids[4], end=ids[4], exclusive=True)) == []


def test_range_full_id_need_not_exist(stepped):
    pp, ids, ms = stepped
    # positions between existing logs, compared by (ms, seq)
    assert _seqs(pp.range("t", start=f"{ms[1]}-0")) == [3, 4, 5, 6, 7, 8]
    assert _seqs(pp.range("t", start=f"{ms[1]}-0", exclusive=True)) == [3, 4, 5, 6, 7, 8]
    assert _seqs(pp.range("t", start=f"{ms[1]}-4")) == [4, 5, 6, 7, 8]
    assert _seqs(pp.range("t", start=f"{ms[1]}-99")) == [6, 7, 8]
    assert _seqs(pp.range("t", end=f"{ms[1]}-99")) == [0, 1, 2, 3, 4, 5]
    assert _seqs(pp.range("t", end=f"{ms[1]}-99", exclusive=True)) == [0, 1, 2, 3, 4, 5]
    assert _seqs(pp.range("t", end=f"{ms[2]}-0")) == [0, 1, 2, 3, 4, 5]
    assert _seqs(pp.range("t", start="0-0")) == list(range(9))
    assert _seqs(pp.range("t", start=f"{ms[2] + 1}-0")) == []
    assert _seqs(pp.range("t", end=f"{ms[0] - 1}-999")) == []
    assert _seqs(pp.range("t", end=f"{ms[2] + 1000}-0")) == list(range(9))


def test_range_timestamp_bounds_inclusive(stepped):
    pp, _, ms = stepped
    for excl in (False, True):
        assert _seqs(pp.range("t", start=str(ms[1]), exclusive=excl)) == [3, 4, 5, 6, 7, 8]
        assert _seqs(pp.range("t", end=str(ms[1]), exclusive=excl)) == [0, 1, 2, 3, 4, 5]
        assert _seqs(pp.range("t", start=str(ms[1]), end=str(ms[1]), exclusive=excl)) == [3, 4, 5]
        assert _seqs(pp.range("t", start=str(ms[0]), end=str(ms[2]), exclusive=excl)) == list(range(9))
        assert _seqs(pp.range("t", start=str(ms[0] + 1), exclusive=excl)) == list(range(3, 9))
        assert _seqs(pp.range("t", end=str(ms[2] - 1), exclusive=excl)) == list(range(6))
        assert _seqs(pp.range("t", start=str(ms[2] + 1), exclusive=excl)) == []
        assert _seqs(pp.range("t", start="0", exclusive=excl)) == list(range(9))
        # revrange: start is the upper, end the lower bound
        assert _seqs(pp.revrange("t", start=str(ms[1]), exclusive=excl)) == [5, 4, 3, 2, 1, 0]
        assert _seqs(pp.revrange("t", end=str(ms[1]), exclusive=excl)) == [8, 7, 6, 5, 4, 3]
        assert _seqs(pp.revrange("t", start=str(ms[1]), end=str(ms[1]), exclusive=excl)) == [5, 4, 3]


def test_range_seq_bounds(stepped):
    pp, _, _ = stepped
    assert _seqs(pp.range("t", start=":2", end=":5")) == [2, 3, 4, 5]
    assert _seqs(pp.range("t", start=":2", end=":5", exclusive=True)) == [3, 4]
    assert _seqs(pp.range("t", start=":0")) == list(range(9))
    assert _seqs(pp.range("t", start=":0", exclusive=True)) == list(range(1, 9))
    assert _seqs(pp.range("t", end=":8", exclusive=True)) == list(range(8))
    assert _seqs(pp.range("t", start=":4", end=":4")) == [4]
    assert _seqs(pp.revrange("t", start=":5", end=":2")) == [5, 4, 3, 2]
    assert _seqs(pp.revrange("t", start=":5", end=":2", exclusive=True)) == [4, 3]


def test_mixed_bound_forms(stepped):
    pp, ids, ms = stepped
    assert _seqs(pp.range("t", start=":1", end=str(ms[1]))) == [1, 2, 3, 4, 5]
    assert _seqs(pp.range("t", start=str(ms[1]), end=":7", exclusive=True)) == [3, 4, 5, 6]
    assert _seqs(pp.range("t", start=ids[1], end=":7", exclusive=True)) == [2, 3, 4, 5, 6]
    assert _seqs(pp.revrange("t", start=ids[7], end=str(ms[1]), exclusive=True)) == [6, 5, 4, 3]


@pytest.mark.parametrize("bound", [":9", ":100", ":18446744073709551615"])
def test_seq_bound_that_does_not_exist(stepped, bound):
    pp, _, _ = stepped
    for call in (pp.range, pp.revrange):
        for kw in ({"start": bound}, {"end": bound}, {"start": ":0", "end": bound}):
            with pytest.raises(pipeproc.PipeProcError) as e:
                call("t", **kw)
            assert e.value.code == "invalid_tone_id_search", (call, kw)
            assert isinstance(e.value, pipeproc.errors.InvalidToneIdSearch)
    with pytest.raises(pipeproc.PipeProcError) as e:
        list(pp.iter_range("t", start=bound))
    assert e.value.code == "invalid_tone_id_search"
    assert pp.length("t") == 9


def test_seq_bounds_are_per_topic(stepped):
    # "other" has only seq 0; "t" has seq 1
    pp, _, _ = stepped
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.range("other", start=":1")
    assert e.value.code == "invalid_tone_id_search"
    assert _seqs(pp.range("t", start=":1", end=":1")) == [1]


@pytest.mark.parametrize("limit", [None, 0, -1, -100])
def test_no_limit_values(stepped, limit):
    pp, ids, _ = stepped
    assert [log.id for log in pp.range("t", limit=limit)] == ids
    assert [log.id for log in pp.revrange("t", limit=limit)] == ids[::-1]


def test_limit_from_starting_side(stepped):
    pp, ids, ms = stepped
    assert _seqs(pp.range("t", limit=1)) == [0]
    assert _seqs(pp.range("t", limit=4)) == [0, 1, 2, 3]
    assert _seqs(pp.range("t", limit=100)) == list(range(9))
    assert _seqs(pp.revrange("t", limit=4)) == [8, 7, 6, 5]
    assert _seqs(pp.range("t", start=":3", limit=2)) == [3, 4]
    assert _seqs(pp.range("t", start=":3", limit=2, exclusive=True)) == [4, 5]
    assert _seqs(pp.revrange("t", start=":6", end=":1", limit=3)) == [6, 5, 4]
    assert _seqs(pp.range("t", start=str(ms[1]), limit=2)) == [3, 4]
    assert _seqs(pp.revrange("t", start=str(ms[1]), limit=2)) == [5, 4]


def test_revrange_limit_1_is_newest(fresh_stepped):
    pp, ids, _ = fresh_stepped
    (newest,) = pp.revrange("t", limit=1)
    assert newest.id == ids[-1]
    assert newest.body == {"b": 2, "k": 2}
    new_id = pp.commit({"topic": "t", "body": {"new": True}})
    assert pp.revrange("t", limit=1) == [pipeproc.Log(new_id, {"new": True})]


def test_wrong_order_gives_empty(stepped):
    pp, ids, ms = stepped
    assert pp.range("t", start=":5", end=":2") == []
    assert pp.range("t", start=ids[6], end=ids[1]) == []
    assert pp.range("t", start=str(ms[2]), end=str(ms[0])) == []
    assert pp.revrange("t", start=":2", end=":5") == []
    assert pp.revrange("t", start=ids[1], end=ids[6]) == []
    assert pp.revrange("t", start=str(ms[0]), end=str(ms[2])) == []
    # adjacent bounds made empty by exclusive
    assert pp.range("t", start=":4", end=":5", exclusive=True) == []


def test_revrange_bodies_and_full_ids(stepped):
    pp, ids, _ = stepped
    logs = pp.revrange("t", start=ids[7], end=ids[2])
    assert [log.id for log in logs] == ids[2:8][::-1]
    assert logs[0].body == {"b": 2, "k": 1}
    assert logs[-1].body == {"b": 0, "k": 2}
    assert _seqs(pp.revrange("t", start=ids[7], end=ids[2], exclusive=True)) == [6, 5, 4, 3]


BAD_BOUNDS = [
    "", "abc", "1-", "-1", "-", "1-2-3", ":", ":x", ":-1", "1.5", "1-1.5", " 1", "1 ",
    "0x10", ">", "$>", "1:2", "::1", ":1-2", "1-a", "a-1", "１２",
]


@pytest.mark.parametrize("bad", BAD_BOUNDS)
def test_bad_bound_strings(stepped, bad):
    pp, _, _ = stepped
    for call in (pp.range, pp.revrange):
        for kw in ({"start": bad}, {"end": bad}, {"start": ":0", "end": bad}, {"start": bad, "end": ":8"}):
            with pytest.raises(pipeproc.PipeProcError) as e:
                call("t", **kw)
            assert e.value.code == "invalid_range_offset", (call.__name__, kw)
            assert isinstance(e.value, (ValueError, TypeError))
    with pytest.raises(pipeproc.PipeProcError) as e:
        list(pp.iter_range("t", start=bad))
    assert e.value.code == "invalid_range_offset"


@pytest.mark.parametrize("bad", [0, 5, 1.5, b"1-0", [":1"], (":0",), {"a": 1}, True])
def test_non_string_bounds_are_invalid_argument(stepped, bad):
    pp, _, _ = stepped
    for call in (pp.range, pp.revrange):
        for kw in ({"start": bad}, {"end": bad}):
            with pytest.raises(pipeproc.PipeProcError) as e:
                call("t", **kw)
            assert e.value.code == "invalid_argument", (call.__name__, kw)
            assert isinstance(e.value, (ValueError, TypeError))


# ---------------------------------------------------------------------------------------------
# iter_range
# ---------------------------------------------------------------------------------------------


def test_iter_range_is_lazy_iterator_matching_range(stepped):
    pp, ids, ms = stepped
    it = pp.iter_range("t", page_size=2)
    assert iter(it) is it
    assert isinstance(it, types.GeneratorType) or hasattr(it, "__next__")
    first = next(it)
    assert first.id == ids[0] and isinstance(first, pipeproc.Log)
    rest = list(it)
    assert [first] + rest == pp.range("t")
    cases = [
        {},
        {"start": ":2"},
        {"start": ":2", "end": ":7", "exclusive": True},
        {"start": str(ms[1])},
        {"end": str(ms[1]), "exclusive": True},
        {"start": ids[1], "end": ids[7], "limit": 3},
        {"limit": 5},
        {"limit": 0},
        {"limit": -1},
        {"start": ":5", "end": ":2"},
        {"start": f"{ms[1]}-99"},
    ]
    for kw in cases:
        expected = pp.range("t", **kw)
        for page_size in (1, 2, 3, 4, 1000):
            assert list(pp.iter_range("t", page_size=page_size, **kw)) == expected, (kw, page_size)
        assert list(pp.iter_range("t", **kw)) == expected


def test_iter_range_partial_consumption(node):
    node.commit([{"topic": "t", "body": {"i": i}} for i in range(100)])
    it = node.iter_range("t", page_size=7)
    got = list(itertools.islice(it, 10))
    assert [log.body["i"] for log in got] == list(range(10))
    # an abandoned iterator does not break the client
    del it
    assert node.length("t") == 100
    assert len(node.range("t")) == 100


@pytest.mark.timeout(120)
def test_read_of_50k_logs(node):
    n = 50_000
    for start in range(0, n, 2500):
        node.commit([{"topic": "big", "body": {"i": i}} for i in range(start, start + 2500)])
    assert node.length("big") == n
    logs = node.range("big")
    assert len(logs) == n
    assert [log.body["i"] for log in logs] == list(range(n))
    assert _seqs(logs) == list(range(n))
    rev = node.revrange("big")
    assert len(rev) == n and rev[0].body == {"i": n - 1} and rev[-1].body == {"i": 0}
    count = 0
    for i, log in enumerate(node.iter_range("big", page_size=1000)):
        assert log.body["i"] == i
        count += 1
    assert count == n
    assert node.revrange("big", limit=1)[0].body == {"i": n - 1}
    # a write still goes through after the big reads
    assert _split(node.commit({"topic": "big", "body": {}}))[1] == n


def test_node_keeps_running_after_read_errors(node):
    node.commit({"topic": "t", "body": {"a": 1}})
    for _ in range(3):
        with pytest.raises(pipeproc.PipeProcError):
            node.range("missing")
        with pytest.raises(pipeproc.PipeProcError):
            node.range("t", start=":50")
        with pytest.raises(pipeproc.PipeProcError):
            node.range("t", start="bogus")
    assert node.commit({"topic": "t", "body": {"a": 2}}).endswith("-1")
    assert [log.body for log in node.range("t")] == [{"a": 1}, {"a": 2}]
