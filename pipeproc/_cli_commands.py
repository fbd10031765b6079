"""The ``pipeproc`` subcommands: one ``cmd_*`` function each, taking the parsed arguments
and returning the exit code; plus what they share (connecting, the busy-poll setting, the exit
codes and the usage error). The parser and ``main`` are :mod:`pipeproc.cli`; the text
formatting is :mod:`pipeproc._text`.

Client side. May import: the public API (``pipeproc``), ``_text``, ``errors`` and the
standard library; never a node-side module (``pipeproc check`` runs :mod:`pipeproc._check`
as a child process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable, List, Optional

import pipeproc

from ._text import dumps, human_ms, log_line, procs_table, stats_text, table
from .errors import InvalidArgument, NodeAlreadyActive, PipeProcError, from_code

# exit codes (see :mod:`pipeproc.cli`)
RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2
RET_CONNECT = 3

ENV_LOCATION = "PIPEPROC_LOCATION"
ENV_ADDRESS = "PIPEPROC_ADDRESS"
ENV_BUSY_POLL = "PIPEPROC_BUSY_POLL_US"
ENV_REDIS = "PIPEPROC_REDIS"
DEFAULT_LOCATION = "./pipeproc_data"
CONNECT_TIMEOUT = 2.0
COMMIT_BATCH = 1000

log = logging.getLogger("pipeproc.cli")


class UsageError(Exception):
    """Input the command line cannot use (exit code 2)."""


# --------------------------------------------------------------------------- helpers

def parse_address(text: Optional[str]) -> Any:
    """``"HOST:PORT"`` -> ``(host, port)``; anything else is a Unix socket path; None stays."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and "/" not in text:
        return (host, int(port))
    return text


def format_address(address: Any) -> str:
    """``(host, port)`` -> ``"host:port"``; a Unix socket path as is."""
    if isinstance(address, (tuple, list)):
        return f"{address[0]}:{address[1]}"
    return str(address)


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def busy_poll_setting() -> float:
    """Seconds of busy polling for ``spawn``/``connect`` (``busy_poll=``), from
    ``PIPEPROC_BUSY_POLL_US`` (µs; default 50; 0 turns it off; bounded to 10,000; a value
    that is not a number means the default). The library itself reads no environment."""
    raw = os.environ.get(ENV_BUSY_POLL, "50")
    try:
        us = float(raw)
    except ValueError:
        us = 50.0
    return max(0.0, min(us, 10_000.0)) / 1e6 if us == us else 0.0


