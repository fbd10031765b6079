"""Same-run baselines: in-process LMDB and a multiprocessing.connection socket round trip.

Run as part of the suite (`.venv/bin/python -m benchmarks`), or alone:

    .venv/bin/python -m benchmarks.baselines [--quick]

Every figure is the median over several rounds of that round's throughput (each round is
timed as a whole; a warmup round is run first and discarded).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import struct
import tempfile
import time
from typing import Dict, Optional

import lmdb
import msgpack

from ._common import body, cpu_seconds, fmt_rate, median, scratch_dir

_KEY = struct.Struct(">IQ")  # (topic id, seq), like a log store's key
MAP = 1 << 30


def _open(path: str) -> lmdb.Environment:
    # lmdb defaults: sync=True, metasync=True -- a committed transaction has been fsynced
    return lmdb.open(path, map_size=MAP, max_dbs=4, sync=True, metasync=True, readahead=False)


def lmdb_durable_commit(path: str, n: int, rounds: int) -> Dict[str, float]:
    """One-put write transactions with sync=True: commits/s (the cost of a durable commit)."""
    env = _open(path)
    db = env.open_db(b"logs")
    pack = msgpack.packb
    seq = 0
    rates = []
    lat = []
    try:
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                with env.begin(write=True, db=db) as txn:
                    txn.put(_KEY.pack(1, seq), pack(body(seq), use_bin_type=True))
                seq += 1
                if r:
                    lat.append(time.perf_counter() - t)
            dt = time.perf_counter() - t0
            if r:  # round 0 is warmup
                rates.append(n / dt)
    finally:
        env.close()
    return {"rate": median(rates), "median_latency": median(lat)}


def lmdb_batch_put(path: str, n: int, rounds: int, batch: int = 1000) -> Dict[str, float]:
    """``n`` logs in write transactions of ``batch`` puts (msgpack encode included): logs/s."""
    env = _open(path)
    db = env.open_db(b"logs")
    pack = msgpack.packb
    key = _KEY.pack
    rates = []
    try:
        for r in range(rounds + 1):
            tid = 10 + r
            t0 = time.perf_counter()
            for start in range(0, n, batch):
                with env.begin(write=True, db=db) as txn:
                    put = txn.put
                    for seq in range(start, min(n, start + batch)):
                        put(key(tid, seq), pack(body(seq), use_bin_type=True))
            dt = time.perf_counter() - t0
            if r:
                rates.append(n / dt)
    finally:
        env.close()
    return {"rate": median(rates)}


def lmdb_paged_scan(path: str, n: int, rounds: int, page: int = 1000) -> Dict[str, float]:
    """Read ``n`` logs (written by :func:`lmdb_batch_put`, topic id 10) in pages of ``page``,
    one read transaction and one cursor positioning per page, msgpack-decoding every value."""
    env = _open(path)
    db = env.open_db(b"logs")
    unpack = msgpack.unpackb
    rates = []
    try:
        for r in range(rounds + 1):
            got = 0
            nxt = 0
            t0 = time.perf_counter()
            while got < n:
                with env.begin(db=db) as txn:
                    cur = txn.cursor()
                    if not cur.set_range(_KEY.pack(10, nxt)):
                        break
                    out = []
                    for k, v in cur:
                        if len(out) >= page or k[:4] != b"\x00\x00\x00\x0a":
                            break
                        out.append(unpack(v, raw=False))
                if not out:
                    break
                got += len(out)
                nxt += len(out)
            dt = time.perf_counter() - t0
            assert got == n, (got, n)
            if r:
                rates.append(n / dt)
    finally:
        env.close()
    return {"rate": median(rates)}


class LmdbProbe:
    """The durable LMDB baselines measured again right next to a durable workload.

    The disk's fsync time drifts a lot over seconds on shared virtual disks (bursts of
    ~4 ms fsyncs, see RESULTS.md), so a durable workload is compared with probes taken just
    before and just after it (and between its rounds for W1), not only with the figure
    measured at the start of the run."""

    def __init__(self, path: str) -> None:
        self.env = _open(path)
        self.db = self.env.open_db(b"logs")
        self.seq = 0
        self.tid = 100

    def commit(self, n: int) -> list:
        """``n`` one-put durable transactions; returns each one's seconds."""
        env, db, pack = self.env, self.db, msgpack.packb
        out = []
        for _ in range(n):
            t = time.perf_counter()
            with env.begin(write=True, db=db) as txn:
                txn.put(_KEY.pack(1, self.seq), pack(body(self.seq), use_bin_type=True))
            out.append(time.perf_counter() - t)
            self.seq += 1
        return out

    def batch(self, n: int, batch: int = 1000) -> float:
        """``n`` logs in durable transactions of ``batch`` puts; returns the seconds taken."""
        env, db, pack, key = self.env, self.db, msgpack.packb, _KEY.pack
        self.tid += 1
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            with env.begin(write=True, db=db) as txn:
                put = txn.put
                for seq in range(start, min(n, start + batch)):
                    put(key(self.tid, seq), pack(body(seq), use_bin_type=True))
        return time.perf_counter() - t0

    def prepare_scan(self, n: int) -> None:
        """Write the ``n``-log topic that :meth:`scan` reads (untimed)."""
        env, db, pack, key = self.env, self.db, msgpack.packb, _KEY.pack
        for start in range(0, n, 1000):
            with env.begin(write=True, db=db) as txn:
                for seq in range(start, min(n, start + 1000)):
                    txn.put(key(9, seq), pack(body(seq), use_bin_type=True))
        self.scan_n = n

    def scan(self, page: int = 1000) -> float:
        """Read the prepared topic in pages (one read txn each, msgpack decode); seconds."""
        env, db, unpack = self.env, self.db, msgpack.unpackb
        got = nxt = 0
        t0 = time.perf_counter()
        while got < self.scan_n:
            with env.begin(db=db) as txn:
                cur = txn.cursor()
                if not cur.set_range(_KEY.pack(9, nxt)):
                    break
                out = []
                for k, v in cur:
                    if len(out) >= page or k[:4] != b"\x00\x00\x00\x09":
                        break
                    out.append(unpack(v, raw=False))
            if not out:
                break
            got += len(out)
            nxt += len(out)
        dt = time.perf_counter() - t0
        assert got == self.scan_n, (got, self.scan_n)
        return dt

    def close(self) -> None:
        self.env.close()


