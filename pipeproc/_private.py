"""A node's location is private to its owner, or refused (the node and the clients).

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
import logging
import os
import shutil
import stat
from typing import Optional

from .errors import InvalidArgument

log = logging.getLogger("pipeproc.location")

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
#: The entries of a location: (name, kind), kind "file" or "dir".
ENTRIES = (("node.lock", "file"), ("node.key", "file"), ("node.address", "file"),
           ("store.created", "file"))
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
        chunks = []
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
    import fcntl
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
