"""SPEC §1, §2, §9 ("bad input never crashes the node"): malformed arguments of every call
give the right code (and are ValueError / TypeError), write nothing, and garbage on the
socket — before or after authentication — never takes the node down."""

from __future__ import annotations

import datetime
import decimal
import os
import pickle
import socket
import struct
import time
from multiprocessing.connection import Client

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeproc

SENTINEL = "sentinel_topic_kept_through_everything"


def expect_code(code, fn, *args, **kwargs):
    with pytest.raises(pipeproc.PipeProcError) as e:
        fn(*args, **kwargs)
    assert e.value.code == code, (e.value.code, str(e.value))
    return e.value


def expect_arg_error(codes, fn, *args, **kwargs):
    """An argument error: one of ``codes`` and also a ValueError or TypeError."""
    with pytest.raises(pipeproc.PipeProcError) as e:
        fn(*args, **kwargs)
    codes = (codes,) if isinstance(codes, str) else codes
    assert e.value.code in codes, (e.value.code, str(e.value))
    assert isinstance(e.value, (ValueError, TypeError))
    return e.value


def _seed(pp):
    pp.commit([{"topic": "t", "body": {"i": i}} for i in range(3)])
    pp.commit({"topic": SENTINEL, "body": {"keep": True}})
    return pp


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A node holding topic "t" (3 logs) and the sentinel topic, shared by the tests of this
    module that change nothing (each checks that its refused calls wrote nothing)."""
    pp = pipeproc.spawn(tmp_path_factory.mktemp("seeded") / "store", workers=0)
    try:
        yield _seed(pp)
    finally:
        pp.shutdown()


@pytest.fixture
def own_seeded(node):
    """The seeded state on a node of the test's own (tests that write or send garbage)."""
    return _seed(node)


def snapshot(pp):
    return {t: pp.range(t) for t in sorted(pp.topics())}


# ---------------------------------------------------------------------------------------------
# topic names
# ---------------------------------------------------------------------------------------------

BAD_TOPICS = ["", "x" * 201, "a b", " a", "a ", "a/b", "/", "é", "topic日本", "a.b", "a\nb",
              "a\x00b", "a:b", "a*", "ｔ"]


def test_good_topic_names(node):
    for name in ["a", "A", "0", "_", "-", "a-B_9", "x" * 200, "-leading", "UPPER_lower-09"]:
        assert node.commit({"topic": name, "body": {}}).endswith("-0")
        assert node.length(name) == 1


@pytest.mark.parametrize("topic", BAD_TOPICS, ids=[f"topic{i}" for i in range(len(BAD_TOPICS))])
def test_bad_topic_names(seeded, topic):
    pp = seeded
    before = snapshot(pp)
    expect_arg_error("invalid_topic_format", pp.commit, {"topic": topic, "body": {}})
    expect_arg_error("invalid_topic_format", pp.commit, [{"topic": "t", "body": {}},
                                                         {"topic": topic, "body": {}}])
    expect_arg_error("invalid_topic_format", pp.range, topic)
    expect_arg_error("invalid_topic_format", pp.revrange, topic)
    expect_arg_error("invalid_topic_format", pp.length, topic)
    expect_arg_error("invalid_topic_format", lambda: list(pp.iter_range(topic)))
    assert snapshot(pp) == before


@pytest.mark.parametrize("topic", [None, 5, b"t", ["t"], 1.5])
def test_non_string_topics(seeded, topic):
    # SPEC: a topic name must match the pattern; a non-string cannot. We accept
    # invalid_topic_format (most natural) or invalid_argument (a type error).
    pp = seeded
    before = snapshot(pp)
    codes = ("invalid_topic_format", "invalid_argument")
    expect_arg_error(codes, pp.commit, {"topic": topic, "body": {}})
    expect_arg_error(codes, pp.range, topic)
    expect_arg_error(codes, pp.revrange, topic)
    expect_arg_error(codes, pp.length, topic)
    assert snapshot(pp) == before


def test_missing_topic(seeded):
    # ambiguous in the SPEC: a log with no topic; we accept either code
    pp = seeded
    before = snapshot(pp)
    expect_arg_error(("invalid_topic_format", "invalid_log_format"), pp.commit, {"body": {}})
    expect_arg_error(("invalid_topic_format", "invalid_log_format"), pp.commit,
                     [{"topic": "t", "body": {}}, {"body": {}}])
    assert snapshot(pp) == before


# ---------------------------------------------------------------------------------------------
# bodies
# ---------------------------------------------------------------------------------------------


class Custom:
    pass


