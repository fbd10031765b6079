"""W5 count=1 beside drained stages: the cost of a worker's claim as system procs add up.

    .venv/bin/python -m benchmarks.stages [--stages 20] [--n 30000] [--durability fast]
    .venv/bin/python -m benchmarks.stages --commits      # single-log commits instead

Spawns a node with 2 workers, creates ``--stages`` system procs and lets them drain (3
logs each), then runs W5 count=1 (one system proc a -> b, ``--n`` logs) and prints its
logs/s and the node's CPU per log. With ``--commits`` it makes ``--n`` single-log commits
to an unrelated topic instead (the workers parked), and prints commits/s and node CPU per
commit. The store lives in a fresh directory under /tmp, removed afterwards.
Results: benchmarks/RESULTS.md, "Round 4".
"""

from __future__ import annotations

import argparse
import os
import time

import pipeproc

from . import processors
from . import workloads as wl
from ._common import body, cpu_seconds, scratch_dir


def drained_stages(pp: pipeproc.PipeProc, k: int, timeout: float = 60.0) -> None:
    """``k`` system procs, each with 3 logs processed (so nothing left to claim)."""
    for i in range(k):
        pp.commit([{"topic": f"idle{i}", "body": {"i": j}} for j in range(3)])
        pp.system_proc(name=f"idle{i}", from_=f"idle{i}", processor=processors.incr,
                       to=f"idleout{i}")
    pp.wait_for_procs(timeout=timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=20, help="drained system procs (default 20)")
    ap.add_argument("--n", type=int, default=30000, help="logs or commits (default 30,000)")
    ap.add_argument("--durability", choices=("fast", "full"), default="fast")
    ap.add_argument("--commits", action="store_true",
                    help="single-log commits to another topic instead of W5")
    args = ap.parse_args()
    with scratch_dir() as d:
        pp = pipeproc.spawn(os.path.join(d, "store"), durability=args.durability, workers=2)
        try:
            wl.w5_warmup(pp)
            drained_stages(pp, args.stages)
            npid = pp.stats()["node"]["pid"]
            c0 = cpu_seconds(npid)
            if args.commits:
                t0 = time.perf_counter()
                for i in range(args.n):
                    pp.commit({"topic": "t", "body": body(i)})
                fig, unit = args.n / (time.perf_counter() - t0), "commits/s"
            else:
                r = wl.w5(pp, args.n, 1, "x", 300)
                fig, unit = r["figure"], "logs/s"
            cpu = cpu_seconds(npid) - c0
        finally:
            pp.close()
    what = "commits" if args.commits else "W5 count=1"
    print(f"{what}, {args.durability}, {args.stages} drained stages: {fig:,.0f} {unit}, "
          f"node CPU {cpu / args.n * 1e6:.1f} µs each")


if __name__ == "__main__":
    main()
