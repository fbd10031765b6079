"""The Redis backend's plumbing (SCALE.md): :class:`Backend`.

It connects and checks the server (version, memory policy, persistence against the
durability asked for), runs scripts, waits for durability, turns Redis errors into the
node's error classes and blocks on the doorbell. :class:`pipeproc._rops.Ops`, a
``Backend``, answers the node's wire ops with the node's reply shapes, so that
:mod:`pipeproc._calls` and both clients work over Redis unchanged. Each op that the node
runs as one write transaction is one script of :mod:`pipeproc._rscripts`. The scripts form
one Redis function library (:func:`pipeproc._rlua.library`), loaded with ``FUNCTION LOAD``
once per server (again when a call finds it missing) and run with ``FCALL``: the shared Lua
runs once at load, not at every call as it would with ``EVALSHA`` (measured: 13 against
21–23 µs of server time per commit). Waits (``wait_for_procs``, live procs, idle workers) ask a script
first; when there is nothing to do the script answers with the doorbell's last id and the
client blocks on the doorbell (``XREAD BLOCK``, outside any script) until the next change
or the next deadline.

Write requests carry a request id (``client connection id``, ``number``): the script
remembers the last request of each client connection with its reply for 5 minutes, so a
request sent again after its reply was lost is applied once. The library never resends by
itself.

Durability (SCALE.md §3): ``"full"`` waits until the write is on the primary's disk
(``WAITAOF 1 0 0`` on Redis >= 7.2; on 7.0 it requires ``appendfsync always``, checked at
connect), ``"replicated"`` also waits for one replica (``WAITAOF 1 1`` or ``WAIT 1``),
``"fast"`` waits for nothing.

Client side: imports ``_rlua``, ``_rscripts``, ``errors`` and redis-py (the extra
``pipeproc[redis]``).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import uuid
import weakref
from typing import Any, Dict, List, Optional, Tuple, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from . import _rlua, _rscripts
from .errors import (
    AuthFailed,
    ConnectionLost,
    InternalError,
    InvalidArgument,
    NoActiveNode,
    PipeProcError,
    StorageFull,
    Timeout,
    from_code,
)

log = logging.getLogger("pipeproc.redis")

DEFAULT_NAMESPACE = "pipeproc"
#: How long a live proc's hidden proc outlives its last sign of life (ms).
LIVE_LEASE_MS = 30_000
#: A worker whose heartbeat is older than this is dead (ms).
WORKER_DEAD_MS = 5_000
#: The longest single block on the doorbell (s): a waiter re-checks at least this often,
#: so that a doorbell trimmed under it never leaves it waiting for nothing.
MAX_BLOCK = 30.0
#: Redis' largest bulk string by default (proto-max-bulk-len).
MAX_FRAME = 512 * 1024 * 1024
#: Options of redis-py that would break the guarantees (SCALE.md §1).
REFUSED_OPTIONS = {"retry", "retry_on_timeout", "retry_on_error",
                   "single_connection_client", "decode_responses", "protocol"}
#: The socket timeout of every connection (s): longer than any blocking wait
#: (``MAX_BLOCK``), so that a wait never times out, and a dead server is still noticed.
SOCKET_TIMEOUT = MAX_BLOCK + 30.0
#: The server-side write errors that mean "no room" (nothing of the script ran).
_OOM = re.compile(r"^(OOM|-?OOM)\b")
#: What Redis appends to an error raised in a script.
_SCRIPT_AT = re.compile(r"\s*script: \w+, on @user_(script|function):\d+\.?$")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _require_redis() -> Any:
    try:
        import redis  # noqa: F401
    except ImportError:
        raise InvalidArgument(
            "the Redis backend needs redis-py: pip install 'pipeproc[redis]'") from None
    return redis


def _secrets(url: str) -> List[str]:
    """The secrets a URL carries: the password of ``user:pass@`` and any ``password=`` of its
    query (redis-py's form for ``unix://``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    out = [parts.password] if parts.password else []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k.lower() == "password" and v:
            out.append(v)
    return out


def redact(url: str) -> str:
    """``url`` without its password (for logs, errors, repr and stats)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<redis url>"
    if not _secrets(url):
        return url
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        netloc = f"{user}:***@{host}" if user else f"***@{host}"
    query = "&".join(f"{k}=***" if k.lower() == "password" else f"{k}={v}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    out = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc and url.startswith(parts.scheme + "://"):  # unix:///path keeps its slashes
        out = out.replace(parts.scheme + ":", parts.scheme + "://", 1)
    return out


def check_namespace(namespace: Any) -> str:
    """A namespace follows the rules of a topic name."""
    if not isinstance(namespace, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", namespace):
        raise InvalidArgument(
            f"namespace must match ^[A-Za-z0-9_-]{{1,200}}$, got {namespace!r}")
    return namespace


_B = TypeVar("_B", bound="Backend")


class Backend:
    """The node's ops over one Redis namespace (thread-safe: redis-py's connection pool).

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        namespace: the namespace's name (hash tag ``{namespace}`` on every key).
        options: extra keyword arguments for redis-py (those in ``REFUSED_OPTIONS`` refused).
        durability: ``"full"``, ``"replicated"`` or ``"fast"``.
    """

    def __init__(self, url: str, namespace: str = DEFAULT_NAMESPACE,
                 options: Optional[Dict[str, Any]] = None, durability: str = "full",
                 timeout: float = 5.0) -> None:
        redis = _require_redis()
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidArgument("redis= is a redis://, rediss:// or unix:// URL")
        self.namespace = check_namespace(namespace)
        if durability not in ("full", "replicated", "fast"):
            raise InvalidArgument("durability is 'full', 'replicated' or 'fast'")
        self._given = dict(options or {})
        options = dict(options or {})
        bad = sorted(set(options) & REFUSED_OPTIONS)
        st = options.get("socket_timeout", SOCKET_TIMEOUT)
        if st is not None and (not isinstance(st, (int, float)) or st < SOCKET_TIMEOUT):
            bad.append(f"socket_timeout={st!r} (shorter than a blocking wait: use >= "
                       f"{SOCKET_TIMEOUT:.0f} or None)")
        if bad:
            raise InvalidArgument(
                f"redis_options {bad} would break pipeproc's guarantees (blocking waits, "
                "no automatic retries of writes) and are refused")
        self.url = url
        self.safe_url = redact(url)
        self.durability = durability
        self.P = "{" + namespace + "}"
        self._redis_mod = redis
        options.setdefault("socket_connect_timeout", timeout)
        # redis-py 8 gives socket_timeout the connect timeout's value when it is not set:
        # a blocking wait on the doorbell must outlive it
        options.setdefault("socket_timeout", SOCKET_TIMEOUT)
        if not url.startswith("unix://"):  # a Unix socket connection takes no keepalive
            options.setdefault("socket_keepalive", True)
        options.setdefault("health_check_interval", 0)
        try:
            self.pool = redis.ConnectionPool.from_url(url, **options)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"bad Redis URL or option for {self.safe_url}: {exc}") from None
        self.r = redis.Redis(connection_pool=self.pool)
        #: the scripts as one Redis function library (loaded once per server, and again
        #: when a call finds it missing), each script's function name, the read-only ones
        self._lib, self._fnames, self._readonly = _rlua.library(_rscripts.SCRIPTS)
        self._loaded = False
        self._tl = threading.local()
        #: the connections held by threads for scripts (see _exec), closed by close()
        self._held: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._client_id = uuid.uuid4().hex
        self._rr = 0
        self.server: Dict[str, Any] = {}
        self._waitaof = False
        self._live: set = set()
        self._closed = False
        self._check_server(timeout)

    # ------------------------------------------------------------------ plumbing

    def _check_server(self, timeout: float) -> None:
        """Connect (retrying until ``timeout``), check the server's version, memory
        policy and persistence against the durability asked for."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.r.info("server")
                break
            except self._redis_mod.AuthenticationError:
                raise AuthFailed(f"Redis at {self.safe_url} refused the credentials") from None
            except self._redis_mod.ResponseError as exc:
                if (isinstance(exc, getattr(self._redis_mod.exceptions, "NoPermissionError", ()))
                        or "NOPERM" in str(exc) or "no permissions" in str(exc)):
                    # an ACL user without INFO: fine, the checks below are skipped
                    info = {}
                    break
                raise self._error(exc) from None
            except (self._redis_mod.ConnectionError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise NoActiveNode(f"no Redis server answers at {self.safe_url}: "
                                       f"{_no_secret(str(exc), self.url)}") from None
                time.sleep(0.05)
        version = str(info.get("redis_version", "0"))
        self.server["redis_version"] = version or "unknown"
        parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2]) or (0, 0)
        if info and parts < (7, 0):
            raise InvalidArgument(f"the Redis backend needs Redis >= 7.0, {self.safe_url} "
                                  f"runs {version}")
        self._waitaof = parts >= (7, 2)
        conf = self._config("maxmemory-policy", "appendonly", "appendfsync")
        self.server.update({k: conf.get(k, "unknown") for k in
                            ("maxmemory-policy", "appendonly", "appendfsync")})
        policy = conf.get("maxmemory-policy")
        if policy is not None and policy != "noeviction":
            raise InvalidArgument(
                f"Redis at {self.safe_url} has maxmemory-policy {policy!r}: it may delete "
                "topics and procs silently; pipeproc needs 'noeviction'")
        if policy is None:
            log.warning("cannot read the maxmemory-policy of %s (CONFIG GET not allowed): "
                        "make sure it is 'noeviction'", self.safe_url)
        if self.durability != "fast" and not self._waitaof:
            aof, fsync = conf.get("appendonly"), conf.get("appendfsync")
            if aof is None or fsync is None:
                log.warning("cannot read the persistence settings of %s: durability=%r "
                            "relies on appendonly yes + appendfsync always there",
                            self.safe_url, self.durability)
            elif aof != "yes" or fsync != "always":
                raise InvalidArgument(
                    f"durability={self.durability!r} on Redis {version} needs appendonly yes "
                    f"and appendfsync always (the server has appendonly {aof}, appendfsync "
                    f"{fsync}); set them, or use durability='fast'")

    def _config(self, *names: str) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for n in names:
            try:
                got = self.r.config_get(n)
            except Exception:  # noqa: BLE001 - CONFIG may be refused to an ACL user
                continue
            for k, v in got.items():
                out[_s(k)] = _s(v)
        return out

    def _error(self, exc: BaseException) -> PipeProcError:
        """A redis-py error as the PipeProcError a node would raise."""
        redis = self._redis_mod
        msg = _SCRIPT_AT.sub("", _no_secret(str(exc), self.url))
        if isinstance(exc, redis.ResponseError):
            if msg.startswith("PP "):
                _, code, text = (msg + " ").split(" ", 2)
                return from_code(code, text.strip())
            m = re.search(r"PP (\w+) (.*)", msg)
            if m:
                return from_code(m.group(1), m.group(2))
            if (isinstance(exc, getattr(redis.exceptions, "OutOfMemoryError", ()))
                    or _OOM.match(msg) or "used memory > 'maxmemory'" in msg):
                return StorageFull(f"Redis refused the write (out of memory, nothing of it "
                                   f"was written): {msg}")
            if (isinstance(exc, getattr(redis.exceptions, "NoPermissionError", ()))
                    or "NOPERM" in msg or "no permissions" in msg):
                return AuthFailed(f"the Redis user may not use namespace "
                                  f"{self.namespace!r}: {msg}")
            if msg.startswith("NOAUTH") or isinstance(exc, redis.AuthenticationError):
                return AuthFailed(f"Redis at {self.safe_url} refused the credentials")
            return InternalError(f"Redis error: {msg}")
        if isinstance(exc, redis.AuthenticationError):
            return AuthFailed(f"Redis at {self.safe_url} refused the credentials")
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
            return ConnectionLost(f"the Redis server at {self.safe_url} went away: {msg}")
        return InternalError(f"Redis error: {msg}")

    def _rid(self) -> Tuple[str, str]:
        """This thread's request id: (a request stream id of its own, a number). Each
        thread's requests are sequential, so the script remembering the last one of each
        stream is enough to apply a resent request once."""
        tl = self._tl
        n = getattr(tl, "n", None)
        if n is None:
            n = tl.n = itertools.count(1)
            tl.cid = uuid.uuid4().hex  # never derived from a thread id (ids are reused)
        return tl.cid, str(next(n))

    def script(self, name: str, *args: Any, rid: Optional[Tuple[str, str]] = None,
               write: bool = True) -> Any:
        """Run script ``name`` (``args`` after the request id); a write waits for the
        durability asked for. ``rid`` replaces the request id (tests: a resent request)."""
        if self._closed:
            raise NoActiveNode("this client is closed")
        head: List[Any] = list(rid if rid is not None else (self._rid() if write else ("", "")))
        argv = head + list(args)
        cmd = ("FCALL_RO" if name in self._readonly else "FCALL", self._fnames[name], 1,
               self.P + ":", *argv)
        wait = write and (self._waitaof and self.durability != "fast"
                          or self.durability == "replicated")
        redis = self._redis_mod
        try:
            for attempt in (0, 1):
                try:
                    if not self._loaded:
                        self._load()
                    if wait:
                        return self._durable(cmd)
                    return self._exec(cmd)[0]
                except redis.ResponseError as exc:
                    # the library is gone (FUNCTION FLUSH, a new server): nothing ran; load
                    # it again and call once more
                    if attempt or "function not found" not in str(exc).lower():
                        raise
                    self._loaded = False
        except PipeProcError:
            raise
        except redis.RedisError as exc:
            raise self._error(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _load(self) -> None:
        """Load the function library (once per server; a library of this very code that is
        already there is fine)."""
        try:
            self._exec(("FUNCTION", "LOAD", self._lib))
        except self._redis_mod.ResponseError as exc:
            if "already exists" not in str(exc):
                raise
        self._loaded = True

    def _exec(self, *commands: tuple) -> List[Any]:
        """Send ``commands`` at once on this thread's own connection and read their
        replies (an error reply is raised after every reply was read, so the connection
        stays in step). The lean path: redis-py's ``execute_command`` and its pool cost
        ~9 µs of CPU per call more than this (measured: 17.5 against 8.0 µs per call)."""
        tl = self._tl
        c = getattr(tl, "conn", None)
        if c is None:
            # a connection of the pool's kind, owned by this thread (not taken from the
            # pool, nor counted by it: redis-py's pools stop at 100 connections made; a
            # thread that ends takes its connection along, closed when collected)
            c = tl.conn = self.pool.connection_class(**self.pool.connection_kwargs)
            self._held.add(c)
        try:
            if len(commands) == 1:
                c.send_command(*commands[0])
            else:
                c.send_packed_command(c.pack_commands(commands))
            out: List[Any] = []
            error: Optional[BaseException] = None
            for _ in commands:
                try:
                    out.append(c.read_response())
                except self._redis_mod.ResponseError as exc:
                    out.append(exc)
                    error = error or exc
        except BaseException:
            c.disconnect()  # out of step (or gone): the next call reconnects
            raise
        if error is not None and len(commands) == 1:
            raise error
        return out

    def _durable(self, cmd: tuple) -> Any:
        """The script and the durability wait in one round trip."""
        cmds: List[tuple] = [cmd]
        if self._waitaof:
            cmds.append(("WAITAOF", 1, 1 if self.durability == "replicated" else 0, 0))
        elif self.durability == "replicated":
            cmds.append(("WAIT", 1, 5000))
        res = self._exec(*cmds)
        if isinstance(res[0], Exception):
            raise res[0]
        if len(res) > 1:
            got = res[1]
            if isinstance(got, Exception):
                raise got
            replicas = got[1] if isinstance(got, list) else got
            if self.durability == "replicated" and int(replicas) < 1:
                raise Timeout("the write is on the primary but no replica acknowledged it "
                              "in time (durability='replicated')")
            if isinstance(got, list) and int(got[0]) < 1:
                raise Timeout("the primary did not confirm the write on its disk "
                              "(WAITAOF): is appendonly on?")
        return res[0]

    def block(self, bell_id: str, timeout: float, conn: Any = None,
              stream: str = "bell") -> None:
        """Block until the doorbell (``stream``: ``"bell"``, or the supervisors' ``"tbell"``)
        rings after ``bell_id``, or ``timeout`` seconds pass."""
        ms = max(1, int(min(timeout, MAX_BLOCK) * 1000))
        client = conn if conn is not None else self.r
        if getattr(client, "pp_closed", False):  # a channel closed to end this very wait
            raise ConnectionLost("the wait was ended (its client or channel closed)")
        try:
            client.xread({self.P + ":" + stream: bell_id}, count=1, block=ms)
        except self._redis_mod.RedisError as exc:
            raise self._error(exc) from None

    def wake(self) -> None:
        """Ring the doorbell: every wait blocked on it looks again (a cancelled or closing
        wait then ends; the others find nothing new and block again)."""
        try:
            self._exec(("XADD", self.P + ":bell", "MAXLEN", "~", 1000, "*", "e", "wake",
                        "w", ""))
        except Exception:  # noqa: BLE001 - best effort: the wait also ends at its deadline
            pass

    def reopen(self: _B) -> _B:
        """The same backend on new connections (a child after ``os.fork()``: the pool's
        sockets are the parent's, never to be used or closed here)."""
        return type(self)(self.url, self.namespace, self._given, self.durability)

    def close(self) -> None:
        """Disconnect; this client's live procs' hidden procs go (a crashed client's go
        when their lease runs out)."""
        if self._live and not self._closed:
            try:
                self.script("drop_live", *sorted(self._live))
            except PipeProcError:
                pass
            self._live.clear()
        self._closed = True
        for c in list(self._held):
            try:
                c.disconnect()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        try:
            self.pool.disconnect()
        except Exception:  # noqa: BLE001
            pass


def _no_secret(text: str, url: str) -> str:
    """``text`` with the URL's password(s) removed, wherever they appear."""
    text = text.replace(url, redact(url))
    for pw in _secrets(url):
        text = text.replace(pw, "***")
    return text


