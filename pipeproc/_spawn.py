"""Starting a node process and finding a running one: what ``spawn()`` and ``connect()`` of
both clients share.

:func:`node_cfg` checks ``spawn``'s arguments and builds the node's configuration;
:func:`start_node` runs ``python -m pipeproc._node`` (a subprocess, never an import: the
node's modules are not the client's) and waits for its ready message. :class:`Retry` is
``connect``'s patience: it keeps trying while a node may be starting at the location and
gives up at once when none runs or starts there.

Client side: imports ``_calls`` (for the busy-poll check), ``_platform``, ``_protocol`` and
``errors``; never a node-side module.
"""

from __future__ import annotations

import math
import os
import select
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, NamedTuple, Optional, Tuple

import msgpack

from . import _platform
from ._calls import MIN_FRAME
from ._protocol import BUSY_POLL, CONNECT_TIMEOUT, MAX_BUSY_POLL
from .errors import InvalidArgument, NoActiveNode, PipeProcError, from_code

DEFAULT_LOCATION = "./pipeproc_data"
DEFAULT_GC = {"min_prune_time": 30.0, "interval": 30.0}
HANDSHAKE_TIMEOUT = CONNECT_TIMEOUT
IDLE_CHECK = 0.05  # seconds between the two looks that find no node at a location


def check_busy_poll(busy_poll: Any) -> float:
    """``busy_poll=`` of ``spawn``/``connect``: seconds, ``0 <= busy_poll <= 0.01``."""
    if (isinstance(busy_poll, bool) or not isinstance(busy_poll, (int, float))
            or not math.isfinite(busy_poll) or not 0 <= busy_poll <= MAX_BUSY_POLL):
        raise InvalidArgument(
            f"busy_poll is seconds between 0 and {MAX_BUSY_POLL} (0: off), got {busy_poll!r}")
    return float(busy_poll)


def check_connect_timeout(timeout: Any) -> float:
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout) or timeout < 0):
        raise InvalidArgument("timeout must be a finite number of seconds")
    return float(timeout)


def _location(location: Any) -> str:
    if location is None:
        location = DEFAULT_LOCATION
    if not isinstance(location, (str, os.PathLike)):
        raise InvalidArgument("location must be a path")
    return os.path.abspath(os.fspath(location))


def gc_settings(gc: Any) -> Optional[dict]:
    """``gc=`` checked: ``None`` (off), or the settings in seconds (SPEC §8)."""
    if gc is False or gc is None:
        return None
    if gc is True:
        return dict(DEFAULT_GC)
    if not isinstance(gc, dict) or set(gc) - set(DEFAULT_GC):
        raise InvalidArgument("gc is True, False or {'min_prune_time': s, 'interval': s}")
    out = dict(DEFAULT_GC, **gc)
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "interval" and v <= 0):
            raise InvalidArgument(f"gc {k} must be a number of seconds")
    return out


def _nonneg_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidArgument(f"{name} must be an int >= 0")
    return v


def _check_frame_size(v: Any) -> None:
    if v is not None and (_nonneg_int(v, "max_frame_size") < MIN_FRAME or v > 0x7FFFFFFF):
        raise InvalidArgument(f"max_frame_size must be between {MIN_FRAME} and 2**31 - 1 bytes")


def _address(address: Any) -> Any:
    if address is None or isinstance(address, str):
        return address
    if (isinstance(address, (tuple, list)) and len(address) == 2 and isinstance(address[0], str)
            and isinstance(address[1], int) and not isinstance(address[1], bool)
            and 0 <= address[1] <= 65535):
        return (address[0], address[1])
    raise InvalidArgument("address is a Unix socket path or a (host, port) tuple")


