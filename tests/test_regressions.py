"""Regression tests for what the stress suite (tests/stress, ``make stress``) found; each
fails on the code before its fix. Crash-matrix and load findings have theirs next to the
code they concern (test_store_layout.py, test_system_procs.py, test_gc.py)."""

from __future__ import annotations

import math
import os
import socket
import time

import pytest

import pipeproc
from pipeproc._client import open_connection
from pipeproc._protocol import decode, pack

MB = 1 << 20


def raw_call(pp, *request):
    """Send one raw request on a fresh authenticated connection; the reply, or None when
    the node closed the connection instead."""
    c = open_connection(pp.address, pp.authkey)
    try:
        c.send_bytes(pack(list(request)))
        try:
            return decode(c.recv_bytes())
        except (EOFError, OSError):
            return None
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_nan_timeouts_are_refused_and_timers_keep_working(node):
    node.commit({"topic": "t", "body": {"i": 0}})
    assert node.proc("t", name="busy", reclaim_timeout=-1) is not None  # stays busy
    for bad in (math.nan, math.inf):
        with pytest.raises(pipeproc.PipeProcError) as e:
            node.wait_for_procs(timeout=bad)
        assert e.value.code == "invalid_argument"
        for req in ([1, "wait_idle", None, bad], [1, "live", "t", "busy", ">", 1, bad]):
            reply = raw_call(node, *req)
            assert reply is not None and reply[2][0] == "invalid_argument"
    # the timer thread still serves timeouts (a NaN deadline used to wedge it)
    t0 = time.monotonic()
    with pytest.raises(pipeproc.PipeProcError) as e:
        node.wait_for_procs(timeout=0.05)
    assert e.value.code == "timeout" and time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_a_refused_live_request_claims_nothing(node):
    node.commit({"topic": "t", "body": {"i": 0}})
    assert node.proc("t", name="lv", reclaim_timeout=-1) is not None
    node.ack("lv")  # nothing pending; "t" gets another log to claim
    node.commit({"topic": "t", "body": {"i": 1}})
    reply = raw_call(node, 1, "live", "t", "lv", ">", 1, "soon")
    assert reply is not None and reply[1] == 1 and reply[2][0] == "invalid_argument"
    assert node.inspect_proc("lv").last_claimed_range.split("..")[0] == \
        node.inspect_proc("lv").last_acked_range.split("..")[0]  # no new claim
    assert node.proc("t", name="lv").body == {"i": 1}


@pytest.mark.parametrize("body", [
    b"\x91" * 1023 + b"\xc0",  # decodes alone, not inside a page's envelope
    b"\xc0", b"\x05", b"\xa1x", b"\xcb" + b"\x00" * 8, b"\xc3",  # nil, int, str, float, bool
    b"\xd6\xff\x00\x00\x00\x00",  # a timestamp extension
    b"\x80\x80",  # two objects
])
def test_node_refuses_bodies_readers_could_not_take_back(node, body):
    reply = raw_call(node, 1, "c1", "t", body)
    assert reply is not None and reply[2][0] == "invalid_log_format"
    assert "t" not in node.topics()
    node.commit({"topic": "t", "body": {"ok": 1}})
    assert [x.body for x in node.range("t")] == [{"ok": 1}]


@pytest.mark.timeout(60)
def test_silent_peer_is_dropped_after_the_handshake_timeout(node):
    from pipeproc._conn import HANDSHAKE_TIMEOUT
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(HANDSHAKE_TIMEOUT + 20)
    try:
        s.connect(node.address)
        t0 = time.monotonic()
        while s.recv(4096):  # the challenge, then EOF when the node gives up on us
            pass
        assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT + 10
    finally:
        s.close()
    assert node.commit({"topic": "t", "body": {}})


@pytest.mark.timeout(120)
def test_storage_full_clears_once_the_gc_freed_space(spawner):
    """LMDB reuses the pages freed by a commit only after one more commit: a node whose
    map could not grow answered storage_full forever after the GC freed space."""
    pp = spawner(max_map_size=4 * MB, gc={"min_prune_time": 0, "interval": 0.1})
    assert pp.proc("fill", name="guard", reclaim_timeout=-1) is None
    n = 0
    with pytest.raises(pipeproc.PipeProcError) as e:
        while n < 1000:
            pp.commit({"topic": "fill", "body": os.urandom(60_000)})
            n += 1
    assert e.value.code == "storage_full" and n > 10
    pp.destroy_proc("guard")
    deadline = time.monotonic() + 30
    while pp.stats()["topics"]["fill"]["stored"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pp.stats()["topics"]["fill"]["stored"] == 0
    for _ in range(n // 2):
        pp.commit({"topic": "fill", "body": os.urandom(60_000)})
    assert pp.length("fill") == n + n // 2


@pytest.mark.parametrize("bodies", [
    [b"\x80\x80", b"\x80"],               # two objects in one body
    [b"\x81\x80", b"\x80"],               # one object spanning two bodies
    [b"\x80", b"\x91"],                   # the last body truncated
    [b"\x80", b"\x05"],                   # a scalar
    [b"\x80", b"\x91" * 1023 + b"\xc0"],  # too deep to read back inside a reply
    [b"\x80", b"\xc1"],                   # a byte msgpack never uses
])
def test_batch_body_checks_refuse_the_whole_batch(node, bodies):
    """Batches are checked in one pass of an Unpacker (each body must end exactly where
    the next starts); any bad body refuses the batch and writes nothing."""
    reply = raw_call(node, 1, "c", [["a", bodies[0]], ["b", bodies[1]]])
    assert reply is not None and reply[2][0] == "invalid_log_format"
    assert node.topics() == []
    ids = node.commit([{"topic": "a", "body": {}}, {"topic": "b", "body": []}])
    assert len(ids) == 2
