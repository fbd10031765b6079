"""How the cost of commit, range, length and proc+ack grows with the topic's size.

Run from the repository root (/work/main):

    .venv/bin/python -m benchmarks.scale            # topic sizes 10^4, 10^5, 10^6 (~1 min)
    .venv/bin/python -m benchmarks.scale --big      # and 10^7 (several minutes, ~2 GB disk)
    .venv/bin/python -m benchmarks.scale --json OUT

One node, durability "fast", workers=0. One topic is grown (batches of 1,000, untimed) to
each size N; at each size, medians over repetitions (after warmup) of:

* ``range`` of the first, middle and last page of 1,000 logs (the middle and last pages by
  ``start=<id>, exclusive=True``, as a consumer paging through the topic would);
* ``length``;
* ``proc`` + ``ack`` (``count=1``) of a new proc created at the middle of the topic
  (offset ``":N/2"``), and the first ``proc`` call, which creates it;
* a single-log ``commit`` to the same topic (measured last at each size);

and the node's RssAnon and store size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List

from ._common import Node, body, median, rss_anon_kb


def _median_time(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return median(ts)


def measure(pp: Any, topic: str, n: int, pid: int) -> Dict[str, Any]:
    def id_at(seq: int) -> str:
        return pp.range(topic, start=f":{seq}", limit=1)[0].id

    mid_id, last_id = id_at(n // 2 - 1), id_at(n - 1001)
    assert pp.length(topic) == n
    out: Dict[str, Any] = {"size": n}
    out["range first page"] = _median_time(lambda: pp.range(topic, limit=1000), 20, 3)
    out["range middle page"] = _median_time(
        lambda: pp.range(topic, start=mid_id, exclusive=True, limit=1000), 20, 3)
    out["range last page"] = _median_time(
        lambda: pp.range(topic, start=last_id, exclusive=True, limit=1000), 20, 3)
    assert len(pp.range(topic, start=last_id, exclusive=True, limit=1000)) == 1000
    out["length"] = _median_time(lambda: pp.length(topic), 200, 20)
    name = f"scale-{n}"
    t = time.perf_counter()
    first = pp.proc(topic, name=name, offset=f":{n // 2}")
    out["proc create (first call)"] = time.perf_counter() - t
    assert first is not None and first.body["i"] == n // 2, first
    pp.ack(name)

    def cycle() -> None:
        pp.proc(topic, name=name)
        pp.ack(name)
    out["proc+ack"] = _median_time(cycle, 200, 10)
    i = [n]

    def commit() -> None:
        pp.commit({"topic": topic, "body": body(i[0])})
        i[0] += 1
    out["commit"] = _median_time(commit, 200, 20)
    out["rss_anon_mib"] = (rss_anon_kb(pid) or 0) / 1024
    out["store_mib"] = pp.stats()["node"].get("store_bytes", 0) / 2**20
    out["_committed"] = i[0] - n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", action="store_true", help="also 10^7 logs")
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    sizes = [10**4, 10**5, 10**6] + ([10**7] if a.big else [])
    topic = "scale"
    rows: List[Dict[str, Any]] = []
    node = Node("scale", durability="fast", workers=0)
    try:
        pp = node.pp
        have = 0   # logs in the topic (log seq k has body {"i": k})
        for n in sizes:
            # the measurements at the previous size appended a few commits: fill up to n
            t = time.perf_counter()
            while have < n:
                k = min(1000, n - have)
                pp.commit([{"topic": topic, "body": body(have + j)} for j in range(k)])
                have += k
            fill_s = time.perf_counter() - t
            print(f"size {n:,}: filled in {fill_s:.1f} s; measuring ...", file=sys.stderr)
            r = measure(pp, topic, n, node.pid)
            have += r.pop("_committed")
            rows.append(r)
    finally:
        node.close()

    keys = ["commit", "length", "range first page", "range middle page", "range last page",
            "proc+ack", "proc create (first call)"]
    hdr = ["operation (median)"] + [f"{r['size']:,} logs" for r in rows] + \
          [f"× from {rows[0]['size']:,} to {rows[-1]['size']:,}"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for k in keys:
        cells = [f"{r[k] * 1e6:,.0f} µs" for r in rows]
        print(f"| {k} | " + " | ".join(cells) + f" | {rows[-1][k] / rows[0][k]:.2f} |")
    print("| node RssAnon | " + " | ".join(f"{r['rss_anon_mib']:.1f} MiB" for r in rows) +
          f" | {rows[-1]['rss_anon_mib'] / rows[0]['rss_anon_mib']:.2f} |")
    print("| store size | " + " | ".join(f"{r['store_mib']:.1f} MiB" for r in rows) + " | |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
