"""Requests: their validation, the ops that serve reads, commits, procs and live procs, and
the op table.

Owns:

* **request validation**: every argument a client sends is checked here before anything
  is read or queued (``_int``, ``_valid_body``, ``_items``, ``_bound``, ``_opts``...); a
  request that does not follow the protocol raises :class:`~pipeproc._conn.Malformed` (its
  sender loses the connection), a wrong value a ``PipeProcError`` (its reply);
* :class:`Handlers`: one ``op_*`` method per op of the wire protocol (reads answered at
  once in a read transaction; writes submitted to the writer with the function they run
  in the write transaction and how to reply after the commit; waits parked in ``_waits``);
* :func:`op_table`: op name -> bound method, for the I/O loop (no wrapper per request).

The system procs' and workers' ops are in ``_syshandlers``.

May import: ``_ids``, ``_procs``, ``_protocol``, ``_store``, ``_conn`` (``Malformed``, the
connection type), ``_writer``, ``_waits``, ``errors``, msgpack and the standard library.
Never ``_node`` (which builds the handlers and gives them what they need).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack

from . import _ids, _procs
from ._conn import Conn, Malformed
from ._protocol import err_reply, ok_reply, ok_reply_raw, page
from ._store import PAGE_MAX_LOGS, Store
from ._waits import DEFAULT_BACKOFF, Deadlines, Waits, skipped
from ._writer import Writer
from .errors import (
    InvalidAck,
    InvalidArgument,
    InvalidLogFormat,
    InvalidProc,
    InvalidTopic,
    ProcNameNotUnique,
)

log = logging.getLogger("pipeproc.node")

MAX_TIMEOUT = 10 * 365 * 24 * 3600.0  # seconds; beyond: use -1 (never)
LIVE_PREFIX = "liveproc-"


def write(writer: Writer, conn: Conn, rid: int, fn: Callable[[Any], Any]) -> None:
    """Submit ``fn(tx)`` and reply with its value (or its error) once committed."""
    def done(ok: bool, value: Any) -> None:
        if ok:
            conn.reply(rid, value)
        else:
            conn.fail(rid, value)
    writer.submit(fn, done, conn.id)


# ------------------------------------------------------------------------- validation

def _int(v: Any, name: str, lo: Optional[int] = None) -> int:
    if type(v) is not int or (lo is not None and v < lo):
        raise Malformed(f"{name} must be an int")
    return v


# The first byte of a body: a map, an array or bin (SPEC: a dict, a list or bytes).
_BODY_HEADS = frozenset(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF, 0xC4, 0xC5, 0xC6}
# Stored records are read back inside a few levels of envelope (record, page, reply):
# a body is checked inside as many, so that it can always be decoded again.
_HEADROOM = b"\x91" * 8
# A body shorter than this cannot nest close to msgpack's depth limit (1024): one byte a level.
_DEEP = 1000


def _valid_body(b: Any) -> bytes:
    """A body must be the bytes of exactly one msgpack map, array or bin, decodable inside
    a reply (checked, never kept decoded)."""
    if type(b) is not bytes:
        raise InvalidLogFormat("a log body must arrive msgpack-encoded")
    if not b or b[0] not in _BODY_HEADS:
        raise InvalidLogFormat("a log body must be a dict, a list or bytes")
    try:  # a short body cannot nest deep enough to need the headroom
        msgpack.unpackb(b if len(b) < _DEEP else _HEADROOM + b, strict_map_key=False)
    except Exception:
        raise InvalidLogFormat("a log body is not one valid msgpack object "
                               "(or is nested too deeply)") from None
    return b


def _items(raw: Any) -> List[tuple]:
    """``[[topic, body], ...]`` checked: topic names, and every body as in
    :func:`_valid_body`, the whole batch in one pass of a msgpack ``Unpacker``."""
    if type(raw) is not list:
        raise Malformed("logs must be a list")
    if len(raw) == 1:  # the common single log: the plain check is cheaper
        it = raw[0]
        if type(it) is not list or len(it) != 2:
            raise Malformed("a log must be [topic, body]")
        return [(_ids.check_topic(it[0]), _valid_body(it[1]))]
    items = []
    last = None
    unpacker = msgpack.Unpacker(strict_map_key=False, max_buffer_size=0)
    for it in raw:
        if type(it) is not list or len(it) != 2:
            raise Malformed("a log must be [topic, body]")
        topic, body = it
        if topic != last or last is None:  # batches mostly repeat a topic: check it once
            last = _ids.check_topic(topic)
        if type(body) is not bytes:
            raise InvalidLogFormat("a log body must arrive msgpack-encoded")
        if not body or body[0] not in _BODY_HEADS:
            raise InvalidLogFormat("a log body must be a dict, a list or bytes")
        if len(body) >= _DEEP:  # only a body this long can nest deep enough to matter
            _valid_body(body)
        unpacker.feed(body)
        items.append((last, body))
    end = 0
    try:
        for _, body in items:  # each body is exactly one object: skip it, land on its end
            unpacker.skip()
            end += len(body)
            if unpacker.tell() != end:
                raise ValueError("misaligned")
    except Exception:
        raise InvalidLogFormat("a log body is not one valid msgpack object") from None
    return items


def _bound(v: Any) -> Optional[_ids.Bound]:
    return None if v is None else _ids.parse_bound(v)


def _wait_timeout(v: Any) -> Optional[float]:
    """A wait's timeout: ``None`` or a finite number of seconds >= 0."""
    if v is None:
        return None
    if type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v <= MAX_TIMEOUT:
        raise InvalidArgument("timeout must be a finite number >= 0 or None")
    return float(v)


