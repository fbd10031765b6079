"""Workers on Redis: the local supervisor and its worker processes (SCALE.md §1, §3).

``spawn(redis=...)`` and ``pipeproc workers`` run a **supervisor**
(``pipeproc._rworker.main("supervisor")`` in a child, its configuration on stdin: the Redis URL
never appears in argv or in a process title). The supervisor

* starts ``workers`` worker processes and restarts them when they die (with a growing
  back-off when they die young); the claims of a worker that died are reclaimed at once
  (counted toward ``max_reclaims``: SPEC §6);
* applies what a node's timers would: due claim timeouts, workers of any host whose
  heartbeats stopped (their claims reclaimed), live procs whose lease ran out; it blocks on
  the namespace's doorbell until the next of these deadlines, it never sweeps at a fixed
  interval;
* runs the GC when the namespace has GC settings, under a lease (one supervisor at a time).

The workers themselves are :mod:`pipeproc._rworker`; this module also holds what both
processes share: the configuration (``allow``, GC settings), starting a child, reading its
configuration from stdin.

Client side: imports ``_rbackend``, ``_rops``, ``_processors`` and ``errors``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

import msgpack

from ._execute import read_cfg, setup_process
from ._processors import SCRIPT
from ._spawn import DEFAULT_GC, gc_settings
from ._rbackend import WORKER_DEAD_MS
from ._rops import Ops
from .errors import InvalidArgument, NoActiveNode, PipeProcError

log = logging.getLogger("pipeproc.workers")

#: Seconds between a worker's heartbeats (a worker is dead after ``WORKER_DEAD_MS``).
HEARTBEAT = 1.0
#: The exit status of a worker recycled by ``worker_restart_after`` (EX_TEMPFAIL; any
#: other exit, 0 included, is a death whose claims count).
RECYCLED = 75


# ------------------------------------------------------------------ configuration

def check_allow(allow: Any) -> List[str]:
    """``allow=``: module prefixes, directories (ending with ``/``) or ``"*"``."""
    if allow is None:
        return []
    if isinstance(allow, str):
        allow = [allow]
    out = []
    for a in allow:
        if not isinstance(a, str) or not a:
            raise InvalidArgument(f"allow= takes module prefixes, directories or '*', got {a!r}")
        out.append(os.path.abspath(a) + os.sep if (os.sep in a and a != "*") else a)
    return out


def allowed(ref: str, allow: Sequence[str]) -> bool:
    """Whether processor ``ref`` (an import string or a file path) is permitted."""
    if "*" in allow:
        return True
    path = ref
    if ref.startswith(SCRIPT):
        path = ref[len(SCRIPT):]
    if path.startswith(os.sep):  # a file processor: under an allowed directory
        file = path.rsplit(":", 1)[0] if path.count(":") else path
        return any(a.endswith(os.sep) and file.startswith(a) for a in allow)
    module = ref.split(":", 1)[0]
    return any(not a.endswith(os.sep) and (module == a or module.startswith(a + "."))
               for a in allow)


def _check_int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InvalidArgument(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def supervisor_cfg(url: str, namespace: str, *, workers: int = 1, concurrency: int = 1,
                   restart_after: int = 0, gc: Any = False, durability: str = "full",
                   allow: Optional[Sequence[str]] = None,
                   redis_options: Optional[Dict[str, Any]] = None,
                   log_level: Optional[str] = None) -> Dict[str, Any]:
    """The supervisor's configuration, every argument checked."""
    return {
        "id": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        "url": url, "namespace": namespace,
        "workers": _check_int(workers, "workers", 0),
        "concurrency": _check_int(concurrency, "worker_concurrency", 1),
        "restart_after": _check_int(restart_after, "worker_restart_after", 0),
        "gc": gc_settings(gc), "durability": durability, "allow": check_allow(allow),
        "redis_options": dict(redis_options or {}), "log_level": log_level,
        "sys_path": [p for p in sys.path if p], "cwd": os.getcwd(),
    }


def store_gc_settings(backend: Ops, gc: Dict[str, float]) -> None:
    """The namespace's GC settings (any supervisor of the namespace runs the GC with them)."""
    try:
        backend.r.hset(backend.P + ":gc", mapping={k: repr(v) for k, v in gc.items()})
    except backend._redis_mod.RedisError as exc:
        raise backend._error(exc) from None


