"""The Redis backend's own guarantees (SCALE.md §1, §3, §4): what connect refuses, secrets
that never leak, ACL users kept to their namespace, a write request sent twice applied once,
a ``kill -9`` of the server losing nothing acknowledged, several supervisors on one namespace
(one of them killed), workers that run only allowed code, and ``pipeproc workers``.

Each test uses a fresh namespace of the session's private ``redis-server`` (conftest.py), or a
server of its own when it breaks or reconfigures it (``private_server``). Everything is
skipped, with the reason, when no ``redis-server`` is installed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Iterator, List

import msgpack
import pytest

import pipeproc
from helpers import pid_alive, wait_until
from redis_server import RedisServer, fresh_namespace, require_redis_server

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
M = "procmods.redis_mods"

pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def private_server() -> Iterator[Any]:
    """A factory of private redis-servers (``RedisServer`` keyword arguments), each stopped and
    removed after the test."""
    pytest.importorskip("redis", reason="redis-py not installed: pip install 'pipeproc[redis]'")
    exe = require_redis_server()
    started: List[RedisServer] = []

    def make(**kw: Any) -> RedisServer:
        server = RedisServer(exe, **kw)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in reversed(started):
            server.remove()


@pytest.fixture
def spawns(redis_url: str, rpp_namespace: str) -> Iterator[Any]:
    """A factory of ``spawn(redis=...)`` on the test's namespace; all shut down at the end."""
    made: List[Any] = []

    def make(**kw: Any) -> Any:
        kw.setdefault("workers", 1)
        pp = pipeproc.spawn(redis=redis_url, namespace=rpp_namespace, **kw)
        made.append(pp)
        return pp

    try:
        yield make
    finally:
        for pp in reversed(made):
            try:
                pp.shutdown()
            except Exception:  # noqa: BLE001 - the test's own failure matters
                pass


class Stderr:
    """What the supervisors and workers (children writing to our fd 2) logged so far."""

    def __init__(self, capfd: Any) -> None:
        self.capfd = capfd
        self.text = ""

    def read(self) -> str:
        self.text += self.capfd.readouterr().err
        return self.text

    def wait_for(self, *parts: str, timeout: float = 20.0) -> str:
        return wait_until(lambda: all(p in self.read() for p in parts) and self.text,
                          timeout=timeout, what=f"stderr containing {parts}")


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for k in ("PIPEPROC_LOCATION", "PIPEPROC_ADDRESS", "PIPEPROC_REDIS"):
        env.pop(k, None)
    env.update(extra)
    return env


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _all_text(exc: BaseException) -> str:
    """Everything an error shows: str, repr, message and its formatted traceback chain."""
    return "\n".join([str(exc), repr(exc), str(getattr(exc, "message", "")),
                      "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))])


# ---------------------------------------------------------------------------------------------
# connect: what it refuses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"location": "somewhere"}, {"address": ("127.0.0.1", 1)},
                                {"authkey": b"k" * 32}], ids=lambda kw: next(iter(kw)))
def test_connect_refuses_node_arguments(redis_url, kw):
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.connect(redis=redis_url, namespace=fresh_namespace(), **kw)
    assert e.value.code == "invalid_argument"


@pytest.mark.parametrize("kw", [{"location": "somewhere"}, {"memory": True},
                                {"address": ("127.0.0.1", 0)}, {"authkey": b"k" * 32}],
                         ids=lambda kw: next(iter(kw)))
def test_spawn_refuses_node_arguments(redis_url, kw, tmp_path):
    if "location" in kw:
        kw = {"location": str(tmp_path / "store")}
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.spawn(redis=redis_url, namespace=fresh_namespace(), workers=0, **kw)
    assert e.value.code == "invalid_argument"
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("namespace", ["", "a b", "{x}", "a:b", "x" * 201, 5])
def test_bad_namespace_is_refused(redis_url, namespace):
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.connect(redis=redis_url, namespace=namespace)
    assert e.value.code == "invalid_argument"


@pytest.mark.parametrize("opts", [{"retry_on_timeout": True}, {"socket_timeout": 0.5}])
def test_options_that_break_the_guarantees_are_refused(redis_url, opts):
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.connect(redis=redis_url, namespace=fresh_namespace(), redis_options=opts)
    assert e.value.code == "invalid_argument"


