"""Load and scale stress tests (issue #6, load part).

* :func:`test_eight_clients_commit_read_consume`: 8 client processes commit, read and
  consume at once against one node (with a worker running a system proc); afterwards
  everything every process reports is checked against the store.
* :func:`test_10k_topics_1k_procs`: per-call cost of topics / stats / commit / proc+ack /
  wait_for_procs / inspect / restart on a node with 10,000 topics and 1,000 procs, against a
  node with 10 topics and 10 procs.
* :func:`test_10m_log_topic`: a topic of 10 million small logs: reads and claims at both
  ends against a 10,000-log control topic on the same node, the node's memory, and a GC
  pass that collects half of it.

Figures go to the stress summary through ``stress_util.report``.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stress_util import count, record_rss, report  # noqa: E402

import pipeproc  # noqa: E402
from load_client import body_for  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1024 * 1024


def _seq(log_id: str) -> int:
    return int(log_id.split("-")[1])


def _ms(log_id: str) -> int:
    return int(log_id.split("-")[0])


def _node_pid(pp: Any) -> int:
    return int(pp.stats()["node"]["pid"])


def _wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.02,
              tick: Optional[Callable[[], None]] = None) -> float:
    """Poll ``pred`` until true or fail after ``timeout`` s; returns the seconds it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        if tick is not None:
            tick()
        if pred():
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _paired(fns: List[Callable[[], Any]], reps: int, warmup: int) -> List[float]:
    """Median seconds of each fn, their repetitions interleaved so a drift of the shared
    machine's speed hits all of them alike. A fn returning a float reports its own time
    (to leave its set-up untimed)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts: List[List[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            r = fn()
            ts[i].append(r if isinstance(r, float) else time.perf_counter() - t)
    return [statistics.median(x) for x in ts]


def _ms_str(s: float) -> str:
    return f"{s * 1000:.2f} ms"


def _shutdown_all(nodes) -> None:
    for pp in nodes:
        try:
            pp.shutdown()
        except Exception:
            pass


# ====================================================================== 1. 8 clients at once

LOAD_SECONDS = 30
WRITERS, READERS, CONSUMERS = 3, 2, 3
SEED_W = 99  # the "writer" index of the logs the test commits itself before the run


def _read_line(p: subprocess.Popen, deadline: float, want: str, errfile: str) -> None:
    assert p.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"client {p.pid} did not say {want!r} in time; stderr: "
                                 f"{_tail(errfile)}")
        r, _, _ = select.select([p.stdout], [], [], min(left, 1.0))
        if r:
            line = p.stdout.readline()
            if not line:
                raise AssertionError(f"client {p.pid} exited (rc {p.poll()}) before {want!r}; "
                                     f"stderr: {_tail(errfile)}")
            if line.strip() == want:
                return


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path) as f:
            return f.read()[-n:]
    except OSError:
        return "(none)"


@pytest.mark.timeout(420)
def test_eight_clients_commit_read_consume(tmp_path):
    pp = pipeproc.spawn(tmp_path / "node", workers=1, durability="full")
    children: List[subprocess.Popen] = []
    try:
        pid = _node_pid(pp)
        topics = [f"ld-{i}" for i in range(4)]
        # every topic exists before the run (a reader never meets invalid_topic)
        seed_ids = pp.commit([{"topic": t, "body": body_for(SEED_W, j)}
                              for j, t in enumerate(topics)])
        expected: Dict[str, Dict[str, tuple]] = {t: {} for t in topics}  # id -> (w, k)
        for j, (t, i) in enumerate(zip(topics, seed_ids)):
            expected[t][i] = (SEED_W, j)
        procs = []
        for t in topics:
            procs.append({"name": f"c1-{t}", "topic": t, "count": 1, "kind": "ack"})
            procs.append({"name": f"cn-{t}", "topic": t, "count": 25, "kind": "ack"})
            procs.append({"name": f"cc-{t}", "topic": t, "count": 10, "kind": "ack_commit",
                          "to": f"d-{t}"})
        # a system proc on the busiest path: the worker consumes ld-0 into ld-sys
        pp.system_proc(name="sys-ld0", from_="ld-0", processor="load_client:sys_derive",
                       to="ld-sys", count=5)

        roles = ["writer"] * WRITERS + ["reader"] * READERS + ["consumer"] * CONSUMERS
        outs, errs = [], []
        for idx, role in enumerate(roles):
            out = str(tmp_path / f"client{idx}.json")
            err = str(tmp_path / f"client{idx}.err")
            cfg = {"address": pp.address, "authkey": pp.authkey.hex(), "role": role,
                   "index": idx, "duration": LOAD_SECONDS, "topics": topics, "procs": procs,
                   "seed": 1000 + idx, "out": out}
            with open(err, "w") as ef:
                children.append(subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "load_client.py"), json.dumps(cfg)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=ef, text=True,
                    cwd=str(tmp_path)))
            outs.append(out)
            errs.append(err)
        deadline = time.monotonic() + 60
        for p, e in zip(children, errs):
            _read_line(p, deadline, "ready", e)
        for p in children:  # the start barrier
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        t_start = time.monotonic()

        # sample the node's memory while the clients run; wait for them with a deadline
        deadline = t_start + LOAD_SECONDS + 120
        rss = []
        while any(p.poll() is None for p in children):
            rss.append(record_rss(pid, "node (8 clients)"))
            assert time.monotonic() < deadline, "clients still running 120 s after their end"
            time.sleep(0.25)
        elapsed = time.monotonic() - t_start
        for p, e in zip(children, errs):
            assert p.returncode == 0, f"client {p.pid} exited {p.returncode}: {_tail(e)}"
        results = []
        for o in outs:
            with open(o) as f:
                results.append(json.load(f))

        # -- what each client saw while running
        problems = []
        for r in results:
            for v in r["violations"]:
                problems.append(f"{r['role']} {r['index']}: {v}")
            for code, msg, tb in r["errors"]:
                problems.append(f"{r['role']} {r['index']}: unexpected error {code}: {msg}\n{tb}")
        assert not problems, "\n".join(problems[:30])
        ops: Dict[str, int] = {}
        for r in results:
            for k, v in r["ops"].items():
                ops[k] = ops.get(k, 0) + v
        expected_errors: Dict[str, int] = {}
        for r in results:
            for k, v in r["expected"].items():
                expected_errors[k] = expected_errors.get(k, 0) + v
        for r in results:  # every role did real work
            assert sum(r["ops"].values()) > 20, f"{r['role']} {r['index']} barely ran: {r['ops']}"

        # -- every commit a writer got an id for is there, with its body; nothing else is
        verified = 0
        batch_count = 0
        for r in results:
            if r["role"] != "writer":
                continue
            for k, t, i in r["logs"]:
                assert i not in expected[t], f"id {i} of {t} returned twice"
                expected[t][i] = (r["index"], k)
            batch_count += len(r["batches"])
        stored_ids: Dict[str, List[str]] = {}
        for t in topics:
            n = pp.length(t)
            logs = list(pp.iter_range(t, page_size=10_000))
            assert [_seq(lg.id) for lg in logs] == list(range(n)), f"{t}: sequences not contiguous"
            ms = [_ms(lg.id) for lg in logs]
            assert ms == sorted(ms), f"{t}: ms decreasing"
            got = {}
            for lg in logs:
                b = lg.body
                assert b == body_for(b["w"], b["k"]), f"{t} {lg.id}: body {b!r}"
                got[lg.id] = (b["w"], b["k"])
            missing = set(expected[t]) - set(got)
            extra = set(got) - set(expected[t])
            assert not missing, f"{t}: {len(missing)} acknowledged commits missing, e.g. {sorted(missing)[:5]}"
            assert not extra, f"{t}: {len(extra)} logs nobody committed, e.g. {sorted(extra)[:5]}"
            wrong = [i for i in got if got[i] != expected[t][i]]
            assert not wrong, f"{t}: bodies differ from what was committed at {wrong[:5]}"
            stored_ids[t] = [lg.id for lg in logs]
            verified += n
        # batches were atomic: the logs of one batch share one ms and are all there
        for r in results:
            if r["role"] != "writer":
                continue
            where = {k: (t, i) for k, t, i in r["logs"]}
            for ks in r["batches"]:
                assert len({_ms(where[k][1]) for k in ks}) == 1

        # -- consumers: each proc's acked logs, plus what is left, cover the topic once
        acked: Dict[str, list] = {s["name"]: [] for s in procs}
        for r in results:
            if r["role"] != "consumer":
                continue
            last_first: Dict[str, int] = {}
            for name, ids, wks in r["acks"]:
                first = _seq(ids[0])
                assert first > last_first.get(name, -1), f"{name}: consumer {r['index']} acks went back"
                last_first[name] = first
                acked[name].append((ids, wks, f"consumer {r['index']}"))
        consumed_by_clients = sum(len(ids) for v in acked.values() for ids, _, _ in v)
        drained = 0
        for s in procs:  # drain what the consumers left (the node must deliver all of it)
            name, t = s["name"], s["topic"]
            while True:
                got = pp.proc(t, name=name, count=1000)
                if got is None:
                    st = pp.inspect_proc(name)
                    assert st.last_claimed_range == st.last_acked_range, (
                        f"{name}: a claim is still pending after the run: {st}")
                    break
                if s["kind"] == "ack_commit":
                    pp.ack_commit(name, [{"topic": s["to"], "body": {"src": lg.id}} for lg in got],
                                  claimed=got)
                else:
                    pp.ack(name, claimed=got)
                acked[name].append(([lg.id for lg in got],
                                    [[lg.body["w"], lg.body["k"]] for lg in got], "drain"))
                drained += len(got)
        for s in procs:
            name, t = s["name"], s["topic"]
            by_seq: Dict[int, tuple] = {}
            for ids, wks, who in acked[name]:
                for i, wk in zip(ids, wks):
                    q = _seq(i)
                    assert q not in by_seq, f"{name}: seq {q} acked twice ({by_seq[q][2]}, {who})"
                    by_seq[q] = (i, tuple(wk), who)
            n = len(stored_ids[t])
            skipped = sorted(set(range(n)) - set(by_seq))
            assert not skipped, f"{name}: logs never consumed (skipped): {skipped[:10]}"
            assert len(by_seq) == n, f"{name}: acked {len(by_seq)} logs of {n}"
            for q, (i, wk, who) in by_seq.items():
                assert i == stored_ids[t][q], f"{name}: {who} acked {i}, stored {stored_ids[t][q]}"
                assert wk == expected[t][i], f"{name}: {who} saw body {wk} at {i}"
            st = pp.inspect_proc(name)
            assert st.last_acked_range.endswith(f"..{stored_ids[t][-1]}"), st
            verified += n
            if s["kind"] == "ack_commit":  # one derived log per source log, in order
                derived = [lg.body["src"] for lg in pp.iter_range(s["to"], page_size=10_000)]
                assert derived == stored_ids[t], f"{s['to']}: derived logs differ from {t}"
                verified += len(derived)

        # -- the system proc's worker processed all of ld-0 exactly once, in order
        pp.wait_for_procs(timeout=120)
        st = pp.inspect_proc("sys-ld0")
        assert st.status == "active", f"the system proc was disabled: {st}"
        sys_out = list(pp.iter_range("ld-sys", page_size=10_000))
        assert [lg.body["src"] for lg in sys_out] == stored_ids["ld-0"]
        for lg in sys_out:
            assert (lg.body["w"], lg.body["k"]) == expected["ld-0"][lg.body["src"]]
        verified += len(sys_out)
        stats = pp.stats()
        off = {n: p["status"] for n, p in stats["procs"].items() if p["status"] != "active"}
        assert not off, f"procs disabled under load: {off}"
        lags = {n: p["lag"] for n, p in stats["procs"].items() if p["lag"]}
        assert not lags, f"procs still lagging after the drain: {lags}"
        assert sum(w["failures"] for w in stats["workers"]) == 0, stats["workers"]
        assert rss and max(rss) < 300 * 1024, f"node RssAnon peaked at {max(rss) / 1024:.0f} MiB"

        client_ops = sum(ops.values())
        count("operations verified", client_ops + verified)
        count("load: client operations", client_ops)
        commits = ops.get("commit single", 0) + ops.get("commit batch", 0)
        logs_w = ops.get("commit single", 0) + ops.get("logs in batches", 0)
        reads = sum(ops.get(k, 0) for k in ("length", "range :seq", "range by id", "range by ms",
                                            "revrange newest", "iter_range"))
        report(f"8-client load ({elapsed:.0f} s, durability full, 1 worker): {commits:,} commits "
               f"({logs_w:,} logs, {batch_count:,} batches; {commits / LOAD_SECONDS:,.0f}/s), "
               f"{reads:,} reads, {ops.get('proc', 0):,} proc calls delivering "
               f"{ops.get('logs delivered', 0):,} logs, {ops.get('ack', 0):,} acks + "
               f"{ops.get('ack_commit', 0):,} ack_commits, {ops.get('reclaim', 0):,} reclaims; "
               f"consumers acked {consumed_by_clients:,} logs, {drained:,} drained after; "
               f"system proc {len(sys_out):,} logs; expected errors {expected_errors or 'none'}; "
               f"node RssAnon peak {max(rss) / 1024:.1f} MiB")
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(10)
            except Exception:
                pass
            for f in (p.stdin, p.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
        pp.shutdown()


# ====================================================================== 2. 10k topics, 1k procs

def _build_many(pp: Any, n_topics: int, n_procs: int) -> Dict[str, float]:
    """``n_topics`` topics of 2 logs (atomic batches of 1,000 topics) and ``n_procs`` procs
    (offsets ``>``, ``$>``, ``:1``), every proc idle afterwards. Returns creation times."""
    t0 = time.perf_counter()
    for s in range(0, n_topics, 1000):
        pp.commit([{"topic": f"t{i:05d}", "body": {"i": i, "k": k}}
                   for i in range(s, min(n_topics, s + 1000)) for k in range(2)])
    t_topics = time.perf_counter() - t0
    step = n_topics // n_procs
    t0 = time.perf_counter()
    for j in range(n_procs):
        name, topic = f"p{j:04d}", f"t{j * step:05d}"
        offset = (">", "$>", ":1")[j % 3]
        got = pp.proc(topic, name=name, offset=offset, count=5)
        if got is not None:
            assert [_seq(lg.id) for lg in got] == ([0, 1] if offset == ">" else [1])
            pp.ack(name, claimed=got)
    t_procs = time.perf_counter() - t0
    return {"topics": t_topics, "procs": t_procs}


@pytest.mark.timeout(300)
def test_10k_topics_1k_procs(tmp_path):
    shape = {"big": (10_000, 1_000), "small": (10, 10)}
    opts = dict(workers=1, durability="fast", gc={"min_prune_time": 3600.0, "interval": 0.5})
    nodes: Dict[str, Any] = {}
    try:
        built = {}
        for label, (nt, np_) in shape.items():
            nodes[label] = pipeproc.spawn(tmp_path / label, **opts)
            built[label] = _build_many(nodes[label], nt, np_)
        pid = _node_pid(nodes["big"])
        record_rss(pid, "node (10k topics, 1k procs)")
        for label, (nt, np_) in shape.items():
            st = nodes[label].stats()
            assert len(st["topics"]) == nt and len(st["procs"]) == np_
            assert not any(p["lag"] for p in st["procs"].values())
            assert len(nodes[label].topics()) == nt
        count("topics created", sum(nt for nt, _ in shape.values()))
        count("procs created", sum(np_ for _, np_ in shape.values()))
        rng = random.Random(6)

        def pick_proc(label: str) -> str:
            return f"p{rng.randrange(shape[label][1]):04d}"

        def per(label: str, fn: Callable) -> Callable:
            return lambda: fn(nodes[label], label)

        meas: Dict[str, List[float]] = {}
        meas["topics()"] = _paired([per(lb, lambda pp, lb: pp.topics()) for lb in shape], 20, 2)
        meas["stats()"] = _paired([per(lb, lambda pp, lb: pp.stats()) for lb in shape], 10, 2)
        meas["wait_for_procs() all idle"] = _paired(
            [per(lb, lambda pp, lb: pp.wait_for_procs(timeout=30)) for lb in shape], 20, 2)
        meas["wait_for_procs([one])"] = _paired(
            [per(lb, lambda pp, lb: pp.wait_for_procs([pick_proc(lb)], timeout=30))
             for lb in shape], 100, 10)
        meas["inspect_proc"] = _paired(
            [per(lb, lambda pp, lb: pp.inspect_proc(pick_proc(lb))) for lb in shape], 100, 10)
        record_rss(pid, "node (10k topics, 1k procs)")
        meas["commit to a random topic"] = _paired(
            [per(lb, lambda pp, lb: pp.commit({"topic": f"t{rng.randrange(shape[lb][0]):05d}",
                                               "body": {"x": 1}})) for lb in shape], 300, 30)

        def proc_ack(pp: Any, lb: str) -> float:
            name = pick_proc(lb)
            topic = pp.inspect_proc(name).topic
            pp.commit({"topic": topic, "body": {"x": 2}})  # work for it (untimed)
            t = time.perf_counter()
            got = pp.proc(topic, name=name, count=100)
            assert got, name
            pp.ack(name, claimed=got)
            return time.perf_counter() - t
        meas["proc+ack on a random proc"] = _paired([per(lb, proc_ack) for lb in shape], 200, 20)
        record_rss(pid, "node (10k topics, 1k procs)")

        # the same while another client waits in wait_for_procs() for every proc (the usual
        # "wait until the consumers are done"), parked because one proc holds a claim
        held, waiters, waited, clients = {}, [], [], []
        for lb, (nt, np_) in shape.items():
            pp = nodes[lb]
            for j in range(np_):  # the random commits above left work: drain every proc
                name = f"p{j:04d}"
                topic = pp.inspect_proc(name).topic
                while True:
                    got = pp.proc(topic, name=name, count=1000)
                    if got is None:
                        break
                    pp.ack(name, claimed=got)
            pp.wait_for_procs(timeout=30)
            pp.commit({"topic": "hold", "body": {"x": 4}})
            held[lb] = pp.proc("hold", name="hold", reclaim_timeout=None)
            assert held[lb] is not None
            other = pipeproc.connect(address=pp.address, authkey=pp.authkey)
            clients.append(other)

            def wait(other=other, lb=lb) -> None:
                try:
                    other.wait_for_procs(timeout=120)
                    waited.append(lb)
                except pipeproc.PipeProcError as exc:
                    waited.append(f"{lb}: {exc}")
            waiters.append(threading.Thread(target=wait, name=f"wait-{lb}", daemon=True))
            waiters[-1].start()
        try:
            meas["proc+ack with a wait_for_procs() parked"] = _paired(
                [per(lb, proc_ack) for lb in shape], 200, 20)
            assert not waited, f"wait_for_procs returned while 'hold' was pending: {waited}"
            for lb in shape:
                nodes[lb].ack("hold", claimed=held[lb])
            for th in waiters:
                th.join(30)
            assert sorted(waited) == sorted(shape), "wait_for_procs did not return after the ack"
        finally:
            for c in clients:
                c.close()

        # GC ticks (every 0.5 s, nothing old enough to delete) walk every topic in the writer:
        # the longest commit over 1.6 s of back-to-back commits shows what a tick costs
        gc_stall = {}
        for lb in shape:
            pp = nodes[lb]
            lat = []
            end = time.monotonic() + 1.6
            while time.monotonic() < end:
                t = time.perf_counter()
                pp.commit({"topic": "t00000", "body": {"x": 3}})
                lat.append(time.perf_counter() - t)
            gc_stall[lb] = max(lat)

        # restart: shut down, spawn again on the same location, time until ready
        before = {lb: nodes[lb].stats() for lb in shape}
        restart: Dict[str, List[float]] = {lb: [] for lb in shape}
        for _ in range(2):
            for lb in shape:
                nodes[lb].shutdown()
                t = time.perf_counter()
                nodes[lb] = pipeproc.spawn(tmp_path / lb, **opts)
                restart[lb].append(time.perf_counter() - t)
        for lb, (nt, np_) in shape.items():
            st = nodes[lb].stats()
            assert len(st["topics"]) == nt + 1 and len(st["procs"]) == np_ + 1, "lost state on restart"
            assert st["workers"], "workers not listed after restart"
            for t, v in before[lb]["topics"].items():
                assert st["topics"][t]["length"] == v["length"], f"{t} changed on restart"
            for n, v in before[lb]["procs"].items():
                assert (st["procs"][n]["last_acked_range"], st["procs"][n]["lag"]) == (
                    v["last_acked_range"], v["lag"]), f"{n} changed on restart"
        meas["restart (spawn to ready)"] = [statistics.median(restart[lb]) for lb in shape]
        record_rss(_node_pid(nodes["big"]), "node (10k topics, 1k procs)")

        lines = []
        for op, (b, s) in meas.items():
            lines.append(f"{op} {_ms_str(b)} (10-topic node {_ms_str(s)}, x{b / s:.1f})")
        report("10k topics/1k procs node, durability fast, 1 worker: create 10k topics "
               f"{built['big']['topics']:.2f} s, 1k procs {built['big']['procs']:.2f} s; "
               + "; ".join(lines) + f"; longest commit across GC ticks {_ms_str(gc_stall['big'])} "
               f"(10-topic node {_ms_str(gc_stall['small'])})")

        # nothing pathologically slow ...
        for op, (b, s) in meas.items():
            bound = 10.0 if op.startswith("restart") else 1.0
            assert b < bound, f"{op} takes {b:.3f} s on the 10k-topic node"
        assert gc_stall["big"] < 1.0, f"a GC tick over 10k topics stalls writers {gc_stall['big']:.3f} s"
        # ... and no per-request cost proportional to the number of topics or procs (the calls
        # whose answer itself is O(n) -- topics(), stats(), waiting on every proc -- excepted)
        for op in ("wait_for_procs([one])", "inspect_proc", "commit to a random topic",
                   "proc+ack on a random proc", "restart (spawn to ready)",
                   "proc+ack with a wait_for_procs() parked"):
            b, s = meas[op]
            assert b / s < 5, f"{op}: {_ms_str(b)} on the 10k-topic node vs {_ms_str(s)} (x{b / s:.1f})"
    finally:
        _shutdown_all(nodes.values())


# ====================================================================== 3. a 10M-log topic

BIG_N = 10_000_000
CTL_N = 10_000
FILL_BATCH = 10_000
RSS_LIMIT_MIB = 300


def _store_file(loc) -> int:
    return os.path.getsize(os.path.join(str(loc), "store", "data.mdb"))


@pytest.mark.timeout(900)
def test_10m_log_topic(tmp_path):
    loc = tmp_path / "big"
    free = shutil.disk_usage(str(tmp_path)).free
    if free < 3 * 1024 * MIB:  # the store takes ~0.5 GB; keep a wide margin for others
        pytest.skip(f"only {free / MIB:.0f} MiB free under {tmp_path}")
    # GC on from the start (collects nothing while the guard procs sit at seq 0)
    interval = 1.0
    pp = pipeproc.spawn(loc, workers=0, durability="fast",
                        gc={"min_prune_time": 0.0, "interval": interval})
    stop = threading.Event()
    probe_thread = None
    try:
        pid = _node_pid(pp)
        label = "node (10M-log topic)"
        big, ctl = "big", "ctl"
        for t in (big, ctl):  # a proc that never claims protects the whole topic from the GC
            assert pp.proc(t, name=f"guard-{t}") is None

        def fill(topic: str, n: int) -> float:
            t0 = time.perf_counter()
            for s in range(0, n, FILL_BATCH):
                ids = pp.commit([{"topic": topic, "body": {"i": i}}
                                 for i in range(s, min(n, s + FILL_BATCH))])
                assert _seq(ids[0]) == s
                record_rss(pid, label)
            return time.perf_counter() - t0
        fill(ctl, CTL_N)
        fill_s = fill(big, BIG_N)
        rss_fill = record_rss(pid, label)
        count("logs committed", BIG_N + CTL_N)
        sizes = {big: BIG_N, ctl: CTL_N}
        for t, n in sizes.items():
            assert pp.length(t) == n
        stats = pp.stats()
        assert stats["topics"][big]["stored"] == BIG_N
        store_bytes0, file0 = stats["node"]["store_bytes"], _store_file(loc)

        # -- reads at the start, middle and end; every result checked once, then timed
        tops = (big, ctl)
        mid = {t: n // 2 for t, n in sizes.items()}
        last = {t: n - 1000 for t, n in sizes.items()}
        mid_id = {t: pp.range(t, start=f":{mid[t]}", limit=1)[0].id for t in tops}
        last_id = {t: pp.range(t, start=f":{last[t]}", limit=1)[0].id for t in tops}
        reads = {
            "range first page": (lambda t: pp.range(t, limit=1000), lambda t: 0),
            "range middle page by :seq": (lambda t: pp.range(t, start=f":{mid[t]}", limit=1000),
                                          lambda t: mid[t]),
            "range middle page by id": (lambda t: pp.range(t, start=mid_id[t], limit=1000),
                                        lambda t: mid[t]),
            "range last page by :seq": (lambda t: pp.range(t, start=f":{last[t]}", limit=1000),
                                        lambda t: last[t]),
            "range last page by id": (lambda t: pp.range(t, start=last_id[t], limit=1000),
                                      lambda t: last[t]),
        }
        for op, (fn, first) in reads.items():
            for t in tops:
                logs = fn(t)
                assert [lg.body["i"] for lg in logs] == list(range(first(t), first(t) + 1000)), op
                assert [_seq(lg.id) for lg in logs] == list(range(first(t), first(t) + 1000)), op
        for t in tops:
            newest = pp.revrange(t, limit=1000)
            assert [lg.body["i"] for lg in newest] == list(range(sizes[t] - 1, sizes[t] - 1001, -1))
        meas: Dict[str, List[float]] = {}
        for op, (fn, _) in reads.items():
            meas[op] = _paired([lambda t=t, fn=fn: fn(t) for t in tops], 20, 3)
            record_rss(pid, label)
        meas["revrange newest page"] = _paired(
            [lambda t=t: pp.revrange(t, limit=1000) for t in tops], 20, 3)
        meas["length"] = _paired([lambda t=t: pp.length(t) for t in tops], 200, 20)
        record_rss(pid, label)

        # -- claims: count 1 and count 1000, at the start and at the end of each topic
        def cycle(t: str, name: str, offset: str, cnt: int, want: List[int]) -> Callable:
            def fn() -> None:
                got = pp.proc(t, name=name, offset=offset, count=cnt)
                logs = got if isinstance(got, list) else [got]
                assert got is not None and logs[0].body["i"] == want[0], (name, got and logs[0])
                assert len(logs) == cnt
                pp.ack(name, claimed=got)
                want[0] += cnt
            return fn
        claim_procs = []
        for where, cnt, reps, warm in (("start", 1, 30, 3), ("end", 1, 30, 3),
                                        ("start", 1000, 5, 1), ("end", 1000, 5, 1)):
            fns = []
            for t in tops:
                first = 0 if where == "start" else sizes[t] - cnt * (reps + warm)
                name = f"m-{where}-{cnt}-{t}"
                claim_procs.append((t, name))
                fns.append(cycle(t, name, ">" if where == "start" else f":{first}", cnt, [first]))
            meas[f"proc+ack count={cnt} at the {where}"] = _paired(fns, reps, warm)
            record_rss(pid, label)
        rss_reads = record_rss(pid, label)

        # -- GC: a proc that acked up to the middle (claimed twice: its previous claim starts
        # at the middle) is the only one left on each topic; the GC must drop the first half.
        # A probe commits every 5 ms meanwhile: its longest commit is how long the GC pass
        # held the writer (every commit / claim / ack of every client waits that long).
        probes: List[tuple] = []

        def probe() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                pp.commit({"topic": "probe", "body": {"x": 1}})
                probes.append((t, time.perf_counter() - t))
                stop.wait(0.005)
        probe_thread = threading.Thread(target=probe, name="probe", daemon=True)
        probe_thread.start()
        gc: Dict[str, dict] = {}
        peak_gc_rss = [0]

        def sample() -> None:
            peak_gc_rss[0] = max(peak_gc_rss[0], record_rss(pid, label))
        for t in (ctl, big):  # the control first: its pass is the reference
            half = sizes[t] // 2
            name = f"half-{t}"
            for k in range(2):
                got = pp.proc(t, name=name, offset=f":{half}")
                assert got.body["i"] == half + k
                pp.ack(name, claimed=got)
            for tt, n in claim_procs:
                if tt == t:
                    pp.destroy_proc(n)
            t0 = time.perf_counter()
            pp.destroy_proc(f"guard-{t}")
            seen = _wait_for(lambda: pp.stats()["topics"][t]["stored"] <= sizes[t] - half,
                             interval + 60, f"the GC to collect half of {t}", every=0.01,
                             tick=sample)
            t1 = time.perf_counter()
            # the probe is sequential: once a commit that started after t1 is back, every
            # commit that started before has been recorded
            _wait_for(lambda: probes and probes[-1][0] > t1, 60, "the probe to move on")
            stall = max([lat for s, lat in probes if t0 - 0.01 <= s <= t1] or [0.0])
            st = pp.stats()["topics"][t]
            gc[t] = {"seen": seen, "stall": stall, "stored": st["stored"], "deleted": half}
            assert st["stored"] == sizes[t] - half, st  # exactly the half before the proc
            assert pp.length(t) == sizes[t]
            first = pp.range(t, limit=1)[0]
            assert _seq(first.id) == half and first.body["i"] == half
            with pytest.raises(pipeproc.PipeProcError) as ei:
                pp.range(t, start=":0", limit=1)
            assert ei.value.code == "invalid_tone_id_search"
        stop.set()
        probe_thread.join(10)
        count("logs collected by GC", sum(g["deleted"] for g in gc.values()))
        stats = pp.stats()
        store_bytes1, file1 = stats["node"]["store_bytes"], _store_file(loc)
        # the space the GC freed is reused: a million more logs do not grow the store
        t0 = time.perf_counter()
        for s in range(BIG_N, BIG_N + 1_000_000, FILL_BATCH):
            pp.commit([{"topic": big, "body": {"i": i}} for i in range(s, s + FILL_BATCH)])
            record_rss(pid, label)
        refill_s = time.perf_counter() - t0
        store_bytes2, file2 = pp.stats()["node"]["store_bytes"], _store_file(loc)

        peak = max(rss_fill, rss_reads)
        lines = [f"{op} {_ms_str(b)} (10k-log control {_ms_str(c)}, x{b / c:.2f})"
                 for op, (b, c) in meas.items()]
        report(f"10M-log topic (durability fast): filled in {fill_s:.1f} s "
               f"({BIG_N / fill_s:,.0f} logs/s, batches of {FILL_BATCH:,}); " + "; ".join(lines))
        report(f"10M-log topic: node RssAnon after fill {rss_fill / 1024:.1f} MiB, after reads "
               f"{rss_reads / 1024:.1f} MiB, peak during GC {peak_gc_rss[0] / 1024:.1f} MiB")
        report(f"10M-log topic GC pass (interval {interval:g} s): control (5,000 logs) seen "
               f"after {gc[ctl]['seen']:.2f} s, longest commit meanwhile {_ms_str(gc[ctl]['stall'])}; "
               f"big (5,000,000 logs) seen after {gc[big]['seen']:.2f} s, longest commit "
               f"meanwhile {_ms_str(gc[big]['stall'])}; store_bytes {store_bytes0 / MIB:.0f} -> "
               f"{store_bytes1 / MIB:.0f} MiB, data.mdb {file0 / MIB:.0f} -> {file1 / MIB:.0f} MiB; "
               f"+1M logs after GC ({refill_s:.1f} s): store_bytes {store_bytes2 / MIB:.0f} MiB, "
               f"data.mdb {file2 / MIB:.0f} MiB")

        # -- bounds: nothing grows with the topic's size, memory stays bounded
        for op, (b, c) in meas.items():
            assert b < 0.5, f"{op} takes {b:.3f} s on the 10M-log topic"
            assert b / c < 5, f"{op}: {_ms_str(b)} on 10M logs vs {_ms_str(c)} on 10k (x{b / c:.1f})"
        assert peak < RSS_LIMIT_MIB * 1024, f"node RssAnon peaked at {peak / 1024:.0f} MiB"
        assert peak_gc_rss[0] < RSS_LIMIT_MIB * 1024, (
            f"node RssAnon peaked at {peak_gc_rss[0] / 1024:.0f} MiB during the GC pass")
        assert store_bytes2 <= store_bytes1 * 1.05, "freed pages not reused after GC"
        assert gc[big]["seen"] < interval + 30
        # a GC pass must not hold the writer (every client's commits, claims and acks) for
        # long: deleting a large prefix should be split into bounded write rounds
        assert gc[big]["stall"] < 0.5, (
            f"the GC pass that collected 5,000,000 logs blocked writers for "
            f"{gc[big]['stall']:.2f} s (control, 5,000 logs: {_ms_str(gc[ctl]['stall'])})")
    finally:
        stop.set()
        if probe_thread is not None:
            probe_thread.join(10)
        pp.shutdown()
