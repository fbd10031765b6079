"""The pipeproc benchmark suite: same-run baselines, then workloads W1–W6 under durability
"full" and "fast", compared with the goals of /work/shared/BENCHMARKS.md.

Run from the repository root (/work/main):

    .venv/bin/python -m benchmarks                        # full run, ~1-2 min on 2 cores
    .venv/bin/python -m benchmarks --quick                # ~10x smaller smoke run
    .venv/bin/python -m benchmarks --json /tmp/bench.json --only W1,W3
    nice -n -10 .venv/bin/python -m benchmarks            # as RESULTS.md was made (busy box)

`--only` takes W1, W2, W3, W4, W4b, W5, W6 (W4 includes W4b). Each workload runs --reps times
(default 3) and the repetition with the median ratio to its goal is reported. Durable
workloads are compared with LMDB probes taken right next to them (the disk's fsync time
drifts). Nodes and stores live in fresh directories under /tmp and are always shut down and
removed. Without `--only` (and unless `--no-flow`), the flow benchmarks F1–F6 follow
(`benchmarks/flow.py`, also runnable alone: `.venv/bin/python -m benchmarks.flow`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

from . import baselines, workloads as wl
from ._common import Meter, Node, load_line, worker_pids, cpu_report, cpu_snapshot, fmt_rate, fmt_us, machine, scratch_dir

ALL = ["W1", "W2", "W3", "W4", "W4b", "W5", "W6"]


def goal_for(workload: str, dur: str, b: Dict[str, Dict[str, float]],
             row: Dict[str, Any]) -> Optional[tuple]:
    """(goal value, how it is computed) per BENCHMARKS.md's Goals table, or None.

    Goals use the baselines measured again right next to the workload when the row has them
    (``probe_commit_s``: mean seconds of a one-put durable transaction; ``probe_batch_rate``:
    logs/s of 1,000-put durable transactions; ``probe_ping_rate``: socket round trips/s;
    ``probe_scan_rate``: paged-scan logs/s), else the start-of-run baselines."""
    ping = row.get("probe_ping_rate") or b["socket_pingpong"]["rate"]
    rt = 1.0 / ping
    dc = row.get("probe_commit_s") or 1.0 / b["lmdb_durable_commit"]["rate"]
    limit = 1.0 / (rt + dc)  # the W1 durable limit: one round trip + one durable commit
    batch = row.get("probe_batch_rate") or b["lmdb_batch_put"]["rate"]
    scan = row.get("probe_scan_rate") or b["lmdb_paged_scan"]["rate"]
    table = {
        ("W1", "full"): (0.85 * limit, "0.85 × 1/(RTT + durable commit)"),
        ("W1", "fast"): (0.6 * ping, "0.6 × ping-pong"),
        ("W2", "full"): (0.55 * batch, "0.55 × LMDB batch put"),
        ("W3", "full"): (0.4 * scan, "0.4 × LMDB paged scan"),
        ("W3", "fast"): (0.4 * scan, "0.4 × LMDB paged scan"),
        ("W4", "full"): (0.85 * limit / 2, "0.85 × W1 limit / 2"),
        ("W4", "fast"): (0.3 * ping, "0.3 × ping-pong"),
        ("W4b", "full"): (0.2 * batch, "0.2 × LMDB batch put"),
        ("W5 count=1", "full"): (0.75 * limit, "0.75 × W1 limit"),
        ("W5 count=100", "full"): (0.1 * batch, "0.1 × LMDB batch put"),
        ("W6", "full"): (2.5 * limit, "2.5 × W1 limit"),
        ("W6", "fast"): (1.0 * ping, "1 × ping-pong"),
    }
    return table.get((workload, dur))


UNITS = {"W1": "commits/s", "W2": "logs/s", "W3": "logs/s", "W4": "cycles/s", "W4b": "logs/s",
         "W5 count=1": "logs/s", "W5 count=100": "logs/s", "W6": "commits/s"}


class Suite:
    def __init__(self, quick: bool, only: List[str], probe: baselines.LmdbProbe,
                 echo: baselines.EchoProbe, base: Dict[str, Dict[str, float]],
                 reps: int) -> None:
        self.quick = quick
        self.only = set(only)
        self.s = 10 if quick else 1
        self.rows: List[Dict[str, Any]] = []
        self.nodes: List[Dict[str, Any]] = []
        self.probe = probe
        self.echo = echo
        self.base = base
        self.reps = reps
        self._acc: Dict[str, Any] = {}

    def want(self, w: str) -> bool:
        return w in self.only

    def probe_commit(self, n: int = 100) -> None:
        self._acc.setdefault("commit", []).extend(self.probe.commit(n))

    def _probe(self, kinds: tuple) -> None:
        s = self.s
        for kind in kinds:
            if kind == "commit":
                self.probe_commit(200 // s)
            elif kind == "batch":
                n = 10_000 // s
                acc = self._acc.setdefault("batch", [0.0, 0])
                acc[0] += self.probe.batch(n)
                acc[1] += n
            elif kind == "ping":
                n = 1000 // s
                acc = self._acc.setdefault("ping", [0.0, 0])
                acc[0] += self.echo.run(n)
                acc[1] += n
            elif kind == "scan":
                acc = self._acc.setdefault("scan", [0.0, 0])
                acc[0] += self.probe.scan()
                acc[1] += self.probe.scan_n

    def _once(self, fn, k: int, kinds: tuple) -> Dict[str, Any]:
        self._acc = {}
        self._probe(kinds)
        res = fn(k)
        self._probe(kinds)
        acc = self._acc
        if acc.get("commit"):
            res["probe_commit_s"] = sum(acc["commit"]) / len(acc["commit"])
            res["probe_commit_median_s"] = statistics.median(acc["commit"])
        for kind in ("batch", "ping", "scan"):
            if kind in acc and acc[kind][1]:
                res[f"probe_{kind}_rate"] = acc[kind][1] / acc[kind][0]
        return res

    def record(self, workload: str, durability: str, fn, probes: tuple = (),
               reps: Optional[int] = None) -> None:
        """Run a workload ``reps`` times (``fn(k)``, k = repetition), with the baselines its
        goal uses measured again right before and after each repetition: "commit" and
        "batch" (durable LMDB; durability "full" only), "ping" (socket round trip), "scan"
        (LMDB paged scan); W1 also probes between its rounds. The row kept is the repetition
        with the median ratio to its goal (the median figure when there is no goal); all
        figures are kept in ``rep_figures``."""
        reps = reps or self.reps
        print(f"  {workload:13s} {durability:4s} ...", end="", flush=True, file=sys.stderr)
        if durability != "full":
            probes = tuple(p for p in probes if p not in ("commit", "batch"))
        if goal_for(workload, durability, self.base, {}) is None:
            probes = ()
        t = time.perf_counter()
        results = []
        try:
            for k in range(reps):
                results.append(self._once(fn, k, probes))
        except Exception as exc:  # one broken workload must not sink the run
            traceback.print_exc(file=sys.stderr)
            results = [{"figure": None, "note": f"error: {type(exc).__name__}: {exc}"[:200]}]

        def key(r: Dict[str, Any]) -> float:
            g = goal_for(workload, durability, self.base, r)
            return r["figure"] / g[0] if g else r["figure"]
        ok = [r for r in results if r.get("figure") is not None]
        if ok:
            ok.sort(key=key)
            row = dict(ok[(len(ok) - 1) // 2])
            row["rep_figures"] = [r["figure"] for r in results]
            if len(ok) < len(results):
                row["note"] = "; ".join(r["note"] for r in results if r.get("note"))
        else:
            row = results[-1]
        print(" " + ", ".join(fmt_rate(r.get("figure")) for r in results) +
              f" ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
        self.rows.append({"workload": workload, "durability": durability, **row})

    def core_node(self, dur: str) -> None:
        s = self.s
        node = Node(dur, durability=dur, workers=0)
        try:
            pp = node.pp

            def M() -> Meter:
                return Meter(node.pid)
            n_big = 100_000 // s
            if self.want("W1"):
                n1 = (2000 if dur == "full" else 5000) // s
                between = (lambda: self.probe_commit(100 // s)) if dur == "full" else None
                self.record("W1", dur, lambda k: wl.w1(pp, n1, between=between, meter=M()),
                            ("commit", "ping"))
            have_w2 = False
            if self.want("W2"):
                self.record("W2", dur, lambda k: wl.w2(pp, n_big, topic=f"w2r{k}", meter=M()),
                            ("batch",))
                have_w2 = self.rows[-1].get("figure") is not None
            if (self.want("W3") or self.want("W4b")) and not have_w2:
                wl.fill(pp, "w2r0", n_big)  # untimed set-up
            if self.want("W3"):  # w3 takes the median of its own 3 rounds
                self.record("W3", dur, lambda k: wl.w3(pp, "w2r0", n_big, meter=M()),
                            ("scan",), reps=1)
            if self.want("W4"):
                cycles = (1000 if dur == "full" else 3000) // s

                def w4(k: int) -> Dict[str, Any]:
                    wl.fill(pp, f"w4r{k}", cycles + 100)  # untimed set-up
                    return wl.w4(pp, f"w4r{k}", f"w4p{k}", 1, 100, meter=M())
                self.record("W4", dur, w4, ("commit", "ping"))
            if self.want("W4b"):
                self.record("W4b", dur,
                            lambda k: wl.w4(pp, "w2r0", f"w4bp{k}", 100, 10, meter=M()),
                            ("batch",))
            if self.want("W6"):
                loc = pp.location
                self.record("W6", dur, lambda k: wl.w6(loc, 1250 // s, meter=M()),
                            ("commit", "ping"))
        finally:
            self.nodes.append({"node": f"W1–W4b, W6 ({dur}, workers=0)", "pid": node.pid,
                               "rss_anon_kb": node.sample_rss()})
            node.close()

    def w5_node(self, dur: str) -> None:
        s = self.s
        n = 10_000 // s
        timeout = 120.0
        try:
            node = Node(f"w5-{dur}", durability=dur, workers=2)
        except Exception as exc:
            for c in (1, 100):
                self.rows.append({"workload": f"W5 count={c}", "durability": dur, "figure": None,
                                  "note": f"n/a: spawn(workers=2) failed: {exc}"[:200]})
            return
        try:
            pp = node.pp

            def M() -> Meter:
                return Meter(node.pid, worker_pids(pp))
            if not hasattr(pp, "system_proc"):
                raise AttributeError("no system_proc")
            try:
                wl.w5_warmup(pp)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                for c in (1, 100):
                    self.rows.append({"workload": f"W5 count={c}", "durability": dur,
                                      "figure": None,
                                      "note": f"n/a: system procs unavailable: "
                                              f"{type(exc).__name__}: {exc}"[:200]})
                return
            self.record("W5 count=1", dur,
                        lambda k: wl.w5(pp, n, 1, f"c1r{k}", timeout, meter=M()),
                        ("commit", "ping"))
            self.record("W5 count=100", dur,
                        lambda k: wl.w5(pp, n, 100, f"c100r{k}", timeout, meter=M()),
                        ("batch",))
        finally:
            self.nodes.append({"node": f"W5 ({dur}, workers=2)", "pid": node.pid,
                               "rss_anon_kb": node.sample_rss()})
            node.close()


def table(rows: List[Dict[str, Any]], b: Dict[str, Dict[str, float]]) -> List[str]:
    out = []
    hdr = ("workload", "durability", "figure", "goal", "ratio", "verdict", "notes")
    lines = []
    for r in rows:
        key = (r["workload"], r["durability"])
        fig = r.get("figure")
        goal = goal_for(r["workload"], r["durability"], b, r)
        unit = UNITS.get(r["workload"], "")
        notes = []
        if len(r.get("rep_figures") or []) > 1:
            notes.append("repetitions: " + ", ".join(fmt_rate(x) for x in r["rep_figures"]))
        if r.get("median_latency") is not None:
            notes.append(f"median latency {fmt_us(r['median_latency'])}, "
                         f"p99 {fmt_us(r['p99_latency'])}")
        if r.get("client_median_latency") is not None:
            notes.append(f"median latency per commit {fmt_us(r['client_median_latency'])}")
        if r.get("cycle_us") is not None:
            notes.append(f"{r['cycle_us']:,.0f} µs per proc+ack cycle")
        near = []
        if r.get("probe_commit_s"):
            near.append(f"LMDB durable commit {fmt_us(r['probe_commit_s'])} "
                        f"(median {fmt_us(r['probe_commit_median_s'])})")
        if r.get("probe_batch_rate"):
            near.append(f"LMDB batch put {fmt_rate(r['probe_batch_rate'])} logs/s")
        if r.get("probe_ping_rate"):
            near.append(f"ping-pong {fmt_rate(r['probe_ping_rate'])}/s")
        if r.get("probe_scan_rate"):
            near.append(f"LMDB paged scan {fmt_rate(r['probe_scan_rate'])} logs/s")
        if near:
            notes.append("baselines next to it: " + ", ".join(near))
        if r.get("node_cpu_us_per_op") is not None:
            per = "cycle" if r["workload"] == "W4" else \
                ("commit" if r["workload"] in ("W1", "W6") else "log")
            c = f"CPU per {per}: node {r['node_cpu_us_per_op']:,.1f} µs"
            if r.get("worker_cpu_us_per_op") is not None:
                c += f", workers {r['worker_cpu_us_per_op']:,.1f} µs"
            if r.get("client_cpu_us_per_op") is not None:
                c += f", client {r['client_cpu_us_per_op']:,.1f} µs"
            if r.get("node_cpu_util") is not None:
                c += f" (node busy {100 * r['node_cpu_util']:.0f} % of one core)"
            notes.append(c)
        if r.get("note"):
            notes.append(r["note"])
        if fig is None:
            figs, ratio, verdict = "n/a", "—", "n/a"
        else:
            figs = f"{fmt_rate(fig)} {unit}"
            if goal:
                ratio = f"{fig / goal[0]:.2f}"
                verdict = "PASS" if fig >= goal[0] else "SHORT"
            else:
                ratio, verdict = "—", "—"
        goals_s = f"{fmt_rate(goal[0])} ({goal[1]})" if goal else "— (no goal set)"
        lines.append((r["workload"], r["durability"], figs, goals_s, ratio, verdict,
                      "; ".join(notes)))
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for l in lines:
        out.append("| " + " | ".join(l) + " |")
    return out


def baseline_lines(b: Dict[str, Dict[str, float]]) -> List[str]:
    ping = b["socket_pingpong"]
    dc = b["lmdb_durable_commit"]
    limit = 1.0 / (1.0 / ping["rate"] + 1.0 / dc["rate"])
    return [
        "| baseline | figure |",
        "|---|---|",
        f"| LMDB one-put write txn, sync=True | {fmt_rate(dc['rate'])} commits/s "
        f"({fmt_us(1 / dc['rate'])} each; median {fmt_us(dc['median_latency'])}) |",
        f"| LMDB 1,000 puts per txn, msgpack encode, sync=True | "
        f"{fmt_rate(b['lmdb_batch_put']['rate'])} logs/s |",
        f"| LMDB paged cursor scan (pages of 1,000), msgpack decode | "
        f"{fmt_rate(b['lmdb_paged_scan']['rate'])} logs/s |",
        f"| socket ping-pong ({ping['request_bytes']:.0f}-byte msgpack request) | "
        f"{fmt_rate(ping['rate'])} round trips/s ({fmt_us(1 / ping['rate'])} each; "
        f"median {fmt_us(ping['median_latency'])}; CPU per round trip: client "
        f"{ping['client_cpu_us_per_op']:.1f} µs, server {ping['server_cpu_us_per_op']:.1f} µs) |",
        f"| → W1 durable limit 1/(RTT + durable commit) | {fmt_rate(limit)} commits/s |",
    ] + ([
        f"| crc32 of a stored record, 100-byte body ({b['record_crc']['record_bytes']:.0f} "
        f"bytes; the read check of store format 3) | {b['record_crc']['us_per_record']:.3f} µs "
        "per record |",
    ] if "record_crc" in b else [])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~10x smaller sizes (smoke run)")
    ap.add_argument("--json", metavar="OUT", help="also write all results as JSON to OUT")
    ap.add_argument("--only", metavar="W1,W3,...", help="run only these workloads")
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions per workload (the median one is reported; default 3)")
    ap.add_argument("--no-flow", action="store_true",
                    help="without --only, the flow benchmarks F1–F6 (python -m benchmarks.flow) "
                         "run after W1–W6; this skips them")
    a = ap.parse_args(argv)
    only = ALL if not a.only else [w.strip() for w in a.only.split(",") if w.strip()]
    only = [("W4b" if w.lower() == "w4b" else w.upper()) for w in only]
    bad = [w for w in only if w not in ALL]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {','.join(ALL)}")
    if "W4" in only and "W4b" not in only:
        only.append("W4b")

    t_start = time.perf_counter()
    snap0 = cpu_snapshot()
    info = machine()
    print(f"machine: {info['nproc']} × {info['cpu']}, Python {info['python']}, "
          f"lmdb {info['lmdb']}, msgpack {info['msgpack']}, {info['date']}", file=sys.stderr)
    print("baselines ...", file=sys.stderr)
    echo = baselines.EchoProbe()
    try:
        b = baselines.run(a.quick, echo)
        with scratch_dir("pipeproc-bench-probe-") as pdir:
            probe = baselines.LmdbProbe(pdir)
            try:
                probe.prepare_scan(100_000 // (10 if a.quick else 1))
                suite = Suite(a.quick, only, probe, echo, b, a.reps)
                for dur in ("full", "fast"):
                    if set(only) & {"W1", "W2", "W3", "W4", "W4b", "W6"}:
                        print(f"node {dur} (workers=0):", file=sys.stderr)
                        suite.core_node(dur)
                    if "W5" in only:
                        print(f"node {dur} (workers=2):", file=sys.stderr)
                        suite.w5_node(dur)
            finally:
                probe.close()
    finally:
        echo.close()
    order = {w: i for i, w in enumerate(["W1", "W2", "W3", "W4", "W4b", "W5 count=1",
                                         "W5 count=100", "W6"])}
    rows = sorted(suite.rows, key=lambda r: (order.get(r["workload"], 99),
                                             r["durability"] != "full"))
    elapsed = time.perf_counter() - t_start
    load = cpu_report(snap0, cpu_snapshot())

    cmd = "python -m benchmarks" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    out = [f"# pipeproc benchmarks ({'quick' if a.quick else 'full'} run)", "",
           f"command: `{cmd}` (from /work/main, with .venv/bin/python)",
           f"machine: nproc {info['nproc']}, {info['cpu']}, Python {info['python']}, "
           f"lmdb {info['lmdb']}, msgpack {info['msgpack']}; {info['date']}; "
           f"pipeproc at git {info['git']}; "
           f"run took {elapsed:.0f} s",
           load_line(load, info['nproc']),
           "", "## Baselines (same run)", ""]
    out += baseline_lines(b)
    out += ["", "## Workloads", ""]
    out += table(rows, b)
    out += ["", "## Node memory (RssAnon at the end of its workloads)", "",
            "| node | RssAnon |", "|---|---|"]
    for n in suite.nodes:
        rss = n["rss_anon_kb"]
        out.append(f"| {n['node']} | {'n/a' if rss is None else f'{rss / 1024:,.1f} MiB'} |")
    print("\n".join(out))
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                goal = goal_for(r["workload"], r["durability"], b, r)
                r["goal"], r["goal_formula"] = goal if goal else (None, None)
            json.dump({"command": cmd, "machine": info, "baselines": b,
                       "rows": rows, "nodes": suite.nodes, "seconds": elapsed, "load": load}, f, indent=2,
                      default=str)
    if not a.only: __import__("benchmarks.redis_backend").redis_backend.suite(a.quick)  # issue 18: Redis backend beside raw Redis Streams (skipped without Redis)
    if not a.only and not a.no_flow:  # the flow benchmarks F1–F6, with their own report
        from . import flow as flow_bench
        print()
        sys.stdout.flush()
        return flow_bench.main(["--quick"] if a.quick else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
