"""SPEC §2 and §3: process management — spawn, connect, shutdown, close, signals, TCP,
restarts, memory mode, file permissions, stats, clients shared by threads."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

import pipeproc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie — exited but not reaped — counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] not in ("Z", "X")


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait (bounded) for an external process to exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_python(code: str, *args, timeout: float = 60, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=cwd,
    )


def expect_code(code, fn, *args, **kwargs):
    with pytest.raises(pipeproc.PipeProcError) as e:
        fn(*args, **kwargs)
    assert e.value.code == code, (e.value.code, str(e.value))
    return e.value


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# spawn / connect
# ---------------------------------------------------------------------------------------------


def test_spawn_returns_connected_pipeproc(node):
    assert isinstance(node, pipeproc.PipeProc)
    assert node.commit({"topic": "t", "body": {}}).endswith("-0")


def test_connect_from_another_process(node, tmp_path):
    node.commit({"topic": "t", "body": {"from": "parent"}})
    code = textwrap.dedent("""
        import sys, pipeproc
        pp = pipeproc.connect(sys.argv[1])
        print([log.body for log in pp.range("t")])
        print(pp.commit({"topic": "t", "body": {"from": "child"}}))
        print(pp.commit([{"topic": "u", "body": [1]}, {"topic": "t", "body": [2]}]))
        pp.close()
    """)
    r = run_python(code, node.location)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[{'from': 'parent'}]"
    assert lines[1].endswith("-1")
    assert [log.body for log in node.range("t")] == [{"from": "parent"}, {"from": "child"}, [2]]
    assert node.range("u")[0].body == [1]
    # the child's close did not stop the node
    assert node.length("t") == 3


def test_many_clients_many_processes(node, tmp_path):
    code = textwrap.dedent("""
        import sys, pipeproc
        pp = pipeproc.connect(sys.argv[1])
        for i in range(20):
            pp.commit({"topic": "shared", "body": {"who": sys.argv[2], "i": i}})
        pp.close()
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(node.location), str(k)],
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(4)
    ]
    extra = [pipeproc.connect(node.location) for _ in range(3)]
    try:
        for c in extra:
            c.commit({"topic": "shared", "body": {"who": "extra"}})
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
    finally:
        for c in extra:
            c.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    logs = node.range("shared")
    assert len(logs) == 83
    assert [int(log.id.split("-")[1]) for log in logs] == list(range(83))
    for k in range(4):
        assert [log.body["i"] for log in logs if log.body.get("who") == str(k)] == list(range(20))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", [0.5, 1.2])
def test_connect_with_no_node_fails_in_time(tmp_path, timeout):
    t0 = time.monotonic()
    expect_code("no_active_node", pipeproc.connect, tmp_path / "nothing", timeout=timeout)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 3.0
    # nothing was created to hold a node
    t0 = time.monotonic()
    port = free_tcp_port()
    expect_code("no_active_node", pipeproc.connect, address=("127.0.0.1", port),
                authkey=b"k" * 32, timeout=timeout)
    assert time.monotonic() - t0 < timeout + 3.0