def _send_cfg(proc: subprocess.Popen, cfg: Dict[str, Any]) -> None:
    data = msgpack.packb(cfg)
    assert proc.stdin is not None
    proc.stdin.write(len(data).to_bytes(4, "big") + data)
    proc.stdin.flush()


def _child(kind: str, cfg: Dict[str, Any]) -> subprocess.Popen:
    # -c, not -m: the package (imported first) already imports this module
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; from pipeproc._rworker import main; main(sys.argv[1])",
                             kind],
                            stdin=subprocess.PIPE, cwd=cfg.get("cwd") or None,
                            start_new_session=(kind == "supervisor"))
    _send_cfg(proc, cfg)
    return proc


def start_supervisor(cfg: Dict[str, Any]) -> subprocess.Popen:
    """Start the local supervisor (its own process group; its stdin is its lifeline)."""
    return _child("supervisor", cfg)


def wait_ready(backend: Ops, proc: subprocess.Popen, sup_id: str, workers: int,
               timeout: float) -> None:
    """Return once ``workers`` workers of supervisor ``sup_id`` said hello."""
    deadline = time.monotonic() + timeout
    key = backend.P + ":w"
    while True:
        ids = [x.decode() for x in backend.r.zrange(key, 0, -1)]
        mine = [w for w in ids if w.startswith(sup_id + "/")]
        if len(mine) >= workers:
            return
        if proc.poll() is not None:
            raise NoActiveNode(f"the local supervisor exited (code {proc.returncode}) before "
                               "its workers were ready; see its log on stderr")
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoActiveNode(f"the workers were not ready within {timeout} s")
        backend.block(_bell(backend), min(left, 0.5))


def _backend(cfg: Dict[str, Any]) -> Ops:
    return Ops(cfg["url"], cfg["namespace"], cfg.get("redis_options"), cfg["durability"],
                   timeout=10.0)


def _bell(backend: Ops) -> str:
    last = backend.r.xrevrange(backend.P + ":bell", count=1)
    return last[0][0].decode() if last else "0-0"


# ------------------------------------------------------------------ the supervisor

