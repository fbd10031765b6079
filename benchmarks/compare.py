"""pipeproc beside Redis Streams, side by side from one command (issue 17).

Runs the pipeproc suite (``python -m benchmarks --no-flow``) and the Redis Streams peer suite
(``python -m benchmarks.peers.redis_streams``), each as a child process, alternately when
``--rounds`` > 1 (the VM's speed drifts within minutes: alternating spreads the drift over
both), then prints one table: every workload at equal durability, pipeproc "full" beside
Redis ``appendfsync always`` and pipeproc "fast" beside Redis's default persistence, with
the ratio pipeproc / Redis (above 1.0: pipeproc leads). Each figure is the median over the
rounds of each suite's own median of ``--reps`` repetitions.

    .venv/bin/python -m benchmarks.compare                      # one round each, ~1 min
    .venv/bin/python -m benchmarks.compare --rounds 3 --json /tmp/compare.json
    .venv/bin/python -m benchmarks.compare --only W1,W6         # a subset (both suites)
    make bench-compare

Without a ``redis-server`` (on PATH, or ``--redis-server``) it says so, prints the pipeproc
figures alone and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["W1", "W2", "W3", "W4", "W4b", "W5 count=1", "W5 count=100", "W6"]
UNITS = {"W1": "commits/s", "W2": "logs/s", "W3": "logs/s", "W4": "cycles/s",
         "W4b": "logs/s", "W5 count=1": "logs/s", "W5 count=100": "logs/s",
         "W6": "commits/s"}
#: pipeproc durability -> the Redis configuration of equal durability
PAIRS = [("full", "always", "Redis fsync always"), ("fast", "default", "Redis default")]


def _run(args: List[str], out: str) -> Optional[dict]:
    """Run a suite as a child (its report goes to stderr here); its JSON, or None."""
    cmd = [sys.executable, "-m", *args, "--json", out]
    print(f"$ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr)
    if proc.returncode != 0:
        print(f"(exit status {proc.returncode})", file=sys.stderr)
    try:
        with open(out) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pipeproc_figures(data: dict) -> Dict[tuple, float]:
    return {(r["workload"], r["durability"]): r["figure"] for r in data.get("rows", [])
            if r.get("figure") is not None}


def redis_figures(data: dict) -> Dict[tuple, float]:
    out = {}
    for config, res in (data.get("configs") or {}).items():
        for w, v in res.items():
            if isinstance(v, dict) and v.get("figure") is not None:
                out[(w, config)] = v["figure"]
    return out


def _fmt(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _med(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def table(pp_runs: List[Dict[tuple, float]], rd_runs: List[Dict[tuple, float]]) -> List[str]:
    """The side-by-side table (Markdown), ratio = pipeproc / Redis at equal durability."""
    lines = ["| workload | unit | pipeproc full | Redis fsync always | ratio | pipeproc fast "
             "| Redis default | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for w in ORDER:
        cells = [w, UNITS[w]]
        any_fig = False
        for dur, config, _label in PAIRS:
            pp = _med([r[(w, dur)] for r in pp_runs if (w, dur) in r])
            rd = _med([r[(w, config)] for r in rd_runs if (w, config) in r])
            any_fig = any_fig or pp is not None or rd is not None
            ratio = f"**{pp / rd:.2f}**" if pp and rd and pp >= rd else (
                f"{pp / rd:.2f}" if pp and rd else "—")
            pps = [r[(w, dur)] for r in pp_runs if (w, dur) in r]
            rds = [r[(w, config)] for r in rd_runs if (w, config) in r]
            spread = (lambda xs: "" if len(xs) < 2 else
                      f" ({min(xs):,.0f}–{max(xs):,.0f})")
            cells += [_fmt(pp) + spread(pps), _fmt(rd) + spread(rds), ratio]
        if any_fig:
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the two suites this many times (default 1)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per workload and suite")
    ap.add_argument("--only", metavar="W1,W6,...",
                    help="only these workloads (W1, W2, W3, W4, W5, W6; W4 includes W4b)")
    ap.add_argument("--quick", action="store_true", help="~10x smaller sizes (smoke run)")
    ap.add_argument("--json", metavar="OUT", help="also write every figure as JSON to OUT")
    ap.add_argument("--redis-server", metavar="PATH",
                    help="the redis-server binary (default: redis-server on PATH)")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.reps < 1:
        ap.error("--rounds and --reps must be at least 1")
    common = ["--reps", str(a.reps)] + (["--quick"] if a.quick else [])
    pp_args = ["benchmarks", "--no-flow", *common] + (["--only", a.only] if a.only else [])
    rd_args = ["benchmarks.peers.redis_streams", *common] + (
        ["--redis-server", a.redis_server] if a.redis_server else [])
    redis = a.redis_server or shutil.which("redis-server")
    if redis is None or not os.path.exists(redis):
        redis = None
    wanted = None
    if a.only:
        names = {x.strip() for x in a.only.split(",") if x.strip()}
        wanted = {w for w in ORDER if w.split()[0] in names or (w == "W4b" and "W4" in names)}
    t0 = time.perf_counter()
    pp_runs: List[Dict[tuple, float]] = []
    rd_runs: List[Dict[tuple, float]] = []
    raw: Dict[str, List[Any]] = {"pipeproc": [], "redis": []}
    with tempfile.TemporaryDirectory(prefix="pipeproc-compare-") as tmp:
        for k in range(a.rounds):
            # alternate which suite goes first, so neither always gets the fresher machine
            order = ["pp", "rd"] if k % 2 == 0 else ["rd", "pp"]
            for which in order:
                if which == "pp":
                    data = _run(pp_args, os.path.join(tmp, f"pp{k}.json"))
                    if data is not None:
                        raw["pipeproc"].append(data)
                        pp_runs.append(pipeproc_figures(data))
                elif redis is not None:
                    data = _run(rd_args, os.path.join(tmp, f"rd{k}.json"))
                    if data is not None and not data.get("skipped"):
                        raw["redis"].append(data)
                        figs = redis_figures(data)
                        if wanted is not None:
                            figs = {key: v for key, v in figs.items() if key[0] in wanted}
                        rd_runs.append(figs)
    elapsed = time.perf_counter() - t0
    out = ["# pipeproc beside Redis Streams (equal durability)", "",
           f"command: `python -m benchmarks.compare {' '.join(argv if argv is not None else sys.argv[1:])}`"
           f" (from the repository root); {a.rounds} round(s), {a.reps} repetition(s) each; "
           f"took {elapsed:.0f} s",
           ""]
    if redis is None:
        out += ["skipped the Redis side: redis-server not found (install Redis to compare); "
                "pipeproc figures alone:", ""]
    elif not rd_runs:
        out += ["the Redis suite produced no figures (see its output above)", ""]
    if rd_runs and raw["redis"]:
        out.append(f"redis-server {raw['redis'][0].get('redis_version', '?')}; "
                   "pipeproc full vs `appendfsync always`, fast vs Redis's default "
                   "persistence; ratio = pipeproc / Redis (bold: pipeproc leads); "
                   "figures are medians over the rounds (range in parentheses)")
        out.append("")
    out += table(pp_runs, rd_runs)
    print("\n".join(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"argv": argv if argv is not None else sys.argv[1:],
                       "seconds": elapsed, "redis_server": redis, "runs": raw}, f, indent=2,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
