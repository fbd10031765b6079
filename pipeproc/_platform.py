"""What only POSIX has, in one room: a Windows port (named pipes, ``msvcrt`` locking) is
this module written again, nothing else.

Owns:

* **the location's privacy** (both sides: the node, and a client connecting by location);
* the location's **lock** (``flock`` on ``node.lock``: one node per location);
* the node's **Unix socket** (its path, a short one when the location's is too long);
* **signals** (SIGTERM/SIGINT stop the node), the **lifeline** (EOF on stdin: the spawning
  process is gone) and the **parent-death watch** (``getppid``);
* peer credentials (``SO_PEERCRED``), bytes waiting on a socket (``FIONREAD``), and giving
  freed memory back (glibc ``malloc_trim``). (``/dev/shm`` for memory stores is chosen in
  ``_store``, next to the LMDB environment it serves.)

May import: the standard library and ``errors``. Never a client-side or another node-side
module: both sides use it.

The location's privacy
----------------------

A node's location is private to its owner, or refused (the node and the clients).

What a location is trusted with (the authkey, the address clients connect to, the store)
must not be reachable by another local user. So, like OpenSSH's ``StrictModes``:

* the location is a directory owned by this user that nobody else can write to. One that
  others can write to is made private (``chmod 700``) when it is ours and empty, and refused
  otherwise;
* nothing in it is followed through a symbolic link: every file pipeproc uses there is
  opened with ``O_NOFOLLOW`` (and created with ``O_EXCL``), and an entry that is a link, or
  that is owned by another user, is refused;
* whatever is left at the socket path is removed by the node that holds the location's lock
  (a stale socket, a dangling link, an empty directory of ours), and refused when it is not
  ours or a non-empty directory.

A refusal is :class:`~pipeproc.errors.InvalidArgument` naming the path, what is wrong and
what to do; it is raised by ``spawn`` (reported by the node) and by a client connecting by
location (at once: waiting would not change it).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import tempfile
import termios
import threading
from multiprocessing.connection import Listener
from typing import Any, Callable, List, Optional, Tuple

from .errors import InvalidArgument

log = logging.getLogger("pipeproc.location")

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
#: The entries of a location: (name, kind), kind "file" or "dir".
#: In the location: written once its store exists (a missing store is then damage).
STORE_MARKER = "store.created"
ENTRIES = (("node.lock", "file"), ("node.key", "file"), ("node.address", "file"),
           (STORE_MARKER, "file"))
SOCKET = "node.sock"
STORE = "store"
STORE_FILES = ("data.mdb", "lock.mdb", "gc-reserve")
TEMP_PREFIX = "pipeproc-"
#: Written into ``node.lock`` after the pid by a node whose location is a temporary
#: directory of its own (a memory node without a location).
TEMP_MARK = b" temporary"


def _refuse(path: str, what: str, fix: str) -> InvalidArgument:
    return InvalidArgument(f"unsafe location: {path} {what}; {fix}")


def _not_ours(path: str, st: os.stat_result) -> Optional[InvalidArgument]:
    uid = os.geteuid()
    if st.st_uid != uid:
        return _refuse(path, f"is owned by uid {st.st_uid}, not by this user (uid {uid})",
                       "pipeproc uses only a location and files of its own user")
    return None


def _writable(path: str, st: os.stat_result) -> InvalidArgument:
    return _refuse(path, f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})",
                   f"make it private (chmod 700 {path}) after checking what it holds, "
                   "or use another directory")


def _link(path: str) -> InvalidArgument:
    return _refuse(path, "is a symbolic link (pipeproc never follows links in its location)",
                   "remove it")


def check_location(path: str, *, create: bool = False) -> None:
    """Check that ``path`` is a private directory of this user.

    ``create`` (the node): create it (0700) when missing, and make an empty one of ours that
    others can write to private. A client (``create=False``) only checks.

    Raises:
        InvalidArgument: it is not a directory, is owned by another user, or others can
            write to it. FileNotFoundError: it does not exist (and ``create`` is false).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        # the location itself may be a link to a directory (made by this user or root);
        # the directory it leads to is what gets checked
        if st.st_uid not in (os.geteuid(), 0):
            raise _refuse(path, f"is a symbolic link owned by uid {st.st_uid}",
                          "use a directory of your own")
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory", "use a directory")
    exc = _not_ours(path, st)
    if exc is not None:
        raise exc
    if st.st_mode & 0o022:
        if not create or os.listdir(path):
            raise _writable(path, st)
        os.chmod(path, 0o700)
        if os.listdir(path):  # something got in before the chmod: it cannot be trusted
            raise _writable(path, st)
        log.warning("location %s was writable by other users (mode %04o); made it private (0700)",
                    path, stat.S_IMODE(st.st_mode))


