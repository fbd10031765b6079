"""The workflow commands (FLOW.md §5: ``pipeproc runs``, ``pipeproc run ID``) and the demo's
second act (``pipeproc demo --flow``), run as real subprocesses against real nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pipeproc
from helpers import wait_until
from pipeproc import cli, flow
from procmods import flow_cli_mods as mods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timeout(120)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PIPEPROC_LOCATION", None)
    env.pop("PIPEPROC_ADDRESS", None)
    return env


def run(*args, timeout=60):
    """Run ``python -m pipeproc ARGS``; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "pipeproc", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def runs_node(tmp_path_factory):
    """A node with one worker holding four runs: ok-1 and ok-2 finished, boom-1 failed,
    wait-1 waiting for a signal. Yields (location, engine)."""
    location = tmp_path_factory.mktemp("flowcli") / "store"
    pp = pipeproc.spawn(location, workers=1)
    try:
        engine = flow.Engine(pp)
        engine.start(mods.ok, 1, id="ok-1").result(timeout=30)
        engine.start(mods.ok, 2, id="ok-2").result(timeout=30)
        with pytest.raises(flow.RunFailed):
            engine.start(mods.boom, id="boom-1").result(timeout=30)
        waiting = engine.start(mods.waits, id="wait-1")
        wait_until(lambda: waiting.status() == "waiting", 30, "wait-1 waiting")
        yield str(location), engine
        engine.close()
    finally:
        pp.shutdown()


def _table(stdout):
    """Rows of a printed table (header first) as lists of cells split on 2+ spaces."""
    import re
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


# --------------------------------------------------------------------------- runs

def test_help_lists_the_workflow_commands():
    r = run("--help")
    assert r.returncode == cli.RET_OK
    assert "runs" in r.stdout and "run" in r.stdout and "demo --flow" in r.stdout
    r = run("runs", "--help")
    assert r.returncode == 0 and "--status" in r.stdout and "--workflow" in r.stdout
    r = run("run", "--help")
    assert r.returncode == 0 and "ID" in r.stdout


