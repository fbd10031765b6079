"""The asyncio client over Redis (SCALE.md §1: ``pipeproc.aio.connect(redis=...)``,
``pipeproc.aio.spawn(redis=...)``): the backend-neutral tests of tests/test_aio.py, run with an
:class:`~pipeproc.aio.AsyncPipeProc` opened with ``redis=`` on a fresh namespace of the
session's private ``redis-server``, then what is particular to Redis (each call runs on a
worker thread: cancelled waits must neither lose a claim nor keep threads busy).

The tests of test_aio.py take a ``node`` and call the module's ``run(node, fn)``, which opens
the async client; the ``on_redis`` fixture replaces that ``run`` (and, for the hypothesis test
that connects by itself, the module's ``aio``) for the duration of one test, so that the very
same test bodies run against Redis. Their ``pp._conn.pending`` checks (no request of the
client left waiting for its reply) read, on Redis, the backend calls still running on a
worker thread (:class:`_InFlight`).

Left out (node-only): spawn / connect by location or address, authkeys, TCP nodes, a node
going away, and the authkey handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional

import pytest

import pipeproc
import pipeproc.aio as aio
from helpers import pid_alive, wait_until
from redis_server import fresh_namespace

import test_aio as ta
from test_sysproc_failures import check_backoff_and_dead_stage

pytestmark = pytest.mark.timeout(60)

M = "procmods.sysmods"


# ---------------------------------------------------------------------------------------------
# running test_aio's tests on Redis
# ---------------------------------------------------------------------------------------------


class _InFlight:
    """The Redis stand-in for a node connection's table of requests awaiting their reply:
    ``pending`` is the number of backend calls of this client still running on a worker
    thread. ``close`` is what ``AsyncPipeProc.close`` awaits of a connection (nothing here:
    the backend is closed by the client itself)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0

    @property
    def pending(self) -> Dict[int, None]:
        with self.lock:
            return dict.fromkeys(range(self.running))

    async def close(self) -> None:
        return None


class _CountingBackend:
    """An ``Ops`` backend that counts its calls in flight in an :class:`_InFlight`; every
    other attribute is the backend's own."""

    def __init__(self, backend: Any, inflight: _InFlight) -> None:
        self._backend = backend
        self._inflight = inflight

    def handle(self, *args: Any, **kw: Any) -> Any:
        with self._inflight.lock:
            self._inflight.running += 1
        try:
            return self._backend.handle(*args, **kw)
        finally:
            with self._inflight.lock:
                self._inflight.running -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class RedisTarget:
    """What test_aio's tests take as ``node``: here the URL and namespace to connect to."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        #: test_aio reads ``address`` / ``authkey`` only to pass them to ``aio.connect``
        self.address = None
        self.authkey = None

    async def connect(self) -> aio.AsyncPipeProc:
        """A new async client of the namespace, its backend calls counted (``_conn``)."""
        pp = await aio.connect(redis=self.url, namespace=self.namespace)
        inflight = _InFlight()
        pp._backend = _CountingBackend(pp._backend, inflight)  # type: ignore[assignment]
        pp._conn = inflight  # type: ignore[assignment]
        return pp


def _run_on_redis(target: RedisTarget, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """test_aio.run: ``fn(async_client, *args)`` in a fresh event loop, on Redis."""
    async def main() -> Any:
        pp = await target.connect()
        try:
            return await fn(pp, *args)
        finally:
            await pp.close()
    return asyncio.run(main())


class _AioOnRedis:
    """test_aio's ``aio`` module as its hypothesis test sees it: ``connect(address=...,
    authkey=...)`` opens a client of the target's namespace instead."""

    def __init__(self, target: RedisTarget) -> None:
        self.target = target

    async def connect(self, *args: Any, **kw: Any) -> aio.AsyncPipeProc:
        return await self.target.connect()

    def __getattr__(self, name: str) -> Any:
        return getattr(aio, name)