@pytest.mark.timeout(60)
def test_connect_retries_until_the_node_appears(spawner, tmp_path):
    loc = tmp_path / "late"
    result: dict = {}

    def connect():
        t0 = time.monotonic()
        try:
            result["client"] = pipeproc.connect(loc, timeout=20)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc
        result["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=connect)
    t.start()
    time.sleep(0.5)  # let connect start retrying before any node exists
    pp = spawner(loc)
    pp.commit({"topic": "t", "body": {}})
    t.join(30)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    c = result["client"]
    try:
        assert c.length("t") == 1
    finally:
        c.close()
    assert result["elapsed"] < 15


@pytest.mark.timeout(30)
def test_connect_to_location_of_stopped_node(spawner, tmp_path):
    pp = spawner(tmp_path / "store")
    pp.commit({"topic": "t", "body": {}})
    pp.shutdown()
    t0 = time.monotonic()
    expect_code("no_active_node", pipeproc.connect, tmp_path / "store", timeout=1.0)
    assert time.monotonic() - t0 < 4.0


@pytest.mark.timeout(15)
def test_connect_to_a_socket_nobody_answers(tmp_path):
    """A listening socket that never answers the handshake must not make connect hang."""
    loc = tmp_path / "store"
    pp = pipeproc.spawn(loc, workers=0)
    address, authkey = pp.address, pp.authkey
    pp.shutdown()
    if isinstance(address, str):
        if os.path.exists(address):
            os.unlink(address)
        os.makedirs(os.path.dirname(address), exist_ok=True)
        srv = socket.socket(socket.AF_UNIX)
    else:
        srv = socket.socket()
    try:
        srv.bind(address if isinstance(address, str) else tuple(address))
        srv.listen(5)
        t0 = time.monotonic()
        with pytest.raises(pipeproc.PipeProcError) as e:
            pipeproc.connect(address=address, authkey=authkey, timeout=1.0)
        assert e.value.code in ("no_active_node", "timeout")
        assert time.monotonic() - t0 < 5.0
    finally:
        srv.close()
        if isinstance(address, str) and os.path.exists(address):
            os.unlink(address)


def test_second_spawn_same_location(spawner, tmp_path):
    pp = spawner(tmp_path / "store")
    pp.commit({"topic": "t", "body": {}})
    for kw in ({}, {"memory": True}):
        expect_code("node_already_active", pipeproc.spawn, tmp_path / "store", workers=0, **kw)
    # the first node is untouched
    assert pp.length("t") == 1
    assert pp.commit({"topic": "t", "body": {}}).endswith("-1")


def test_second_spawn_from_another_process(node, tmp_path):
    code = textwrap.dedent("""
        import sys, pipeproc
        try:
            pipeproc.spawn(sys.argv[1], workers=0)
        except pipeproc.PipeProcError as e:
            print(e.code)
        else:
            print("spawned")
    """)
    r = run_python(code, node.location)
    assert r.stdout.strip() == "node_already_active", (r.stdout, r.stderr)
    assert node.commit({"topic": "t", "body": {}}).endswith("-0")


def test_second_spawn_same_tcp_address(spawner, tmp_path):
    pp = spawner(tmp_path / "a", address=("127.0.0.1", 0))
    with pytest.raises(pipeproc.PipeProcError) as e:
        other = pipeproc.spawn(tmp_path / "b", workers=0, address=tuple(pp.address))
        other.shutdown()
    assert e.value.code == "node_already_active"
    assert pp.commit({"topic": "t", "body": {}}).endswith("-0")


@pytest.mark.parametrize("call", [
    lambda pp: pp.commit({"topic": "t", "body": {}}),
    lambda pp: pp.range("t"),
    lambda pp: pp.revrange("t"),
    lambda pp: pp.length("t"),
    lambda pp: pp.topics(),
    lambda pp: pp.stats(),
    lambda pp: list(pp.iter_range("t")),
], ids=["commit", "range", "revrange", "length", "topics", "stats", "iter_range"])
def test_calls_after_shutdown_and_close(spawner, tmp_path, call):
    pp = spawner(tmp_path / "store")
    pp.commit({"topic": "t", "body": {}})
    other = pipeproc.connect(tmp_path / "store")
    other.close()
    expect_code("no_active_node", call, other)
    # close() disconnects only: the node keeps running
    call(pp)
    pp.shutdown()
    expect_code("no_active_node", call, pp)


def test_close_keeps_node_running(node, tmp_path):
    c = pipeproc.connect(node.location)
    c.commit({"topic": "t", "body": {}})
    c.close()
    c2 = pipeproc.connect(node.location)
    try:
        assert c2.length("t") == 1
    finally:
        c2.close()
    assert node.length("t") == 1


@pytest.mark.parametrize("how", ["location", "address"])
def test_wrong_authkey(node, tmp_path, how):
    if how == "location":
        args, kw = (node.location,), {"authkey": b"definitely-not-the-key"}
    else:
        args, kw = (), {"address": node.address, "authkey": b"definitely-not-the-key"}
    t0 = time.monotonic()
    expect_code("auth_failed", pipeproc.connect, *args, timeout=2.0, **kw)
    assert time.monotonic() - t0 < 10
    assert node.commit({"topic": "t", "body": {}}).endswith("-0")


def test_connect_by_address_and_authkey(node):
    assert isinstance(node.authkey, bytes) and len(node.authkey) >= 16
    c = pipeproc.connect(address=node.address, authkey=node.authkey)
    try:
        c.commit({"topic": "t", "body": {"x": 1}})
    finally:
        c.close()
    assert node.range("t")[0].body == {"x": 1}


def test_tcp_node(spawner, tmp_path):
    pp = spawner(tmp_path / "store", address=("127.0.0.1", 0))
    host, port = pp.address[0], pp.address[1]
    assert host == "127.0.0.1"
    assert isinstance(port, int) and port > 0
    # the port is really bound
    with socket.create_connection((host, port), timeout=5):
        pass
    pp.commit({"topic": "t", "body": {"via": "spawner"}})
    c = pipeproc.connect(address=(host, port), authkey=pp.authkey)
    try:
        c.commit({"topic": "t", "body": {"via": "tcp"}})
        assert [log.body for log in c.range("t")] == [{"via": "spawner"}, {"via": "tcp"}]
    finally:
        c.close()
    code = textwrap.dedent("""
        import sys, pipeproc
        pp = pipeproc.connect(address=(sys.argv[1], int(sys.argv[2])), authkey=bytes.fromhex(sys.argv[3]))
        print(pp.length("t"))
        pp.close()
    """)
    r = run_python(code, host, port, pp.authkey.hex())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2"
    expect_code("auth_failed", pipeproc.connect, address=(host, port), authkey=b"wrong", timeout=2.0)


def test_tcp_explicit_port(spawner, tmp_path):
    port = free_tcp_port()
    pp = spawner(tmp_path / "store", address=("127.0.0.1", port), authkey=b"my-secret-key-123")
    assert tuple(pp.address) == ("127.0.0.1", port)
    assert pp.authkey == b"my-secret-key-123"
    c = pipeproc.connect(address=("127.0.0.1", port), authkey=b"my-secret-key-123")
    try:
        assert c.commit({"topic": "t", "body": {}}).endswith("-0")
    finally:
        c.close()


def test_long_location_path(spawner, tmp_path, private_tmp):
    loc = tmp_path
    for i in range(6):
        loc = loc / ("d" * 30 + str(i))
    assert len(str(loc)) > 120  # too long for a Unix socket path
    pp = spawner(loc)
    pp.commit({"topic": "t", "body": {}})
    c = pipeproc.connect(loc)
    try:
        assert c.length("t") == 1
    finally:
        c.close()
    pp.shutdown()
    # the private runtime directory holding the socket does not outlive the node
    assert os.listdir(private_tmp) == [], os.listdir(private_tmp)
    pp2 = spawner(loc)
    assert pp2.length("t") == 1


def test_default_location_is_pipeproc_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pp = pipeproc.spawn(workers=0)
    try:
        assert (tmp_path / "pipeproc_data").is_dir()
        pp.commit({"topic": "t", "body": {}})
        c = pipeproc.connect()
        try:
            assert c.length("t") == 1
        finally:
            c.close()
    finally:
        pp.shutdown()


# ---------------------------------------------------------------------------------------------
# restarts and memory mode
# ---------------------------------------------------------------------------------------------


def test_restart_keeps_topics_and_counters(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc)
    ids_a = pp.commit([{"topic": "a", "body": {"i": i}} for i in range(3)])
    pp.commit({"topic": "b", "body": b"raw"})
    before = {t: pp.range(t) for t in ("a", "b")}
    pp.shutdown()
    pp2 = spawner(loc)
    assert sorted(pp2.topics()) == ["a", "b"]
    assert pp2.length("a") == 3 and pp2.length("b") == 1
    assert {t: pp2.range(t) for t in ("a", "b")} == before
    new = pp2.commit({"topic": "a", "body": {"i": 3}})
    ms, seq = map(int, new.split("-"))
    assert seq == 3
    assert ms >= int(ids_a[-1].split("-")[0])
    assert pp2.commit({"topic": "b", "body": {}}).endswith("-1")
    pp2.shutdown()
    pp3 = spawner(loc)
    assert pp3.length("a") == 4 and pp3.length("b") == 2


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A private TMPDIR for this test and the nodes it starts, to see what they leave."""
    d = tmp_path / "tmpdir"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _node_files(pid, exclude):
    """Paths of the regular files the process ``pid`` has open, outside ``exclude``."""
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/null", "/proc", str(exclude))):
            if os.path.isfile(target):
                out.add(target)
    return out


def _tree_size(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st_ = os.lstat(p)
            if stat.S_ISREG(st_.st_mode):
                total += st_.st_size
    return total


def test_memory_mode_starts_empty_and_leaves_nothing(spawner, tmp_path, private_tmp):
    loc = tmp_path / "mem"
    pp = spawner(loc, memory=True)
    pp.commit([{"topic": "t", "body": {"blob": b"x" * 100_000}} for _ in range(10)])
    assert pp.length("t") == 10
    # a second client reaches a memory node through its location
    c = pipeproc.connect(loc)
    try:
        assert c.length("t") == 10
    finally:
        c.close()
    # the location holds only the socket, lock and key: no store
    assert _tree_size(loc) < 64 * 1024
    for _root, _dirs, files in os.walk(loc):
        assert not any(f.endswith(".mdb") for f in files), files
    store_files = _node_files(pp.stats()["node"]["pid"], loc)  # e.g. a RAM-disk store
    pp.shutdown()
    assert _tree_size(loc) < 64 * 1024
    assert not [f for f in store_files if os.path.exists(f)], store_files
    assert os.listdir(private_tmp) == []
    pp2 = spawner(loc, memory=True)
    assert pp2.topics() == []
    expect_code("invalid_topic", pp2.length, "t")
    assert pp2.commit({"topic": "t", "body": {}}).endswith("-0")


def test_memory_mode_without_location(tmp_path, monkeypatch, private_tmp):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    pp = pipeproc.spawn(memory=True, workers=0)
    try:
        pp.commit({"topic": "t", "body": {}})
        store_files = _node_files(pp.stats()["node"]["pid"], "/nonexistent")
        c = pipeproc.connect(address=pp.address, authkey=pp.authkey)
        try:
            assert c.length("t") == 1
        finally:
            c.close()
    finally:
        pp.shutdown()
    assert os.listdir(work) == []  # no ./pipeproc_data
    assert not [f for f in store_files if os.path.exists(f)], store_files
    # the private temporary directory (socket, lock, key) is gone too
    assert os.listdir(private_tmp) == [], os.listdir(private_tmp)


def test_memory_node_does_not_touch_disk_store(spawner, tmp_path):
    loc = tmp_path / "store"
    pp = spawner(loc)
    pp.commit({"topic": "disk", "body": {}})
    pp.shutdown()
    mem = spawner(loc, memory=True)
    assert mem.topics() == []
    mem.commit({"topic": "mem", "body": {}})
    mem.shutdown()
    pp2 = spawner(loc)
    assert pp2.topics() == ["disk"]


# ---------------------------------------------------------------------------------------------
# permissions
# ---------------------------------------------------------------------------------------------


def _check_private(loc):
    bad = []
    for root, dirs, files in os.walk(loc):
        for d in [root] + [os.path.join(root, d) for d in dirs]:
            mode = stat.S_IMODE(os.lstat(d).st_mode)
            if mode != 0o700:
                bad.append((d, oct(mode)))
        for f in files:
            p = os.path.join(root, f)
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                continue
            mode = stat.S_IMODE(st_.st_mode)
            if stat.S_ISSOCK(st_.st_mode):
                # a socket is neither a file nor a directory: our reading of "private to
                # its owner" is no group / other bits at all
                if mode & 0o077:
                    bad.append((p, oct(mode)))
            elif mode != 0o600:
                bad.append((p, oct(mode)))
    assert not bad, bad


@pytest.mark.parametrize("memory", [False, True], ids=["disk", "memory"])
def test_file_permissions(spawner, tmp_path, memory):
    loc = tmp_path / "deep" / "store"
    old = os.umask(0)  # the node inherits a permissive umask: pipeproc must not rely on it
    try:
        pp = spawner(loc, memory=memory)
    finally:
        os.umask(old)
    pp.commit([{"topic": "t", "body": {"i": i}} for i in range(100)])
    c = pipeproc.connect(loc)
    c.close()
    assert os.listdir(loc)
    _check_private(loc)
    pp.shutdown()
    _check_private(loc)


# ---------------------------------------------------------------------------------------------
# signals and lifetime
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_node_is_graceful_shutdown(spawner, tmp_path, sig):
    loc = tmp_path / "store"
    pp = spawner(loc)
    ids = pp.commit([{"topic": "t", "body": {"i": i}} for i in range(50)])
    pid = pp.stats()["node"]["pid"]
    assert isinstance(pid, int) and pid != os.getpid() and pid_alive(pid)
    os.kill(pid, sig)
    assert wait_pid_gone(pid, 20), "node did not exit"
    with pytest.raises(pipeproc.PipeProcError) as e:
        pp.commit({"topic": "t", "body": {}})
    assert e.value.code in ("no_active_node", "connection_lost")
    pp2 = spawner(loc)
    assert [log.id for log in pp2.range("t")] == ids
    assert pp2.commit({"topic": "t", "body": {}}).endswith("-50")


SPAWN_THEN_WAIT = textwrap.dedent("""
    import sys, pipeproc
    pp = pipeproc.spawn(sys.argv[1], workers=int(sys.argv[2]))
    ids = pp.commit([{"topic": "t", "body": {"i": i}} for i in range(5)])
    st = pp.stats()
    print(st["node"]["pid"], *[w["pid"] for w in st["workers"]], flush=True)
    sys.stdin.read()   # wait to be killed
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [0, 1])
def test_node_exits_when_spawner_is_killed(spawner, tmp_path, workers):
    loc = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", SPAWN_THEN_WAIT, str(loc), str(workers)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(),
    )
    pids = []
    try:
        line = proc.stdout.readline()
        assert line.strip(), proc.stderr.read() if proc.poll() is not None else "no pid printed"
        pids = [int(x) for x in line.split()]
        assert len(pids) == 1 + workers
        for pid in pids:
            assert pid_alive(pid)
        proc.kill()
        proc.wait(timeout=10)
        for pid in pids:
            assert wait_pid_gone(pid, 30), f"pid {pid} outlived its spawner"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
        for pid in pids:  # never leak a node, even when the assertion failed
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    # the location is free again and the data is there
    pp = spawner(loc)
    assert [log.body["i"] for log in pp.range("t")] == list(range(5))