def test_eviction_policy_is_refused_before_any_write(private_server):
    """A maxmemory-policy other than noeviction lets Redis delete streams and procs: refused
    (at connect, or at the first write at the latest), and nothing is written."""
    server = private_server(extra_args=["--maxmemory-policy", "allkeys-lru"])
    ns = fresh_namespace()
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp = pipeproc.connect(redis=server.url(), namespace=ns)
        try:
            pp.commit({"topic": "t", "body": {}})
        finally:
            pp.close()
    assert e.value.code == "invalid_argument"
    assert "noeviction" in e.value.message
    assert server.call("DBSIZE") == 0


def test_full_durability_on_7_0_needs_appendfsync_always(private_server):
    server = private_server(extra_args=["--appendfsync", "everysec"])
    if tuple(int(x) for x in server.call("INFO", "server").split(b"redis_version:")[1]
             .split(b"\r\n")[0].split(b".")[:2]) >= (7, 2):
        pytest.skip("Redis >= 7.2 waits with WAITAOF instead")
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.connect(redis=server.url(), namespace=fresh_namespace())
    assert e.value.code == "invalid_argument" and "appendfsync" in e.value.message
    pp = pipeproc.connect(redis=server.url(), namespace=fresh_namespace(), durability="fast")
    try:
        assert pp.commit({"topic": "t", "body": {}}).endswith("-0")
    finally:
        pp.close()


def test_no_server_is_no_active_node_quickly_and_secret_free():
    from redis_server import free_port

    pytest.importorskip("redis", reason="redis-py not installed: pip install 'pipeproc[redis]'")
    secret = "s3cret-" + secrets.token_hex(8)
    t0 = time.monotonic()
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.connect(redis=f"redis://:{secret}@127.0.0.1:{free_port()}/0",
                         namespace="x", timeout=0.5)
    assert e.value.code == "no_active_node"
    assert time.monotonic() - t0 < 5
    assert secret not in _all_text(e.value)


# ---------------------------------------------------------------------------------------------
# secrets and ACL users
# ---------------------------------------------------------------------------------------------


def test_wrong_password_is_auth_failed_and_never_shown(redis_server):
    wrong = "wr0ng-" + secrets.token_hex(8)
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.connect(redis=redis_server.url(password=wrong), namespace=fresh_namespace())
    assert e.value.code == "auth_failed"
    assert wrong not in _all_text(e.value)
    assert redis_server.password not in _all_text(e.value)
    # a wrong user too
    with pytest.raises(pipeproc.PipeProcError) as e:
        pipeproc.connect(redis=redis_server.url(username="nobody", password=wrong),
                         namespace=fresh_namespace())
    assert e.value.code == "auth_failed"
    assert wrong not in _all_text(e.value)


def test_the_password_is_not_in_repr_stats_or_errors(redis_server, rpp):
    pw = redis_server.password
    assert pw not in repr(rpp) and pw not in str(rpp)
    rpp.commit({"topic": "t", "body": {}})
    stats = rpp.stats()
    assert pw not in repr(stats)
    assert "node" not in stats  # only a node has those (SCALE.md §3), absent, not zero
    with pytest.raises(pipeproc.PipeProcError) as e:
        rpp.range("missing")
    assert pw not in _all_text(e.value)
    rpp.close()
    with pytest.raises(pipeproc.PipeProcError) as e:
        rpp.commit({"topic": "t", "body": {}})
    assert e.value.code == "no_active_node"
    assert pw not in _all_text(e.value)


@pytest.fixture
def acl_user(redis_server) -> Iterator[Any]:
    """A factory of ACL users allowed the keys ``~{<namespace>}:*`` of one namespace (and every
    command but the dangerous ones); each is deleted after the test."""
    made: List[str] = []

    def make(namespace: str) -> str:
        user = "u" + secrets.token_hex(6)
        password = secrets.token_hex(12)
        redis_server.call("ACL", "SETUSER", user, "reset", "on", f">{password}",
                          f"~{{{namespace}}}:*", "resetchannels", "+@all", "-@dangerous")
        made.append(user)
        return redis_server.url(username=user, password=password)

    try:
        yield make
    finally:
        for user in made:
            redis_server.call("ACL", "DELUSER", user)


