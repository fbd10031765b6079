"""The GC: which logs go (the rule) and one bounded step of a pass over the topics.

Owns :func:`step`: given a write transaction, the topics left in this pass, the procs by
topic and the cutoff, it deletes what the rule allows up to a budget of deletions and of
time, and says whether the pass has more to do. The rule itself — the first sequence of a
topic to keep — is :func:`pipeproc._procs.gc_upto` (it is defined over proc records, next to
the proc state machine it must agree with).

Pure: no clock is read (``tx.now`` gives the cutoff's time; the step's time budget comes as
``deadline`` and a ``clock`` callable), no lmdb, socket, thread or subprocess. The node
(``_node``) schedules passes and runs each step as a writer job.

May import: ``_procs``, ``errors`` and the standard library's ``collections``/``logging``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Dict, Iterable, List

from . import _procs
from .errors import StoreCorrupted

log = logging.getLogger("pipeproc.node")

#: A GC pass runs in steps of at most this much work per write round.
GC_DELETES_PER_ROUND = 20_000
GC_SECONDS_PER_ROUND = 0.005


def procs_by_topic(committed: Dict[str, Any], in_tx: Dict[str, Any]) -> Dict[str, List[dict]]:
    """Proc records by topic: the committed ones overlaid with those created or changed
    earlier in the same write round (``tx.procs``; ``None``: destroyed)."""
    procs = dict(committed)
    procs.update(in_tx)
    by_topic: Dict[str, List[dict]] = {}
    for rec in procs.values():
        if rec is not None:
            by_topic.setdefault(rec["topic"], []).append(rec)
    return by_topic


def new_pass(topics: Iterable[str]) -> deque:
    """The topics a new GC pass visits, in order."""
    return deque(topics)


def step(tx: Any, todo: deque, by_topic: Dict[str, List[dict]], cutoff_ms: int,
         budget: int, deadline: float, clock: Callable[[], float]) -> bool:
    """One bounded step of a GC pass over ``todo`` (consumed as topics are done): at most
    ``budget`` deletions, and no new topic once ``clock() >= deadline``. Logs older than
    ``cutoff_ms`` go where the rule allows. ``True`` when the pass has more to do.

    The topics it takes off ``todo`` go back on it if ``tx`` is aborted (the writer runs
    the step again in a fresh transaction: they are not done)."""
    popped: List[str] = []
    tx.on_abort(lambda: todo.extendleft(reversed(popped)))
    deleted = 0
    while todo and budget > 0:
        name = todo[0]
        meta = tx.topic(name)
        if meta is not None and meta.first < meta.next:
            try:
                upto = _procs.gc_upto(tx, name, meta, by_topic.get(name, []), cutoff_ms)
            except StoreCorrupted as exc:  # the other topics are still collected
                log.error("the GC skips topic %r this pass: %s", name, exc)
                popped.append(todo.popleft())
                continue
            if upto > meta.first + budget:
                upto = meta.first + budget  # the rest of this topic in the next step
            else:
                popped.append(todo.popleft())
            if upto > meta.first:
                n = tx.delete_prefix(name, upto)
                deleted += n
                budget -= n
        else:
            popped.append(todo.popleft())
        if clock() >= deadline:
            break
    if deleted:
        log.debug("gc removed %d logs", deleted)
    return bool(todo)