def redis_url(args: argparse.Namespace) -> Optional[str]:
    """The Redis URL: from ``--redis-file`` or env ``PIPEPROC_REDIS`` (never argv, so the
    password never shows in a process list), or ``None`` for a node."""
    path = getattr(args, "redis_file", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                url = f.read().strip()
        except (OSError, ValueError) as exc:  # the path is not echoed: it may be a URL
            raise UsageError(f"--redis-file: cannot read the file given "
                             f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        if not url:
            raise UsageError("--redis-file: the file given is empty")
        return url
    url = os.environ.get(ENV_REDIS, "").strip()
    if url:
        return url
    if getattr(args, "namespace", None):
        raise UsageError(f"--namespace is for Redis: set {ENV_REDIS} or pass --redis-file")
    return None


def connect(args: argparse.Namespace) -> Any:
    """Connect to the node named by --location / --address (key read from the location),
    or to a Redis namespace (``PIPEPROC_REDIS`` / ``--redis-file`` and ``--namespace``)."""
    url = redis_url(args)
    if url is not None:
        return pipeproc.connect(redis=url, namespace="pipeproc" if args.namespace is None else args.namespace,
                                timeout=args.timeout)
    if args.address:
        key = os.path.join(os.path.abspath(args.location), "node.key")
        if not os.path.exists(key):
            raise UsageError(
                f"--address {args.address} needs the node's key, which is read from the node's "
                f"directory: {key} does not exist; pass --location DIR (or set "
                f"{ENV_LOCATION}) with the directory the node runs on (it holds node.key)")
    return pipeproc.connect(args.location, address=parse_address(args.address),
                            timeout=args.timeout, busy_poll=busy_poll_setting())


class _Stop(Exception):
    """Raised in the main thread by the SIGTERM handler so ``finally`` blocks run."""


def _raise_stop(*_: Any) -> None:
    raise _Stop()


# --------------------------------------------------------------------------- node

def cmd_node(args: argparse.Namespace) -> int:
    level = "DEBUG" if args.verbose else "INFO"
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    pp = pipeproc.spawn(args.location, workers=args.workers, gc=bool(args.gc),
                        address=parse_address(args.address), memory=args.memory,
                        durability=args.durability, log_level=level,
                        busy_poll=busy_poll_setting())
    try:
        log.info("node ready: location=%s address=%s workers=%d gc=%s durability=%s%s",
                 os.path.abspath(args.location), format_address(pp.address), args.workers,
                 "on" if args.gc else "off", args.durability, " memory" if args.memory else "")
        log.info("stop with Ctrl-C or SIGTERM")
        proc = getattr(pp, "_process", None)
        while not stop.wait(0.5):
            if proc is not None and proc.poll() is not None:
                log.error("the node process exited unexpectedly (code %s)", proc.returncode)
                return RET_ERROR
        log.info("stopping")
    finally:
        pp.shutdown()
    log.info("stopped")
    return RET_OK


# --------------------------------------------------------------------------- commit

def _parse_body(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where} is not JSON: {exc}") from None


def cmd_commit(args: argparse.Namespace) -> int:
    if args.bodies:
        bodies = [_parse_body(b, f"argument {i + 1}") for i, b in enumerate(args.bodies)]
        batches: Iterable[List[Any]] = [bodies]
    else:
        if sys.stdin.isatty():
            print("reading JSON lines from stdin (Ctrl-D to end)", file=sys.stderr)
        batches = _stdin_batches(args.batch)
    with connect(args) as pp:
        total: List[str] = []
        for bodies in batches:
            if not bodies:
                continue
            ids = pp.commit([{"topic": args.topic, "body": b} for b in bodies])
            if args.json:
                total.extend(ids)
            else:
                out("\n".join(ids))
        if args.json:
            out(dumps({"topic": args.topic, "ids": total}))
    return RET_OK


def _stdin_batches(size: int) -> Iterable[List[Any]]:
    batch: List[Any] = []
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        batch.append(_parse_body(line, f"stdin line {n}"))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- reads

def cmd_range(args: argparse.Namespace) -> int:
    with connect(args) as pp:
        n = 0
        for lg in pp.iter_range(args.topic, args.start, args.end, args.limit, args.exclusive,
                                reverse=args.rev, page_size=1000):
            out(log_line(lg, args.json))
            n += 1
        if not args.json and sys.stdout.isatty() and n == 0:
            print("(no logs)", file=sys.stderr)
    return RET_OK


def cmd_tail(args: argparse.Namespace) -> int:
    with connect(args) as pp:
        live = None
        if args.follow:
            # The live proc is created first ("$>": logs committed after this call), then
            # the last N logs are read; a log in both is printed once (by sequence).
            live = pp.live_proc(args.topic, mode="live", count=100)
        try:
            last_seq = -1
            try:
                recent = pp.revrange(args.topic, limit=args.n) if args.n > 0 else []
            except PipeProcError as exc:
                if not (args.follow and exc.code == "invalid_topic"):
                    raise
                recent = []
            for lg in reversed(recent):
                out(log_line(lg, args.json))
                last_seq = int(lg.id.rsplit("-", 1)[1])
            sys.stdout.flush()
            if live is None:
                return RET_OK
            signal.signal(signal.SIGTERM, _raise_stop)
            for logs in live:
                batch = logs if isinstance(logs, list) else [logs]
                for lg in batch:
                    if int(lg.id.rsplit("-", 1)[1]) > last_seq:
                        out(log_line(lg, args.json))
                sys.stdout.flush()
                live.ack()
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            if live is not None:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                try:
                    live.cancel()
                except PipeProcError:
                    pass
    return RET_OK


def cmd_length(args: argparse.Namespace) -> int:
    with connect(args) as pp:
        n = pp.length(args.topic)
    out(dumps({"topic": args.topic, "length": n}) if args.json else str(n))
    return RET_OK


def cmd_topics(args: argparse.Namespace) -> int:
    with connect(args) as pp:
        names = pp.topics()
        info = pp.stats().get("topics", {})
    rows = [{"name": t, "length": info.get(t, {}).get("length"),
             "stored": info.get(t, {}).get("stored")} for t in names]
    if args.json:
        out(dumps(rows))
    else:
        out(table(["TOPIC", "LENGTH", "STORED"],
                  [[r["name"], r["length"], r["stored"]] for r in rows], right=(1, 2)))
        if not rows:
            out("(no topics)")
    return RET_OK


# --------------------------------------------------------------------------- procs

def cmd_procs(args: argparse.Namespace) -> int:
    with connect(args) as pp:
        procs = pp.stats().get("procs", {})
    if args.json:
        out(dumps(procs))
    else:
        out(procs_table(procs))
        if not procs:
            out("(no procs)")
    return RET_OK


def print_state(state: Any, as_json: bool) -> None:
    d = state._asdict()
    if as_json:
        out(dumps(d))
        return
    for k, v in d.items():
        if k == "last_error":
            continue
        if k.endswith("_at"):
            v = f"{v} ({human_ms(v)})" if v else "0 (never)"
        elif v == "":
            v = "-"
        out(f"{k + ':':<25} {v}")
    err = d.get("last_error")
    if not isinstance(err, dict):
        out(f"{'last_error:':<25} -")
        return
    at = err.get("at") or 0
    out(f"{'last_error:':<25} {err.get('type')}: {err.get('message')}")
    out(f"{'  on logs:':<25} {err.get('range') or '-'}")
    out(f"{'  at:':<25} {at} ({human_ms(at)})" if at else f"{'  at:':<25} -")
    if err.get("traceback"):
        out("  traceback:")
        for line in str(err["traceback"]).rstrip().splitlines():
            out(f"    {line}")


def cmd_inspect(args: argparse.Namespace) -> int:
    with connect(args) as pp:
        print_state(pp.inspect_proc(args.proc), args.json)
    return RET_OK


def cmd_proc_action(args: argparse.Namespace) -> int:
    with connect(args) as pp:
        if args.command == "reclaim":
            restored = pp.reclaim(args.proc)
            out(dumps({"proc": args.proc, "last_acked_range": restored}) if args.json
                else (restored or "(never acked)"))
            return RET_OK
        fn: Callable[[str], Any] = {"disable": pp.disable_proc, "resume": pp.resume_proc,
                                    "destroy": pp.destroy_proc}[args.command]
        state = fn(args.proc)
        if not args.json:
            done = {"disable": "disabled", "resume": "resumed",
                    "destroy": "destroyed (with its system proc, if any); its last state:"}
            out(f"proc {args.proc} {done[args.command]}")
        print_state(state, args.json)
    return RET_OK


# --------------------------------------------------------------------------- stats and check

def cmd_stats(args: argparse.Namespace) -> int:
    with connect(args) as pp:
        if not args.watch:
            st = pp.stats()
            out(dumps(st) if args.json else stats_text(st))
            return RET_OK
        signal.signal(signal.SIGTERM, _raise_stop)
        tty = sys.stdout.isatty() and not args.json
        try:
            while True:
                st = pp.stats()
                if args.json:
                    out(dumps(st))
                elif tty:
                    sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ")
                                     + f"every {args.watch:g} s (Ctrl-C to stop)\n\n")
                    out(stats_text(st))
                else:
                    out(f"--- {time.strftime('%H:%M:%S')}")
                    out(stats_text(st))
                sys.stdout.flush()
                time.sleep(args.watch)
        except (KeyboardInterrupt, _Stop):
            return RET_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Verify the store at --location (no node running): exit 0 "ok", 1 on damage.

    The check is node-side code (:mod:`pipeproc._check`): it runs as a child process,
    ``python -m pipeproc._check --location DIR``, which prints its report (or the error that
    refused it) as JSON; this renders it."""
    proc = subprocess.run([sys.executable, "-m", "pipeproc._check", "--location", args.location],
                          capture_output=True, text=True)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        print(f"pipeproc check: the check failed (exit {proc.returncode})", file=sys.stderr)
        return RET_ERROR
    if "error" in report:
        exc = from_code(report["error"], report.get("message", ""))
        if not isinstance(exc, (NodeAlreadyActive, InvalidArgument)):
            raise exc
        report_error(args, exc)
        return RET_USAGE
    if args.json:
        out(dumps(report))
    elif report["ok"]:
        out(f"ok: {report['topics']} topics, {report['logs']} logs "
            f"({report['unchecked_logs']} without checksum, written by format 2), "
            f"{report['procs']} procs, {report['system_procs']} system procs"
            + (f", {report['runs']} workflow runs" if report.get("runs") else ""))
    else:
        for line in report["listed"]:
            out(f"damaged: {line}")
        more = report["problems"] - len(report["listed"])
        out(f"{report['problems']} problems found" + (f" ({more} not listed)" if more else "")
            + f" in {args.location}")
    return RET_OK if report["ok"] else RET_ERROR


def report_error(args: argparse.Namespace, exc: PipeProcError) -> None:
    """Print a refused operation on stderr (JSON with --json)."""
    if getattr(args, "json", False):
        print(dumps({"error": exc.code, "message": exc.message}), file=sys.stderr)
    else:
        print(f"pipeproc {args.command}: {exc}", file=sys.stderr)