# ----------------------------------------------------------------------------- socket


def _echo_server(address: str, authkey: bytes, ready) -> None:  # runs in a child process
    from multiprocessing.connection import Listener
    unpack = msgpack.unpackb
    pack = msgpack.packb
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        ready.set()
        with listener.accept() as conn:
            while True:
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                req = unpack(data, raw=False)
                conn.send_bytes(pack([req[0], 0, "1795522971658-0"], use_bin_type=True))


class EchoProbe:
    """A client of an echo server in a separate (spawned) process, over a Unix socket with an
    authkey: the socket round-trip baseline. Kept alive for the run so it can be measured
    again right next to the workloads whose goals use it."""

    def __init__(self) -> None:
        from multiprocessing.connection import Client
        ctx = mp.get_context("spawn")
        self._authkey = os.urandom(32)
        self._dir = tempfile.mkdtemp(prefix="pipeproc-bench-sock-", dir="/tmp")
        address = os.path.join(self._dir, "s.sock")
        ready = ctx.Event()
        self.proc = ctx.Process(target=_echo_server, args=(address, self._authkey, ready),
                                daemon=True)
        self.conn = None
        try:
            self.proc.start()
            if not ready.wait(30):
                raise RuntimeError("echo server did not start")
            self.conn = Client(address, family="AF_UNIX", authkey=self._authkey)
        except BaseException:
            self.close()
            raise
        self.rid = 0
        self.request_bytes = len(msgpack.packb([1, "commit1", "benchmark_topic_w1", body(12345)],
                                               use_bin_type=True))

    def run(self, n: int, lat: Optional[list] = None) -> float:
        """``n`` round trips; returns the seconds they took (per-trip times into ``lat``)."""
        c = self.conn
        pack, unpack, perf = msgpack.packb, msgpack.unpackb, time.perf_counter
        t0 = perf()
        for i in range(n):
            t = perf()
            self.rid += 1
            c.send_bytes(pack([self.rid, "commit1", "benchmark_topic_w1", body(i)],
                              use_bin_type=True))
            unpack(c.recv_bytes(), raw=False)
            if lat is not None:
                lat.append(perf() - t)
        return perf() - t0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        try:
            if self.proc.pid is not None:
                self.proc.join(10)
                if self.proc.is_alive():
                    self.proc.terminate()
                    self.proc.join()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


