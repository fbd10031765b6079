"""SPEC §1, §3, §4: a hypothesis state machine of commits and reads against a plain model.

Rules: single commits, batches across topics, invalid batches (which must change nothing),
range / revrange with random bounds, length, topics, and a restart of the node (disk: shutdown
+ spawn on the same location, everything persists; memory: the new node starts empty).

One node per test function is shared by all examples (a spawn per example would dominate
the run time); each example works on its own topic names and checks only those.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pipeproc
from test_bounds_model import bound_strategy, check_read, limit_strategy, parse_id, resolve_bound


class NodeHolder:
    """The node the machines share, restartable in place."""

    def __init__(self, location, memory):
        self.location = location
        self.memory = memory
        self.pp = pipeproc.spawn(location, memory=memory, workers=0)
        self.max_ms = 0  # the store's ms never decreases, across examples and restarts
        self.generation = 0  # bumped by each memory restart (which empties the store)
        self.restarts = 0

    def restart(self):
        self.restarts += 1
        self.pp.shutdown()
        self.pp = pipeproc.spawn(self.location, memory=self.memory, workers=0)
        if self.memory:
            self.generation += 1
            self.max_ms = 0

    def shutdown(self):
        self.pp.shutdown()


_example_counter = itertools.count()

BODY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)
TOP_BODY = st.one_of(
    st.dictionaries(st.text(max_size=4), BODY, max_size=3),
    st.lists(BODY, max_size=3),
    st.binary(max_size=16),
)
BAD_LOG = st.sampled_from([
    {"topic": "has space", "body": {}},
    {"topic": "", "body": {}},
    {"topic": "x" * 201, "body": {}},
    {"topic": "ok", "body": None},
    {"topic": "ok", "body": "a string"},
    {"topic": "ok", "body": 7},
    {"topic": "ok", "body": {"s": {1, 2}}},
    {"topic": "ok", "body": [object()]},
    {"topic": "ok", "body": {"big": 2**64}},
    {"topic": "ok"},
])


class CommitMachine(RuleBasedStateMachine):
    def __init__(self, holder: NodeHolder):
        super().__init__()
        self.holder = holder
        self.prefix = f"m{next(_example_counter)}x"
        self.names = [f"{self.prefix}{c}" for c in "abc"]
        self.model: dict[str, list[tuple[tuple[int, int], object]]] = {}
        self.generation = holder.generation
        self.steps_since_restart = 0

    @property
    def pp(self):
        return self.holder.pp

    # -- helpers ---------------------------------------------------------------------------

    def _positions(self, topic):
        return [pos for pos, _ in self.model.get(topic, [])]

    def _apply(self, logs, ids):
        assert isinstance(ids, list) and len(ids) == len(logs)
        ms_values = {parse_id(i)[0] for i in ids}
        if ids:
            assert len(ms_values) == 1, ids  # one ms per request
            (ms,) = ms_values
            assert ms >= self.holder.max_ms  # never decreasing within the store
            self.holder.max_ms = ms
        for log, log_id in zip(logs, ids):
            entries = self.model.setdefault(log["topic"], [])
            ms, seq = parse_id(log_id)
            assert seq == len(entries), (log["topic"], log_id)
            entries.append(((ms, seq), log["body"]))

    def _expected_bodies(self, topic):
        return [normalise(body) for _, body in self.model[topic]]

    # -- rules -----------------------------------------------------------------------------

    @initialize()
    def fresh(self):
        mine = [t for t in self.pp.topics() if t.startswith(self.prefix)]
        assert mine == []

    @rule(t=st.integers(0, 2), body=TOP_BODY)
    def commit_one(self, t, body):
        self.steps_since_restart += 1
        log = {"topic": self.names[t], "body": body}
        log_id = self.pp.commit(log)
        assert isinstance(log_id, str)
        self._apply([log], [log_id])

    @rule(items=st.lists(st.tuples(st.integers(0, 2), TOP_BODY), max_size=6))
    def commit_batch(self, items):
        self.steps_since_restart += 1
        logs = [{"topic": self.names[t], "body": body} for t, body in items]
        ids = self.pp.commit(logs)
        self._apply(logs, ids)

    @rule(
        items=st.lists(st.tuples(st.integers(0, 2), TOP_BODY), max_size=4),
        bad=BAD_LOG,
        where=st.integers(0, 4),
    )
    def commit_invalid_batch(self, items, bad, where):
        logs = [{"topic": self.names[t], "body": body} for t, body in items]
        logs.insert(min(where, len(logs)), bad)
        with pytest.raises(pipeproc.PipeProcError) as e:
            self.pp.commit(logs)
        assert e.value.code in ("invalid_topic_format", "invalid_log_format")
        self.check_all_lengths()

    @rule(t=st.integers(0, 2), data=st.data())
    def read(self, t, data):
        topic = self.names[t]
        if topic not in self.model:
            for call in (self.pp.range, self.pp.revrange, self.pp.length):
                with pytest.raises(pipeproc.PipeProcError) as e:
                    call(topic)
                assert e.value.code == "invalid_topic"
            return
        positions = self._positions(topic)
        start = resolve_bound(positions, data.draw(bound_strategy, label="start"))
        end = resolve_bound(positions, data.draw(bound_strategy, label="end"))
        limit = data.draw(limit_strategy, label="limit")
        exclusive = data.draw(st.booleans(), label="exclusive")
        reverse = data.draw(st.booleans(), label="reverse")
        check_read(self.pp, topic, positions, start, end, limit, exclusive, reverse)

    @rule(t=st.integers(0, 2))
    def read_all_bodies(self, t):
        topic = self.names[t]
        if topic not in self.model:
            return
        logs = self.pp.range(topic)
        assert [parse_id(log.id) for log in logs] == self._positions(topic)
        assert [log.body for log in logs] == self._expected_bodies(topic)
        newest = self.pp.revrange(topic, limit=1)
        assert newest == logs[-1:]

    @precondition(lambda self: self.steps_since_restart >= 12)
    @rule()
    def restart(self):
        event("restart")
        self.steps_since_restart = 0
        self.holder.restart()
        if self.holder.memory:
            self.model.clear()
            self.generation = self.holder.generation
            assert self.pp.topics() == []
        else:
            self.check_everything()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def topics_match(self):
        mine = sorted(t for t in self.pp.topics() if t.startswith(self.prefix))
        assert mine == sorted(self.model)

    def check_all_lengths(self):
        for topic in self.names:
            if topic in self.model:
                assert self.pp.length(topic) == len(self.model[topic])
            else:
                with pytest.raises(pipeproc.PipeProcError) as e:
                    self.pp.length(topic)
                assert e.value.code == "invalid_topic"

    def check_everything(self):
        self.check_all_lengths()
        for topic in self.model:
            logs = self.pp.range(topic)
            assert [parse_id(log.id) for log in logs] == self._positions(topic)
            assert [log.body for log in logs] == self._expected_bodies(topic)

    def teardown(self):
        # the example's final state, read in full
        if self.generation == self.holder.generation:
            self.check_everything()


def normalise(value):
    """What a body looks like after a msgpack round trip: tuples become lists."""
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


@pytest.mark.timeout(150)
@pytest.mark.parametrize("memory", [False, True], ids=["disk", "memory"])
def test_commit_state_machine(tmp_path, memory):
    holder = NodeHolder(tmp_path / "store", memory)
    try:
        run_state_machine_as_test(
            lambda: CommitMachine(holder),
            settings=settings(
                max_examples=100,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        assert holder.restarts > 0, "the restart rule never ran"
    finally:
        holder.shutdown()
