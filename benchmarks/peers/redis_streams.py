"""Peer benchmark: workloads W1–W6 of /work/shared/BENCHMARKS.md against a local Redis server
(Redis Streams), so pipeproc can be compared with Redis on the same machine in the same hour.

Run from the repository root (/work/main):

    .venv/bin/python -m benchmarks.peers.redis_streams                 # full run, ~1 min on 2 cores
    .venv/bin/python -m benchmarks.peers.redis_streams --quick         # ~10x smaller smoke run
    .venv/bin/python -m benchmarks.peers.redis_streams --json /tmp/redis.json --reps 5

Needs ``redis-server`` (on PATH, or ``--redis-server PATH``); where it is missing the script
prints a skip message and exits 0. No redis-py and no other dependency: a minimal RESP2 client
(``Resp`` below: one socket, pipelined writes, a small reply parser) talks to the server over
its Unix socket, as pipeproc's clients talk to the node over a Unix socket.

Two configurations, each a fresh ``redis-server`` (started with command-line options, no
config file, no TCP port) in a fresh scratch directory under /tmp, always killed and removed:

- ``default``: Redis's built-in persistence defaults (RDB snapshots at the default save
  points, ``appendonly no``);
- ``always``: ``--appendonly yes --appendfsync always`` (every write fsynced before the reply).

How the workloads map onto Redis Streams (the log body ``{"i": n, "payload": "x" * 100}`` is
stored msgpack-encoded in one field, ``XADD s * d <msgpack>``, and decoded on every read —
pipeproc's cost: encode once, decode on read):

- W1: sequential ``XADD``, one client; the median of 5 rounds (commits/s) and the median
  latency, after 200 untimed warmup commits.
- W2: 100,000 entries in atomic batches of 1,000: ``MULTI`` + 1,000 ``XADD`` + ``EXEC`` sent
  as one pipelined write, as redis-py's transactional pipeline does (logs/s).
- W3: read the 100,000-entry W2 stream in pages of 1,000 with an exclusive start,
  ``XRANGE s (last-id + COUNT 1000``, decoding every body (logs/s; one untimed pass first).
- W4: a consumer group, ``XREADGROUP GROUP g c COUNT 1 STREAMS s >`` then ``XACK`` until
  nothing is left (cycles/s; 100 untimed warmup cycles). W4b: the same with ``COUNT 100``
  over the W2 stream (logs/s; 10 untimed warmup cycles).
- W5: stream ``a`` with 10,000 entries and 2 worker processes (``_redis_w5worker``) reading
  it through one consumer group (``COUNT 1``, and ``COUNT 100``); per read, the results
  ``{"n": i + 1}`` are added to ``b`` and the read entries acked in one ``MULTI``/``EXEC``.
  Timed from releasing the (connected, warm) workers until ``XLEN b`` reaches 10,000, polled
  every 5 ms (logs/s).
- W6: 4 client processes (``_redis_w6client``), 1,250 single ``XADD`` each, released
  together by a start barrier; total commits/s over [first start, last end].

Each workload runs ``--reps`` times (default 3); the median figure is reported, with every
repetition. ``--json OUT`` writes::

    {"redis_version": ..., "configs": {"default": {"W1": {"figure": ..., "reps": [...]}, ...},
                                       "always": {...}}, ...}

Background saves (RDB snapshots, AOF rewrites) are part of "default persistence": they fork
and compete for the CPU like any other process. The number of forks during each repetition
is kept in the JSON (``forks``) and flagged in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import msgpack

from .._common import load_line, body, cpu_report, cpu_snapshot, fmt_rate, fmt_us, machine, median, \
    percentile, scratch_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELD = b"d"  # the one field of every stream entry: the msgpack-encoded body

Arg = Union[bytes, str, int]


# --------------------------------------------------------------------------- RESP2 client

class RespError(Exception):
    """An error reply (``-ERR ...``) from the server."""


class RespProtocolError(Exception):
    """The server sent something that is not RESP2, or closed the connection."""


def pack(*args: Arg) -> bytes:
    """One command as a RESP2 array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Resp:
    """A minimal RESP2 client over a Unix socket.

    Replies: simple strings and bulk strings come back as ``bytes``, integers as ``int``,
    arrays as ``list`` (nested as sent), null bulk strings and null arrays as ``None``, error
    replies as ``RespError`` (raised by ``call``/``pipeline``; left in place inside an array,
    e.g. an ``EXEC`` result).

    Example::

        r = Resp("/tmp/x/redis.sock")
        assert r.call("PING") == b"PONG"
        r.close()
    """

    def __init__(self, path: str, connect_timeout: float = 5.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(connect_timeout)
            sock.connect(path)
            # Blocking from here on, as redis-py is by default (socket_timeout=None): a timeout
            # would add a poll() per read.
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._rfile = sock.makefile("rb", buffering=65536)
        self._readline = self._rfile.readline
        self._read = self._rfile.read

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._rfile.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> "Resp":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def read(self) -> Any:
        """Parse one reply (recursively for arrays)."""
        line = self._readline()
        if not line.endswith(b"\r\n"):
            raise RespProtocolError("redis closed the connection" if not line
                                    else f"truncated reply line {line[:80]!r}")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._read(n + 2)
            if len(data) != n + 2:
                raise RespProtocolError("redis closed the connection in a bulk string")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self.read() for _ in range(n)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        raise RespProtocolError(f"unknown reply type {line[:80]!r}")

    def call(self, *args: Arg) -> Any:
        """One command, one round trip; raises ``RespError`` on an error reply."""
        self._sock.sendall(pack(*args))
        reply = self.read()
        if isinstance(reply, RespError):
            raise reply
        return reply

    def pipeline(self, cmds: Sequence[Sequence[Arg]]) -> List[Any]:
        """All commands in one write, then all replies; raises the first error reply (after
        reading every reply, so the connection stays in step)."""
        self._sock.sendall(b"".join([pack(*c) for c in cmds]))
        replies = [self.read() for _ in cmds]
        for rep in replies:
            if isinstance(rep, RespError):
                raise rep
        return replies

    def transaction(self, cmds: Sequence[Sequence[Arg]]) -> List[Any]:
        """``MULTI`` + cmds + ``EXEC`` as one pipelined write (redis-py's
        ``pipeline(transaction=True)``); returns the ``EXEC`` results."""
        replies = self.pipeline([(b"MULTI",), *cmds, (b"EXEC",)])
        res = replies[-1]
        if res is None:
            raise RespError("EXEC: transaction aborted")
        for rep in res:
            if isinstance(rep, RespError):
                raise rep
        return res


# ---------------------------------------------------------------------- stream helpers

def xadd(stream: Arg, obj: Any) -> Tuple[Arg, ...]:
    """The XADD command storing ``obj`` msgpack-encoded in the entry's one field."""
    return (b"XADD", stream, b"*", FIELD, msgpack.packb(obj))


def decode_entries(entries: List[Any]) -> List[Tuple[bytes, Any]]:
    """``[[id, [field, value]], ...]`` (XRANGE / XREADGROUP) -> ``[(id, body), ...]``."""
    return [(eid, msgpack.unpackb(fields[1])) for eid, fields in entries]


def fill(r: Resp, stream: str, n: int, batch: int = 1000, start: int = 0) -> None:
    """Untimed set-up: ``n`` entries ``body(start..)`` in atomic batches."""
    for s in range(start, start + n, batch):
        r.transaction([xadd(stream, body(i)) for i in range(s, min(start + n, s + batch))])


def readgroup(r: Resp, stream: str, group: str, consumer: str,
              count: int) -> Optional[List[Tuple[bytes, Any]]]:
    """``XREADGROUP ... COUNT count STREAMS stream >`` decoded; None when nothing is left."""
    rep = r.call(b"XREADGROUP", b"GROUP", group, consumer, b"COUNT", count,
                 b"STREAMS", stream, b">")
    if not rep or not rep[0][1]:
        return None
    return decode_entries(rep[0][1])


# --------------------------------------------------------------------------- workloads

def w1(r: Resp, n: int, rounds: int = 5, warmup: int = 200) -> Dict[str, Any]:
    """Sequential single XADDs, one client: median round rate (commits/s), median latency."""
    for i in range(warmup):
        r.call(*xadd("w1warm", body(i)))
    per = max(1, n // rounds)
    rates: List[float] = []
    lat: List[float] = []
    call = r.call
    i = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per):
            t = time.perf_counter()
            call(*xadd("w1", body(i)))
            lat.append(time.perf_counter() - t)
            i += 1
        rates.append(per / (time.perf_counter() - t0))
    return {"figure": median(rates), "median_latency": median(lat),
            "p99_latency": percentile(lat, 99), "n": i}


def w2(r: Resp, n: int, stream: str, batch: int = 1000) -> Dict[str, Any]:
    """``n`` entries in atomic batches (MULTI + ``batch`` XADD + EXEC, one write): logs/s."""
    fill(r, "w2warm", 5 * batch, batch)
    lat: List[float] = []
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        items = [body(i) for i in range(s, min(n, s + batch))]
        t = time.perf_counter()
        ids = r.transaction([xadd(stream, b) for b in items])
        lat.append(time.perf_counter() - t)
        assert len(ids) == len(items)
    dt = time.perf_counter() - t0
    return {"figure": n / dt, "median_batch_latency": median(lat), "n": n}


def scan(r: Resp, stream: str, page: int = 1000) -> int:
    """Read ``stream`` in pages of ``page`` with an exclusive start; returns the count."""
    got = 0
    start: Optional[bytes] = None
    while True:
        if start is None:
            rep = r.call(b"XRANGE", stream, b"-", b"+", b"COUNT", page)
        else:
            rep = r.call(b"XRANGE", stream, b"(" + start, b"+", b"COUNT", page)
        if not rep:
            return got
        logs = decode_entries(rep)
        got += len(logs)
        start = logs[-1][0]


def w3(r: Resp, stream: str, n: int, page: int = 1000) -> Dict[str, Any]:
    """One paged read of an ``n``-entry stream: logs/s."""
    t0 = time.perf_counter()
    got = scan(r, stream, page)
    dt = time.perf_counter() - t0
    assert got == n, (got, n)
    return {"figure": got / dt, "n": got}


def w4(r: Resp, stream: str, group: str, count: int, warmup_cycles: int) -> Dict[str, Any]:
    """XREADGROUP (COUNT ``count``) then XACK until nothing is left: cycles/s (count=1) or
    logs/s. The group is created at the start of the stream; the first ``warmup_cycles``
    cycles are untimed."""
    r.call(b"XGROUP", b"CREATE", stream, group, b"0")
    consumer = "c1"

    def cycle() -> int:
        got = readgroup(r, stream, group, consumer, count)
        if got is None:
            return 0
        r.call(b"XACK", stream, group, *[eid for eid, _ in got])
        return len(got)

    for _ in range(warmup_cycles):
        assert cycle() > 0
    cycles = logs = 0
    t0 = time.perf_counter()
    while True:
        k = cycle()
        if not k:
            break
        cycles += 1
        logs += k
    dt = time.perf_counter() - t0
    pending = r.call(b"XPENDING", stream, group)[0]
    assert pending == 0, f"{pending} entries left unacked"
    fig = cycles / dt if count == 1 else logs / dt
    return {"figure": fig, "cycles": cycles, "logs": logs,
            "cycle_us": dt / max(cycles, 1) * 1e6}


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _spawn(module: str, args: Sequence[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=REPO, env=_child_env(), text=True)


def _await_ready(procs: List[subprocess.Popen], what: str) -> None:
    for p in procs:
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{what} failed to start (said {line!r})")


def _release(procs: List[subprocess.Popen]) -> None:
    """The start barrier: every child is connected and warm; release all."""
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def _results(procs: List[subprocess.Popen], what: str) -> List[Dict[str, Any]]:
    res = []
    for p in procs:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} died")
        res.append(json.loads(line))
    for p in procs:
        p.stdin.close()
        p.wait(60)
    return res


def _reap(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def w5(r: Resp, sock: str, n: int, count: int, suffix: str, timeout: float,
       workers: int = 2) -> Dict[str, Any]:
    """Stream ``a`` (``n`` entries) -> ``{"n": i + 1}`` -> stream ``b`` by ``workers``
    processes of one consumer group; time from releasing them until ``XLEN b`` reaches
    ``n``: logs/s."""
    src, dst, group = f"a{suffix}", f"b{suffix}", "w5"
    fill(r, src, n)
    r.call(b"XGROUP", b"CREATE", src, group, b"0")
    procs: List[subprocess.Popen] = []
    try:
        for w in range(workers):
            procs.append(_spawn("benchmarks.peers._redis_w5worker",
                                [sock, src, dst, group, f"w{w}", str(count)]))
        _await_ready(procs, "W5 worker")
        t0 = time.perf_counter()
        _release(procs)
        got = 0
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            got = r.call(b"XLEN", dst)
            if got >= n:
                break
            time.sleep(0.005)
        dt = time.perf_counter() - t0
        res = _results(procs, "W5 worker") if got >= n else []
    finally:
        _reap(procs)
    out: Dict[str, Any] = {"figure": got / dt, "n": got, "seconds": dt,
                           "per_worker": [x["processed"] for x in res]}
    if got < n:
        out["note"] = f"timeout: only {got}/{n} after {timeout:.0f} s"
    else:
        first = decode_entries(r.call(b"XRANGE", dst, b"-", b"+", b"COUNT", 1))[0][1]
        if not isinstance(first, dict) or "n" not in first:
            out["note"] = f"unexpected body in {dst}: {first!r}"
        if sum(out["per_worker"]) != n:
            out["note"] = f"the workers processed {out['per_worker']} entries, not {n}"
    return out


def w6(sock: str, n_each: int, stream: str, clients: int = 4) -> Dict[str, Any]:
    """``clients`` processes XADD ``n_each`` single entries each, released together by a
    start barrier; total commits/s over [first start, last end]."""
    procs: List[subprocess.Popen] = []
    try:
        for c in range(clients):
            procs.append(_spawn("benchmarks.peers._redis_w6client",
                                [sock, stream, str(n_each), str(c)]))
        _await_ready(procs, "W6 client")
        _release(procs)
        res = _results(procs, "W6 client")
    finally:
        _reap(procs)
    start = min(x["start"] for x in res)
    end = max(x["end"] for x in res)
    total = clients * n_each
    return {"figure": total / (end - start), "n": total, "seconds": end - start,
            "client_median_latency": median([x["median"] for x in res]),
            "start_skew": max(x["start"] for x in res) - start}


# ---------------------------------------------------------------------------- the server

CONFIGS: Dict[str, List[str]] = {
    "default": [],  # built-in defaults: RDB at the default save points, appendonly no
    "always": ["--appendonly", "yes", "--appendfsync", "always"],
}
LABELS = {"default": "Redis (default)", "always": "Redis (fsync always)"}


def find_redis_server(given: Optional[str]) -> Optional[str]:
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("redis-server") or \
        ("/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)


@contextlib.contextmanager
def redis_server(exe: str, config: str, start_timeout: float = 20.0) -> Iterator[str]:
    """A fresh ``redis-server`` in a fresh scratch dir under /tmp, listening only on a Unix
    socket there; yields the socket path once it answers PING. Always stopped (SHUTDOWN
    NOSAVE, then SIGKILL if need be) and its directory removed."""
    with scratch_dir("pipeproc-bench-redis-") as d:
        sock = os.path.join(d, "redis.sock")
        log = os.path.join(d, "redis.log")
        cmd = [exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
               "--dir", d, "--daemonize", "no", "--logfile", log, *CONFIGS[config]]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=d)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {proc.returncode}: "
                                       f"{_tail(log)}")
                try:
                    with Resp(sock) as r:
                        if r.call(b"PING") == b"PONG":
                            break
                except (OSError, RespError, RespProtocolError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING within "
                                       f"{start_timeout:.0f} s: {_tail(log)}")
                time.sleep(0.02)
            yield sock
        finally:
            if proc.poll() is None:
                with contextlib.suppress(OSError, RespError, RespProtocolError):
                    with Resp(sock) as r:
                        r.send(pack(b"SHUTDOWN", b"NOSAVE"))
                        with contextlib.suppress(RespProtocolError, OSError):
                            r.read()  # the server closes the connection as it exits
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-n:])
    except OSError:
        return "(no log)"