class Supervisor:
    """Starts and restarts the local workers; applies timers, reaps dead workers, runs GC."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.cfg = cfg
        self.backend = _backend(cfg)
        self.stopping = threading.Event()
        self.procs: Dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.gc_next = 0.0
        self.recycling: set = set()  # pids of workers killed for a time limit
        self.restarts: Dict[int, int] = {}  # slot -> times its worker was started again

    def run(self, lifeline: bool = True) -> None:
        """Run until :meth:`stop` (or, with ``lifeline``, until stdin closes)."""
        cfg = self.cfg
        if cfg["workers"] and not cfg["allow"]:
            log.warning("workers started with no allow=: they run no system proc (give "
                        "allow=['your.module'] or --allow your.module; '*' trusts everything)")
        for slot in range(cfg["workers"]):
            self._start(slot)
        if lifeline:
            threading.Thread(target=self._lifeline, daemon=True).start()
        while not self.stopping.is_set():
            try:
                self._tick()
            except PipeProcError as exc:
                log.warning("supervisor: %s", exc)
                self.stopping.wait(1.0)
        self._stop_all()

    def _lifeline(self) -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        try:  # wake the tick's block
            self.backend.r.xadd(self.backend.P + ":tbell", {"e": "stop", "w": self.cfg["id"]},
                                maxlen=100, approximate=True)
        except Exception:  # noqa: BLE001
            pass

    def _tick(self) -> None:
        b = self.backend
        bell_id, wake, now, recycle = b.script("tick", WORKER_DEAD_MS, self.cfg["id"])
        for wid in recycle:
            self._recycle(wid.decode() if isinstance(wid, bytes) else str(wid))
        wait = 30.0
        if wake:
            wait = min(wait, max(0.0, (int(wake) - int(now)) / 1000.0) + 0.002)
        gc = self._gc_settings()
        if gc is not None:
            mono = time.monotonic()
            if mono >= self.gc_next:
                self.gc_next = mono + gc["interval"]
                n = b.script("gc", self.cfg["id"], int(gc["interval"] * 1500),
                             int(gc["min_prune_time"] * 1000))
                if n and int(n) > 0:
                    log.info("gc: %d logs deleted", int(n))
            wait = min(wait, max(0.0, self.gc_next - time.monotonic()))
        if not self.stopping.is_set():
            b.block(bell_id.decode() if isinstance(bell_id, bytes) else str(bell_id), wait,
                    stream="tbell")

    def _gc_settings(self) -> Optional[Dict[str, float]]:
        """The namespace's GC settings (stored by whoever enabled the GC: any supervisor of
        the namespace runs it, one at a time under the lease), or ``None``: no GC."""
        b = self.backend
        try:
            raw = b.r.hgetall(b.P + ":gc")
        except b._redis_mod.RedisError as exc:
            raise b._error(exc) from None
        if not raw:
            return None
        out = dict(DEFAULT_GC)
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            try:
                out[key] = float(v)
            except ValueError:
                pass
        out["interval"] = max(out["interval"], 0.01)
        return out

    def _recycle(self, item: str) -> None:
        """A processor of this worker ran past its time limit: say so (ERROR when that
        disabled its proc), and stop the worker (kill: it is stuck in user code); it is
        restarted, and its other claims are released."""
        wid, name, status, rng, fails, most, limit = (item.split("\t") + [""] * 7)[:7]
        if status == "disabled":
            log.error("system proc %r failed on logs %s: TimeLimitExceeded: its processor ran "
                      "longer than reclaim_timeout=%s s\nsystem proc %r is DISABLED: %s "
                      "failure(s) in a row reached max_reclaims=%s; its logs wait until "
                      "resume_proc(%r)", name, rng, limit, name, fails, most, name)
        elif name:
            log.warning("system proc %r failed on logs %s (failure %s in a row, "
                        "max_reclaims=%s): TimeLimitExceeded: its processor ran longer than "
                        "reclaim_timeout=%s s; its worker is recycled", name, rng, fails,
                        "unlimited" if most == "-1" else most, limit)
        try:
            _, slot, pid = wid.rsplit("/", 2)
        except ValueError:
            return
        with self.lock:
            proc = self.procs.get(int(slot))
        if proc is not None and proc.pid == int(pid) and proc.poll() is None:
            log.warning("worker %s ran a processor past its proc's reclaim_timeout: "
                        "recycling it", wid)
            self.recycling.add(proc.pid)
            proc.kill()

    def _wid(self, slot: int) -> str:
        return f"{self.cfg['id']}/{slot}"

    def _start(self, slot: int, delay: float = 0.0) -> None:
        if self.stopping.is_set():
            return
        wcfg = dict(self.cfg)
        wcfg["slot"] = slot
        wcfg["restarts"] = self.restarts.get(slot, 0)
        proc = _child("worker", wcfg)
        with self.lock:
            self.procs[slot] = proc
        started = time.monotonic()
        threading.Thread(target=self._watch, args=(slot, proc, started, delay),
                         daemon=True).start()

    def _watch(self, slot: int, proc: subprocess.Popen, started: float, delay: float) -> None:
        code = proc.wait()
        wid = self._wid(slot)
        # recycled (restart_after, a time limit) or stopping: its other claims are not
        # the processor's failures; they are released, not counted
        recycled = code == RECYCLED or self.stopping.is_set() or proc.pid in self.recycling
        self.recycling.discard(proc.pid)
        try:
            self.backend.script(
                "reap1", wid,
                f"worker {slot} (pid {proc.pid}) died while processing these logs",
                "0" if recycled else "1", "0" if self.stopping.is_set() else "1")
        except PipeProcError as exc:
            log.warning("the claims of worker %s could not be reclaimed now (%s); the "
                        "heartbeat check will", wid, exc)
        if self.stopping.is_set():
            return
        if not recycled:
            log.warning("worker %d (pid %d) exited with code %s; restarting it", slot,
                        proc.pid, code)
        lived = time.monotonic() - started
        delay = 0.0 if recycled or lived > 10 else min(5.0, max(0.1, delay * 2))
        if delay and self.stopping.wait(delay):
            return
        self.restarts[slot] = self.restarts.get(slot, 0) + 1
        self._start(slot, delay)

    def _stop_all(self) -> None:
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            try:
                if p.stdin is not None:
                    p.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def supervisor_main() -> None:
    cfg = read_cfg()
    setup_process(cfg, "supervisor")
    sup = Supervisor(cfg)
    signal.signal(signal.SIGTERM, lambda *_: sup.stop())
    signal.signal(signal.SIGINT, lambda *_: sup.stop())
    sup.run()
    logging.shutdown()
    os._exit(0)
