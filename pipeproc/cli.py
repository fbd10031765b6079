"""The ``pipeproc`` command line: run a node, commit, read, follow and manage procs.

Every subcommand is a thin shell over the public client (:func:`pipeproc.connect`,
:func:`pipeproc.spawn`); nothing here touches the store but ``check``, which reads it
with no node running (:mod:`pipeproc._check`). Logging is configured here and only
here (the library never configures logging itself).

Exit codes (named like dramatiq's ``RET_*``):

======  ==============  ==========================================================
code    name            meaning
======  ==============  ==========================================================
0       ``RET_OK``       success
1       ``RET_ERROR``    pipeproc refused the operation (any ``PipeProcError`` other
                         than the connection ones), or the demo pipeline failed
2       ``RET_USAGE``    bad command line (argparse) or input that is not JSON
3       ``RET_CONNECT``  no node at the location / address, wrong key, node went away
======  ==============  ==========================================================
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from . import __version__
from ._text import human_bytes, table
from .errors import (
    AuthFailed,
    ConnectionLost,
    InvalidArgument,
    NoActiveNode,
    NodeAlreadyActive,
    PipeProcError,
)

RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2
RET_CONNECT = 3

ENV_LOCATION = "PIPEPROC_LOCATION"
ENV_ADDRESS = "PIPEPROC_ADDRESS"
ENV_BUSY_POLL = "PIPEPROC_BUSY_POLL_US"
DEFAULT_LOCATION = "./pipeproc_data"
CONNECT_TIMEOUT = 2.0
COMMIT_BATCH = 1000

log = logging.getLogger("pipeproc.cli")

EPILOG = """\
examples:
  # run a node in the foreground (Ctrl-C or SIGTERM stops it)
  pipeproc node --location ./pipeproc_data --workers 2 --gc

  # commit two logs atomically, then a file of JSON lines (one log per line)
  pipeproc commit events '{"user": "ann"}' '{"user": "bob"}'
  pipeproc commit events < events.jsonl

  # read them back
  pipeproc range events --limit 10
  pipeproc range events --start :100 --end :199 --json
  pipeproc tail events -n 5 -f

  # look at topics, procs and the node
  pipeproc topics
  pipeproc procs
  pipeproc inspect my-proc --json
  pipeproc resume my-proc
  pipeproc stats --watch 2

  # verify the store (every record's checksum, the proc records) with no node running
  pipeproc check --location ./pipeproc_data

  # the demo pipeline (what `make demo` runs)
  pipeproc demo --logs 20000

environment:
  PIPEPROC_LOCATION  default for --location (otherwise ./pipeproc_data)
  PIPEPROC_ADDRESS   default for --address (HOST:PORT for TCP, or a Unix socket path)
  PIPEPROC_BUSY_POLL_US  busy polling in µs for the node and the client (default 50; 0: off)

exit codes:
  0  ok
  1  pipeproc error (the node refused the operation; the message names the error code)
  2  usage error (bad arguments, input that is not JSON)
  3  no node at the location / address, wrong key, or the node went away
"""


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


def _jsonable(value: Any) -> Any:
    """Bodies may hold bytes; JSON output carries them as base64 strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dumps(value: Any, *, indent: Optional[int] = None) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False, indent=indent,
                      separators=None if indent else (",", ":"))


def log_obj(lg: Any) -> dict:
    """A Log as a JSON object; a bytes body is base64 and flagged with ``encoding``."""
    out = {"id": lg.id, "body": _jsonable(lg.body)}
    if isinstance(lg.body, (bytes, bytearray)):
        out["encoding"] = "base64"
    return out


BODY_WIDTH = 200  # characters of a body shown by range/tail without --json


def shorten(text: str, width: int = BODY_WIDTH) -> str:
    """``text`` cut to ``width`` characters with an ellipsis and the full size."""
    if len(text) <= width:
        return text
    return f"{text[:width]}… ({len(text)} chars; --json for all)"


