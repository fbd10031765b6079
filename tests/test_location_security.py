"""Issue 14 items 4, 5, 10, 15, 16: a hostile location, a stalled peer, stale leftovers.

* 14.4: nothing in the location is followed through a symbolic link (``node.lock``,
  ``store``, ``node.key``/``node.address`` read by a client), and a location (or a file in
  it) owned by another user is refused with ``invalid_argument`` naming the path.
* 14.5: a location others can write to is refused (made private when it is ours and
  empty), by ``spawn`` and by a client connecting by location.
* 14.10: a peer that announces a big frame and stalls costs only what it sent, and is
  dropped once it stalled past the deadline while a healthy client goes on.
* 14.15: a dangling symlink or a directory at the socket path does not block a spawn.
* 14.16: a memory node's temporary directory left by a kill -9 is removed by the next
  memory node's start.

Tests that need another user (root only) ``chown`` entries to ``nobody`` and skip otherwise.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import struct
import tempfile
import time
from multiprocessing.connection import Client

import msgpack
import pytest

import pipeproc
import pipeproc.aio
from pipeproc.errors import InvalidArgument, NodeAlreadyActive
from helpers import wait_until

OTHER_UID = 65534  # nobody

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def private_dir(path):
    os.makedirs(path, mode=0o700)
    os.chmod(path, 0o700)
    return str(path)


def spawn(location, **kw):
    kw.setdefault("workers", 0)
    return pipeproc.spawn(location, **kw)


def assert_spawn_refused(location, *words, **kw):
    with pytest.raises(InvalidArgument) as info:
        pp = spawn(location, **kw)
        pp.shutdown()  # pragma: no cover - only when the test fails
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------ 14.4: symlinks, owners

def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    loc = private_dir(tmp_path / "loc")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious data")
    os.symlink(victim, os.path.join(loc, "node.lock"))
    assert_spawn_refused(loc, os.path.join(loc, "node.lock"), "symbolic link")
    assert victim.read_bytes() == b"precious data"


@pytest.mark.parametrize("memory", [False, True])
def test_a_symlinked_store_directory_is_refused(tmp_path, memory):
    loc = private_dir(tmp_path / "loc")
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    os.chmod(victim, 0o755)
    os.symlink(victim, os.path.join(loc, "store"))
    if memory:  # a memory node does not use the store: the link is not its business
        pp = spawn(loc, memory=True)
        pp.shutdown()
    else:
        assert_spawn_refused(loc, os.path.join(loc, "store"), "symbolic link")
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o755
    assert os.listdir(victim) == []


def test_symlinked_store_files_are_refused(tmp_path):
    loc = private_dir(tmp_path / "loc")
    private_dir(os.path.join(loc, "store"))
    victim = tmp_path / "victim.mdb"
    victim.write_bytes(b"not a store")
    os.symlink(victim, os.path.join(loc, "store", "data.mdb"))
    assert_spawn_refused(loc, "data.mdb", "symbolic link")
    assert victim.read_bytes() == b"not a store"


def test_a_symlinked_key_file_is_refused(tmp_path):
    loc = private_dir(tmp_path / "loc")
    victim = tmp_path / "victim.key"
    victim.write_bytes(b"precious")
    os.symlink(victim, os.path.join(loc, "node.key"))
    assert_spawn_refused(loc, "node.key", "symbolic link")
    assert victim.read_bytes() == b"precious"


def test_a_client_does_not_follow_symlinked_key_and_address(tmp_path, spawner):
    """A location whose node.key/node.address are links to another node's files: refused
    (at once, not after the connect timeout), by the sync and the asyncio client."""
    pp = spawner(tmp_path / "real")
    fake = private_dir(tmp_path / "fake")
    for name in ("node.key", "node.address"):
        os.symlink(os.path.join(str(tmp_path / "real"), name), os.path.join(fake, name))
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument, match="symbolic link"):
        pipeproc.connect(fake, timeout=30)
    with pytest.raises(InvalidArgument, match="symbolic link"):
        asyncio.run(pipeproc.aio.connect(fake, timeout=30))
    assert time.monotonic() - t0 < 10
    assert pp.length  # the real node is untouched
    with pipeproc.connect(tmp_path / "real") as c:
        assert c.topics() == []


@needs_root
def test_a_location_owned_by_another_user_is_refused(tmp_path):
    loc = private_dir(tmp_path / "loc")
    os.chown(loc, OTHER_UID, OTHER_UID)
    assert_spawn_refused(loc, loc, f"uid {OTHER_UID}")
    assert os.listdir(loc) == []


@needs_root
@pytest.mark.parametrize("name", ["node.lock", "node.key", "node.address"])
def test_a_file_owned_by_another_user_is_refused(tmp_path, name):
    loc = private_dir(tmp_path / "loc")
    path = os.path.join(loc, name)
    with open(path, "wb") as f:
        f.write(b"x")
    os.chown(path, OTHER_UID, OTHER_UID)
    assert_spawn_refused(loc, path, f"uid {OTHER_UID}")


@needs_root
def test_a_symlink_planted_by_another_user_is_refused(tmp_path):
    """The issue's scenario: another user's 0777 location with a planted ``node.lock``."""
    loc = str(tmp_path / "loc")
    os.mkdir(loc)
    os.chmod(loc, 0o777)
    os.chown(loc, OTHER_UID, OTHER_UID)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious data")
    os.symlink(victim, os.path.join(loc, "node.lock"))
    os.lchown(os.path.join(loc, "node.lock"), OTHER_UID, OTHER_UID)
    assert_spawn_refused(loc, loc)
    assert victim.read_bytes() == b"precious data"


@needs_root
def test_a_client_refuses_a_location_owned_by_another_user(tmp_path, spawner):
    loc = str(tmp_path / "loc")
    spawner(loc)
    os.chown(loc, OTHER_UID, OTHER_UID)
    try:
        with pytest.raises(InvalidArgument, match=f"uid {OTHER_UID}"):
            pipeproc.connect(loc, timeout=30)
        for name in ("node.key", "node.address"):
            os.chown(loc, os.geteuid(), os.getegid())
            os.chown(os.path.join(loc, name), OTHER_UID, OTHER_UID)
            with pytest.raises(InvalidArgument, match=f"uid {OTHER_UID}"):
                pipeproc.connect(loc, timeout=30)
            os.chown(os.path.join(loc, name), os.geteuid(), os.getegid())
    finally:
        os.chown(loc, os.geteuid(), os.getegid())


# ------------------------------------------------------------------ 14.5: writable by others

@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_an_empty_location_of_ours_writable_by_others_is_made_private(tmp_path, mode):
    loc = str(tmp_path / "loc")
    os.mkdir(loc)
    os.chmod(loc, mode)
    pp = spawn(loc)
    try:
        assert stat.S_IMODE(os.stat(loc).st_mode) == 0o700
        pp.commit({"topic": "t", "body": {}})
    finally:
        pp.shutdown()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_non_empty_location_writable_by_others_is_refused(tmp_path, mode):
    loc = str(tmp_path / "loc")
    os.mkdir(loc)
    (tmp_path / "loc" / "something").write_bytes(b"")
    os.chmod(loc, mode)
    assert_spawn_refused(loc, loc, "writable by")
    assert stat.S_IMODE(os.stat(loc).st_mode) == mode


def test_a_client_refuses_a_location_others_can_write(tmp_path, spawner):
    loc = str(tmp_path / "loc")
    spawner(loc)
    os.chmod(loc, 0o777)
    try:
        t0 = time.monotonic()
        with pytest.raises(InvalidArgument, match="writable by"):
            pipeproc.connect(loc, timeout=30)
        with pytest.raises(InvalidArgument, match="writable by"):
            asyncio.run(pipeproc.aio.connect(loc, timeout=30))
        assert time.monotonic() - t0 < 10
        os.chmod(os.path.join(loc, "node.key"), 0o622)
        os.chmod(loc, 0o700)
        with pytest.raises(InvalidArgument, match="writable by"):
            pipeproc.connect(loc, timeout=30)
        os.chmod(os.path.join(loc, "node.key"), 0o600)
        pipeproc.connect(loc).close()
    finally:
        os.chmod(loc, 0o700)


# ------------------------------------------------------------------ 14.15: the socket path

def test_a_dangling_symlink_at_the_socket_path_does_not_block_spawn(tmp_path):
    loc = private_dir(tmp_path / "loc")
    os.symlink(str(tmp_path / "nowhere"), os.path.join(loc, "node.sock"))
    pp = spawn(loc)
    try:
        assert stat.S_ISSOCK(os.lstat(os.path.join(loc, "node.sock")).st_mode)
        assert not os.path.lexists(tmp_path / "nowhere")
    finally:
        pp.shutdown()


def test_a_symlink_to_a_file_at_the_socket_path_is_removed_not_followed(tmp_path):
    loc = private_dir(tmp_path / "loc")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep")
    os.symlink(victim, os.path.join(loc, "node.sock"))
    pp = spawn(loc)
    try:
        assert victim.read_bytes() == b"keep"
    finally:
        pp.shutdown()


def test_a_directory_at_the_socket_path_does_not_block_spawn(tmp_path):
    loc = private_dir(tmp_path / "loc")
    os.mkdir(os.path.join(loc, "node.sock"))
    pp = spawn(loc)
    try:
        pp.commit({"topic": "t", "body": {}})
    finally:
        pp.shutdown()


def test_a_non_empty_directory_at_the_socket_path_is_refused_clearly(tmp_path):
    loc = private_dir(tmp_path / "loc")
    os.mkdir(os.path.join(loc, "node.sock"))
    (tmp_path / "loc" / "node.sock" / "file").write_bytes(b"data")
    assert_spawn_refused(loc, os.path.join(loc, "node.sock"), "directory")
    assert (tmp_path / "loc" / "node.sock" / "file").read_bytes() == b"data"


@needs_root
def test_another_users_file_at_the_socket_path_is_refused_clearly(tmp_path):
    loc = private_dir(tmp_path / "loc")
    path = os.path.join(loc, "node.sock")
    os.symlink(str(tmp_path / "nowhere"), path)
    os.lchown(path, OTHER_UID, OTHER_UID)
    assert_spawn_refused(loc, path, f"uid {OTHER_UID}")


def test_a_live_node_is_still_already_active(tmp_path, spawner):
    loc = str(tmp_path / "loc")
    spawner(loc)
    with pytest.raises(NodeAlreadyActive):
        spawn(loc)


# ------------------------------------------------------------------ 14.16: stale temp dirs

def test_a_killed_memory_nodes_temp_dir_is_removed_at_the_next_start(tmp_path, monkeypatch):
    tmp = private_dir(tmp_path / "tmp")
    monkeypatch.setattr(tempfile, "tempdir", tmp)
    pp = spawn(None, memory=True)
    old = pp.location
    assert old is not None and os.path.dirname(old) == tmp
    os.kill(pp._process.pid, signal.SIGKILL)
    pp._process.wait(30)
    pp._process.stdin.close()
    pp.close()
    assert os.path.exists(os.path.join(old, "node.lock"))
    # things that are not stale memory-node directories stay
    other = private_dir(os.path.join(tmp, "pipeproc-unrelated"))
    empty_lock = private_dir(os.path.join(tmp, "pipeproc-starting"))
    open(os.path.join(empty_lock, "node.lock"), "wb").close()  # a node not locked yet
    chosen = os.path.join(tmp, "pipeproc-chosen")  # a location a user chose, node stopped
    spawn(chosen).shutdown()
    chosen_mem = os.path.join(tmp, "pipeproc-chosen-mem")
    spawn(chosen_mem, memory=True).shutdown()
    live = spawn(None, memory=True)
    try:
        assert not os.path.exists(old)
        assert os.path.exists(live.location)
        assert os.path.exists(other) and os.path.exists(empty_lock)
        assert os.path.exists(os.path.join(chosen, "store", "data.mdb"))
        assert os.path.exists(os.path.join(chosen_mem, "node.lock"))
        second = spawn(None, memory=True)  # a live memory node's directory is kept
        try:
            assert os.path.exists(live.location)
            live.commit({"topic": "t", "body": {}})
        finally:
            second.shutdown()
    finally:
        live.shutdown()
    assert not os.path.exists(live.location)


# ------------------------------------------------------------------ 14.10: stalled big frames

def _rss_anon_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


def _unsent(c):
    """Bytes ``c`` sent that its peer has not read yet (a Unix socket's send queue)."""
    import fcntl
    import termios
    return struct.unpack("i", fcntl.ioctl(c.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _ping(c, rid):
    c.send_bytes(msgpack.packb([rid, "ping"]))
    reply = msgpack.unpackb(c.recv_bytes(), raw=False)
    assert reply[0] == rid and reply[1] == 0, reply


def test_a_peer_stalling_in_a_big_frame_costs_what_it_sent_and_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEPROC_STALL_TIMEOUT", "1")
    pp = spawn(tmp_path / "loc", memory=True)
    peers = []
    try:
        address, key = pp.address, pp.authkey
        healthy = Client(address, authkey=key)
        _ping(healthy, 1)
        pid = pp._process.pid
        before = _rss_anon_kib(pid)
        for _ in range(4):
            c = Client(address, authkey=key)
            os.write(c.fileno(), struct.pack("!i", 60 << 20) + b"x" * 1024)
            peers.append(c)
        for i, c in enumerate(peers):
            wait_until(lambda: _unsent(c) == 0, 30, f"the node to read what peer {i} sent")
        _ping(healthy, 2)
        grown = _rss_anon_kib(pid) - before
        assert grown < 32 * 1024, f"the node grew by {grown} KiB for 4 KiB of stalled frames"

        def dropped(c):
            try:
                if not c.poll(0):
                    return False
                c.recv_bytes()
            except (EOFError, OSError):
                return True
            return False

        for i, c in enumerate(peers):
            wait_until(lambda: dropped(c), 30, f"stalled peer {i} to be dropped")
        _ping(healthy, 3)  # an idle connection (no partial frame) is never dropped
        pp.commit({"topic": "t", "body": {"ok": 1}})
        assert pp.length("t") == 1
        healthy.close()
    finally:
        for c in peers:
            c.close()
        pp.shutdown()


def test_a_big_frame_sent_in_slow_parts_still_arrives(tmp_path, monkeypatch):
    """Progress resets the deadline: a 3 MiB request sent in parts over ~2 stall timeouts."""
    monkeypatch.setenv("PIPEPROC_STALL_TIMEOUT", "1")
    pp = spawn(tmp_path / "loc", memory=True)
    try:
        c = Client(pp.address, authkey=pp.authkey)
        body = msgpack.packb({"b": b"y" * (3 << 20)})
        frame = msgpack.packb([7, "c1", "t", body])
        data = struct.pack("!i", len(frame)) + frame
        parts = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
        for part in parts:
            c._send(part)
            time.sleep(0.4)  # slower than a healthy client, faster than the deadline
        reply = msgpack.unpackb(c.recv_bytes(), raw=False)
        assert reply[0] == 7 and reply[1] == 0, reply
        assert pp.length("t") == 1
        c.close()
    finally:
        pp.shutdown()
