"""The node process: the composition root.

Started by :func:`pipeproc.spawn` as ``python -m pipeproc._node`` (a fresh interpreter: the
store is never inherited through ``fork`` and the application's main module is never
re-executed). Its configuration arrives on stdin; stdin then stays open as a lifeline:
EOF means the spawning process is gone, and the node shuts down.

Owns :class:`Node`, which builds the parts and ties them together, and :func:`main`:

* ``Node(cfg)`` builds every part and starts nothing: the store (``_store``), the timers,
  parked requests and claim deadlines (``_waits``), the writer role (``_writer``), the op
  handlers (``_handlers``, ``_syshandlers``) and their op table, the I/O loop (``_conn``);
* :meth:`Node.bind` opens the listener (``_platform``), :meth:`Node.start` starts the
  threads (timers, writer, I/O loop, accept), recovers what an earlier life left (claims
  of its workers, live procs' hidden procs, claim deadlines) and starts the GC and the
  workers' supervisor (``_supervisor``);
* :meth:`Node.shutdown` (a signal, the lifeline, the ``shutdown`` op) starts the stop;
  :meth:`Node.close` owns the whole shutdown sequence, to the store's close;
* after every commit the writer calls :meth:`Node.after_commit`: the notes of the write
  (failures, recycled workers), then the claim deadlines and the parked requests;
* :func:`main` is the one place that reads the environment (``PIPEPROC_STALL_TIMEOUT``,
  ``PIPEPROC_TEST_WALL_CLOCK``, for tests) and puts it into the configuration.

Threads: the accept thread and a short-lived thread per new connection for its authkey
handshake; the I/O loop; the writer (durability "full"); a flush thread per connection
with a backlog of unsent replies; the timer thread (reclaim timeouts, wait timeouts, GC
ticks, the stall sweep, the parent watch); the lifeline; the supervisor's.

May import every node-side module (``_conn``, ``_writer``, ``_waits``, ``_gc``,
``_handlers``, ``_syshandlers``, ``_store``, ``_supervisor``), the shared ones (``_ids``,
``_records``, ``_protocol``, ``_platform``, ``errors``) and the standard library; never a
client-side module.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import lmdb
import msgpack

from . import _gc, _platform, _procs
from ._conn import IOLoop  # noqa: F401 (the I/O loop the node builds)
from ._conn import Conn, drop_stalled
from ._gc import GC_DELETES_PER_ROUND, GC_SECONDS_PER_ROUND
from ._flowops import FlowOps
from ._flows import Flows
from ._handlers import Handlers, _is_live, op_table
from ._platform import STORE_MARKER
from ._protocol import MAX_FRAME
from ._store import Store
from ._supervisor import Supervisor
from ._syshandlers import SysHandlers
from ._waits import Deadlines, SysDefs, Timers, Waits, notes
from ._writer import Writer
from .errors import PipeProcError, StorageFull

log = logging.getLogger("pipeproc.node")

# Seconds an authenticated peer may stall in the middle of a request (no byte of it
# arriving) before it is disconnected (cfg ``stall_timeout``).
STALL_TIMEOUT = 30.0
# Busy-poll window of the I/O loop for a lone client's next request (cfg ``busy_poll_us``,
# µs; 0 turns it off; at most 10 ms).
BUSY_POLL_US = 50


def _stall_timeout(value: Any) -> float:
    try:
        value = float(STALL_TIMEOUT if value is None else value)
    except (TypeError, ValueError):
        value = STALL_TIMEOUT
    return value if value > 0 and math.isfinite(value) else STALL_TIMEOUT


def _busy_poll(value: Any) -> float:
    """cfg ``busy_poll_us`` (µs) as seconds, bounded to [0, 10 ms]."""
    try:
        us = float(BUSY_POLL_US if value is None else value)
    except (TypeError, ValueError):
        us = float(BUSY_POLL_US)
    return max(0.0, min(us, 10_000.0)) / 1e6 if us == us else 0.0


class Node:
    """The node: owns the store and serves clients until shutdown.

    ``__init__`` builds the parts and starts nothing; :meth:`start` starts the threads;
    :meth:`close` stops everything."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.location: str = cfg["location"]
        self.authkey: bytes = cfg["authkey"]
        self.max_frame: int = cfg.get("max_frame_size") or MAX_FRAME
        self.busy_poll = _busy_poll(cfg.get("busy_poll_us"))
        self.stall_timeout = _stall_timeout(cfg.get("stall_timeout"))
        self.store = Store(
            None if cfg["memory"] else os.path.join(self.location, "store"),
            memory=cfg["memory"], durability=cfg["durability"],
            max_map_size=cfg.get("max_map_size"),
            marker=None if cfg["memory"] else os.path.join(self.location, STORE_MARKER),
        )
        store = self.store
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.conns: Dict[int, Conn] = {}
        self.conns_lock = threading.Lock()
        self.supervisor: Optional[Supervisor] = None
        self.listener: Any = None
        self.address: Any = None
        self.rundir: Optional[str] = None
        durable = cfg.get("durability", "full") == "full" and not store.memory
        self.timers = Timers()
        self.writer = Writer(store, durable, self.after_commit)
        self.sysdefs = SysDefs(store)
        self.waits = Waits(store, self.writer, self.timers, self.sysdefs)
        self.deadlines = Deadlines(store, self.writer, self.timers, self.sysdefs, self.waits)
        self.sys = SysHandlers(store, self.writer, self.timers, self.waits, self.deadlines,
                               self.sysdefs, self.stopping)
        self.handlers = Handlers(store, self.writer, self.waits, self.deadlines, self.timers,
                                 self.stopping, self.max_frame, self._node_info,
                                 self._workers_info, self.shutdown)
        self.flows = Flows(store, self.writer, self.timers, self.waits, self.stopping)
        self.sys.flows = self.flows
        self.ops = op_table(self.handlers, self.sys)
        self.ops.update(FlowOps(self.flows).ops())
        self.handlers.flow_stats = self.flows.stats
        self.io = IOLoop(self)
        self._gc_pass: Any = None
        gc = cfg.get("gc")
        self.gc_min_prune = float(gc["min_prune_time"]) if gc else 0.0
        self.gc_interval = float(gc["interval"]) if gc else 0.0

    # -- starting

    def bind(self) -> None:
        """Open the listener (a Unix socket in the location, or TCP)."""
        self.listener, self.address, self.rundir = _platform.listen(
            self.location, self.cfg["address"])

    def start(self) -> None:
        """Start the threads, recover what an earlier life of the node left, accept
        clients, start the workers (when ``supervisor`` is set)."""
        self.timers.start()
        self.writer.start()
        self.io.start()
        store = self.store
        for name in list(store.procs):
            self.deadlines.arm_timeout(name)
        # hidden live procs belong to connections of an earlier life of the node: gone
        stale = {n for n, rec in store.procs.items() if _is_live(n, rec)}
        if stale:
            self.writer.submit(lambda tx: Handlers.drop_live(tx, stale), lambda ok, v: None)
        # system proc claims were held by the workers of an earlier life: they are dead
        sys_names = self.sysdefs.names()
        held = {n: rec["claimed"] for n, rec in store.procs.items()
                if n in sys_names and _procs.pending(rec)}
        if held:
            self.writer.submit(lambda tx: self.sys.reclaim_dead(tx, held, None),
                               lambda ok, v: None)
        self.flows.start()
        if self.cfg.get("gc"):
            self.timers.after(self.gc_interval, self.gc_tick)
        self.timers.after(self._stall_check(), self._drop_stalled)
        self.sys.supervisor = self.supervisor
        threading.Thread(target=self._accept, name="accept", daemon=True).start()
        if self.supervisor is not None:
            self.supervisor.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                c = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            conn = Conn(c, self.authkey, self.io.add, self.conn_closed)
            with self.conns_lock:
                self.conns[conn.id] = conn
            threading.Thread(target=conn.handshake, name=f"auth-{conn.id}", daemon=True).start()

    # -- connections

    def _stall_check(self) -> float:
        return min(max(self.stall_timeout / 4, 0.25), 5.0)

    def _drop_stalled(self) -> None:
        """The stall sweep (timer thread): see :func:`_conn.drop_stalled`."""
        if self.stopping.is_set():
            return
        with self.conns_lock:
            conns = list(self.conns.values())
        drop_stalled(conns, self.stall_timeout, time.monotonic())
        self.timers.after(self._stall_check(), self._drop_stalled)

    def conn_closed(self, conn: Conn) -> None:
        """A connection finished: forget its parked requests, give back its worker's claims
        (reclaimed, or released when the node recycled the worker), drop its live procs."""
        with self.conns_lock:
            self.conns.pop(conn.id, None)
        self.waits.drop_conn(conn.id)
        if conn.worker is not None and not self.writer.stopped:
            self.flows.conn_lost(conn)
        with conn.lock:
            claims = dict(conn.claims)
            conn.claims.clear()
            live = set(conn.live)
            conn.live.clear()
        if claims and not self.writer.stopped:
            if conn.recycled:  # killed for another claim's time limit: these are not at fault
                self.writer.submit(lambda tx: self.sys.release(tx, claims), lambda ok, v: None)
            else:
                self.writer.submit(lambda tx: self.sys.reclaim_dead(tx, claims, conn.worker),
                                   lambda ok, v: None)
        if live and not self.writer.stopped:
            self.writer.submit(lambda tx: Handlers.drop_live(tx, live), lambda ok, v: None)

    def _recycle_holder(self, name: str, claimed: list) -> None:
        """Kill the worker that holds ``name``'s claim ``claimed`` (it ran past its time
        limit); its supervisor restarts it, and its late outcome can never be written."""
        with self.conns_lock:
            conns = list(self.conns.values())
        holder = None
        for c in conns:
            if c.worker is None:
                continue
            with c.lock:
                key = c.claims.get(name)
                if key is not None and key[:4] == claimed:
                    del c.claims[name]
                    holder = c.worker
                    break
        if holder is None:
            return
        for c in conns:  # every loop (connection) of that worker process
            if c.worker is not None and c.worker["pid"] == holder["pid"]:
                with c.lock:
                    c.recycled = True
        if self.supervisor is not None:
            self.supervisor.recycle(holder["slot"], holder["pid"])

    def _node_info(self) -> Dict[str, Any]:
        """What ``stats()`` says of the node itself (the handlers add the store's figures)."""
        return {"pid": os.getpid(), "uptime": time.time() - self.started,
                "location": self.location, "memory": self.store.memory,
                "durability": self.cfg["durability"], "address": self.address,
                "connections": len(self.conns)}

    def _workers_info(self) -> List[Dict[str, Any]]:
        return self.supervisor.stats() if self.supervisor is not None else []

    # -- after every commit (called by the writer)

    def after_commit(self, tx: Any) -> None:
        self.sysdefs.committed(tx)
        self.flows.after_commit(tx)
        for note in notes(tx):
            if note[0] == "failed":
                self.deadlines.failed(*note[1:])
            elif note[0] == "recycle":
                self._recycle_holder(*note[1:])
        topics, procs = tx.touched_topics, tx.touched_procs
        if not topics and not procs:
            return
        for name in procs:
            self.deadlines.arm_timeout(name)
        self.waits.after_commit(topics, procs)

    # -- GC: a pass over every topic, in bounded steps (the rule and the step: _gc)

    def gc_tick(self) -> None:
        if self.stopping.is_set():
            return
        self.store.keep_disk_reserve()  # given up to the GC on a full disk: back when room
        self._gc_pass = None  # a new pass over every topic
        self.writer.submit(self._gc, self._gc_step_done, gc=True)

    def _gc_step_done(self, ok: bool, more: Any) -> None:
        # A pass is cut into write rounds of bounded work; the requests that queued up
        # meanwhile are served between them (a pass collecting millions of logs, or
        # visiting thousands of topics, never holds the writer for long).
        if ok and more and not self.stopping.is_set():
            self.writer.submit(self._gc, self._gc_step_done, gc=True)
        else:
            self._gc_pass = None
            self.timers.after(self.gc_interval, self.gc_tick)

    def _gc(self, tx: Any) -> bool:
        """One bounded step of a GC pass (a writer job); ``True`` when the pass has more."""
        if self._gc_pass is None:
            journals = self.store.journals  # workflow journals go with their run only
            self._gc_pass = _gc.new_pass(t for t in self.store.topics if t not in journals)
        return _gc.step(tx, self._gc_pass, _gc.procs_by_topic(self.store.procs, tx.procs),
                        tx.now - int(self.gc_min_prune * 1000), GC_DELETES_PER_ROUND,
                        time.monotonic() + GC_SECONDS_PER_ROUND, time.monotonic)

    # -- shutdown

    def shutdown(self) -> None:
        """Start the stop (from any thread; once): no new connection, parked requests
        answered, workers stopped; then :meth:`close` (the main thread) finishes it."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("shutting down")
        try:
            if self.listener is not None:
                self.listener.close()
        except OSError:
            pass
        self.waits.release_all()  # parked workers get "exit", live procs their None
        if self.supervisor is not None:
            self.supervisor.stop()
        self.stopped.set()

    def close(self) -> None:
        """The whole shutdown sequence: :meth:`shutdown`, let in-flight writes finish, drop
        the live procs of the connections, close them, stop the writer and the timers,
        close the store, remove the address, the socket and a temporary location."""
        self.shutdown()
        self.stopped.wait()
        deadline = time.monotonic() + 10
        while not self.writer.idle() and time.monotonic() < deadline:
            time.sleep(0.005)
        self.timers.stop()
        with self.conns_lock:
            conns = list(self.conns.values())
        live = set()
        for c in conns:
            with c.lock:
                live |= c.live
                c.live.clear()
        if live:  # the live procs' connections die with the node: their hidden procs too
            self.writer.submit(lambda tx: Handlers.drop_live(tx, live), lambda ok, v: None)
        for c in conns:
            c.close()
        self.writer.stop()
        with self.store.gate.exclusive():
            self.store.close()
        location = self.location
        try:
            os.unlink(os.path.join(location, "node.address"))
        except OSError:
            pass
        if self.cfg["address"] is None and self.address is not None:
            try:
                os.unlink(self.address)
            except OSError:
                pass
            if self.rundir:
                shutil.rmtree(self.rundir, ignore_errors=True)
        if self.cfg.get("temp_location"):
            shutil.rmtree(location, ignore_errors=True)


# ------------------------------------------------------------------------- process main

def _write_private(path: str, data: bytes) -> None:
    """Write ``path`` atomically (a temporary file, then a rename); on failure nothing is
    left behind, and a full disk is :class:`StorageFull`."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:  # left by a dead node that had our pid (we hold the lock); a link is not followed
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _platform.NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"cannot write {path}: the disk is full ({exc.strerror})") from None
        raise


