"""Issue 18 (SCALE.md §4): workloads W1–W6 on pipeproc's Redis backend beside raw Redis
Streams on the same server, in the same run: pipeproc's cost per operation as a ratio to
the raw equivalent at the same persistence (goal ≤ 1.3×).

Run from the repository root (/work/main):

    .venv/bin/python -m benchmarks.redis_backend                  # ~2 min on 2 cores
    .venv/bin/python -m benchmarks.redis_backend --quick          # ~10x smaller smoke run
    .venv/bin/python -m benchmarks.redis_backend --only W1,W5 --reps 3 --json /tmp/rb.json

``python -m benchmarks`` (``make bench``) runs it too (without ``--only``). Needs
``redis-server`` (on PATH, or ``--redis-server PATH``) and redis-py (``pipeproc[redis]``);
without either it prints why it is skipped and exits 0.

Two servers, each started by :func:`benchmarks.peers.redis_streams.redis_server` (a fresh
``redis-server`` on a Unix socket in a scratch directory, the peers' settings):

- ``always``: ``--appendonly yes --appendfsync always``; pipeproc with
  ``durability="full"`` (on Redis 7.0 that is exactly what "full" requires);
- ``default``: Redis's built-in persistence defaults (RDB save points, ``appendonly no``);
  pipeproc with ``durability="fast"``.

On each server, every workload runs ``--reps`` times per side (default 3), the two sides
alternating (raw, pipeproc, pipeproc, raw, ...), so both see the same server, disk and
machine load:

- raw: the peers' functions (:mod:`benchmarks.peers.redis_streams`: ``XADD``,
  ``MULTI``/``EXEC``, ``XRANGE``, ``XREADGROUP`` + ``XACK``, its W5 worker and W6 client
  processes) over its minimal RESP client;
- pipeproc: the suite's functions (:mod:`benchmarks.workloads`) over
  ``pipeproc.connect(redis="unix://<socket>", namespace="bench", durability=...)``; W5 over
  ``pipeproc.spawn(redis=..., workers=2, allow=["benchmarks.processors"])`` (the workers
  run only during W5: idle workers wake on every commit's doorbell), W6 with 4 client
  processes (this module's ``w6-client`` mode).

Each side's figure is the median of its repetitions; the ratio is raw rate / pipeproc rate
(pipeproc's cost per operation relative to raw; ≤ 1.3 is the goal). Next to it: the
redis-server's CPU per operation on each side (/proc, whole call including the warmup,
which both sides do alike) and, for the single-client rows, this process's CPU per
operation (the client side: RESP parser vs redis-py + pipeproc). ``--json OUT`` writes
everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import workloads as wl
from ._common import load_line, cpu_report, cpu_seconds, cpu_snapshot, fmt_rate, fmt_us, machine, median
from .peers import redis_streams as rs

REPO = rs.REPO
NAMESPACE = "bench"
#: (server configuration of the peers module, pipeproc durability on it)
CONFIGS: List[Tuple[str, str]] = [("always", "full"), ("default", "fast")]
ALL = ["W1", "W2", "W3", "W4", "W4b", "W5", "W6"]
ORDER = ["W1", "W2", "W3", "W4", "W4b", "W5 count=1", "W5 count=100", "W6"]
UNITS = rs.UNITS
GOAL = 1.3


def skip_reason(exe: Optional[str], given: Optional[str]) -> Optional[str]:
    """Why this benchmark cannot run here, or None."""
    if exe is None:
        return ("skipped: redis-server not found" +
                (f" at {given}" if given else " (install Redis to run the Redis backend "
                                              "benchmark)"))
    try:
        import redis  # noqa: F401
    except ImportError:
        return "skipped: redis-py is missing (pip install 'pipeproc[redis]')"
    return None


# ------------------------------------------------------------------------ one measurement

class Server:
    """The server under test: its socket, pid, a raw RESP connection."""

    def __init__(self, sock: str, r: rs.Resp) -> None:
        self.sock = sock
        self.r = r
        self.url = "unix://" + sock
        self.pid = int(rs.info_field(r, "server", "process_id"))
        self.version = rs.info_field(r, "server", "redis_version")

    def forks(self) -> int:
        return int(rs.info_field(self.r, "stats", "total_forks"))


def measured(srv: Server, fn: Callable[[], Dict[str, Any]], ops: Callable[[Dict[str, Any]], int],
             client: bool) -> Dict[str, Any]:
    """``fn()`` with the server's CPU (and this process's, when ``client``) per operation over
    the whole call, ``ops(result)`` operations in it, and the number of forks (background
    saves) during it."""
    f0 = srv.forks()
    s0, c0 = cpu_seconds(srv.pid), time.process_time()
    res = fn()
    s1, c1 = cpu_seconds(srv.pid), time.process_time()
    n = max(1, ops(res))
    res["server_cpu_us_per_op"] = (s1 - s0) / n * 1e6
    if client:
        res["client_cpu_us_per_op"] = (c1 - c0) / n * 1e6
    res["forks"] = srv.forks() - f0
    return res


def pair(results: Dict[str, Any], row: str, reps: int,
         raw: Callable[[int], Dict[str, Any]], pp: Callable[[int], Dict[str, Any]]) -> None:
    """``reps`` repetitions of each side, alternating (raw, pp, pp, raw, ...); a failing side
    is reported and does not stop the others."""
    print(f"  {row:22s} ...", end="", flush=True, file=sys.stderr)
    t = time.perf_counter()
    runs: Dict[str, List[Dict[str, Any]]] = {"raw": [], "pp": []}
    notes: List[str] = []
    for k in range(reps):
        order = [("raw", raw), ("pp", pp)]
        if k % 2:
            order.reverse()
        for side, fn in order:
            if runs[side] and runs[side][-1].get("figure") is None:
                continue  # this side failed already
            try:
                runs[side].append(fn(k))
            except Exception as exc:  # one broken side must not sink the run
                traceback.print_exc(file=sys.stderr)
                runs[side].append({"figure": None})
                notes.append(f"{side} error: {type(exc).__name__}: {exc}"[:200])
    out: Dict[str, Any] = {"notes": notes}
    for side in ("raw", "pp"):
        ok = [x for x in runs[side] if x.get("figure") is not None]
        out[side] = {
            "figure": median([x["figure"] for x in ok]) if ok else None,
            "reps": [x["figure"] for x in ok],
            "server_cpu_us_per_op": median([x["server_cpu_us_per_op"] for x in ok])
            if ok else None,
            "client_cpu_us_per_op": median([x["client_cpu_us_per_op"] for x in ok])
            if ok and all("client_cpu_us_per_op" in x for x in ok) else None,
            "runs": runs[side],
        }
        for x in ok:
            if x.get("note"):
                notes.append(f"{side}: {x['note']}")
        forks = sum(x.get("forks", 0) for x in runs[side])
        if forks:
            notes.append(f"{forks} background save(s) during the {side} repetitions")
    results[row] = out
    print(" raw " + ", ".join(fmt_rate(x) for x in out["raw"]["reps"]) +
          " | pipeproc " + ", ".join(fmt_rate(x) for x in out["pp"]["reps"]) +
          f" ({time.perf_counter() - t:.1f} s)", file=sys.stderr)


# --------------------------------------------------------------------------- the W6 client

def w6_client_main(argv: List[str]) -> None:
    """``python -m benchmarks.redis_backend w6-client URL NAMESPACE DURABILITY TOPIC N ID``:
    one W6 client process (the counterpart of ``peers/_redis_w6client``) over pipeproc's Redis
    backend; the common body is :func:`benchmarks._common.w6_client_run`."""
    import pipeproc
    from ._common import w6_client_run

    url, ns, dur, topic, n, cid = argv[0], argv[1], argv[2], argv[3], int(argv[4]), int(argv[5])
    pp = pipeproc.connect(redis=url, namespace=ns, durability=dur, timeout=30)
    try:
        w6_client_run(lambda t, b: pp.commit({"topic": t, "body": b}), topic, n, cid)
    finally:
        pp.close()


def pp_w6(url: str, dur: str, n_each: int, topic: str, clients: int = 4) -> Dict[str, Any]:
    """W6 over pipeproc's Redis backend: ``clients`` processes, ``n_each`` single commits
    each, released together; total commits/s over [first start, last end]."""
    procs = []
    try:
        for c in range(clients):
            procs.append(rs._spawn("benchmarks.redis_backend",
                                   ["w6-client", url, NAMESPACE, dur, topic, str(n_each),
                                    str(c)]))
        rs._await_ready(procs, "W6 client")
        rs._release(procs)
        res = rs._results(procs, "W6 client")
    finally:
        rs._reap(procs)
    start = min(x["start"] for x in res)
    end = max(x["end"] for x in res)
    total = clients * n_each
    return {"figure": total / (end - start), "n": total, "seconds": end - start,
            "client_median_latency": median([x["median"] for x in res])}


# ------------------------------------------------------------------------------ workloads

def raw_w3(r: rs.Resp, stream: str, n: int, rounds: int = 3) -> Dict[str, Any]:
    """W3 raw as the suite's w3 does it: one untimed pass, then the median of ``rounds``
    paged reads (each one ``rs.w3``)."""
    assert rs.scan(r, stream) == n
    return {"figure": median([rs.w3(r, stream, n)["figure"] for _ in range(rounds)])}


def run_config(exe: str, config: str, dur: str, quick: bool, reps: int,
               only: List[str]) -> Tuple[str, Dict[str, Any]]:
    """Every workload, both sides, on one fresh server; returns (redis version, results)."""
    import pipeproc

    s = 10 if quick else 1
    n_big = 100_000 // s
    durable = dur == "full"
    res: Dict[str, Any] = {}
    with rs.redis_server(exe, config) as sock, rs.Resp(sock) as r:
        srv = Server(sock, r)
        print(f"redis {srv.version} ({config}; pipeproc durability={dur!r}):", file=sys.stderr)
        pp = pipeproc.connect(redis=srv.url, namespace=NAMESPACE, durability=dur, timeout=30)
        try:
            if "W1" in only:
                n1 = (2000 if durable else 5000) // s
                pair(res, f"W1 {dur}", reps,
                     lambda k: measured(srv, lambda: rs.w1(r, n1), lambda x: x["n"] + 200, True),
                     lambda k: measured(srv, lambda: wl.w1(pp, n1), lambda x: x["n"] + 200, True))
            have_w2 = False
            if "W2" in only:
                pair(res, f"W2 {dur}", reps,
                     lambda k: measured(srv, lambda: rs.w2(r, n_big, f"w2r{k}"),
                                        lambda x: n_big + 5000, True),
                     lambda k: measured(srv, lambda: wl.w2(pp, n_big, topic=f"w2r{k}"),
                                        lambda x: n_big + 5000, True))
                have_w2 = bool(res[f"W2 {dur}"]["raw"]["reps"]) and \
                    bool(res[f"W2 {dur}"]["pp"]["reps"])
            if ("W3" in only or "W4b" in only) and not have_w2:
                rs.fill(r, "w2r0", n_big)  # untimed set-up
                wl.fill(pp, "w2r0", n_big)
            if "W3" in only:
                pair(res, f"W3 {dur}", reps,
                     lambda k: measured(srv, lambda: raw_w3(r, "w2r0", n_big),
                                        lambda x: 4 * n_big, True),
                     lambda k: measured(srv, lambda: wl.w3(pp, "w2r0", n_big),
                                        lambda x: 4 * n_big, True))
            if "W4" in only:
                cycles = (1000 if durable else 3000) // s

                def raw_w4(k: int) -> Dict[str, Any]:
                    rs.fill(r, f"w4r{k}", cycles + 100)  # untimed set-up
                    return measured(srv, lambda: rs.w4(r, f"w4r{k}", f"w4p{k}", 1, 100),
                                    lambda x: x["cycles"] + 100, True)

                def pp_w4(k: int) -> Dict[str, Any]:
                    wl.fill(pp, f"w4r{k}", cycles + 100)  # untimed set-up
                    return measured(srv, lambda: wl.w4(pp, f"w4r{k}", f"w4p{k}", 1, 100),
                                    lambda x: x["cycles"] + 100, True)
                pair(res, f"W4 {dur}", reps, raw_w4, pp_w4)
            if "W4b" in only:
                pair(res, f"W4b {dur}", reps,
                     lambda k: measured(srv, lambda: rs.w4(r, "w2r0", f"w4bp{k}", 100, 10),
                                        lambda x: x["logs"] + 1000, True),
                     lambda k: measured(srv, lambda: wl.w4(pp, "w2r0", f"w4bp{k}", 100, 10),
                                        lambda x: x["logs"] + 1000, True))
            if "W6" in only:
                n6 = 1250 // s
                pair(res, f"W6 {dur}", reps,
                     lambda k: measured(srv, lambda: rs.w6(sock, n6, f"w6r{k}"),
                                        lambda x: 4 * (n6 + 50), False),
                     lambda k: measured(srv, lambda: pp_w6(srv.url, dur, n6, f"w6r{k}"),
                                        lambda x: 4 * (n6 + 50), False))
        finally:
            pp.close()
        if "W5" in only:
            run_w5(srv, dur, n=10_000 // s, reps=reps, res=res)
    return srv.version, res


def run_w5(srv: Server, dur: str, n: int, reps: int, res: Dict[str, Any]) -> None:
    """W5 count=1 and count=100, raw (2 worker processes of one consumer group) beside
    pipeproc (a spawn with 2 workers, started for W5 only and shut down after)."""
    import pipeproc

    try:
        pp = pipeproc.spawn(redis=srv.url, namespace=NAMESPACE, workers=2, durability=dur,
                            allow=["benchmarks.processors"], timeout=60)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        for c in (1, 100):
            res[f"W5 count={c} {dur}"] = {
                "raw": {"figure": None, "reps": []}, "pp": {"figure": None, "reps": []},
                "notes": [f"pipeproc spawn(redis=, workers=2) failed: {exc}"[:200]]}
        return
    try:
        wl.w5_warmup(pp)
        for count in (1, 100):
            pair(res, f"W5 count={count} {dur}", reps,
                 lambda k: measured(srv, lambda: rs.w5(srv.r, srv.sock, n, count,
                                                       f"c{count}r{k}", 120.0),
                                    lambda x: n, False),
                 lambda k: measured(srv, lambda: wl.w5(pp, n, count, f"c{count}r{k}", 120.0),
                                    lambda x: n, False))
    finally:
        pp.shutdown()


# --------------------------------------------------------------------------------- report

def table(results: Dict[str, Any]) -> List[str]:
    """Rows in workload order, full before fast."""
    out = ["| row | raw Redis Streams | pipeproc on Redis | cost ratio raw/pipeproc "
           f"(goal ≤ {GOAL}) | redis-server CPU per op, raw → pipeproc | "
           "client CPU per op, raw → pipeproc | repetitions raw; pipeproc |",
           "|---|---|---|---|---|---|---|"]
    notes: List[str] = []

    def us(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{x:,.1f} µs"
    for w in ORDER:
        for _, dur in CONFIGS:
            row = f"{w} {dur}"
            x = results.get(row)
            if x is None:
                continue
            raw, pp = x["raw"], x["pp"]
            unit = UNITS[w]
            if raw["figure"] and pp["figure"]:
                ratio = raw["figure"] / pp["figure"]
                verdict = f"**{ratio:.2f}**" + (" ✓" if ratio <= GOAL else " ✗")
            else:
                verdict = "n/a"
            cli = (f"{us(raw.get('client_cpu_us_per_op'))} → {us(pp.get('client_cpu_us_per_op'))}"
                   if raw.get("client_cpu_us_per_op") is not None else "—")
            out.append(
                f"| {row} | {fmt_rate(raw['figure'])} {unit} | {fmt_rate(pp['figure'])} {unit} "
                f"| {verdict} | {us(raw.get('server_cpu_us_per_op'))} → "
                f"{us(pp.get('server_cpu_us_per_op'))} | {cli} | "
                f"{', '.join(fmt_rate(v) for v in raw['reps']) or '—'}; "
                f"{', '.join(fmt_rate(v) for v in pp['reps']) or '—'} |")
            for nt in x.get("notes", []):
                notes.append(f"- {row}: {nt}")
            for side, label in (("raw", "raw"), ("pp", "pipeproc")):
                lats = [y["median_latency"] for y in (x[side].get("runs") or [])
                        if y.get("median_latency") is not None]
                if lats and w == "W1":
                    notes.append(f"- {row}: {label} median commit latency {fmt_us(median(lats))}")
    return out + ([""] + notes if notes else [])


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["w6-client"]:
        w6_client_main(args[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.redis_backend", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~10x smaller sizes (smoke run)")
    ap.add_argument("--json", metavar="OUT", help="also write all figures as JSON to OUT")
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions per workload and side, alternating (default 3)")
    ap.add_argument("--only", metavar="W1,W5,...", help="run only these workloads")
    ap.add_argument("--redis-server", metavar="PATH",
                    help="the redis-server binary (default: redis-server on PATH)")
    a = ap.parse_args(args)
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    only = ALL if not a.only else [("W4b" if w.strip().lower() == "w4b" else w.strip().upper())
                                   for w in a.only.split(",") if w.strip()]
    bad = [w for w in only if w not in ALL]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {','.join(ALL)}")
    cmd = shlex.join([os.path.relpath(sys.executable, REPO)
                      if sys.executable.startswith(REPO + os.sep) else sys.executable,
                      "-m", "benchmarks.redis_backend", *args])
    exe = rs.find_redis_server(a.redis_server)
    why = skip_reason(exe, a.redis_server)
    if why is not None or exe is None:
        print(f"Redis backend benchmark (issue 18) {why}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"skipped": why, "command": cmd}, f, indent=2)
        return 0
    # the W5 workers (spawned by pipeproc's supervisor) import benchmarks.processors
    pp_path = os.environ.get("PYTHONPATH", "")
    if REPO not in pp_path.split(os.pathsep):
        os.environ["PYTHONPATH"] = REPO + (os.pathsep + pp_path if pp_path else "")

    t_start = time.perf_counter()
    snap0 = cpu_snapshot()
    info = machine()
    results: Dict[str, Any] = {}
    version = "?"
    for config, dur in CONFIGS:
        try:
            version, got = run_config(exe, config, dur, a.quick, a.reps, only)
            results.update(got)
        except Exception as exc:  # a server that would not start: report, go on
            traceback.print_exc(file=sys.stderr)
            print(f"  {config}: {type(exc).__name__}: {exc}", file=sys.stderr)
    elapsed = time.perf_counter() - t_start
    load = cpu_report(snap0, cpu_snapshot())
    out = [f"# Redis backend vs raw Redis Streams, same server, same run "
           f"({'quick' if a.quick else 'full'} run; issue 18)", "",
           f"command: `{cmd}` (from /work/main)",
           f"machine: nproc {info['nproc']}, {info['cpu']}, Python {info['python']}; "
           f"redis-server {version} ({exe}) on a Unix socket; pipeproc at git {info['git']}; "
           f"{info['date']}; run took {elapsed:.0f} s",
           load_line(load, info['nproc']),
           f"full = server `--appendonly yes --appendfsync always`, pipeproc "
           f"durability=\"full\"; fast = server persistence defaults (RDB save points, "
           f"appendonly no), pipeproc durability=\"fast\". Median of {a.reps} repetition(s) "
           f"per side, the sides alternating.", ""]
    out += table(results)
    print("\n".join(out))
    sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"redis_version": version, "redis_server": exe, "command": cmd,
                       "quick": a.quick, "reps": a.reps, "machine": info, "seconds": elapsed,
                       "load": load, "results": results}, f, indent=2, default=str)
    return 0


def suite(quick: bool) -> None:
    """Called by ``python -m benchmarks`` (``make bench``) after W1–W6 on the node: this
    benchmark with its own report on stdout (or the reason it is skipped); never raises."""
    print()
    sys.stdout.flush()
    try:
        main(["--quick"] if quick else [])
    except Exception:  # noqa: BLE001 - the suite goes on (the flow benchmarks follow)
        traceback.print_exc(file=sys.stderr)
        print("Redis backend benchmark (issue 18): failed, see stderr")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
