"""Shared fixtures: every node a test starts is shut down in a ``finally``.

Starting a node (a Python process) costs about 0.1 s, most of it the child's start-up; with
~600 tests that ask for a plain node that was a third of ``make test``. The ``node``,
``mem_node`` and ``any_node`` fixtures therefore take their node from :class:`_NodePool`,
which starts the *next* test's node (same options, a fresh location of its own) on a thread
while the current test runs. Every test still gets a fresh node on an empty location of its
own, shut down after it; only the time the node was started moves. A test that does not ask
for one of these nodes first waits until no start is in flight (so that no node picks up an
environment, a working directory or a fork that test sets up); a test that must not run
beside a starting node (e.g. it forks) is marked ``@pytest.mark.no_prefetch``.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

import pipeproc

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # tests/ helper modules (processors for system procs) importable
    sys.path.insert(0, HERE)

POOLED = {"node", "mem_node", "any_node", "both"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "no_prefetch: no node is being started beside this test (see conftest.py)")


def _spawn(location, **kw):
    kw.setdefault("workers", 0)
    return pipeproc.spawn(location, **kw)


class _NodePool:
    """Plain nodes (no workers, default options; disk or memory), each started on a fresh
    location while the test before the one that takes it runs."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.next: dict = {}  # memory -> (thread, box): the start in flight or done

    def _location(self, memory: bool):
        return self.factory.mktemp("mem" if memory else "node") / ("mem" if memory else "store")

    def _start(self, memory: bool) -> None:
        location = self._location(memory)  # mktemp on the main thread
        box: dict = {}

        def run() -> None:
            try:
                box["pp"] = _spawn(location, memory=memory)
            except BaseException as exc:  # noqa: BLE001 - raised to the test that takes it
                box["error"] = exc

        t = threading.Thread(target=run, name="test-node-prefetch", daemon=True)
        t.start()
        self.next[memory] = (t, box)

    def take(self, memory: bool, prefetch: bool = True):
        """A fresh node; with ``prefetch`` the next one of its kind starts meanwhile."""
        entry = self.next.pop(memory, None)
        if entry is None:
            pp = _spawn(self._location(memory), memory=memory)
        else:
            t, box = entry
            t.join()
            if "error" in box:
                raise box["error"]
            pp = box["pp"]
        if prefetch:
            self._start(memory)
        return pp

    def settle(self) -> None:
        """Wait until no node start is in flight."""
        for t, _ in list(self.next.values()):
            t.join()

    def close(self) -> None:
        self.settle()
        for _, box in self.next.values():
            if "pp" in box:
                box["pp"].shutdown()
        self.next.clear()


@pytest.fixture(scope="session")
def _node_pool(tmp_path_factory):
    pool = _NodePool(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(autouse=True)
def _no_node_start_in_flight(request, _node_pool):
    """Tests that take no pooled node (and ``no_prefetch`` tests) run with no start in flight."""
    if not POOLED & set(request.fixturenames) or request.node.get_closest_marker("no_prefetch"):
        _node_pool.settle()


def _pooled(request, pool, memory: bool):
    prefetch = request.node.get_closest_marker("no_prefetch") is None
    pp = pool.take(memory, prefetch=prefetch)
    try:
        yield pp
    finally:
        pp.shutdown()


@pytest.fixture
def node(request, _node_pool):
    """A disk node with no workers on a fresh location (``node.location``)."""
    yield from _pooled(request, _node_pool, memory=False)


@pytest.fixture
def mem_node(request, _node_pool):
    """A memory node with no workers (on a fresh location, ``mem_node.location``)."""
    yield from _pooled(request, _node_pool, memory=True)


@pytest.fixture(params=["disk", "memory"])
def any_node(request, _node_pool):
    """The same test on a disk node and on a memory node."""
    yield from _pooled(request, _node_pool, memory=request.param == "memory")


@pytest.fixture
def spawner(tmp_path):
    """A factory of nodes (any options) that shuts down whatever it started."""
    started = []

    def make(location=None, **kw):
        pp = _spawn(location if location is not None else tmp_path / "store", **kw)
        started.append(pp)
        return pp

    try:
        yield make
    finally:
        for pp in reversed(started):
            try:
                pp.shutdown()
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# the Redis backend (SCALE.md): one private redis-server for the session, a fresh namespace per
# test; skipped with the reason when there is no redis-server (or no redis-py) on the machine
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server():
    """One private ``redis-server`` for the session (tests/redis_server.py: 127.0.0.1, a free
    port, a temporary directory, appendfsync always, noeviction, a random password)."""
    from redis_server import RedisServer, require_redis_server

    pytest.importorskip("redis", reason="redis-py not installed: pip install 'pipeproc[redis]'")
    server = RedisServer(require_redis_server(), require_password=True)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session server's URL (with its password)."""
    return redis_server.url()


@pytest.fixture
def rpp_namespace() -> str:
    """The fresh namespace of this test's ``rpp``."""
    from redis_server import fresh_namespace

    return fresh_namespace()


@pytest.fixture
def rpp(redis_url, rpp_namespace):
    """A Redis client on a fresh namespace of the session server, closed after the test."""
    pp = pipeproc.connect(redis=redis_url, namespace=rpp_namespace, durability="full")
    try:
        yield pp
    finally:
        pp.close()


@pytest.fixture(params=["node", "redis"])
def both(request):
    """The same test on a fresh LMDB node (the pooled ``node``) and on ``rpp``."""
    yield request.getfixturevalue("node" if request.param == "node" else "rpp")


@pytest.fixture
def both_connect(request, both):
    """A factory of more clients of the store ``both`` is on (closed after the test)."""
    opened = []

    def make():
        if request.node.callspec.params["both"] == "node":
            pp = pipeproc.connect(address=both.address, authkey=both.authkey)
        else:
            pp = pipeproc.connect(redis=request.getfixturevalue("redis_url"),
                                  namespace=request.getfixturevalue("rpp_namespace"))
        opened.append(pp)
        return pp

    try:
        yield make
    finally:
        for pp in reversed(opened):
            try:
                pp.close()
            except Exception:
                pass


@pytest.fixture(params=["node", "redis"])
def both_spawner(request):
    """``spawner`` on both backends: for "redis", ``make(**kw)`` is ``spawn(redis=...)`` on a
    fresh namespace of the session server (workers=0 unless given, ``allow=["*"]``: a trusted
    test server); a ``location`` or ``memory=True`` skips the test there (no such thing)."""
    if request.param == "node":
        yield request.getfixturevalue("spawner")
        return
    from redis_server import fresh_namespace

    url = request.getfixturevalue("redis_url")
    started = []

    def make(location=None, **kw):
        if location is not None or kw.pop("memory", False):
            pytest.skip("a Redis namespace has no location and no memory=True")
        kw.setdefault("workers", 0)
        kw.setdefault("allow", ["*"])
        pp = pipeproc.spawn(redis=url, namespace=fresh_namespace("spawn"), **kw)
        started.append(pp)
        return pp

    try:
        yield make
    finally:
        for pp in reversed(started):
            try:
                pp.shutdown()
            except Exception:
                pass
