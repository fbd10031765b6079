"""A new user's first hour (issue 13): the demo's hints, quiet setup, CLI messages and
edges, client-side errors, connect at a location without a node, a killed application."""

from __future__ import annotations

import functools
import asyncio
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pipeproc
import pipeproc.aio as aio
from pipeproc import _demo, cli

import helpers
from helpers import pid_alive

wait_until = functools.partial(helpers.wait_until, timeout=20.0)  # this module's deadline

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PIPEPROC_LOCATION", None)
    env.pop("PIPEPROC_ADDRESS", None)
    env.update(extra)
    return env


def run(*args, stdin=None, timeout=60, cwd=None):
    """``python -m pipeproc ARGS`` as a subprocess (as tests/test_cli.py does)."""
    return subprocess.run([sys.executable, "-m", "pipeproc", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd)


@pytest.fixture
def loc(tmp_path):
    location = tmp_path / "store"
    pp = pipeproc.spawn(location, workers=0)
    try:
        yield str(location), pp
    finally:
        pp.shutdown()


# --------------------------------------------------------------------------- setup and demo

def test_demo_hint_command_works_without_the_venv_on_path(tmp_path):
    """The closing hint names a command that runs from a fresh shell (no activated venv)."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = "/nonexistent"
    try:
        cmd = _demo.cli_command()
    finally:
        os.environ["PATH"] = old
    assert not cmd.startswith("python -m"), cmd
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path)}
    r = subprocess.run(shlex.split(cmd) + ["--version"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, (cmd, r.stderr)
    assert "pipeproc" in r.stdout


def test_readme_commands_work_from_a_fresh_clone():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert ".venv/bin/pipeproc" in readme
    assert "python -m pipeproc node" not in readme


def test_pyproject_license_is_a_pep639_string():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert meta["project"]["license"] == "BSD-3-Clause"
    assert not [c for c in meta["project"]["classifiers"] if c.startswith("License ::")]
    assert any(r.replace(" ", "").startswith("setuptools>=77")
               for r in meta["build-system"]["requires"])


# --------------------------------------------------------------------------- the CLI

def test_address_without_a_key_says_what_is_missing(tmp_path):
    r = run("--address", "127.0.0.1:9", "topics", cwd=tmp_path)
    assert r.returncode == cli.RET_USAGE, r.stderr
    assert "needs the node's key" in r.stderr
    assert "--location" in r.stderr and "node.key" in r.stderr


def test_address_with_the_location_of_the_key_works(tmp_path):
    location = tmp_path / "tcp"
    with pipeproc.spawn(location, workers=0, address=("127.0.0.1", 0)) as pp:
        pp.commit({"topic": "t", "body": {"n": 1}})
        host, port = pp.address
        r = run("--address", f"{host}:{port}", "--location", location, "length", "t")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


@pytest.mark.parametrize("limit", ["-3", "0"])
def test_range_limit_below_one_is_a_usage_error(loc, limit):
    location, pp = loc
    pp.commit([{"topic": "t", "body": {"n": n}} for n in range(3)])
    r = run("--location", location, "range", "t", "--limit", limit)
    assert r.returncode == cli.RET_USAGE
    assert r.stdout == ""
    assert "--limit" in r.stderr
    # the API keeps SPEC semantics (limit <= 0: no limit)
    assert len(pp.range("t", limit=int(limit))) == 3


def test_topics_and_procs_on_an_empty_store_say_so(loc):
    location, _ = loc
    r = run("--location", location, "topics")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["TOPIC  LENGTH  STORED", "(no topics)"]
    r = run("--location", location, "procs")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "TOPIC", "STATUS"] and lines[1] == "(no procs)"
    assert json.loads(run("--location", location, "--json", "topics").stdout) == []
    assert json.loads(run("--location", location, "--json", "procs").stdout) == {}


def test_destroy_says_the_proc_was_destroyed(loc):
    location, pp = loc
    pp.commit({"topic": "t", "body": {"n": 1}})
    pp.proc("t", name="p")
    r = run("--location", location, "destroy", "p")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("proc p destroyed")
    assert "status:" in r.stdout
    assert "p" not in pp.stats()["procs"]
    pp.proc("t", name="q")
    r = run("--location", location, "--json", "destroy", "q")
    assert json.loads(r.stdout)["name"] == "q"  # --json stays the state alone


def test_large_bodies_are_shortened_in_the_table_view_only(loc):
    location, pp = loc
    body = {"hours": list(range(100)), "name": "x" * 50}
    pp.commit({"topic": "totals", "body": body})
    full = json.dumps(body, separators=(",", ":"))
    for cmd in (["tail", "totals", "-n", "1"], ["range", "totals"]):
        r = run("--location", location, *cmd)
        assert r.returncode == 0, r.stderr
        line = r.stdout.rstrip("\n")
        assert "\n" not in line
        shown = line.split("\t", 1)[1]
        assert len(shown) < 260 and "…" in shown and f"({len(full)} chars" in shown
        assert full.startswith(shown.split("…")[0])
        r = run("--location", location, "--json", *cmd)
        assert json.loads(r.stdout)["body"] == body  # --json stays complete
    pp.commit({"topic": "small", "body": {"n": 1}})
    r = run("--location", location, "tail", "small")
    assert r.stdout.rstrip("\n").split("\t")[1] == '{"n":1}'


def test_commit_bad_json_prints_the_commit_usage(loc):
    location, pp = loc
    r = run("--location", location, "commit", "t", "{bad")
    assert r.returncode == cli.RET_USAGE
    assert r.stderr.startswith("usage: pipeproc commit"), r.stderr
    assert "argument 1 is not JSON" in r.stderr


# --------------------------------------------------------------------------- client errors

@pytest.mark.parametrize("n", [2 ** 64, -(2 ** 63) - 1, 10 ** 40])
def test_int_out_of_range_says_so(node, n):
    with pytest.raises(pipeproc.PipeProcError) as ei:
        node.commit({"topic": "t", "body": {"n": n}})
    assert ei.value.code == "invalid_log_format"
    msg = str(ei.value)
    assert "out of msgpack's range" in msg and "2**63" in msg and "2**64" in msg
    assert "unsupported type" not in msg
    node.commit({"topic": "t", "body": {"n": 2 ** 64 - 1, "m": -(2 ** 63)}})  # the bounds fit


def test_int_out_of_range_from_the_cli(loc):
    location, _ = loc
    r = run("--location", location, "commit", "t", '{"n": 18446744073709551616}')
    assert r.returncode == cli.RET_ERROR
    assert "out of msgpack's range" in r.stderr


# --------------------------------------------------------------------------- connect

def test_connect_fails_at_once_where_no_node_runs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    t0 = time.monotonic()
    with pytest.raises(pipeproc.NoActiveNode) as ei:
        pipeproc.connect(empty, timeout=30)
    assert time.monotonic() - t0 < 5
    assert "no node is running or starting" in str(ei.value)
    assert "pipeproc node --location" in str(ei.value)

    async def main():
        t0 = time.monotonic()
        with pytest.raises(pipeproc.NoActiveNode):
            await aio.connect(empty, timeout=30)
        return time.monotonic() - t0
    assert asyncio.run(main()) < 5


def test_connect_fails_at_once_after_the_node_stopped(tmp_path):
    location = tmp_path / "was"
    pipeproc.spawn(location, workers=0).shutdown()
    t0 = time.monotonic()
    with pytest.raises(pipeproc.NoActiveNode):
        pipeproc.connect(location, timeout=30)
    assert time.monotonic() - t0 < 5


def test_connect_waits_while_a_node_holds_the_lock(tmp_path):
    """A held lock without address/key files is a node starting: connect keeps trying."""
    location = tmp_path / "starting"
    location.mkdir()
    fd = os.open(location / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        t0 = time.monotonic()
        with pytest.raises(pipeproc.NoActiveNode) as ei:
            pipeproc.connect(location, timeout=1.0)
        assert time.monotonic() - t0 >= 0.9
        assert "gave up after" in str(ei.value)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- a killed app

APP = textwrap.dedent('''
    import sys, time
    import pipeproc
    if __name__ == "__main__":
        pp = pipeproc.spawn(sys.argv[1], workers=1)
        pp.system_proc(name="slow", from_="in", processor="procmods.firsthour:sleep_then_done",
                       to="out")
        pp.commit({"topic": "in", "body": {"s": float(sys.argv[2])}})
        while not pp.inspect_proc("slow").last_claimed_range:
            time.sleep(0.01)
        st = pp.stats()
        print(st["node"]["pid"], st["workers"][0]["pid"], flush=True)
        time.sleep(120)
''')


def _kill_app_during_processor(tmp_path, seconds: float) -> tuple:
    script = tmp_path / "app.py"
    script.write_text(APP)
    location = tmp_path / "store"
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE])
    p = subprocess.Popen([sys.executable, str(script), str(location), str(seconds)],
                         stdout=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    try:
        node_pid, worker_pid = map(int, p.stdout.readline().split())
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    t0 = time.monotonic()
    wait_until(lambda: not pid_alive(node_pid) and not pid_alive(worker_pid), timeout=40,
               what="node and worker gone")
    return time.monotonic() - t0, location


def test_killed_app_node_lets_the_running_processor_finish_and_saves_it(tmp_path):
    """README Guarantees: a processor in flight when the application dies gets up to 10 s
    to finish; its result is saved, then node and workers exit."""
    elapsed, location = _kill_app_during_processor(tmp_path, 2.0)
    assert elapsed < 10
    with pipeproc.spawn(location, workers=0) as pp:
        assert [lg.body for lg in pp.range("out")] == [{"done": True}]


@pytest.mark.slow
def test_killed_app_outlived_by_at_most_the_grace_period(tmp_path):
    elapsed, _ = _kill_app_during_processor(tmp_path, 60.0)
    assert 8 <= elapsed < 15
