"""The proc state machine of ``pipeproc._procs`` in-process, with an injectable clock.

No node, no sockets: a fake transaction view holds topics and proc records in dicts, and a
hypothesis state machine drives claims, acks, reclaims (manual and by timeout, by moving the
clock), disable/resume/destroy and GC cuts against a plain model.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipeproc import _procs
from pipeproc._records import record, record_ms
from pipeproc.errors import (
    InvalidAck,
    NothingToReclaim,
    ProcIsDisabled,
    StaleClaim,
)


class Meta:
    def __init__(self) -> None:
        self.tid, self.next, self.first = 1, 0, 0


class FakeTx:
    """The subset of ``WriteTx`` the proc functions use."""

    def __init__(self) -> None:
        self.now = 1_000
        self.meta = Meta()
        self.logs: Dict[int, bytes] = {}
        self.procs: Dict[str, Optional[dict]] = {}

    def topic(self, name: str) -> Optional[Meta]:
        return self.meta if name == "t" and self.meta.next > 0 else None

    def ms_at(self, tid: int, seq: int) -> int:
        return record_ms(self.logs[seq])

    def records(self, meta: Meta, lo: int, hi: int, limit: int, reverse: bool,
                max_bytes: int = 0) -> List[bytes]:
        return [self.logs[q] for q in range(max(lo, meta.first), min(hi, meta.next - 1) + 1)][:limit]

    def proc(self, name: str) -> Optional[dict]:
        return self.procs.get(name)

    def put_proc(self, name: str, rec: Optional[dict]) -> None:
        if rec is None:
            self.procs.pop(name, None)
        else:
            self.procs[name] = rec

    def commit(self, n: int) -> None:
        for _ in range(n):
            seq = self.meta.next
            self.logs[seq] = record(self.now, seq, b"\x80")
            self.meta.next += 1


def test_timeout_reclaims_and_redelivers_with_the_clock():
    tx = FakeTx()
    tx.commit(3)
    recs = _procs.proc(tx, "p", "t", ">", 2, 3, 5.0, "disable")
    assert [int.from_bytes(r[11:19], "big") for r in recs] == [0, 1]
    tx.now += 4_999
    assert _procs.proc(tx, "p", "t", ">", 2, 3, 5.0, "disable") is None  # still pending
    tx.now += 1
    again = _procs.proc(tx, "p", "t", ">", 2, 3, 5.0, "disable")
    assert again == recs and tx.procs["p"]["reclaims"] == 1
    # two more timeouts reach max_reclaims=3 and disable the proc in the same write
    for _ in range(2):
        tx.now += 5_000
        _procs.proc(tx, "p", "t", ">", 2, 3, 5.0, "disable")
    assert tx.procs["p"]["status"] == "disabled" and tx.procs["p"]["reclaims"] == 3
    with pytest.raises(ProcIsDisabled):
        _procs.proc(tx, "p", "t", ">", 2, 3, 5.0, "disable")


def test_disabled_claim_does_not_time_out_and_resume_rearms():
    tx = FakeTx()
    tx.commit(1)
    _procs.proc(tx, "p", "t", ">", 1, 10, 1.0, "disable")
    _procs.disable(tx, "p")
    tx.now += 60_000
    assert _procs.deadline(tx.procs["p"]) is None
    _procs.resume(tx, "p")
    assert _procs.pending(tx.procs["p"])
    assert _procs.deadline(tx.procs["p"]) == tx.now + 1_000


class ProcMachine(RuleBasedStateMachine):
    """One topic, two procs; the model tracks acked position, pending claim and reclaims."""

    NAMES = ("a", "b")

    @initialize()
    def setup(self) -> None:
        self.tx = FakeTx()
        self.model: Dict[str, dict] = {}
        self.timeout_ms = 2_000

    def _m(self, name: str) -> dict:
        return self.model.setdefault(name, {"pos": 0, "pending": None, "reclaims": 0,
                                            "disabled": False, "acked": None})

    def _timeout(self, m: dict) -> None:
        if m["pending"] is not None and not m["disabled"] and self.tx.now >= m["since"] + self.timeout_ms:
            m["pending"] = None
            m["reclaims"] += 1
            if m["reclaims"] >= 3:
                m["disabled"] = True

    @rule(n=st.integers(1, 4))
    def commit(self, n: int) -> None:
        self.tx.commit(n)

    @rule(ms=st.integers(0, 3_000))
    def tick(self, ms: int) -> None:
        self.tx.now += ms

    @rule(name=st.sampled_from(NAMES), count=st.integers(1, 3))
    def claim(self, name: str, count: int) -> None:
        m = self._m(name)
        if m["disabled"]:
            with pytest.raises(ProcIsDisabled):
                _procs.proc(self.tx, name, "t", ">", count, 3, 2.0, "disable")
            return
        self._timeout(m)
        got = _procs.proc(self.tx, name, "t", ">", count, 3, 2.0, "disable")
        if m["disabled"] or m["pending"] is not None or m["pos"] >= self.tx.meta.next:
            assert got is None
            return
        seqs = [int.from_bytes(r[11:19], "big") for r in got]
        hi = min(m["pos"] + count, self.tx.meta.next) - 1
        assert seqs == list(range(m["pos"], hi + 1))
        m["pending"] = (m["pos"], hi)
        m["since"] = self.tx.now

    @rule(name=st.sampled_from(NAMES))
    def ack(self, name: str) -> None:
        if name not in self.tx.procs:
            return
        m = self._m(name)  # ack sees the record as stored: only proc()/timers expire claims
        if m["pending"] is None:
            if m["acked"] is None:
                with pytest.raises(InvalidAck):
                    _procs.ack(self.tx, name, None)
            else:
                assert _procs.ack(self.tx, name, None).endswith(f"-{m['acked'][1]}")
            return
        out = _procs.ack(self.tx, name, None)
        assert out.endswith(f"-{m['pending'][1]}")
        m["acked"] = m["pending"]
        m["pos"] = m["pending"][1] + 1
        m["pending"] = None
        m["reclaims"] = 0

    @rule(name=st.sampled_from(NAMES))
    def reclaim(self, name: str) -> None:
        if name not in self.tx.procs:
            return
        m = self._m(name)
        if m["disabled"]:
            with pytest.raises(ProcIsDisabled):
                _procs.reclaim(self.tx, name, None)
            return
        if m["pending"] is None:
            with pytest.raises(NothingToReclaim):
                _procs.reclaim(self.tx, name, None)
            return
        _procs.reclaim(self.tx, name, None)
        m["pending"] = None
        m["reclaims"] += 1
        if m["reclaims"] >= 3:
            m["disabled"] = True

    @rule(name=st.sampled_from(NAMES))
    def stale_ack(self, name: str) -> None:
        if name not in self.tx.procs:
            return
        before = dict(self.tx.procs[name])
        with pytest.raises((StaleClaim, InvalidAck)):
            _procs.ack(self.tx, name, [0, 10**9, 0, 10**9, 1, 0])
        assert self.tx.procs[name] == before

    @precondition(lambda self: bool(self.model))
    @rule(name=st.sampled_from(NAMES))
    def resume(self, name: str) -> None:
        m = self.model.get(name)
        if m is None or not m["disabled"] or name not in self.tx.procs:
            return
        _procs.resume(self.tx, name)
        m["disabled"] = False
        m["reclaims"] = 0
        m["since"] = self.tx.now

    @invariant()
    def records_match(self) -> None:
        for name, m in self.model.items():
            rec = self.tx.procs.get(name)
            if rec is None:
                continue
            assert rec["reclaims"] == m["reclaims"]
            assert (rec["status"] == "disabled") == m["disabled"]
            assert _procs.pending(rec) == (m["pending"] is not None)
            assert _procs.position(self.tx, rec) == max(m["pos"], self.tx.meta.first)

    @invariant()
    def gc_never_passes_a_proc(self) -> None:
        procs = [r for r in self.tx.procs.values()]
        upto = _procs.gc_upto(self.tx, "t", self.tx.meta, procs, cutoff_ms=10**15)
        for name, m in self.model.items():
            if name in self.tx.procs:
                lo = m["pending"][0] if m["pending"] else m["pos"]
                assert upto <= lo


ProcMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestProcMachine = ProcMachine.TestCase