def _test_wall_clock(path: str) -> None:
    """Tests only (``PIPEPROC_TEST_WALL_CLOCK=<file>``): the node's wall clock is the real
    one plus the offset in ms written in ``file`` (read at most every 20 ms), so a test can
    step the wall clock back without root. Never set in production."""
    real_ns = time.time_ns
    state: List[float] = [0.0, 0]

    def offset_ms() -> int:
        now = time.monotonic()
        if now - state[0] > 0.02:
            state[0] = now
            try:
                with open(path) as f:
                    state[1] = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
        return int(state[1])

    def fake_ns() -> int:
        return real_ns() + offset_ms() * 1_000_000

    time.time_ns = fake_ns  # type: ignore[assignment]
    time.time = lambda: fake_ns() / 1e9  # type: ignore[assignment]


def _test_map_full(store: Store, every: int) -> None:
    """Tests only (``PIPEPROC_TEST_MAPFULL_EVERY=<n>``): every ``n``-th write transaction
    fails its commit with ``MapFullError`` and the next ``grow()`` says it grew without
    growing, so the writer runs that round again in a fresh transaction, as it does when
    the map really fills. Never set in production."""
    if every < 2:
        raise ValueError("PIPEPROC_TEST_MAPFULL_EVERY must be >= 2 (1: no round would commit)")
    real_begin, real_grow = store.begin, store.grow
    state = {"n": 0, "owed": 0}

    def begin(now: Optional[int] = None) -> Any:
        tx = real_begin(now)
        state["n"] += 1
        if state["n"] % every == 0:
            def commit() -> None:
                state["owed"] += 1
                raise lmdb.MapFullError("injected by PIPEPROC_TEST_MAPFULL_EVERY")
            tx.commit = commit  # type: ignore[method-assign]
        return tx

    def grow(for_gc: bool = False) -> bool:
        if state["owed"]:
            state["owed"] -= 1
            return True
        return real_grow(for_gc)
    store.begin, store.grow = begin, grow  # type: ignore[method-assign]


