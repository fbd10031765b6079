"""Commit → live-proc delivery latency, and the idle CPU of a node with 2 workers.

Run from the repository root (/work/main):

    .venv/bin/python -m benchmarks.latency [--quick] [--json OUT]

Latency: a live proc (``pp.live_proc(topic, mode="live")``) is iterated in a thread that
stamps each log's arrival and calls ``live.ack()``; the main thread commits one log at a
time (from the same client) and waits until that log was delivered and acked before the
next commit. The latency is arrival time − the time the ``commit()`` call started; warmup
logs are excluded. Under durability "full" and "fast", each on its own node (workers=0).

Also reported: the median time of the ``commit()`` call itself and the median time from its
return to the delivery (delivery can precede the return: the node answers the commit before
it claims for the live proc, but the two replies race).

Idle CPU: a node spawned with ``workers=2`` is left alone for 1 s, then the utime+stime of
the node and its worker processes (``/proc/<pid>/stat``) is summed over 3 s.

Skips (and says so) when live procs are not available yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, Dict, List

from ._common import (Node, body, cpu_seconds, fmt_us, median, percentile, scratch_dir,
                      worker_pids)


def live_latency(durability: str, n: int, warmup: int = 20) -> Dict[str, Any]:
    node = Node(f"lat-{durability}", durability=durability, workers=0)
    live = None
    try:
        pp = node.pp
        pp.commit({"topic": "lat", "body": body(-1)})  # the topic exists before the live proc
        try:
            live = pp.live_proc("lat", mode="live")
            iter(live)
        except Exception as exc:
            return {"skipped": f"live_proc not available: {type(exc).__name__}: {exc}"[:200]}
        arrivals: Dict[int, float] = {}
        delivered = threading.Semaphore(0)
        errors: List[BaseException] = []

        def consume() -> None:
            try:
                for log in live:
                    t = time.perf_counter()
                    logs = log if isinstance(log, list) else [log]
                    for one in logs:
                        arrivals[one.body["i"]] = t
                    live.ack()
                    delivered.release()
            except BaseException as exc:  # reported below
                errors.append(exc)
                delivered.release()

        th = threading.Thread(target=consume, name="live-consumer", daemon=True)
        th.start()
        sent: Dict[int, float] = {}
        returned: Dict[int, float] = {}
        lost = 0
        for i in range(warmup + n):
            sent[i] = time.perf_counter()
            pp.commit({"topic": "lat", "body": body(i)})
            returned[i] = time.perf_counter()
            if not delivered.acquire(timeout=5.0):
                lost += 1
            if errors:
                raise errors[0]
        lat = [arrivals[i] - sent[i] for i in range(warmup, warmup + n) if i in arrivals]
        after = [arrivals[i] - returned[i] for i in range(warmup, warmup + n) if i in arrivals]
        rtt = [returned[i] - sent[i] for i in range(warmup, warmup + n)]
        return {"n": len(lat), "median": median(lat), "p99": percentile(lat, 99),
                "commit_call_median": median(rtt), "after_commit_return_median": median(after),
                "max": max(lat) if lat else None, "undelivered_within_5s": lost}
    finally:
        if live is not None:
            try:
                live.cancel()
            except Exception:
                pass
        node.close()


def idle_cpu(settle: float = 1.0, window: float = 3.0) -> Dict[str, Any]:
    node = Node("idle", durability="full", workers=2)
    try:
        pp = node.pp
        workers = worker_pids(pp)
        time.sleep(settle)
        pids = [node.pid] + workers
        before = {p: cpu_seconds(p) for p in pids}
        t0 = time.monotonic()
        time.sleep(window)
        dt = time.monotonic() - t0
        after = {p: cpu_seconds(p) for p in pids}
        per = {p: after[p] - before[p] for p in pids}
        return {"window_s": dt, "workers": len(workers), "cpu_s": sum(per.values()),
                "cpu_percent": 100 * sum(per.values()) / dt,
                "node_cpu_s": per[node.pid],
                "worker_cpu_s": [per[p] for p in workers]}
    finally:
        node.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 instead of 1,000 samples")
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    n = 100 if a.quick else 1000
    res: Dict[str, Any] = {"latency": {}}
    print("| durability | samples | median | p99 | max | of which: commit() call (median) | "
          "commit() return → delivery (median) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for dur in ("full", "fast"):
        probe_ms = None
        if dur == "full":  # a delivery under "full" is two durable writes: commit, then claim
            from .baselines import LmdbProbe
            with scratch_dir("pipeproc-bench-probe-") as d:
                probe = LmdbProbe(d)
                try:
                    probe.commit(50)
                    probe_ms = median(probe.commit(300))
                finally:
                    probe.close()
        r = live_latency(dur, n)
        if probe_ms is not None:
            r["lmdb_durable_commit_median"] = probe_ms
        res["latency"][dur] = r
        if "skipped" in r:
            print(f"| {dur} | — | — | — | — | — | — | SKIPPED: {r['skipped']} |")
        else:
            note = f"{r['undelivered_within_5s']} not delivered within 5 s; " \
                if r["undelivered_within_5s"] else ""
            if r.get("lmdb_durable_commit_median"):
                note += ("in-process LMDB durable one-put commit just before: median "
                         f"{fmt_us(r['lmdb_durable_commit_median'])}")
            print(f"| {dur} | {r['n']} | {fmt_us(r['median'])} | {fmt_us(r['p99'])} | "
                  f"{fmt_us(r['max'])} | {fmt_us(r['commit_call_median'])} | "
                  f"{fmt_us(r['after_commit_return_median'])} | {note} |")
    r = idle_cpu()
    res["idle"] = r
    print()
    print(f"idle CPU, node + {r['workers']} workers over {r['window_s']:.1f} s: "
          f"{r['cpu_s'] * 1000:.1f} ms CPU ({r['cpu_percent']:.2f} %); node "
          f"{r['node_cpu_s'] * 1000:.1f} ms, workers "
          + ", ".join(f"{w * 1000:.1f} ms" for w in r["worker_cpu_s"])
          + " (resolution: 10 ms ticks per process)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
