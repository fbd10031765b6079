"""SPEC §4 bounds, property-tested against a brute-force model of range / revrange.

Each example builds a fresh topic on one shared node (several commits, some of them
batches so that logs share a millisecond, some interleaved with another topic), then asks
random bounds of every form — full ids that exist or not, timestamps inside and outside the
topic, ``:seq`` (existing or not), ``exclusive`` and ``limit`` — and compares the node's
answer with :func:`model_range`, computed from the committed ids alone.

``model_range`` / ``bound_strategy`` / ``resolve_bound`` are also used by ``test_commit_model.py``.
"""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeproc

# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


class ModelToneError(Exception):
    """The model's ``invalid_tone_id_search``."""


def parse_id(log_id: str) -> tuple[int, int]:
    ms, seq = log_id.split("-")
    return int(ms), int(seq)


def _parse_bound(bound):
    if bound is None:
        return None
    if bound.startswith(":"):
        return ("seq", int(bound[1:]))
    if "-" in bound:
        return ("id", parse_id(bound))
    return ("ts", int(bound))


def _lower_ok(pos, bound, exclusive):
    kind, v = bound
    if kind == "ts":  # inclusive even when exclusive
        return pos[0] >= v
    key = pos if kind == "id" else pos[1]
    return key > v if exclusive else key >= v


def _upper_ok(pos, bound, exclusive):
    kind, v = bound
    if kind == "ts":
        return pos[0] <= v
    key = pos if kind == "id" else pos[1]
    return key < v if exclusive else key <= v


def model_range(positions, start=None, end=None, limit=None, exclusive=False, reverse=False):
    """The positions ``(ms, seq)`` (sorted by seq) that range / revrange must return, in order.

    Raises ModelToneError when a ``:seq`` bound names a seq that is not in ``positions``.
    """
    seqs = {p[1] for p in positions}
    start_b, end_b = _parse_bound(start), _parse_bound(end)
    for b in (start_b, end_b):
        if b is not None and b[0] == "seq" and b[1] not in seqs:
            raise ModelToneError(b)
    lower, upper = (end_b, start_b) if reverse else (start_b, end_b)
    out = [
        p
        for p in positions
        if (lower is None or _lower_ok(p, lower, exclusive))
        and (upper is None or _upper_ok(p, upper, exclusive))
    ]
    if reverse:
        out.reverse()
    if limit is not None and limit > 0:
        out = out[:limit]
    return out


# A bound is drawn symbolically (its kind and small offsets, independent of the actual ids)
# and resolved against the topic's positions, so that data generation does not depend on
# the clock: hypothesis replays and shrinks it deterministically.
BOUND_KINDS = ["none", "id", "id_near", "id_any", "ts", "ts_near", "ts_out", "seq", "seq_missing"]
bound_strategy = st.tuples(
    st.sampled_from(BOUND_KINDS),
    st.integers(min_value=0, max_value=10_000),  # which position / which ms
    st.integers(min_value=-1, max_value=1),  # ms offset
    st.integers(min_value=-1, max_value=2),  # seq offset
)


def resolve_bound(positions, sym):
    """The bound string (or None) that ``sym`` (drawn from bound_strategy) names."""
    kind, idx, dms, dseq = sym
    n = len(positions)
    ms_values = sorted({p[0] for p in positions}) or [int(time.time() * 1000)]
    if kind == "none":
        return None
    if kind == "seq_missing":
        return f":{n + idx % 3}"
    if kind == "seq":
        return f":{idx % (n + 1)}"  # exists unless it is n
    if kind == "ts_out":
        return str([0, ms_values[0] - 1000, ms_values[-1] + 1000][idx % 3])
    ms = ms_values[idx % len(ms_values)]
    if kind == "ts":
        return str(ms)
    if kind == "ts_near":
        return str(ms + dms)
    if kind == "id_any":  # any ms of the topic with any seq around it: mismatched pairs
        return f"{ms + dms}-{max(0, (idx // 7) % (n + 2))}"
    pos = positions[idx % n] if n else (ms, 0)
    if kind == "id":
        return f"{pos[0]}-{pos[1]}"
    return f"{pos[0] + dms}-{max(0, pos[1] + dseq)}"  # id_near


limit_strategy = st.one_of(st.none(), st.integers(min_value=-3, max_value=12))


def check_read(pp, topic, positions, start, end, limit, exclusive, reverse, page_size=None):
    """Compare one node read with the model (including the error case)."""
    call = pp.revrange if reverse else pp.range
    try:
        expected = model_range(positions, start, end, limit, exclusive, reverse)
    except ModelToneError:
        with pytest.raises(pipeproc.PipeProcError) as e:
            call(topic, start=start, end=end, limit=limit, exclusive=exclusive)
        assert e.value.code == "invalid_tone_id_search", (start, end)
        return
    got = call(topic, start=start, end=end, limit=limit, exclusive=exclusive)
    assert [parse_id(log.id) for log in got] == expected, (
        "revrange" if reverse else "range", start, end, limit, exclusive,
    )
    for log in got:
        assert isinstance(log, pipeproc.Log)
    if page_size is not None and not reverse:
        lazy = list(pp.iter_range(topic, start=start, end=end, limit=limit,
                                  exclusive=exclusive, page_size=page_size))
        assert lazy == got, (start, end, limit, exclusive, page_size)


