"""Shared helpers of the benchmark scripts (scratch dirs, nodes, /proc readings, stats).

Not run directly; see `.venv/bin/python -m benchmarks --help`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, List, Optional

PAYLOAD = "x" * 100


def body(n: int) -> dict:
    return {"i": n, "payload": PAYLOAD}


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: List[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


@contextlib.contextmanager
def scratch_dir(prefix: str = "pipeproc-bench-") -> Iterator[str]:
    """A fresh directory under /tmp (never inside the repository), removed afterwards."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def w6_client_run(write: Callable[[str, dict], Any], topic: str, n: int, cid: int) -> None:
    """The body of a W6 client process (``_w6client``, ``peers/_redis_w6client``): 50
    untimed warmup writes to ``w6warm``, ``ready`` on stdout, wait for ``go`` on stdin (the
    common start barrier), then ``n`` single writes to ``topic``, one round trip each, and
    one JSON line: start/end (time.monotonic, a system-wide clock on Linux) and the median
    write latency."""
    import json

    for i in range(50):
        write("w6warm", body(i))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        return
    lat = []
    base = cid * n
    start = time.monotonic()
    for i in range(n):
        t = time.perf_counter()
        write(topic, body(base + i))
        lat.append(time.perf_counter() - t)
    end = time.monotonic()
    sys.stdout.write(json.dumps({"start": start, "end": end, "median": median(lat)}) + "\n")
    sys.stdout.flush()


def rss_anon_kb(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / _CLK


def node_pid(pp: Any) -> int:
    return int(pp.stats()["node"]["pid"])


def worker_pids(pp: Any) -> List[int]:
    return [int(w["pid"]) for w in pp.stats().get("workers", [])]


class Node:
    """A spawned node in its own scratch directory; always shut down by ``close``."""

    def __init__(self, label: str, *, durability: str, workers: int = 0, **kw: Any) -> None:
        import pipeproc
        self.label = label
        self.dir = tempfile.mkdtemp(prefix=f"pipeproc-bench-{label}-", dir="/tmp")
        self.pp = None
        try:
            self.pp = pipeproc.spawn(os.path.join(self.dir, "store"), workers=workers,
                                     durability=durability, **kw)
            self.pid = node_pid(self.pp)
        except BaseException:
            self.close()
            raise
        self.rss_kb: Optional[int] = None

    def sample_rss(self) -> Optional[int]:
        self.rss_kb = rss_anon_kb(self.pid)
        return self.rss_kb

    def close(self) -> None:
        try:
            if self.pp is not None:
                self.pp.shutdown()
        finally:
            self.pp = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Node":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_until(pred, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def machine() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import lmdb
    import msgpack
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "pipeproc"], cwd=repo,
                               text=True, capture_output=True, timeout=10).stdout.strip()
        git = head + (" + uncommitted changes in pipeproc/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        git = "?"
    return {
        "git": git,
        "nproc": os.cpu_count(), "cpu": model, "python": sys.version.split()[0],
        "platform": platform.platform(), "lmdb": lmdb.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def fmt_rate(x: Optional[float]) -> str:
    if x is None or x != x:
        return "n/a"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:,.1f}"


def fmt_us(s: Optional[float]) -> str:
    if s is None or s != s:
        return "n/a"
    return f"{s * 1e6:,.0f} µs" if s < 0.01 else f"{s * 1e3:,.1f} ms"


def cpu_snapshot() -> dict:
    """Machine-wide busy/total jiffies (/proc/stat) and this process tree's CPU seconds."""
    import resource
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    steal = v[7] if len(v) > 7 else 0
    ru_s = resource.getrusage(resource.RUSAGE_SELF)
    ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"total": sum(v[:8]), "busy": sum(v[:8]) - idle, "steal": steal,
            "mine": ru_s.ru_utime + ru_s.ru_stime + ru_c.ru_utime + ru_c.ru_stime,
            "t": time.monotonic()}


def cpu_report(a: dict, b: dict) -> dict:
    """Machine load between two snapshots, in cores (of ``os.cpu_count()``)."""
    wall = b["t"] - a["t"]
    ncpu = os.cpu_count() or 1
    total = b["total"] - a["total"] or 1
    busy_cores = (b["busy"] - a["busy"]) / total * ncpu
    mine = (b["mine"] - a["mine"]) / wall
    return {"wall_s": wall, "busy_cores": busy_cores, "this_run_cores": mine,
            "other_cores": max(0.0, busy_cores - mine),
            "steal_cores": (b["steal"] - a["steal"]) / total * ncpu}


def load_line(load: dict, nproc: Any) -> str:
    """The report's line on the machine's load during the run (:func:`cpu_report`)."""
    return (f"machine load during the run: {load['busy_cores']:.2f} of {nproc} cores "
            f"busy on average, this run's processes {load['this_run_cores']:.2f}, "
            f"other processes ~{load['other_cores']:.2f}, steal {load['steal_cores']:.2f}")


class Meter:
    """CPU used by the node (and its workers) and by this process over timed regions.

    ``start()`` / ``stop(ops)`` may be called several times (W1's rounds); ``result()`` gives
    µs of CPU per operation. /proc times tick at 1/CLK_TCK s (10 ms): short regions are coarse.
    """

    def __init__(self, node_pid: int, workers: Optional[List[int]] = None) -> None:
        self.node_pid = node_pid
        self.workers = list(workers or [])
        self.node = self.work = self.client = self.wall = 0.0
        self.ops = 0
        self._a: Optional[tuple] = None

    def _read(self) -> tuple:
        w = 0.0
        for p in self.workers:
            try:
                w += cpu_seconds(p)
            except OSError:
                pass
        return cpu_seconds(self.node_pid), w, time.process_time(), time.perf_counter()

    def start(self) -> None:
        self._a = self._read()

    def stop(self, ops: int) -> None:
        b = self._read()
        a = self._a
        assert a is not None
        self.node += b[0] - a[0]
        self.work += b[1] - a[1]
        self.client += b[2] - a[2]
        self.wall += b[3] - a[3]
        self.ops += ops
        self._a = None

    def result(self, client: bool = True) -> dict:
        n = max(self.ops, 1)
        out = {"node_cpu_us_per_op": self.node / n * 1e6,
               "node_cpu_util": self.node / self.wall if self.wall else None}
        if self.workers:
            out["worker_cpu_us_per_op"] = self.work / n * 1e6
        if client:
            out["client_cpu_us_per_op"] = self.client / n * 1e6
        return out