def _claimed(v: Any) -> Optional[list]:
    if v is None:
        return None
    if type(v) is not list or len(v) not in (6, 7) or any(type(x) is not int for x in v):
        raise InvalidArgument("claimed must identify a claim")
    return v


def _count(count: Any) -> int:
    if type(count) is not int or count < 1:
        raise InvalidArgument("count must be an int >= 1")
    return count


def _opts(max_reclaims: Any, reclaim_timeout: Any, on_max: Any) -> Tuple[int, float, str]:
    if type(max_reclaims) is not int or not (max_reclaims >= 1 or max_reclaims == -1):
        raise InvalidArgument("max_reclaims must be >= 1 or -1")
    if reclaim_timeout is None:
        reclaim_timeout = -1
    if (type(reclaim_timeout) not in (int, float) or not math.isfinite(reclaim_timeout)
            or not (0 < reclaim_timeout <= MAX_TIMEOUT or reclaim_timeout == -1)):
        raise InvalidArgument("reclaim_timeout must be > 0, -1 or None")
    if on_max not in ("disable", "continue"):
        raise InvalidArgument("on_max_reclaims_reached must be 'disable' or 'continue'")
    return max_reclaims, float(reclaim_timeout), on_max


def _backoff(v: Any) -> List[float]:
    """A system proc's ``backoff``: ``[first, cap]`` seconds, ``0 <= first <= cap``."""
    if v is None:
        return list(DEFAULT_BACKOFF)
    if (type(v) is not list or len(v) != 2
            or any(type(x) not in (int, float) or not math.isfinite(x) for x in v)
            or not 0 <= v[0] <= v[1] <= MAX_TIMEOUT):
        raise InvalidArgument("backoff is (first delay, cap) in seconds, 0 <= first <= cap")
    return [float(v[0]), float(v[1])]


def _failure(v: Any) -> Optional[dict]:
    """A worker's report of a processor failure: ``{"type", "message", "traceback"}``."""
    if type(v) is not dict:
        return None
    out = {}
    for k, limit in (("type", 200), ("message", 2000), ("traceback", 20000)):
        x = v.get(k)
        if type(x) is str:
            out[k] = x[:limit] if len(x) <= limit else x[:limit - 3] + "..."
    if "type" not in out:
        return None
    out.setdefault("message", "")
    return out