def check_entry(path: str, kind: str) -> Optional[os.stat_result]:
    """Check an entry of the location without following it (``None``: it does not exist).

    Raises:
        InvalidArgument: a symbolic link, another user's, not of ``kind`` ("file", "dir").
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _link(path)
    exc = _not_ours(path, st)
    if exc is not None:
        raise exc
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory", "remove it")
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        raise _refuse(path, "is not a regular file", "remove it")
    if st.st_mode & 0o022:
        raise _writable(path, st)
    return st


def check_entries(location: str, *, memory: bool) -> None:
    """The node, holding the location's lock: check every entry it will use (the store and
    its files too, unless ``memory``) and clear the socket path."""
    for name, kind in ENTRIES:
        check_entry(os.path.join(location, name), kind)
    if not memory:
        store = os.path.join(location, STORE)
        if check_entry(store, "dir") is not None:
            for name in STORE_FILES:
                check_entry(os.path.join(store, name), "file")
    clear_socket_path(os.path.join(location, SOCKET))


def clear_socket_path(path: str) -> None:
    """Remove what a dead node (or anything of ours) left at the socket path: the caller
    holds the location's lock, so no live node listens there.

    Raises:
        InvalidArgument: another user's entry, or a directory that is not empty.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    exc = _not_ours(path, st)
    if exc is not None:
        raise exc
    if stat.S_ISDIR(st.st_mode):
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _refuse(path, "is a directory that is not empty (the node's socket "
                              "goes there)", "remove it") from None
            raise
    else:
        os.unlink(path)  # a stale socket, a file or a link (never followed)
    if not stat.S_ISSOCK(st.st_mode):
        log.warning("removed a %s at the socket path %s",
                    "directory" if stat.S_ISDIR(st.st_mode)
                    else "symbolic link" if stat.S_ISLNK(st.st_mode) else "file", path)


def open_private(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` without following a link; the file must be a regular file of ours that
    others cannot write to. Returns the descriptor.

    Raises:
        InvalidArgument: a link, another user's file, not a regular file, writable by others.
        OSError: as ``os.open``.
    """
    try:
        fd = os.open(path, flags | NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link(path) from None
        raise
    try:
        st = os.fstat(fd)
        bad = _not_ours(path, st)
        if bad is None and not stat.S_ISREG(st.st_mode):
            bad = _refuse(path, "is not a regular file", "remove it")
        if bad is None and st.st_mode & 0o022:
            bad = _writable(path, st)
        if bad is not None:
            raise bad
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: str) -> bytes:
    """The content of a private file of the location (see :func:`open_private`)."""
    fd = open_private(path, os.O_RDONLY)
    try:
        chunks: List[bytes] = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def clean_stale_temp(location: str) -> None:
    """Remove the temporary directories of memory nodes of this user that died without
    cleaning up (kill -9), next to ``location`` (a memory node's own temporary directory).

    A directory is stale when its ``node.lock`` says a memory node made it its temporary
    location (written only once that node held the lock), nobody holds the lock any more
    (its node is dead) and it holds nothing but the node's files. A node still starting
    has not written its lock, and is never touched; neither is a location a user chose."""
    parent = os.path.dirname(location)
    uid = os.geteuid()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX) or entry.path == location:
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            fd = os.open(os.path.join(entry.path, "node.lock"), os.O_RDONLY | NOFOLLOW)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != uid
                    or not os.read(fd, 64).endswith(TEMP_MARK)
                    or not all(n.startswith("node.") for n in os.listdir(entry.path))):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live node holds it
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed %s, left by a memory node that did not stop cleanly", entry.path)
        except OSError:
            continue
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- the node's own

def lock_location(location: str) -> Optional[int]:
    """Take the location's lock (``node.lock``, kept open by the node for its life) and
    write our pid into it; ``None``: another process holds it."""
    fd = open_private(os.path.join(location, "node.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def listen(location: str, address: Any) -> Tuple[Listener, Any, Optional[str]]:
    """The node's listener: ``(listener, address clients use, run directory to remove)``.

    ``address`` ``None``: a Unix socket ``node.sock`` in the location (in a private
    temporary directory when that path is too long for a socket); otherwise TCP
    ``[host, port]``."""
    if address is None:
        rundir = None
        path = os.path.join(location, SOCKET)
        if len(path.encode()) > 100:
            rundir = tempfile.mkdtemp(prefix="pipeproc-")
            path = os.path.join(rundir, SOCKET)
        if os.path.exists(path):
            os.unlink(path)  # stale socket of a dead node: we hold the lock now
        return Listener(path, "AF_UNIX", backlog=512), path, rundir
    listener = Listener(tuple(address), "AF_INET", backlog=512)
    return listener, list(listener.address), None


def on_terminate(fn: Callable[[], None]) -> None:
    """Run ``fn`` on its own thread at SIGTERM or SIGINT (call from the main thread)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=fn, daemon=True).start())


def start_lifeline(fn: Callable[[], None]) -> threading.Thread:
    """Run ``fn`` when stdin reaches its end (the spawning process is gone); the thread is
    started here and returned."""
    def lifeline() -> None:
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        fn()
    t = threading.Thread(target=lifeline, name="lifeline", daemon=True)
    t.start()
    return t


def parent_pid() -> int:
    return os.getppid()


def parent_gone(parent: int) -> bool:
    """Whether the process that started us (pid ``parent``) has died (we were re-parented)."""
    return os.getppid() != parent


def unread(sock: Optional[socket.socket]) -> int:
    """Bytes received on ``sock`` and not read yet (0 when unknown)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,  # type: ignore[union-attr]
                                              b"\0\0\0\0"))[0]
    except (OSError, ValueError, AttributeError):
        return 0


def peer(sock: socket.socket) -> str:
    """Who is at the other end: ``host:port`` over TCP, ``pid/uid`` over a Unix socket."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            return f"pid {pid} (uid {uid})"
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "an unknown peer"


def give_back_memory() -> None:
    """Return freed memory to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Dropping a client that never read its replies frees up to MAX_BACKLOG at once; glibc
    keeps such memory in the arena of the thread that allocated it (the I/O loop) unless
    asked to give it back."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes  # only when a slow reader was dropped (not worth every import)
        import ctypes.util
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
