"""Every script in examples/ runs to completion at its small default size."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name, *args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=100)


def test_every_example_is_tested():
    scripts = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
    assert scripts == ["asyncio_app.py", "embedded_app.py", "producer_consumer.py"]


def test_embedded_app(tmp_path):
    r = run_example("embedded_app.py", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100 squares, sum 328350" in r.stdout
    assert os.listdir(tmp_path) == []  # its temporary store is removed


def test_embedded_app_rerun_on_a_kept_store(tmp_path):
    for _ in range(2):  # the system proc already exists the second time
        r = run_example("embedded_app.py", "--count", "20", "--location", tmp_path / "s",
                        cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "20 squares, sum 2470" in r.stdout
    assert "squares topic length: 40" in r.stdout


def test_producer_consumer(tmp_path):
    r = run_example("producer_consumer.py", "--location", tmp_path / "s", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "billed 200 orders, total 10100" in r.stdout
    assert "committed 200 orders" in r.stdout
    assert "200 orders, 200 invoices" in r.stdout


def test_asyncio_app(tmp_path):
    pytest.importorskip("pipeproc.aio")
    r = run_example("asyncio_app.py", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100 shouts" in r.stdout and "ALPHA!" in r.stdout
