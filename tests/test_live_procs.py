"""Live procs (SPEC §7), plus the "notifications, not polling" clause of §6: a commit
reaches a waiting live proc in milliseconds and an idle node uses no CPU."""

from __future__ import annotations

import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

import pipeproc
from pipeproc import Log
from helpers import wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# ---------------------------------------------------------------- helpers


class Reader:
    """Iterates a live proc on a background thread; deliveries land in a queue.

    Acks are left to the test (``auto_ack=False``) or done right after each delivery.
    """

    def __init__(self, live, auto_ack: bool = False) -> None:
        self.live = live
        self.auto_ack = auto_ack
        self.q: "queue.Queue" = queue.Queue()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            it = iter(self.live)
            while True:
                try:
                    logs = next(it)
                except pipeproc.InvalidAck:  # the test acks from its own thread (SPEC §7:
                    time.sleep(0.005)        # asking before that is invalid_ack): ask again
                    continue
                except StopIteration:
                    break
                self.q.put((time.perf_counter(), logs))
                if self.auto_ack:
                    self.live.ack()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        self.q.put(None)  # the iterator ended

    def get(self, timeout: float = 5.0):
        try:
            item = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing delivered within {timeout}s") from None
        assert item is not None, f"the iterator ended ({self.error!r})"
        return item[1]

    def nothing_within(self, seconds: float) -> bool:
        try:
            item = self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected delivery {item!r}")


@pytest.fixture
def lives():
    """Live procs a test opens; every one is cancelled at the end."""
    opened = []

    def make(pp, topic, **kw):
        live = pp.live_proc(topic, **kw)
        opened.append(live)
        return live
    try:
        yield make
    finally:
        for live in reversed(opened):
            try:
                live.cancel()
            except Exception:
                pass


def commit_ns(pp, topic, ns):
    return pp.commit([{"topic": topic, "body": {"n": n}} for n in ns])


# ---------------------------------------------------------------- modes and delivery


def test_mode_live_delivers_only_later_commits(node, lives):
    commit_ns(node, "t", [0, 1])
    live = lives(node, "t", mode="live")
    r = Reader(live)
    r.nothing_within(0.2)
    ids = commit_ns(node, "t", [2, 3])
    got = r.get()
    assert got == Log(ids[0], {"n": 2})
    live.ack()
    assert r.get() == Log(ids[1], {"n": 3})
    live.ack()
    st = live.inspect()
    assert st.offset == "$>"
    assert st.last_acked_range == f"{ids[1]}..{ids[1]}"


def test_mode_live_on_a_topic_that_does_not_exist_yet(node, lives):
    live = lives(node, "fresh", mode="live")
    r = Reader(live)
    ids = commit_ns(node, "fresh", [5])
    assert r.get() == Log(ids[0], {"n": 5})


def test_mode_all_from_the_beginning(node, lives):
    ids = commit_ns(node, "t", [0, 1, 2])
    live = lives(node, "t", mode="all")
    assert live.inspect().offset == ">"
    r = Reader(live, auto_ack=True)
    got = [r.get() for _ in range(3)]
    assert got == [Log(i, {"n": n}) for i, n in zip(ids, range(3))]
    more = commit_ns(node, "t", [3])
    assert r.get() == Log(more[0], {"n": 3})


def test_count_delivers_lists(node, lives):
    ids = commit_ns(node, "t", range(5))
    live = lives(node, "t", mode="all", count=3)
    r = Reader(live)
    first = r.get()
    assert isinstance(first, list) and first == [Log(i, {"n": n}) for n, i in enumerate(ids[:3])]
    assert live.ack() == f"{ids[0]}..{ids[2]}"
    second = r.get()
    assert second == [Log(ids[3], {"n": 3}), Log(ids[4], {"n": 4})]
    live.ack()
    one = commit_ns(node, "t", [9])
    assert r.get() == [Log(one[0], {"n": 9})]  # still a list with count > 1


def test_explicit_ack_needed_before_next_delivery(node, lives):
    ids = commit_ns(node, "t", [0, 1])
    live = lives(node, "t", mode="all")
    r = Reader(live)
    assert r.get() == Log(ids[0], {"n": 0})
    r.nothing_within(0.4)  # no ack, no next delivery
    assert live.inspect().last_claimed_range == f"{ids[0]}..{ids[0]}"
    assert live.ack() == f"{ids[0]}..{ids[0]}"
    assert r.get() == Log(ids[1], {"n": 1})


def test_invalid_arguments(node):
    for kw, code in [({"mode": "sometimes"}, "invalid_argument"),
                     ({"count": 0}, "invalid_argument")]:
        with pytest.raises(pipeproc.PipeProcError) as ei:
            node.live_proc("t", **kw)
        assert ei.value.code == code
    with pytest.raises(pipeproc.PipeProcError) as ei:
        node.live_proc("bad topic!")
    assert ei.value.code == "invalid_topic_format"
    assert not [p for p in node.stats()["procs"] if p.startswith("liveproc-")]


# ---------------------------------------------------------------- callbacks