def log_line(lg: Any, as_json: bool) -> str:
    """One log per line: JSON (complete), or ``ID<TAB>body`` with a long body shortened."""
    if as_json:
        return dumps(log_obj(lg))
    if isinstance(lg.body, (bytes, bytearray)):
        return f"{lg.id}\t{shorten('base64:' + base64.b64encode(bytes(lg.body)).decode('ascii'))}"
    return f"{lg.id}\t{shorten(dumps(lg.body))}"


def human_ms(ms: int) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _busy_poll_setting() -> float:
    """Seconds of busy polling for ``spawn``/``connect`` (``busy_poll=``), from
    ``PIPEPROC_BUSY_POLL_US`` (µs; default 50; 0 turns it off; bounded to 10,000; a value
    that is not a number means the default). The library itself reads no environment."""
    raw = os.environ.get(ENV_BUSY_POLL, "50")
    try:
        us = float(raw)
    except ValueError:
        us = 50.0
    return max(0.0, min(us, 10_000.0)) / 1e6 if us == us else 0.0


def connect(args: argparse.Namespace) -> Any:
    """Connect to the node named by --location / --address (key read from the location)."""
    import pipeproc
    if args.address:
        key = os.path.join(os.path.abspath(args.location), "node.key")
        if not os.path.exists(key):
            raise UsageError(
                f"--address {args.address} needs the node's key, which is read from the node's "
                f"directory: {key} does not exist; pass --location DIR (or set "
                f"{ENV_LOCATION}) with the directory the node runs on (it holds node.key)")
    return pipeproc.connect(args.location, address=parse_address(args.address),
                            timeout=args.timeout, busy_poll=_busy_poll_setting())


class _Stop(Exception):
    """Raised in the main thread by the SIGTERM handler so ``finally`` blocks run."""


def _raise_stop(*_: Any) -> None:
    raise _Stop()


# --------------------------------------------------------------------------- node

def cmd_node(args: argparse.Namespace) -> int:
    import pipeproc
    level = "DEBUG" if args.verbose else "INFO"
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    pp = pipeproc.spawn(args.location, workers=args.workers, gc=bool(args.gc),
                        address=parse_address(args.address), memory=args.memory,
                        durability=args.durability, log_level=level,
                        busy_poll=_busy_poll_setting())
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


def short_error(err: Any, width: int = 48) -> str:
    """A proc's ``last_error`` in one short cell: ``Type: message`` truncated, or ``-``."""
    if not isinstance(err, dict):
        return "-"
    text = f"{err.get('type')}: {err.get('message')}".replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def procs_table(procs: Dict[str, dict]) -> str:
    rows = [[name, p.get("topic"), p.get("status"), p.get("pending") or "-",
             p.get("reclaims"), p.get("lag"), short_error(p.get("last_error"))]
            for name, p in sorted(procs.items())]
    return table(["NAME", "TOPIC", "STATUS", "PENDING CLAIM", "RECLAIMS", "LAG", "LAST ERROR"],
                 rows, right=(4, 5))


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


def _print_state(state: Any, as_json: bool) -> None:
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
        _print_state(pp.inspect_proc(args.proc), args.json)
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
        _print_state(state, args.json)
    return RET_OK


