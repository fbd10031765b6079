"""Client/node protocol edges: claim identity, live procs' hidden-proc flag, fork safety,
timeouts against a stopped node, a forgotten live ack and a node that goes away."""

from __future__ import annotations

import functools
import asyncio
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

import pipeproc
import pipeproc.aio
from pipeproc import Log
from pipeproc.errors import ConnectionLost, InvalidAck, PipeProcError, StaleClaim, Timeout

import helpers
from helpers import pid_alive

wait_until = functools.partial(helpers.wait_until, timeout=20.0)  # this module's deadline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PIPEPROC_LOCATION", None)
    env.pop("PIPEPROC_ADDRESS", None)
    return env


# --------------------------------------------------------------------------- claim identity

@pytest.mark.parametrize("count", [1, 2])
def test_claimed_identifies_the_claim_not_only_its_logs(node, count):
    node.commit([{"topic": "t", "body": {"i": i}} for i in range(2)])
    first = node.proc("t", name="p", count=count, reclaim_timeout=0.1)
    assert first is not None
    wait_until(lambda: node.inspect_proc("p").reclaims == 1, what="the reclaim by timeout")
    second = node.proc("t", name="p", count=count, reclaim_timeout=0.1)
    assert second == first  # the same logs, claimed again: another claim
    for call in (lambda c: node.ack("p", claimed=c),
                 lambda c: node.ack_commit("p", {"topic": "o", "body": {}}, claimed=c),
                 lambda c: node.reclaim("p", claimed=c)):
        with pytest.raises(StaleClaim):
            call(first)
    st = node.inspect_proc("p")
    assert st.last_acked_range == "" and st.reclaims == 1
    assert node.ack("p", claimed=second)


def test_claimed_logs_stay_logs(node):
    node.commit([{"topic": "t", "body": {"i": i}} for i in range(3)])
    one = node.proc("t", name="a")
    assert isinstance(one, Log) and one == Log(one.id, {"i": 0})
    assert repr(one) == f"Log(id={one.id!r}, body={{'i': 0}})"
    assert one._replace(body={}) == (one.id, {})
    assert pickle.loads(pickle.dumps(one)) == one
    many = node.proc("t", name="b", count=2)
    assert isinstance(many, list) and many == [Log(x.id, x.body) for x in many]
    assert all(isinstance(x, Log) for x in many)
    assert pickle.loads(pickle.dumps(many)) == many
    # a claim's logs are not another proc's claim, even when the logs are the same
    node.proc("t", name="c")
    with pytest.raises(StaleClaim):
        node.ack("c", claimed=one)
    # logs built by hand (no identity) are checked by their ids, as before
    assert node.ack("a", claimed=Log(one.id, one.body)) == f"{one.id}..{one.id}"
    # an identity survives a pickle round trip (e.g. to another process)
    assert node.ack("b", claimed=pickle.loads(pickle.dumps(many)))


def test_available_proc_and_live_pass_the_identity(node):
    node.commit([{"topic": "t", "body": {"i": i}} for i in range(2)])
    spec = {"topic": "t", "name": "w", "count": 2, "reclaim_timeout": 0.1}
    name, first = node.available_proc([spec])
    wait_until(lambda: node.inspect_proc("w").reclaims == 1, what="the reclaim by timeout")
    name, second = node.available_proc([spec])
    assert second == first
    with pytest.raises(StaleClaim):
        node.ack(name, claimed=first)
    node.ack(name, claimed=second)


def test_aio_claimed_identifies_the_claim(tmp_path):
    async def main():
        pp = await pipeproc.aio.spawn(tmp_path / "s", workers=0)
        try:
            await pp.commit([{"topic": "t", "body": {"i": i}} for i in range(2)])
            first = await pp.proc("t", name="p", count=2, reclaim_timeout=0.1)
            deadline = time.monotonic() + 20
            while (await pp.inspect_proc("p")).reclaims != 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            second = await pp.proc("t", name="p", count=2, reclaim_timeout=0.1)
            assert second == first
            with pytest.raises(StaleClaim):
                await pp.ack("p", claimed=first)
            await pp.ack("p", claimed=second)
        finally:
            await pp.shutdown()
    asyncio.run(main())