BAD_BODIES = [
    ({1, 2}, "set"),
    (object(), "object"),
    (datetime.datetime(2020, 1, 1), "datetime"),
    (None, "None"),  # NoneType
    ("a string", "str"),
    (5, "int"),
    (1.5, "float"),
    (True, "bool"),
    (2**64, "int"),
    (Custom(), "Custom"),
    (frozenset([1]), "frozenset"),
    ({"nested": {1, 2}}, "set"),
    ({"nested": [1, {"deep": object()}]}, "object"),
    ({"when": datetime.date(2020, 1, 1)}, "date"),
    ({"big": 2**64}, "int"),
    ({"small": -(2**63) - 1}, "int"),
    ([1, 2, complex(1, 2)], "complex"),
    ({"d": decimal.Decimal("1.5")}, "Decimal"),
    ([Custom()], "Custom"),
    ({"f": lambda: 1}, "function"),
    ({"r": range(3)}, "range"),
]


@pytest.mark.parametrize("body,type_name", BAD_BODIES, ids=[f"{t}{i}" for i, (_, t) in enumerate(BAD_BODIES)])
def test_unsupported_bodies(seeded, body, type_name):
    pp = seeded
    before = snapshot(pp)
    e = expect_arg_error("invalid_log_format", pp.commit, {"topic": "t", "body": body})
    assert type_name in str(e), str(e)
    e = expect_arg_error("invalid_log_format", pp.commit, [
        {"topic": "t", "body": {"ok": 1}},
        {"topic": "fresh", "body": [1]},
        {"topic": "t", "body": body},
    ])
    assert type_name in str(e), str(e)
    assert snapshot(pp) == before
    assert "fresh" not in pp.topics()


def test_missing_body(seeded):
    pp = seeded
    before = snapshot(pp)
    expect_arg_error("invalid_log_format", pp.commit, {"topic": "t"})
    expect_arg_error("invalid_log_format", pp.commit, [{"topic": "t", "body": {}}, {"topic": "t"}])
    assert snapshot(pp) == before


@pytest.mark.parametrize("log", [5, "t", None, b"log", 1.5, ["t", {}], ("t", {})], ids=repr)
def test_logs_that_are_not_mappings(seeded, log):
    # SPEC: a malformed log is invalid_log_format (our reading for a log that is not a dict)
    pp = seeded
    before = snapshot(pp)
    expect_arg_error("invalid_log_format", pp.commit, [{"topic": "t", "body": {}}, log])
    assert snapshot(pp) == before


@pytest.mark.parametrize("arg", [5, "t", None, b"x", 1.5])
def test_commit_argument_not_a_log_or_list(seeded, arg):
    pp = seeded
    before = snapshot(pp)
    expect_arg_error(("invalid_log_format", "invalid_argument"), pp.commit, arg)
    assert snapshot(pp) == before


def test_limits_of_ints_are_accepted(node):
    node.commit({"topic": "t", "body": {"lo": -(2**63), "hi": 2**64 - 1}})
    assert node.range("t")[0].body == {"lo": -(2**63), "hi": 2**64 - 1}


def test_8mib_body_round_trips(node):
    big = os.urandom(8 * 1024 * 1024)
    log_id = node.commit({"topic": "big", "body": big})
    (log,) = node.range("big")
    assert log.id == log_id and log.body == big
    node.commit({"topic": "big", "body": {"blob": big, "list": [big[:10]]}})
    assert node.revrange("big", limit=1)[0].body == {"blob": big, "list": [big[:10]]}
    assert node.commit({"topic": "small", "body": {}}).endswith("-0")


# ---------------------------------------------------------------------------------------------
# read arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["5", 1.5, [1], {"n": 1}, b"1"])
def test_bad_limit(seeded, limit):
    pp = seeded
    for call in (pp.range, pp.revrange):
        expect_arg_error("invalid_argument", call, "t", limit=limit)
    expect_arg_error("invalid_argument", lambda: list(pp.iter_range("t", limit=limit)))


@pytest.mark.parametrize("value", [2**63, 2**64, 2**70, -(2**70)])
def test_huge_limit_and_page_size(seeded, value):
    """Every failure is a PipeProcError (SPEC §2): a limit / page_size beyond 64 bits either
    works (a huge limit is no cap; a negative one is no limit) or is invalid_argument —
    never a raw OverflowError from the encoder."""
    pp = seeded
    everything = pp.range("t")
    for fn in (lambda: pp.range("t", limit=value), lambda: pp.revrange("t", limit=value)[::-1],
               lambda: list(pp.iter_range("t", limit=value))):
        try:
            assert fn() == everything
        except pipeproc.PipeProcError as e:
            assert e.code == "invalid_argument", str(e)
    if value > 0:
        try:
            assert list(pp.iter_range("t", page_size=value)) == everything
        except pipeproc.PipeProcError as e:
            assert e.code == "invalid_argument", str(e)
    assert pp.length("t") == 3


