"""The crash matrix (issue #6): SIGKILL each kind of process at random points, restart, and
check what survived against a model of what was acknowledged.

Cases (one test each):

1. the node during batch commits (writer threads, batches over several topics; the hidden
   live procs of the dead node are dropped by the next one);
2. the node during ``ack_commit`` loops (proc -> ack_commit into other topics);
3. the node during GC (gc on, procs acking, commits continuing); 3b: a new consumer that
   vanishes holding its first claim while the GC runs under load;
4. a worker in the middle of a processor (the supervisor restarts it), then the node itself
   while its workers are inside processors;
5. the spawning application, after it committed or in the middle of its ``spawn()`` (the
   node must exit by itself; the location is reusable at once);
6. clients in the middle of requests (some holding a claim, some with a live proc or a
   parked ``wait_for_procs``): the node keeps serving, claims time out, connections and
   hidden live procs go away.

Invariants checked after every restart: every returned commit id is there with its body; no
batch and no ack_commit is partly applied; sequences are contiguous (0..length-1 without GC,
first_stored..length-1 with it); ms never decrease along a topic; no proc loses or skips a
log; the store opens cleanly (spawn and stats work).

Kill points are random. The seed is printed (``-s`` or on failure) and can be replayed with
``PIPEPROC_CRASH_SEED=<seed>``; thread scheduling still varies between runs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

import pipeproc
from helpers import pid_alive  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stress_util import count, record_rss, report, wait_until  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SEED = int(os.environ.get("PIPEPROC_CRASH_SEED") or random.SystemRandom().randrange(2**32))
GONE_CODES = ("connection_lost", "no_active_node")


def rng_for(case: str) -> Tuple[random.Random, str]:
    ctx = f"[seed {SEED} ({case}); replay with PIPEPROC_CRASH_SEED={SEED}]"
    print(f"crash matrix {case}: seed {SEED}")
    return random.Random(f"{SEED}-{case}"), ctx


# ---------------------------------------------------------------- process helpers




def is_pipeproc(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"pipeproc" in cmd or b"crash_" in cmd




def seq(log_id: str) -> int:
    return int(log_id.split("-")[1])


def ms(log_id: str) -> int:
    return int(log_id.split("-")[0])


def hi_seq(rng_str: str) -> int:
    """The last seq of a ``"a..b"`` range; -1 for ``""``."""
    return seq(rng_str.split("..")[1]) if rng_str else -1


def lo_seq(rng_str: str) -> Optional[int]:
    return seq(rng_str.split("..")[0]) if rng_str else None


def read_lines(path: str) -> List[str]:
    """The complete lines of a progress file (each was written by one ``os.write``)."""
    try:
        with open(path) as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return data.split("\n")[:-1]


class Env:
    """Everything a test started; :meth:`cleanup` leaves nothing running."""

    def __init__(self) -> None:
        self.clients: List[Any] = []
        self.pids: set = set()
        self.popens: List[subprocess.Popen] = []
        self.files: List[Any] = []

    def spawn(self, location, **kw) -> Any:
        kw.setdefault("workers", 0)
        pp = pipeproc.spawn(location, **kw)
        self.clients.append(pp)
        st = pp.stats()
        pp.node_pid = st["node"]["pid"]  # type: ignore[attr-defined]
        self.pids.add(pp.node_pid)  # type: ignore[attr-defined]
        self.pids.update(w["pid"] for w in st["workers"])
        assert st["topics"] is not None and st["procs"] is not None
        record_rss(pp.node_pid)  # type: ignore[attr-defined]
        return pp

    def kill_node(self, pp) -> None:
        """SIGKILL the node of ``pp`` (only the node) and reap it; ``pp`` is then dead."""
        pid = pp.node_pid
        os.kill(pid, signal.SIGKILL)
        count("crashes injected")
        wait_until(lambda: not pid_alive(pid), 20, f"the killed node {pid} to exit")
        # reap the zombie (the spawning client owns the Popen); the call fails fast on a
        # dead node and must not hang
        try:
            pp.shutdown(timeout=10)
        except pipeproc.PipeProcError:
            pass

    def popen(self, args: List[str], err_path: str) -> subprocess.Popen:
        err = open(err_path, "wb")
        self.files.append(err)
        path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO]))
        env = dict(os.environ, PYTHONPATH=path)
        p = subprocess.Popen([sys.executable, *args], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err)
        self.popens.append(p)
        self.pids.add(p.pid)
        return p

    def cleanup(self) -> None:
        for p in self.popens:
            if p.poll() is None:
                p.kill()
            p.wait()
        for pp in reversed(self.clients):
            try:
                pp.shutdown(timeout=10)
            except Exception:
                pass
        for pid in self.pids:  # workers of killed nodes, nodes of killed apps
            if pid_alive(pid) and is_pipeproc(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for f in self.files:
            f.close()


@pytest.fixture
def env():
    e = Env()
    try:
        yield e
    finally:
        e.cleanup()


def stderr_of(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-3000:]
    except OSError:
        return ""


# ---------------------------------------------------------------- store checks


def check_topic(pp, topic: str, gc: bool = False, ctx: str = "") -> Tuple[list, int]:
    """All stored logs of ``topic`` and its first stored seq, checking contiguity (from 0
    without GC), that ms never decrease, and that stats agree on the length."""
    if topic not in pp.topics():
        return [], 0
    n = pp.length(topic)
    logs = pp.range(topic)
    seqs = [seq(lg.id) for lg in logs]
    first = seqs[0] if seqs else n
    assert seqs == list(range(first, n)), (
        f"{topic}: stored seqs not contiguous up to length-1 (length {n}, first {first}, "
        f"{len(seqs)} stored) {ctx}")
    if not gc:
        assert first == 0, f"{topic}: logs missing at the start (first stored {first}) {ctx}"
    stamps = [ms(lg.id) for lg in logs]
    assert stamps == sorted(stamps), f"{topic}: ms decrease along the sequence {ctx}"
    assert pp.stats()["topics"][topic]["length"] == n, f"{topic}: stats length != length {ctx}"
    count("logs verified after crash", len(logs))
    return logs, first


class ClientThread(threading.Thread):
    """A client loop on its own connection until stopped or the node goes away; whatever
    ends it is kept in ``error`` (checked by the test)."""

    def __init__(self, location, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.location = location
        self.inflight: Optional[Any] = None  # the request in flight when the node died
        self.error: Optional[BaseException] = None
        self.stop = threading.Event()

    def run(self) -> None:
        pp = None
        try:
            pp = pipeproc.connect(self.location, timeout=10)
            while not self.stop.is_set():
                self.step(pp)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            if pp is not None:
                pp.close()

    def step(self, pp: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class BatchWriter(ClientThread):
    """Commits random batches over ``topics`` until the node goes away; records what
    returned (``returned[b] = (items, ids)``) and the batch in flight when it failed."""

    def __init__(self, location, wid: int, start: int, seed: str, topics, pad: int = 200):
        super().__init__(location, f"writer-{wid}")
        self.wid, self.next_b = wid, start
        self.topics, self.pad = topics, pad
        self.rng = random.Random(seed)
        self.returned: Dict[int, tuple] = {}

    def step(self, pp: Any) -> None:
        rng = self.rng
        b = self.next_b
        size = rng.randint(1, 6)
        items = [{"topic": rng.choice(self.topics),
                  "body": {"w": self.wid, "b": b, "i": i, "n": size,
                           "pad": rng.randbytes(rng.randint(0, self.pad))}}
                 for i in range(size)]
        single = size == 1 and rng.random() < 0.5
        self.inflight = (b, items)
        res = pp.commit(items[0] if single else items)
        ids = [res] if single else res
        assert len(ids) == size
        self.returned[b] = (items, ids)
        self.inflight = None
        self.next_b = b + 1


class BatchModel:
    """What writers were told: ``known[(w, b)] = (items, ids)``; batches in flight at a
    kill are resolved at the next check (present whole, or absent forever)."""

    def __init__(self) -> None:
        self.known: Dict[tuple, tuple] = {}
        self.pending: Dict[tuple, list] = {}
        self.absent: set = set()
        self.counted: set = set()
        self.next_b: Dict[int, int] = {}

    def absorb(self, writers: List[BatchWriter]) -> None:
        for w in writers:
            for b, (items, ids) in w.returned.items():
                self.known[(w.wid, b)] = (items, ids)
            if w.inflight is not None:
                b, items = w.inflight
                self.pending[(w.wid, b)] = items
            self.next_b[w.wid] = w.next_b + 1

    def verify(self, pp, topics, gc: bool = False, ctx: str = "") -> None:
        firsts: Dict[str, int] = {}
        found: Dict[tuple, list] = {}
        present: Dict[tuple, Any] = {}
        for t in topics:
            logs, firsts[t] = check_topic(pp, t, gc, ctx)
            for lg in logs:
                key = (lg.body["w"], lg.body["b"])
                found.setdefault(key, []).append((lg.body["i"], t, lg.id, lg.body))
                present[(t, lg.id)] = lg.body  # ids are per topic
        verified = 0
        for key, got in found.items():
            if key in self.known:
                items, ids = self.known[key]
            elif key in self.pending:
                items, ids = self.pending[key], None
            else:
                raise AssertionError(
                    f"batch {key} is in the store but was never committed "
                    f"{'(absent after an earlier crash)' if key in self.absent else ''} {ctx}")
            got.sort()
            assert len({ms(g[2]) for g in got}) == 1, f"batch {key}: logs with several ms {ctx}"
            for i, t, lid, body in got:
                assert items[i]["topic"] == t and items[i]["body"] == body, (
                    f"batch {key}: log {lid} differs from what was committed {ctx}")
                if ids is not None:
                    assert ids[i] == lid, (
                        f"batch {key}: item {i} has id {lid}, commit returned {ids[i]} {ctx}")
            have = [g[0] for g in got]
            if not gc:
                assert have == list(range(len(items))), (
                    f"batch {key} is torn: items {have} of {len(items)} in the store "
                    f"({'returned' if ids else 'in flight at the kill'}) {ctx}")
            else:  # the GC removes a prefix of each topic: per topic, a suffix remains
                for t in {it["topic"] for it in items}:
                    t_is = [i for i, it in enumerate(items) if it["topic"] == t]
                    t_have = [i for i in have if items[i]["topic"] == t]
                    assert t_have == t_is[len(t_is) - len(t_have):], (
                        f"batch {key} is torn on {t}: {t_have} of {t_is} {ctx}")
                    if t_have and len(t_have) < len(t_is):
                        first_present = [g[2] for g in got if g[0] == t_have[0]][0]
                        assert seq(first_present) == firsts[t], (
                            f"batch {key}: part of it on {t} missing above the GC point {ctx}")
        for key, (items, ids) in self.known.items():
            for item, lid in zip(items, ids):
                t = item["topic"]
                if gc and seq(lid) < firsts[t]:
                    continue  # collected
                assert (t, lid) in present, (
                    f"LOST: commit {key} returned {lid} ({t}) but it is not in the store {ctx}")
                assert present[(t, lid)] == item["body"], f"{t} {lid}: wrong body {ctx}"
            if key not in self.counted:
                self.counted.add(key)
                verified += 1
        count("operations verified", verified)
        for key, items in self.pending.items():
            if key in found:
                self.known[key] = (items, [g[2] for g in sorted(found[key])])
                count("in-flight requests found applied after crash")
            elif not gc or not any(seq_first > 0 for seq_first in firsts.values()):
                self.absent.add(key)
                count("in-flight requests found not applied after crash")
        self.pending.clear()

    def writers(self, location, topics, n: int, rng: random.Random,
                pad: int = 200) -> List[BatchWriter]:
        return [BatchWriter(location, w, self.next_b.get(w, 0), f"{rng.random()}", topics, pad)
                for w in range(n)]


def join_dead(threads, ctx: str) -> None:
    """Threads whose node was killed end with connection_lost / no_active_node."""
    for t in threads:
        t.join(30)
        assert not t.is_alive(), f"{t.name} still blocked 30 s after the node died {ctx}"
        err = t.error
        assert isinstance(err, pipeproc.PipeProcError) and err.code in GONE_CODES, (
            f"{t.name} ended with {err!r}, expected connection_lost/no_active_node {ctx}")


def stop_threads(threads) -> None:
    for t in threads:
        t.stop.set()
    for t in threads:
        t.join(30)


# ---------------------------------------------------------------- 1. node during batch commits

TOPICS1 = ("t0", "t1", "t2", "t3")
ROUNDS1 = 20


@pytest.mark.timeout(120)
def test_node_killed_during_batch_commits(env, tmp_path):
    rng, ctx = rng_for("batch-commits")
    loc = tmp_path / "store"
    model = BatchModel()
    for rnd in range(ROUNDS1):
        durability = rng.choice(["full", "fast"])
        pp = env.spawn(loc, durability=durability)
        model.verify(pp, TOPICS1, ctx=f"{ctx} round {rnd} (on restart)")
        # hidden live procs belong to connections of the dead node: the new node drops them
        wait_until(lambda: not [n for n in pp.stats()["procs"] if n.startswith("liveproc-")],
                   15, f"the live procs of the killed node to be dropped {ctx} round {rnd}",
                   interval=0.01)
        pp.live_proc(rng.choice(TOPICS1), mode=rng.choice(["all", "live"]))
        writers = model.writers(loc, TOPICS1, 4, rng)
        for w in writers:
            w.start()
        target = rng.randint(10, 150)
        try:
            wait_until(lambda: sum(len(w.returned) for w in writers) >= target
                       or any(not w.is_alive() for w in writers), 60, "writers to progress")
            assert all(w.is_alive() for w in writers), [w.error for w in writers]
            time.sleep(rng.random() * 0.01)  # land the kill at a random point of a commit
            record_rss(pp.node_pid)
            env.kill_node(pp)
            join_dead(writers, f"{ctx} round {rnd}")
        finally:
            stop_threads(writers)
        model.absorb(writers)
    pp = env.spawn(loc)
    model.verify(pp, TOPICS1, ctx=f"{ctx} final")
    assert len(model.known) >= ROUNDS1 * 10
    pp.shutdown()


# ---------------------------------------------------------------- 2. node during ack_commit loops


class AckCommitter(ClientThread):
    """``proc`` -> ``ack_commit`` (claimed=) into ``to``, one output log per input log.

    Checks live that every claim starts right after the last acked log (no skip, no
    re-delivery of acked logs); records every ack_commit that returned."""

    def __init__(self, location, name: str, count_: int, to: str, rto: float, expect: int):
        super().__init__(location, f"ackc-{name}")
        self.pname, self.count_, self.to, self.rto = name, count_, to, rto
        self.expect = expect
        self.returned: List[tuple] = []  # (src ids, out ids)
        self.problems: List[str] = []
        self.stale = 0

    def step(self, pp: Any) -> None:
        got = pp.proc("in", name=self.pname, count=self.count_, reclaim_timeout=self.rto,
                      max_reclaims=-1)
        if not got:
            time.sleep(0.002)
            return
        logs = got if isinstance(got, list) else [got]
        ids = [lg.id for lg in logs]
        if seq(ids[0]) != self.expect:
            self.problems.append(f"claim {ids} while the next unacked seq is {self.expect}")
        if [seq(i) for i in ids] != list(range(seq(ids[0]), seq(ids[0]) + len(ids))):
            self.problems.append(f"claim {ids} is not consecutive")
        bodies = [{"topic": self.to, "body": {"src": lg.id, "b": lg.body["b"],
                                              "i": lg.body["i"], "p": self.pname}}
                  for lg in logs]
        self.inflight = ids  # the claim being ack_committed at the kill
        try:
            res = pp.ack_commit(self.pname, bodies if self.count_ > 1 else bodies[0],
                                claimed=got)
        except (pipeproc.StaleClaim, pipeproc.InvalidAck):
            self.stale += 1  # timed out meanwhile: it will be delivered again
            self.inflight = None
            return
        self.inflight = None
        out = res.id if isinstance(res.id, list) else [res.id]
        if res.acked != f"{ids[0]}..{ids[-1]}":
            self.problems.append(f"ack_commit of {ids} returned acked={res.acked!r}")
        self.returned.append((ids, out))
        self.expect = seq(ids[-1]) + 1


ROUNDS2 = 15
ACKC_PROCS = (("p1", 1, "out1", 1.0), ("p2", 3, "out2", 60.0))  # name, count, to, reclaim_timeout


@pytest.mark.timeout(150)
def test_node_killed_during_ack_commit_loops(env, tmp_path):
    rng, ctx = rng_for("ack-commit")
    loc = tmp_path / "store"
    model = BatchModel()
    returned: Dict[str, List[tuple]] = {p[0]: [] for p in ACKC_PROCS}
    inflight: Dict[str, Optional[List[str]]] = {}
    counted = {p[0]: 0 for p in ACKC_PROCS}
    expect = {p[0]: 0 for p in ACKC_PROCS}
    pp = env.spawn(loc)
    pp.commit([{"topic": "in", "body": {"w": -1, "b": k, "i": 0, "n": 1}} for k in range(300)])
    pre = {(-1, k): ([{"topic": "in", "body": {"w": -1, "b": k, "i": 0, "n": 1}}], [lg.id])
           for k, lg in enumerate(pp.range("in"))}
    model.known.update(pre)
    for rnd in range(ROUNDS2):
        rctx = f"{ctx} round {rnd}"
        producer = model.writers(loc, ("in",), 1, rng, pad=0)
        consumers = [AckCommitter(loc, name, c, to, rto, expect[name])
                     for name, c, to, rto in ACKC_PROCS]
        threads = producer + consumers
        for t in threads:
            t.start()
        target = rng.randint(10, 80)
        try:
            # every proc progresses in every round (p1 may first wait up to its 1 s timeout
            # for the claim the last crash left pending), and the round reaches its target
            wait_until(lambda: (all(c.returned for c in consumers)
                                and sum(len(c.returned) for c in consumers) >= target)
                       or any(not t.is_alive() for t in threads), 60, "ack_commits to progress")
            assert all(t.is_alive() for t in threads), [t.error for t in threads]
            time.sleep(rng.random() * 0.01)
            record_rss(pp.node_pid)
            env.kill_node(pp)
            join_dead(threads, rctx)
        finally:
            stop_threads(threads)
        for c in consumers:
            assert not c.problems, f"{c.pname}: {c.problems[:5]} {rctx}"
            returned[c.pname] += c.returned
            inflight[c.pname] = c.inflight
        model.absorb(producer)

        pp = env.spawn(loc, durability=rng.choice(["full", "fast"]))
        model.verify(pp, ("in",), ctx=f"{rctx} (on restart)")
        in_logs, _ = check_topic(pp, "in", ctx=rctx)
        for name, c, to, rto in ACKC_PROCS:
            st = pp.inspect_proc(name)
            acked_hi = hi_seq(st.last_acked_range)
            outs, _ = check_topic(pp, to, ctx=rctx)
            srcs = [lg.body["src"] for lg in outs]
            want = [lg.id for lg in in_logs[:acked_hi + 1]]
            # every acked log has exactly one output, no output without its ack, in order
            if srcs != want:
                extra = sorted(set(srcs) - set(want), key=seq)[:5]
                missing = sorted(set(want) - set(srcs), key=seq)[:5]
                dup = len(srcs) - len(set(srcs))
                raise AssertionError(
                    f"{name}: outputs != acked logs (acked up to seq {acked_hi}): outputs "
                    f"without ack {extra}, acked without output {missing}, {dup} duplicates {rctx}")
            by_id = {lg.id: lg.body for lg in outs}
            for src_ids, out_ids in returned[name]:
                assert seq(src_ids[-1]) <= acked_hi, (
                    f"LOST: ack_commit of {src_ids} returned but {name} is acked only up to "
                    f"seq {acked_hi} {rctx}")
                for s, o in zip(src_ids, out_ids):
                    assert o in by_id and by_id[o]["src"] == s, (
                        f"LOST: ack_commit of {src_ids} returned {out_ids} but {o} is not its "
                        f"output {rctx}")
            count("operations verified", len(returned[name]) - counted[name])
            counted[name] = len(returned[name])
            if inflight[name]:
                applied = seq(inflight[name][-1]) <= acked_hi
                count("in-flight requests found "
                      f"{'applied' if applied else 'not applied'} after crash")
            for lg, out in zip(in_logs, outs):
                assert (out.body["b"], out.body["i"]) == (lg.body["b"], lg.body["i"]), rctx
            pending = st.last_claimed_range and st.last_claimed_range != st.last_acked_range
            if pending:
                count("pending claims found after crash")
                assert lo_seq(st.last_claimed_range) == acked_hi + 1, (
                    f"{name}: pending claim {st.last_claimed_range} skips logs after the acked "
                    f"{st.last_acked_range} {rctx}")
                if rto > 30:  # p2: release it by hand; p1: its 1 s timeout re-delivers it
                    pp.reclaim(name)
            expect[name] = acked_hi + 1
    for c in ACKC_PROCS:
        assert len(returned[c[0]]) >= ROUNDS2  # at least one per round, each
    pp.shutdown()


# ---------------------------------------------------------------- 3. node during GC

GC_TOPICS = ("gin", "gin2", "gfree")
ROUNDS3 = 10
FAST_GC = {"min_prune_time": 0.0, "interval": 0.05}


class Acker(ClientThread):
    """``proc`` -> ``ack`` on ``gin`` with random counts; checks claims never skip."""

    def __init__(self, location, expect: int, seed: str, rto: float = 1.0):
        super().__init__(location, "acker-gp")
        self.expect, self.rto = expect, rto
        self.rng = random.Random(seed)
        self.acked: List[List[str]] = []
        self.bodies: Dict[str, Any] = {}
        self.problems: List[str] = []

    def step(self, pp: Any) -> None:
        got = pp.proc("gin", name="gp", count=self.rng.randint(1, 4),
                      reclaim_timeout=self.rto, max_reclaims=-1)
        if not got:
            time.sleep(0.002)
            return
        if isinstance(got, pipeproc.Log):  # count == 1
            got = [got]
        ids = [lg.id for lg in got]
        if seq(ids[0]) != self.expect:
            self.problems.append(f"gp claimed {ids} while the next unacked seq is {self.expect}")
        for lg in got:
            self.bodies[lg.id] = lg.body
        self.inflight = ids  # the claim being acked at the kill
        try:
            pp.ack("gp", claimed=got)
        except (pipeproc.StaleClaim, pipeproc.InvalidAck):  # timed out meanwhile
            self.inflight = None
            return
        self.inflight = None
        self.acked.append(ids)
        self.expect = seq(ids[-1]) + 1


def protected_from(st) -> Tuple[int, int]:
    """What the GC must have kept of a proc's topic (SPEC §8), as first seqs:

    * ``needed``: its position and its pending claim (deleting those loses logs);
    * ``behind``: the "two positions behind" rule. A proc that has claimed twice protects
      from the first log of its previous claimed range; before its second claim it
      protected only from its position, which was then at most the end of what is now its
      previous claimed range + 1. Ranges only move forward, so whatever the GC saw, it never
      deleted past ``previous_claimed_range``'s last seq + 1.
    """
    needed = hi_seq(st.last_acked_range) + 1
    if st.last_claimed_range and st.last_claimed_range != st.last_acked_range:
        needed = min(needed, lo_seq(st.last_claimed_range))
    behind = needed
    if st.previous_claimed_range:
        behind = min(behind, hi_seq(st.previous_claimed_range) + 1)
    return needed, behind


@pytest.mark.timeout(150)
def test_node_killed_during_gc(env, tmp_path):
    rng, ctx = rng_for("gc")
    loc = tmp_path / "store"
    model = BatchModel()
    gp_acked: List[List[str]] = []
    gp_bodies: Dict[str, Any] = {}
    gp_expect = 0
    gp_counted = 0
    gslow_expect = 0
    gslow_acked = 0
    for rnd in range(ROUNDS3):
        rctx = f"{ctx} round {rnd}"
        pp = env.spawn(loc, gc=FAST_GC, durability=rng.choice(["full", "fast"]))
        if rnd:  # the GC runs again after the crash: the proc-less topic is emptied
            wait_until(lambda: pp.range("gfree", limit=1) == [], 15,
                       "the GC to collect gfree after the restart")
        else:
            pp.proc("gin2", name="gslow", reclaim_timeout=-1)  # create both procs before logs
            pp.proc("gin", name="gp", reclaim_timeout=1.0, max_reclaims=-1)
        producer = model.writers(loc, GC_TOPICS, 2, rng, pad=1000)
        acker = Acker(loc, gp_expect, f"{rng.random()}")
        threads = producer + [acker]
        for t in threads:
            t.start()
        target = rng.randint(5, 60)
        try:
            for _ in range(rng.randint(1, 3)):  # the slow proc moves a little each round
                wait_until(lambda: pp.length("gin2") > gslow_expect + 5 if "gin2" in pp.topics()
                           else False, 30, "logs on gin2")
                got = pp.proc("gin2", name="gslow", count=rng.randint(1, 5))
                got = [got] if isinstance(got, pipeproc.Log) else got
                assert got and seq(got[0].id) == gslow_expect, (
                    f"gslow claimed {got and [g.id for g in got]}, next unacked seq is "
                    f"{gslow_expect} {rctx}")
                pp.ack("gslow", claimed=got)
                gslow_expect = seq(got[-1].id) + 1
                gslow_acked += 1
            wait_until(lambda: len(acker.acked) >= target
                       or any(not t.is_alive() for t in threads), 60, "gp to ack")
            assert all(t.is_alive() for t in threads), [t.error for t in threads]
            time.sleep(rng.random() * 0.05)  # GC passes run every 50 ms
            record_rss(pp.node_pid)
            env.kill_node(pp)
            join_dead(threads, rctx)
        finally:
            stop_threads(threads)
        assert not acker.problems, f"{acker.problems[:5]} {rctx}"
        gp_acked += acker.acked
        gp_bodies.update(acker.bodies)
        model.absorb(producer)

        # verify on a node without GC, so that nothing moves while we read
        pp = env.spawn(loc)
        model.verify(pp, GC_TOPICS, gc=True, ctx=f"{rctx} (on restart)")
        for name, topic in (("gp", "gin"), ("gslow", "gin2")):
            st = pp.inspect_proc(name)
            logs, first = check_topic(pp, topic, gc=True, ctx=rctx)
            needed, behind = protected_from(st)
            assert first <= needed, (
                f"LOST: the GC dropped logs {name} still needs: {topic} starts at seq {first}, "
                f"{name} needs from {needed} ({st}) {rctx}")
            assert first <= behind, (
                f"the GC broke the two-positions-behind rule: {topic} starts at seq {first}, "
                f"{name}'s previous claimed range ends at {behind - 1} ({st}) {rctx}")
            acked_hi = hi_seq(st.last_acked_range)
            if st.last_claimed_range and st.last_claimed_range != st.last_acked_range:
                assert lo_seq(st.last_claimed_range) == acked_hi + 1, f"{name} skips: {st} {rctx}"
            if name == "gp":
                if acker.inflight and seq(acker.inflight[-1]) <= acked_hi:
                    gp_acked.append(acker.inflight)  # in flight at the kill, and applied
                    count("in-flight requests found applied after crash")
                elif acker.inflight:
                    count("in-flight requests found not applied after crash")
                flat = [seq(i) for ids in gp_acked for i in ids]
                assert flat == list(range(acked_hi + 1)), (
                    f"gp did not ack every log exactly once in order up to {acked_hi} {rctx}")
                count("operations verified", len(gp_acked) - gp_counted)
                gp_counted = len(gp_acked)
                gp_expect = acked_hi + 1
            else:
                assert acked_hi + 1 == gslow_expect, f"gslow lost its acks: {st} {rctx}"
        # what gp was given is what was committed
        by_id = {lid: item["body"] for items, ids in model.known.values()
                 for item, lid in zip(items, ids) if item["topic"] == "gin"}
        for lid, body in gp_bodies.items():
            if lid in by_id:
                assert by_id[lid] == body, f"gp received {lid} with a wrong body {rctx}"
        pp.shutdown()
    assert len(gp_acked) >= ROUNDS3 * 5 and gslow_acked >= ROUNDS3


@pytest.mark.timeout(120)
def test_consumer_dies_holding_its_first_claim_during_gc(env, tmp_path):
    """Case 3b: a new consumer creates its proc, claims, and vanishes (its connection
    drops without an ack) while the GC runs under load. Its claim times out and must be
    delivered again: the GC may not delete a log that a proc has claimed (SPEC §8: a proc
    that has not claimed twice protects everything from its position on)."""
    rng, ctx = rng_for("gc-first-claim")
    loc = tmp_path / "store"
    pp = env.spawn(loc, gc={"min_prune_time": 0.0, "interval": 0.002}, durability="fast")
    noise = [BatchWriter(loc, w, 0, f"{rng.random()}", ("noise",), pad=10) for w in range(2)]
    for t in noise:  # keeps the writer busy, so that requests share group-commit rounds
        t.start()
    lost = []
    claimed = 0
    t0 = time.monotonic()
    try:
        for i in range(300):
            if time.monotonic() - t0 > 15 or len(lost) >= 3:
                break
            topic, name = f"f{i}", f"newcomer{i}"
            pp.commit({"topic": topic, "body": {"i": i}})
            consumer = pipeproc.connect(loc)
            got = consumer.proc(topic, name=name, reclaim_timeout=0.05)
            consumer.close()  # gone with its claim, never acked
            if got is None:
                continue  # the GC collected the log before the proc existed: allowed
            claimed += 1
            wait_until(lambda: not pp.stats()["procs"][name]["pending"], 10,
                       f"{name}'s claim to time out")
            again = pp.proc(topic, name=name, reclaim_timeout=0.05)
            if again is None or again.id != got.id:
                lost.append((name, got.id, pp.length(topic), pp.range(topic),
                             pp.inspect_proc(name)))
            else:
                pp.ack(name, claimed=again)
                count("operations verified")
    finally:
        stop_threads(noise)
    assert all(t.error is None for t in noise), [t.error for t in noise]
    assert not lost, (
        f"LOST: {len(lost)} claimed log(s) deleted by the GC and never delivered again "
        f"(of {claimed} first claims); first: proc {lost[0][0]} claimed {lost[0][1]}, topic "
        f"length {lost[0][2]}, stored {lost[0][3]}, state {lost[0][4]} {ctx}")
    assert claimed >= 20, claimed
    pp.shutdown()


# ---------------------------------------------------------------- 4. a worker mid-processor

PROCS_FILE = os.path.join(HERE, "crash_procs.py")
RTO4 = 3.0  # reclaim_timeout of the system procs


@pytest.mark.timeout(150)
def test_worker_killed_mid_processor(env, tmp_path):
    rng, ctx = rng_for("worker")
    loc = tmp_path / "store"
    busy = tmp_path / "busy"
    busy.mkdir()
    pp = env.spawn(loc, workers=2)
    pp.system_proc(name="wsys", from_="win", processor=f"{PROCS_FILE}:slow_tag", to="wout",
                   max_reclaims=-1, reclaim_timeout=RTO4)
    pp.system_proc(name="wsys2", from_="win", processor=f"{PROCS_FILE}:slow_batch",
                   to=["wa", "wb"], count=3, max_reclaims=-1, reclaim_timeout=RTO4)
    n = 0

    def commit_more(k: int) -> None:
        nonlocal n
        pp.commit([{"topic": "win", "body": {"n": n + i, "busy": str(busy), "sleep": 0.03}}
                   for i in range(k)])
        n += k

    commit_more(40)
    kills = []
    for rnd in range(12):
        rctx = f"{ctx} kill {rnd}"
        slot = rng.randrange(2)
        commit_more(rng.randint(5, 25))
        workers = pp.stats()["workers"]
        pid = workers[slot]["pid"]
        env.pids.add(pid)
        marker = busy / str(pid)

        def mid_processor():
            if marker.exists():
                return True
            if not any(p["lag"] for p in pp.stats()["procs"].values()):
                commit_more(10)  # keep the worker fed until it is inside a processor
            return False

        wait_until(mid_processor, 30, f"worker {pid} to be inside a processor")
        time.sleep(rng.random() * 0.01)  # the processor sleeps 30 ms
        try:
            killed_on = marker.read_text()
        except OSError:
            killed_on = "?"
        os.kill(pid, signal.SIGKILL)
        count("crashes injected")
        kills.append((pid, killed_on))
        wait_until(lambda: not pid_alive(pid), 20, f"worker {pid} to die")

        def restarted():
            w = pp.stats()["workers"][slot]
            return w["pid"] != pid and w["alive"]

        wait_until(restarted, 30, f"the supervisor to restart worker slot {slot} {rctx}")
        env.pids.add(pp.stats()["workers"][slot]["pid"])
        record_rss(pp.node_pid)
        assert pp.length("win") == n  # the node kept serving

    # last, the node itself dies while its workers are inside processors; the system procs
    # run again after the restart (the new node reclaims the dead workers' claims at start)
    commit_more(30)
    old_workers = [w["pid"] for w in pp.stats()["workers"]]
    wait_until(lambda: any((busy / str(p)).exists() for p in old_workers), 30,
               "a worker inside a processor")
    time.sleep(rng.random() * 0.01)
    env.kill_node(pp)
    wait_until(lambda: not any(pid_alive(p) for p in old_workers), 30,
               f"the killed node's workers to exit {ctx}")
    t0 = time.monotonic()
    pp = env.spawn(loc, workers=2)
    pp.wait_for_procs(["wsys", "wsys2"], timeout=RTO4 + 90)
    report(f"crash matrix: after a node crash mid-processor, the system procs drained "
           f"{time.monotonic() - t0:.1f}s after the restart (the dead workers' claims are "
           f"reclaimed at start; reclaim_timeout {RTO4}s)")
    env.pids.update(w["pid"] for w in pp.stats()["workers"])
    win, _ = check_topic(pp, "win", ctx=ctx)
    ids = [lg.id for lg in win]
    ns = {lg.id: lg.body["n"] for lg in win}
    wout, _ = check_topic(pp, "wout", ctx=ctx)
    srcs = [lg.body["src"] for lg in wout]
    missing = sorted(set(ids) - set(srcs), key=seq)
    assert not missing, (
        f"LOST: inputs without a result in wout: {missing[:10]} (kills {kills}) {ctx}")
    assert set(srcs) <= set(ids)
    assert all(ns[lg.body["src"]] == lg.body["n"] for lg in wout)
    wa, _ = check_topic(pp, "wa", ctx=ctx)
    wb, _ = check_topic(pp, "wb", ctx=ctx)
    a_srcs = [lg.body["src"] for lg in wa]
    b_srcs = [lg.body["src"] for lg in wb]
    assert a_srcs == b_srcs, f"a multi-topic result was applied to one topic only {ctx}"
    missing = sorted(set(ids) - set(a_srcs), key=seq)
    assert not missing, f"LOST: inputs without a result in wa/wb: {missing[:10]} {ctx}"
    # the outcome (ack + commit) is one atomic write, applied once per claim: no duplicates
    for topic, s in (("wout", srcs), ("wa", a_srcs)):
        dup = len(s) - len(set(s))
        assert dup == 0, f"{topic}: {dup} inputs have several results (kills {kills}) {ctx}"
    for name in ("wsys", "wsys2"):
        st = pp.inspect_proc(name)
        assert st.status == "active" and hi_seq(st.last_acked_range) == n - 1, st
    count("operations verified", len(srcs) + len(a_srcs))
    pp.shutdown()


# ---------------------------------------------------------------- 5. the spawning app


ROUNDS5 = 10


def nodes_on(location: str) -> List[int]:
    """Pids of live node processes whose working directory is ``location``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{d}/cwd") != location:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if b"pipeproc._node" not in f.read():
                    continue
        except OSError:
            continue
        if pid_alive(int(d)):
            out.append(int(d))
    return out