# --------------------------------------------------------------------------- live flag

def test_user_proc_named_liveproc_survives_a_restart(tmp_path, spawner):
    loc = tmp_path / "store"
    import uuid
    looks_hidden = f"liveproc-{uuid.uuid4()}"
    pp = spawner(loc)
    pp.commit([{"topic": "t", "body": {"i": i}} for i in range(3)])
    for name in ("liveproc-mine", looks_hidden):
        assert pp.proc("t", name=name, count=2)
        pp.ack(name)
    live = pp.live_proc("t", mode="all")
    hidden = live.name
    pp.shutdown()
    pp = spawner(loc)
    pp.commit({"topic": "t", "body": {"i": 3}})  # after the start-up clean-up (one writer)
    for name in ("liveproc-mine", looks_hidden):
        st = pp.inspect_proc(name)
        assert st.last_acked_range.endswith("-1"), st
        assert pp.proc("t", name=name).body == {"i": 2}
    assert hidden not in pp.stats()["procs"]


def test_hidden_live_proc_of_a_killed_node_is_dropped(tmp_path, spawner):
    loc = tmp_path / "store"
    pp = spawner(loc)
    live = pp.live_proc("t", mode="all")
    pid = pp.stats()["node"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), what="the node's death")
    try:
        pp.shutdown(timeout=5)
    except PipeProcError:
        pass
    pp = spawner(loc)
    pp.commit({"topic": "t", "body": {}})
    assert live.name not in pp.stats()["procs"]


def test_hidden_procs_are_told_by_their_flag_and_legacy_records_by_name_and_options():
    from pipeproc._node import _is_live
    hidden_opts = {"max_reclaims": -1, "reclaim_timeout": -1.0, "on_max": "continue"}
    user_opts = {"max_reclaims": 10, "reclaim_timeout": 10.0, "on_max": "disable"}
    name = "liveproc-0b9e1b7e-4a44-4c6f-9d0e-8a3f6b2c1d55"
    assert _is_live("anything", {"live": True, **user_opts})
    assert not _is_live(name, {"live": False, **hidden_opts})  # a user's record: never
    # stores from before the flag: only what live_proc() made counts as hidden
    assert _is_live(name, dict(hidden_opts))
    assert not _is_live(name, dict(user_opts))
    assert not _is_live("liveproc-mine", dict(hidden_opts))


# --------------------------------------------------------------------------- fork

def _fork_worker(pp, topic, expect_len, n):
    """Calls whose replies tell the caller's requests apart; returns a failure or None."""
    for i in range(n):
        token = [os.getpid(), i]
        got = pp._call("ping", token)
        if got != [token]:
            return f"ping {token} got {got}"
        length = pp.length(topic)
        if length != expect_len:
            return f"length({topic}) {length} != {expect_len}"
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.no_prefetch  # it forks: no node start on a thread meanwhile
def test_fork_child_gets_its_own_connection(node):
    node.commit([{"topic": "parent", "body": {}} for _ in range(3)])
    node.commit([{"topic": "child", "body": {}} for _ in range(5)])
    assert node.length("parent") == 3  # the pool holds a connection before the fork
    n = 300
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            err = _fork_worker(node, "child", 5, n)
            if err is None:
                code = 0
            else:
                sys.stderr.write(f"child: {err}\n")
        except BaseException as exc:
            sys.stderr.write(f"child: {exc!r}\n")
            code = 2
        finally:
            os._exit(code)
    try:
        err = _fork_worker(node, "parent", 3, n)
    finally:
        _, status = os.waitpid(pid, 0)
    assert err is None, err
    assert os.waitstatus_to_exitcode(status) == 0
    assert node.length("parent") == 3  # the parent's client still works


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_aio_fork_child_opens_its_own_connection(tmp_path):
    pp = asyncio.run(pipeproc.aio.spawn(tmp_path / "s", workers=0))
    try:
        async def use(topic):
            return await pp.length(topic) if topic in await pp.topics() else 0

        async def fill():
            await pp.commit([{"topic": "p", "body": {}} for _ in range(3)])
        asyncio.run(fill())
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                code = 0 if asyncio.run(use("p")) == 3 else 1
            except BaseException as exc:
                sys.stderr.write(f"child: {exc!r}\n")
                code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        asyncio.run(pp.shutdown(timeout=10))


