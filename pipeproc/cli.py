"""The ``pipeproc`` command line: run a node, commit, read, follow and manage procs, list
workflow runs.

Every subcommand is a thin shell over the public client (:func:`pipeproc.connect`,
:func:`pipeproc.spawn`); nothing here touches the store: ``check`` runs the node-side
check (:mod:`pipeproc._check`, the store read with no node running) as a child process.
Logging is configured here and only here (the library never configures logging itself).

This module holds the parser and :func:`main`; the subcommands are
:mod:`pipeproc._cli_commands`, the text formatting :mod:`pipeproc._text`, the workflow commands (``runs``, ``run``)
:mod:`pipeproc._cli_flow`. Client side: it imports the client-side modules lazily (``_demo``,
``_demo_flow``, ``_cli_flow``), never a node-side one.

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
import logging
import os
import re
import sys
from typing import Callable, NoReturn, Optional, Sequence

from . import __version__
from ._cli_commands import (  # RET_*, UsageError and the address helpers: also cli's names
    COMMIT_BATCH,
    CONNECT_TIMEOUT,
    DEFAULT_LOCATION,
    ENV_ADDRESS,
    ENV_BUSY_POLL,
    ENV_LOCATION,
    ENV_REDIS,
    RET_CONNECT,
    RET_ERROR,
    RET_OK,
    RET_USAGE,
    UsageError,
    cmd_check,
    cmd_commit,
    cmd_inspect,
    cmd_length,
    cmd_node,
    cmd_proc_action,
    cmd_procs,
    cmd_range,
    cmd_stats,
    cmd_tail,
    cmd_topics,
    format_address,
    parse_address,
    report_error,
)
from ._cli_commands import busy_poll_setting as _busy_poll_setting
from ._cli_redis import cmd_workers
from .errors import AuthFailed, ConnectionLost, NoActiveNode, PipeProcError

__all__ = ["main", "make_parser", "parse_address", "format_address", "UsageError", "RET_OK",
           "RET_ERROR", "RET_USAGE", "RET_CONNECT", "ENV_LOCATION", "ENV_ADDRESS",
           "ENV_BUSY_POLL", "DEFAULT_LOCATION", "CONNECT_TIMEOUT", "COMMIT_BATCH"]

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

  # workflow runs (pipeproc.flow): list them, then one run with its history
  pipeproc runs
  pipeproc runs --status failed,aborted --workflow demo-order --json
  pipeproc run order-1

  # verify the store (every record's checksum, the proc records) with no node running
  pipeproc check --location ./pipeproc_data

  # the demo pipeline (what `make demo` runs)
  pipeproc demo --logs 20000
  pipeproc demo --flow          # act 2: a durable order workflow, a worker killed mid-run

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


def cmd_demo(args: argparse.Namespace) -> int:
    if args.flow:
        from . import _demo_flow
        return _demo_flow.run(location=args.location, workers=args.workers,
                              durability=args.durability, busy_poll=_busy_poll_setting())
    from . import _demo
    return _demo.run(logs=args.logs, location=args.location, workers=args.workers,
                     batch=args.batch, durability=args.durability,
                     busy_poll=_busy_poll_setting())


def cmd_runs(args: argparse.Namespace) -> int:
    from . import _cli_flow
    return _cli_flow.cmd_runs(args)


def cmd_run(args: argparse.Namespace) -> int:
    from . import _cli_flow
    return _cli_flow.cmd_run(args)


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


_CREDENTIALS = re.compile(r"(?i)\b((?:rediss?|unix)://)[^@\s'\"]*@")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose error messages never echo a URL's credentials (a Redis URL
    given on the command line by mistake: the URL belongs in PIPEPROC_REDIS)."""

    def error(self, message: str) -> NoReturn:
        super().error(_CREDENTIALS.sub(r"\1***@", message))


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (global options are accepted before or after the subcommand)."""
    def common(suppress: bool) -> argparse.ArgumentParser:
        d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
        p = _Parser(add_help=False, allow_abbrev=False)
        g = p.add_argument_group("connection")
        g.add_argument("--location", "-l", metavar="DIR",
                       default=d(os.environ.get(ENV_LOCATION) or DEFAULT_LOCATION),
                       help=f"the node's directory (env {ENV_LOCATION}; default {DEFAULT_LOCATION})")
        g.add_argument("--address", "-a", metavar="HOST:PORT",
                       default=d(os.environ.get(ENV_ADDRESS) or None),
                       help=f"TCP HOST:PORT or Unix socket path of the node (env {ENV_ADDRESS}); "
                            "the key is still read from --location")
        g.add_argument("--namespace", metavar="NS", default=d(None),
                       help="with Redis: the namespace (default 'pipeproc'); the URL comes from "
                            f"env {ENV_REDIS} or --redis-file, never from the command line")
        g.add_argument("--redis-file", metavar="FILE", default=d(None),
                       help="a file holding the Redis URL (instead of env PIPEPROC_REDIS)")
        g.add_argument("--timeout", type=float, metavar="SECONDS", default=d(CONNECT_TIMEOUT),
                       help=f"how long to try to connect (default {CONNECT_TIMEOUT})")
        g.add_argument("--json", action="store_true", default=d(False),
                       help="machine-readable JSON output")
        g.add_argument("--verbose", "-v", action="store_true", default=d(False),
                       help="debug logging on stderr")
        return p

    parser = _Parser(
        allow_abbrev=False,
        prog="pipeproc", parents=[common(False)],
        description="pipeproc: an embedded, multi-process commit-log processor.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pipeproc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parent: list = [common(True)]

    def add(name: str, help: str, fn: Callable, examples: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=parent,
                           epilog=("examples:\n" + examples) if examples else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn, parser=p)
        return p

    p = add("workers", "with Redis: run a supervisor and its workers in the foreground "
            "(until Ctrl-C / SIGTERM)", cmd_workers,
            "  PIPEPROC_REDIS=redis://host:6379/0 pipeproc workers --namespace shop -n 8 "
            "--allow shop.pipeline\n")
    p.add_argument("-n", "--workers", dest="workers", type=_nonneg_int, default=1,
                   help="worker processes (default 1)")
    p.add_argument("--concurrency", type=_positive_int, default=1,
                   help="processing loops per worker (default 1)")
    p.add_argument("--restart-after", type=_nonneg_int, default=0,
                   help="recycle a worker after N executions (default 0: never)")
    p.add_argument("--allow", action="append", metavar="PREFIX", default=None,
                   help="module prefix or directory of processors the workers may run "
                        "(repeatable; '*' trusts everything; none given: nothing runs)")
    p.add_argument("--gc", action="store_true", help="run the GC (defaults: 30 s / 30 s)")
    p.add_argument("--durability", choices=("full", "replicated", "fast"), default="full",
                   help="what a worker's write waits for (default full)")

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

    p = add("runs", "list workflow runs (pipeproc.flow): id, workflow, status, attempt, "
            "updated, error; oldest first", cmd_runs,
            "  pipeproc runs\n"
            "  pipeproc runs --status waiting\n"
            "  pipeproc runs --status failed,aborted --status cancelled --workflow demo-order\n"
            "  pipeproc runs --limit 20 --json\n")
    p.add_argument("--status", action="append", metavar="STATUS",
                   help="only runs with this status: pending, running, waiting, finished, "
                        "failed, aborted, cancelled, rejected (repeatable, or a comma list)")
    p.add_argument("--workflow", metavar="NAME", help="only runs of this workflow (its name)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="only the newest N matching runs (still printed oldest first)")

    p = add("run", "print a workflow run: its state (and result), then its history, "
            "one event a line", cmd_run,
            "  pipeproc run order-1\n"
            "  pipeproc run order-1 --json | jq .history\n")
    p.add_argument("id", metavar="ID", help="the run's id")

    add("check", "verify every record of the store at --location (no node running); "
        "exit 1 and a report on damage", cmd_check,
        "  pipeproc check --location ./pipeproc_data\n")

    p = add("demo", "run the demo pipeline: raw -> parse -> enrich -> aggregate; --flow: "
            "act 2, a durable order workflow", cmd_demo,
            "  pipeproc demo\n"
            "  pipeproc demo --logs 100000 --location /tmp/pp-demo\n"
            "  pipeproc demo --flow\n")
    p.add_argument("--logs", type=_positive_int, default=20_000,
                   help="logs to feed (default 20000)")
    p.add_argument("--workers", type=_positive_int, default=2, help="worker processes (default 2)")
    p.add_argument("--batch", type=_positive_int, default=500,
                   help="logs per atomic commit (default 500)")
    p.add_argument("--durability", choices=("full", "fast"), default="full",
                   help="node durability (default full)")
    p.add_argument("--flow", action="store_true",
                   help="act 2: an order workflow (flaky payment with retries, a durable "
                        "sleep, an approval signal, a child run) with a worker killed mid-run "
                        "(--logs and --batch do not apply)")
    return parser


# --------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command not in ("node", "workers"):  # these configure their own (INFO) logging
        logging.basicConfig(level="DEBUG" if args.verbose else "WARNING", stream=sys.stderr,
                            format="pipeproc: %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except UsageError as exc:
        getattr(args, "parser", parser).print_usage(sys.stderr)
        print(f"pipeproc {args.command}: error: {exc}", file=sys.stderr)
        return RET_USAGE
    except (NoActiveNode, AuthFailed, ConnectionLost) as exc:
        report_error(args, exc)
        return RET_CONNECT
    except PipeProcError as exc:
        report_error(args, exc)
        return RET_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pipeproc range t | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return RET_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
