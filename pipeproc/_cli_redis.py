"""The ``pipeproc workers`` command: a supervisor and its workers on a Redis namespace, in
the foreground (SCALE.md §1). The URL comes from ``PIPEPROC_REDIS`` or ``--redis-file``
(:func:`pipeproc._cli_commands.redis_url`), never from argv.

Client side: imports ``_cli_commands``, ``_rworkers`` and ``_rbackend``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from . import _rworkers
from ._cli_commands import ENV_REDIS, RET_OK, UsageError, redis_url
from ._rbackend import redact

log = logging.getLogger("pipeproc.cli")


def cmd_workers(args: argparse.Namespace) -> int:
    """``pipeproc workers``: a supervisor and its workers on a Redis namespace, in the
    foreground."""
    url = redis_url(args)
    if url is None:
        raise UsageError(f"workers runs on Redis: set {ENV_REDIS} or pass --redis-file "
                         "(a node runs its own workers: pipeproc node --workers N)")
    level = "DEBUG" if args.verbose else "INFO"
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    namespace = "pipeproc" if args.namespace is None else args.namespace
    cfg = _rworkers.supervisor_cfg(url, namespace, workers=args.workers,
                                   concurrency=args.concurrency,
                                   restart_after=args.restart_after, gc=bool(args.gc),
                                   durability=args.durability, allow=args.allow,
                                   log_level=level)
    sup = _rworkers.Supervisor(cfg)
    if cfg["gc"]:
        _rworkers.store_gc_settings(sup.backend, cfg["gc"])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sup.stop())
    log.info("workers: %d on %s namespace %r, allow=%s; stop with Ctrl-C or SIGTERM",
             args.workers, redact(url), namespace, cfg["allow"] or "(nothing)")
    sup.run(lifeline=False)
    log.info("stopped")
    return RET_OK
