"""The node's wire ops over Redis: :class:`Ops`, the backend a Redis client talks to.

Each ``op_<name>`` answers the node's op ``<name>`` (``c1``, ``range``, ``proc``, ``ack``...)
with the node's reply shape, so that :mod:`pipeproc._calls` shapes both alike. The
plumbing (connection, scripts, durability, errors, the doorbell) is
:class:`pipeproc._rbackend.Backend`; the scripts are :mod:`pipeproc._rscripts`.

Client side: imports ``_rbackend``, ``_ids``, ``errors`` and msgpack.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack

from . import _ids
from ._rbackend import LIVE_LEASE_MS, MAX_BLOCK, MAX_FRAME, WORKER_DEAD_MS, Backend, _s
from .errors import InvalidArgument, InvalidTopic, PipeProcError, ProcIsDisabled, Timeout

#: The longest block of a wait that can be cancelled (a live proc's, the asyncio client's):
#: closing its connection ends the block at once, except when the close falls while
#: redis-py is still opening that connection (measured: about 2 % of closes); the wait
#: then looks at its cancel flag after at most this long. Notifications do not wait for it:
#: the doorbell wakes the block at once.
CANCEL_CHECK = 1.0


def _rows(entries: Any) -> list:
    """Stream entries ``[[id, [b"b", body]], ...]`` as the node's rows ``[ms, seq, body]``
    (the bodies decoded in one pass of an ``Unpacker``)."""
    if not entries:
        return []
    up = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=0)
    up.feed(b"".join(f[1] if len(f) > 1 else b"\xc0" for _, f in entries))
    out = []
    for (eid, _), body in zip(entries, up):
        ms, _, seq = eid.partition(b"-")
        out.append([int(ms), int(seq), body])
    return out


#: the highest sequence part of a stream id (an upper ``<ms>`` bound takes all of that ms)
_MAX_SEQ = "18446744073709551615"


def _xbound(kind: str, value: str, lower: bool, exclusive: bool) -> str:
    """A range bound as an XRANGE bound (what the ``range`` script does for every kind but
    ``seq``, which needs the stream searched)."""
    if kind == "":
        return "-" if lower else "+"
    if kind == "raw":
        return value
    if kind == "ms":
        return f"{value}-0" if lower else f"{value}-{_MAX_SEQ}"
    return "(" + value if exclusive else value


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



class Ops(Backend):
    """A :class:`Backend` that answers the node's ops (thread-safe)."""


    def handle(self, op: str, args: Sequence[Any], conn: Any = None,
               cancelled: Optional[Callable[[], bool]] = None) -> Any:
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
        if lo[0] == "seq" or hi[0] == "seq":  # ':seq' bounds: the script searches the stream
            es, lo_raw, hi_raw = self.script("range", topic, lo[0], lo[1], hi[0], hi[1],
                                             "1" if exclusive else "0",
                                             "1" if reverse else "0", n, write=False)
        else:
            es, lo_raw, hi_raw = self._xrange(topic, _xbound(*lo, True, exclusive),
                                              _xbound(*hi, False, exclusive), reverse, n)
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

    def _xrange(self, topic: str, lo: str, hi: str, reverse: bool, n: int) -> Tuple[Any, str, str]:
        """A page read with a plain XRANGE/XREVRANGE, the topic's existence checked in the
        same round trip (a topic is never removed, and a stream only grows at its end: the
        two replies are consistent without a script)."""
        stream = f"{self.P}:s:{topic}"
        cmd = ("XREVRANGE", stream, hi, lo, "COUNT", n) if reverse else \
            ("XRANGE", stream, lo, hi, "COUNT", n)
        redis = self._redis_mod
        try:
            exists, es = self._exec(("EXISTS", f"{self.P}:t:{topic}"), cmd)
        except redis.RedisError as exc:
            raise self._error(exc) from None
        if not exists:
            raise InvalidTopic(f"topic {topic!r} does not exist")
        if isinstance(es, Exception):  # a bound Redis refuses (e.g. "(0-0" as an end): none
            es = []
        return es, lo, hi

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
        first = True
        while True:
            if not first and cancelled is not None and cancelled():
                return None  # nobody waits: claim nothing more
            first = False
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
            self.block(_s(res[1]), min(wait, LIVE_LEASE_MS / 3000,
                                       CANCEL_CHECK if cancelled is not None else MAX_BLOCK), conn)

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
            if cancelled is not None and cancelled():
                return None  # nobody waits for the answer any more
            self.block(bell_id, min(wait, CANCEL_CHECK if cancelled is not None else MAX_BLOCK),
                       conn)

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
                            "restarts": int(d.get("restarts", 0)),
                            "slot": int(d.get("slot", 0)),
                            "alive": (d.get("alive", "1") == "1"
                                      and int(now) - int(float(beat)) <= WORKER_DEAD_MS),
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
