"""Issue 14 items 6 and 12 on a real full disk: a tiny tmpfs mounted in a temp dir (root
only; skipped otherwise). A full disk is ``storage_full`` (never ``internal_error``), spawning
on a full disk leaves nothing behind, and the GC frees a disk-full store of small logs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest

import pipeproc

pytestmark = pytest.mark.slow

MB = 1 << 20


@contextlib.contextmanager
def tmpfs(tmp_path, size_mb):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = str(tmp_path / "tmpfs")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", mnt],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def _fill_disk(path):
    """Fill the filesystem of ``path`` with a ballast file; returns its path."""
    ballast = os.path.join(path, "ballast")
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return ballast


def _commit_until_full(pp, batch, limit=100_000):
    committed = 0
    for _ in range(limit):
        try:
            pp.commit(batch)
        except pipeproc.PipeProcError as exc:
            assert exc.code == "storage_full", str(exc)
            return committed
        committed += len(batch)
    raise AssertionError("the disk never filled up")


@pytest.mark.parametrize("durability", ["full", "fast"])
def test_a_full_disk_is_storage_full_and_keeps_every_acked_log(tmp_path, durability):
    with tmpfs(tmp_path, 24) as mnt:
        pp = pipeproc.spawn(os.path.join(mnt, "loc"), workers=0, durability=durability)
        try:
            batch = [{"topic": "t", "body": {"n": i, "pad": "x" * 200}} for i in range(200)]
            n = _commit_until_full(pp, batch)
            assert n > 0
            for _ in range(3):  # stays storage_full, the node stays up
                with pytest.raises(pipeproc.StorageFull):
                    pp.commit(batch)
            assert pp.length("t") == n
            assert len(pp.range("t", ":0", ":99")) == 100
        finally:
            pp.shutdown()


def test_spawn_on_a_full_disk_is_storage_full_and_leaves_nothing(tmp_path):
    with tmpfs(tmp_path, 8) as mnt:
        loc = os.path.join(mnt, "loc")
        pp = pipeproc.spawn(loc, workers=0)
        pp.commit({"topic": "t", "body": {"n": 1}})
        pp.shutdown()
        _fill_disk(mnt)
        with pytest.raises(pipeproc.StorageFull):
            pipeproc.spawn(loc, workers=0).shutdown()
        assert not [n for n in os.listdir(loc) if n.endswith(".tmp")]
        with pytest.raises(pipeproc.StorageFull):
            pipeproc.spawn(os.path.join(mnt, "new"), workers=0).shutdown()
        new = os.path.join(mnt, "new")
        assert not os.path.exists(new) or not [n for n in os.listdir(new) if n.endswith(".tmp")]
        os.unlink(os.path.join(mnt, "ballast"))
        pp = pipeproc.spawn(loc, workers=0)  # the store is intact, and so is a new one
        try:
            assert pp.length("t") == 1
        finally:
            pp.shutdown()
        pp = pipeproc.spawn(new, workers=0)
        pp.shutdown()


@pytest.mark.parametrize("durability", ["full", "fast"])
def test_the_gc_frees_a_disk_full_of_small_logs(tmp_path, durability):
    with tmpfs(tmp_path, 32) as mnt:
        pp = pipeproc.spawn(os.path.join(mnt, "loc"), workers=0, durability=durability,
                            gc={"min_prune_time": 0, "interval": 0.05})
        try:
            pp.proc("t", name="guard", offset="$>")
            batch = [{"topic": "t", "body": [i]} for i in range(1000)]
            n = _commit_until_full(pp, batch)
            assert n > 50_000
            # down to the last page: smaller and smaller commits until a single log fails
            n += _commit_until_full(pp, batch[:30])
            n += _commit_until_full(pp, batch[:1])
            _fill_disk(mnt)  # and no room left on the disk either
            pp.destroy_proc("guard")
            deadline = time.monotonic() + 60
            while True:
                try:
                    pp.commit(batch)
                    break
                except pipeproc.StorageFull:
                    assert time.monotonic() < deadline, "the GC never freed the full disk"
                    time.sleep(0.1)
            assert pp.stats()["topics"]["t"]["stored"] < n
        finally:
            pp.shutdown()