def stats_text(st: dict) -> str:
    node = st.get("node", {})
    lines = [
        f"node      pid {node.get('pid')}  up {node.get('uptime', 0):.0f} s  "
        f"durability {node.get('durability', '?')}  "
        f"store {human_bytes(node.get('store_bytes', 0))}"
        + ("  (memory)" if node.get("memory") else "")
        + f"  connections {node.get('connections', '?')}",
        f"location  {node.get('location')}",
    ]
    workers = st.get("workers", [])
    lines.append("")
    if workers:
        lines.append(table(["WORKER PID", "EXECUTIONS", "FAILURES"],
                           [[w.get("pid"), w.get("executions"), w.get("failures")] for w in workers],
                           right=(1, 2)))
    else:
        lines.append("(no workers)")
    topics = st.get("topics", {})
    if topics:
        lines.append("")
        lines.append(table(["TOPIC", "LENGTH", "STORED"],
                           [[t, v.get("length"), v.get("stored")] for t, v in sorted(topics.items())],
                           right=(1, 2)))
    procs = st.get("procs", {})
    if procs:
        lines.append("")
        lines.append(procs_table(procs))
    return "\n".join(lines)


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
    """Verify the store at --location (no node running): exit 0 "ok", 1 on damage."""
    from ._check import check_location  # node-side: only for this command, lazily
    try:
        report = check_location(args.location)
    except (NodeAlreadyActive, InvalidArgument) as exc:
        _report(args, exc)
        return RET_USAGE
    if args.json:
        out(dumps(report))
    elif report["ok"]:
        out(f"ok: {report['topics']} topics, {report['logs']} logs "
            f"({report['unchecked_logs']} without checksum, written by format 2), "
            f"{report['procs']} procs, {report['system_procs']} system procs")
    else:
        for line in report["listed"]:
            out(f"damaged: {line}")
        more = report["problems"] - len(report["listed"])
        out(f"{report['problems']} problems found" + (f" ({more} not listed)" if more else "")
            + f" in {args.location}")
    return RET_OK if report["ok"] else RET_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo
    return _demo.run(logs=args.logs, location=args.location, workers=args.workers,
                     batch=args.batch, durability=args.durability,
                     busy_poll=_busy_poll_setting())


# --------------------------------------------------------------------------- parser

