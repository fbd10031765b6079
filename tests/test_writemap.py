"""Stores without fsync (durability "fast", memory) write through LMDB's shared map
(writemap), over space preallocated for the whole map, so that a full disk is a clean
``storage_full`` and never a SIGBUS; the store falls back to plain writes when it cannot
preallocate."""

from __future__ import annotations

import errno
import os

import pytest

import pipeproc
from pipeproc import _store
from pipeproc._store import WRITEMAP_INITIAL_MAP, Store


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _commit(store, n, size=1000, topic="t"):
    tx = store.begin()
    try:
        tx.append([(topic, b"\xc5" + size.to_bytes(2, "big") + b"x" * size)] * n)
        tx.commit()
    except BaseException:
        tx.abort()
        raise


def test_fast_store_preallocates_its_whole_map_and_grows_preallocated(tmp_path):
    store = Store(str(tmp_path), durability="fast")
    try:
        assert store.writemap
        data = os.path.join(str(tmp_path), "data.mdb")
        assert store.env.info()["map_size"] == WRITEMAP_INITIAL_MAP
        assert _allocated(data) >= WRITEMAP_INITIAL_MAP
        for _ in range(20):  # 80 MiB of logs: past the first map
            try:
                _commit(store, 4000)
            except Exception as exc:
                assert "MDB_MAP_FULL" in str(exc)
                assert store.grow()
                _commit(store, 4000)
        size = store.env.info()["map_size"]
        assert size > WRITEMAP_INITIAL_MAP
        assert _allocated(data) >= size
        with store.reader() as r:
            assert r.topic("t").next == 80_000
    finally:
        store.close()


def test_durable_store_does_not_use_writemap(tmp_path):
    store = Store(str(tmp_path), durability="full")
    try:
        assert not store.writemap
    finally:
        store.close()


def test_no_room_to_preallocate_falls_back_to_plain_writes(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(_store.os, "posix_fallocate", full)
    store = Store(str(tmp_path), durability="fast")
    try:
        assert not store.writemap
        _commit(store, 10)
        with store.reader() as r:
            assert r.topic("t").next == 10
    finally:
        store.close()


def test_no_room_to_grow_is_storage_full_not_a_crash(tmp_path, monkeypatch):
    store = Store(str(tmp_path), durability="fast")
    try:
        assert store.writemap
        real = os.posix_fallocate

        def full(fd, offset, length):
            if length > WRITEMAP_INITIAL_MAP:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, offset, length)
        monkeypatch.setattr(_store.os, "posix_fallocate", full)
        assert not store.grow()
        assert store.env.info()["map_size"] == WRITEMAP_INITIAL_MAP
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_fast_node_reports_storage_full_when_the_map_cannot_grow(tmp_path):
    """Through a node: past max_map_size a fast (writemap) store refuses the commit with
    storage_full, keeps what it had, and serves reads."""
    pp = pipeproc.spawn(tmp_path / "s", workers=0, durability="fast",
                        max_map_size=WRITEMAP_INITIAL_MAP)
    try:
        body = {"blob": b"z" * 60_000}
        n = 0
        with pytest.raises(pipeproc.PipeProcError) as e:
            for _ in range(2000):
                pp.commit([{"topic": "t", "body": body}] * 16)
                n += 16
        assert e.value.code == "storage_full"
        assert pp.length("t") == n
        assert pp.range("t", limit=1)[0].body == body
    finally:
        pp.shutdown()
