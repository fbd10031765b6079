"""The Redis backend: the node's ops answered by server-side scripts (SCALE.md).

:class:`Backend` answers the same wire ops as the embedded node (``c1``, ``range``,
``proc``, ``ack``...) with the same reply shapes, so that everything in
:mod:`pipeproc._calls` (argument checks, reply shaping) and both clients work over Redis
unchanged. Each op that the node runs as one write transaction is one script of
:mod:`pipeproc._rscripts`, run with ``EVALSHA`` (loaded with ``SCRIPT LOAD`` once, loaded
again after ``NOSCRIPT``). Waits (``wait_for_procs``, live procs, idle workers) ask a script
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

Client side: imports ``_rscripts``, ``_ids``, ``errors``, msgpack and redis-py (the extra
``pipeproc[redis]``).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

import msgpack

from . import _ids, _rscripts
from .errors import (
    AuthFailed,
    ConnectionLost,
    InternalError,
    InvalidArgument,
    NoActiveNode,
    PipeProcError,
    ProcIsDisabled,
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
_SCRIPT_AT = re.compile(r"\s*script: \w+, on @user_script:\d+\.?$")


def _require_redis() -> Any:
    try:
        import redis  # noqa: F401
    except ImportError:
        raise InvalidArgument(
            "the Redis backend needs redis-py: pip install 'pipeproc[redis]'") from None
    return redis


def redact(url: str) -> str:
    """``url`` without its password (for logs, errors, repr and stats)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<redis url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if user else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_namespace(namespace: Any) -> str:
    """A namespace follows the rules of a topic name."""
    if not isinstance(namespace, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", namespace):
        raise InvalidArgument(
            f"namespace must match ^[A-Za-z0-9_-]{{1,200}}$, got {namespace!r}")
    return namespace


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _rows(entries: Any) -> list:
    """Stream entries ``[[id, [b"b", body]], ...]`` as the node's rows ``[ms, seq, body]``."""
    out = []
    for eid, fields in entries:
        ms, _, seq = eid.partition(b"-")
        body = fields[1] if len(fields) > 1 else b"\xc0"
        out.append([int(ms), int(seq), msgpack.unpackb(body, raw=False, strict_map_key=False)])
    return out


_STATE_INT = (3, 4, 5, 10, 11)


def _state(raw: Sequence[Any]) -> list:
    """A script's proc state as the node's wire ``ProcState`` values."""
    out: list = [_s(x) for x in raw[:14]]
    for i in _STATE_INT:
        out[i] = int(out[i])
    rt = float(out[12])
    out[12] = rt
    err = raw[14] if len(raw) > 14 else b""
    out.append(msgpack.unpackb(err, raw=False) if err else None)
    return out


def _key_args(key: Optional[list]) -> List[Any]:
    """``claimed=``'s wire key as 7 script arguments (``""`` for none)."""
    if key is None:
        return [""] * 7
    k = list(key) + [""] * (7 - len(key))
    out = [str(x) if x != "" else "" for x in k[:7]]
    if isinstance(k[5], int):  # the digest, as the scripts write it (16 hex digits)
        out[5] = format(k[5], "016x")
    return out


def _bound_args(bound: Any) -> Tuple[str, str]:
    if bound is None:
        return "", ""
    b: Any = _ids.parse_bound(bound)
    if b[0] == "id":
        return "id", f"{b[1]}-{b[2]}"
    return b[0], str(b[1])


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
        options.setdefault("socket_keepalive", True)
        options.setdefault("health_check_interval", 0)
        try:
            self.pool = redis.ConnectionPool.from_url(url, **options)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"bad Redis URL or option for {self.safe_url}: {exc}") from None
        self.r = redis.Redis(connection_pool=self.pool)
        self._shas: Dict[str, str] = {}
        self._texts: Dict[str, str] = {}
        for name, body in _rscripts.SCRIPTS.items():
            head = "#!lua\n"
            if body.startswith("#!lua"):
                head, _, body = body.partition("\n")
                head += "\n"
            self._texts[name] = head + _rscripts.PRELUDE + body
        self._tl = threading.local()
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
            if _OOM.match(msg) or "OOM" in msg.split(" ", 1)[0]:
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
        sha = self._shas.get(name)
        redis = self._redis_mod
        try:
            if sha is None:
                sha = self._shas[name] = self.r.script_load(self._texts[name])
            try:
                if write and self.durability != "fast":
                    return self._durable(sha, argv)
                return self.r.evalsha(sha, 1, self.P + ":", *argv)
            except redis.exceptions.NoScriptError:
                self._shas[name] = sha = self.r.script_load(self._texts[name])
                if write and self.durability != "fast":
                    return self._durable(sha, argv)
                return self.r.evalsha(sha, 1, self.P + ":", *argv)
        except PipeProcError:
            raise
        except redis.RedisError as exc:
            raise self._error(exc) from None

    def _durable(self, sha: str, argv: List[Any]) -> Any:
        """The script and the durability wait in one round trip (a pipeline)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.evalsha(sha, 1, self.P + ":", *argv)
        if self._waitaof:
            pipe.execute_command("WAITAOF", 1, 1 if self.durability == "replicated" else 0, 0)
        elif self.durability == "replicated":
            pipe.execute_command("WAIT", 1, 5000)
        res = pipe.execute(raise_on_error=False)
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

    def block(self, bell_id: str, timeout: float, conn: Any = None) -> None:
        """Block until the doorbell rings after ``bell_id`` or ``timeout`` seconds pass."""
        ms = max(1, int(min(timeout, MAX_BLOCK) * 1000))
        client = conn if conn is not None else self.r
        try:
            client.xread({self.P + ":bell": bell_id}, count=1, block=ms)
        except self._redis_mod.RedisError as exc:
            raise self._error(exc) from None

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
        try:
            self.pool.disconnect()
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ the ops

    def handle(self, op: str, args: Sequence[Any], within: Optional[float] = None,
               conn: Any = None, cancelled: Optional[Callable[[], bool]] = None) -> Any:
        """Answer ``op`` as the node would (same reply shape)."""
        fn = getattr(self, "op_" + op, None)
        if fn is None:
            raise InvalidArgument(f"{op!r} is not available on the Redis backend")
        if op in ("wait_idle", "live"):
            return fn(*args, conn=conn, cancelled=cancelled)
        return fn(*args)

    def op_limits(self) -> Dict[str, int]:
        return {"max_frame_size": MAX_FRAME}

    def op_ping(self, *args: Any) -> list:
        self.r.ping()
        return list(args)

    def op_c1(self, topic: str, body: bytes) -> list:
        ms, seqs = self.script("commit", topic, body)
        return [ms, seqs[0]]

    def op_c(self, items: list) -> list:
        flat: List[Any] = []
        for t, b in items:
            flat += [t, b]
        ms, seqs = self.script("commit", *flat)
        return [ms, list(seqs)]

    def op_length(self, topic: str) -> int:
        _ids.check_topic(topic)
        return int(self.script("length", topic, write=False))

    def op_topics(self) -> List[str]:
        return sorted(_s(t) for t in self.script("topics", write=False))

    def _page(self, topic: str, lo: Tuple[str, str], hi: Tuple[str, str], exclusive: bool,
              reverse: bool, left: int, page_size: int) -> list:
        n = min(page_size, 10_000)
        if left > 0:
            n = min(n, left)
        es, lo_raw, hi_raw = self.script("range", topic, lo[0], lo[1], hi[0], hi[1],
                                         "1" if exclusive else "0", "1" if reverse else "0",
                                         n, write=False)
        rows = _rows(es)
        tail = None
        if len(rows) == n and es:
            more = left - len(rows) if left > 0 else 0
            if left <= 0 or more > 0:
                last = _s(es[-1][0])
                if reverse:
                    tail = [_s(lo_raw), "(" + last, more]
                else:
                    tail = ["(" + last, _s(hi_raw), more]
        return [rows, tail]

    def op_range(self, topic: str, start: Any, end: Any, limit: int, exclusive: bool,
                 reverse: bool, page_size: int) -> list:
        _ids.check_topic(topic)
        lower, upper = (end, start) if reverse else (start, end)
        return self._page(topic, _bound_args(lower), _bound_args(upper), bool(exclusive),
                          bool(reverse), int(limit), int(page_size))

    def op_page(self, topic: str, lo: str, hi: str, left: int, reverse: bool,
                page_size: int) -> list:
        return self._page(topic, ("raw", lo), ("raw", hi), False, bool(reverse), int(left),
                          int(page_size))

    def op_proc(self, topic: str, name: str, offset: str, count: int, max_reclaims: int,
                reclaim_timeout: float, on_max: str) -> Any:
        res = self.script("proc", topic, name, offset, count, max_reclaims,
                          repr(float(reclaim_timeout)), on_max)
        if not res:
            return None
        return [_rows(res[1]), int(res[0])]

    def op_ack(self, name: str, key: Optional[list]) -> str:
        return _s(self.script("ack", name, *_key_args(key)))

    def op_ackc(self, name: str, items: list, key: Optional[list]) -> list:
        flat: List[Any] = []
        for t, b in items:
            flat += [t, b]
        acked, ms, seqs = self.script("ackc", name, *_key_args(key), *flat)
        return [_s(acked), ms, list(seqs)]

    def op_reclaim(self, name: str, key: Optional[list]) -> str:
        return _s(self.script("reclaim", name, *_key_args(key)))

    def op_inspect(self, name: str) -> list:
        return _state(self.script("inspect", name))

    def op_disable(self, name: str) -> list:
        return _state(self.script("disable", name))

    def op_resume(self, name: str) -> list:
        return _state(self.script("resume", name))

    def op_destroy(self, name: str) -> list:
        return _state(self.script("destroy", name))

    def op_avail(self, specs: list) -> Any:
        flat: List[Any] = []
        for topic, name, offset, count, mr, rt, on_max in specs:
            flat += [topic, name, offset, count, mr, repr(float(rt)), on_max]
        res = self.script("avail", self._rr, *flat)
        if not res:
            return None
        name, pos, cnum, es = res
        self._rr = int(pos)
        count = int(specs[int(pos) - 1][3]) if int(pos) >= 1 else 1
        return [_s(name), count > 1, [_rows(es), int(cnum)]]

    def op_sysproc(self, name: str, topics: list, multi: bool, ref: str, tos: list,
                   offset: str, count: int, max_reclaims: int, reclaim_timeout: float,
                   on_max: str, backoff: Optional[list] = None) -> list:
        names = [f"{name}__{t}" for t in topics] if multi else [name]
        for pn in names:
            _ids.check_proc_name(pn)
        d = {"procs": names, "topics": list(topics), "processor": ref, "to": list(tos),
             "count": int(count), "multi": bool(multi),
             "backoff": [float(x) for x in (backoff or [0.1, 30.0])]}
        states = self.script("sysproc", name, msgpack.packb(d), offset, max_reclaims,
                             repr(float(reclaim_timeout)), on_max)
        return [_state(s) for s in states]

    def op_create_live(self, topic: str, name: str, offset: str) -> list:
        st = _state(self.script("create_live", topic, name, offset, LIVE_LEASE_MS))
        self._live.add(name)
        return st

    def renew_leases(self) -> None:
        """Renew the leases of this client's live procs (a client alive keeps them)."""
        if self._live:
            self.script("lease", LIVE_LEASE_MS, *sorted(self._live))

    def op_live(self, topic: str, name: str, offset: str, count: int, timeout: Any,
                held: Optional[int], conn: Any = None,
                cancelled: Optional[Callable[[], bool]] = None) -> Any:
        """A live proc's next delivery: claim now, or block on the doorbell until one
        can be made (``None``: the hidden proc is gone, the end)."""
        end = None if timeout is None else time.monotonic() + float(timeout)
        while True:
            res = self.script("live", topic, name, count, "" if held is None else str(held),
                              LIVE_LEASE_MS)
            kind = _s(res[0])
            if kind == "end":
                self._live.discard(name)
                return None
            if kind == "claim":
                return [_rows(res[2]), int(res[1])]
            if cancelled is not None and cancelled():
                return None
            wait = MAX_BLOCK if end is None else end - time.monotonic()
            if wait <= 0:
                return None
            self.block(_s(res[1]), min(wait, LIVE_LEASE_MS / 3000), conn)

    def op_wait_idle(self, names: Optional[list], timeout: Optional[float], conn: Any = None,
                     cancelled: Optional[Callable[[], bool]] = None) -> None:
        end = None if timeout is None else time.monotonic() + float(timeout)
        while True:
            res = self.script("idle", "1" if names is not None else "0", *(names or []))
            kind = _s(res[0])
            if kind == "idle":
                return None
            if kind == "dead":
                raise dead_error(_s(res[1]), _state(res[2]))
            bell_id, next_dl, now = _s(res[1]), _s(res[2]), int(res[3])
            wait = MAX_BLOCK
            if next_dl:
                wait = min(wait, max(0.0, (float(next_dl) - now) / 1000.0) + 0.002)
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    raise Timeout(f"procs still busy after {timeout} s")
                wait = min(wait, left)
            self.block(bell_id, wait, conn)

    def op_stats(self) -> Dict[str, Any]:
        topics_raw, procs_raw, workers_raw, now, sys_raw = self.script("stats", write=False)
        topics = {_s(t): {"length": int(n), "stored": int(stored),
                          "created_at": int(created or 0)}
                  for t, n, stored, created in topics_raw}
        procs = {}
        for st_raw, lag, pend, sysname, left in procs_raw:
            st = _state(st_raw)
            procs[st[0]] = {"topic": st[1], "status": st[9], "pending": _s(pend),
                            "reclaims": st[10], "lag": int(lag),
                            "last_acked_range": st[7], "last_error": st[14],
                            "backoff_left": int(left) / 1000.0}
        sysprocs = {_s(sys_raw[i]): msgpack.unpackb(sys_raw[i + 1], raw=False)
                    for i in range(0, len(sys_raw), 2)}
        workers = []
        for wid, beat, info in workers_raw:
            d = {_s(info[i]): _s(info[i + 1]) for i in range(0, len(info), 2)}
            workers.append({"id": _s(wid), "pid": int(d.get("pid", 0)),
                            "host": d.get("host", ""),
                            "executions": int(d.get("executions", 0)),
                            "failures": int(d.get("failures", 0)),
                            "last_seen_ms": int(float(beat))})
        return {"workers": workers, "topics": topics, "procs": procs,
                "system_procs": sysprocs,
                "redis": {"url": self.safe_url, "namespace": self.namespace,
                          "durability": self.durability, **self.server}}


def dead_error(name: str, st: list) -> PipeProcError:
    """``proc_is_disabled`` for ``wait_for_procs`` over a dead stage (as the node says it)."""
    err = st[14]
    last = (f"; last error on logs {err.get('range')}: {err.get('type')}: "
            f"{err.get('message')}" if err else "")
    return ProcIsDisabled(
        f"proc {name!r} was disabled after {st[10]} failed attempts in a row "
        f"(max_reclaims={st[11]}) with work left{last}. Fix the cause, "
        f"then resume_proc({name!r}) (pipeproc resume {name})")


def _no_secret(text: str, url: str) -> str:
    """``text`` with the URL's password removed, wherever it appears."""
    try:
        pw = urlsplit(url).password
    except ValueError:
        pw = None
    if pw:
        text = text.replace(pw, "***")
    return text.replace(url, redact(url))


__all__ = ["Backend", "redact", "check_namespace", "DEFAULT_NAMESPACE"]
