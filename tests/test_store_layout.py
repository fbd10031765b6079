"""The store's layout (format 2): commits write only their log records; the next sequence
and the clock are recovered at opening from the last records, the topic records and the
clock key the GC stores."""

from __future__ import annotations

import time

import lmdb

from pipeproc._store import FORMAT_VERSION, Store

FUTURE = time.time_ns() // 1_000_000 + 10 * 365 * 24 * 3600 * 1000


def _commit(store, items, now=None):
    tx = store.begin(now)
    seqs = tx.append(items)
    tx.commit()
    return seqs


def _pages_of(store, db):
    with store.env.begin() as txn:
        return txn.stat(db)["leaf_pages"] + txn.stat(db)["branch_pages"]


def test_commit_writes_no_topic_record_but_restart_knows_next(tmp_path):
    store = Store(str(tmp_path))
    try:
        _commit(store, [("a", b"\x01")])
        with store.env.begin() as txn:
            created = bytes(txn.get(b"a", db=store.db_topics))
        for _ in range(5):
            _commit(store, [("a", b"\x02"), ("a", b"\x03")])
        with store.env.begin() as txn:
            assert bytes(txn.get(b"a", db=store.db_topics)) == created  # not rewritten
        with store.reader() as r:
            assert r.topic("a").next == 11
    finally:
        store.close()
    store = Store(str(tmp_path))
    try:
        assert store.topics["a"].next == 11
        assert _commit(store, [("a", b"\x04")]) == [11]
    finally:
        store.close()


def test_clock_survives_a_gc_that_deleted_every_log(tmp_path):
    """A commit stamped in the future, then collected entirely: after a restart the clock
    must still not go back (ids never decrease within a store)."""
    store = Store(str(tmp_path))
    try:
        _commit(store, [("a", b"\x01"), ("b", b"\x01")], now=FUTURE)
        tx = store.begin()
        assert tx.delete_prefix("a", 10) == 1
        assert tx.delete_prefix("b", 10) == 1
        tx.commit()
    finally:
        store.close()
    store = Store(str(tmp_path))
    try:
        assert store.last_ms == FUTURE
        assert store.now_ms() == FUTURE
        assert store.topics["a"].next == 1 and store.topics["a"].first == 1
        assert _commit(store, [("a", b"\x05")]) == [1]
    finally:
        store.close()


def test_clock_recovered_from_last_records_without_clock_key(tmp_path):
    store = Store(str(tmp_path))
    try:
        _commit(store, [("a", b"\x01")])
        _commit(store, [("a", b"\x01")], now=FUTURE)  # no clock key written for this one
    finally:
        store.close()
    store = Store(str(tmp_path))
    try:
        assert store.last_ms == FUTURE
    finally:
        store.close()


def test_opens_a_format_1_store(tmp_path):
    """Format 1 kept next_seq exact in the topic record; it still opens and upgrades."""
    store = Store(str(tmp_path))
    try:
        _commit(store, [("a", b"\x01"), ("a", b"\x02")])
        with store.env.begin(write=True) as txn:
            txn.put(b"format", b"1", db=store.db_meta)
            # as format 1 wrote it: no checksum (format 3 seals topic records)
            txn.put(b"a", __import__("msgpack").packb([1, 2, 0, 0]), db=store.db_topics)
    finally:
        store.close()
    store = Store(str(tmp_path))
    try:
        assert store.topics["a"].next == 2
        with store.env.begin() as txn:
            assert int(txn.get(b"format", db=store.db_meta)) == FORMAT_VERSION
    finally:
        store.close()


def test_refuses_a_newer_format(tmp_path):
    store = Store(str(tmp_path))
    store.close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", str(FORMAT_VERSION + 1).encode(), db=meta)
    env.close()
    try:
        Store(str(tmp_path))
    except RuntimeError as exc:
        assert "newer" in str(exc)
    else:
        raise AssertionError("a newer store format must be refused")


# ---------------------------------------------------------------- GC steps (node logic)

def _gc_host(store, prune=0.0):
    from types import SimpleNamespace
    return SimpleNamespace(store=store, gc_min_prune=prune, _gc_pass=None)


def test_gc_sees_a_proc_created_earlier_in_the_same_write_round(tmp_path):
    """Regression (stress suite): a proc created and claimed in a write round, with the GC
    job later in that round, protected nothing: its claimed logs were deleted and skipped
    for good once the claim was reclaimed."""
    from pipeproc import _procs
    from pipeproc._node import Node

    store = Store(str(tmp_path))
    try:
        _commit(store, [("t", b"\x01"), ("t", b"\x02")])
        tx = store.begin()
        got = _procs.proc(tx, "p", "t", ">", 1, 10, -1.0, "disable")
        assert got is not None  # claimed seq 0, in this transaction only
        Node._gc(_gc_host(store, prune=-1.0), tx)  # every log is old enough
        tx.commit()
        assert store.topics["t"].first == 0
    finally:
        store.close()


def test_gc_pass_runs_in_bounded_steps(tmp_path, monkeypatch):
    from pipeproc import _node
    from pipeproc._node import Node

    monkeypatch.setattr(_node, "GC_DELETES_PER_ROUND", 1000)
    store = Store(str(tmp_path))
    try:
        _commit(store, [("a", b"\x01")] * 2500 + [("b", b"\x01")] * 10)
        host = _gc_host(store, prune=-1.0)
        steps = []
        while True:
            tx = store.begin()
            more = Node._gc(host, tx)
            tx.commit()
            steps.append((store.topics["a"].first, store.topics["b"].first))
            if not more:
                break
        assert steps == [(1000, 0), (2000, 0), (2500, 10)]
    finally:
        store.close()