def test_runs_on_an_empty_node_prints_the_header(node):
    r = run("runs", "--location", node.location)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0].split() == ["ID", "WORKFLOW", "STATUS", "ATTEMPT", "UPDATED",
                                               "ERROR"]
    assert "(no runs)" in r.stdout
    r = run("runs", "--location", node.location, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_runs_table_lists_every_run_oldest_first(runs_node):
    location, _ = runs_node
    r = run("runs", "--location", location)
    assert r.returncode == 0, r.stderr
    rows = _table(r.stdout)
    assert rows[0] == ["ID", "WORKFLOW", "STATUS", "ATTEMPT", "UPDATED", "ERROR"]
    body = {row[0]: row for row in rows[1:]}
    assert [row[0] for row in rows[1:]] == ["ok-1", "ok-2", "boom-1", "wait-1"]
    assert body["ok-1"][1:4] == ["cli-ok", "finished", "1"]
    assert body["boom-1"][1:3] == ["cli-boom", "failed"]
    assert "RuntimeError: kaboom" in body["boom-1"][-1]
    assert body["wait-1"][1:3] == ["cli-wait", "waiting"]
    assert body["ok-1"][-1] == "-"
    # UPDATED is a date and time
    assert body["ok-1"][4][:2] == "20" and ":" in body["ok-1"][4]


def test_runs_status_filter_repeatable_and_comma_list(runs_node):
    location, _ = runs_node

    def ids(*args):
        r = run("runs", "--location", location, *args)
        assert r.returncode == 0, r.stderr
        return [row[0] for row in _table(r.stdout)[1:] if row[0] != "(no runs)"]

    assert ids("--status", "finished") == ["ok-1", "ok-2"]
    assert ids("--status", "failed", "--status", "waiting") == ["boom-1", "wait-1"]
    assert ids("--status", "failed,waiting") == ["boom-1", "wait-1"]
    assert ids("--status", "finished,failed", "--status", "waiting") == [
        "ok-1", "ok-2", "boom-1", "wait-1"]
    assert ids("--status", "cancelled") == []
    assert ids("--workflow", "cli-ok") == ["ok-1", "ok-2"]
    assert ids("--workflow", "cli-ok", "--status", "failed") == []
    assert ids("--workflow", "no-such-workflow") == []
    assert ids("--limit", "2") == ["boom-1", "wait-1"]


def test_runs_unknown_status_is_a_usage_error(runs_node):
    location, _ = runs_node
    r = run("runs", "--location", location, "--status", "done")
    assert r.returncode == cli.RET_USAGE
    assert "unknown status 'done'" in r.stderr
    assert run("runs", "--location", location, "--status", ",").returncode == cli.RET_USAGE
    assert run("runs", "--location", location, "--limit", "0").returncode == cli.RET_USAGE


def test_runs_json_is_a_list_of_run_infos(runs_node):
    location, engine = runs_node
    r = run("runs", "--location", location, "--json", "--status", "finished,failed")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [d["id"] for d in got] == ["ok-1", "ok-2", "boom-1"]
    for d in got:
        assert set(d) == {"id", "workflow", "status", "attempt", "created_at", "updated_at",
                          "error", "parent_id", "version"}
        info = engine.run(d["id"]).info()
        assert d["status"] == info.status and d["updated_at"] == info.updated_at
        assert d["workflow"] == info.workflow and d["version"] == info.version
    assert got[0]["error"] is None
    assert got[2]["error"]["type"] == "RuntimeError"
    assert got[2]["error"]["message"] == "kaboom"


def test_runs_without_a_node_exits_3(tmp_path):
    r = run("runs", "--location", tmp_path / "nothing", "--timeout", "0.2")
    assert r.returncode == cli.RET_CONNECT
    assert "no_active_node" in r.stderr


# --------------------------------------------------------------------------- run ID

def test_run_prints_info_then_one_event_a_line(runs_node):
    location, engine = runs_node
    r = run("run", "ok-1", "--location", location)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    fields = {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in lines
              if ln and not ln.startswith(" ") and ":" in ln.split()[0]}
    assert fields["id"] == "ok-1" and fields["workflow"] == "cli-ok"
    assert fields["status"] == "finished" and fields["attempt"] == "1"
    assert fields["error"] == "-" and fields["parent_id"] == "-"
    assert fields["result"] == '{"n":2}'
    history = engine.history("ok-1")
    start = lines.index(f"history ({len(history)} events):")
    table = lines[start + 1:]
    assert table[0].split() == ["SEQ", "TIME", "POS", "TYPE", "NAME", "DATA"]
    assert len(table) == len(history) + 1
    for line, ev in zip(table[1:], history):
        cells = line.split()
        assert int(cells[0]) == ev.seq
        assert cells[2] == ("-" if ev.pos is None else str(ev.pos))
        assert cells[3] == ev.type
    types = [ev.type for ev in history]
    assert types[0] == "status" and "step" in types and "log" in types
    step_line = table[1 + types.index("step")]
    assert " add " in step_line and '"result":2' in step_line


def test_run_failed_shows_the_error(runs_node):
    location, _ = runs_node
    r = run("run", "boom-1", "--location", location)
    assert r.returncode == 0, r.stderr
    assert "status:      failed" in r.stdout
    assert "error:       RuntimeError: kaboom" in r.stdout
    assert "result:" not in r.stdout


def test_run_json_is_the_info_with_history(runs_node):
    location, engine = runs_node
    r = run("run", "ok-2", "--location", location, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    info = engine.run("ok-2").info()
    for k in ("id", "workflow", "status", "attempt", "created_at", "updated_at", "error",
              "parent_id", "version"):
        assert doc[k] == getattr(info, k)
    assert doc["result"] == {"n": 3}
    history = engine.history("ok-2")
    assert [e["seq"] for e in doc["history"]] == [ev.seq for ev in history]
    assert [e["type"] for e in doc["history"]] == [ev.type for ev in history]
    assert doc["history"][0]["data"]["args"] == [2]
    assert set(doc["history"][0]) == {"seq", "type", "name", "ts", "pos", "data"}
    r = run("run", "wait-1", "--location", location, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "waiting"
    assert "result" not in json.loads(r.stdout)


def test_run_unknown_id_exits_1_with_invalid_run(runs_node):
    location, _ = runs_node
    r = run("run", "no-such-run", "--location", location)
    assert r.returncode == cli.RET_ERROR
    assert "invalid_run" in r.stderr and r.stdout == ""
    r = run("run", "no-such-run", "--location", location, "--json")
    assert r.returncode == cli.RET_ERROR
    assert json.loads(r.stderr)["error"] == "invalid_run"
    assert run("run", "--location", location).returncode == cli.RET_USAGE


def test_run_signalled_run_then_finished(runs_node):
    """The CLI sees a run move on: wait-1 waits, a signal finishes it."""
    location, engine = runs_node
    engine.signal("wait-1", "go", {"x": [1, 2]})
    assert engine.run("wait-1").result(timeout=30) == {"x": [1, 2]}
    r = run("run", "wait-1", "--location", location)
    assert r.returncode == 0, r.stderr
    assert "status:      finished" in r.stdout and 'result:      {"x":[1,2]}' in r.stdout
    assert any(line.split()[3:5] == ["signal", "go"] for line in r.stdout.splitlines()
               if len(line.split()) > 4)


# --------------------------------------------------------------------------- the demo, act 2

def test_demo_flow_kills_a_worker_and_no_completed_step_runs_twice(tmp_path):
    location = tmp_path / "demo"
    r = run("demo", "--flow", "--location", location, timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "each completed step ran once: yes" in out
    assert "kill -9 worker" in out
    assert "try 1 failed" in out and "try 2 failed" in out
    assert "durable sleep 'cool-off'" in out and "approval signal sent" in out
    assert "order-1 finished" in out
    # the side effects, counted outside pipeproc
    effects = [json.loads(line) for line in
               (location / "demo-flow-effects.jsonl").read_text().splitlines()]

    def count(run_id, step, event):
        return sum(1 for e in effects
                   if e["run"] == run_id and e["step"] == step and e["event"] == event)

    assert count("order-1", "charge", "start") == 3 and count("order-1", "charge", "fail") == 2
    assert count("order-1", "pack", "start") == 2 and count("order-1", "pack", "done") == 1
    for step in ("reserve", "charge", "pack", "ask-approval", "receipt"):
        assert count("order-1", step, "done") == 1, step
    child = "order-1/demo-shipping-0"
    for step in ("label", "handover"):
        assert count(child, step, "done") == 1, step
    # the CLI on the demo's store: both runs finished, the order after a second attempt
    with pipeproc.spawn(location, workers=0):
        r = run("runs", "--location", location, "--json")
        got = {d["id"]: d for d in json.loads(r.stdout)}
        assert got["order-1"]["status"] == "finished" and got["order-1"]["attempt"] >= 2
        assert got[child]["status"] == "finished" and got[child]["parent_id"] == "order-1"
