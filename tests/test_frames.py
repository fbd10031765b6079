"""Framing: the buffered channel, the node's frame limit (``max_frame_size``) and the
clear error a client gets for a request above it."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pipeproc
from pipeproc._client import open_connection
from pipeproc._protocol import RECV_BUFFER, Channel, FrameTooLarge, decode, pack

LIMIT = 200_000


def _pair():
    a, b = socket.socketpair()
    return a, Channel(b)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 3, 4, 5, 100, 4096, RECV_BUFFER - 4,
                                       RECV_BUFFER - 3, RECV_BUFFER, RECV_BUFFER + 7,
                                       3 * RECV_BUFFER]), min_size=1, max_size=8),
       chunk=st.sampled_from([1, 7, 4096, 65536, 10**9]))
def test_channel_returns_every_frame_whatever_the_chunking(sizes, chunk):
    """Frames sent back to back in arbitrary pieces come out whole and in order."""
    assume(chunk >= 4096 or sum(sizes) <= 2 * RECV_BUFFER)  # tiny pieces: keep it quick
    raw, chan = _pair()
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    stream = b"".join(struct.pack("!i", len(p)) + p for p in payloads)

    def feed():
        for i in range(0, len(stream), chunk):
            raw.sendall(stream[i:i + chunk])

    t = threading.Thread(target=feed)
    t.start()
    try:
        for p in payloads:
            assert bytes(chan.recv_bytes(10**8)) == p
        assert not chan.pending
    finally:
        t.join()
        raw.close()
        chan.close()


def test_channel_pending_sees_a_pipelined_frame():
    raw, chan = _pair()
    try:
        raw.sendall(struct.pack("!i", 2) + b"ab" + struct.pack("!i", 1) + b"c")
        assert bytes(chan.recv_bytes()) == b"ab"
        assert chan.pending
        assert bytes(chan.recv_bytes()) == b"c"
        assert not chan.pending
    finally:
        raw.close()
        chan.close()


@pytest.mark.parametrize("header", [struct.pack("!i", 1001), struct.pack("!i", -1)])
def test_channel_refuses_an_announced_frame_above_the_limit(header):
    raw, chan = _pair()
    try:
        raw.sendall(header)
        with pytest.raises(FrameTooLarge):
            chan.recv_bytes(1000)
    finally:
        raw.close()
        chan.close()


def test_channel_eof_mid_frame():
    raw, chan = _pair()
    raw.sendall(struct.pack("!i", 10) + b"abc")
    raw.close()
    try:
        with pytest.raises(EOFError):
            chan.recv_bytes()
    finally:
        chan.close()


@pytest.mark.timeout(60)
def test_request_above_the_node_limit_fails_clearly_and_writes_nothing(spawner):
    pp = spawner(max_frame_size=LIMIT)
    big = {"payload": "x" * (LIMIT + 1)}
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.commit({"topic": "big", "body": big})
    assert e.value.code == "invalid_argument" and isinstance(e.value, ValueError)
    assert "limit" in str(e.value)
    assert "big" not in pp.topics()
    # just under the limit goes through, larger than the channel's buffer both ways
    ok = {"payload": "y" * (LIMIT - 1000)}
    pp.commit({"topic": "big", "body": ok})
    assert pp.range("big")[0].body == ok
    # a client that connected (it does not know the limit yet) gets the same error
    other = pipeproc.connect(address=pp.address, authkey=pp.authkey)
    try:
        with pytest.raises(pipeproc.PipeProcError) as e:
            other.commit([{"topic": "big", "body": big}])
        assert e.value.code == "invalid_argument"
        assert other.length("big") == 1
    finally:
        other.close()


@pytest.mark.timeout(60)
def test_raw_oversized_frame_costs_only_its_sender(spawner):
    pp = spawner(max_frame_size=LIMIT)
    c = open_connection(pp.address, pp.authkey)
    try:
        c.sock.sendall(struct.pack("!i", LIMIT + 1))  # announced, never sent: not buffered
        reply = decode(c.recv_bytes())
        assert reply[0] is None and reply[2][0] == "invalid_argument"
        with pytest.raises((EOFError, OSError)):
            c.recv_bytes()
    finally:
        c.close()
    assert pp.commit({"topic": "t", "body": {"ok": 1}})
    assert pp.length("t") == 1


def test_default_limit_is_64_mib(node):
    assert node._frame_limit() == 64 * 1024 * 1024


@pytest.mark.parametrize("bad", [-1, 100, 2**31, "1M", 1.5, True])
def test_max_frame_size_is_checked(tmp_path, bad):
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.spawn(tmp_path / "s", workers=0, max_frame_size=bad)
    assert e.value.code == "invalid_argument"


def test_pack_roundtrip_through_a_node_sized_request(node):
    """A request larger than the channel buffer (several recv calls on the node)."""
    body = {"blob": b"\x00" * (3 * RECV_BUFFER)}
    node.commit({"topic": "b", "body": body})
    assert node.range("b")[0].body == body
    assert decode(pack([1, "x"])) == [1, "x"]


# -- the node's side: its I/O loop reassembles frames from any chunking


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    """One node for the examples of a hypothesis test (each uses its own topic)."""
    pp = pipeproc.spawn(tmp_path_factory.mktemp("frames") / "store", workers=0,
                        durability="fast")
    try:
        yield pp
    finally:
        pp.shutdown()


_topics = itertools.count()


def _commit_frame(rid: int, topic: str, body: bytes) -> bytes:
    data = pack([rid, "c1", topic, body])
    return struct.pack("!i", len(data)) + data


@pytest.mark.timeout(120)
@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.sampled_from([1, 100, RECV_BUFFER // 2, RECV_BUFFER - 40,
                                       RECV_BUFFER + 7, 2 * RECV_BUFFER + 3]),
                      min_size=1, max_size=5),
       chunk=st.sampled_from([1, 5, 4093, 65536, 10**9]))
def test_node_serves_pipelined_requests_whatever_the_chunking(shared_node, sizes, chunk):
    """Requests pipelined back to back and cut anywhere (inside a length header, inside a
    frame larger than the node's read buffer) are each served once, in order."""
    pp = shared_node
    topic = f"chunk-{next(_topics)}"
    bodies = [pack({"i": i, "pad": b"p" * n}) for i, n in enumerate(sizes)]
    stream = b"".join(_commit_frame(i + 1, topic, b) for i, b in enumerate(bodies))
    c = open_connection(pp.address, pp.authkey)
    try:
        small = chunk < 100
        for i in range(0, len(stream), chunk):
            c.sock.sendall(stream[i:i + chunk])
            if small and i > 4096:  # byte-sized pieces: only for the first few KiB
                c.sock.sendall(stream[i + chunk:])
                break
        replies = [decode(c.recv_bytes()) for _ in bodies]
    finally:
        c.close()
    assert [r[0] for r in replies] == list(range(1, len(bodies) + 1))
    assert all(r[1] == 0 for r in replies), replies
    logs = pp.range(topic)
    assert [log.body["i"] for log in logs] == list(range(len(bodies)))
    assert [len(log.body["pad"]) for log in logs] == sizes


@pytest.mark.timeout(60)
def test_a_half_sent_frame_does_not_hold_up_other_clients(spawner):
    """A client stops in the middle of a large frame: everyone else is still served at
    once, and the frame is served when its last bytes arrive."""
    pp = spawner()
    frame = _commit_frame(7, "half", pack({"blob": b"b" * (3 * RECV_BUFFER)}))
    c = open_connection(pp.address, pp.authkey)
    try:
        c.sock.sendall(frame[:RECV_BUFFER + 1000])
        for i in range(20):  # the node's loop keeps serving the others meanwhile
            pp.commit({"topic": "other", "body": {"i": i}})
        assert pp.length("other") == 20
        assert "half" not in pp.topics()
        c.sock.sendall(frame[RECV_BUFFER + 1000:])
        reply = decode(c.recv_bytes())
        assert reply[0] == 7 and reply[1] == 0
    finally:
        c.close()
    assert pp.range("half")[0].body == {"blob": b"b" * (3 * RECV_BUFFER)}


# -- busy polling (PIPEPROC_BUSY_POLL_US): bounded, and only while it pays


def test_busy_poll_setting_is_parsed_and_bounded(monkeypatch):
    from pipeproc import cli as _protocol  # _busy_poll_setting moved to the CLI (issue 15)
    for raw, expected in [("50", 50e-6), ("0", 0.0), ("-3", 0.0), ("nan", 0.0),
                          ("junk", 50e-6), ("1e9", 0.01)]:
        monkeypatch.setenv("PIPEPROC_BUSY_POLL_US", raw)
        assert _protocol._busy_poll_setting() == pytest.approx(expected), raw


def test_channel_stops_busy_polling_when_frames_come_slowly():
    """A reader whose frames take longer than twice the window sleeps in recv instead of
    spinning: waiting 50 ms then costs it (almost) no CPU."""
    raw, sock = socket.socketpair()
    chan = Channel(sock, spin=0.005)
    frame = struct.pack("!i", 3) + b"abc"

    def later(delay):
        t = threading.Timer(delay, raw.sendall, (frame,))
        t.start()
        return t

    try:
        for _ in range(6):  # slow frames: the average wait climbs past the 5 ms window
            t = later(0.03)
            assert bytes(chan.recv_bytes()) == b"abc"
            t.join()
        t = later(0.05)
        cpu = time.thread_time()
        assert bytes(chan.recv_bytes()) == b"abc"
        cpu = time.thread_time() - cpu
        t.join()
        assert cpu < 0.004, f"waited for a slow frame with {cpu * 1000:.1f} ms of CPU"
    finally:
        raw.close()
        chan.close()


@pytest.mark.timeout(60)
def test_an_idle_node_does_not_keep_spinning(node):
    """After a burst from one client the node busy-polls at most a few tens of µs, then
    sleeps: an idle second costs it almost no CPU."""
    for i in range(2000):
        node.commit({"topic": "burst", "body": {"i": i}})
    pid = node.stats()["node"]["pid"]

    def cpu_s():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_s()
    time.sleep(1.0)
    assert cpu_s() - before < 0.1  # clock ticks are 10 ms: a spinning node shows ~1 s