@pytest.mark.parametrize("page_size", [0, -1, "10", 1.5, [10]])
def test_bad_page_size(seeded, page_size):
    expect_arg_error("invalid_argument", lambda: list(seeded.iter_range("t", page_size=page_size)))


@pytest.mark.parametrize("bound", [5, 0, b":1", [":1"], 1.0])
def test_bad_bound_types(seeded, bound):
    for call in (seeded.range, seeded.revrange):
        expect_arg_error("invalid_argument", call, "t", start=bound)
        expect_arg_error("invalid_argument", call, "t", end=bound)
    expect_arg_error("invalid_argument", lambda: list(seeded.iter_range("t", start=bound)))


@pytest.mark.parametrize("bound", ["x", "", "1-", ":", ":-1", "-5", "1-2-3", " 7", "٣"])
def test_bad_bound_strings(seeded, bound):
    for call in (seeded.range, seeded.revrange):
        expect_arg_error("invalid_range_offset", call, "t", start=bound)
        expect_arg_error("invalid_range_offset", call, "t", end=bound)


def test_node_errors_keep_node_running(own_seeded):
    pp = own_seeded
    before = snapshot(pp)
    expect_code("invalid_topic", pp.range, "unknown")
    expect_code("invalid_topic", pp.length, "unknown")
    expect_code("invalid_tone_id_search", pp.range, "t", start=":99")
    assert snapshot(pp) == before
    assert pp.commit({"topic": "t", "body": {}}).endswith("-3")


# ---------------------------------------------------------------------------------------------
# spawn / connect arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {"durability": "sometimes"},
    {"workers": -1},
    {"workers": "2"},
    {"workers": 1.5},
    {"worker_concurrency": 0},
    {"worker_restart_after": -1},
    {"address": ("127.0.0.1", -5)},
    {"authkey": 12345},
], ids=repr)
def test_bad_spawn_arguments(tmp_path, kw):
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp = pipeproc.spawn(tmp_path / "store", **{"workers": 0, **kw})
        pp.shutdown()  # it should not have started; never leak it if it did
    assert e.value.code == "invalid_argument", str(e.value)
    assert isinstance(e.value, (ValueError, TypeError))


# ---------------------------------------------------------------------------------------------
# garbage on the socket
# ---------------------------------------------------------------------------------------------


def _address(pp):
    addr = pp.address
    if isinstance(addr, (str, tuple)):
        return addr
    if isinstance(addr, list):
        return tuple(addr)
    return os.fspath(addr)


def _raw_socket(addr):
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX)
    else:
        s = socket.socket(socket.AF_INET)
    s.settimeout(10)
    s.connect(addr)
    return s


def assert_healthy(pp, before):
    """The node runs, lost nothing, still commits, and accepts new connections."""
    # only the topics we know: garbage that happens to be a well-formed commit may have
    # created others
    assert pp.range(SENTINEL) == before[SENTINEL]
    assert pp.range("t") == before["t"]
    log_id = pp.commit({"topic": "health", "body": {"ok": True}})
    assert pp.range("health", start=log_id) == [pipeproc.Log(log_id, {"ok": True})]
    c = pipeproc.connect(address=pp.address, authkey=pp.authkey, timeout=5)
    try:
        assert c.length(SENTINEL) == 1
    finally:
        c.close()


