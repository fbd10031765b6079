"""``python -m pipeproc._check --location DIR``: the child process ``pipeproc check`` runs
(the CLI is client side and imports no node-side module), its JSON report and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeproc import _store
from pipeproc._store import Store


def _child(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeproc._check", *args],
                          capture_output=True, text=True, timeout=60)


def test_the_child_reports_a_refusal_as_json_with_exit_2(tmp_path):
    r = _child("--location", str(tmp_path / "nowhere"))
    assert r.returncode == 2, r.stderr
    assert json.loads(r.stdout) == {"error": "invalid_argument",
                                    "message": f"there is no store at {tmp_path / 'nowhere'}"}


def test_the_child_prints_the_report_exit_0_when_sound_1_on_damage(tmp_path):
    path = str(tmp_path / "loc" / "store")
    os.makedirs(path)
    store = Store(path)
    try:
        tx = store.begin()
        tx.append([("t", b"\xa1x")] * 6)
        tx.commit()
    finally:
        store.close()
    r = _child("--location", str(tmp_path / "loc"))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True and report["topics"] == 1 and report["logs"] == 6

    store = Store(path)
    try:
        with store.env.begin(write=True) as txn:
            txn.delete(_store.log_key(1, 2), db=store.db_logs)
    finally:
        store.close()
    r = _child("--location", str(tmp_path / "loc"))
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is False and "logs 2..2 of topic 't' are missing" in report["listed"]
