"""A hypothesis state machine of workers' claims over a chain of system procs, in-process
(the node's parts around a real store, no processes): commits, claims, outcomes (ack,
commit to the next stage, reclaim), disable and resume, in any order and any grouping of
requests into write rounds, against the rule the drained-stage skip must keep:

    a worker's claim that finds nothing leaves no system proc claimable: every active
    proc with no claim pending has no log past its position (in the claim's own round).

And the chain always drains: with every stage active, claiming and acking until nothing
is left processes every log.
"""

from __future__ import annotations

import shutil
import tempfile
import threading

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from pipeproc import _procs
from pipeproc._store import Store
from pipeproc._syshandlers import SysHandlers
from pipeproc._waits import Deadlines, SysDefs, Timers, Waits, skipped
from pipeproc._writer import Job, Writer
from pipeproc.errors import PipeProcError

K = 4  # stages s0..s3: t0 -> t1 -> ... -> t4
BODY = msgpack.packb({"n": 1})


class Stages(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pipeproc-ready-")
        self.store = Store(self.dir + "/s", durability="fast")
        tx = self.store.begin()
        for i in range(K):
            _procs.ensure(tx, f"s{i}", f"t{i}", ">", 1000, 30.0, "disable")
            tx.put_sysproc(f"s{i}", {"procs": [f"s{i}"], "topics": [f"t{i}"],
                                     "processor": "m:f", "to": [f"t{i + 1}"], "count": 1,
                                     "multi": False, "created_at": tx.now,
                                     "backoff": [0.1, 30.0]})
        tx.commit()
        self.sysdefs = SysDefs(self.store)
        timers = Timers()
        self.writer = Writer(self.store, False, self.sysdefs.committed)
        waits = Waits(self.store, self.writer, timers, self.sysdefs)
        deadlines = Deadlines(self.store, self.writer, timers, self.sysdefs, waits)
        self.sysh = SysHandlers(self.store, self.writer, timers, waits, deadlines,
                                self.sysdefs, threading.Event())
        self.held: dict = {}  # stage -> the key of its pending claim (the "worker" holds it)
        self.violations: list = []
        self.rid = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers

    def _round(self, fns: list, refused_ok: bool = False) -> list:
        out: list = []
        jobs = [Job(fn, lambda ok, v, out=out: out.append((ok, v))) for fn in fns]
        self.writer._round(jobs)
        for ok, v in out:
            assert ok or (refused_ok and isinstance(v, PipeProcError)), v
        return [v for _, v in out]

    def _claim_fn(self):
        self.rid += 1
        rid = self.rid

        def fn(tx):
            got = self.sysh._claim_any(tx, rid)
            if got is None:
                self._check_nothing_claimable(tx)
            return got
        return fn

    def _check_nothing_claimable(self, tx) -> None:
        for i in range(K):
            name = f"s{i}"
            rec = tx.proc(name)
            if (rec["status"] != "active" or _procs.pending(rec)
                    or name in skipped(tx) or self.sysh.deadlines.in_backoff(name)):
                continue  # not claimable by design (a failure in this round: its back-off)
            meta = tx.topic(rec["topic"])
            if meta is not None and _procs.position(tx, rec) < meta.next:
                self.violations.append((name, _procs.position(tx, rec), meta.next,
                                        dict(self.sysdefs.empty)))

    def _took(self, got) -> None:
        if got is not None:
            name, key, _ = got
            assert name not in self.held
            self.held[name] = key

    def _assert_no_violation(self) -> None:
        assert not self.violations, (
            "a claim found nothing while a stage had work: " + repr(self.violations))

    # -- rules

    @rule(i=st.integers(0, K - 1), n=st.integers(1, 3), then_claim=st.booleans())
    def commit(self, i, n, then_claim):
        fns = [lambda tx: tx.append([(f"t{i}", BODY)] * n)]
        if then_claim:  # a client's commit and a worker's claim in one round
            fns.append(self._claim_fn())
        got = self._round(fns)
        if then_claim:
            self._took(got[-1])
        self._assert_no_violation()

    @rule()
    def claim(self):
        self._took(self._round([self._claim_fn()])[0])
        self._assert_no_violation()

    @precondition(lambda self: self.held)
    @rule(data=st.data(), kind=st.sampled_from(["ack", "commit", "reclaim"]),
          next_claim=st.booleans())
    def outcome(self, data, kind, next_claim):
        """A worker's ``work``: the outcome of its claim, then (maybe) its next claim."""
        name = data.draw(st.sampled_from(sorted(self.held)))
        key = self.held.pop(name)
        i = int(name[1:])
        items = [(f"t{i + 1}", BODY)] if kind == "commit" else (
            {"type": "X", "message": "boom"} if kind == "reclaim" else None)
        claim = self._claim_fn()

        def fn(tx):
            self.sysh._apply_outcome(tx, name, key, kind, items)
            return claim(tx) if next_claim else None
        self._took(self._round([fn])[0])
        rec = self.store.procs[name]
        if _procs.pending(rec) and rec["claimed"] == key[:4] and name not in self.held:
            self.held[name] = key  # the outcome was dropped (a reclaim of a disabled proc)
        self._assert_no_violation()

    @rule(i=st.integers(0, K - 1), resume=st.booleans())
    def disable_or_resume(self, i, resume):
        name = f"s{i}"
        if resume:  # refused when already active, as a client's resume_proc is
            self._round([lambda tx: _procs.resume(tx, name)], refused_ok=True)
        else:
            self._round([lambda tx: _procs.disable(tx, name)], refused_ok=True)
            # its pending claim stays pending: the worker still reports its outcome

    @rule()
    def drain(self):
        """Every stage active; claim and ack until nothing is left: every log of every
        topic t0..t3 is past its stage's position."""
        for i in range(K):
            self._round([lambda tx, n=f"s{i}": _procs.resume(tx, n)
                         if tx.proc(n)["status"] != "active" else None])
        for name, key in list(self.held.items()):
            self._round([lambda tx, n=name, k=key: self.sysh._apply_outcome(
                tx, n, k, "ack", None)])
        self.held.clear()
        for _ in range(10_000):
            got = self._round([self._claim_fn()])[0]
            if got is None:
                break
            name, key, _ = got
            i = int(name[1:])
            self._round([lambda tx, n=name, k=key, i=i: self.sysh._apply_outcome(
                tx, n, k, "commit", [(f"t{i + 1}", BODY)])])
        self._assert_no_violation()
        with self.store.reader() as r:
            for i in range(K):
                rec = self.store.procs[f"s{i}"]
                meta = r.topic(f"t{i}")
                if meta is not None:
                    assert _procs.position(r, rec) == meta.next, (f"s{i}", rec, meta)


def test_a_claim_that_finds_nothing_leaves_no_stage_claimable():
    run_state_machine_as_test(
        Stages, settings=settings(max_examples=200, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow]))
