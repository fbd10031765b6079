"""Issue #6, faults: a full store, clients that do not read their replies, oversized frames.

Every test drives a live node and checks what a careful user relies on:

* **storage full** (SPEC §2 ``storage_full``): the failing request raises ``storage_full`` and
  writes nothing of itself (single commit, atomic batch, atomic ack_commit); reads and other
  clients keep working; the node is neither killed nor wedged; writes resume once space is
  back (a restart with a larger ``max_map_size``, or the GC pruning what a destroyed proc
  protected);
* **slow readers** (architecture: "a client that stops reading gets a per-connection
  backlog ... disconnected past 256 MiB — the writer never blocks on a slow reader"): pipelined
  requests whose replies are never read, an unread live proc and unread ``wait_for_procs``
  never hold up other clients, and the node's memory stays bounded;
* **oversized frames** (``_protocol.MAX_FRAME``): a frame above the limit costs its sender
  the connection without the node allocating it; a frame exactly at the limit is served;
  the client refuses to send what the node would refuse, and nothing the node *sends* may
  exceed what the client accepts.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
from multiprocessing.connection import Client

import msgpack
import pytest

import pipeproc
from pipeproc._protocol import MAX_FRAME, decode, pack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stress_util import count, record_rss, report, wait_until  # noqa: E402

MB = 1 << 20
BIG = 60_000  # a body that needs its own overflow pages in LMDB
SENTINEL = "sentinel_kept_through_every_fault"


# ----------------------------------------------------------------------------- helpers




def expect_code(code, fn, *args, **kwargs):
    with pytest.raises(pipeproc.PipeProcError) as e:
        fn(*args, **kwargs)
    assert e.value.code == code, (e.value.code, str(e.value))
    return e.value


def node_pid(pp):
    return pp.stats()["node"]["pid"]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def lengths(pp):
    return {t: pp.length(t) for t in pp.topics()}


def timed(fn, *args, limit, what, **kwargs):
    """Run ``fn`` and fail if it took longer than ``limit`` seconds."""
    t0 = time.monotonic()
    out = fn(*args, **kwargs)
    took = time.monotonic() - t0
    assert took < limit, f"{what} took {took:.2f} s (limit {limit} s)"
    return out, took


def raw_client(pp):
    """An authenticated raw ``multiprocessing.connection`` client of the node."""
    addr = pp.address
    return Client(tuple(addr) if isinstance(addr, list) else addr, authkey=pp.authkey)


def raw_socket_of(conn):
    """A socket object sharing ``conn``'s descriptor (to write forged frame headers)."""
    return socket.socket(fileno=os.dup(conn.fileno()))