def socket_pingpong(echo: EchoProbe, n: int, rounds: int) -> Dict[str, float]:
    """Round trips of a ~150-byte msgpack request to an echo server in another process:
    median round rate, client and server CPU per round trip."""
    rates: list = []
    lat: list = []
    cpu_c = cpu_s = 0.0
    ops = 0
    for r in range(rounds + 1):
        c0, s0 = time.process_time(), cpu_seconds(echo.proc.pid)
        dt = echo.run(n, lat if r else None)
        if r:  # round 0 is warmup
            rates.append(n / dt)
            cpu_c += time.process_time() - c0
            cpu_s += cpu_seconds(echo.proc.pid) - s0
            ops += n
    return {"rate": median(rates), "median_latency": median(lat),
            "request_bytes": echo.request_bytes,
            "client_cpu_us_per_op": cpu_c / ops * 1e6, "server_cpu_us_per_op": cpu_s / ops * 1e6}


def record_crc(n: int, rounds: int) -> Dict[str, float]:
    """The per-record cost of store format 3's checksum on reads: ``zlib.crc32`` over a
    stored record with a 100-byte body (as ``Reader.records`` checks it, on a memoryview),
    plus the slice that drops the 4 checksum bytes; median of ``rounds``."""
    import zlib

    from pipeproc._records import CRC_RESIDUE, stored_record
    value = memoryview(stored_record(1_700_000_000_000, 12345, b"\xc4\x62" + b"x" * 98))
    crc32 = zlib.crc32
    per: list = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            if crc32(value) != CRC_RESIDUE:
                raise AssertionError("bad record")
            value[:-4]
        per.append((time.perf_counter() - t0) / n)
    return {"rate": 1.0 / median(per), "us_per_record": median(per) * 1e6,
            "record_bytes": len(value)}


def run(quick: bool = False, echo: Optional[EchoProbe] = None) -> Dict[str, Dict[str, float]]:
    scale = 10 if quick else 1
    out: Dict[str, Dict[str, float]] = {}
    with scratch_dir("pipeproc-bench-lmdb-") as d:
        out["lmdb_durable_commit"] = lmdb_durable_commit(os.path.join(d, "one"), 500 // scale, 3)
        path = os.path.join(d, "batch")
        out["lmdb_batch_put"] = lmdb_batch_put(path, 100_000 // scale, 3)
        out["lmdb_paged_scan"] = lmdb_paged_scan(path, 100_000 // scale, 3)
    out["record_crc"] = record_crc(200_000 // scale, 5)
    own = echo is None
    echo = echo or EchoProbe()
    try:
        out["socket_pingpong"] = socket_pingpong(echo, 5000 // scale, 5)
    finally:
        if own:
            echo.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    res = run(a.quick)
    for k, v in res.items():
        extra = "".join(f", {kk} {vv:.6g}" for kk, vv in v.items() if kk != "rate")
        print(f"{k:22s} {fmt_rate(v['rate']):>12s}/s{extra}")


if __name__ == "__main__":
    main()
