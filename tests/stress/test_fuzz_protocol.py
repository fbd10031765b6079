"""Issue #6, hostile input: a hypothesis-driven protocol fuzzer against a live node.

Frames go over an authenticated raw ``multiprocessing.connection.Client`` (the same wire the
clients use: ``[rid, op, *args]`` msgpack envelopes, see ``pipeproc/_protocol.py``):

* envelopes of every known op with random arguments (valid values mixed with wrong types in
  every field, wrong arity), unknown ops, wrong-typed rids and ops;
* raw bytes, truncated msgpack, trailing junk, extension types, deeply nested data, huge
  ints, msgpack headers announcing gigabytes, and forged frame headers above MAX_FRAME.

After every frame the harness checks (``Harness.frame``):

1. the frame is answered — a reply carrying its rid, or the node closes the connection —
   never silence and never a hang (ops that legitimately park: ``live``, ``wait_idle``,
   ``work``);
2. a reply is never followed by the node closing the connection (the connection stays usable:
   a ping on it is answered);
3. error replies carry a SPEC error code, never ``internal_error``;
4. a frame that was refused (error reply or connection closed) wrote nothing: topic set and
   lengths unchanged, no proc and no system proc created;

and after every example (``Harness.after_example``): the node process is alive, another client
is served (``stats``, a fresh ``connect`` now and then), a protected topic and proc the fuzzer
never names are byte-for-byte unchanged, the node's timers still fire (a ``wait_for_procs``
with a short timeout does time out), and every log a fuzz frame managed to commit can be read
back by a normal client.

The fuzz writes go to a ``fz_*`` namespace, so "valid writes" are allowed there and only there.
Hypothesis runs with ``database=None`` and without the shrink phase: the node is live and
stateful, so a failing example is reported as generated (its frames are printed).
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import socket
import struct
import sys
import threading
import time
from multiprocessing.connection import Client

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, note, settings, strategies as st, given

import pipeproc
from pipeproc._handlers import op_table
from pipeproc._protocol import MAX_FRAME, pack
from pipeproc.errors import CODES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stress_util import count, record_rss, report  # noqa: E402

PROTECTED_TOPIC = "protected_topic_the_fuzzer_never_names_0123456789abcdef"
PROTECTED_PROC = "protected_proc_the_fuzzer_never_names_0123456789abcdef"
FZ_TOPICS = ["fz_a", "fz_b", "fz_c"]
FZ_PROCS = ["fzp_1", "fzp_2", "fzp_3", "liveproc-fz"]
PARKING = {"live", "wait_idle", "work"}
TIMER_OPS = {"live", "wait_idle", "proc", "avail", "sysproc", "create_live"}
REPLY_TIMEOUT = 5.0  # a frame that is neither answered nor closed within this is a hang
SPEC_CODES = set(CODES) - {"internal_error"}
_ping_rids = itertools.count(-(2**62), -1)  # never drawn by the strategies below


# ----------------------------------------------------------------------------- strategies

def _ext():
    return st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12))


# extension types with the reserved negative codes (-1 is msgpack's timestamp), as raw msgpack
RAW_EXTS = [b"\xd4\xff\x00", b"\xd6\xff\x00\x00\x00\x01", b"\xd7\xff" + b"\xff" * 8,
            b"\xc7\x0c\xff" + b"\x00" * 12, b"\xc7\x05\xff" + b"\x00" * 5, b"\xd4\x80\x00",
            b"\xd8\x85" + b"\x01" * 16, b"\xc9\x00\x00\x00\x01\xfe\x00"]


EDGE_INTS = [-(2**63), -(2**31), -1, 0, 1, 2, 3, 2**31 - 1, 2**32, 2**53 + 1, 2**62,
             2**63 - 1, 2**63, 2**64 - 1]
EDGE_FLOATS = [-1.0, -0.0, 0.0, 1e-300, 0.001, 0.05, 1.0, 10.0, 1e20, 1e308,
               math.inf, -math.inf, math.nan]

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.sampled_from(EDGE_INTS) | st.floats() | st.sampled_from(EDGE_FLOATS)
           | st.text(max_size=16) | st.binary(max_size=16) | _ext())
ANY = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=4) | st.integers(0, 5) | st.binary(max_size=3),
                      kids, max_size=3),
    max_leaves=10,
)


def weighted(p_first, first, other):
    """``first`` with probability ``p_first`` percent, else ``other``."""
    return st.integers(0, 99).flatmap(lambda k: first if k < p_first else other)


def mix(valid, *bad):
    """Mostly (85 %) a valid value for the field, else a wrong one of any type."""
    return weighted(85, valid, st.one_of(*bad, ANY))


BAD_NAMES = ["", "a b", "x" * 201, "é", "a\x00b", "a\nb", "\udcff"]
topic = mix(st.sampled_from(FZ_TOPICS), st.sampled_from(BAD_NAMES))
name = mix(st.sampled_from(FZ_PROCS), st.sampled_from(BAD_NAMES), st.text(max_size=8))
bound = mix(st.none() | st.sampled_from([":0", ":1", ":2", ":99", "0", "1-0", "99999999999999-7",
                                         "18446744073709551615-18446744073709551615", "", "x"]))
anyint = mix(st.integers(-3, 12) | st.sampled_from(EDGE_INTS))
count_ = mix(st.integers(1, 4) | st.sampled_from(EDGE_INTS))
seconds = mix(st.none() | st.sampled_from(EDGE_FLOATS) | st.sampled_from([-1, 0.2, 30]))
offset = mix(st.sampled_from([">", "$>", ":0", ":2", ":18446744073709551615", "1-0", "0",
                              "99999999999999", "", "x", "<"]))
policy = mix(st.sampled_from(["disable", "continue"]))
flag = mix(st.booleans())
claimed = mix(weighted(70, st.none(), st.lists(st.integers(-(2**63), 2**64 - 1), min_size=6,
                                              max_size=6)
                       | st.lists(st.integers(0, 3), min_size=0, max_size=7)))
DEPTHS = [10, 500, 511, 512, 1000, 1019, 1020, 1021, 1022, 1023, 1024, 1025, 5000]
body = weighted(
    60, ANY.map(lambda v: msgpack.packb(v, use_bin_type=True)),    # one valid object
    st.one_of(
    st.sampled_from(DEPTHS).map(lambda d: b"\x91" * d + b"\xc0"),  # deeply nested
    st.binary(max_size=24),                                        # usually invalid
    st.sampled_from([b"", b"\xc1", b"\xc0\xc0", b"\xdd\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff",
                     b"\xd6\xff\x00", b"\xc7\x03\xff\x00\x00\x00"]),
    ANY,                                                           # not even bytes
))
item = mix(st.tuples(topic, body).map(list))
items = mix(st.lists(item, max_size=4))
spec = mix(st.tuples(topic, name, offset, count_, anyint, seconds, policy).map(list))

OP_ARGS = {
    "ping": [ANY],
    "c1": [topic, body],
    "c": [items],
    "range": [topic, bound, bound, anyint, flag, flag, anyint],
    "page": [topic, anyint, anyint, anyint, flag, anyint],
    "length": [topic],
    "topics": [],
    "stats": [],
    "proc": [topic, name, offset, count_, anyint, seconds, policy],
    "ack": [name, claimed],
    "ackc": [name, items, claimed],
    "reclaim": [name, claimed],
    "inspect": [name],
    "disable": [name],
    "resume": [name],
    "destroy": [name],
    "avail": [mix(st.lists(spec, max_size=3))],
    "wait_idle": [mix(st.none() | st.lists(name, max_size=3)), seconds],
    "live": [topic, name, offset, count_, seconds],
    "create_live": [topic, name, offset],
    "sysproc": [name, mix(st.lists(topic, min_size=1, max_size=2)), flag,
                mix(st.sampled_from(["fz.module:func", "x.py", ""])),
                mix(st.lists(topic, max_size=2)), offset, count_, anyint, seconds, policy],
    "hello_worker": [anyint, anyint],
    "work": [mix(st.none() | st.tuples(name, claimed, st.sampled_from(["ack", "commit", "reclaim"]),
                                       items).map(list)), flag],
}
def _node_ops():
    """The op names of the node's op table (so an op added to the node is fuzzed too, with
    random arguments until it gets a schema here)."""

    class AnyHandlers:  # op_table only reads bound methods off its arguments
        def __getattr__(self, name):
            return name

    return sorted(op_table(AnyHandlers(), AnyHandlers()))


# "shutdown" is the one op the fuzzer leaves out: any authenticated client may stop the node.
NODE_OPS = [op for op in _node_ops() if op != "shutdown"]
for _op in NODE_OPS:
    OP_ARGS.setdefault(_op, [])  # an op without a schema here: no args (arity fuzz adds one)


class Frame:
    """What to put on the wire: ``payload`` (one frame), or ``raw`` bytes written to the
    socket as they are (forged frame headers)."""

    def __init__(self, payload=None, raw=None, label=""):
        self.payload, self.raw, self.label = payload, raw, label

    def __repr__(self):
        data = self.payload if self.raw is None else self.raw
        shown = data if len(data) <= 120 else data[:120] + b"..."
        return f"Frame({self.label}, {'raw ' if self.raw is not None else ''}{shown!r})"


@st.composite
def envelopes(draw):
    op = draw(st.sampled_from(sorted(OP_ARGS)))
    args = [draw(s) for s in OP_ARGS[op]]
    arity = draw(st.sampled_from(["ok"] * 18 + ["short", "long"]))
    if arity == "short" and args:
        args = args[:-1]
    elif arity == "long":
        args.append(draw(ANY))
    op_field = draw(weighted(90, st.just(op), st.text(max_size=10) | ANY))
    if op_field == "shutdown":
        op_field = "ping"
    rid = draw(weighted(85, st.just("fresh"), st.sampled_from(EDGE_INTS) | ANY))
    return ("envelope", rid, op_field, args)


def safe_pack(value):
    """msgpack of ``value``; lone surrogates go out as the invalid UTF-8 they are."""
    return msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")


def _deep(d, leaf=b"\xc0"):
    return b"\x91" * d + leaf


@st.composite
def raw_frames(draw):
    kind = draw(st.sampled_from(["bytes", "truncated", "trailing", "ext", "deep", "deep_map",
                                 "huge_ints", "declared", "header", "value"]))
    if kind == "bytes":
        return Frame(draw(st.binary(max_size=200)), label=kind)
    if kind in ("truncated", "trailing"):
        _, rid, op, args = draw(envelopes())
        data = safe_pack([7 if rid == "fresh" else rid, op, *args])
        if kind == "truncated":
            return Frame(data[:draw(st.integers(0, max(0, len(data) - 1)))], label=kind)
        return Frame(data + draw(st.binary(min_size=1, max_size=16)), label=kind)
    if kind == "ext":
        ext = draw(st.one_of(_ext().map(msgpack.packb), st.sampled_from(RAW_EXTS)))
        where = draw(st.sampled_from(["whole", "rid", "op", "arg", "body"]))
        op = draw(st.sampled_from(sorted(OP_ARGS)))
        data = {"whole": ext, "rid": b"\x92" + ext + b"\xa4ping",
                "op": b"\x92\x01" + ext,
                "arg": b"\x94\x01" + msgpack.packb(op) + ext + ext,
                "body": b"\x94\x01\xa2c1\xa4fz_b\xc4" + bytes((len(ext),)) + ext}[where]
        return Frame(data, label=f"ext in {where}")
    if kind in ("deep", "deep_map"):
        d = draw(st.sampled_from(DEPTHS + [100_000]))
        op = draw(st.sampled_from(["ping", "length", "c1", "range"]))
        nested = _deep(d) if kind == "deep" else b"\x81\x00" * d + b"\xc0"
        return Frame(b"\x94" + msgpack.packb(draw(st.integers(1, 2**32))) + msgpack.packb(op)
                     + msgpack.packb("fz_a") + nested, label=f"{kind} {d}")
    if kind == "huge_ints":
        v = draw(st.sampled_from([b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",   # uint64 max
                                  b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",   # int64 min
                                  b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",   # float64 nan
                                  b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00"]))  # float64 inf
        op = draw(st.sampled_from(["range", "page", "proc", "wait_idle", "live", "c1"]))
        n = len(OP_ARGS[op])
        pos = draw(st.integers(0, n + 1))
        head = bytes((0x90 | (n + 2),))
        parts = [v if pos == 0 else msgpack.packb(draw(st.integers(1, 1000))), msgpack.packb(op)]
        for i in range(n):
            parts.append(v if pos == i + 2 else safe_pack(draw(OP_ARGS[op][i])))
        return Frame(head + b"".join(parts), label=f"huge int in {op}[{pos}]")
    if kind == "declared":  # msgpack headers announcing far more than follows
        lie = draw(st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                    b"\xc6\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff",
                                    b"\xc9\xff\xff\xff\xff\x05", b"\xdc\xff\xff"]))
        where = draw(st.sampled_from(["whole", "arg", "body"]))
        if where == "whole":
            return Frame(lie + draw(st.binary(max_size=8)), label="declared whole")
        if where == "arg":
            return Frame(b"\x93\x01\xa4ping" + lie + b"\x00" * 8, label="declared arg")
        return Frame(b"\x94\x01\xa2c1\xa4fz_a\xc4" + bytes((len(lie),)) + lie,
                     label="declared body")
    if kind == "header":  # the frame length itself lies: above MAX_FRAME, or negative
        header = draw(st.sampled_from([
            struct.pack("!i", MAX_FRAME + 1), struct.pack("!i", 2**31 - 1),
            struct.pack("!i", -1) + struct.pack("!Q", MAX_FRAME + 1),
            struct.pack("!i", -1) + struct.pack("!Q", 2**64 - 1),
            struct.pack("!i", -2), struct.pack("!i", -(2**31)),
        ]))
        return Frame(raw=header + draw(st.binary(max_size=32)), label="forged header")
    return Frame(msgpack.packb(draw(ANY)), label="value")


def envelope_frame(env, fresh):
    _, rid, op, args = env
    rid = next(fresh) if rid == "fresh" else rid
    return Frame(safe_pack([rid, op, *args]), label=f"{op!r}"[:40])


# ----------------------------------------------------------------------------- harness


def _parse_reply(data):
    """``(rid, status, result)`` of a reply, tolerating results this decoder cannot build."""
    unp = msgpack.Unpacker(raw=False, strict_map_key=False)
    unp.feed(data)
    assert unp.read_array_header() == 3, data[:64]
    rid = unp.unpack()
    status = unp.unpack()
    try:
        result = unp.unpack()
    except Exception as exc:  # e.g. an echoed nesting deeper than msgpack decodes
        result = exc
    return rid, status, result


def _predict(payload):
    """The rid and op the node will see, or None when the frame is not an envelope."""
    try:
        req = msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception:
        return None
    if type(req) is not list or len(req) < 2 or type(req[0]) is not int:
        return None
    return req[0], req[1]


class Harness:
    def __init__(self, pp):
        self.pp = pp
        addr = pp.address
        self.addr = tuple(addr) if isinstance(addr, list) else addr
        self.pid = pp.stats()["node"]["pid"]
        pp.commit([{"topic": PROTECTED_TOPIC, "body": {"i": i, "b": os.urandom(8)}}
                   for i in range(5)])
        assert pp.proc(PROTECTED_TOPIC, name=PROTECTED_PROC, reclaim_timeout=None) is not None
        self.protected = (pp.range(PROTECTED_TOPIC), pp.inspect_proc(PROTECTED_PROC))
        self.probe = Client(self.addr, authkey=pp.authkey)
        self.examples = 0
        self.frames = 0
        self.live_names = set()  # procs a create_live made: dropped when their conn closes
        self.recent = collections.deque()  # (time, frame): a wedged timer shows up late
        self.outcomes = collections.Counter()

    def close(self):
        self.probe.close()

    def world(self):
        st_ = self.pp.stats()
        return ({t: v["length"] for t, v in st_["topics"].items()},
                set(st_["procs"]), set(st_["system_procs"]))

    # -- one frame

    def frame(self, c, fr, used):
        """Send one frame on ``c`` and check invariants 1-4; returns False once closed."""
        self.frames += 1
        before = self.world()
        envelope = _predict(fr.payload) if fr.raw is None else None
        pred = envelope
        if pred is not None and pred[0] in used:
            pred = None  # a repeated rid cannot be told apart: check only the generic rules
        if pred is not None:
            used.add(pred[0])
        ping_rid = next(_ping_rids)
        try:
            if fr.raw is not None:
                s = socket.socket(fileno=os.dup(c.fileno()))
                try:
                    s.sendall(fr.raw)
                finally:
                    s.close()
            else:
                c.send_bytes(fr.payload)
            c.send_bytes(pack([ping_rid, "ping"]))
        except OSError:
            pass  # the node hung up while we were still sending: it closed the connection
        replies, closed, pinged = {}, False, False
        want = pred[0] if pred is not None else None
        parking = pred is not None and isinstance(pred[1], str) and pred[1] in PARKING
        deadline = time.monotonic() + REPLY_TIMEOUT
        grace = None
        while True:
            if pinged and (want is None or want in replies):
                break
            if pinged and parking and grace is None:
                grace = time.monotonic() + 0.05
            now = time.monotonic()
            if grace is not None and now > grace:
                break  # parked, legitimately
            if now > deadline:
                break
            try:
                if not c.poll(0.05):
                    continue
                rid, status, result = _parse_reply(c.recv_bytes())
            except (EOFError, OSError):
                closed = True
                break
            if rid == ping_rid:
                pinged = True
            else:
                replies[rid] = (status, result)
        after = self.world()

        assert closed or pinged, f"{fr}: the node neither answered a ping nor closed (hang)"
        if not closed and want is not None and not parking:
            assert want in replies, f"{fr}: no reply for rid {want} within {REPLY_TIMEOUT} s"
        if envelope is None:  # not [int rid, op, ...]: the node must hang up
            assert closed, f"{fr}: a malformed frame was neither refused nor answered " \
                           f"(replies: {replies})"
        if closed and want is not None:  # (a reply with rid None is the node's refusal of
            # the frame itself before it hangs up: allowed)
            assert want not in replies, (
                f"{fr}: the node replied {replies[want]} and then closed the connection: "
                "a request is either served (connection kept) or refused (nothing done)")
        mine = replies.get(want) if want is not None else None
        if mine is not None and mine[0] == 1:
            code = mine[1][0] if isinstance(mine[1], list) and mine[1] else mine[1]
            assert code in SPEC_CODES, f"{fr}: error code {code!r} ({mine[1]})"
        if mine is not None and mine[0] == 0 and pred[1] == "create_live":
            self.live_names.add(_predict_name(fr.payload))
        ambiguous = envelope is not None and want is None
        if not ambiguous and (mine is None or mine[0] == 1):  # refused/parked: nothing written
            topics0, procs0, sys0 = before
            topics1, procs1, sys1 = after
            assert topics1 == topics0, f"{fr}: refused, yet topics changed {topics0} -> {topics1}"
            assert not (procs1 - procs0), f"{fr}: refused, yet created procs {procs1 - procs0}"
            gone = procs0 - procs1 - self.live_names
            assert not gone, f"{fr}: refused, yet destroyed procs {gone}"
            assert sys1 == sys0, f"{fr}: refused, yet system procs changed {sys0} -> {sys1}"
        if closed:
            self.outcomes["connection closed"] += 1
        elif mine is None:
            self.outcomes["parked" if want is not None else "answered, rid ambiguous"] += 1
        else:
            self.outcomes["ok reply" if mine[0] == 0 else "error reply"] += 1
        count("frames fuzzed")
        return not closed

    # -- one example

    def run(self, frames):
        self.examples += 1
        now = time.monotonic()
        self.recent.extend((now, fr) for fr in frames)
        while self.recent and self.recent[0][0] < now - 3:
            self.recent.popleft()
        note(f"frames: {frames!r}")
        start = self.world()[0]
        c = Client(self.addr, authkey=self.pp.authkey)
        used = set()
        try:
            for fr in frames:
                if not self.frame(c, fr, used):
                    break
        finally:
            c.close()
        self.after_example(start)

    def after_example(self, start_lengths):
        pp = self.pp
        assert os.path.exists(f"/proc/{self.pid}"), "the node died"
        lengths = self.world()[0]
        assert pp.range(PROTECTED_TOPIC) == self.protected[0], "protected topic changed"
        assert pp.inspect_proc(PROTECTED_PROC) == self.protected[1], "protected proc changed"
        # every log a fuzz frame committed is readable by a normal client
        for t, n in lengths.items():
            grown = n - start_lengths.get(t, 0)
            if grown > 0:
                try:
                    got = pp.revrange(t, limit=grown)
                except Exception as exc:
                    raise AssertionError(
                        f"topic {t!r}: the {grown} log(s) just committed by a fuzz frame "
                        f"cannot be read back: {type(exc).__name__}: {exc}") from None
                assert len(got) == grown
                count("operations verified", grown)
        # the node's timers still fire: a wait on the (forever busy) protected proc times out
        rid = next(_ping_rids)
        self.probe.send_bytes(pack([rid, "wait_idle", [PROTECTED_PROC], 0.001]))
        if not self.probe.poll(5):
            timed = [fr for _, fr in self.recent
                     if isinstance((_predict(fr.payload or b"") or (0, 0))[1], str)
                     and _predict(fr.payload)[1] in TIMER_OPS]
            raise AssertionError(
                "a wait_for_procs(timeout=0.001) never timed out: the node's timer thread is "
                "wedged (a timer due a second later is only looked at then). Frames of the "
                f"last 3 s that set timers: {timed[-6:]!r}")
        got_rid, status, result = _parse_reply(self.probe.recv_bytes())
        assert (got_rid, status, result[0]) == (rid, 1, "timeout"), result
        count("operations verified")
        if self.examples % 50 == 0:
            other = pipeproc.connect(address=self.pp.address, authkey=self.pp.authkey, timeout=5)
            try:
                assert other.range(PROTECTED_TOPIC) == self.protected[0]
            finally:
                other.close()
            record_rss(self.pid, "node (fuzz)")


def _predict_name(payload):
    req = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    return req[3] if len(req) > 3 else None


@pytest.fixture
def harness(tmp_path):
    """One node per fuzz test (shared by all its examples): a bug one fuzzer finds does not
    cascade into the other."""
    pp = pipeproc.spawn(tmp_path / "node", memory=True, workers=0, durability="fast")
    h = None
    try:
        h = Harness(pp)
        yield h
        report(f"{'fuzz outcomes':>36}: " + ", ".join(f"{k} {v}" for k, v in
                                                     sorted(h.outcomes.items())))
        rss = record_rss(h.pid, "node (fuzz)")
        assert rss < 512 * 1024, f"the node holds {rss >> 10} MiB after the fuzzing"
    finally:
        if h is not None:
            h.close()
        pp.shutdown()


#: ``PIPEPROC_FUZZ_SCALE=10 make stress`` fuzzes ten times longer.
SCALE = float(os.environ.get("PIPEPROC_FUZZ_SCALE", "1"))
FUZZ = dict(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------- the fuzzers


@pytest.mark.timeout(int(240 * SCALE))
@settings(max_examples=int(1500 * SCALE), **FUZZ)
@given(envs=st.lists(envelopes(), min_size=1, max_size=4))
def test_fuzz_envelopes_of_every_op(harness, envs):
    """Known ops (and some unknown ones) with random arguments, wrong types in every field,
    wrong arity, wrong-typed rids."""
    fresh = itertools.count(1)
    harness.run([envelope_frame(e, fresh) for e in envs])


@pytest.mark.timeout(int(240 * SCALE))
@settings(max_examples=int(1000 * SCALE), **FUZZ)
@given(frames=st.lists(raw_frames(), min_size=1, max_size=3))
def test_fuzz_raw_frames(harness, frames):
    """Bytes that are not (quite) envelopes: garbage, truncations, trailing junk, extension
    types, deep nesting, 64-bit extremes, lying msgpack and frame headers."""
    harness.run(frames)


# ----------------------------------------------------------------------------- regressions
# Deterministic versions of what the fuzzer looks for: one test per property, each trying
# every case and reporting all the offending ones.


@pytest.fixture
def fresh_node(tmp_path):
    """A factory of memory nodes, all shut down at the end."""
    nodes = []

    def make():
        node = pipeproc.spawn(tmp_path / f"node{len(nodes)}", memory=True, workers=0,
                              durability="fast")
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            node.shutdown(timeout=10)


@pytest.fixture
def pp(fresh_node):
    return fresh_node()


def _raw(pp):
    addr = pp.address
    return Client(tuple(addr) if isinstance(addr, list) else addr, authkey=pp.authkey)


def _exchange(pp, frame, wait=3.0, linger=0.3):
    """Send one frame on a new raw connection; returns (replies, closed): what came within
    ``wait`` seconds, watching ``linger`` seconds more after a reply for a hang-up."""
    c = _raw(pp)
    replies, closed = [], False
    try:
        c.send_bytes(frame)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if replies:
                deadline = min(deadline, replies_at + linger)
            try:
                if c.poll(0.05):
                    replies.append(_parse_reply(c.recv_bytes()))
                    if len(replies) == 1:
                        replies_at = time.monotonic()
            except (EOFError, OSError):
                closed = True
                break
    finally:
        c.close()
    return replies, closed


def _timers_fire(pp, name):
    """A wait on ``name`` (kept busy by the caller) times out: the timer thread works."""
    c = _raw(pp)
    try:
        c.send_bytes(pack([1, "wait_idle", [name], 0.05]))
        if not c.poll(3):
            return False
        return _parse_reply(c.recv_bytes())[2][0] == "timeout"
    finally:
        c.close()


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _try_timeout(pp, via, value):
    """Ask for a wait with ``timeout=value`` through ``via``; returns what came back within
    a second: an error code, "closed", "ok ..." or None (accepted, still waiting)."""
    pp.commit({"topic": "busy", "body": {}})
    assert pp.proc("busy", name="busy_proc", reclaim_timeout=None) is not None
    assert pp.proc("quiet", name="quiet_proc", reclaim_timeout=None) is None  # parks a live
    assert _timers_fire(pp, "busy_proc")
    outcome = []
    if via == "wait_for_procs":
        waiter = pipeproc.connect(address=pp.address, authkey=pp.authkey)

        def wait():
            try:
                waiter.wait_for_procs(["busy_proc"], timeout=value)
                outcome.append("returned")
            except pipeproc.PipeProcError as exc:
                outcome.append(exc.code)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        t.join(1.0)
        waiter.close()
        return outcome[0] if outcome else None
    if via == "raw wait_idle":
        frame = pack([1, "wait_idle", ["busy_proc"], value])
    else:
        frame = pack([1, "live", "quiet", "quiet_proc", ">", 1, value])
    replies, closed = _exchange(pp, frame, wait=1.0)
    if replies:
        return replies[0][2][0] if replies[0][1] == 1 else f"ok {replies[0][2]!r}"
    return "closed" if closed else None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_timeouts_never_kill_the_timers(fresh_node, value):
    """A timeout of NaN is not a duration: refused with invalid_argument. Infinity may be
    refused or mean 'no timeout'. Either way the node's timer thread (reclaim timeouts,
    wait timeouts, the GC, the parent watch) must keep running — a NaN deadline in its heap
    never comes due and ``Condition.wait(nan)`` returns at once: the thread spins on it."""
    problems = []
    for via in ("wait_for_procs", "raw wait_idle", "raw live"):
        pp = fresh_node()
        pid = pp.stats()["node"]["pid"]
        outcome = _try_timeout(pp, via, value)
        count("faults injected")
        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        fired = _timers_fire(pp, "busy_proc")
        busy = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        if not fired:
            problems.append(f"{via}(timeout={value!r}) -> {outcome or 'accepted'}, and then a "
                            "wait_for_procs(timeout=0.05) never times out: the node's timer "
                            f"thread is wedged (the node meanwhile used {busy:.0%} of a CPU)")
        elif outcome not in ("invalid_argument", "closed") and (outcome or math.isnan(value)):
            problems.append(f"{via}(timeout={value!r}) -> {outcome or 'accepted, waiting'}")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(60)
def test_a_refused_live_request_claims_nothing(pp):
    """A ``live`` request with a malformed timeout must be refused before anything is done
    (error reply, or connection closed with nothing written)."""
    pp.commit({"topic": "lv", "body": {"i": 0}})
    assert pp.proc("lv", name="regular", reclaim_timeout=None).body == {"i": 0}
    pp.ack("regular")
    problems = []
    for k, timeout in enumerate(["soon", [1], {"s": 1}]):
        pp.commit({"topic": "lv", "body": {"i": k + 1}})
        before = pp.inspect_proc("regular")
        replies, closed = _exchange(pp, pack([1, "live", "lv", "regular", ">", 1, timeout]))
        count("faults injected")
        after = pp.inspect_proc("regular")
        ok = [r for r in replies if r[1] == 0]
        if closed and (ok or after != before):
            problems.append(f"timeout={timeout!r}: replied {ok} and claimed "
                            f"{after.last_claimed_range!r}, then closed the connection")
        elif not closed and not (replies and replies[0][1] == 1):
            problems.append(f"timeout={timeout!r}: accepted ({replies})")
        if after.last_claimed_range != before.last_claimed_range:
            pp.reclaim("regular")
            pp.proc("lv", name="regular")
            pp.ack("regular")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(60)
def test_a_body_the_node_accepts_can_be_read_back(pp):
    """The node checks that a body is one msgpack object; a body nested just below
    msgpack's decoding limit passes that check but cannot be decoded inside a page (which
    adds levels of nesting): range() and proc() on its topic fail from then on."""
    problems = []
    for depth in (500, 1000, 1019, 1020, 1021, 1022, 1023, 1024, 1025, 5000):
        topic = f"deep{depth}"
        replies, _ = _exchange(pp, pack([1, "c1", topic, b"\x91" * depth + b"\xc0"]), wait=5)
        count("frames fuzzed")
        assert replies, f"depth {depth}: no reply"
        _, status, result = replies[0]
        if status == 1:
            if result[0] != "invalid_log_format":
                problems.append(f"depth {depth}: refused with {result[0]!r}")
            continue
        pp.commit({"topic": topic, "body": {"after": True}})
        for what, fn in [("range", lambda: pp.range(topic)),
                         ("proc", lambda: pp.proc(topic, name=f"reader_{topic}", count=2))]:
            try:
                assert len(fn()) == 2
            except Exception as exc:
                problems.append(f"depth {depth}: accepted, then {what}() on the topic fails "
                                f"with {type(exc).__name__}")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(60)
def test_the_node_refuses_bodies_the_spec_forbids(pp):
    """SPEC §1: a body is a dict, a list or bytes; anything else (None included) fails with
    invalid_log_format before any write. The client checks this, but the node stores what a
    raw (or buggy) client sends, and every reader then gets a body no client could commit."""
    bodies = {"nil": b"\xc0", "int": b"\x05", "str": b"\xa3str", "true": b"\xc3",
              "float": b"\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00",
              "timestamp": b"\xd6\xff\x00\x00\x00\x01", "ext": b"\xd4\x05\x00"}
    problems = []
    for label, body in bodies.items():
        topic = f"typed_{label}"
        replies, _ = _exchange(pp, pack([1, "c1", topic, body]), wait=5)
        count("frames fuzzed")
        assert replies, label
        _, status, result = replies[0]
        if status == 0:
            problems.append(f"{label} ({body!r}): stored; readers get "
                            f"{[log.body for log in pp.range(topic)]!r}")
        elif result[0] != "invalid_log_format":
            problems.append(f"{label}: refused with {result[0]!r}")
    for ok_body in ({}, [], b"", {"a": [1, b"x"]}):
        replies, _ = _exchange(pp, pack([1, "c1", "typed_ok", msgpack.packb(ok_body,
                                                                          use_bin_type=True)]))
        assert replies and replies[0][1] == 0, (ok_body, replies)
    assert not problems, "\n".join(problems)
