"""``pipeproc check``: verify a store with no node running, like SQLite's
``PRAGMA integrity_check``.

The data file is first checked against its LMDB meta pages with plain file I/O (a truncated
file is never mapped). Then a child process (``python -m pipeproc._check STORE_DIR``) opens
the store read-only and walks every database: each log record's checksum, header and
sequence (contiguous ``[first, next)`` per topic), every topic, proc and system proc
record. It prints a JSON report; a child killed by LMDB itself (an assertion on a damaged
B-tree page, a SIGBUS) is reported as damage instead of taking the command down with it.

While the check runs it holds the location's ``node.lock``, so no node starts meanwhile; a
running node is refused (stop it first: the store belongs to one process at a time).

``pipeproc check`` runs it as a child process too (``python -m pipeproc._check --location
DIR``, see :func:`main`) and renders the JSON report: the CLI is client side and imports no
node-side module.

May import: ``_damage`` (the page walk, record checks), ``_layout`` (the key layout),
``_records``, ``_platform``, ``errors``, lmdb, msgpack and the standard library. Node side:
the CLI runs it as a child process, no client module imports it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from typing import Any, Dict, List, Optional

import lmdb
import msgpack

from ._damage import proc_problem, walk_pages
from ._platform import STORE_MARKER
from ._records import CRC_RESIDUE, crc32
from ._layout import FORMAT_VERSION, LOG_KEY, TopicMeta, check_files, unpack_named
from .errors import InvalidArgument, NodeAlreadyActive, PipeProcError, StoreCorrupted

#: Problems listed in a report (all are counted).
MAX_LISTED = 1000


def scan(path: str) -> Dict[str, Any]:
    """Walk the store in directory ``path`` (read-only); the report as a dict."""
    problems: List[str] = []
    counts = {"topics": 0, "logs": 0, "unchecked_logs": 0, "procs": 0, "system_procs": 0}

    def problem(text: str) -> None:
        counts["problems"] = counts.get("problems", 0) + 1
        if len(problems) < MAX_LISTED:
            problems.append(text)

    version: Optional[int] = None
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=8, readahead=False,
                    subdir=True, create=False)
    try:
        with env.begin(buffers=True) as txn:
            dbs = {n: env.open_db(n, txn=txn, create=False)
                   for n in (b"topics", b"logs", b"procs", b"sysprocs", b"meta")}
            meta_db = dbs[b"meta"]
            fmt = txn.get(b"format", db=meta_db)
            try:
                version = int(bytes(fmt)) if fmt is not None else None
                raw = txn.get(b"unchecked", db=meta_db)
                unchecked: Optional[Dict[Any, Any]] = (
                    dict(msgpack.unpackb(raw, strict_map_key=False)) if raw else {})
            except Exception as exc:
                problem(f"meta records cannot be decoded: {exc}")
                version, unchecked = FORMAT_VERSION, {}
            if version is not None and version < 3:
                unchecked = None  # a format-2 store: no record has a checksum yet
            topics: Dict[int, tuple] = {}
            for key, value in txn.cursor(db=dbs[b"topics"]):
                try:
                    name = bytes(key).decode()
                    meta = TopicMeta.unpack(value, sealed=unchecked is not None)
                except Exception as exc:
                    shown = bytes(key)[:80].decode(errors="replace")
                    problem(f"the record of topic {shown!r} is damaged ({exc})")
                    continue
                counts["topics"] += 1
                topics[meta.tid] = (name, meta)
            expected: Dict[int, int] = {}  # tid -> next expected seq
            orphans: Dict[int, list] = {}  # tid -> [count, first seq, last seq]
            for raw_key, value in txn.cursor(db=dbs[b"logs"]):
                lkey = bytes(raw_key)
                if len(lkey) != LOG_KEY.size:
                    problem(f"log key {lkey!r} is malformed")
                    continue
                tid, seq = LOG_KEY.unpack(lkey)
                if tid not in topics:
                    o = orphans.setdefault(tid, [0, seq, seq])
                    o[0] += 1
                    o[2] = seq
                    continue
                name, meta = topics[tid]
                where = f"log {seq} of topic {name!r}"
                nxt = expected.get(tid)
                if nxt is None:
                    if seq < meta.first:
                        problem(f"{where} is below the topic's first stored log {meta.first}")
                    elif seq > meta.first:
                        problem(f"logs {meta.first}..{seq - 1} of topic {name!r} are missing")
                elif seq != nxt:
                    problem(f"logs {nxt}..{seq - 1} of topic {name!r} are missing")
                expected[tid] = seq + 1
                counts["logs"] += 1
                legacy = unchecked is None or seq < unchecked.get(tid, 0)
                if legacy:
                    counts["unchecked_logs"] += 1
                    rec = bytes(value)
                elif crc32(value) != CRC_RESIDUE:
                    problem(f"{where} fails its checksum")
                    continue
                else:
                    rec = bytes(value)[:-4]
                if len(rec) < 20 or rec[0] != 0x93 or rec[1] != 0xCF or rec[10] != 0xCF:
                    problem(f"{where} has a malformed header")
                elif int.from_bytes(rec[11:19], "big") != seq:
                    problem(f"{where} carries sequence {int.from_bytes(rec[11:19], 'big')}")
                elif legacy:
                    try:
                        msgpack.unpackb(rec[19:], raw=False, strict_map_key=False)
                    except Exception as exc:
                        problem(f"{where} cannot be decoded ({type(exc).__name__}: {exc})")
            for tid, (n, lo, hi) in orphans.items():
                counts["logs"] += n
                problem(f"{n} logs (seq {lo}..{hi}) of topic id {tid} belong to no topic "
                        "record (damaged or missing)")
            for tid, (name, meta) in topics.items():
                # stored logs cover [first, next of the topic record) at least
                end = expected.get(tid, meta.first)
                if end < meta.next:
                    problem(f"logs {end}..{meta.next - 1} of topic {name!r} are missing")
            for db, kind, key_name in ((b"procs", "proc", "procs"),
                                       (b"sysprocs", "system proc", "system_procs")):
                for pkey, pvalue in txn.cursor(db=dbs[db]):
                    try:
                        name, prec = unpack_named(kind, pkey, pvalue, unchecked is not None)
                    except StoreCorrupted as exc:
                        problem(exc.message.split(": run `pipeproc check`")[0])
                        continue
                    counts[key_name] += 1
                    if db == b"procs":
                        bad = proc_problem(prec)
                        if bad:
                            problem(f"proc {name!r}: {bad}")
                    elif type(prec.get("procs")) is not list:
                        problem(f"system proc {name!r}: no proc list")
            try:  # workflow runs (pipeproc.flow): a record each, and its journal topic
                runs_db = env.open_db(b"runs", txn=txn, create=False)
            except lmdb.NotFoundError:  # a store that never held a run
                runs_db = None
            if runs_db is not None:
                journals = {name for name, _ in topics.values()}
                for rkey, rvalue in txn.cursor(db=runs_db):
                    try:
                        name, rrec = unpack_named("run", rkey, rvalue, True)
                    except StoreCorrupted as exc:
                        problem(exc.message.split(": run `pipeproc check`")[0])
                        continue
                    counts["runs"] = counts.get("runs", 0) + 1
                    if rrec.get("topic") not in journals:
                        problem(f"run {name!r}: its journal (topic {rrec.get('topic')!r}) "
                                "is missing")
    except lmdb.Error as exc:
        problem(f"LMDB cannot read the store: {exc}")
    finally:
        env.close()
    counts.setdefault("problems", 0)
    return {"ok": counts["problems"] == 0, **counts, "listed": problems, "format": version}


def check_location(location: str) -> Dict[str, Any]:
    """Check the store of ``location`` (no node may run there).

    Returns:
        The report: ``ok``, counts and the ``listed`` problems.

    Raises:
        NodeAlreadyActive: a node runs on the location.
        InvalidArgument: there is no store at the location.
    """

    store = os.path.join(location, "store")
    marker = os.path.join(location, STORE_MARKER)
    if not os.path.isdir(store) and not os.path.exists(marker):
        raise InvalidArgument(f"there is no store at {location}")
    fd = None
    try:
        fd = os.open(os.path.join(location, "node.lock"), os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        pass
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise NodeAlreadyActive(
                    f"a node is running on {location}: stop it first "
                    "(`pipeproc check` reads the store with no node running)") from None
        try:
            check_files(store, True)
        except StoreCorrupted as exc:
            return {"ok": False, "problems": 1, "listed": [exc.message]}
        pages = walk_pages(store, deep=True, limit=MAX_LISTED)
        proc = subprocess.run([sys.executable, "-m", "pipeproc._check", store],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            report = json.loads(proc.stdout)
        else:
            if proc.returncode < 0:
                sig = signal.Signals(-proc.returncode).name
                text = (f"LMDB stopped reading {store}/data.mdb ({sig}): "
                        f"{proc.stderr.strip()[-300:]}")
            else:
                text = f"the check failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
            report = {"ok": False, "problems": 1, "listed": [text]}
        if pages:
            report["ok"] = False
            report["problems"] = report.get("problems", 0) + len(pages)
            report["listed"] = pages + report["listed"]
        return report
    finally:
        if fd is not None:
            os.close(fd)


def main(argv: List[str]) -> int:
    """The command line of the check's child processes.

    ``python -m pipeproc._check --location DIR`` (what ``pipeproc check`` runs): the whole
    check of :func:`check_location`; prints its report as JSON and exits 0 when the store is
    sound, 1 on damage; prints ``{"error": code, "message": ...}`` and exits 2 when the check
    is refused (a node is running, no store there).

    ``python -m pipeproc._check STORE_DIR`` (what :func:`check_location` runs): the
    :func:`scan` of the store, its report as JSON.
    """
    if len(argv) == 2 and argv[0] == "--location":
        try:
            report = check_location(argv[1])
        except PipeProcError as exc:
            print(json.dumps({"error": exc.code, "message": exc.message}))
            return 2
        print(json.dumps(report))
        return 0 if report["ok"] else 1
    print(json.dumps(scan(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