def test_acl_user_works_in_its_namespace_and_is_refused_outside(redis_server, acl_user):
    shop, other = fresh_namespace("shop"), fresh_namespace("other")
    url = acl_user(shop)
    pp = pipeproc.connect(redis=url, namespace=shop)
    try:
        ids = pp.commit([{"topic": "orders", "body": {"n": n}} for n in range(3)])
        assert [log.id for log in pp.range("orders")] == ids
        log = pp.proc("orders", name="billing")
        assert pp.ack("billing", claimed=log) == f"{ids[0]}..{ids[0]}"
        assert pp.stats()["topics"]["orders"]["length"] == 3
        assert _find(pp.stats(), "appendfsync") == "unknown"  # no CONFIG for this user
        pp.wait_for_procs(["nothing"], timeout=5)
    finally:
        pp.close()
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp = pipeproc.connect(redis=url, namespace=other)
        try:
            pp.commit({"topic": "orders", "body": {"n": 0}})
        finally:
            pp.close()
    assert e.value.code == "auth_failed"
    assert url.split(":")[2].split("@")[0] not in _all_text(e.value)  # the user's password
    assert redis_server.call("KEYS", f"{{{other}}}*") == []


# ---------------------------------------------------------------------------------------------
# a write request sent twice is applied once
# ---------------------------------------------------------------------------------------------


def _key_args(claimed: Any = None) -> List[str]:
    from pipeproc import _rops

    return _rops._key_args(claimed)


def test_a_commit_sent_twice_is_applied_once(rpp):
    backend = rpp._backend
    body = msgpack.packb({"n": 1})
    rid = ("test-client-" + secrets.token_hex(4), "1")
    first = backend.script("commit", "t", body, rid=rid)
    again = backend.script("commit", "t", body, rid=rid)  # its reply was "lost": sent again
    assert again == first
    assert rpp.length("t") == 1
    nxt = backend.script("commit", "t", body, rid=(rid[0], "2"))  # the client's next request
    assert nxt != first
    assert rpp.length("t") == 2
    assert [log.body for log in rpp.range("t")] == [{"n": 1}, {"n": 1}]
    # another client's request 1 is another request
    backend.script("commit", "t", body, rid=("other-client", "1"))
    assert rpp.length("t") == 3


def test_an_ack_commit_sent_twice_is_applied_once(rpp):
    backend = rpp._backend
    ids = rpp.commit([{"topic": "in", "body": {"n": n}} for n in range(2)])
    rpp.proc("in", name="p")
    rid = ("test-client-" + secrets.token_hex(4), "7")
    out = msgpack.packb({"out": 1})
    first = backend.script("ackc", "p", *_key_args(), "out", out, rid=rid)
    again = backend.script("ackc", "p", *_key_args(), "out", out, rid=rid)
    assert again == first  # not invalid_ack, not a second commit
    assert rpp.length("out") == 1
    st = rpp.inspect_proc("p")
    assert st.last_acked_range == f"{ids[0]}..{ids[0]}" and st.reclaims == 0
    assert rpp.proc("in", name="p").id == ids[1]


def test_a_claim_sent_twice_is_one_claim(rpp):
    backend = rpp._backend
    ids = rpp.commit([{"topic": "in", "body": {"n": n}} for n in range(3)])
    rid = ("test-client-" + secrets.token_hex(4), "3")
    args = ("in", "p", ">", 2, 10, "10.0", "disable")
    first = backend.script("proc", *args, rid=rid)
    again = backend.script("proc", *args, rid=rid)
    assert again == first  # the same claim delivered again, not None, not the next logs
    st = rpp.inspect_proc("p")
    assert st.last_claimed_range == f"{ids[0]}..{ids[1]}"
    assert rpp.proc("in", name="p") is None  # one pending claim
    rpp.ack("p")
    # once that claim is acked, the same request again is refused, not a new claim
    with pytest.raises(pipeproc.PipeProcError) as e:
        backend.script("proc", *args, rid=rid)
    assert e.value.code == "stale_claim"
    assert rpp.inspect_proc("p").last_acked_range == f"{ids[0]}..{ids[1]}"


