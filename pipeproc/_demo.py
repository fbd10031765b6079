"""``pipeproc demo`` (``make demo``): a three-stage pipeline of system procs, fed and timed.

What it does, in order:

1. spawns a node on ``location`` (default ``./pipeproc_data``) with two workers, or connects
   to the node already running there;
2. registers the pipeline (registering an existing system proc again with the same definition
   changes nothing, so a rerun continues on the same store)::

       raw ─demo-parse (100)─▶ parsed ─demo-enrich (100)─▶ enriched ─demo-aggregate (500)─▶ totals

3. commits ``logs`` synthetic access-log lines to ``raw`` in atomic batches while showing
   per-stage progress (redrawn in place on a terminal, periodic lines otherwise);
4. waits for the pipeline to drain and prints a summary: logs per stage, throughput,
   commit-to-``totals`` latency percentiles (from the node's own id timestamps) and the
   store size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pipeproc

from ._protocol import BUSY_POLL
from ._text import human_bytes, table
from .demo_processors import make_line

STAGES = (  # (system proc name, from topic, processor, to topic, count)
    ("demo-parse", "raw", "pipeproc.demo_processors:parse", "parsed", 100),
    ("demo-enrich", "parsed", "pipeproc.demo_processors:enrich", "enriched", 100),
    ("demo-aggregate", "enriched", "pipeproc.demo_processors:aggregate", "totals", 500),
)
TOPICS = ("raw", "parsed", "enriched", "totals")
STALL_TIMEOUT = 60.0  # seconds without any progress before the demo gives up


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


class _Progress:
    """One progress line: redrawn with ``\\r`` on a terminal, printed every second otherwise."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.2 if self.tty else 1.0
        self.last_len = 0

    def show(self, text: str) -> None:
        if self.tty:
            pad = max(0, self.last_len - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.last_len = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self.last_len:
            self.stream.write("\n")
            self.stream.flush()


def _percentile(sorted_values: List[int], p: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def run(*, logs: int = 20_000, location: Optional[str] = None, workers: int = 2,
        batch: int = 500, durability: str = "full",
        busy_poll: float = BUSY_POLL) -> int:
    """Run the demo; returns a CLI exit code (0 ok, 1 the pipeline failed, 3 no node)."""
    location = location or "./pipeproc_data"
    say = print
    say(f"pipeproc demo: {logs:,} logs through raw -> parse -> enrich -> aggregate "
        f"({workers} workers, store {os.path.abspath(location)})")
    with demo_node(location, workers, durability, busy_poll, "pipeline") as pp:
        return _run(pp, logs, batch)


@contextlib.contextmanager
def demo_node(location: str, workers: int, durability: str, busy_poll: float,
              what: str) -> Iterator[Any]:
    """A node for a demo act: spawned on ``location`` (and shut down after), or the one
    already running there (only disconnected after)."""
    try:
        pp = pipeproc.spawn(location, workers=workers, durability=durability,
                            busy_poll=busy_poll)
        spawned = True
    except pipeproc.NodeAlreadyActive:
        print(f"a node is already running there: using it (its workers run the {what})")
        pp = pipeproc.connect(location, busy_poll=busy_poll)
        spawned = False
    try:
        yield pp
    finally:
        if spawned:
            pp.shutdown()
        else:
            pp.close()


def _register(pp: Any) -> Optional[str]:
    for name, src, processor, dst, count in STAGES:
        try:
            pp.system_proc(name=name, from_=src, processor=processor, to=dst, count=count,
                           reclaim_timeout=30.0)
        except ImportError as exc:  # the library was built without system procs
            return f"system procs are not available in this build ({exc})"
        except pipeproc.PipeProcError as exc:
            return f"cannot register {name}: {exc}"
    return None


def _lengths(st: Dict[str, Any]) -> Dict[str, int]:
    topics = st.get("topics", {})
    return {t: topics.get(t, {}).get("length", 0) for t in TOPICS}


def _run(pp: Any, n_logs: int, batch: int) -> int:
    problem = _register(pp)
    if problem:
        print(f"pipeproc demo: {problem}", file=sys.stderr)
        return 1
    st = pp.stats()
    if not st.get("workers"):
        print("pipeproc demo: the node has no workers, nothing would run the pipeline "
              "(start it with --workers N)", file=sys.stderr)
        return 1
    base = _lengths(st)
    already = base["raw"]
    if already:
        print(f"continuing on an existing store: raw already holds {already:,} logs")
    start_seq = already  # the n of the first log of this run (bodies carry it)

    fed = [0]
    feed_error: List[BaseException] = []

    def feed() -> None:
        try:
            i = 0
            while i < n_logs:
                k = min(batch, n_logs - i)
                pp.commit([{"topic": "raw",
                            "body": {"n": start_seq + i + j, "line": make_line(start_seq + i + j)}}
                           for j in range(k)])
                i += k
                fed[0] = i
        except BaseException as exc:  # reported by the main thread
            feed_error.append(exc)

    progress = _Progress(sys.stdout)
    t0 = time.monotonic()
    feeder = threading.Thread(target=feed, name="demo-feeder", daemon=True)
    feeder.start()
    last_change = time.monotonic()
    last_key: Tuple = ()
    next_show = time.monotonic() + progress.interval
    try:
        while True:
            time.sleep(0.05)
            st = pp.stats()
            ln = _lengths(st)
            procs = st.get("procs", {})
            agg = procs.get("demo-aggregate", {})
            done_agg = ln["enriched"] - base["enriched"] - agg.get("lag", 0)
            elapsed = time.monotonic() - t0
            rate = done_agg / elapsed if elapsed > 0 else 0.0
            line = (f"[{elapsed:6.1f}s] raw {_fmt(fed[0])}/{_fmt(n_logs)} | "
                    f"parsed {_fmt(ln['parsed'] - base['parsed'])} | "
                    f"enriched {_fmt(ln['enriched'] - base['enriched'])} | "
                    f"aggregated {_fmt(done_agg)} | {_fmt(rate)} logs/s")
            if time.monotonic() >= next_show:
                progress.show(line)
                next_show = time.monotonic() + progress.interval
            if feed_error:
                progress.end()
                print(f"pipeproc demo: feeding failed: {feed_error[0]}", file=sys.stderr)
                return 1
            disabled = [n for n, _s, _p, _d, _c in STAGES
                        if procs.get(n, {}).get("status") == "disabled"]
            if disabled:
                progress.end()
                print(f"pipeproc demo: disabled proc(s) {', '.join(disabled)}; "
                      "see `pipeproc procs` and the node's log", file=sys.stderr)
                return 1
            key = (fed[0], ln["parsed"], ln["enriched"], ln["totals"])
            if key != last_key:
                last_key, last_change = key, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT:
                progress.end()
                print(f"pipeproc demo: no progress for {STALL_TIMEOUT:.0f} s; giving up",
                      file=sys.stderr)
                return 1
            drained = (fed[0] == n_logs
                       and ln["parsed"] - base["parsed"] >= n_logs
                       and ln["enriched"] - base["enriched"] >= n_logs
                       and all(procs.get(n, {}).get("lag", 1) == 0
                               and not procs.get(n, {}).get("pending")
                               for n, *_ in STAGES))
            if drained:
                progress.show(line)
                break
    except KeyboardInterrupt:
        progress.end()
        print("interrupted; the store keeps what was committed (rerun to continue)")
        return 130
    pp.wait_for_procs([n for n, *_ in STAGES], timeout=STALL_TIMEOUT)
    elapsed = time.monotonic() - t0
    progress.end()
    feeder.join()
    _summary(pp, base, n_logs, elapsed)
    return 0


def _summary(pp: Any, base: Dict[str, int], n_logs: int, elapsed: float) -> None:
    st = pp.stats()
    ln = _lengths(st)
    latencies: List[int] = []
    by_status: Dict[str, int] = {}
    errors = total_bytes = aggregated = 0
    first_raw_ms: Optional[int] = None
    last_total_ms: Optional[int] = None
    if ln["totals"] > base["totals"]:
        for lg in pp.iter_range("totals", start=f":{base['totals']}", page_size=1000):
            ms = int(lg.id.split("-", 1)[0])
            b = lg.body
            last_total_ms = ms
            low = min(b["raw_ms"])
            first_raw_ms = low if first_raw_ms is None else min(first_raw_ms, low)
            latencies.extend(ms - raw_ms for raw_ms in b["raw_ms"])
            aggregated += b["count"]
            errors += b["errors"]
            total_bytes += b["bytes"]
            for k, v in b["by_status"].items():
                by_status[k] = by_status.get(k, 0) + v
    latencies.sort()
    if first_raw_ms is not None and last_total_ms is not None and last_total_ms > first_raw_ms:
        elapsed = (last_total_ms - first_raw_ms) / 1000  # the node's clock: first commit to last total
    rows = [
        ["commit", "raw", _fmt(ln["raw"] - base["raw"]), _fmt(ln["raw"]), "-"],
        ["parse", "parsed", _fmt(ln["parsed"] - base["parsed"]), _fmt(ln["parsed"]), str(STAGES[0][4])],
        ["enrich", "enriched", _fmt(ln["enriched"] - base["enriched"]), _fmt(ln["enriched"]),
         str(STAGES[1][4])],
        ["aggregate", "totals", _fmt(ln["totals"] - base["totals"]), _fmt(ln["totals"]), str(STAGES[2][4])],
    ]
    print()
    print(table(["STAGE", "TOPIC", "LOGS (THIS RUN)", "LOGS (TOTAL)", "BATCH"], rows,
                right=(2, 3, 4)))
    print()
    node = st.get("node", {})
    workers = st.get("workers", [])
    lines = [
        ("logs in", f"{_fmt(n_logs)} committed to raw in batches, "
                    f"{_fmt(aggregated)} reached totals"),
        ("throughput", f"{_fmt(n_logs / elapsed if elapsed else 0)} logs/s end to end "
                       f"({elapsed:.2f} s from first commit to last total, "
                       f"{len(workers)} workers)"),
        ("latency", (f"commit -> totals  p50 {_percentile(latencies, 50)} ms  "
                     f"p90 {_percentile(latencies, 90)} ms  p99 {_percentile(latencies, 99)} ms  "
                     f"max {latencies[-1] if latencies else 0} ms")),
        ("store", f"{human_bytes(node.get('store_bytes', 0))} at {node.get('location')} "
                  f"(durability {node.get('durability')})"),
    ]
    if by_status:
        top = sorted(by_status.items(), key=lambda kv: -kv[1])[:5]
        lines.append(("computed", "status " + ", ".join(f"{k}: {v:,}" for k, v in top)
                      + f"; 5xx errors {errors:,}; {human_bytes(total_bytes)} served"))
    for k, v in lines:
        print(f"{k:<11} {v}")
    print()
    cmd = cli_command()
    where = _location_option(node.get("location"))
    print(f"rerun to add more; to look around, run `{cmd} node{where}` and in another "
          f"shell `{cmd} procs{where}` or `{cmd} tail totals -n 1{where}`")


def cli_command() -> str:
    """How to run the ``pipeproc`` command from the current shell.

    ``pipeproc`` when that is what is on ``PATH``; otherwise the script next to this Python
    (``.venv/bin/pipeproc`` after ``make demo``, relative when under the working directory),
    else ``<python> -m pipeproc``.
    """
    script = os.path.join(os.path.dirname(sys.executable), "pipeproc")
    if not os.path.exists(script):
        return f"{sys.executable} -m pipeproc"
    found = shutil.which("pipeproc")
    if found and os.path.abspath(found) == os.path.abspath(script):
        return "pipeproc"
    rel = os.path.relpath(script)
    return rel if not rel.startswith("..") else script


def _location_option(location: Optional[str]) -> str:
    """`` --location DIR`` unless ``location`` is the default ``./pipeproc_data``."""
    if not location or os.path.abspath(location) == os.path.abspath("pipeproc_data"):
        return ""
    rel = os.path.relpath(location)
    return f" --location {location if rel.startswith('..') else rel}"