GARBAGE_FRAMES = [
    b"",
    b"\x00",
    b"\xc1",  # never-used msgpack byte
    b"\xff" * 64,
    os.urandom(1000),
    msgpack.packb(None),
    msgpack.packb(42),
    msgpack.packb("commit"),
    msgpack.packb({"op": "commit"}),
    msgpack.packb([]),
    msgpack.packb([1]),
    msgpack.packb(["1", "commit"]),
    msgpack.packb([None, "topics"]),
    msgpack.packb([1.5, "topics"]),
    msgpack.packb([-1, "topics"]),
    msgpack.packb([2**64 - 1, "topics"]),
    msgpack.packb([1, None]),
    msgpack.packb([1, 5]),
    msgpack.packb([1, b"commit"]),
    msgpack.packb([1, "no_such_op"]),
    msgpack.packb([1, "commit"]),
    msgpack.packb([1, "commit", None]),
    msgpack.packb([1, "commit", 5, 6, 7]),
    msgpack.packb([1, "commit", [{"topic": 5}]]),
    msgpack.packb([1, "commit", [[None, None]]]),
    msgpack.packb([1, "commit", {"topic": "t", "body": "not bytes"}]),
    msgpack.packb([1, "range"]),
    msgpack.packb([1, "range", 5, 6, 7, 8, 9]),
    msgpack.packb([1, "range", "t", {"start": []}]),
    msgpack.packb([1, "length", None]),
    msgpack.packb([1, "length", ["t"]]),
    msgpack.packb([1, "revrange", "t", -1, -1, "x", "y"]),
    msgpack.packb([1, "stats", 1, 2, 3]),
    msgpack.packb([1, "topics", "extra", {"x": b"y"}]),
    msgpack.packb([1, "commit", [["garbage_target", b"\xc1"]]]),
    msgpack.packb([1, "commit", [{"topic": "garbage_target", "body": b"\xc1\xc1"}]]),
    msgpack.packb([1, "range", SENTINEL, {"limit": "x"}]),
    msgpack.packb(msgpack.ExtType(5, b"xyz")),
    b"\x92\x01\xd6\xff\x00\x00\x00\x00",  # [1, <timestamp ext>]
    b"\x93\xd6\xff\x00\x00\x00\x00\xa6topics\xc0",  # a timestamp as request id
    msgpack.packb([1, "commit"])[:-2],
    msgpack.packb([1, "range", "t", None, None, 10, False])[:7],
    b"\x91" * 100_000 + b"\xc0",  # 100k-deep nested arrays
    b"\xdd\xff\xff\xff\xff",  # array32 announcing 4G elements, then nothing
    b"\xdf\xff\xff\xff\xff\x01",  # map32 announcing 4G pairs
    b"\xc6\xff\xff\xff\xff",  # bin32 announcing 4 GiB
    b"\xdb\x7f\xff\xff\xff" + b"x" * 10,  # str32 announcing 2 GiB
    msgpack.packb([1, "commit"]) + b"trailing junk",
    msgpack.packb([1, "topics"]) * 3,
    bytes(4 * 1024 * 1024),  # 4 MiB of zeros
]


@pytest.mark.timeout(120)
def test_garbage_frames_after_auth(own_seeded):
    pp = own_seeded
    before = snapshot(pp)
    addr = _address(pp)
    for i, frame in enumerate(GARBAGE_FRAMES):
        conn = Client(addr, authkey=pp.authkey)
        try:
            conn.send_bytes(frame)
            # the node answers with an error or closes the connection; either is fine
            try:
                if conn.poll(0.2):
                    conn.recv_bytes()
            except (EOFError, OSError):
                pass
        finally:
            conn.close()
        if i % 10 == 0:
            assert_healthy(pp, before)
    assert_healthy(pp, before)


@pytest.mark.timeout(60)
def test_many_garbage_frames_on_one_connection(own_seeded):
    pp = own_seeded
    before = snapshot(pp)
    conn = Client(_address(pp), authkey=pp.authkey)
    try:
        for frame in GARBAGE_FRAMES[:40]:
            try:
                conn.send_bytes(frame)
            except OSError:
                break  # the node hung up on us: allowed
    finally:
        conn.close()
    assert_healthy(pp, before)


@pytest.mark.timeout(60)
def test_lying_length_headers(own_seeded):
    """Frame headers announcing huge payloads that never come, then a hang-up."""
    pp = own_seeded
    before = snapshot(pp)
    addr = _address(pp)
    for header in (struct.pack("!i", 2**31 - 1), struct.pack("!i", -1) + struct.pack("!Q", 2**62),
                   struct.pack("!i", -1) + b"\x00\x00", struct.pack("!i", 100) + b"short"):
        conn = Client(addr, authkey=pp.authkey)
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            raw.sendall(header)
        finally:
            raw.close()
            conn.close()
    assert_healthy(pp, before)


@pytest.mark.timeout(60)
def test_garbage_before_auth(own_seeded):
    pp = own_seeded
    before = snapshot(pp)
    addr = _address(pp)
    for payload in (b"", b"\x00", os.urandom(100), b"\x00\x00\x00\x05hello",
                    struct.pack("!i", 2**31 - 1), b"GET / HTTP/1.0\r\n\r\n", os.urandom(70_000)):
        s = _raw_socket(addr)
        try:
            s.sendall(payload)
        except OSError:
            pass
        finally:
            s.close()
    assert_healthy(pp, before)