def test_a_reply_to_another_request_is_never_returned(node):
    from pipeproc._protocol import pack
    c = node._acquire()
    c.send_bytes(pack([10**9, "ping", "not yours"]))  # its reply stays unread
    node._idle.append(c)
    with pytest.raises(ConnectionLost, match="another request"):
        node._call("ping", "mine")
    assert node._call("ping", "mine") == ["mine"]  # a fresh connection


# --------------------------------------------------------------------------- timeouts

def test_shutdown_of_a_stopped_node_honours_its_timeout(tmp_path):
    pp = pipeproc.spawn(tmp_path / "s", workers=0)
    pid = pp.stats()["node"]["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(pipeproc.NoActiveNode):
            pipeproc.connect(tmp_path / "s", timeout=0.3)
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        pp.shutdown(timeout=0.5)
        took = time.monotonic() - t0
        assert took < 8, took
        assert not pid_alive(pid)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pp.shutdown(timeout=1)


def test_wait_for_procs_timeout_against_a_stopped_node(node):
    node.commit({"topic": "t", "body": {}})
    node.proc("t", name="busy", reclaim_timeout=None)
    pid = node.stats()["node"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            node.wait_for_procs(["busy"], timeout=0.3)
        assert time.monotonic() - t0 < 6
    finally:
        os.kill(pid, signal.SIGCONT)
    node.ack("busy")
    node.wait_for_procs(["busy"], timeout=10)


def test_aio_timeouts_against_a_stopped_node(tmp_path):
    async def main():
        pp = await pipeproc.aio.spawn(tmp_path / "s", workers=0)
        pid = (await pp.stats())["node"]["pid"]
        try:
            await pp.commit({"topic": "t", "body": {}})
            await pp.proc("t", name="busy", reclaim_timeout=None)
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(pipeproc.NoActiveNode):
                await pipeproc.aio.connect(tmp_path / "s", timeout=0.3)
            assert time.monotonic() - t0 < 5
            t0 = time.monotonic()
            with pytest.raises(Timeout):
                await pp.wait_for_procs(["busy"], timeout=0.3)
            assert time.monotonic() - t0 < 6
            t0 = time.monotonic()
            await pp.shutdown(timeout=0.5)
            assert time.monotonic() - t0 < 8
            assert not pid_alive(pid)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await pp.shutdown(timeout=1)
    asyncio.run(main())


# --------------------------------------------------------------------------- forgotten ack

def test_live_next_without_ack_raises_invalid_ack(node):
    live = node.live_proc("t", mode="all")
    try:
        node.commit([{"topic": "t", "body": {"i": i}} for i in range(2)])
        it = iter(live)
        first = next(it)
        with pytest.raises(InvalidAck, match=r"ack\(\).*reclaim\(\)"):
            next(it)
        live.reclaim()
        assert next(it) == first  # reclaimed: delivered again
        live.ack()
        assert next(it).body == {"i": 1}
        live.ack()
    finally:
        live.cancel()


def test_aio_live_next_without_ack_raises_invalid_ack(tmp_path):
    async def main():
        pp = await pipeproc.aio.spawn(tmp_path / "s", workers=0)
        try:
            live = await pp.live_proc("t", mode="all")
            await pp.commit([{"topic": "t", "body": {"i": i}} for i in range(2)])
            first = await live.__anext__()
            with pytest.raises(InvalidAck, match=r"ack\(\)"):
                await live.__anext__()
            await live.ack()
            assert (await live.__anext__()).body == {"i": 1}
            assert first.body == {"i": 0}
            await live.cancel()
        finally:
            await pp.shutdown()
    asyncio.run(main())


def test_aio_a_cancelled_wait_is_not_a_forgotten_ack(tmp_path):
    """A wait cancelled before its claim arrives hands the claim back; the next wait, parked
    beside it, must get the logs, not invalid_ack (the client never held that claim)."""
    async def main():
        pp = await pipeproc.aio.spawn(tmp_path / "s", workers=0)
        try:
            live = await pp.live_proc("t", mode="all")
            first = asyncio.ensure_future(live.__anext__())
            await pp.topics()  # one connection, served in order: the wait is parked
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            second = asyncio.ensure_future(live.__anext__())
            await pp.topics()
            await pp.commit({"topic": "t", "body": {"i": 0}})  # claimed for the first wait
            got = await asyncio.wait_for(second, 20)
            assert got.body == {"i": 0}
            await live.ack()
            await live.cancel()
        finally:
            await pp.shutdown()
    asyncio.run(main())


# --------------------------------------------------------------------------- node goes away

def test_node_sigterm_is_connection_lost_for_everyone_attached(tmp_path, spawner):
    loc = tmp_path / "store"
    pp = spawner(loc)
    pid = pp.stats()["node"]["pid"]
    other = pipeproc.connect(loc)  # its connection is open before the node goes
    waiter = pipeproc.connect(loc)
    outcome = {}
    live = other.live_proc("t", mode="all")

    def follow():
        try:
            for lg in live:
                live.ack()
            outcome["live"] = "ended normally"
        except BaseException as exc:
            outcome["live"] = exc

    def wait():
        try:
            waiter.wait_for_procs(["busy"])
            outcome["wait"] = "returned"
        except BaseException as exc:
            outcome["wait"] = exc

    pp.commit({"topic": "t", "body": {}})
    pp.proc("t", name="busy", reclaim_timeout=None)
    tail = subprocess.Popen([sys.executable, "-m", "pipeproc", "--location", str(loc), "tail",
                             "t", "-n", "0", "-f"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    threads = [threading.Thread(target=follow), threading.Thread(target=wait)]
    try:
        for t in threads:
            t.start()
        # our live proc acked its log (its next wait is on an open connection), the CLI's
        # live proc exists (it follows on open connections), then SIGTERM
        wait_until(lambda: pp.inspect_proc(live.name).last_acked_range, what="the live ack")
        wait_until(lambda: sum(n.startswith("liveproc-") for n in pp.stats()["procs"]) == 2,
               what="the CLI's live proc")
        os.kill(pid, signal.SIGTERM)
        rc = tail.wait(30)
        for t in threads:
            t.join(30)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
        err = tail.stderr.read()
        tail.stdout.close()
        tail.stderr.close()
        other.close()
        waiter.close()
    assert isinstance(outcome.get("live"), ConnectionLost), outcome
    assert isinstance(outcome.get("wait"), ConnectionLost), outcome
    assert rc == 3, err
    assert "connection_lost" in err or "went away" in err or "shutting down" in err, err


def test_aio_live_ends_with_connection_lost_on_node_sigterm(tmp_path, spawner):
    loc = tmp_path / "store"
    pp = spawner(loc)
    pid = pp.stats()["node"]["pid"]

    async def main():
        other = await pipeproc.aio.connect(loc)
        try:
            live = await other.live_proc("t", mode="all")
            await other.commit({"topic": "t", "body": {}})
            async for lg in live:
                await live.ack()
                os.kill(pid, signal.SIGTERM)  # the next wait parks, then the node stops
            return "ended normally"
        except ConnectionLost as exc:
            return exc
        finally:
            await other.close()
    assert isinstance(asyncio.run(main()), ConnectionLost)
