"""Issue #6, security: private files, authentication, and peers that never authenticate.

* SPEC §3: "Everything pipeproc creates there is private to its owner (files 0600,
  directories 0700)" — checked entry by entry with ``os.stat`` for a disk node (while it runs
  and after it stopped), a memory node with and without a location (including the store
  files it keeps open on ``/dev/shm``, through ``/proc/<pid>/fd``), and a location whose
  socket path is too long (the socket then lives in a private runtime directory).
* "a client with a wrong key is refused": ``auth_failed`` for ``connect``, an
  ``AuthenticationError`` for a raw ``multiprocessing`` client, the refusal is logged by the
  node (its log goes to its stderr, inherited from the spawning process: the tests point
  fd 2 at a file while spawning), and refused clients do not disturb the others.
* peers that connect and never complete the handshake (or send garbage instead) do not
  block anyone, are not kept forever, and leak nothing.
* the authkey never shows up where another user could read it (command lines, environments,
  the address file, ``stats()``, the node's log).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import pipeproc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stress_util import count, record_rss, wait_until  # noqa: E402

REFUSAL = "refused a connection from "  # ... "<peer>: authentication failed (...)"


# ----------------------------------------------------------------------------- helpers




@contextlib.contextmanager
def stderr_to(path):
    """Point this process's fd 2 at ``path`` (a node spawned meanwhile inherits it as its
    stderr, where it logs)."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def spawn_logged(location, log_path, **kw):
    kw.setdefault("workers", 0)
    with stderr_to(log_path):
        return pipeproc.spawn(location, **kw)


