"""Issue 14 item 10 at the issue's scale: 30 authenticated peers each announce a 60 MiB
frame, send 1 KiB and stall (on main: +1.8 GiB of node memory, never released). The node
must stay small, keep serving a busy healthy client, and drop every stalled peer once the
stall timeout (``PIPEPROC_STALL_TIMEOUT``, 2 s here) has passed."""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from multiprocessing.connection import Client

import pytest

import pipeproc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stress_util import count, record_rss, report, wait_until  # noqa: E402

PEERS = 30


def _unsent(c):
    """Bytes ``c`` sent that its peer has not read yet (a Unix socket's send queue)."""
    import fcntl
    import termios
    return struct.unpack("i", fcntl.ioctl(c.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _dropped(c):
    try:
        if not c.poll(0):
            return False
        c.recv_bytes()
    except (EOFError, OSError):
        return True
    return False


@pytest.mark.slow
def test_thirty_peers_stalling_in_60_mib_frames(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEPROC_STALL_TIMEOUT", "2")
    pp = pipeproc.spawn(tmp_path / "loc", workers=0, durability="fast")
    peers = []
    stop = threading.Event()
    done = []
    errors = []

    def healthy():
        try:
            with pipeproc.connect(tmp_path / "loc") as c:
                while not stop.is_set():
                    c.commit({"topic": "t", "body": {"n": len(done)}})
                    done.append(1)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=healthy)
    try:
        pid = pp._process.pid
        pp.commit({"topic": "t", "body": {}})
        before = record_rss(pid, "node (stalled 60 MiB frames)")
        t.start()
        for _ in range(PEERS):
            c = Client(pp.address, authkey=pp.authkey)
            os.write(c.fileno(), struct.pack("!i", 60 << 20) + b"x" * 1024)
            peers.append(c)
        for i, c in enumerate(peers):
            wait_until(lambda: _unsent(c) == 0, 60, f"the node to read what peer {i} sent")
        grown = record_rss(pid, "node (stalled 60 MiB frames)") - before
        report(f"node RssAnon growth with {PEERS} peers stalled in 60 MiB frames: "
               f"{grown / 1024:.1f} MiB")
        assert grown < 64 * 1024, f"the node grew by {grown} KiB for {PEERS} stalled peers"
        t0 = time.monotonic()
        for i, c in enumerate(peers):
            wait_until(lambda: _dropped(c), 60, f"stalled peer {i} to be dropped", interval=0.02)
        count("stalled peers dropped", PEERS)
        assert time.monotonic() - t0 < 30
        n = len(done)
        wait_until(lambda: len(done) > n + 10, 30, "the healthy client to keep committing")
    finally:
        stop.set()
        if t.is_alive() or t.ident:
            t.join(30)
        for c in peers:
            c.close()
        pp.shutdown()
    assert not errors, errors
    assert len(done) > 10