def info_field(r: Resp, section: str, key: str) -> str:
    text = r.call(b"INFO", section).decode()
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    return "?"


# ------------------------------------------------------------------------------ runner

ORDER = ["W1", "W2", "W3", "W4", "W4b", "W5 count=1", "W5 count=100", "W6"]
UNITS = {"W1": "commits/s", "W2": "logs/s", "W3": "logs/s", "W4": "cycles/s", "W4b": "logs/s",
         "W5 count=1": "logs/s", "W5 count=100": "logs/s", "W6": "commits/s"}


def record(r: Resp, results: Dict[str, Any], workload: str, config: str,
           fn: Callable[[int], Dict[str, Any]], reps: int) -> None:
    """Run ``fn(k)`` for k in range(reps); keep the median figure, every repetition's figure
    and details, and the number of server forks (background saves) during each. One failing
    workload is reported and does not stop the others."""
    print(f"  {workload:13s} {config:7s} ...", end="", flush=True, file=sys.stderr)
    t = time.perf_counter()
    runs: List[Dict[str, Any]] = []
    try:
        for k in range(reps):
            forks = int(info_field(r, "stats", "total_forks"))
            res = fn(k)
            res["forks"] = int(info_field(r, "stats", "total_forks")) - forks
            runs.append(res)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        runs.append({"figure": None, "note": f"error: {type(exc).__name__}: {exc}"[:200]})
    figs = [x["figure"] for x in runs if x.get("figure") is not None]
    notes = [x["note"] for x in runs if x.get("note")]
    forks = sum(x.get("forks", 0) for x in runs)
    if forks:
        notes.append(f"{forks} background save(s) (fork) during the timed repetitions")
    results[workload] = {"figure": median(figs) if figs else None, "reps": figs,
                         "unit": UNITS[workload], "runs": runs, "notes": notes}
    print(" " + ", ".join(fmt_rate(x) for x in figs) +
          f" ({time.perf_counter() - t:.1f} s)", file=sys.stderr)