def test_changes_callback_on_a_thread_and_exception_reclaims(node, lives):
    seen = []
    threads = set()
    done = threading.Event()
    failed_once = []

    def callback(lv, log):
        threads.add(threading.current_thread())
        seen.append(log)
        if log.body["n"] == 1 and not failed_once:
            failed_once.append(True)
            raise RuntimeError("callback failure on purpose")
        lv.ack()
        if log.body["n"] == 2:
            done.set()

    live = lives(node, "t", mode="all")
    assert live.changes(callback) is live
    ids = commit_ns(node, "t", [0, 1, 2])
    assert done.wait(10), f"deliveries so far: {seen}"
    assert [lg.id for lg in seen] == [ids[0], ids[1], ids[1], ids[2]]
    assert threading.main_thread() not in threads
    st = live.inspect()
    assert st.status == "active"
    assert st.last_acked_range == f"{ids[2]}..{ids[2]}"


def test_callback_failing_forever_keeps_the_proc_active(node, lives):
    calls = []

    def callback(lv, log):
        calls.append(log.id)
        raise ValueError("always")

    live = lives(node, "t", mode="all")
    live.changes(callback)
    ids = commit_ns(node, "t", [0])
    wait_until(lambda: len(calls) >= 15, what="15 redeliveries")
    assert set(calls) == {ids[0]}
    st = live.inspect()
    assert st.status == "active"  # on_max_reclaims_reached="continue"
    assert st.on_max_reclaims_reached == "continue"


# ---------------------------------------------------------------- proc operations


def test_ack_commit(node, lives):
    ids = commit_ns(node, "t", [1])
    live = lives(node, "t", mode="all")
    r = Reader(live)
    assert r.get().id == ids[0]
    res = live.ack_commit({"topic": "out", "body": {"from": ids[0]}})
    assert res.acked == f"{ids[0]}..{ids[0]}"
    assert isinstance(res.id, str)
    assert node.range("out") == [Log(res.id, {"from": ids[0]})]
    more = commit_ns(node, "t", [2])
    assert r.get().id == more[0]
    res = live.ack_commit([{"topic": "out", "body": {"k": 1}}, {"topic": "out2", "body": {"k": 2}}])
    assert isinstance(res.id, list) and len(res.id) == 2
    assert live.inspect().last_acked_range == f"{more[0]}..{more[0]}"


def test_reclaim_delivers_the_same_log_again(node, lives):
    ids = commit_ns(node, "t", [1, 2])
    live = lives(node, "t", mode="all")
    r = Reader(live)
    assert r.get().id == ids[0]
    live.reclaim()
    assert r.get().id == ids[0]
    assert live.inspect().reclaims == 1
    live.ack()
    assert r.get().id == ids[1]
    assert live.inspect().reclaims == 0


def test_inspect(node, lives):
    live = lives(node, "t", mode="live")
    st = live.inspect()
    assert st.name == live.name and st.name.startswith("liveproc-")
    assert st.topic == "t"
    assert st.on_max_reclaims_reached == "continue"
    assert st.status == "active"
    assert live.name in node.stats()["procs"]  # created by the live_proc() call itself
    other = lives(node, "t", mode="all")
    assert other.name != live.name


def test_disable_and_resume(node, lives):
    live = lives(node, "t", mode="all")
    r = Reader(live)
    assert live.disable().status == "disabled"
    assert live.inspect().status == "disabled"
    ids = commit_ns(node, "t", [1])
    r.nothing_within(0.3)  # a disabled live proc delivers nothing
    assert live.resume().status == "active"
    assert r.get() == Log(ids[0], {"n": 1})


def test_cancel_stops_a_blocked_iterator_and_destroys_the_hidden_proc(node):
    live = node.live_proc("t", mode="live")
    name = live.name
    assert name in node.stats()["procs"]
    r = Reader(live)
    r.nothing_within(0.2)  # the reader thread is blocked in `for logs in live`
    live.cancel()
    r.thread.join(5)
    assert not r.thread.is_alive(), "the iterator did not return after cancel()"
    assert r.error is None
    assert name not in node.stats()["procs"]
    with pytest.raises(pipeproc.PipeProcError) as ei:
        node.inspect_proc(name)
    assert ei.value.code == "invalid_proc"
    assert list(live) == []  # a cancelled live proc delivers nothing more
    live.cancel()  # idempotent
    commit_ns(node, "t", [1])
    assert name not in node.stats()["procs"]


def test_cancel_stops_a_changes_thread(node):
    calls = []
    live = node.live_proc("t", mode="all").changes(lambda lv, lg: (calls.append(lg), lv.ack()))
    commit_ns(node, "t", [1])
    wait_until(lambda: calls, what="first callback")
    live.cancel()
    assert live._thread is not None and not live._thread.is_alive()
    assert live.name not in node.stats()["procs"]
    commit_ns(node, "t", [2])
    assert len(calls) == 1


def test_destroy_ends_delivery(node):
    live = node.live_proc("t", mode="all")
    r = Reader(live)
    r.nothing_within(0.1)
    st = live.destroy()
    assert st.name == live.name
    r.thread.join(5)
    assert not r.thread.is_alive(), "the iterator did not end after destroy()"
    assert live.name not in node.stats()["procs"]
    live.cancel()