_LEGACY_LIVE = re.compile(r"liveproc-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _is_live(name: str, rec: dict) -> bool:
    """A live proc's hidden proc: its record says so (``live``, set by ``create_live``).

    Records of stores written before the flag have no ``live`` key at all: there a hidden
    proc is told by what ``live_proc()`` always made — a ``liveproc-<uuid4>`` name and the
    hidden proc's options — so a user's own ``liveproc-…`` proc is never dropped."""
    if "live" in rec:
        return bool(rec["live"])
    return (_LEGACY_LIVE.fullmatch(name) is not None and rec.get("max_reclaims") == -1
            and rec.get("reclaim_timeout") == -1 and rec.get("on_max") == "continue")


# ------------------------------------------------------------------------- the ops

class Handlers:
    """The ops on topics, logs, procs and live procs (``op_*``; see :func:`op_table`).

    Built by the node with its parts: the store, the writer, the parked requests
    (``waits``), the claim deadlines and back-offs (``deadlines``), the ``stopping`` event,
    the frame limit, and callables for what only the node knows (``node_info``,
    ``workers_info`` for ``stats``; ``shutdown``)."""

    def __init__(self, store: Store, writer: Writer, waits: Waits, deadlines: Deadlines,
                 timers: Any, stopping: threading.Event, max_frame: int,
                 node_info: Callable[[], Dict[str, Any]],
                 workers_info: Callable[[], List[Dict[str, Any]]],
                 shutdown: Callable[[], None]) -> None:
        self.store = store
        self.writer = writer
        self.waits = waits
        self.deadlines = deadlines
        self.timers = timers
        self.stopping = stopping
        self.max_frame = max_frame
        self.node_info = node_info
        self.workers_info = workers_info
        self.shutdown = shutdown
        #: the workflow runs' figures for ``stats()["flow"]`` (set by the node)
        self.flow_stats: Optional[Callable[[], Dict[str, Any]]] = None
        self.rr = 0  # round robin position of available_proc's claims

    # ------------------------------------------------------------------ reads

    def op_ping(self, conn: Conn, rid: int, *args: Any) -> None:
        conn.reply(rid, list(args))

    def op_limits(self, conn: Conn, rid: int) -> None:
        conn.reply(rid, {"max_frame_size": self.max_frame})

    def op_length(self, conn: Conn, rid: int, topic: Any) -> None:
        _ids.check_topic(topic)
        with self.store.reader() as r:
            meta = r.topic(topic)
        if meta is None:
            raise InvalidTopic(f"topic {topic!r} does not exist")
        conn.reply(rid, meta.next)

    def op_topics(self, conn: Conn, rid: int) -> None:
        conn.reply(rid, sorted(self.store.topics))

    def op_range(self, conn: Conn, rid: int, topic: Any, start: Any, end: Any, limit: Any,
                 exclusive: Any, reverse: Any, page_size: Any) -> None:
        _ids.check_topic(topic)
        lower, upper = _bound(start), _bound(end)
        if reverse:
            lower, upper = upper, lower
        limit = _int(limit, "limit")
        page_size = _int(page_size, "page_size", 1)
        with self.store.reader() as r:
            meta = r.topic(topic)
            if meta is None:
                raise InvalidTopic(f"topic {topic!r} does not exist")
            lo, hi = r.resolve(meta, lower, upper, bool(exclusive))
            conn.send(ok_reply_raw(rid, self._page(r, meta, topic, lo, hi, limit,
                                                   bool(reverse), page_size)))

    def op_page(self, conn: Conn, rid: int, topic: Any, lo: Any, hi: Any, limit: Any,
                reverse: Any, page_size: Any) -> None:
        _ids.check_topic(topic)
        lo, hi, limit = _int(lo, "lo"), _int(hi, "hi"), _int(limit, "limit")
        page_size = _int(page_size, "page_size", 1)
        with self.store.reader() as r:
            meta = r.topic(topic)
            if meta is None:
                raise InvalidTopic(f"topic {topic!r} does not exist")
            conn.send(ok_reply_raw(rid, self._page(r, meta, topic, lo, hi, limit,
                                                   bool(reverse), page_size)))

    @staticmethod
    def _page(r: Any, meta: Any, topic: str, lo: int, hi: int, limit: int, reverse: bool,
              page_size: int) -> bytes:
        """One page of ``[lo, hi]`` and the continuation ``[topic, lo, hi, limit]`` or None.
        ``limit <= 0`` means no limit."""
        n = min(page_size, PAGE_MAX_LOGS)
        if limit > 0:
            n = min(n, limit)
        recs = r.records(meta, lo, hi, n, reverse)
        tail = None
        if recs:
            last = int.from_bytes(recs[-1][11:19], "big")
            left = limit - len(recs) if limit > 0 else 0
            if limit <= 0 or left > 0:
                if reverse and last - 1 >= max(lo, meta.first):
                    tail = [max(lo, meta.first), last - 1, left]
                elif not reverse and last + 1 <= hi:
                    tail = [last + 1, hi, left]
            if limit > 0 and left <= 0:
                tail = None
        return page(recs, tail)

    def op_inspect(self, conn: Conn, rid: int, name: Any) -> None:
        _ids.check_proc_name(name)
        rec = self.store.procs.get(name)
        if rec is None:
            raise InvalidProc(f"proc {name!r} does not exist")
        conn.reply(rid, _procs.state(name, rec))

    def op_stats(self, conn: Conn, rid: int) -> None:
        store = self.store
        with store.reader() as r:
            topics = {name: {"length": m.next, "stored": m.next - m.first,
                             "created_at": m.created}
                      for name, m in store.topics.items()}
            procs = {}
            for name, rec in list(store.procs.items()):
                procs[name] = {
                    "topic": rec["topic"], "status": rec["status"],
                    "pending": _procs.range_str(rec["claimed"]) if _procs.pending(rec) else "",
                    "reclaims": rec["reclaims"], "lag": _procs.lag(r, rec),
                    "last_acked_range": _procs.range_str(rec["acked"]),
                    "last_error": rec.get("last_error"),
                    # a system proc held back after a failure (seconds left), and a worker's
                    # outcome the store refused that the node writes again (attempts so far)
                    "backoff_left": self.deadlines.backoff_left(name),
                    "store_retries": (self.deadlines.held.get(name) or (None, 0))[1],
                }
        info = store.env.info()
        stat = store.env.stat()
        node = self.node_info()  # pid, uptime, location, memory, durability, address,
        node.update({                # connections: what the node knows of itself
            "map_size": info["map_size"],
            "store_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "write_transactions": self.writer.rounds, "write_requests": self.writer.requests,
            "damaged_reads": store.damaged_reads,
        })
        workers = self.workers_info()
        reply = {"node": node, "workers": workers, "topics": topics, "procs": procs,
                 "system_procs": {n: dict(d) for n, d in store.sysprocs.items()}}
        if self.flow_stats is not None:
            reply["flow"] = self.flow_stats()
        conn.reply(rid, reply)

    # ------------------------------------------------------------------ writes

    def _write(self, conn: Conn, rid: int, fn: Callable) -> None:
        def done(ok: bool, value: Any) -> None:
            if ok:
                conn.reply(rid, value)
            else:
                conn.fail(rid, value)
        self.writer.submit(fn, done, conn.id)

    def op_commit1(self, conn: Conn, rid: int, topic: Any, body: Any) -> None:
        if type(topic) is not str or topic not in self.store.topics:  # known names are valid
            _ids.check_topic(topic)
        item = [(topic, _valid_body(body))]

        def fn(tx: Any) -> list:
            return [tx.now, tx.append(item)[0]]
        self._write(conn, rid, fn)

    def op_commit(self, conn: Conn, rid: int, raw: Any) -> None:
        items = _items(raw)
        if not items:
            conn.reply(rid, [0, []])
            return

        def fn(tx: Any) -> list:
            return [tx.now, tx.append(items)]
        self._write(conn, rid, fn)

    def op_proc(self, conn: Conn, rid: int, topic: Any, name: Any, offset: Any, count: Any,
                max_reclaims: Any, reclaim_timeout: Any, on_max: Any) -> None:
        _ids.check_topic(topic)
        _ids.check_proc_name(name)
        _ids.parse_offset(offset)
        count = _count(count)
        opts = _opts(max_reclaims, reclaim_timeout, on_max)

        def fn(tx: Any) -> Any:
            recs = _procs.proc(tx, name, topic, offset, count, *opts, due=self.deadlines.due)
            return None if recs is None else page(recs, tx.proc(name)["cnum"])
        self._write_claim(conn, rid, fn, name)

    def _write_claim(self, conn: Conn, rid: int, fn: Callable, name: Optional[str]) -> None:
        def done(ok: bool, value: Any) -> None:
            if not ok:
                conn.fail(rid, value)
            elif value is None:
                conn.reply(rid, None)
            else:
                conn.send(ok_reply_raw(rid, value))
        self.writer.submit(fn, done, conn.id)

    def op_ack(self, conn: Conn, rid: int, name: Any, claimed: Any) -> None:
        _ids.check_proc_name(name)
        claimed = _claimed(claimed)
        self._write(conn, rid, lambda tx: _procs.ack(tx, name, claimed))

    def op_ack_commit(self, conn: Conn, rid: int, name: Any, raw: Any, claimed: Any) -> None:
        _ids.check_proc_name(name)
        items = _items(raw)
        claimed = _claimed(claimed)

        def fn(tx: Any) -> list:
            _procs.check_ack_commit(tx, name, claimed)
            acked = _procs.ack(tx, name, claimed)
            return [acked, tx.now, tx.append(items) if items else []]
        self._write(conn, rid, fn)

    def op_reclaim(self, conn: Conn, rid: int, name: Any, claimed: Any) -> None:
        _ids.check_proc_name(name)
        claimed = _claimed(claimed)

        def fn(tx: Any) -> str:
            out = _procs.reclaim(tx, name, claimed)
            new = tx.proc(name)
            if new["status"] == "disabled":
                log.error("proc %r is DISABLED: %d reclaims in a row reached max_reclaims=%d",
                          name, new["reclaims"], new["max_reclaims"])
            return out
        self._write(conn, rid, fn)

    def op_disable(self, conn: Conn, rid: int, name: Any) -> None:
        _ids.check_proc_name(name)
        self._write(conn, rid, lambda tx: _procs.disable(tx, name))

    def op_resume(self, conn: Conn, rid: int, name: Any) -> None:
        _ids.check_proc_name(name)
        self._write(conn, rid, lambda tx: _procs.resume(tx, name))

    def op_destroy(self, conn: Conn, rid: int, name: Any) -> None:
        _ids.check_proc_name(name)

        def fn(tx: Any) -> list:
            st = _procs.destroy(tx, name)
            self.destroy_sysproc_of(tx, name)
            return st
        self._write(conn, rid, fn)

    def destroy_sysproc_of(self, tx: Any, proc_name: str) -> None:
        """Destroying a system proc's proc removes the system proc (and its other procs)."""
        for sname, d in list(self.store.sysprocs.items()):
            if proc_name in d["procs"] and tx.sysproc(sname) is not None:
                tx.put_sysproc(sname, None)
                for other in d["procs"]:
                    if other != proc_name and tx.proc(other) is not None:
                        tx.put_proc(other, None)

    def op_available(self, conn: Conn, rid: int, specs: Any) -> None:
        if type(specs) is not list:
            raise InvalidArgument("available_proc takes a list of proc specs")
        parsed = []
        for s in specs:
            if type(s) is not list or len(s) != 7:
                raise Malformed("a proc spec is [topic, name, offset, count, max, timeout, policy]")
            topic, name, offset, count = s[:4]
            _ids.check_topic(topic)
            _ids.check_proc_name(name)
            _ids.parse_offset(offset)
            parsed.append((topic, name, offset, _count(count), _opts(*s[4:])))

        def fn(tx: Any) -> Any:
            topic_of: Dict[str, str] = {}  # every name's topic, checked before any write
            for topic, name, _, _, _ in parsed:
                rec = tx.proc(name)
                known = rec["topic"] if rec is not None else topic_of.get(name)
                if known is not None and known != topic:
                    raise ProcNameNotUnique(f"proc {name!r} already exists on topic {known!r}")
                topic_of[name] = topic
            created = []
            for topic, name, offset, count, opts in parsed:
                if tx.proc(name) is None:
                    created.append(name)
                    _procs.ensure(tx, name, topic, offset, *opts)
            order = [p for p in parsed if p[1] in created]
            n = len(parsed)
            start = self.rr % n if n else 0
            order += [parsed[(start + i) % n] for i in range(n) if parsed[(start + i) % n][1]
                      not in created]
            for topic, name, offset, count, opts in order:
                if self.deadlines.in_backoff(name) or name in skipped(tx):
                    continue  # a system proc held back after a failure
                rec = self.deadlines.expire_rec(tx, name, tx.proc(name))
                recs = _procs.claim(tx, name, rec, count)
                if recs is not None:
                    self.rr = (parsed.index((topic, name, offset, count, opts)) + 1)
                    return [name, count > 1, page(recs, tx.proc(name)["cnum"])]
            return None

        def done(ok: bool, value: Any) -> None:
            if not ok:
                conn.fail(rid, value)
            elif value is None:
                conn.reply(rid, None)
            else:
                name, many, raw = value
                conn.send(b"\x93" + msgpack.packb(rid) + b"\x00\x93"
                          + msgpack.packb(name) + (b"\xc3" if many else b"\xc2") + raw)
        self.writer.submit(fn, done, conn.id)

    # ------------------------------------------------------------------ waits and live procs

    def op_wait_idle(self, conn: Conn, rid: int, names: Any, timeout: Any) -> None:
        if names is not None and (type(names) is not list
                                  or any(type(n) is not str for n in names)):
            raise InvalidArgument("names must be a list of proc names or None")
        timeout = _wait_timeout(timeout)
        self.waits.wait_idle(conn, rid, names, timeout)

    def op_live(self, conn: Conn, rid: int, topic: Any, name: Any, offset: Any,
                count: Any, timeout: Any, held: Any = None) -> None:
        """A live proc's blocking claim: claims at once, or parks until there is work.

        ``held`` is the claim counter of the last delivery the client received (``None``:
        none yet): while that very claim is pending, asking for more is ``invalid_ack``. A
        pending claim the client never received (answered to a wait it cancelled, on its
        way back as a reclaim) parks the request as any other busy state does."""
        _ids.check_topic(topic)
        _ids.check_proc_name(name)
        _ids.parse_offset(offset)
        count = _count(count)
        timeout = _wait_timeout(timeout)
        if held is not None and type(held) is not int:
            raise InvalidArgument("held is the claim counter of the last delivery, or None")

        def attempt(tx: Any) -> Any:
            if self.stopping.is_set():  # not the end of the stream: the node goes away
                return err_reply(rid, "connection_lost", "the node is shutting down")
            rec = tx.proc(name)
            if rec is None or rec["topic"] != topic:
                return ok_reply(rid, None)  # cancelled (destroyed): the end
            if rec["status"] != "active":
                return None
            if held is not None and _procs.pending(rec) and rec.get("cnum") == held:
                # the client holds it and live procs never time out: waiting is forever
                raise InvalidAck(
                    f"live proc {name!r} still holds its last delivery "
                    f"({_procs.range_str(rec['claimed'])}): call ack() (or reclaim() to "
                    "have it delivered again) before asking for more")
            recs = _procs.claim(tx, name, rec, count)
            return None if recs is None else ok_reply_raw(rid, page(recs, tx.proc(name)["cnum"]))
        self.waits.attempt(conn, rid, {name}, attempt)
        if timeout is not None:
            def expire() -> None:
                if self.waits.cancel_claim(conn, rid):
                    conn.reply(rid, None)
            self.timers.after(float(timeout), expire)

    def op_create_live(self, conn: Conn, rid: int, topic: Any, name: Any, offset: Any) -> None:
        """Create a live proc's hidden proc, owned by this connection (destroyed with it)."""
        _ids.check_topic(topic)
        _ids.check_proc_name(name)
        _ids.parse_offset(offset)

        def fn(tx: Any) -> list:
            rec = tx.proc(name)
            if rec is not None and not rec.get("live"):
                raise ProcNameNotUnique(f"proc {name!r} exists and is not a live proc")
            rec = _procs.ensure(tx, name, topic, offset, -1, -1.0, "continue")
            if not rec.get("live"):  # the flag, not the name, tells a hidden proc
                rec = dict(rec, live=True)
                tx.put_proc(name, rec)
            return _procs.state(name, rec)

        def done(ok: bool, value: Any) -> None:
            if ok:
                with conn.lock:
                    if not conn.closed:
                        conn.live.add(name)
                conn.reply(rid, value)
            else:
                conn.fail(rid, value)
        self.writer.submit(fn, done, conn.id)

    @staticmethod
    def drop_live(tx: Any, names: set) -> None:
        """Destroy live procs' hidden procs; a proc without the live flag is never touched."""
        for name in names:
            rec = tx.proc(name)
            if rec is not None and _is_live(name, rec):
                tx.put_proc(name, None)

    def op_shutdown(self, conn: Conn, rid: int) -> None:
        conn.reply(rid, None)
        threading.Thread(target=self.shutdown, daemon=True).start()


def op_table(h: Handlers, sys: Any) -> Dict[str, Callable[..., None]]:
    """op name -> the bound method that serves it: ``handler(conn, rid, *args)``. ``sys``:
    the system procs' and workers' ops (``_syshandlers.SysHandlers``)."""
    return {
        "ping": h.op_ping, "limits": h.op_limits, "c1": h.op_commit1, "c": h.op_commit,
        "range": h.op_range, "page": h.op_page, "length": h.op_length,
        "topics": h.op_topics, "stats": h.op_stats,
        "proc": h.op_proc, "ack": h.op_ack, "ackc": h.op_ack_commit,
        "reclaim": h.op_reclaim, "inspect": h.op_inspect,
        "disable": h.op_disable, "resume": h.op_resume, "destroy": h.op_destroy,
        "avail": h.op_available, "wait_idle": h.op_wait_idle,
        "live": h.op_live, "create_live": h.op_create_live,
        "sysproc": sys.op_sysproc, "hello_worker": sys.op_hello_worker,
        "work": sys.op_work, "shutdown": h.op_shutdown,
    }
