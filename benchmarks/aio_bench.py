"""Commits/s of the asyncio client (pipelined) against the sync client (sequential).

Workload: ``N`` single-log commits (body ``{"i": n, "payload": "x" * 100}``) to one topic,

* ``sync``: one :class:`pipeproc.PipeProc`, one commit after the other;
* ``aio``: one :class:`pipeproc.aio.AsyncPipeProc`, ``N`` coroutines at once
  (``asyncio.gather``), all pipelined on its single connection;

each with ``durability="full"`` and ``"fast"``, on a fresh disk node (``workers=0``) per
run; the median of ``--repeat`` runs is reported. Prints a table, then one JSON line.

Command (from the repository root)::

    .venv/bin/python benchmarks/aio_bench.py --n 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time

import pipeproc
import pipeproc.aio

BODY = {"payload": "x" * 100}


def bench_sync(n: int, durability: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        with pipeproc.spawn(d, workers=0, durability=durability) as pp:
            pp.commit({"topic": "warm", "body": BODY})
            t0 = time.perf_counter()
            for i in range(n):
                pp.commit({"topic": "t", "body": dict(BODY, i=i)})
            dt = time.perf_counter() - t0
            assert pp.length("t") == n
    return n / dt


async def _bench_aio(n: int, durability: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        async with await pipeproc.aio.spawn(d, workers=0, durability=durability) as pp:
            await pp.commit({"topic": "warm", "body": BODY})
            t0 = time.perf_counter()
            ids = await asyncio.gather(
                *(pp.commit({"topic": "t", "body": dict(BODY, i=i)}) for i in range(n)))
            dt = time.perf_counter() - t0
            assert sorted(int(x.split("-")[1]) for x in ids) == list(range(n))
    return n / dt


def bench_aio(n: int, durability: str) -> float:
    return asyncio.run(_bench_aio(n, durability))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="commits per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    args = ap.parse_args()
    results = {}
    for durability in ("full", "fast"):
        for client, fn in (("sync", bench_sync), ("aio", bench_aio)):
            rates = [fn(args.n, durability) for _ in range(args.repeat)]
            results[f"{client}_{durability}"] = round(statistics.median(rates))
    print(f"{'client':<8}{'durability':<12}{'commits/s':>12}")
    for key, rate in results.items():
        client, durability = key.split("_")
        print(f"{client:<8}{durability:<12}{rate:>12,}")
    print(json.dumps({"benchmark": "aio_commits", "n": args.n, "repeat": args.repeat,
                      "python": platform.python_version(), "machine": platform.machine(),
                      "date": time.strftime("%Y-%m-%d"), "commits_per_s": results}))


if __name__ == "__main__":
    main()