CLIENT = r'''
import sys, time
import pipeproc
pp = pipeproc.connect({loc!r})
live = pp.live_proc("t", mode="all")
print(live.name, flush=True)
for log in live:
    print("GOT", log.id, flush=True)
'''


def test_killed_client_leaves_no_hidden_proc(node, tmp_path):
    ids = commit_ns(node, "t", [1])
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen([sys.executable, "-c", CLIENT.format(loc=node.location)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        name = p.stdout.readline().strip()
        assert name.startswith("liveproc-"), p.stderr.read() if p.poll() is not None else name
        assert p.stdout.readline().strip() == f"GOT {ids[0]}"  # it holds a pending claim
        assert name in node.stats()["procs"]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        wait_until(lambda: name not in node.stats()["procs"], timeout=10,
                   what="hidden proc destroyed after the client died")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        p.stdout.close()
        p.stderr.close()
    # a live proc of this (still connected) client is untouched
    mine = node.live_proc("t", mode="all")
    try:
        assert mine.name in node.stats()["procs"]
    finally:
        mine.cancel()


def test_client_close_destroys_its_live_procs(node, tmp_path):
    other = pipeproc.connect(node.location)
    live = other.live_proc("t", mode="all")
    assert live.name in node.stats()["procs"]
    other.close()
    wait_until(lambda: live.name not in node.stats()["procs"], what="hidden proc destroyed")


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("stop", ["shutdown", "node_killed"])
def test_no_hidden_proc_survives_a_node_restart(spawner, tmp_path, stop):
    """Hidden procs belong to a connection of a running node: after the node stops (here with
    live procs still open and waiting), a restarted node has none of them (nobody can ever use
    them again, and they would hold back the GC of their topic forever)."""
    loc = tmp_path / "restart"
    pp = spawner(loc)
    commit_ns(pp, "t", [0])
    lives = [pp.live_proc("t", mode="all") for _ in range(3)]  # waiting
    lives += [pp.live_proc("t", mode="live") for _ in range(3)]  # idle, never iterated
    readers = [Reader(lv) for lv in lives[:3]]
    for r in readers:
        r.get()  # each holds a pending claim
    for r in readers[:1]:
        r.live.ack()
    readers[0].nothing_within(0.1)  # and the first waits again
    names = {lv.name for lv in lives}
    assert names <= set(pp.stats()["procs"])
    if stop == "shutdown":
        pp.shutdown()
    else:
        npid = pp.stats()["node"]["pid"]
        os.kill(npid, signal.SIGKILL)
        wait_until(lambda: _dead(npid), what="node dead")
        pp.shutdown()
    for r in readers:
        r.thread.join(5)
        assert not r.thread.is_alive(), "the iterator did not end when the node stopped"
    pp = spawner(loc)
    procs = pp.stats()["procs"]
    left = sorted(p for p in procs if p.startswith("liveproc-"))
    assert not left, f"{len(left)} orphan hidden procs of {len(names)} after restart"


# ---------------------------------------------------------------- latency and idle CPU


def test_commit_to_delivery_latency(mem_node):
    pp = mem_node
    live = pp.live_proc("lat", mode="live")
    try:
        r = Reader(live, auto_ack=True)
        # warm up
        pp.commit({"topic": "lat", "body": {"n": -1}})
        r.get()
        lat = []
        for n in range(50):
            t0 = time.perf_counter()
            lid = pp.commit({"topic": "lat", "body": {"n": n}})
            t_recv, log = r.q.get(timeout=5)
            assert log.id == lid
            lat.append(t_recv - t0)
            time.sleep(0.002)
        med = statistics.median(lat) * 1000
        print(f"\ncommit -> live delivery latency: median {med:.2f} ms, "
              f"p90 {sorted(lat)[44] * 1000:.2f} ms, max {max(lat) * 1000:.2f} ms")
        assert med < 25, f"median latency {med:.1f} ms"
    finally:
        live.cancel()


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the ")": state is field 3, utime field 14, stime field 15 (1-based, whole line)
    return int(fields[11]) + int(fields[12])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_idle_node_uses_no_cpu(spawner, lives):
    pp = spawner(workers=2)
    pp.system_proc(name="idle_sys", from_="in", processor="procmods.sysmods:double", to="out")
    live = lives(pp, "t", mode="live")
    r = Reader(live)
    r.nothing_within(0.3)  # settle: the live proc is parked
    st = pp.stats()
    pids = [st["node"]["pid"]] + [w["pid"] for w in st["workers"]]
    assert len(pids) == 3
    tick = os.sysconf("SC_CLK_TCK")
    before = sum(_cpu_ticks(p) for p in pids)
    time.sleep(3.0)
    after = sum(_cpu_ticks(p) for p in pids)
    used = (after - before) / tick
    print(f"\nidle node + 2 workers + a waiting live proc: {used:.3f} CPU-seconds in 3 s")
    assert used < 0.15
    # and everything is still working
    ids = commit_ns(pp, "t", [1])
    assert r.get().id == ids[0]