# ---------------------------------------------------------------------------------------------
# the shared node
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    pp = pipeproc.spawn(tmp_path_factory.mktemp("bounds") / "store", workers=0)
    try:
        yield pp
    finally:
        pp.shutdown()


_topic_counter = itertools.count()


def _build_topic(pp, plan):
    """Commit ``plan`` (list of (batch size, side logs, pause)) to a fresh topic.

    Returns (topic, positions) with positions read from the returned ids.
    """
    topic = f"bm{next(_topic_counter)}"
    side = f"{topic}_side"
    positions = []
    for size, side_logs, pause in plan:
        logs = [{"topic": topic, "body": {"k": k}} for k in range(size)]
        # interleave logs of another topic inside the same batch
        for j in range(side_logs):
            logs.insert(min(j * 2, len(logs)), {"topic": side, "body": {"side": j}})
        ids = pp.commit(logs)
        assert isinstance(ids, list) and len(ids) == len(logs)
        mine = [parse_id(i) for log, i in zip(logs, ids) if log["topic"] == topic]
        assert len({parse_id(i)[0] for i in ids}) == 1  # one ms per request
        positions.extend(mine)
        if pause:
            # let the clock move so the topic spans several milliseconds
            target = positions[-1][0] + 1
            deadline = time.monotonic() + 1
            while int(time.time() * 1000) <= target and time.monotonic() < deadline:
                time.sleep(0.0005)
    assert [p[1] for p in positions] == list(range(len(positions)))
    assert all(a[0] <= b[0] for a, b in zip(positions, positions[1:]))
    return topic, positions


plan_strategy = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=5),  # logs of the topic in this request
        st.integers(min_value=0, max_value=2),  # logs of another topic in the same batch
        st.booleans(),  # pause so the next request gets a later ms
    ),
    min_size=1,
    max_size=7,
)

query_strategy = st.tuples(st.booleans(), st.booleans(), limit_strategy, st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plan_strategy, data=st.data())
def test_range_matches_model(shared_node, plan, data):
    pp = shared_node
    topic, positions = _build_topic(pp, plan)
    assert [parse_id(log.id) for log in pp.range(topic)] == positions
    assert pp.length(topic) == len(positions)
    for _ in range(8):
        start = resolve_bound(positions, data.draw(bound_strategy, label="start"))
        end = resolve_bound(positions, data.draw(bound_strategy, label="end"))
        exclusive, reverse, limit, lazy = data.draw(query_strategy, label="query")
        page_size = data.draw(st.integers(min_value=1, max_value=4), label="page") if lazy else None
        check_read(pp, topic, positions, start, end, limit, exclusive, reverse, page_size)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plan_strategy, data=st.data())
def test_range_and_revrange_are_mirror_images(shared_node, plan, data):
    """revrange(start=hi, end=lo) is range(start=lo, end=hi) reversed (no limit)."""
    pp = shared_node
    topic, positions = _build_topic(pp, plan)
    for _ in range(6):
        lo = resolve_bound(positions, data.draw(bound_strategy, label="lo"))
        hi = resolve_bound(positions, data.draw(bound_strategy, label="hi"))
        exclusive = data.draw(st.booleans(), label="exclusive")
        try:
            model_range(positions, lo, hi, None, exclusive, False)
        except ModelToneError:
            continue
        fwd = pp.range(topic, start=lo, end=hi, exclusive=exclusive)
        back = pp.revrange(topic, start=hi, end=lo, exclusive=exclusive)
        assert back == fwd[::-1], (lo, hi, exclusive)
        check_read(pp, topic, positions, lo, hi, None, exclusive, False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plan_strategy, data=st.data())
def test_limit_is_prefix_of_unlimited(shared_node, plan, data):
    pp = shared_node
    topic, positions = _build_topic(pp, plan)
    start = resolve_bound(positions, data.draw(bound_strategy, label="start"))
    end = resolve_bound(positions, data.draw(bound_strategy, label="end"))
    exclusive, reverse = data.draw(st.booleans()), data.draw(st.booleans())
    call = pp.revrange if reverse else pp.range
    try:
        model_range(positions, start, end, None, exclusive, reverse)
    except ModelToneError:
        return
    full = call(topic, start=start, end=end, exclusive=exclusive)
    for limit in range(1, len(full) + 2):
        assert call(topic, start=start, end=end, exclusive=exclusive, limit=limit) == full[:limit]
    for limit in (None, 0, -1):
        assert call(topic, start=start, end=end, exclusive=exclusive, limit=limit) == full
