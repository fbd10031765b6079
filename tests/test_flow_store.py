"""Workflow runs in the store: journals are topics the GC never collects, runs survive a
restart, `delete` drops the journal, `pipeproc check` counts runs, and a 10-step run costs
twelve durable commits (docs/flow.md, "A 10-step run, commit by commit")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pipeproc
from pipeproc import flow
from procmods import flowmods as fm

from helpers import wait_until

pytestmark = pytest.mark.timeout(60)

RESULT = 20


def _journal(pp, engine, run_id):
    """The run's journal topic: the one topic whose logs are its history."""
    n = len(engine.history(run_id))
    topics = [t for t in pp.topics() if t.startswith("flow-") and pp.length(t) == n]
    return topics


def test_the_gc_never_collects_a_journal_and_delete_drops_it(tmp_path):
    loc = tmp_path / "store"
    with pipeproc.spawn(loc, workers=1, gc={"min_prune_time": 0.05, "interval": 0.05}) as pp:
        eng = flow.Engine(pp)
        assert eng.start(fm.add, 1, 2, id="kept").result(timeout=RESULT) == 3
        before = eng.history("kept")
        pp.commit({"topic": "plain", "body": {"x": 1}})  # a topic no proc protects
        wait_until(lambda: pp.stats()["topics"]["plain"]["stored"] == 0, timeout=10)
        after = eng.history("kept")
        assert [(e.seq, e.type, e.name) for e in after] == \
               [(e.seq, e.type, e.name) for e in before]
        journals = set(t for t in pp.topics() if t.startswith("flow-"))
        assert len(journals) == 1
        eng.delete("kept")
        assert not any(t.startswith("flow-") for t in pp.topics())
        with pytest.raises(flow.InvalidRun):
            eng.history("kept")
        # the id is free again: a new run, a new journal
        run = eng.start(fm.add, 2, 3, id="kept")
        assert run.created and run.result(timeout=RESULT) == 5


def test_runs_and_journals_survive_a_restart_and_check_counts_them(tmp_path):
    loc = tmp_path / "store"
    with pipeproc.spawn(loc, workers=1) as pp:
        eng = flow.Engine(pp)
        long_id = "é" * 200  # longer than LMDB's key limit in UTF-8: keyed by digest
        assert eng.start(fm.add, 1, 1, id=long_id).result(timeout=RESULT) == 2
        assert eng.start(fm.add, 2, 2, id="short").result(timeout=RESULT) == 4
        hist = [(e.type, e.name, e.pos) for e in eng.history(long_id)]
    with pipeproc.spawn(loc, workers=1) as pp:
        eng = flow.Engine(pp)
        assert sorted(r.id for r in eng.runs()) == sorted([long_id, "short"])
        assert eng.run(long_id).result(timeout=RESULT) == 2
        assert [(e.type, e.name, e.pos) for e in eng.history(long_id)] == hist
        assert not eng.start(fm.add, 1, 1, id=long_id).created
    r = subprocess.run([sys.executable, "-m", "pipeproc", "check", "--location", str(loc),
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["runs"] == 2


def test_a_ten_step_run_is_twelve_durable_commits(tmp_path):
    with pipeproc.spawn(tmp_path / "store", workers=1) as pp:
        eng = flow.Engine(pp)
        eng.start(fm.add, 0, 0).result(timeout=RESULT)  # workers warm, modules imported
        w0 = pp.stats()["node"]["write_transactions"]
        run = eng.start(fm.ten_steps)
        assert run.result(timeout=RESULT) == 45
        w1 = pp.stats()["node"]["write_transactions"]
        assert w1 - w0 <= 12, w1 - w0


def test_stats_report_runs_by_status(tmp_path):
    with pipeproc.spawn(tmp_path / "store", workers=1) as pp:
        eng = flow.Engine(pp)
        eng.start(fm.add, 1, 2).result(timeout=RESULT)
        with pytest.raises(flow.RunFailed):
            eng.start(fm.boom, "x").result(timeout=RESULT)
        st = pp.stats()["flow"]
        assert st["runs"] == {"finished": 1, "failed": 1}