def parse_app(path: str) -> Tuple[List[int], Dict[int, List[str]]]:
    pids: List[int] = []
    batches: Dict[int, List[str]] = {}
    for line in read_lines(path):
        if line.startswith("node "):
            pids = [int(x) for x in line.split()[1:]]
        else:
            b, ids = line.split()
            batches[int(b)] = ids.split(",")
    return pids, batches


@pytest.mark.timeout(150)
def test_spawning_app_killed(env, tmp_path):
    rng, ctx = rng_for("app")
    loc = tmp_path / "store"
    app = os.path.join(HERE, "crash_app.py")
    recorded: Dict[int, List[str]] = {}
    unrecorded: set = set()
    start = 0
    full_rounds = 0
    for rnd in range(ROUNDS5):
        rctx = f"{ctx} round {rnd}"
        progress = str(tmp_path / f"progress{rnd}.txt")
        err = str(tmp_path / f"app{rnd}.err")
        workers = rng.choice([0, 1])
        # some rounds kill the app at a random moment of its spawn() (the node's cwd is the
        # location once it exists, which is how we find a node that never reported)
        early = rnd > 0 and rng.random() < 0.3
        child = env.popen([app, str(loc), progress, str(start), str(workers),
                           rng.choice(["full", "fast"])], err)
        if early:
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            target = rng.randint(3, 60)
            wait_until(lambda: len(read_lines(progress)) > target or child.poll() is not None,
                       60, "the app to commit")
            time.sleep(rng.random() * 0.01)
            full_rounds += 1
        assert child.poll() is None, f"the app died: {stderr_of(err)} {rctx}"
        child.kill()
        child.wait()
        count("crashes injected")
        pids, batches = parse_app(progress)
        assert early or len(pids) == 1 + workers
        env.pids.update(pids)

        def gone() -> bool:
            nodes = nodes_on(str(loc))
            env.pids.update(nodes)
            return not nodes and not any(pid_alive(p) for p in pids)

        wait_until(gone, 20, f"the node (and workers) of the killed app to exit by themselves "
                   f"(early kill: {early}) {rctx}", interval=0.02)
        recorded.update(batches)
        # the location is reusable at once
        try:
            pp = env.spawn(loc)
        except pipeproc.PipeProcError as exc:
            raise AssertionError(f"spawn on the killed app's location failed: {exc!r} "
                                 f"{stderr_of(err)} {rctx}") from None
        stored: Dict[int, List[Any]] = {}
        for t in ("a", "b", "c"):
            logs, _ = check_topic(pp, t, ctx=rctx)
            for lg in logs:
                stored.setdefault(lg.body["batch"], []).append((lg.body["i"], lg.id))
        for b, items in stored.items():
            items.sort()
            assert [i for i, _ in items] == list(range(6)), f"batch {b} is torn {rctx}"
            if b in recorded:
                assert [lid for _, lid in items] == recorded[b], f"batch {b}: ids differ {rctx}"
        lost = sorted(set(recorded) - set(stored))
        assert not lost, f"LOST: batches the app was told were committed: {lost} {rctx}"
        extra = set(stored) - set(recorded) - unrecorded
        assert extra <= {start + len(batches)}, f"unexpected batches {sorted(extra)} {rctx}"
        unrecorded |= extra
        count(f"in-flight requests found {'applied' if extra else 'not applied'} after crash")
        count("operations verified", len(batches))
        start = max(stored) + 1 if stored else 0
        pp.shutdown()
    assert len(recorded) >= full_rounds * 3


