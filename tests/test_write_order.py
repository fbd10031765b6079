"""A durable write is answered only once its transaction is durable (issue 17).

The writer runs a round's requests in one LMDB transaction and calls their ``done`` (the
reply) only after ``commit()`` returned; under durability "full" that call returns once
LMDB has synced (its two flushes). These tests inject a slow commit and a failing one
through ``Store.begin`` and check the order the writer keeps: no reply, and nothing a
reader can see, before the commit returned; an error reply and nothing stored when it
failed. (A write path that answered earlier, e.g. one that pipelined rounds without
waiting for their sync, fails them.)
"""

from __future__ import annotations

import threading
import time

import lmdb
import pytest

from pipeproc._store import Store
from pipeproc._writer import Writer
from pipeproc.errors import InternalError

SLOW = 0.3  # the injected commit delay (s)


def _store_with(tmp_path, commit_hook):
    """A durable store whose write transactions call ``commit_hook(real_commit)``."""
    store = Store(str(tmp_path / "s"), durability="full")
    real_begin = store.begin

    def begin(now=None):
        tx = real_begin(now)
        real_commit = tx.commit
        tx.commit = lambda: commit_hook(real_commit)  # type: ignore[method-assign]
        return tx
    store.begin = begin  # type: ignore[method-assign]
    return store


def _visible(store, topic):
    """Logs of ``topic`` a reader sees: a read transaction, as the node's reads use."""
    with store.reader() as r:
        meta = r.topic(topic)
    return 0 if meta is None else meta.next


def _answer(writer, fn, **kw):
    """Submit ``fn`` (``kw``: how) and wait for its answer: ``(ok, value)``."""
    replies = []
    got = threading.Event()

    def done(ok, value):
        replies.append((ok, value))
        got.set()
    (kw.pop("via", writer.submit))(fn, done, **kw)
    assert got.wait(10)
    return replies[0]


def _submit_as_the_io_loop(writer, fn, done):
    """Submit as the node's I/O loop does under durability "full": queue on the loop's
    thread, then ``kick(False)`` hands the round to the writer thread."""
    writer.loop_thread = threading.get_ident()
    writer.submit(fn, done)
    writer.kick(False)


@pytest.mark.timeout(30)
def test_the_reply_waits_for_a_slow_commit(tmp_path):
    events = []

    def slow(real_commit):
        events.append(("commit starts", time.monotonic()))
        time.sleep(SLOW)
        real_commit()
        events.append(("commit returned", time.monotonic()))

    store = _store_with(tmp_path, slow)
    writer = Writer(store, durable=True, after_commit=lambda tx: events.append(("after", 0)))
    writer.start()
    try:
        got = threading.Event()
        seen_by_reader = []

        def done(ok, value):
            events.append(("reply", time.monotonic()))
            got.set()

        def fn(tx):
            return tx.append([("t", b"\x80")])

        def reader():  # polls the readers' view while the commit is slow
            while not got.is_set():
                seen_by_reader.append((_visible(store, "t"), time.monotonic()))
                time.sleep(0.01)

        r = threading.Thread(target=reader)
        r.start()
        t0 = time.monotonic()
        _submit_as_the_io_loop(writer, fn, done)
        assert not got.is_set()  # the round runs on the writer thread, not on this one
        assert got.wait(10)
        r.join()
        kinds = [e[0] for e in events]
        assert kinds.index("commit returned") < kinds.index("reply"), kinds
        returned_at = dict(events)["commit returned"]
        assert dict(events)["reply"] >= returned_at
        assert dict(events)["reply"] - t0 >= SLOW
        # a reader polling during the slow commit never saw the log before it returned
        assert all(n == 0 for n, t in seen_by_reader if t < returned_at - 0.001)
        assert _visible(store, "t") == 1
    finally:
        writer.stop()
        store.close()


@pytest.mark.timeout(30)
def test_a_failing_commit_is_answered_with_an_error_and_stores_nothing(tmp_path):
    def failing(real_commit):
        raise lmdb.Error("injected: commit failed")

    store = _store_with(tmp_path, failing)
    writer = Writer(store, durable=True, after_commit=lambda tx: None)
    writer.start()
    try:
        ok, value = _answer(writer, lambda tx: tx.append([("t", b"\x80")]),
                            via=lambda fn, done: _submit_as_the_io_loop(writer, fn, done))
        assert ok is False and isinstance(value, InternalError), value
        assert _visible(store, "t") == 0
        with store.env.begin() as txn:  # nothing of the round reached the file either
            assert txn.stat(store.db_logs)["entries"] == 0
    finally:
        writer.stop()
        store.close()


@pytest.mark.timeout(30)
def test_a_gc_round_in_the_reserve_is_answered_when_leaving_the_reserve_fails(tmp_path, caplog):
    """A store full for ordinary writes: the GC's round grows into the reserve, commits,
    and then giving the reserve back fails. The round is committed, so its ``done`` still
    runs (the GC goes on) and the failure is logged."""
    attempts = []

    def full_once(real_commit):
        attempts.append(1)
        if len(attempts) == 1:
            raise lmdb.MapFullError("injected: map full")
        real_commit()

    store = _store_with(tmp_path, full_once)
    store.grow = lambda for_gc=False: bool(for_gc)  # type: ignore[method-assign]
    store.recycle_pages = lambda: False  # type: ignore[method-assign]

    def leave():
        raise lmdb.Error("injected: set_mapsize failed")
    store.leave_reserve = leave  # type: ignore[method-assign]
    writer = Writer(store, durable=True, after_commit=lambda tx: None)
    writer.start()
    try:
        reply = _answer(writer, lambda tx: tx.append([("t", b"\x80")]), gc=True)
        assert reply == (True, [0]), reply
        assert len(attempts) == 2
        assert _visible(store, "t") == 1
        assert "could not give the GC's reserve back" in caplog.text
    finally:
        writer.stop()
        store.close()
