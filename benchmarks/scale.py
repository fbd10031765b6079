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

The machine's speed drifts (shared VM), so at every size the same operations are also
measured on a **control** topic that stays at ~10,000 logs, their repetitions interleaved;
the last column divides each operation's growth by its control's growth (≈1.0 means the
cost does not depend on the topic's size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List

from ._common import Node, body, median, rss_anon_kb


def _paired(fns: List, reps: int, warmup: int) -> List[float]:
    """Median seconds of each fn in ``fns``, their repetitions interleaved (so a drift of the
    machine's speed hits all of them alike)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts: List[List[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t)
    return [median(x) for x in ts]


class Topic:
    """A topic under measurement: its size ``n`` (log seq k has body {"i": k})."""

    def __init__(self, pp: Any, name: str, n: int) -> None:
        self.pp, self.name, self.n = pp, name, n

    def id_at(self, seq: int) -> str:
        return self.pp.range(self.name, start=f":{seq}", limit=1)[0].id


def measure(pp: Any, target: Topic, control: Topic, pid: int) -> Dict[str, Any]:
    """Each operation on ``target`` and on ``control``, interleaved; returns both."""
    tops = (target, control)
    for t in tops:
        assert pp.length(t.name) == t.n
    mid = [t.id_at(t.n // 2 - 1) for t in tops]
    last = [t.id_at(t.n - 1001) for t in tops]
    out: Dict[str, Any] = {"size": target.n, "control": {}}

    def put(key: str, vals: List[float]) -> None:
        out[key], out["control"][key] = vals

    put("range first page", _paired([lambda t=t: pp.range(t.name, limit=1000) for t in tops],
                                    20, 3))
    put("range middle page", _paired(
        [lambda t=t, s=s: pp.range(t.name, start=s, exclusive=True, limit=1000)
         for t, s in zip(tops, mid)], 20, 3))
    put("range last page", _paired(
        [lambda t=t, s=s: pp.range(t.name, start=s, exclusive=True, limit=1000)
         for t, s in zip(tops, last)], 20, 3))
    assert len(pp.range(target.name, start=last[0], exclusive=True, limit=1000)) == 1000
    put("length", _paired([lambda t=t: pp.length(t.name) for t in tops], 200, 20))
    names = [f"scale-{t.name}-{target.n}" for t in tops]
    firsts = []
    for t, name in zip(tops, names):
        c0 = time.perf_counter()
        first = pp.proc(t.name, name=name, offset=f":{t.n // 2}")
        firsts.append(time.perf_counter() - c0)
        assert first is not None and first.body["i"] == t.n // 2, first
        pp.ack(name)
    put("proc create (first call)", firsts)

    def cycle(t: Topic, name: str) -> None:
        pp.proc(t.name, name=name)
        pp.ack(name)
    put("proc+ack", _paired([lambda t=t, nm=nm: cycle(t, nm) for t, nm in zip(tops, names)],
                            200, 10))

    def commit(t: Topic) -> None:
        pp.commit({"topic": t.name, "body": body(t.n)})
        t.n += 1
    put("commit", _paired([lambda t=t: commit(t) for t in tops], 200, 20))
    out["rss_anon_mib"] = (rss_anon_kb(pid) or 0) / 1024
    out["store_mib"] = pp.stats()["node"].get("store_bytes", 0) / 2**20
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
        target = Topic(pp, "scale", 0)
        control = Topic(pp, "control", 0)
        for t, n in ((control, 10_000), ):
            while t.n < n:
                pp.commit([{"topic": t.name, "body": body(t.n + j)} for j in range(1000)])
                t.n += 1000
        for n in sizes:
            # the measurements at the previous size appended a few commits: fill up to n
            t0 = time.perf_counter()
            while target.n < n:
                k = min(1000, n - target.n)
                pp.commit([{"topic": target.name, "body": body(target.n + j)} for j in range(k)])
                target.n += k
            print(f"size {n:,}: filled in {time.perf_counter() - t0:.1f} s; measuring ...",
                  file=sys.stderr)
            rows.append(measure(pp, target, control, node.pid))
    finally:
        node.close()

    keys = ["commit", "length", "range first page", "range middle page", "range last page",
            "proc+ack", "proc create (first call)"]
    hdr = ["operation (median)"] + [f"{r['size']:,} logs (control)" for r in rows] + \
          [f"× from {rows[0]['size']:,} to {rows[-1]['size']:,}", "× relative to control"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for k in keys:
        cells = [f"{r[k] * 1e6:,.0f} µs ({r['control'][k] * 1e6:,.0f})" for r in rows]
        g = rows[-1][k] / rows[0][k]
        gc = rows[-1]["control"][k] / rows[0]["control"][k]
        print(f"| {k} | " + " | ".join(cells) + f" | {g:.2f} | {g / gc:.2f} |")
    print("| node RssAnon | " + " | ".join(f"{r['rss_anon_mib']:.1f} MiB" for r in rows) +
          f" | {rows[-1]['rss_anon_mib'] / rows[0]['rss_anon_mib']:.2f} | |")
    print("| store size | " + " | ".join(f"{r['store_mib']:.1f} MiB" for r in rows) + " | | |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