def read_log(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def addr_of(pp):
    a = pp.address
    return tuple(a) if isinstance(a, list) else a


def raw_socket(addr):
    s = socket.socket(socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET)
    s.settimeout(10)
    s.connect(addr)
    return s


def check_private(path, *, what=""):
    """``path`` is ours and private: a directory 0700, a regular file 0600, anything else
    (a socket) no access for group and others. Returns a description of the entry."""
    st_ = os.lstat(path)
    mode = stat.S_IMODE(st_.st_mode)
    label = f"{what}{path}"
    assert st_.st_uid == os.getuid(), f"{label} belongs to uid {st_.st_uid}"
    if stat.S_ISDIR(st_.st_mode):
        assert mode == 0o700, f"directory {label} has mode {mode:o}, not 700"
        return "dir"
    if stat.S_ISREG(st_.st_mode):
        assert mode == 0o600, f"file {label} has mode {mode:o}, not 600"
        return "file"
    if stat.S_ISSOCK(st_.st_mode):
        assert mode & 0o077 == 0, f"socket {label} has mode {mode:o}: open to group/others"
        return "socket"
    raise AssertionError(f"{label}: unexpected kind of entry (mode {st_.st_mode:o})")


def check_tree(root):
    """Every entry under ``root`` (and ``root`` itself) is private; returns their
    relative paths and kinds."""
    seen = {".": check_private(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if not os.path.lexists(p):
                continue  # a temporary file replaced meanwhile
            seen[os.path.relpath(p, root)] = check_private(p)
    count("operations verified", len(seen))
    return seen


def exercise(pp):
    """Make the node create what it creates in normal use."""
    pp.commit([{"topic": "t", "body": {"i": i}} for i in range(10)])
    pp.proc("t", name="p")
    pp.ack("p")
    assert len(pp.range("t")) == 10


# ----------------------------------------------------------------------------- private files


@pytest.mark.timeout(120)
def test_disk_location_entries_are_private(tmp_path, spawner):
    base = tmp_path / "made" / "by" / "spawn"  # none of it exists yet
    pp = spawner(base / "loc")
    exercise(pp)
    running = check_tree(str(tmp_path / "made"))
    loc = "by/spawn/loc"
    for name in ("node.key", "node.lock", "node.sock", "node.address"):
        assert f"{loc}/{name}" in running, sorted(running)
    assert running[f"{loc}/node.sock"] == "socket"
    store_files = [p for p, kind in running.items() if p.startswith(f"{loc}/store/")]
    assert store_files, f"no store files under {loc}/store: {sorted(running)}"
    with open(base / "loc" / "node.key", "rb") as f:
        assert f.read() == pp.authkey
    pp.shutdown()
    after = check_tree(str(tmp_path / "made"))  # what stays behind is private too
    assert f"{loc}/node.key" in after and f"{loc}/store" in after


@pytest.mark.timeout(120)
def test_memory_node_keeps_only_private_socket_lock_and_key(tmp_path, spawner):
    loc = tmp_path / "memloc"
    pp = spawner(loc, memory=True)
    exercise(pp)
    entries = check_tree(str(loc))
    names = {p for p in entries if p != "."}
    assert names <= {"node.sock", "node.lock", "node.key", "node.address"}, (
        f"a memory node's location holds more than socket, lock and key: {sorted(names)}")
    assert {"node.sock", "node.lock", "node.key"} <= names
    # the store itself: files the node keeps open, already unlinked, still private
    pid = pp.stats()["node"]["pid"]
    store_fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/") or "pipeproc-mem-" in target:
            store_fds.append(target)
            st_ = os.stat(f"/proc/{pid}/fd/{fd}")
            assert st_.st_uid == os.getuid()
            assert stat.S_IMODE(st_.st_mode) == 0o600, (
                f"memory store file {target} has mode {stat.S_IMODE(st_.st_mode):o}")
            assert target.endswith(" (deleted)"), f"memory store file {target} is still linked"
            count("operations verified")
    assert store_fds, "found no open memory-store file of the node"
    pp.shutdown()
    for target in store_fds:
        assert not os.path.exists(target.replace(" (deleted)", ""))


@pytest.mark.timeout(120)
def test_memory_node_without_location_uses_a_private_temporary_directory():
    pp = pipeproc.spawn(memory=True, workers=0)
    try:
        loc = pp.location
        assert loc and os.path.isdir(loc)
        exercise(pp)
        entries = check_tree(loc)
        assert "node.key" in entries and "node.sock" in entries
        assert not loc.startswith(os.getcwd() + os.sep), "a temporary location in the cwd"
    finally:
        pp.shutdown()
    assert not os.path.exists(loc), f"the temporary location {loc} outlived the node"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("memory", [False, True], ids=["disk", "memory"])
def test_long_location_puts_the_socket_in_a_private_runtime_directory(tmp_path, spawner, memory):
    loc = tmp_path / ("long_" + "x" * 100)
    assert len(os.fsencode(os.path.join(loc, "node.sock"))) > 107  # too long for AF_UNIX
    pp = spawner(loc, memory=memory)
    exercise(pp)
    sock = pp.address
    assert isinstance(sock, str) and not sock.startswith(str(loc)), sock
    rundir = os.path.dirname(sock)
    check_private(rundir, what="runtime dir ")
    assert check_private(sock, what="socket ") == "socket"
    check_tree(rundir)
    check_tree(str(loc))
    # the location records where the socket is: connect(location=...) works
    other = pipeproc.connect(loc, timeout=5)
    try:
        assert other.length("t") == 10
    finally:
        other.close()
    pp.shutdown()
    assert not os.path.exists(rundir), f"the runtime directory {rundir} outlived the node"


# ----------------------------------------------------------------------------- authentication


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_wrong_authkey_is_refused_logged_and_harmless(tmp_path, transport):
    log_path = tmp_path / "node.log"
    kw = {"address": ("127.0.0.1", 0)} if transport == "tcp" else {}
    pp = spawn_logged(tmp_path / "loc", log_path, **kw)
    try:
        pid = pp.stats()["node"]["pid"]
        pp.commit({"topic": "t", "body": {"i": 0}})
        conns0 = pp.stats()["node"]["connections"]

        # connect() with a wrong key: auth_failed, a ConnectionError, not retried until timeout
        t0 = time.monotonic()
        with pytest.raises(pipeproc.PipeProcError) as e:
            pipeproc.connect(address=pp.address, authkey=b"not the key", timeout=30)
        assert e.value.code == "auth_failed", e.value
        assert isinstance(e.value, ConnectionError)
        assert time.monotonic() - t0 < 5, "a refused connect kept retrying"
        if transport == "unix":  # the location's address with an explicit wrong key
            with pytest.raises(pipeproc.PipeProcError) as e:
                pipeproc.connect(tmp_path / "loc", authkey=b"wrong", timeout=5)
            assert e.value.code == "auth_failed"
        # a raw multiprocessing client with a wrong key
        with pytest.raises((AuthenticationError, EOFError, OSError)):
            Client(addr_of(pp), authkey=b"\x00" * 32).close()
        refused = 3 if transport == "unix" else 2
        wait_until(lambda: read_log(log_path).count(REFUSAL) >= refused, 10,
                   f"the node to log {refused} refusals ({REFUSAL!r}) on its stderr")
        peer = r"pid \d+ \(uid \d+\)" if transport == "unix" else r"127\.0\.0\.1:\d+"
        assert re.search(rf"refused a connection from {peer}: authentication failed",
                         read_log(log_path)), "the refusal names the peer"

        # a storm of refused clients while a good one works: the good one is never slowed
        storm_errors = []

        def storm():
            for _ in range(15):
                try:
                    pipeproc.connect(address=pp.address, authkey=os.urandom(32), timeout=5)
                    storm_errors.append("accepted a wrong key!")
                except pipeproc.PipeProcError as exc:
                    if exc.code != "auth_failed":
                        storm_errors.append(exc.code)

        threads = [threading.Thread(target=storm, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        good = pipeproc.connect(address=pp.address, authkey=pp.authkey)
        worst, n = 0.0, 0
        try:
            while any(t.is_alive() for t in threads) or n < 20:
                t0 = time.monotonic()
                log_id = good.commit({"topic": "t", "body": {"i": n + 1}})
                assert good.range("t", start=log_id)[0].body == {"i": n + 1}
                worst = max(worst, time.monotonic() - t0)
                n += 1
        finally:
            good.close()
        for t in threads:
            t.join(60)
        assert not storm_errors, storm_errors[:5]
        assert worst < 2.0, f"a good client's call took {worst:.2f} s during the storm"
        assert pp.length("t") == n + 1
        count("operations verified", n)
        count("faults injected", 90 + refused)
        wait_until(lambda: read_log(log_path).count(REFUSAL) >= refused + 90, 10,
                   "every refusal of the storm to be logged")
        wait_until(lambda: pp.stats()["node"]["connections"] <= conns0, 10,
                   "the refused connections to be released")
        assert os.path.exists(f"/proc/{pid}")
        text = read_log(log_path)
        assert pp.authkey.hex() not in text and repr(pp.authkey)[2:-1] not in text
    finally:
        pp.shutdown()


# ----------------------------------------------------------------------------- handshakes


@pytest.mark.timeout(120)
def test_silent_and_half_open_handshakes_do_not_block_anyone(tmp_path, spawner):
    pp = spawner(tmp_path / "loc")
    pp.commit({"topic": "t", "body": {}})
    addr = addr_of(pp)
    conns0 = pp.stats()["node"]["connections"]
    pid = pp.stats()["node"]["pid"]
    rss0 = record_rss(pid, "node (silent handshakes)")
    silent = []
    try:
        for i in range(200):
            s = raw_socket(addr)
            if i % 4 == 1:
                s.recv(64)  # read the node's challenge, then say nothing
            elif i % 4 == 2:
                s.sendall(b"\x00\x00")  # half a length header
            elif i % 4 == 3:
                s.sendall(b"\x00\x00\x00\xff" + b"#")  # a frame that never completes
            silent.append(s)
        count("faults injected", len(silent))
        wait_until(lambda: pp.stats()["node"]["connections"] >= conns0 + 200, 20,
                   "the node to accept the 200 silent peers")
        # meanwhile everyone else is served promptly, new clients included
        for i in range(20):
            t0 = time.monotonic()
            c = pipeproc.connect(address=pp.address, authkey=pp.authkey, timeout=5)
            try:
                log_id = c.commit({"topic": "t", "body": {"i": i}})
                assert c.range("t", start=log_id)[0].body == {"i": i}
            finally:
                c.close()
            took = time.monotonic() - t0
            assert took < 2.0, f"connect + commit + read took {took:.2f} s next to silent peers"
        count("operations verified", 20)
        peak = record_rss(pid, "node (silent handshakes)")
        assert peak - rss0 < 128 * 1024, f"200 silent peers cost the node {(peak - rss0) >> 10} MiB"
    finally:
        for s in silent:
            s.close()
    wait_until(lambda: pp.stats()["node"]["connections"] <= conns0, 20,
               "the node to release the silent peers once they hung up")


@pytest.mark.timeout(60)
def test_a_peer_that_never_answers_the_challenge_is_dropped(tmp_path, spawner):
    """The handshake is bounded on the node's side too: a peer that connects and never
    answers the challenge is disconnected (here: within 15 s; clients give up after 5 s),
    instead of holding a thread and a descriptor of the node forever."""
    pp = spawner(tmp_path / "loc")
    s = raw_socket(addr_of(pp))
    try:
        s.settimeout(15)
        t0 = time.monotonic()
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break  # the node hung up: bounded
                got += chunk
        except socket.timeout:
            raise AssertionError(
                f"the node kept a connection that never answered its challenge for "
                f"{time.monotonic() - t0:.0f} s (received {len(got)} bytes: the challenge)"
            ) from None
        except ConnectionResetError:
            pass
        count("faults injected")
    finally:
        s.close()


PREAUTH = dict(max_examples=150, deadline=None, database=None,
               phases=[Phase.explicit, Phase.generate],
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def preauth_node(tmp_path_factory):
    pp = pipeproc.spawn(tmp_path_factory.mktemp("preauth") / "loc", workers=0, memory=True)
    try:
        pp.commit({"topic": "t", "body": {"kept": True}})
        yield pp, pp.stats()["node"]["connections"]
    finally:
        pp.shutdown()


@pytest.mark.timeout(180)
@settings(**PREAUTH)
@given(steps=st.lists(st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"\x00\x00\x00\x10", b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff",
                     b"\x00\x00\x01\x00" + b"A" * 256, b"\x00\x00\x00\x05#AUTH",
                     b"\x00\x00\x00\x0a#WELCOME#\x00", b"\x00\x00\x00\x09#FAILURE#",
                     msgpack.packb([1, "topics"]), b"GET / HTTP/1.1\r\n\r\n"]),
), min_size=0, max_size=4), read_challenge=st.booleans())
def test_fuzz_before_authentication(preauth_node, steps, read_challenge):
    """Bytes instead of a handshake: never accepted as a client, never a hang for anyone,
    nothing written, and the node lets go of the connection once the peer hangs up."""
    pp, conns0 = preauth_node
    s = raw_socket(addr_of(pp))
    try:
        if read_challenge:
            s.recv(256)
        for data in steps:
            try:
                s.sendall(data)
            except OSError:
                break
        s.settimeout(0.05)
        try:
            reply = s.recv(4096)
        except (socket.timeout, OSError):
            reply = b""
        assert b"#WELCOME#" not in reply, "the node welcomed a peer that never authenticated"
    finally:
        s.close()
    count("frames fuzzed", max(1, len(steps)))
    t0 = time.monotonic()
    assert pp.range("t") == [pipeproc.Log(pp.range("t")[0].id, {"kept": True})]
    assert pp.topics() == ["t"]
    assert time.monotonic() - t0 < 2.0
    wait_until(lambda: pp.stats()["node"]["connections"] <= conns0, 10,
               "the node to let go of a pre-auth peer that hung up")


# ----------------------------------------------------------------------------- the key


@pytest.mark.timeout(120)
def test_the_authkey_never_leaks(tmp_path):
    log_path = tmp_path / "node.log"
    key = os.urandom(32)
    pp = spawn_logged(tmp_path / "loc", log_path, authkey=key, workers=1, log_level="DEBUG")
    try:
        assert pp.authkey == key
        exercise(pp)
        st_ = pp.stats()
        assert st_["workers"], "no worker started"
        forms = [key, key.hex().encode(), repr(key)[2:-1].encode()]

        def leaks(data):
            return [f for f in forms if f in data]

        blob = msgpack.packb(st_, use_bin_type=True) + repr(st_).encode()
        assert not leaks(blob), "stats() shows the authkey"
        with open(tmp_path / "loc" / "node.address", "rb") as f:
            assert not leaks(f.read()), "node.address holds the authkey"
        pids = [("node", st_["node"]["pid"])] + [("worker", w["pid"]) for w in st_["workers"]]
        for what, pid in pids:
            for part in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{part}", "rb") as f:
                    assert not leaks(f.read()), f"the {what}'s {part} holds the authkey"
                count("operations verified")
        with pytest.raises(pipeproc.PipeProcError):
            pipeproc.connect(address=pp.address, authkey=key[:-1] + bytes([key[-1] ^ 1]))
        wait_until(lambda: REFUSAL in read_log(log_path), 10, "the refusal to be logged")
    finally:
        pp.shutdown()
    assert not leaks(read_log(log_path).encode()), "the node's log holds the authkey"