@pytest.mark.timeout(60)
def test_silent_connection_does_not_block_others(own_seeded):
    """A peer that connects and never completes the handshake must not stop other clients."""
    pp = own_seeded
    before = snapshot(pp)
    silent = [_raw_socket(_address(pp)) for _ in range(3)]
    try:
        t0 = time.monotonic()
        assert_healthy(pp, before)
        assert time.monotonic() - t0 < 5
    finally:
        for s in silent:
            s.close()


class _Evil:
    """Unpickling this creates a directory: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.timeout(60)
def test_pickles_are_never_loaded(own_seeded, tmp_path):
    """Messages are msgpack, never pickles: a pickled payload must not be executed."""
    pp = own_seeded
    before = snapshot(pp)
    markers = [tmp_path / f"pwned{i}" for i in range(3)]
    payloads = [pickle.dumps(_Evil(str(markers[0]))),
                pickle.dumps([1, "commit", _Evil(str(markers[1]))], protocol=2)]
    for payload in payloads:
        conn = Client(_address(pp), authkey=pp.authkey)
        try:
            conn.send_bytes(payload)
            try:
                if conn.poll(2):  # the node answered or hung up: the frame was handled
                    conn.recv_bytes()
            except (EOFError, OSError):
                pass
        finally:
            conn.close()
    conn = Client(_address(pp), authkey=pp.authkey)
    try:
        conn.send(_Evil(str(markers[2])))  # Connection.send pickles
        try:
            if conn.poll(2):
                conn.recv_bytes()
        except (EOFError, OSError):
            pass
    finally:
        conn.close()
    assert_healthy(pp, before)
    for m in markers:
        assert not m.exists(), f"the node unpickled a payload ({m.name})"


def test_wrong_authkey_raw_client(own_seeded):
    from multiprocessing import AuthenticationError

    before = snapshot(own_seeded)
    with pytest.raises((AuthenticationError, EOFError, OSError)):
        conn = Client(_address(own_seeded), authkey=b"wrong-key")
        conn.close()
    assert_healthy(own_seeded, before)


# ---------------------------------------------------------------------------------------------
# fuzz
# ---------------------------------------------------------------------------------------------

OPS = ["commit", "range", "revrange", "length", "topics", "iter_range", "stats", "proc", "ack",
       "ack_commit", "reclaim", "inspect_proc", "disable_proc", "resume_proc", "destroy_proc",
       "available_proc", "system_proc", "hello", "ping", "page", "next", ""]
UNSAFE = ("shut", "stop", "kill", "exit", "close", "term", "wait", "live")

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(0, 10), children, max_size=4),
    max_leaves=12,
)
op_names = st.sampled_from(OPS) | st.text(max_size=12).filter(
    lambda s: not any(u in s.lower() for u in UNSAFE))
envelopes = st.builds(
    lambda rid, op, args: [rid, op, *args],
    st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), msgpack_values),
    st.one_of(op_names, msgpack_values),
    st.lists(msgpack_values, max_size=5),
)


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["bytes", "value", "envelope", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "value":
        return msgpack.packb(draw(msgpack_values))
    packed = msgpack.packb(draw(envelopes))
    if kind == "truncated" and len(packed) > 1:
        return packed[: draw(st.integers(min_value=0, max_value=len(packed) - 1))]
    return packed


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(frames(), min_size=1, max_size=3))
def test_fuzz_frames(mem_node, batch):
    pp = mem_node
    if SENTINEL not in pp.topics():
        pp.commit({"topic": SENTINEL, "body": {"keep": True}})
        pp.commit([{"topic": "t", "body": {"i": i}} for i in range(3)])
    before = {SENTINEL: pp.range(SENTINEL), "t": pp.range("t")}
    conn = Client(_address(pp), authkey=pp.authkey)
    try:
        for frame in batch:
            try:
                conn.send_bytes(frame)
            except OSError:
                break
    finally:
        conn.close()
    # the node still serves this client and lost nothing
    assert pp.range(SENTINEL) == before[SENTINEL]
    assert pp.range("t") == before["t"]
    assert pp.length(SENTINEL) == 1


def test_fuzz_leaves_node_healthy(mem_node):
    """After a burst of random frames on parallel raw connections, the node still works."""
    import random

    rng = random.Random(7)
    pp = mem_node
    pp.commit({"topic": SENTINEL, "body": {"keep": True}})
    pp.commit([{"topic": "t", "body": {"i": i}} for i in range(3)])
    before = snapshot(pp)
    conns = [Client(_address(pp), authkey=pp.authkey) for _ in range(5)]
    try:
        for _ in range(200):
            c = rng.choice(conns)
            frame = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            try:
                c.send_bytes(frame)
            except OSError:
                pass
    finally:
        for c in conns:
            c.close()
    assert_healthy(pp, before)
