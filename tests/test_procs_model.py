"""A hypothesis state machine over commits and the proc operations of SPEC §5, checked
against a plain Python model of topics and procs written from the SPEC.

One node serves all the examples of a run (spawning is the expensive part); each example
uses its own topic and proc names. The disk run also restarts the node.

Readings where the SPEC is silent (see tests/test_procs.py): after a reclaim
``last_claimed_range`` is the last acked range; a pending claim survives a restart;
``ack(claimed=...)`` with nothing pending fails with ``invalid_ack`` when nothing was ever
acked and ``stale_claim`` otherwise; ``claimed=`` matches only the very claim ``proc`` returned
(the same logs claimed again are another claim). Two points the model accepts either way: ``ack`` /
``ack_commit`` on a *disabled* proc may fail with ``proc_is_disabled`` (changing nothing) or
act normally; and after a reclaim the next claim may be either ``count`` logs from the acked
position or exactly the reclaimed logs (both are "the same logs again" when ``count`` is
unchanged).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pipeproc
from pipeproc import Log

TOPICS = ["a", "b"]
NAMES = ["p0", "p1", "p2"]
OFFSETS = [">", "$>", ":0", ":1", ":3", ":6"]
WRONG = Log("1-999999", {"wrong": True})
CLAIMED = st.sampled_from(["none", "exact", "exact", "old", "wrong"])


def seq(log_id: str) -> int:
    return int(log_id.split("-")[1])


def ids_of(result) -> list[str]:
    if result is None:
        return []
    if isinstance(result, list):
        return [x.id for x in result]
    return [result.id]


class ProcModel:
    def __init__(self, topic: str, offset: str, start: int, max_reclaims: int, policy: str):
        self.topic = topic
        self.offset = offset
        self.start = start  # first seq delivered before any ack
        self.max_reclaims = max_reclaims
        self.policy = policy
        self.acked_last: int | None = None  # seq of the last acked log
        self.pending: list[int] | None = None
        self.status = "active"
        self.reclaims = 0
        self.last_claimed_range = ""
        self.last_acked_range = ""
        self.previous_claimed_range = ""
        self.last_result = None  # what proc() last returned (for claimed=)
        self.older_result = None  # what it returned before that
        self.redeliver: list[int] | None = None  # the claim dropped by the last reclaim

    @property
    def position(self) -> int:
        return self.acked_last + 1 if self.acked_last is not None else self.start


class ProcMachine(RuleBasedStateMachine):
    def __init__(self, env: dict):
        super().__init__()
        self.env = env
        n = next(env["counter"])
        self.tp = {t: f"e{n}{t}" for t in TOPICS}  # model topic -> real topic
        self.np = {p: f"e{n}-{p}" for p in NAMES}  # model name -> real proc name
        self.logs: dict[str, list[tuple[str, dict]]] = {t: [] for t in TOPICS}
        self.procs: dict[str, ProcModel] = {}
        self.restarts = 0

    # ------------------------------------------------------------ helpers

    @property
    def pp(self):
        return self.env["pp"]

    def rng(self, topic: str, seqs: list[int]) -> str:
        return f"{self.logs[topic][seqs[0]][0]}..{self.logs[topic][seqs[-1]][0]}"

    def claimed_value(self, m: ProcModel | None, mode: str):
        if mode == "none":
            return None
        if m is None:
            return WRONG
        if mode == "old":
            return m.older_result if m.older_result is not None else WRONG
        if mode == "wrong" or m.last_result is None:
            return WRONG
        return m.last_result  # exact when it is still pending, an old claim otherwise

    def call(self, fn, *args, **kw):
        """(result, None) or (None, error code)."""
        try:
            return fn(*args, **kw), None
        except pipeproc.PipeProcError as e:
            return None, e.code

    def do_commit(self, topic: str, bodies: list[dict], returned) -> None:
        ids = returned if isinstance(returned, list) else [returned]
        assert len(ids) == len(bodies)
        for oid, body in zip(ids, bodies):
            assert seq(oid) == len(self.logs[topic]), (oid, len(self.logs[topic]))
            self.logs[topic].append((oid, body))

    def make_bodies(self, topic: str, n: int) -> list[dict]:
        base = len(self.logs[topic])
        return [{"t": topic, "s": base + i} for i in range(n)]

    # ------------------------------------------------------------ rules

    @rule(topic=st.sampled_from(TOPICS), n=st.integers(1, 4))
    def commit(self, topic, n):
        bodies = self.make_bodies(topic, n)
        ids = self.pp.commit([{"topic": self.tp[topic], "body": b} for b in bodies])
        assert isinstance(ids, list)
        self.do_commit(topic, bodies, ids)

    @rule(name=st.sampled_from(NAMES), topic=st.sampled_from(TOPICS), count=st.integers(1, 4),
          offset=st.sampled_from(OFFSETS), max_reclaims=st.sampled_from([1, 2, 3, -1]),
          policy=st.sampled_from(["disable", "continue"]))
    def proc(self, name, topic, count, offset, max_reclaims, policy):
        got, code = self.call(self.pp.proc, self.tp[topic], name=self.np[name], offset=offset,
                              count=count, max_reclaims=max_reclaims, reclaim_timeout=-1,
                              on_max_reclaims_reached=policy)
        m = self.procs.get(name)
        if m is not None and m.topic != topic:
            assert code == "proc_name_not_unique"
            return
        if m is None:
            if offset == ">":
                start = 0
            elif offset == "$>":
                start = len(self.logs[topic])
            else:
                start = int(offset[1:])
            m = self.procs[name] = ProcModel(topic, offset, start, max_reclaims, policy)
        if m.status == "disabled":
            assert code == "proc_is_disabled"
            return
        assert code is None, code
        if m.pending is not None:
            assert got is None
            return
        avail = list(range(m.position, len(self.logs[topic])))[:count]
        if not avail:
            assert got is None
            return
        got_ids = ids_of(got)
        expect_ids = [self.logs[topic][s][0] for s in avail]
        if got_ids == expect_ids:
            if count == 1:
                assert isinstance(got, Log)
            else:
                assert isinstance(got, list)
        else:
            alt = m.redeliver
            assert alt is not None and got_ids == [self.logs[topic][s][0] for s in alt], \
                (got_ids, expect_ids)
            avail = alt
        for log, s in zip(got if isinstance(got, list) else [got], avail):
            assert log.body == self.logs[topic][s][1]
        m.previous_claimed_range = m.last_claimed_range
        m.last_claimed_range = self.rng(topic, avail)
        m.pending = avail
        m.older_result = m.last_result
        m.last_result = got
        m.redeliver = None

    @rule(name=st.sampled_from(NAMES), mode=CLAIMED)
    def ack(self, name, mode):
        m = self.procs.get(name)
        claimed = self.claimed_value(m, mode)
        got, code = self.call(self.pp.ack, self.np[name], claimed=claimed)
        if m is None:
            assert code == "invalid_proc"
            return
        if m.status == "disabled" and code == "proc_is_disabled":
            return  # accepted reading: no ack on a disabled proc
        if m.pending is None:
            if m.last_acked_range == "":
                assert code == "invalid_ack", code  # before stale_claim
            elif claimed is not None:
                assert code == "stale_claim", code  # no pending claim is "those logs"
            else:
                assert code is None and got == m.last_acked_range
            return
        if claimed is not None and claimed is not m.last_result:  # that very claim (SPEC §5)
            assert code == "stale_claim"
            return
        assert code is None, code
        self.apply_ack(m)
        assert got == m.last_acked_range

    def apply_ack(self, m: ProcModel) -> None:
        m.last_acked_range = self.rng(m.topic, m.pending)
        m.acked_last = m.pending[-1]
        m.pending = None
        m.reclaims = 0

    @rule(name=st.sampled_from(NAMES), dest=st.sampled_from(TOPICS), n=st.integers(0, 3),
          mode=CLAIMED)
    def ack_commit(self, name, dest, n, mode):
        m = self.procs.get(name)
        claimed = self.claimed_value(m, mode)
        bodies = self.make_bodies(dest, max(n, 1))
        payload = ({"topic": self.tp[dest], "body": bodies[0]} if n == 0 else
                   [{"topic": self.tp[dest], "body": b} for b in bodies])
        got, code = self.call(self.pp.ack_commit, self.np[name], payload, claimed=claimed)
        if m is None:
            assert code == "invalid_proc"
            return
        if m.status == "disabled" and code == "proc_is_disabled":
            return
        if m.pending is None:
            assert code == "invalid_ack"
            return
        if claimed is not None and claimed is not m.last_result:  # that very claim (SPEC §5)
            assert code == "stale_claim"
            return
        assert code is None, code
        self.apply_ack(m)
        assert got.acked == m.last_acked_range
        if n == 0:
            assert isinstance(got.id, str)
        else:
            assert isinstance(got.id, list)
        self.do_commit(dest, bodies, got.id)

    @rule(name=st.sampled_from(NAMES), mode=CLAIMED)
    def reclaim(self, name, mode):
        m = self.procs.get(name)
        claimed = self.claimed_value(m, mode)
        got, code = self.call(self.pp.reclaim, self.np[name], claimed=claimed)
        if m is None:
            assert code == "invalid_proc"
            return
        if m.status == "disabled":
            assert code == "proc_is_disabled"
            return
        if m.pending is None:
            assert code == "nothing_to_reclaim"
            return
        if claimed is not None and claimed is not m.last_result:  # that very claim (SPEC §5)
            assert code == "stale_claim"
            return
        assert code is None, code
        assert got == m.last_acked_range
        m.redeliver = m.pending
        m.pending = None
        m.last_claimed_range = m.last_acked_range
        m.reclaims += 1
        if m.policy == "disable" and m.max_reclaims != -1 and m.reclaims >= m.max_reclaims:
            m.status = "disabled"

    @rule(name=st.sampled_from(NAMES))
    def disable(self, name):
        m = self.procs.get(name)
        got, code = self.call(self.pp.disable_proc, self.np[name])
        if m is None:
            assert code == "invalid_proc"
        elif m.status == "disabled":
            assert code == "proc_already_disabled"
        else:
            assert code is None, code
            assert got.status == "disabled"
            m.status = "disabled"

    @rule(name=st.sampled_from(NAMES))
    def resume(self, name):
        m = self.procs.get(name)
        got, code = self.call(self.pp.resume_proc, self.np[name])
        if m is None:
            assert code == "invalid_proc"
        elif m.status == "active":
            assert code == "proc_already_active"
        else:
            assert code is None, code
            assert got.status == "active" and got.reclaims == 0
            m.status = "active"
            m.reclaims = 0

    @rule(name=st.sampled_from(NAMES))
    def destroy(self, name):
        m = self.procs.get(name)
        got, code = self.call(self.pp.destroy_proc, self.np[name])
        if m is None:
            assert code == "invalid_proc"
            return
        assert code is None, code
        assert got.name == self.np[name] and got.topic == self.tp[m.topic]
        assert got.last_acked_range == m.last_acked_range
        assert got.status == m.status
        del self.procs[name]

    @precondition(lambda self: self.env["restart"] is not None and self.restarts < 2)
    @rule()
    def restart(self):
        self.restarts += 1
        self.env["restart"]()

    # ------------------------------------------------------------ invariants

    @invariant()
    def procs_match_model(self):
        stats = self.pp.stats()
        for name in NAMES:
            m = self.procs.get(name)
            real = self.np[name]
            if m is None:
                got, code = self.call(self.pp.inspect_proc, real)
                assert code == "invalid_proc", (name, code)
                assert real not in stats["procs"]
                continue
            s = self.pp.inspect_proc(real)
            assert s.name == real
            assert s.topic == self.tp[m.topic]
            assert s.offset == m.offset
            assert s.status == m.status, (name, s.status, m.status)
            assert s.reclaims == m.reclaims, (name, s.reclaims, m.reclaims)
            assert s.max_reclaims == m.max_reclaims
            assert s.on_max_reclaims_reached == m.policy
            assert s.last_acked_range == m.last_acked_range
            assert s.last_claimed_range == m.last_claimed_range
            assert s.previous_claimed_range == m.previous_claimed_range
            ps = stats["procs"][real]
            assert ps["topic"] == self.tp[m.topic] and ps["status"] == m.status
            if m.offset in (">", ":0"):
                done = m.acked_last + 1 if m.acked_last is not None else 0
                assert ps["lag"] == len(self.logs[m.topic]) - done, (name, ps["lag"])

    @invariant()
    def topics_match_model(self):
        for t, logs in self.logs.items():
            if logs:
                assert self.pp.length(self.tp[t]) == len(logs)


SETTINGS = dict(deadline=None, database=None, stateful_step_count=40,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("memory", [False, True], ids=["disk", "memory"])
def test_procs_model(spawner, tmp_path, memory):
    loc = tmp_path / "store"
    env: dict = {"pp": spawner(loc, memory=memory), "counter": itertools.count()}

    def restart():
        env["pp"].shutdown()
        env["pp"] = spawner(loc)

    env["restart"] = None if memory else restart
    run_state_machine_as_test(
        lambda: ProcMachine(env),
        settings=settings(max_examples=80 if memory else 50, **SETTINGS),
    )