def node_cfg(location: Any, *, memory: bool, workers: int, worker_concurrency: int,
             worker_restart_after: int, gc: Any, durability: str, address: Any,
             authkey: Optional[bytes], max_map_size: Optional[int],
             max_frame_size: Optional[int], log_level: Optional[str],
             busy_poll: float) -> Dict[str, Any]:
    """Check ``spawn``'s arguments; the node's configuration (creates a private temporary
    location for ``memory=True`` without a location)."""
    temp_location = memory and location is None
    if not temp_location:
        loc = _location(location)
    if durability not in ("full", "fast"):
        raise InvalidArgument("durability is 'full' or 'fast'")
    _nonneg_int(workers, "workers")
    if _nonneg_int(worker_concurrency, "worker_concurrency") < 1:
        raise InvalidArgument("worker_concurrency must be >= 1")
    _nonneg_int(worker_restart_after, "worker_restart_after")
    if authkey is not None and not isinstance(authkey, (bytes, bytearray)):
        raise InvalidArgument("authkey must be bytes")
    if max_map_size is not None:
        _nonneg_int(max_map_size, "max_map_size")
    _check_frame_size(max_frame_size)
    spin = check_busy_poll(busy_poll)
    gc_cfg = gc_settings(gc)
    wire_address = _address(address)
    if temp_location:
        loc = tempfile.mkdtemp(prefix="pipeproc-")
    return {
        "location": loc, "memory": bool(memory), "workers": workers,
        "worker_concurrency": worker_concurrency, "worker_restart_after": worker_restart_after,
        "gc": gc_cfg, "durability": durability, "address": wire_address,
        "authkey": bytes(authkey) if authkey else None, "max_map_size": max_map_size,
        "max_frame_size": max_frame_size, "sys_path": [p for p in sys.path if isinstance(p, str)],
        "cwd": os.getcwd(), "log_level": log_level, "temp_location": temp_location,
        "busy_poll_us": int(round(spin * 1e6)),
    }


class NodeProcess(NamedTuple):
    """A started node: its process, the address it is bound to and its key."""

    process: subprocess.Popen
    address: Any
    authkey: bytes
    location: str


def kill_node(proc: subprocess.Popen) -> None:
    """Kill a node process that was started but is not wanted (a failed first connect)."""
    proc.kill()
    proc.wait()
    if proc.stdin is not None:
        proc.stdin.close()


def start_node(cfg: Dict[str, Any], timeout: float) -> NodeProcess:
    """Run ``python -m pipeproc._node`` with ``cfg`` and wait until it is ready.

    Raises:
        NodeAlreadyActive: a running node owns the location or address (the node's error).
        NoActiveNode: the node did not become ready within ``timeout`` seconds, or exited.
    """
    loc = cfg["location"]
    cfg = dict(cfg)
    read_fd, write_fd = os.pipe()
    cfg["ready_fd"] = write_fd
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeproc._node"], stdin=subprocess.PIPE,
            pass_fds=(write_fd,), env=env, cwd=loc if os.path.isdir(loc) else None,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    try:
        data = msgpack.packb(cfg, use_bin_type=True)
        assert proc.stdin is not None
        proc.stdin.write(len(data).to_bytes(4, "big") + data)
        proc.stdin.flush()
        msg = _read_ready(read_fd, proc, timeout)
    except BaseException:
        kill_node(proc)
        raise
    finally:
        os.close(read_fd)
    if "error" in msg:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
        code, message = msg["error"]
        raise from_code(code, message)
    addr = msg["address"]
    addr = tuple(addr) if isinstance(addr, list) else addr
    return NodeProcess(proc, addr, msg["authkey"], loc)