def run_config(exe: str, config: str, quick: bool, reps: int) -> Tuple[str, Dict[str, Any]]:
    """Every workload against one fresh server; returns (redis version, results)."""
    s = 10 if quick else 1
    n_big = 100_000 // s
    results: Dict[str, Any] = {}
    with redis_server(exe, config) as sock, Resp(sock) as r:
        version = info_field(r, "server", "redis_version")
        print(f"redis {version} ({config}):", file=sys.stderr)
        durable = config == "always"
        n1 = (2000 if durable else 5000) // s
        record(r, results, "W1", config, lambda k: w1(r, n1), reps)
        record(r, results, "W2", config, lambda k: w2(r, n_big, f"w2r{k}"), reps)
        if results["W2"]["figure"] is None:
            fill(r, "w2r0", n_big)  # untimed set-up for W3 and W4b

        def w3k(k: int) -> Dict[str, Any]:
            if k == 0:
                assert scan(r, "w2r0") == n_big  # untimed warmup pass, checks the count
            return w3(r, "w2r0", n_big)
        record(r, results, "W3", config, w3k, reps)
        cycles = (1000 if durable else 3000) // s

        def w4k(k: int) -> Dict[str, Any]:
            fill(r, f"w4r{k}", cycles + 100)  # untimed set-up
            return w4(r, f"w4r{k}", f"w4p{k}", 1, 100)
        record(r, results, "W4", config, w4k, reps)
        record(r, results, "W4b", config, lambda k: w4(r, "w2r0", f"w4bp{k}", 100, 10), reps)
        for count in (1, 100):
            record(r, results, f"W5 count={count}", config,
                   lambda k: w5(r, sock, 10_000 // s, count, f"c{count}r{k}", 120.0), reps)
        record(r, results, "W6", config, lambda k: w6(sock, 1250 // s, f"w6r{k}"), reps)
    return version, results


def table(configs: Dict[str, Dict[str, Any]]) -> List[str]:
    names = list(configs)
    out = ["| workload | " + " | ".join(LABELS[c] for c in names) + " |",
           "|---|" + "---|" * len(names)]
    for w in ORDER:
        cells = []
        for c in names:
            x = configs[c].get(w)
            cells.append("n/a" if not x or x["figure"] is None else fmt_rate(x["figure"]))
        out.append(f"| {w} {UNITS[w]} | " + " | ".join(cells) + " |")
    out += ["", "| repetitions | " + " | ".join(LABELS[c] for c in names) + " |",
            "|---|" + "---|" * len(names)]
    for w in ORDER:
        cells = []
        for c in names:
            x = configs[c].get(w)
            cells.append(", ".join(fmt_rate(v) for v in x["reps"]) if x and x["reps"] else "—")
        out.append(f"| {w} | " + " | ".join(cells) + " |")
    notes = []
    for c in names:
        res = configs[c]
        w1r = res.get("W1", {}).get("runs") or []
        lats = [x["median_latency"] for x in w1r if x.get("median_latency") is not None]
        if lats:
            notes.append(f"- {LABELS[c]}: W1 median latency {fmt_us(median(lats))}")
        for w in ORDER:
            for note in (res.get(w) or {}).get("notes", []):
                notes.append(f"- {LABELS[c]}, {w}: {note}")
    if notes:
        out += ["", *notes]
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers.redis_streams",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~10x smaller sizes (smoke run)")
    ap.add_argument("--json", metavar="OUT", help="also write all figures as JSON to OUT")
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions per workload (the median is reported; default 3)")
    ap.add_argument("--redis-server", metavar="PATH",
                    help="the redis-server binary (default: redis-server on PATH)")
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    cmd = shlex.join([os.path.relpath(sys.executable, REPO)
                      if sys.executable.startswith(REPO + os.sep) else sys.executable,
                      "-m", "benchmarks.peers.redis_streams", *(argv if argv is not None
                                                                else sys.argv[1:])])
    exe = find_redis_server(a.redis_server)
    if exe is None:
        msg = "skipped: redis-server not found" + \
              (f" at {a.redis_server}" if a.redis_server else " (install Redis to run this peer)")
        print(msg)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"skipped": msg, "command": cmd}, f, indent=2)
        return 0

    t_start = time.perf_counter()
    snap0 = cpu_snapshot()
    info = machine()
    configs: Dict[str, Dict[str, Any]] = {}
    version = "?"
    for config in CONFIGS:
        version, configs[config] = run_config(exe, config, a.quick, a.reps)
    elapsed = time.perf_counter() - t_start
    load = cpu_report(snap0, cpu_snapshot())

    out = [f"# Redis Streams peer benchmark ({'quick' if a.quick else 'full'} run)", "",
           f"command: `{cmd}` (from /work/main)",
           f"machine: nproc {info['nproc']}, {info['cpu']}, Python {info['python']}, "
           f"msgpack {info['msgpack']}; {info['platform']}; {info['date']}; "
           f"redis-server {version} ({exe}), minimal RESP2 client over a Unix socket; "
           f"run took {elapsed:.0f} s",
           load_line(load, info['nproc']),
           f"median of {a.reps} repetition(s) per workload; default = built-in persistence "
           f"defaults (RDB save points, appendonly no); fsync always = "
           f"`--appendonly yes --appendfsync always`",
           ""]
    out += table(configs)
    print("\n".join(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"redis_version": version, "redis_server": exe, "command": cmd,
                       "quick": a.quick, "reps": a.reps, "machine": info, "seconds": elapsed,
                       "load": load, "configs": configs}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