@pytest.fixture
def on_redis(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> RedisTarget:
    """A fresh namespace, and test_aio's ``run`` / ``aio`` pointed at it for this test."""
    target = RedisTarget(redis_url, fresh_namespace("aio"))
    monkeypatch.setattr(ta, "run", _run_on_redis)
    monkeypatch.setattr(ta, "aio", _AioOnRedis(target))
    return target


NEUTRAL = [
    # commit and read
    "test_commit_single_list_and_empty",
    "test_range_revrange_bounds_and_limits",
    "test_iter_range_pages_lazily",
    # procs
    "test_claim_pending_ack_and_next",
    "test_proc_state_errors",
    "test_ack_commit",
    "test_reclaim_timeout_redelivers",
    "test_wait_for_procs_times_out_and_does_not_block_other_calls",
    "test_available_proc",
    # many calls at once on one client
    "test_thousand_concurrent_commits_on_one_client",
    "test_mixed_concurrent_calls",
    # cancellation
    "test_cancelled_calls_leave_the_connection_in_step",
    "test_cancelled_parked_wait_then_more_calls",
    # live procs
    "test_live_proc_all_and_live_modes",
    "test_live_proc_changes_callback",
]


@pytest.mark.parametrize("name", NEUTRAL)
def test_aio_on_redis(on_redis: RedisTarget, name: str) -> None:
    getattr(ta, name)(on_redis)


def _errors_cases() -> List[Any]:
    """test_aio's parametrized error table (coroutine, code), one case per row."""
    fn = ta.test_errors_carry_codes_and_write_nothing
    (mark,) = [m for m in fn.pytestmark if m.name == "parametrize"]
    return [pytest.param(coro_of, code, id=f"{i}-{code}")
            for i, (coro_of, code) in enumerate(mark.args[1])]


@pytest.mark.parametrize("coro_of, code", _errors_cases())
def test_errors_carry_codes_and_write_nothing(on_redis: RedisTarget, coro_of: Any,
                                              code: str) -> None:
    ta.test_errors_carry_codes_and_write_nothing(on_redis, coro_of, code)


def test_random_interleavings_against_a_model(on_redis: RedisTarget) -> None:
    """test_aio's hypothesis test (random programs of several tasks on one client), every
    example on its own names in one namespace."""
    ta.test_random_interleavings_against_a_model(shared_node=on_redis)


# ---------------------------------------------------------------------------------------------
# Redis only: connect / spawn, and calls on worker threads
# ---------------------------------------------------------------------------------------------


def run(target: RedisTarget, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """``fn(async_client, *args)`` in a fresh event loop on a new client of ``target``."""
    return _run_on_redis(target, fn, *args)


@pytest.fixture
def target(redis_url: str) -> RedisTarget:
    """A fresh namespace of the session's server."""
    return RedisTarget(redis_url, fresh_namespace("aio"))


def test_connect_shares_the_namespace_with_sync_clients(target: RedisTarget) -> None:
    sync = pipeproc.connect(redis=target.url, namespace=target.namespace)
    try:
        ids = sync.commit([{"topic": "t", "body": {"i": i}} for i in range(3)])

        async def fn(pp: aio.AsyncPipeProc) -> Any:
            assert isinstance(pp, aio.AsyncPipeProc) and pp.namespace == target.namespace
            assert ta.ids_of(await pp.range("t")) == ids
            log = await pp.proc("t", name="p")
            assert log.id == ids[0]
            assert sync.inspect_proc("p").last_claimed_range == ta.rng(ids[0])
            assert await pp.ack("p", claimed=log) == ta.rng(ids[0])
            more = await pp.commit({"topic": "t", "body": {"i": 3}})
            stats = await pp.stats()
            assert stats["redis"]["namespace"] == target.namespace
            assert stats["topics"]["t"]["length"] == 4 and stats["procs"]["p"]["lag"] == 3
            return more

        more = run(target, fn)
        assert sync.range("t", start=":3")[0].id == more
        assert sync.inspect_proc("p").last_acked_range == ta.rng(ids[0])
    finally:
        sync.close()


def test_other_namespaces_are_not_seen(target: RedisTarget, redis_url: str) -> None:
    async def main() -> None:
        a = await target.connect()
        b = await aio.connect(redis=redis_url, namespace=fresh_namespace("aio-other"))
        try:
            await a.commit({"topic": "t", "body": {}})
            assert await b.topics() == []
            assert await ta.code_of(b.length("t")) == "invalid_topic"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_closed_client_fails_calls_with_no_active_node(target: RedisTarget) -> None:
    async def main() -> None:
        pp = await target.connect()
        await pp.commit({"topic": "t", "body": {}})
        await pp.close()
        await pp.close()  # idempotent
        assert await ta.code_of(pp.commit({"topic": "t", "body": {}})) == "no_active_node"
        assert await ta.code_of(pp.topics()) == "no_active_node"
        async with await target.connect() as other:
            assert await other.length("t") == 1  # the data stays: close is the client's

    asyncio.run(main())


def test_close_ends_the_clients_live_procs(target: RedisTarget) -> None:
    """A clean close destroys the hidden procs of the client's live procs at once."""
    async def main() -> None:
        other = await target.connect()
        async with await target.connect() as pp:
            live = await other.live_proc("t", mode="all")
            assert live.name in (await pp.stats())["procs"]
            await other.close()
            assert live.name not in (await pp.stats())["procs"]

    asyncio.run(main())


def test_many_concurrent_commits_across_topics_and_clients(target: RedisTarget) -> None:
    """gather() of batches on two clients of one namespace: every id once, per-topic seqs
    dense, each id holding the body it was returned for."""
    async def main() -> None:
        a, b = await target.connect(), await target.connect()
        try:
            calls = []
            for i in range(300):
                pp = a if i % 2 else b
                calls.append(pp.commit([{"topic": f"t{i % 3}", "body": {"i": i, "k": 0}},
                                        {"topic": f"t{(i + 1) % 3}", "body": {"i": i, "k": 1}}]))
            res = await asyncio.gather(*calls)
            body_of: Dict[str, Any] = {}
            for i, (x, y) in enumerate(res):
                assert x.split("-")[0] == y.split("-")[0]  # one ms per batch
                body_of[f"t{i % 3}/{x}"] = {"i": i, "k": 0}
                body_of[f"t{(i + 1) % 3}/{y}"] = {"i": i, "k": 1}
            for t in ("t0", "t1", "t2"):
                logs = await a.range(t)
                assert [ta.seq(lg.id) for lg in logs] == list(range(200))
                assert all(body_of[f"{t}/{lg.id}"] == lg.body for lg in logs)
            assert not a._conn.pending and not b._conn.pending
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_concurrent_consumers_each_log_once(target: RedisTarget) -> None:
    """Tasks of two clients claim and ack one proc at once: every log exactly once, in order
    (one pending claim at a time)."""
    async def main() -> None:
        a, b = await target.connect(), await target.connect()
        try:
            ids = await ta.commit_n(a, "t", 60)
            claimed: List[str] = []

            async def consumer(pp: aio.AsyncPipeProc) -> None:
                while len(claimed) < 60:
                    got = await pp.proc("t", name="p", count=2)
                    if got is None:
                        await asyncio.sleep(0.001)
                        continue
                    claimed.extend(lg.id for lg in got)  # before the ack: in claim order
                    assert await pp.ack("p", claimed=got) == ta.rng(got[0].id, got[-1].id)

            await asyncio.wait_for(asyncio.gather(*(consumer(a if i % 2 else b)
                                                    for i in range(6))), 30)
            assert claimed == ids
            await a.wait_for_procs(["p"], timeout=5)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_wait_for_procs_timeout_and_completion(target: RedisTarget) -> None:
    async def fn(pp: aio.AsyncPipeProc) -> None:
        await ta.commit_n(pp, "t", 2)
        log = await pp.proc("t", name="p")
        t0 = time.monotonic()
        with pytest.raises(pipeproc.Timeout):
            await pp.wait_for_procs(["p"], timeout=0.4)
        assert 0.35 < time.monotonic() - t0 < 5
        waiter = asyncio.ensure_future(pp.wait_for_procs(["p"], timeout=20))
        await pp.ack("p", claimed=log)
        await pp.ack("p", claimed=await pp.proc("t", name="p"))
        await asyncio.wait_for(waiter, 10)  # woken by the last ack, not by its timeout
        await pp.wait_for_procs(timeout=0.5)

    run(target, fn)


def test_close_during_parked_waits(on_redis: RedisTarget) -> None:
    """test_aio's test_close_during_a_parked_call (a wait_for_procs), and a live proc's wait,
    each parked when the client is closed: both end with no_active_node, as on a node. The
    outcome on Redis depends on a race (which thread sees the closed pool first), so the
    scenario runs a few times."""
    async def fn(pp: aio.AsyncPipeProc) -> List[Optional[str]]:
        await ta.commit_n(pp, "t", 1)
        await pp.proc("t", name="p")
        live = await pp.live_proc("u")
        waits = [asyncio.ensure_future(pp.wait_for_procs(["p"])),
                 asyncio.ensure_future(live.__anext__())]
        await asyncio.sleep(0.05)
        await pp.close()
        out: List[Optional[str]] = []
        for w in waits:
            try:
                await asyncio.wait_for(w, 20)
                out.append(None)
            except pipeproc.PipeProcError as exc:
                out.append(exc.code)
            except BaseException as exc:  # noqa: BLE001 - what the caller would see
                out.append(type(exc).__name__)
        return out

    outcomes = [run(on_redis, fn) for _ in range(5)]
    assert outcomes == [["no_active_node", "no_active_node"]] * 5
    ta.test_close_during_a_parked_call(on_redis)


def test_cancelled_wait_for_procs_lets_its_thread_go(target: RedisTarget) -> None:
    """Each call runs on a worker thread of the event loop's default executor (a few
    threads): a cancelled ``wait_for_procs`` must let its thread go, or a few cancelled waits
    on a busy proc starve every later call of the client (and ``asyncio.run`` never returns:
    it joins the executor's threads)."""
    sync = pipeproc.connect(redis=target.url, namespace=target.namespace)
    sync.commit({"topic": "t", "body": {}})
    sync.proc("t", name="busy", reclaim_timeout=-1)  # not done until the test says so

    async def fn(pp: aio.AsyncPipeProc) -> Optional[float]:
        try:
            waits = [asyncio.ensure_future(pp.wait_for_procs(["busy"])) for _ in range(12)]
            took = await _cancel_then_time(waits, lambda: pp.length("t"))
            assert took is None or took[1] == 1
            return None if took is None else took[0]
        finally:
            sync.destroy_proc("busy")  # lets go whatever still waits on it

    try:
        took = run(target, fn)
    finally:
        sync.close()
    assert took is not None and took < 2, "a call waited for cancelled waits' threads"


async def _cancel_then_time(waits: List[Any], call: Callable[[], Awaitable[Any]]
                            ) -> Optional[tuple]:
    """Let ``waits`` park, cancel them all, then ``(seconds, result)`` of ``call()`` on the
    same client (``None``: it took more than 5 s)."""
    await asyncio.sleep(0.3)  # all parked
    for w in waits:
        w.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
    t0 = time.monotonic()
    try:
        result = await asyncio.wait_for(call(), 5)
    except asyncio.TimeoutError:
        return None
    return time.monotonic() - t0, result


def test_cancelled_live_waits_let_their_threads_go(target: RedisTarget) -> None:
    """The same with waits of live procs on a topic that gets no log."""
    async def fn(pp: aio.AsyncPipeProc) -> Optional[float]:
        lives = [await pp.live_proc("empty", mode="all") for _ in range(12)]
        try:
            waits = [asyncio.ensure_future(live.__anext__()) for live in lives]
            took = await _cancel_then_time(waits, lambda: pp.commit({"topic": "t", "body": {}}))
            return None if took is None else took[0]
        finally:
            await asyncio.wait_for(asyncio.gather(*(live.cancel() for live in lives)), 30)

    took = run(target, fn)
    assert took is not None and took < 2, "a call waited for cancelled waits' threads"


def test_many_waiting_live_procs_hold_up_no_call(target: RedisTarget) -> None:
    """Live procs of one client all waiting at once (more than the executor has threads):
    a commit on the same client still goes through, and each live proc gets its log (the
    class's promise: "its waits ... hold up none of the client's other calls")."""
    sync = pipeproc.connect(redis=target.url, namespace=target.namespace)

    async def fn(pp: aio.AsyncPipeProc) -> Any:
        lives = [await pp.live_proc("t") for _ in range(12)]
        try:
            waits = [asyncio.ensure_future(live.__anext__()) for live in lives]
            await asyncio.sleep(0.3)  # all parked
            try:
                log_id = await asyncio.wait_for(pp.commit({"topic": "t", "body": {}}), 5)
                got = await asyncio.wait_for(asyncio.gather(*waits), 10)
            except asyncio.TimeoutError:
                return None
            return [lg.id for lg in got] == [log_id] * len(lives)
        finally:
            for live in lives:  # from another client: this one may have no thread left
                live._cancelled = True
                with contextlib.suppress(pipeproc.PipeProcError):
                    sync.destroy_proc(live.name)
            await asyncio.gather(*waits, return_exceptions=True)

    try:
        ok = run(target, fn)
    finally:
        sync.close()
    assert ok is not None, "the commit waited behind the live procs' waits"
    assert ok, "a live proc did not get the log"


def test_cancelled_live_waits_lose_no_claim(target: RedisTarget) -> None:
    """Live waits cancelled again and again while logs are committed: every log is still
    delivered once, in order (a claim that reached a cancelled wait is handed back)."""
    async def fn(pp: aio.AsyncPipeProc) -> None:
        live = await pp.live_proc("t", mode="all")
        ids: List[str] = []
        got: List[str] = []

        async def producer() -> None:
            for i in range(40):
                ids.append(await pp.commit({"topic": "t", "body": {"i": i}}))
                await asyncio.sleep(0.005)

        prod = asyncio.ensure_future(producer())
        deadline = time.monotonic() + 30
        while len(got) < 40 and time.monotonic() < deadline:
            nxt = asyncio.ensure_future(live.__anext__())
            done, _ = await asyncio.wait([nxt], timeout=0.003)
            if not done:
                nxt.cancel()
                try:
                    log = await nxt
                except asyncio.CancelledError:
                    continue
            else:
                log = nxt.result()
            got.append(log.id)
            await live.ack()
        await prod
        assert got == ids
        st = await live.inspect()
        assert st.last_acked_range == ta.rng(ids[-1])
        await live.cancel()

    run(target, fn)


def test_live_cancel_ends_a_blocked_iteration(target: RedisTarget) -> None:
    async def fn(pp: aio.AsyncPipeProc) -> None:
        live = await pp.live_proc("t")
        seen: List[Any] = []

        async def consume() -> None:
            async for log in live:
                seen.append(log)
                await live.ack()

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        await pp.commit({"topic": "t", "body": {"i": 0}})
        await asyncio.wait_for(_until(lambda: len(seen) == 1), 10)
        t0 = time.monotonic()
        await live.cancel()
        await asyncio.wait_for(task, 10)  # the iteration ends: StopAsyncIteration
        assert time.monotonic() - t0 < 5
        assert [lg.body for lg in seen] == [{"i": 0}]
        assert await ta.code_of(pp.inspect_proc(live.name)) == "invalid_proc"

    run(target, fn)


async def _until(cond: Callable[[], bool], interval: float = 0.01) -> None:
    while not cond():
        await asyncio.sleep(interval)


@pytest.mark.timeout(90)
def test_spawn_runs_system_procs_and_shutdown_stops_the_workers(redis_url: str) -> None:
    namespace = fresh_namespace("aio-spawn")

    async def main() -> List[int]:
        async with await aio.spawn(redis=redis_url, namespace=namespace, workers=1,
                                   allow=["*"]) as pp:
            assert isinstance(pp, aio.AsyncPipeProc) and pp.namespace == namespace
            await pp.system_proc(name="dbl", from_="in", processor=f"{M}:double", to="out")
            await pp.commit([{"topic": "in", "body": {"n": n}} for n in range(5)])
            await pp.wait_for_procs(timeout=30)
            assert [lg.body for lg in await pp.range("out")] == [{"n": 2 * n} for n in range(5)]
            workers = (await pp.stats())["workers"]
            assert len(workers) == 1 and workers[0]["alive"]
            return [w["pid"] for w in workers]

    pids = asyncio.run(main())
    wait_until(lambda: not any(pid_alive(p) for p in pids), what="the workers stopped")
    sync = pipeproc.connect(redis=redis_url, namespace=namespace)
    try:  # the data stays in the namespace
        assert sync.length("out") == 5 and "dbl" in sync.stats()["system_procs"]
    finally:
        sync.close()


@pytest.mark.timeout(90)
def test_spawn_system_proc_backoff_and_dead_stage(redis_url: str) -> None:
    """test_sysproc_failures' aio test on a spawn(redis=...)."""
    namespace = fresh_namespace("aio-spawn")

    async def main() -> None:
        pp = await aio.spawn(redis=redis_url, namespace=namespace, workers=1, allow=["*"])
        try:
            await check_backoff_and_dead_stage(pp)
        finally:
            await pp.shutdown()

    asyncio.run(main())


def test_cancelled_live_wait_claims_nothing(on_redis):
    """On Redis, cancelling a live proc's wait closes its connection: the wait ends at once
    and claims nothing afterwards (on a node, a claim that arrives for it is handed back:
    reclaimed). Either way nothing is lost: the next wait delivers every log in order."""
    async def fn(pp):
        live = await pp.live_proc("t", mode="all")
        waiting = asyncio.ensure_future(live.__anext__())
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        ids = [await pp.commit({"topic": "t", "body": {"i": i}}) for i in range(2)]
        await asyncio.sleep(0.1)
        st = await live.inspect()
        assert st.last_claimed_range == "" and st.reclaims == 0
        first = await asyncio.wait_for(live.__anext__(), 5)
        assert first.id == ids[0]
        await live.ack()
        assert (await asyncio.wait_for(live.__anext__(), 5)).id == ids[1]
        await live.cancel()
    run(on_redis, fn)