# ---------------------------------------------------------------- 6. clients mid-request

CLIENT_RTO = 0.5


@pytest.mark.timeout(150)
def test_clients_killed_mid_request(env, tmp_path):
    rng, ctx = rng_for("clients")
    loc = tmp_path / "store"
    pp = env.spawn(loc)
    base_conns = pp.stats()["node"]["connections"]
    script = os.path.join(HERE, "crash_client.py")
    clients: Dict[int, tuple] = {}
    progress_of: Dict[int, str] = {}
    next_cid = 0

    def start_client() -> None:
        nonlocal next_cid
        cid = next_cid
        next_cid += 1
        progress = str(tmp_path / f"client{cid}.txt")
        err = str(tmp_path / f"client{cid}.err")
        p = env.popen([script, str(loc), progress, str(cid), f"{rng.random()}",
                       str(CLIENT_RTO)], err)
        clients[cid] = (p, err)
        progress_of[cid] = progress

    for _ in range(3):
        start_client()
    pings = []
    for rnd in range(15):
        rctx = f"{ctx} kill {rnd}"
        cid = rng.choice(sorted(clients))
        p, err = clients.pop(cid)
        target = len(read_lines(progress_of[cid])) + rng.randint(1, 40)
        holding = rng.random() < 0.5  # half of the kills hit a client holding a claim

        def ready() -> bool:
            lines = read_lines(progress_of[cid])
            if p.poll() is not None:
                return True
            return len(lines) >= target and (not holding or lines[-1].startswith("L "))

        wait_until(ready, 60, f"client {cid} to progress", interval=0.001)
        assert p.poll() is None, f"client {cid} died: {stderr_of(err)} {rctx}"
        if not holding:
            time.sleep(rng.random() * 0.005)
        p.kill()
        p.wait()
        count("crashes injected")
        # the node keeps serving
        pings.append(pp.commit({"topic": "cping", "body": {"after_kill": rnd}}))
        assert pp.stats()["node"]["pid"] == pp.node_pid
        lines = read_lines(progress_of[cid])
        if lines and lines[-1].startswith("L "):  # killed while holding a claim
            claim = lines[-1].split()[1].split(",")

            def released():
                st = pp.inspect_proc("cshared")
                return hi_seq(st.last_acked_range) >= seq(claim[-1])

            # reclaimed after its timeout, then processed by another client
            wait_until(released, CLIENT_RTO + 30, f"the dead client's claim {claim} to be "
                       f"reclaimed and processed {rctx}", interval=0.02)
            count("claims of dead clients reclaimed")
        record_rss(pp.node_pid)
        start_client()
    for cid, (p, err) in list(clients.items()):  # the last ones die too
        assert p.poll() is None, f"client {cid} died: {stderr_of(err)} {ctx}"
        p.kill()
        p.wait()
        count("crashes injected")
    # the dead clients' connections, parked requests and hidden live procs are gone
    wait_until(lambda: pp.stats()["node"]["connections"] <= base_conns, 15,
               f"the dead clients' connections to be closed {ctx}", interval=0.02)
    wait_until(lambda: not [n for n in pp.stats()["procs"] if n.startswith("liveproc-")], 15,
               f"the dead clients' hidden live procs to be destroyed {ctx}", interval=0.02)
    # drain what is left (claims of dead clients time out first)
    deadline = time.monotonic() + 60
    while True:
        st = pp.inspect_proc("cshared")
        if hi_seq(st.last_acked_range) == pp.length("cin") - 1:
            break
        assert time.monotonic() < deadline, f"cannot drain cshared: {st} {ctx}"
        got = pp.proc("cin", name="cshared", count=50)
        if not got:
            time.sleep(0.01)  # a dead client's claim is pending until its timeout
            continue
        pp.ack_commit("cshared", [{"topic": "cout", "body": {"src": lg.id, "c": -1}} for lg in got],
                      claimed=got)

    # verify
    cin, _ = check_topic(pp, "cin", ctx=ctx)
    cout, _ = check_topic(pp, "cout", ctx=ctx)
    check_topic(pp, "cping", ctx=ctx)
    present = {lg.id: lg.body for lg in cin}
    groups: Dict[tuple, list] = {}
    for lg in cin:
        groups.setdefault((lg.body["c"], lg.body["k"]), []).append(lg)
    for key, logs in groups.items():
        assert [lg.body["i"] for lg in logs] == list(range(logs[0].body["n"])), (
            f"batch {key} torn {ctx}")
        assert len({ms(lg.id) for lg in logs}) == 1
    out_by_id = {lg.id: lg.body for lg in cout}
    srcs = [lg.body["src"] for lg in cout]
    assert srcs == [lg.id for lg in cin], (
        f"cout is not exactly one output per cin log in order: {len(srcs)} outputs, "
        f"{len(set(srcs))} distinct, {len(cin)} inputs {ctx}")
    ops = 0
    for cid, path in progress_of.items():
        for line in read_lines(path):
            kind, *rest = line.split()
            if kind == "C":
                ids = rest[1].split(",")
                for i, lid in enumerate(ids):
                    body = present.get(lid)
                    assert body is not None, f"LOST: client {cid} commit {line} {ctx}"
                    assert (body["c"], body["k"], body["i"]) == (cid, int(rest[0]), i), line
                ops += 1
            elif kind == "A":
                src_ids, out_ids = rest[0].split(","), rest[1].split(",")
                for s, o in zip(src_ids, out_ids):
                    body = out_by_id.get(o)
                    assert body is not None and body["src"] == s and body["c"] == cid, (
                        f"LOST: client {cid} ack_commit {line} {ctx}")
                ops += 1
    count("operations verified", ops)
    assert ops >= 50
    st = pp.inspect_proc("cshared")
    assert st.status == "active" and st.last_claimed_range == st.last_acked_range
    pp.shutdown()
