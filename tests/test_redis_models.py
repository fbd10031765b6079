"""The hypothesis state machines of the node suite, run against the Redis backend (SCALE.md §2:
"What is the same").

* :class:`test_procs_model.ProcMachine`: commits and every proc operation of SPEC §5, checked
  against its plain Python model of topics and procs;
* :class:`test_commit_model.CommitMachine`: commits, invalid batches, range / revrange /
  length / topics, checked against its model of the topics.

The machines and their models are imported, not copied: only how the client is made changes.
Each test function works on a fresh namespace of the session's private ``redis-server``
(``pipeproc.connect(redis=..., namespace=...)``) shared by its examples (each example uses
names of its own, as on the node). Where the node suite "restarts the node" (shutdown and a
spawn on the same location), here the client is closed and a new client connects to the same
namespace: everything (logs, procs, pending claims, ranges) must still be there, which the
machines check with the same assertions as after a node restart.

A third test runs ProcMachine with its calls spread over two clients of one namespace (a
claim made by one client is acked, reclaimed or named in ``claimed=`` by the other).

``max_examples`` is chosen so that the file runs in well under 40 s (about 15 s on an idle
2-core machine); longer runs while this file was written (ProcMachine: 1000 examples of 60
steps, and 200 on two clients; CommitMachine: 3 x 500 examples of 40 steps) found no
difference from the models.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

import pipeproc
from redis_server import fresh_namespace

import test_commit_model as cm
import test_procs_model as pm

pytestmark = pytest.mark.timeout(120)


def _connect(url: str, namespace: str) -> Any:
    """A new client of ``namespace`` (the Redis stand-in for a node spawned on a location)."""
    return pipeproc.connect(redis=url, namespace=namespace, durability="full")


# ---------------------------------------------------------------------------------------------
# SPEC §5: the procs model
# ---------------------------------------------------------------------------------------------


def test_procs_model_on_redis(redis_url: str) -> None:
    """ProcMachine on one namespace; its ``restart`` rule reconnects a new client to it."""
    namespace = fresh_namespace("procs-model")
    env: Dict[str, Any] = {"pp": _connect(redis_url, namespace), "counter": itertools.count()}
    reconnects = []

    def restart() -> None:
        env["pp"].close()
        env["pp"] = _connect(redis_url, namespace)
        reconnects.append(1)

    env["restart"] = restart
    try:
        run_state_machine_as_test(
            lambda: pm.ProcMachine(env),
            settings=settings(**{**pm.SETTINGS, "max_examples": 100}),
        )
    finally:
        env["pp"].close()
    assert reconnects, "the restart rule never ran"


class _Alternating:
    """A client whose every call goes to the next of ``clients`` in turn."""

    def __init__(self, clients: List[Any]) -> None:
        self._clients = clients
        self._turn = itertools.count()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clients[next(self._turn) % len(self._clients)], name)


def test_procs_model_on_two_clients_of_one_namespace(redis_url: str) -> None:
    """ProcMachine with its calls alternating between two clients (no restarts)."""
    namespace = fresh_namespace("procs-model2")
    clients = [_connect(redis_url, namespace) for _ in range(2)]
    env: Dict[str, Any] = {"pp": _Alternating(clients), "counter": itertools.count(),
                           "restart": None}
    try:
        run_state_machine_as_test(
            lambda: pm.ProcMachine(env),
            settings=settings(**{**pm.SETTINGS, "max_examples": 40}),
        )
    finally:
        for pp in clients:
            pp.close()


# ---------------------------------------------------------------------------------------------
# SPEC §1, §3, §4: the commit / read model
# ---------------------------------------------------------------------------------------------


class RedisHolder:
    """What :class:`test_commit_model.CommitMachine` needs of its ``NodeHolder`` (``pp``,
    ``memory``, ``max_ms``, ``generation``, ``restarts``, ``restart()``, ``shutdown()``),
    on a Redis namespace: a restart is a new client of the same namespace (nothing is lost,
    as on a disk node), the store's ms never decreases across examples and reconnects."""

    memory = False

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.pp = _connect(url, namespace)
        self.max_ms = 0
        self.generation = 0  # never bumped: a namespace is never emptied by a reconnect
        self.restarts = 0

    def restart(self) -> None:
        """Close the client and connect a new one to the same namespace."""
        self.restarts += 1
        self.pp.close()
        self.pp = _connect(self.url, self.namespace)

    def shutdown(self) -> None:
        """Close the client (the namespace stays; the session's server is removed later)."""
        self.pp.close()


def test_commit_model_on_redis(redis_url: str) -> None:
    """CommitMachine on one namespace; its ``restart`` rule reconnects a new client to it."""
    holder = RedisHolder(redis_url, fresh_namespace("commit-model"))
    try:
        run_state_machine_as_test(
            lambda: cm.CommitMachine(holder),  # type: ignore[arg-type]  # a duck-typed holder
            settings=settings(max_examples=150, stateful_step_count=30, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow]),
        )
        assert holder.restarts > 0, "the restart rule never ran"
    finally:
        holder.shutdown()