@pytest.mark.timeout(60)
def test_context_manager_shuts_down(tmp_path):
    loc = tmp_path / "store"
    with pipeproc.spawn(loc, workers=0) as pp:
        pid = pp.stats()["node"]["pid"]
        pp.commit({"topic": "t", "body": {}})
        with pipeproc.connect(loc) as c:
            assert c.length("t") == 1
        expect_code("no_active_node", c.length, "t")
        assert pp.length("t") == 1  # the connector's exit did not stop the node
    assert wait_pid_gone(pid, 20)
    expect_code("no_active_node", pp.length, "t")
    expect_code("no_active_node", pipeproc.connect, loc, timeout=0.5)
    with pipeproc.spawn(loc, workers=0) as pp2:
        assert pp2.length("t") == 1


@pytest.mark.timeout(60)
def test_context_manager_shuts_down_on_exception(tmp_path):
    loc = tmp_path / "store"
    with pytest.raises(KeyError):
        with pipeproc.spawn(loc, workers=0) as pp:
            pid = pp.stats()["node"]["pid"]
            raise KeyError("boom")
    assert wait_pid_gone(pid, 20)
    expect_code("no_active_node", pipeproc.connect, loc, timeout=0.5)


TOP_LEVEL_SCRIPT = """\
import os, sys
import pipeproc

with open(sys.argv[2], "a") as f:     # one line per execution of this module
    f.write(f"{os.getpid()}\\n")

pp = pipeproc.spawn(sys.argv[1])      # default workers=1, no __main__ guard
print("ID", pp.commit({"topic": "t", "body": {"x": 1}}), flush=True)
print("WORKERS", len(pp.stats()["workers"]), flush=True)
pp.shutdown()
print("DONE", flush=True)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["script", "stdin"])
def test_spawn_at_top_level_without_main_guard(tmp_path, how):
    script = tmp_path / "app.py"
    script.write_text(TOP_LEVEL_SCRIPT)
    marker = tmp_path / "executions.txt"
    loc = tmp_path / "store"
    if how == "script":
        cmd, stdin = [sys.executable, str(script), str(loc), str(marker)], None
    else:  # the module has no file, like an interactive session
        cmd, stdin = [sys.executable, "-", str(loc), str(marker)], TOP_LEVEL_SCRIPT
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60,
                       env=child_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["ID", "WORKERS", "DONE"], r.stdout
    assert lines[0].split()[1].endswith("-0")
    assert lines[1] == "WORKERS 1"
    assert len(marker.read_text().splitlines()) == 1, "the main module was executed again"


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------


def test_stats(spawner, tmp_path):
    pp = spawner(tmp_path / "store")
    st = pp.stats()
    assert isinstance(st, dict)
    node = st["node"]
    assert isinstance(node["pid"], int) and node["pid"] != os.getpid() and pid_alive(node["pid"])
    assert isinstance(node["uptime"], (int, float)) and 0 <= node["uptime"] < 120
    assert st["workers"] == []
    assert st["topics"] == {}
    assert st["procs"] == {}
    pp.commit([{"topic": "a", "body": {}} for _ in range(3)])
    pp.commit({"topic": "b", "body": {}})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pp.stats()["node"]["uptime"] <= node["uptime"]:
        time.sleep(0.01)
    st2 = pp.stats()
    assert st2["node"]["pid"] == node["pid"]
    assert st2["node"]["uptime"] > node["uptime"]
    assert set(st2["topics"]) == {"a", "b"}
    assert st2["topics"]["a"]["length"] == 3 and st2["topics"]["a"]["stored"] == 3
    assert st2["topics"]["b"]["length"] == 1 and st2["topics"]["b"]["stored"] == 1


@pytest.mark.timeout(60)
def test_stats_lists_workers_when_spawn_returns(spawner, tmp_path):
    pp = spawner(tmp_path / "store", workers=2)
    workers = pp.stats()["workers"]
    assert len(workers) == 2
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == 2
    for w in workers:
        assert pid_alive(w["pid"])
        assert w["executions"] == 0 and w["failures"] == 0
    node_pid = pp.stats()["node"]["pid"]
    assert node_pid not in pids
    pp.shutdown()
    for pid in pids + [node_pid]:
        assert wait_pid_gone(pid, 20)


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_client_shared_by_threads(node):
    n_threads, per_thread = 8, 40
    errors: list[BaseException] = []
    results: dict[int, list[str]] = {}
    barrier = threading.Barrier(n_threads)

    def work(k):
        try:
            barrier.wait(timeout=10)
            mine = []
            for i in range(per_thread):
                if i % 4 == 3:
                    ids = node.commit([{"topic": "shared", "body": {"k": k, "i": i}},
                                       {"topic": f"own{k}", "body": {"i": i}}])
                    mine.append(ids[0])
                    assert ids[1].endswith(f"-{i}")
                else:
                    mine.append(node.commit({"topic": "shared", "body": {"k": k, "i": i}}))
                    assert node.commit({"topic": f"own{k}", "body": {"i": i}}).endswith(f"-{i}")
                if i % 10 == 0:
                    own = node.range(f"own{k}")
                    assert [log.body["i"] for log in own] == list(range(i + 1))
                    node.length("shared")
                    node.topics()
            results[k] = mine
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=80)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    logs = node.range("shared")
    assert len(logs) == n_threads * per_thread
    assert sorted(log.id for log in logs) == sorted(i for ids in results.values() for i in ids)
    assert [int(log.id.split("-")[1]) for log in logs] == list(range(n_threads * per_thread))
    for k in range(n_threads):
        assert [log.body["i"] for log in logs if log.body["k"] == k] == list(range(per_thread))
        assert node.length(f"own{k}") == per_thread
        # each thread got its own answers back, in its own order
        seqs = [int(i.split("-")[1]) for i in results[k]]
        assert seqs == sorted(seqs)
        by_id = {log.id: log.body for log in logs}
        assert [by_id[i]["i"] for i in results[k]] == list(range(per_thread))