def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return v


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (global options are accepted before or after the subcommand)."""
    def common(suppress: bool) -> argparse.ArgumentParser:
        d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
        p = argparse.ArgumentParser(add_help=False)
        g = p.add_argument_group("connection")
        g.add_argument("--location", "-l", metavar="DIR",
                       default=d(os.environ.get(ENV_LOCATION) or DEFAULT_LOCATION),
                       help=f"the node's directory (env {ENV_LOCATION}; default {DEFAULT_LOCATION})")
        g.add_argument("--address", "-a", metavar="HOST:PORT",
                       default=d(os.environ.get(ENV_ADDRESS) or None),
                       help=f"TCP HOST:PORT or Unix socket path of the node (env {ENV_ADDRESS}); "
                            "the key is still read from --location")
        g.add_argument("--timeout", type=float, metavar="SECONDS", default=d(CONNECT_TIMEOUT),
                       help=f"how long to try to connect (default {CONNECT_TIMEOUT})")
        g.add_argument("--json", action="store_true", default=d(False),
                       help="machine-readable JSON output")
        g.add_argument("--verbose", "-v", action="store_true", default=d(False),
                       help="debug logging on stderr")
        return p

    parser = argparse.ArgumentParser(
        prog="pipeproc", parents=[common(False)],
        description="pipeproc: an embedded, multi-process commit-log processor.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pipeproc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parent = [common(True)]

    def add(name: str, help: str, fn: Callable, examples: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=parent,
                           epilog=("examples:\n" + examples) if examples else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn, parser=p)
        return p

    p = add("node", "run a node in the foreground until Ctrl-C / SIGTERM", cmd_node,
            "  pipeproc node --location ./data --workers 4 --gc\n"
            "  pipeproc node --address 127.0.0.1:7070 --durability fast\n")
    p.add_argument("--workers", "-w", type=_nonneg_int, default=1,
                   help="worker processes running system procs (default 1; 0: none)")
    p.add_argument("--gc", action="store_true", help="enable the GC (defaults: 30 s / 30 s)")
    p.add_argument("--memory", action="store_true", help="keep the store in memory")
    p.add_argument("--durability", choices=("full", "fast"), default="full",
                   help="full: fsync per request (default); fast: survive process crashes only")

    p = add("commit", "commit JSON bodies to a topic (arguments, or JSON lines on stdin)",
            cmd_commit,
            "  pipeproc commit events '{\"user\": \"ann\"}' '[1, 2, 3]'\n"
            "  pipeproc commit events < events.jsonl\n")
    p.add_argument("topic")
    p.add_argument("bodies", nargs="*", metavar="JSON",
                   help="bodies (objects or arrays), committed as one atomic batch")
    p.add_argument("--batch", type=_positive_int, default=COMMIT_BATCH,
                   help=f"stdin lines per atomic batch (default {COMMIT_BATCH})")

    p = add("range", "print logs of a topic (oldest first; --rev for newest first)", cmd_range,
            "  pipeproc range events --start :0 --limit 10\n"
            "  pipeproc range events --start 1518951480106 --end 1518951490000\n"
            "  pipeproc range events --rev --limit 1 --json\n")
    p.add_argument("topic")
    p.add_argument("--start", help="lower bound (upper with --rev): ID, MS or :SEQ")
    p.add_argument("--end", help="upper bound (lower with --rev): ID, MS or :SEQ")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="at most this many logs (>= 1; default all)")
    p.add_argument("--rev", action="store_true", help="newest first (revrange)")
    p.add_argument("--exclusive", action="store_true", help="exclude the bound logs themselves")

    p = add("tail", "print the last logs of a topic; -f follows new commits", cmd_tail,
            "  pipeproc tail events -n 20\n"
            "  pipeproc tail events -f --json | jq .body\n")
    p.add_argument("topic")
    p.add_argument("-n", type=_nonneg_int, default=10, help="how many of the last logs (default 10)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing logs as they are committed (Ctrl-C to stop)")

    p = add("length", "print the number of logs ever committed to a topic", cmd_length,
            "  pipeproc length events\n")
    p.add_argument("topic")

    add("topics", "list topics with their length and stored logs", cmd_topics,
        "  pipeproc topics --json\n")
    add("procs", "list procs: topic, status, pending claim, reclaims, lag, last error", cmd_procs,
        "  pipeproc procs\n")

    p = add("inspect", "print the full state of a proc", cmd_inspect,
            "  pipeproc inspect my-proc\n")
    p.add_argument("proc")
    for name, text in (("reclaim", "drop a proc's pending claim (its logs are delivered again)"),
                       ("disable", "disable a proc"),
                       ("resume", "resume a disabled proc (resets its reclaims)"),
                       ("destroy", "delete a proc (and its system proc) and all its state")):
        p = add(name, text, cmd_proc_action, f"  pipeproc {name} my-proc\n")
        p.add_argument("proc")

    p = add("stats", "print node, worker, topic and proc figures", cmd_stats,
            "  pipeproc stats\n"
            "  pipeproc stats --watch 1\n")
    p.add_argument("--watch", type=_seconds, metavar="SECONDS",
                   help="refresh every SECONDS until Ctrl-C")

    add("check", "verify every record of the store at --location (no node running); "
        "exit 1 and a report on damage", cmd_check,
        "  pipeproc check --location ./pipeproc_data\n")

    p = add("demo", "run the demo pipeline: raw -> parse -> enrich -> aggregate", cmd_demo,
            "  pipeproc demo\n"
            "  pipeproc demo --logs 100000 --location /tmp/pp-demo\n")
    p.add_argument("--logs", type=_positive_int, default=20_000,
                   help="logs to feed (default 20000)")
    p.add_argument("--workers", type=_positive_int, default=2, help="worker processes (default 2)")
    p.add_argument("--batch", type=_positive_int, default=500,
                   help="logs per atomic commit (default 500)")
    p.add_argument("--durability", choices=("full", "fast"), default="full",
                   help="node durability (default full)")
    return parser


# --------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command != "node":  # the node command configures its own (INFO) logging
        logging.basicConfig(level="DEBUG" if args.verbose else "WARNING", stream=sys.stderr,
                            format="pipeproc: %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except UsageError as exc:
        getattr(args, "parser", parser).print_usage(sys.stderr)
        print(f"pipeproc {args.command}: error: {exc}", file=sys.stderr)
        return RET_USAGE
    except (NoActiveNode, AuthFailed, ConnectionLost) as exc:
        _report(args, exc)
        return RET_CONNECT
    except PipeProcError as exc:
        _report(args, exc)
        return RET_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pipeproc range t | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return RET_OK


def _report(args: argparse.Namespace, exc: PipeProcError) -> None:
    if getattr(args, "json", False):
        print(dumps({"error": exc.code, "message": exc.message}), file=sys.stderr)
    else:
        print(f"pipeproc {args.command}: {exc}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