def _read_ready(fd: int, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoActiveNode(f"the node did not become ready within {timeout} s")
        r, _, _ = select.select([fd], [], [], min(left, 0.5))
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
        elif proc.poll() is not None and not buf:
            break
    if not buf:
        raise NoActiveNode(f"the node process exited during start (code {proc.poll()})")
    out: dict = msgpack.unpackb(buf, raw=False)
    return out


def resolve_node(loc: Optional[str], address: Any, authkey: Optional[bytes]) -> Tuple[Any, bytes]:
    """The node's address and key: as given, else read from the location's files.

    Raises:
        NoActiveNode: the location holds no running node's files.
        InvalidArgument: the location, or a file read from it, is not private to this user
            (another user's, writable by others, a symbolic link).
    """
    if address is not None and authkey is not None:
        return address, authkey
    if loc is None:
        raise InvalidArgument("connect(address=...) needs the node's authkey= as well (or "
                              "location=, the node's directory, which holds its key)")
    try:
        _platform.check_location(loc)
        info = msgpack.unpackb(_platform.read_private(os.path.join(loc, "node.address")), raw=False)
        file_key = _platform.read_private(os.path.join(loc, "node.key"))
    except OSError as exc:
        if address is not None and authkey is None and not os.path.exists(
                os.path.join(loc, "node.key")):
            raise NoActiveNode(
                f"no key for the node at {address!r}: {os.path.join(loc, 'node.key')} does not "
                "exist; pass authkey= (the node's key, pp.authkey) or location= (the node's "
                "directory, which holds its key file node.key)") from None
        raise NoActiveNode(f"no node at {loc}: {exc}") from None
    a = info["address"]
    if address is None:
        address = tuple(a) if isinstance(a, list) else a
    return address, authkey if authkey is not None else file_key


def node_starting(loc: Optional[str]) -> bool:
    """Whether a node may be running or starting at ``loc`` (``connect`` keeps trying).

    ``False`` only when the location exists and nothing holds its lock (``node.lock``, held by
    a node from its start to its end): no node is there and none is starting. When that cannot
    be told (no ``loc``, a location not created yet, no ``/proc/locks``), ``True``.
    """
    if loc is None or not os.path.isdir(loc):
        return True
    try:
        ino = str(os.stat(os.path.join(loc, "node.lock")).st_ino)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        with open("/proc/locks") as f:
            locks = f.read()
    except OSError:
        return True
    for line in locks.splitlines():
        # "3: FLOCK  ADVISORY  WRITE 12207 fe:00:2147199 0 EOF" (the device is not compared:
        # overlay file systems report another one; a false match only means waiting)
        parts = line.split()
        if "FLOCK" in parts and any(p.count(":") == 2 and p.rsplit(":", 1)[1] == ino
                                    for p in parts):
            return True
    return False


def no_node_error(loc: str, last: PipeProcError) -> NoActiveNode:
    """The error of a connect to a location where no node runs or starts."""
    return NoActiveNode(
        f"no node is running or starting at {loc} (nothing holds {os.path.join(loc, 'node.lock')}"
        f"): start one with pipeproc.spawn({loc!r}) or `pipeproc node --location {loc}` "
        f"({last.message})")


class Retry:
    """``connect``'s patience (both clients): keep trying while a node may be starting,
    until ``timeout`` seconds have passed; fail at once where no node runs or starts."""

    def __init__(self, location: Any, address: Any, timeout: Any) -> None:
        self.timeout = check_connect_timeout(timeout)
        self.address = _address(address)
        self.loc: Optional[str] = (None if self.address is not None and location is None
                                   else _location(location))
        self.deadline = time.monotonic() + self.timeout
        self.delay = 0.01
        self.idle_since: Optional[float] = None

    def attempt_timeout(self) -> float:
        """Seconds for one connect + handshake."""
        return min(max(0.05, self.deadline - time.monotonic()), HANDSHAKE_TIMEOUT)

    def failed(self, exc: NoActiveNode) -> float:
        """One attempt found no node: the seconds to sleep before the next one.

        Raises:
            NoActiveNode: no node runs or starts at the location (seen twice), or the time
                is up.
        """
        if node_starting(self.loc):
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = time.monotonic()
        elif time.monotonic() - self.idle_since >= IDLE_CHECK:  # seen twice: not a start race
            raise no_node_error(self.loc, exc)  # type: ignore[arg-type]
        delay = self.delay
        if time.monotonic() + delay > self.deadline:
            raise NoActiveNode(f"{exc.message} (gave up after {self.timeout} s)")
        self.delay = min(delay * 2, 0.2)
        return delay


__all__ = ["BUSY_POLL", "DEFAULT_LOCATION", "NodeProcess", "Retry", "kill_node", "node_cfg",
           "resolve_node", "start_node"]
