"""A private ``redis-server`` for the Redis backend's tests (SCALE.md §4).

:class:`RedisServer` starts Debian's ``redis-server`` (>= 7.0) on a free TCP port bound to
127.0.0.1, in a temporary directory of its own, configured for pipeproc's guarantees:
``appendonly yes`` with ``appendfsync always`` (an acknowledged write is on disk), no RDB
snapshots (``save ""``) and ``maxmemory-policy noeviction``. It optionally requires a random
password (``requirepass``) for the authentication and ACL tests. ``start`` returns once the
server answers PING (a condition, not a sleep); ``stop`` sends ``SHUTDOWN NOSAVE`` and kills
the process if it is still there; ``crash_and_restart`` kills it with SIGKILL and starts it
again on the same directory and port (what an acknowledged write must survive).

Without a ``redis-server`` on the machine, :func:`find_redis_server` returns None and
:func:`require_redis_server` skips the test with the reason (how to install it).
The server is spoken to with a few lines of RESP over a socket (no dependency on redis-py
here); tests that need a full client use redis-py from the ``redis`` extra.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Any, Iterator, List, Optional, Sequence, Union

MIN_VERSION = (7, 0)
SKIP_REASON = "redis-server not installed: apt-get install redis-server"

Arg = Union[str, bytes, int]


class RespError(Exception):
    """An error reply (``-ERR ...``) from the server."""


def find_redis_server() -> Optional[str]:
    """The path of a ``redis-server`` >= 7.0 (``$PIPEPROC_TEST_REDIS_SERVER``, ``PATH`` or
    ``/usr/bin``), or None (also when ``PIPEPROC_TEST_REDIS_SERVER=none``: the suite as it runs
    on a machine without one)."""
    given = os.environ.get("PIPEPROC_TEST_REDIS_SERVER")
    if given == "none":
        return None
    candidates = [given, shutil.which("redis-server"), "/usr/bin/redis-server"]
    for exe in candidates:
        if exe and os.access(exe, os.X_OK) and server_version(exe) >= MIN_VERSION:
            return exe
    return None


def server_version(exe: str) -> tuple:
    """``(major, minor)`` of ``exe --version`` ((0, 0) when it cannot be read)."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    m = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def require_redis_server() -> str:
    """The ``redis-server`` path; skips the calling test when there is none."""
    import pytest

    exe = find_redis_server()
    if exe is None:
        pytest.skip(SKIP_REASON)
    return exe


def fresh_namespace(prefix: str = "t") -> str:
    """A namespace no other test uses (matches ``^[A-Za-z0-9_-]{1,200}$``)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pack(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Resp:
    """A minimal blocking RESP2 connection (enough for PING, AUTH, CONFIG, SHUTDOWN)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis-server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def read(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ConnectionError(f"unexpected RESP reply {line[:40]!r}")

    def call(self, *args: Arg) -> Any:
        self.sock.sendall(_pack(args))
        return self.read()


class RedisServer:
    """One private ``redis-server`` (see the module docstring). Use as a context manager, or
    ``start()`` / ``stop()`` in a ``finally``."""

    def __init__(self, exe: Optional[str] = None, *, password: Optional[str] = None,
                 require_password: bool = False, directory: Optional[str] = None,
                 extra_args: Sequence[str] = ()) -> None:
        found = exe or find_redis_server()
        if found is None:
            raise RuntimeError(SKIP_REASON)
        self.exe: str = found
        if password is None and require_password:
            password = secrets.token_hex(16)
        self.password = password
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix="pipeproc-test-redis-")
        self.port = 0
        self.extra_args = list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.log = os.path.join(self.dir, "redis.log")

    # ------------------------------------------------------------------ addresses

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, db: int = 0, *, username: Optional[str] = None,
            password: Optional[str] = None) -> str:
        """``redis://[user:pass@]127.0.0.1:PORT/db``; by default with the server's password
        (for the ``default`` user), when it has one."""
        if password is None and username is None:
            password = self.password
        auth = ""
        if username is not None or password is not None:
            auth = f"{username or ''}:{password or ''}@"
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # ------------------------------------------------------------------ life cycle

    def _command(self) -> List[str]:
        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1",
               "--protected-mode", "yes", "--dir", self.dir, "--daemonize", "no",
               "--logfile", self.log, "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--maxmemory-policy", "noeviction",
               *self.extra_args]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd

    def start(self, timeout: float = 20.0) -> "RedisServer":
        """Start the server (on a free port the first time, the same port afterwards) and
        return once it answers PING."""
        attempts = 5 if not self.port else 1
        for attempt in range(attempts):
            port_was_free = not self.port
            if port_was_free:
                self.port = free_port()
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         cwd=self.dir, start_new_session=True)
            try:
                self._wait_ready(timeout)
                return self
            except _PortTaken:
                self.proc.wait(5)
                if port_was_free and attempt + 1 < attempts:
                    self.port = 0  # someone took the port meanwhile: another one
                    continue
                raise RuntimeError(f"redis-server could not bind port {self.port}: "
                                   f"{self.tail()}") from None
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.tail()
                if "Address already in use" in tail:
                    raise _PortTaken()
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {tail}")
            with contextlib.suppress(OSError, ConnectionError, RespError):
                if self.call("PING") == b"PONG":
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING within {timeout:.0f} s: "
                                   f"{self.tail()}")
            time.sleep(0.01)

    def call(self, *args: Arg, timeout: float = 5.0) -> Any:
        """One command on a fresh connection (authenticated when the server has a password)."""
        r = _Resp(self.port, timeout)
        try:
            if self.password is not None:
                r.call("AUTH", self.password)
            return r.call(*args)
        finally:
            r.close()

    def config_get(self, name: str) -> str:
        reply = self.call("CONFIG", "GET", name)
        return reply[1].decode() if reply else ""

    def kill(self) -> None:
        """SIGKILL the server (and its forked children: an AOF rewrite) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)

    def crash_and_restart(self, timeout: float = 20.0) -> "RedisServer":
        """``kill -9`` the server, then start it again on the same directory and port; returns
        once it answers PING (it has replayed its append-only file by then)."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE``; kill the server if it is still there 10 s later."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ConnectionError, RespError):
                r = _Resp(self.port, 5.0)
                try:
                    if self.password is not None:
                        r.call("AUTH", self.password)
                    r.sock.sendall(_pack(["SHUTDOWN", "NOSAVE"]))
                    with contextlib.suppress(OSError, ConnectionError, RespError):
                        r.read()  # the server closes the connection as it exits
                finally:
                    r.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def remove(self) -> None:
        """Stop the server and delete its directory (when this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def tail(self, n: int = 8) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "RedisServer":
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:  # never the password
        return f"<RedisServer 127.0.0.1:{self.port} dir={self.dir!r}>"


class _PortTaken(Exception):
    """The server exited because its port was taken."""


@contextlib.contextmanager
def redis_server(**kw: Any) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped and removed on exit (skips without one)."""
    exe = require_redis_server()
    with RedisServer(exe, **kw) as server:
        yield server