# ---------------------------------------------------------------------------------------------
# kill -9 of the server: nothing acknowledged is lost
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_server_killed_with_sigkill_loses_nothing_acknowledged(private_server):
    """A clean shutdown saves first and proves nothing: the server is killed with SIGKILL
    while clients commit and ack, restarted on the same directory and port, and every
    acknowledged commit and ack is there."""
    server = private_server()
    ns = fresh_namespace("crash")
    url = server.url()
    setup = pipeproc.connect(redis=url, namespace=ns)
    setup.commit([{"topic": "work", "body": {"n": n}} for n in range(100_000 // 100)])
    setup.close()
    acked_commits: List[List[str]] = [[] for _ in range(3)]
    acked_ranges: List[str] = []
    stop = threading.Event()
    errors: List[BaseException] = []

    def committer(k: int) -> None:
        pp = pipeproc.connect(redis=url, namespace=ns)
        try:
            n = 0
            while not stop.is_set():
                if n % 2:
                    lids = pp.commit([{"topic": f"c{k}", "body": {"n": n, "i": i}}
                                      for i in range(3)])
                else:
                    lids = [pp.commit({"topic": f"c{k}", "body": {"n": n, "i": 0}})]
                acked_commits[k].extend(lids)  # acknowledged: must survive
                n += 1
        except pipeproc.PipeProcError as exc:
            if exc.code not in ("connection_lost", "no_active_node"):
                errors.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            pp.close()

    def consumer() -> None:
        pp = pipeproc.connect(redis=url, namespace=ns)
        try:
            while not stop.is_set():
                log = pp.proc("work", name="cons", reclaim_timeout=-1)
                if log is None:
                    break
                acked_ranges.append(pp.ack("cons", claimed=log))
        except pipeproc.PipeProcError as exc:
            if exc.code not in ("connection_lost", "no_active_node"):
                errors.append(exc)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            pp.close()

    threads = [threading.Thread(target=committer, args=(k,), daemon=True) for k in range(3)]
    threads.append(threading.Thread(target=consumer, daemon=True))
    for th in threads:
        th.start()
    wait_until(lambda: sum(map(len, acked_commits)) >= 300 and len(acked_ranges) >= 50,
               timeout=30, what="some acknowledged writes")
    server.kill()  # SIGKILL, mid-flight
    stop.set()
    for th in threads:
        th.join(30)
    assert not errors, errors
    print(f"\n{sum(map(len, acked_commits))} commits and {len(acked_ranges)} acks acknowledged "
          "before the kill")
    server.crash_and_restart()
    pp = pipeproc.connect(redis=url, namespace=ns)
    try:
        for k in range(3):
            stored = {log.id: log.body for log in pp.range(f"c{k}")}
            missing = [i for i in acked_commits[k] if i not in stored]
            assert not missing, f"{len(missing)} acknowledged commits lost, e.g. {missing[:3]}"
            # sequences have no holes, and the next commit continues after them
            seqs = [int(i.split("-")[1]) for i in stored]
            assert seqs == list(range(len(seqs)))
            nxt = pp.commit({"topic": f"c{k}", "body": {}})
            assert int(nxt.split("-")[1]) == len(seqs)
            assert int(nxt.split("-")[0]) >= max(int(i.split("-")[0]) for i in stored)
        # the last acknowledged ack is there (or one after it, whose reply was lost)
        last = acked_ranges[-1].split("..")[1]
        st = pp.inspect_proc("cons")
        got = st.last_acked_range.split("..")[1]
        assert int(got.split("-")[1]) >= int(last.split("-")[1])
        assert int(got.split("-")[1]) <= int(last.split("-")[1]) + 1
    finally:
        pp.close()


# ---------------------------------------------------------------------------------------------
# supervisors and workers
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_two_spawns_one_killed_the_other_reclaims_and_keeps_processing(spawns, tmp_path):
    a = spawns(workers=1, allow=[M])
    b = spawns(workers=1, allow=[M])
    sups = {a._process.pid: a, b._process.pid: b}
    assert len(a.stats()["workers"]) == 2  # one namespace, workers of both spawns
    a.system_proc(name="sp", from_="in", processor=f"{M}:hold_first", to="out",
                  reclaim_timeout=120.0, max_reclaims=5)
    # both serve the proc
    a.commit([{"topic": "in", "body": {"n": n}} for n in range(6)])
    a.wait_for_procs(["sp"], timeout=30)
    assert [log.body["n"] for log in a.range("out")] == list(range(6))
    # the next log is claimed by a worker that hangs holding it
    a.commit({"topic": "in", "body": {"n": 6, "dir": str(tmp_path)}})
    holder = tmp_path / "holder"
    wait_until(holder.exists, timeout=20, what="a worker holding the claim")
    pid = int(holder.read_text())
    sup = _ppid(pid)
    assert sup in sups, (pid, sup, list(sups))
    survivor = sups[a._process.pid if sup == b._process.pid else b._process.pid]
    more = survivor.commit([{"topic": "in", "body": {"n": n}} for n in range(7, 10)])
    t0 = time.monotonic()
    os.killpg(sup, signal.SIGKILL)  # the supervisor's process group: it and its workers
    wait_until(lambda: not pid_alive(pid) and not pid_alive(sup), what="killed")
    # the dead worker's claim is reclaimed (its heartbeats stopped) and processed elsewhere
    survivor.wait_for_procs(["sp"], timeout=60)
    took = time.monotonic() - t0
    out = survivor.range("out")
    assert [log.body["n"] for log in out] == list(range(10))
    assert {log.body["pid"] for log in out[6:]} <= {w["pid"] for w in
                                                  survivor.stats()["workers"]}
    st = survivor.inspect_proc("sp")
    assert st.status == "active" and st.reclaims == 0  # acked since
    assert st.last_acked_range.endswith(more[-1])
    print(f"\nclaim of a killed host's worker reclaimed and done in {took:.1f} s")
    assert took < 30
    # the dead supervisor's workers leave the list
    wait_until(lambda: all(_ppid_or(w["pid"]) != sup for w in survivor.stats()["workers"]),
               timeout=30, what="dead workers gone from stats")


def _ppid_or(pid: int) -> int:
    try:
        return _ppid(pid)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return -1


@pytest.mark.timeout(90)
def test_processor_outside_allow_is_skipped_not_failed(spawns, capfd):
    err = Stderr(capfd)
    pp = spawns(workers=1, allow=[M])
    pp.system_proc(name="foreign", from_="in", processor="procmods.sysmods:double", to="out",
                   max_reclaims=1)
    pp.system_proc(name="mine", from_="in", processor=f"{M}:inc", to="mine_out")
    pp.commit([{"topic": "in", "body": {"n": n}} for n in range(3)])
    pp.wait_for_procs(["mine"], timeout=30)
    err.wait_for("procmods.sysmods:double", "allow")
    st = pp.inspect_proc("foreign")
    assert st.status == "active" and st.reclaims == 0 and st.last_error is None
    assert st.last_claimed_range == ""  # never claimed by a worker that may not run it
    assert "out" not in pp.topics()
    # a host that allows it runs it
    other = spawns(workers=1, allow=["procmods"])
    other.wait_for_procs(["foreign"], timeout=30)
    assert [log.body["n"] for log in pp.range("out")] == [0, 2, 4]


@pytest.mark.timeout(60)
def test_workers_without_allow_run_nothing_and_say_so(spawns, capfd):
    err = Stderr(capfd)
    pp = spawns(workers=1)
    err.wait_for("allow")
    pp.system_proc(name="sp", from_="in", processor=f"{M}:inc", to="out")
    pp.commit({"topic": "in", "body": {"n": 1}})
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.wait_for_procs(["sp"], timeout=1.0)
    assert e.value.code == "timeout"
    assert "out" not in pp.topics()


def test_spawn_shutdown_stops_local_workers_only_the_data_stays(spawns, redis_url,
                                                                rpp_namespace):
    pp = spawns(workers=1, allow=[M])
    pids = [w["pid"] for w in pp.stats()["workers"]]
    sup = pp._process.pid
    pp.system_proc(name="sp", from_="in", processor=f"{M}:inc", to="out")
    pp.commit({"topic": "in", "body": {"n": 1}})
    pp.wait_for_procs(timeout=30)
    pp.shutdown()
    wait_until(lambda: not any(map(pid_alive, pids + [sup])), what="workers stopped")
    other = pipeproc.connect(redis=redis_url, namespace=rpp_namespace)
    try:
        assert other.range("out")[0].body["n"] == 2
        assert "sp" in other.stats()["procs"]
    finally:
        other.close()


@pytest.mark.timeout(90)
def test_two_hosts_workers_share_a_system_proc(spawns, tmp_path):
    """Workers of two spawns (two hosts) run one system proc's procs at the same time: each
    processor waits until it has met the other host's worker."""
    a = spawns(workers=1, allow=[M])
    b = spawns(workers=1, allow=[M])
    a.system_proc(name="sp", from_=["x", "y"], processor=f"{M}:rendezvous", to="out")
    b.commit([{"topic": t, "body": {"n": n, "dir": str(tmp_path), "hosts": 2}}
              for n, t in enumerate(["x", "y"])])
    b.wait_for_procs(timeout=40)
    out = a.range("out")
    assert sorted(log.body["n"] for log in out) == [0, 1]
    assert all(log.body["met"] == 2 for log in out), out
    assert {_ppid_or(log.body["pid"]) for log in out} == {a._process.pid, b._process.pid}


def test_a_processor_a_host_cannot_import_is_skipped_not_counted(spawns, tmp_path, capfd):
    err = Stderr(capfd)
    mod = tmp_path / "gone.py"
    # importable in this process only (where system_proc checks it), never in a worker
    mod.write_text(f"import os\nif os.getpid() != {os.getpid()}:\n"
                   "    raise ImportError('gone.py is not on this host')\n"
                   "def process(log):\n    return log.body\n")
    pp = spawns(workers=1, allow=[str(tmp_path) + os.sep, M])
    pp.system_proc(name="imp", from_="in", processor=str(mod), to="out", max_reclaims=1)
    pp.system_proc(name="mine", from_="in", processor=f"{M}:inc", to="mine_out")
    pp.commit({"topic": "in", "body": {"n": 1}})
    pp.wait_for_procs(["mine"], timeout=30)
    err.wait_for("gone.py", "import")
    st = pp.inspect_proc("imp")
    assert st.status == "active" and st.reclaims == 0 and st.last_error is None
    assert st.last_claimed_range == ""
    assert "out" not in pp.topics()


def _find(d: Any, key: str) -> Any:
    """The value of ``key`` anywhere in nested dicts (None when absent)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def test_stats_report_the_servers_persistence_settings(rpp):
    stats = rpp.stats()
    assert _find(stats, "appendfsync") == "always"
    assert _find(stats, "maxmemory-policy") == "noeviction"


@pytest.mark.timeout(60)
def test_replicated_durability_without_a_replica_is_timeout(redis_url, rpp_namespace):
    pp = pipeproc.connect(redis=redis_url, namespace=rpp_namespace, durability="replicated")
    try:
        with pytest.raises(pipeproc.PipeProcError) as e:
            pp.commit({"topic": "t", "body": {"n": 1}})
        assert e.value.code == "timeout"
        assert pp.length("t") == 1  # on the primary: only the replica's copy is missing
    finally:
        pp.close()


#: Longer than the socket timeouts of every connection pipeproc opens (5 s, workers 10 s).
IDLE_SECONDS = 12.0


@pytest.mark.timeout(90)
def test_waits_outlive_the_socket_timeouts(spawns, rpp):
    """A live proc, a ``wait_for_procs`` and an idle worker each block longer than the
    connections' socket timeouts (redis-py: the connect timeout, 5-10 s): they keep waiting
    and are woken by the next change, never ended with ``connection_lost``."""
    pp = spawns(workers=1, allow=[M])
    pp.system_proc(name="sp", from_="in", processor=f"{M}:inc", to="out")
    rpp.commit({"topic": "work", "body": {}})
    rpp.proc("work", name="manual", reclaim_timeout=-1)  # pending: wait_for_procs waits
    live = rpp.live_proc("feed", mode="live")
    results: dict = {}

    def iterate() -> None:
        try:
            for log in live:
                results["live"] = log
                live.ack()
                return
        except BaseException as exc:  # noqa: BLE001 - reported below
            results["live"] = exc

    def wait() -> None:
        try:
            rpp.wait_for_procs(["manual"])
            results["wait"] = "done"
        except BaseException as exc:  # noqa: BLE001
            results["wait"] = exc

    threads = [threading.Thread(target=iterate, daemon=True),
               threading.Thread(target=wait, daemon=True)]
    for th in threads:
        th.start()
    # idle on purpose, longer than any socket timeout (a condition cannot stand in for it)
    time.sleep(IDLE_SECONDS)
    assert not results, results  # nobody woke up with an error meanwhile
    lid = pp.commit({"topic": "feed", "body": {"n": 1}})
    pp.commit({"topic": "in", "body": {"n": 1}})
    rpp.ack("manual")
    for th in threads:
        th.join(15)
    assert results.get("live") == pipeproc.Log(lid, {"n": 1}), results
    assert results.get("wait") == "done", results
    pp.wait_for_procs(["sp"], timeout=15)
    assert rpp.range("out")[0].body["n"] == 2
    live.cancel()


# ---------------------------------------------------------------------------------------------
# the CLI and the async client
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_cli_workers_process_a_system_proc(redis_server, rpp, rpp_namespace):
    rpp.system_proc(name="sp", from_="in", processor=f"{M}:inc", to="out")
    env = _env(PIPEPROC_REDIS=redis_server.url())
    p = subprocess.Popen([sys.executable, "-m", "pipeproc", "workers", "--namespace",
                          rpp_namespace, "-n", "2", "--allow", M],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=HERE)
    try:
        rpp.commit([{"topic": "in", "body": {"n": n}} for n in range(5)])
        wait_until(lambda: p.poll() is not None or ("out" in rpp.topics()
                                                    and rpp.length("out") == 5),
                   timeout=30, what="the CLI's workers processing the logs")
        assert p.poll() is None, p.communicate(timeout=10)
        assert sorted(log.body["n"] for log in rpp.range("out")) == [1, 2, 3, 4, 5]
        with open(f"/proc/{p.pid}/cmdline") as f:
            assert redis_server.password not in f.read()
        p.send_signal(signal.SIGINT)
        out, errs = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode in (0, -signal.SIGINT, 130), (p.returncode, errs)
    assert redis_server.password not in out + errs
    # another command of the CLI on the same namespace
    r = subprocess.run([sys.executable, "-m", "pipeproc", "--namespace", rpp_namespace,
                        "topics"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "in" in r.stdout.split() and "out" in r.stdout.split()
    assert redis_server.password not in r.stdout + r.stderr


def test_cli_never_takes_the_url_from_argv(redis_server, rpp_namespace):
    r = subprocess.run([sys.executable, "-m", "pipeproc", "--redis", redis_server.url(),
                        "--namespace", rpp_namespace, "topics"], capture_output=True,
                       text=True, env=_env(), timeout=60)
    assert r.returncode != 0
    assert redis_server.password not in r.stdout + r.stderr


def test_async_client_on_redis(redis_url, rpp_namespace):
    from pipeproc import aio

    async def main() -> None:
        pp = await aio.connect(redis=redis_url, namespace=rpp_namespace)
        try:
            ids = await pp.commit([{"topic": "t", "body": {"n": n}} for n in range(3)])
            assert [log.id for log in await pp.range("t")] == ids
            log = await pp.proc("t", name="p", count=2)
            assert [x.id for x in log] == ids[:2]
            assert await pp.ack("p", claimed=log) == f"{ids[0]}..{ids[1]}"
            live = await pp.live_proc("t", mode="all")
            got = await asyncio.wait_for(live.__anext__(), 10)
            assert got.id == ids[0]
            await live.cancel()
        finally:
            await pp.close()

    asyncio.run(main())