def closed_by_peer(conn, timeout, replies=None):
    """Read replies (kept in ``replies`` if given) until the node closes ``conn``; True if
    it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if conn.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
                data = conn.recv_bytes()
                if replies is not None:
                    replies.append(data)
    except (EOFError, OSError):
        return True
    return False


class Pacer:
    """A well-behaved client doing small writes and reads in a loop on its own thread,
    recording the latency of each call: the 'other clients keep working' probe."""

    def __init__(self, pp, topic="pacer"):
        self.pp = pipeproc.connect(address=pp.address, authkey=pp.authkey, timeout=10)
        self.topic = topic
        self.latencies = []
        self.errors = []
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        i = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                log_id = self.pp.commit({"topic": self.topic, "body": {"i": i}})
                got = self.pp.range(self.topic, start=log_id)
                assert got == [pipeproc.Log(log_id, {"i": i})], got
                assert self.pp.length(self.topic) == i + 1
            except Exception as exc:  # recorded, asserted by the test
                self.errors.append(exc)
                return
            self.latencies.append(time.monotonic() - t0)
            self.done += 1
            i += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        self.pp.close()

    def check(self, limit, min_done=1):
        assert not self.errors, f"the well-behaved client failed: {self.errors[0]!r}"
        assert self.done >= min_done, f"the well-behaved client did only {self.done} calls"
        worst = max(self.latencies)
        assert worst < limit, f"a well-behaved call took {worst:.2f} s (limit {limit} s)"
        count("operations verified", self.done)
        return worst


def fill(pp, topic, size=BIG, limit=5000):
    """Commit ``size``-byte bodies to ``topic`` until the store is full; returns how many
    went in. The failing commit must be ``storage_full`` and must not change the length."""
    n = 0
    while n < limit:
        before = pp.length(topic) if n else None
        try:
            pp.commit({"topic": topic, "body": os.urandom(size)})
        except pipeproc.PipeProcError as exc:
            assert exc.code == "storage_full", (exc.code, str(exc))
            if before is not None:
                assert pp.length(topic) == before
            count("faults injected")
            return n
        n += 1
    raise AssertionError(f"the store never filled up after {n} commits of {size} bytes")


# ----------------------------------------------------------------------------- storage full


@pytest.mark.timeout(120)
@pytest.mark.parametrize("memory", [False, True], ids=["disk", "memory"])
def test_storage_full_writes_nothing_and_node_keeps_serving(spawner, memory):
    pp = spawner(memory=memory, max_map_size=4 * MB)
    pid = node_pid(pp)
    # state before the store fills: a sentinel, a source topic and a proc with a pending claim
    pp.commit({"topic": SENTINEL, "body": {"keep": True}})
    pp.commit([{"topic": "src", "body": {"i": i}} for i in range(3)])
    claim = pp.proc("src", name="p", reclaim_timeout=None)
    assert claim is not None and claim.body == {"i": 0}
    n = fill(pp, "fill")
    assert n > 10, "4 MiB should hold more than a few 60 kB logs"

    before = lengths(pp)
    src_logs = pp.range("src")
    fill_ids = [log.id for log in pp.range("fill")]
    state_p = pp.inspect_proc("p")
    topics_before = pp.topics()

    # 1. a single commit: storage_full, nothing written
    expect_code("storage_full", pp.commit, {"topic": "fill", "body": os.urandom(BIG)})
    expect_code("storage_full", pp.commit, {"topic": "fresh_single", "body": os.urandom(BIG)})
    # 2. a batch across topics, one new: all or nothing
    expect_code("storage_full", pp.commit, [
        {"topic": "src", "body": {"small": 1}},
        {"topic": "fresh_batch", "body": {"small": 2}},
        {"topic": "fill", "body": os.urandom(BIG)},
        {"topic": "src", "body": os.urandom(BIG)},
    ])
    # 3. ack_commit: neither the ack nor the commit
    expect_code("storage_full", pp.ack_commit, "p",
                [{"topic": "out", "body": os.urandom(BIG)}, {"topic": "src", "body": {}}],
                claimed=claim)
    count("faults injected", 4)
    assert pp.topics() == topics_before
    assert lengths(pp) == before
    assert pp.range("src") == src_logs
    assert pp.inspect_proc("p") == state_p, "a failed ack_commit changed the proc"
    assert pp.stats()["procs"]["p"]["pending"] == f"{claim.id}..{claim.id}"

    # 4. reads keep working, on this client and on others
    assert [log.id for log in pp.range("fill")] == fill_ids
    assert [log.id for log in pp.revrange("fill", limit=3)] == fill_ids[::-1][:3]
    assert len(list(pp.iter_range("fill", page_size=7))) == n
    assert pp.range(SENTINEL)[0].body == {"keep": True}
    other = pipeproc.connect(address=pp.address, authkey=pp.authkey)
    try:
        assert other.length("fill") == n
        assert other.range("src") == src_logs
        expect_code("storage_full", other.commit, {"topic": "src", "body": os.urandom(BIG)})

        # 5. a storm of failing writes from several clients does not wedge the node: every
        # call is answered, and a reader is served promptly throughout
        outcomes = []

        def storm():
            c = pipeproc.connect(address=pp.address, authkey=pp.authkey)
            try:
                for _ in range(15):
                    try:
                        c.commit([{"topic": "fill", "body": os.urandom(BIG)},
                                  {"topic": "storm", "body": {}}])
                        outcomes.append("ok")
                    except pipeproc.PipeProcError as exc:
                        outcomes.append(exc.code)
            finally:
                c.close()

        threads = [threading.Thread(target=storm, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        worst = 0.0
        while any(t.is_alive() for t in threads):
            _, took = timed(other.range, "src", limit=3.0, what="a read during a write storm")
            worst = max(worst, took)
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a writer of the storm never got its answer"
        assert outcomes == ["storage_full"] * 60, sorted(set(outcomes))
        count("faults injected", len(outcomes))
        assert "storm" not in other.topics()
        assert lengths(other) == before
    finally:
        other.close()
    assert alive(pid) and node_pid(pp) == pid
    # 6. the claim is still exactly the pending claim, and a tiny write may or may not fit,
    # but never half-applies
    try:
        pp.ack("p", claimed=claim)
    except pipeproc.PipeProcError as exc:
        assert exc.code == "storage_full"
        assert pp.inspect_proc("p") == state_p
    count("operations verified", n + 12)


@pytest.mark.timeout(120)
def test_storage_full_writes_resume_after_restart_with_a_larger_map(tmp_path, spawner):
    loc = tmp_path / "grow"
    pp = spawner(loc, max_map_size=4 * MB)
    pp.commit({"topic": SENTINEL, "body": {"keep": True}})
    n = fill(pp, "fill")
    ids = [log.id for log in pp.range("fill")]
    expect_code("storage_full", pp.commit, {"topic": "fill", "body": os.urandom(BIG)})
    pp.shutdown()

    pp = spawner(loc, max_map_size=16 * MB)
    assert [log.id for log in pp.range("fill")] == ids, "data lost across the restart"
    assert pp.range(SENTINEL)[0].body == {"keep": True}
    for i in range(n):  # as much again fits now
        new_id = pp.commit({"topic": "fill", "body": os.urandom(BIG)})
        assert new_id.endswith(f"-{n + i}")
    assert pp.length("fill") == 2 * n
    count("operations verified", 2 * n)


@pytest.mark.timeout(120)
def test_storage_full_writes_resume_once_the_gc_prunes(spawner):
    """The GC frees the space a destroyed proc was protecting; the application's next
    writes (as big as before) must then go through: storage_full is not forever."""
    pp = spawner(max_map_size=4 * MB, gc={"min_prune_time": 0, "interval": 0.2})
    # a proc that never claims protects every log of its topic from the GC (SPEC §8)
    assert pp.proc("fill", name="guard", reclaim_timeout=None) is None
    n = fill(pp, "fill")
    expect_code("storage_full", pp.commit, {"topic": "fill", "body": os.urandom(BIG)})
    assert pp.stats()["topics"]["fill"]["stored"] == n

    try:
        pp.destroy_proc("guard")  # nothing protects the logs any more
    except pipeproc.PipeProcError as exc:
        raise AssertionError(f"a full store cannot even destroy a proc ({exc.code}): "
                             "no way to let the GC free space") from None
    wait_until(lambda: pp.stats()["topics"]["fill"]["stored"] == 0, 20,
               "the GC to prune the unprotected logs")
    assert pp.length("fill") == n  # GC keeps the counters
    written = 0
    try:
        for _ in range(n // 2):  # half of what fitted before must fit again
            pp.commit({"topic": "fill", "body": os.urandom(BIG)})
            written += 1
    except pipeproc.PipeProcError as exc:
        raise AssertionError(
            f"after the GC pruned all {n} logs, commit #{written + 1} of a {BIG}-byte body "
            f"still fails with {exc.code!r}: the freed space is never reused") from None
    assert pp.length("fill") == n + written
    count("operations verified", n + written)


# ----------------------------------------------------------------------------- slow readers


@pytest.mark.timeout(180)
def test_unread_big_range_replies_do_not_block_others_and_memory_is_bounded(spawner):
    """A client pipelines large range reads (about 4 MiB of replies each) and never reads a
    byte: the node keeps serving everyone else, disconnects it past its backlog limit
    (256 MiB), and its memory stays bounded and comes back."""
    pp = spawner(memory=True, durability="fast")
    pid = node_pid(pp)
    body = os.urandom(64 * 1024)
    for _ in range(4):
        pp.commit([{"topic": "big", "body": body} for _ in range(16)])
    rss0 = record_rss(pid, "node (slow reader)")
    conns0 = pp.stats()["node"]["connections"]

    slow = raw_client(pp)
    sent = [0]

    def flood():
        for rid in range(1, 121):  # 120 x ~4 MiB = ~480 MiB of replies, never read
            try:
                slow.send_bytes(pack([rid, "range", "big", None, None, 0, False, False, 10_000]))
            except OSError:
                return  # the node hung up on us: allowed, and expected eventually
            sent[0] += 1

    flooder = threading.Thread(target=flood, daemon=True)
    peak = rss0
    try:
        with Pacer(pp) as pacer:
            flooder.start()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                peak = max(peak, record_rss(pid, "node (slow reader)"))
                if not flooder.is_alive() and pp.stats()["node"]["connections"] <= conns0 + 1:
                    break  # flood over, and the node dropped the slow connection
                time.sleep(0.05)
            time.sleep(0.3)
        worst = pacer.check(limit=2.0, min_done=5)
        flooder.join(30)
        assert not flooder.is_alive(), "sending requests to the node blocked forever"
        # the pacer's own connection has gone too: only the spawner's remains
        wait_until(lambda: pp.stats()["node"]["connections"] <= conns0, 30,
                   "the node to drop the client that never reads")
        assert closed_by_peer(slow, 30), "the node kept a connection that never reads"
    finally:
        slow.close()
    grown = (peak - rss0) / 1024
    report(f"{'slow reader: node RSS growth':>36}: {grown:.0f} MiB (backlog cap 256 MiB), "
           f"{sent[0]} x 4 MiB replies unread, worst other-client call {worst * 1000:.0f} ms")
    assert grown < 512, f"the node grew by {grown:.0f} MiB for a client that never reads"
    # the backlog is freed with the connection
    wait_until(lambda: record_rss(pid, "node (slow reader)") - rss0 < 96 * 1024, 30,
               "the node's memory to come back after dropping the slow reader")
    assert pp.length("big") == 64
    count("faults injected")


@pytest.mark.timeout(120)
def test_unread_pipelined_commits_all_apply_and_others_are_not_delayed(spawner):
    """3000 commits pipelined on one connection, replies left unread until the end: every
    one is applied (group commit), other clients stay fast, and the replies are all there,
    matched by rid, when the client finally reads."""
    pp = spawner(durability="fast")
    slow = raw_client(pp)
    n = 3000
    try:
        with Pacer(pp) as pacer:
            for rid in range(1, n + 1):
                slow.send_bytes(pack([rid, "c1", "pipelined", msgpack.packb({"rid": rid})]))
            wait_until(lambda: pp.length("pipelined") == n if "pipelined" in pp.topics() else False,
                       60, "the pipelined commits to be applied")
            wait_until(lambda: pacer.done >= 3, 30, "the well-behaved client to make 3 calls")
        pacer.check(limit=2.0, min_done=3)
        got = {}
        while len(got) < n:
            assert slow.poll(10), f"only {len(got)} of {n} replies arrived"
            rid, status, result = decode(slow.recv_bytes())
            assert status == 0, result
            got[rid] = result
        assert sorted(got) == list(range(1, n + 1))
    finally:
        slow.close()
    logs = pp.range("pipelined")
    assert [log.body["rid"] for log in logs] == list(range(1, n + 1))  # one connection: in order
    assert [log.id for log in logs] == [f"{got[i][0]}-{got[i][1]}" for i in range(1, n + 1)]
    count("operations verified", n)


@pytest.mark.timeout(120)
def test_unread_live_proc_and_wait_for_procs_do_not_block_others(spawner):
    """A connection parks a live claim and 300 wait_for_procs requests and then never reads
    anything; commits to the watched topic keep flowing for everyone else, and when that
    connection dies its hidden live proc goes with it."""
    pp = spawner(durability="fast")
    pp.commit({"topic": "lv", "body": {"seed": 0}})
    pp.commit({"topic": "busy", "body": {}})
    # a claim that stays pending keeps every wait_for_procs parked
    assert pp.proc("busy", name="busy_proc", reclaim_timeout=None) is not None
    conns0 = pp.stats()["node"]["connections"]

    slow = raw_client(pp)
    hidden = "liveproc-stress-unread"
    slow.send_bytes(pack([1, "create_live", "lv", hidden, ">"]))
    slow.send_bytes(pack([2, "live", "lv", hidden, ">", 5000, None]))
    for rid in range(3, 303):
        slow.send_bytes(pack([rid, "wait_idle", None, None]))
    # an unread real LiveProc, too: one delivery taken, never acked, never iterated again
    lp_client = pipeproc.connect(address=pp.address, authkey=pp.authkey)
    live = lp_client.live_proc("lv", mode="all")
    first = next(iter(live))
    assert first.body == {"seed": 0}
    try:
        with Pacer(pp) as pacer:
            for k in range(20):
                batch = [{"topic": "lv", "body": {"k": k, "pad": os.urandom(2048)}}
                         for _ in range(100)]
                timed(pp.commit, batch, limit=3.0, what="a commit to a watched topic")
            wait_until(lambda: pacer.done >= 3, 30, "the well-behaved client to make 3 calls")
        pacer.check(limit=2.0, min_done=3)
        assert pp.length("lv") == 2001
        stats = pp.stats()
        assert stats["procs"][hidden]["pending"], "the parked live claim was never served"
        # the waiters are still parked (busy_proc has a pending claim), not lost: acking
        # it releases all 300 at once, with no one reading them
        pp.ack("busy_proc")
        pp.commit({"topic": "after", "body": {}})
    finally:
        slow.close()
        live.cancel()
        lp_client.close()
    wait_until(lambda: hidden not in pp.stats()["procs"], 30,
               "the dead connection's hidden live proc to be destroyed")
    wait_until(lambda: pp.stats()["node"]["connections"] <= conns0, 30,
               "the node to drop the closed connections")
    assert not [n for n in pp.stats()["procs"] if n.startswith("liveproc-")]
    count("operations verified", 2001)
    count("faults injected", 302)


# ----------------------------------------------------------------------------- oversized frames


def _commit_frame(rid, topic, body_len):
    """A c1 request whose frame is exactly ``msgpack`` of [rid, "c1", topic, <bin body>]."""
    body = b"\xc6" + struct.pack(">I", body_len - 5) + bytes(body_len - 5)  # msgpack bin32
    return pack([rid, "c1", topic, body])


def _frame_of_size(rid, topic, size):
    """A valid c1 request of exactly ``size`` bytes."""
    probe = 1 << 20  # big enough that every msgpack header is the 32-bit form
    overhead = len(_commit_frame(rid, topic, probe)) - probe
    frame = _commit_frame(rid, topic, size - overhead)
    assert len(frame) == size
    return frame


@pytest.mark.timeout(120)
def test_frames_above_the_limit_cost_the_connection_not_the_node(spawner):
    pp = spawner(memory=True, durability="fast")
    pid = node_pid(pp)
    pp.commit({"topic": SENTINEL, "body": {"keep": True}})
    rss0 = record_rss(pid, "node (oversized frames)")

    # exactly at the limit: served
    c = raw_client(pp)
    try:
        c.send_bytes(_frame_of_size(1, "at_limit", MAX_FRAME))
        assert c.poll(30), "no reply to a frame of exactly MAX_FRAME bytes"
        rid, status, result = decode(c.recv_bytes())
        assert (rid, status) == (1, 0), result
    finally:
        c.close()
    assert pp.length("at_limit") == 1
    count("operations verified")
    rss_at_limit = record_rss(pid, "node (oversized frames)")

    # one byte above: refused, nothing written, connection closed
    forged = [
        ("one byte over", None),  # a real frame of MAX_FRAME + 1 bytes, sent in full
        ("header says 2 GiB", struct.pack("!i", 2**31 - 1) + b"\x93\x01\xa2c1"),
        ("64-bit header says 1 TiB", struct.pack("!i", -1) + struct.pack("!Q", 2**40) + b"x" * 100),
        ("64-bit header says 2^63-1", struct.pack("!i", -1) + struct.pack("!Q", 2**63 - 1)),
        ("64-bit header says MAX_FRAME + 1",
         struct.pack("!i", -1) + struct.pack("!Q", MAX_FRAME + 1)),
    ]
    with Pacer(pp) as pacer:
        for what, raw in forged:
            c = raw_client(pp)
            try:
                if raw is None:
                    def send_big(conn=c):
                        try:
                            conn.send_bytes(_frame_of_size(2, "over_limit", MAX_FRAME + 1))
                        except OSError:
                            pass  # the node hung up mid-send: expected
                    sender = threading.Thread(target=send_big, daemon=True)
                    sender.start()
                else:
                    s = raw_socket_of(c)
                    try:
                        s.sendall(raw)
                    finally:
                        s.close()
                got = []
                assert closed_by_peer(c, 10, got), f"{what}: the node kept the connection"
                for data in got:  # an explanation before hanging up is welcome: an error
                    reply = decode(data)
                    assert reply[1] == 1 and reply[2][0] == "invalid_argument", reply
                if raw is None:
                    sender.join(30)
                    assert not sender.is_alive(), f"{what}: the sender hung"
            finally:
                c.close()
            peak = record_rss(pid, "node (oversized frames)")
            assert peak - rss_at_limit < 48 * 1024, (
                f"{what}: the node's memory grew by {(peak - rss_at_limit) >> 10} MiB")
            count("faults injected")
    pacer.check(limit=2.0, min_done=3)
    assert "over_limit" not in pp.topics()
    assert pp.range(SENTINEL)[0].body == {"keep": True}
    assert node_pid(pp) == pid
    report(f"{'oversized frames: node RSS':>36}: {rss0 >> 10} MiB idle, "
           f"{rss_at_limit >> 10} MiB after a MAX_FRAME commit, "
           f"{record_rss(pid, 'node (oversized frames)') >> 10} MiB after the refusals")


def _client_too_big(pp, kind):
    big = os.urandom(MAX_FRAME + 1024)
    half = os.urandom(MAX_FRAME // 2 + 1024)
    if kind == "single":
        return pp.commit({"topic": "too_big", "body": big})
    if kind == "batch":  # each body is fine, the request is not
        return pp.commit([{"topic": "too_big", "body": half}, {"topic": "too_big", "body": half}])
    claim = pp.proc("src", name="big_acker", reclaim_timeout=None)
    assert claim is not None
    return pp.ack_commit("big_acker", {"topic": "too_big", "body": big}, claimed=claim)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["single", "batch", "ack_commit"])
def test_client_refuses_a_request_above_the_frame_limit_clearly(spawner, kind):
    """A request the node would refuse must fail in the client with an argument error
    (invalid_argument / invalid_log_format), not as a lost connection."""
    pp = spawner(memory=True, durability="fast")
    pp.commit({"topic": "src", "body": {}})
    before = lengths(pp)
    with pytest.raises(pipeproc.PipeProcError) as e:
        _client_too_big(pp, kind)
    count("faults injected")
    # the client and the node both still work, and nothing was written
    assert lengths(pp) == before
    assert "too_big" not in pp.topics()
    assert pp.commit({"topic": "src", "body": {"after": 1}}).endswith("-1")
    assert e.value.code in ("invalid_argument", "invalid_log_format"), (
        f"{kind}: a request above MAX_FRAME ({MAX_FRAME} bytes) failed with "
        f"{e.value.code!r}: {e.value}")
    assert isinstance(e.value, (ValueError, TypeError))


@pytest.mark.timeout(90)
def test_a_range_page_never_exceeds_the_frame_limit(spawner):
    """Two logs the client was allowed to commit must be readable back: a page may not grow
    past what the client accepts (a page stops *after* crossing 4 MiB, so a ~4 MiB log
    followed by a ~60 MiB one makes a page larger than MAX_FRAME)."""
    pp = spawner(memory=True, durability="fast")
    a = pp.commit({"topic": "pg", "body": os.urandom(4 * MB - 4096)})
    b = pp.commit({"topic": "pg", "body": os.urandom(60 * MB)})
    count("faults injected")
    for what, fn in [
        ("range", lambda: [log.id for log in pp.range("pg")]),
        ("revrange", lambda: [log.id for log in pp.revrange("pg")][::-1]),
        ("iter_range", lambda: [log.id for log in pp.iter_range("pg")]),
    ]:
        try:
            got = fn()
        except pipeproc.PipeProcError as exc:
            raise AssertionError(f"{what} of two committed logs (4 MiB + 60 MiB) failed with "
                                 f"{exc.code!r}: {exc}") from None
        assert got == [a, b], what
        count("operations verified")


@pytest.mark.timeout(90)
def test_a_claim_never_exceeds_the_frame_limit(spawner):
    """proc(count=2) over two 40 MiB logs: the claim reply (80 MiB) would exceed MAX_FRAME.
    The client must get a claim it can receive (count is 'up to'), never a lost connection
    with a claim left pending that nobody saw."""
    pp = spawner(memory=True, durability="fast")
    ids = [pp.commit({"topic": "cl", "body": os.urandom(40 * MB)}) for _ in range(2)]
    count("faults injected")
    try:
        logs = pp.proc("cl", name="bigclaim", count=2, reclaim_timeout=None)
    except pipeproc.PipeProcError as exc:
        st = pp.inspect_proc("bigclaim")
        raise AssertionError(
            f"proc(count=2) over two 40 MiB logs failed with {exc.code!r} ({exc}); the node "
            f"left the claim {st.last_claimed_range!r} pending") from None
    assert logs and 1 <= len(logs) <= 2 and [log.id for log in logs] == ids[:len(logs)]
    assert pp.ack("bigclaim", claimed=logs).startswith(ids[0])
    count("operations verified")