def main() -> None:
    """Entry point of the node process (``python -m pipeproc._node``).

    The one place that reads the environment: ``PIPEPROC_STALL_TIMEOUT`` (seconds) and
    ``PIPEPROC_TEST_WALL_CLOCK`` (a file, tests only) become the configuration's
    ``stall_timeout`` and ``test_wall_clock``; ``PIPEPROC_TEST_MAPFULL_EVERY`` (tests
    only) injects map-full retries (:func:`_test_map_full`)."""
    os.umask(0o077)
    stdin = sys.stdin.buffer
    size = int.from_bytes(stdin.read(4), "big")
    cfg = msgpack.unpackb(stdin.read(size), raw=False)
    if os.environ.get("PIPEPROC_STALL_TIMEOUT"):
        cfg["stall_timeout"] = os.environ["PIPEPROC_STALL_TIMEOUT"]
    if os.environ.get("PIPEPROC_TEST_WALL_CLOCK"):
        cfg["test_wall_clock"] = os.environ["PIPEPROC_TEST_WALL_CLOCK"]
    if cfg.get("test_wall_clock"):
        _test_wall_clock(cfg["test_wall_clock"])
    ready_fd = cfg["ready_fd"]
    level = cfg.get("log_level") or "WARNING"
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s pipeproc-node[%(process)d] %(levelname)s %(message)s")

    def report(msg: dict) -> None:
        try:
            os.write(ready_fd, msgpack.packb(msg, use_bin_type=True))
            os.close(ready_fd)
        except OSError:
            pass

    location = cfg["location"]
    try:
        _platform.check_location(location, create=True)
        lock_fd = _platform.lock_location(location)
        if lock_fd is None:
            report({"error": ["node_already_active",
                              f"a node is already running on {location}"]})
            return
        _platform.check_entries(location, memory=cfg["memory"])
        if cfg.get("temp_location"):
            os.write(lock_fd, _platform.TEMP_MARK)  # after the pid: what clean_stale_temp removes
            _platform.clean_stale_temp(location)
        cfg["authkey"] = cfg.get("authkey") or os.urandom(32)
        node = Node(cfg)
        if os.environ.get("PIPEPROC_TEST_MAPFULL_EVERY"):
            _test_map_full(node.store, int(os.environ["PIPEPROC_TEST_MAPFULL_EVERY"]))
        try:
            node.bind()
        except OSError as exc:
            report({"error": ["node_already_active", f"cannot bind {cfg['address']}: {exc}"]})
            return
        _write_private(os.path.join(location, "node.key"), cfg["authkey"])
        _write_private(os.path.join(location, "node.address"),
                       msgpack.packb({"address": node.address}))
        if cfg.get("workers", 0) > 0:
            node.supervisor = Supervisor(node, cfg)
        node.start()
    except PipeProcError as exc:
        log.error("node failed to start: %s", exc)
        report({"error": [exc.code, exc.message]})
        return
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("node failed to start: %s", exc)
            report({"error": ["storage_full", f"node failed to start: the disk is full: {exc}"]})
            return
        if isinstance(exc, lmdb.Error) and "No space" in str(exc):
            report({"error": ["storage_full", f"node failed to start: the disk is full: {exc}"]})
            return
        log.exception("node failed to start")
        report({"error": ["internal_error", f"node failed to start: {exc}"]})
        return

    _platform.on_terminate(node.shutdown)
    if cfg.get("lifeline", True):
        _platform.start_lifeline(node.shutdown)  # EOF on stdin: the spawning process is gone
        parent = _platform.parent_pid()

        def watch_parent() -> None:
            if _platform.parent_gone(parent):
                node.shutdown()
            elif not node.stopping.is_set():
                node.timers.after(1.0, watch_parent)
        node.timers.after(1.0, watch_parent)

    report({"address": node.address, "authkey": node.authkey, "pid": os.getpid()})
    while not node.stopped.wait(3600):
        pass
    node.close()  # graceful end: let in-flight writes finish, then close the store
    log.info("stopped")
    logging.shutdown()
    # daemon threads (connections, lifeline) may sit in blocking reads: leave without
    # running interpreter teardown against them
    os._exit(0)


if __name__ == "__main__":
    main()
