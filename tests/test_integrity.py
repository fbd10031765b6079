"""Store integrity (issue 14 items 3, 6, 11-14): checksummed log records, damaged or truncated
stores refused with ``store_corrupted`` (never served as data, never a crashed node), long
proc names, a GC that can always free a full store, a full disk as ``storage_full``."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import lmdb
import msgpack
import pytest

import pipeproc
from pipeproc import _node, _store
from pipeproc._records import record
from pipeproc._store import FORMAT_VERSION, Store
from helpers import wait_until

MARK = b"INTEGRITY-MARK-"


def _location(tmp_path):
    return str(tmp_path / "loc")


def _flip(path: str, needle: bytes, offset: int = 0) -> int:
    """Flip one byte of every occurrence of ``needle`` in ``path`` (stale copies in free
    pages included); returns how many there were."""
    with open(path, "r+b") as f:
        data = f.read()
        at = data.find(needle)
        assert at >= 0, f"{needle!r} not in {path}"
        n = 0
        while at >= 0:
            f.seek(at + offset)
            f.write(bytes([data[at + offset] ^ 0x01]))
            n += 1
            at = data.find(needle, at + 1)
    return n


def _data(location: str) -> str:
    return os.path.join(location, "store", "data.mdb")


def _fill(pp, n=20, topic="t"):
    return pp.commit([{"topic": topic, "body": {"k": (MARK + b"%04d" % i)}} for i in range(n)])


# ------------------------------------------------------------------ checksums (14.3, 14.14)

def test_a_flipped_byte_in_a_body_is_store_corrupted_on_every_read_path(spawner, tmp_path):
    loc = _location(tmp_path)
    pp = spawner(loc)
    _fill(pp)
    pp.shutdown()
    _flip(_data(loc), MARK + b"0007", len(MARK) + 3)  # body of seq 7: ...0007 -> ...0006
    pp = spawner(loc)
    with pytest.raises(pipeproc.StoreCorrupted) as e:
        pp.range("t")
    assert "log 7 of topic 't'" in str(e.value)
    # the connection stays: reads around the damage work
    assert [log.body["k"] for log in pp.range("t", ":0", ":6")] == [MARK + b"%04d" % i
                                                                    for i in range(7)]
    with pytest.raises(pipeproc.StoreCorrupted):
        pp.revrange("t")
    with pytest.raises(pipeproc.StoreCorrupted):
        list(pp.iter_range("t", page_size=3))
    assert len(pp.range("t", ":8")) == 12
    # a proc claim that reaches the damaged record
    assert len(pp.proc("t", name="p", count=7)) == 7
    pp.ack("p")
    with pytest.raises(pipeproc.StoreCorrupted):
        pp.proc("t", name="p", count=3)
    assert pp.length("t") == 20
    assert pp.stats()["node"]["damaged_reads"] >= 4


def test_a_damaged_record_never_reaches_a_worker(spawner, tmp_path):
    """The system proc stops (disabled, logged) at the damaged record; the others go on."""
    loc = _location(tmp_path)
    pp = spawner(loc)
    pp.commit([{"topic": "t", "body": {"n": i, "k": MARK + b"%04d" % i}} for i in range(5)])
    pp.shutdown()
    _flip(_data(loc), MARK + b"0002", len(MARK) + 3)
    pp = spawner(loc, workers=1)
    pp.system_proc(name="inc", from_="t", processor="procmods.sysmods:inc", to="out")
    pp.system_proc(name="inc2", from_="u", processor="procmods.sysmods:inc", to="out2")
    wait_until(lambda: pp.stats()["procs"]["inc"]["status"] == "disabled", 60.0)
    assert sorted(log.body["n"] for log in pp.range("out")) == [1, 2]
    pp.commit({"topic": "u", "body": {"n": 10}})
    wait_until(lambda: "out2" in pp.topics() and pp.length("out2") == 1, 60.0)
    assert pp.range("out2")[0].body == {"n": 11}


def test_a_damaged_proc_record_is_refused_at_start_and_reported(spawner, tmp_path):
    loc = _location(tmp_path)
    pp = spawner(loc)
    _fill(pp, 3)
    pp.proc("t", name="consumer", count=2)
    pp.ack("consumer")
    pp.shutdown()
    _flip(_data(loc), b"last_acked_at", 3)
    with pytest.raises(pipeproc.StoreCorrupted) as e:
        spawner(loc)
    assert "proc 'consumer'" in str(e.value)
    r = _check("--location", loc)
    assert r.returncode == 1 and "'consumer'" in r.stdout


def test_a_damaged_topic_record_is_store_corrupted(spawner, tmp_path):
    loc = _location(tmp_path)
    pp = spawner(loc)
    _fill(pp, 3, topic="tpc")
    pp.shutdown()
    with open(_data(loc), "rb") as f:
        data = f.read()
    # the topic record: key "tpc", value msgpack [tid, next, first, created] + crc
    at = data.find(b"tpc\x94")
    assert at > 0
    _flip(_data(loc), b"tpc\x94", 5)
    with pytest.raises(pipeproc.StoreCorrupted) as e:
        spawner(loc)
    assert "topic record" in str(e.value)


def test_a_live_proc_reaching_a_damaged_record_gets_store_corrupted(spawner, tmp_path):
    loc = _location(tmp_path)
    pp = spawner(loc)
    _fill(pp, 5)
    pp.shutdown()
    _flip(_data(loc), MARK + b"0002", len(MARK) + 3)
    pp = spawner(loc)
    live = pp.live_proc("t", mode="all", count=2)
    try:
        assert [log.body["k"] for log in next(live)] == [MARK + b"0000", MARK + b"0001"]
        live.ack()
        with pytest.raises(pipeproc.StoreCorrupted):
            next(live)
    finally:
        live.cancel()
    assert pp.length("t") == 5  # the node and this client go on


def test_a_damaged_stamp_does_not_stop_the_gc_of_other_topics(spawner, tmp_path):
    loc = _location(tmp_path)
    pp = spawner(loc)
    ids = _fill(pp, 40, topic="a")
    ms = int(ids[20].split("-")[0])
    pp.shutdown()
    _flip(_data(loc), record(ms, 20, b"")[:19], 5)  # the GC's bisection reads the stamps
    pp = spawner(loc, gc={"min_prune_time": 0, "interval": 0.05})
    _fill(pp, 10, topic="b")
    wait_until(lambda: pp.stats()["topics"]["b"]["stored"] == 0, 60.0)


def test_range_of_a_flipped_header_byte_is_store_corrupted(spawner, tmp_path):
    """A damaged ms stamp (bound resolution reads it) is refused too."""
    loc = _location(tmp_path)
    pp = spawner(loc)
    ids = _fill(pp, 3)
    pp.shutdown()
    ms = int(ids[1].split("-")[0])
    head = record(ms, 1, b"")[:19]
    _flip(_data(loc), head, 5)
    pp = spawner(loc)
    with pytest.raises(pipeproc.StoreCorrupted):
        pp.range("t", ids[1], ids[1])


def test_store_records_carry_a_checksum(tmp_path):
    store = Store(str(tmp_path))
    try:
        tx = store.begin()
        tx.append([("t", b"\xa3abc")])
        tx.commit()
        with store.env.begin() as txn:
            value = bytes(txn.get(_store.log_key(1, 0), db=store.db_logs))
        assert value[:-4] == record(store.last_ms, 0, b"\xa3abc")
        with store.reader() as r:
            assert [bytes(v) for v in r.records(r.topic("t"), 0, 0, 10, False)] == [value[:-4]]
    finally:
        store.close()


def _make_format2_store(path: str, n: int) -> None:
    """A store as format 2 wrote it: records without a checksum."""
    store = Store(path)
    try:
        tx = store.begin()
        for seq in range(n):
            tx.txn.put(_store.log_key(1, seq), record(1000 + seq, seq, b"\xa1x"),
                       db=store.db_logs)
        meta = tx.topic_w("old")
        meta.next = n
        tx.commit()
        from pipeproc import _procs
        with store.env.begin(write=True) as txn:  # format 2: records without checksums
            txn.put(b"format", b"2", db=store.db_meta)
            txn.delete(b"unchecked", db=store.db_meta)
            txn.put(b"old", msgpack.packb([1, n, 0, 1000]), db=store.db_topics)
            txn.put(b"reader", msgpack.packb(_procs.new_record("old", ">", 1000, 0, 10, 10.0,
                                                               "disable")),
                    db=store.db_procs)
    finally:
        store.close()


def test_a_format2_store_is_upgraded_and_its_old_logs_still_read(tmp_path):
    path = str(tmp_path / "s")
    _make_format2_store(path, 5)
    store = Store(path)
    try:
        assert store.unchecked == {1: 5}
        assert store.procs["reader"]["topic"] == "old"
        tx = store.begin()
        tx.append([("old", b"\xa1y")] * 3)
        tx.commit()
        with store.reader() as r:
            recs = [bytes(v) for v in r.records(r.topic("old"), 0, 10, 100, False)]
            assert [msgpack.unpackb(v)[1:] for v in recs] == [[i, "x"] for i in range(5)] + [
                [i, "y"] for i in range(5, 8)]
            back = [bytes(v) for v in r.records(r.topic("old"), 0, 10, 100, True)]
            assert back == recs[::-1]
        with store.env.begin() as txn:
            assert int(txn.get(b"format", db=store.db_meta)) == FORMAT_VERSION
    finally:
        store.close()
    store = Store(path)  # the watermark survives a restart, records are sealed now
    try:
        assert store.unchecked == {1: 5}
        assert store.procs["reader"]["topic"] == "old" and store.topics["old"].next == 8
        with store.reader() as r:
            assert len(r.records(r.topic("old"), 0, 10, 100, False)) == 8
    finally:
        store.close()


def test_an_undecodable_format2_record_is_store_corrupted(tmp_path):
    """Format-2 records carry no checksum: served as they are, but never undecodable bytes
    (the client would fail on the whole page with a raw FormatError/UnicodeDecodeError)."""
    path = str(tmp_path / "s")
    _make_format2_store(path, 3)
    store = Store(path)
    try:
        with store.env.begin(write=True) as txn:  # a str body whose UTF-8 is broken
            txn.put(_store.log_key(1, 1), record(1001, 1, b"\xa2\xff\xfe"), db=store.db_logs)
        with store.reader() as r:
            with pytest.raises(pipeproc.StoreCorrupted) as e:
                r.records(r.topic("old"), 0, 2, 10, False)
            assert "log 1 of topic 'old' cannot be decoded" in str(e.value)
            assert len(r.records(r.topic("old"), 2, 2, 10, False)) == 1
    finally:
        store.close()


# ------------------------------------------------------------------ files (14.3, 14.11)

@pytest.mark.parametrize("damage", ["empty", "half", "missing", "store-dir-gone", "meta"])
def test_a_damaged_data_file_is_refused_at_start(spawner, tmp_path, damage):
    loc = _location(tmp_path)
    pp = spawner(loc)
    _fill(pp, 2000)
    pp.shutdown()
    data = _data(loc)
    size = os.path.getsize(data)
    if damage == "empty":
        os.truncate(data, 0)
    elif damage == "half":
        os.truncate(data, size // 2)
    elif damage == "missing":
        os.unlink(data)
    elif damage == "store-dir-gone":
        import shutil
        shutil.rmtree(os.path.join(loc, "store"))
    else:
        with open(data, "r+b") as f:
            f.seek(16)
            f.write(b"\0" * 8)
    with pytest.raises(pipeproc.StoreCorrupted) as e:
        spawner(loc)
    assert "data.mdb" in str(e.value)
    assert not [n for n in os.listdir(loc) if n.endswith(".tmp")]


def test_a_zeroed_btree_page_is_refused_at_start_and_reported_by_check(spawner, tmp_path):
    """LMDB trusts its pages: a zeroed leaf stops the process with an assertion (SIGABRT)
    while serving range. The node walks the page headers before opening the store."""
    loc = _location(tmp_path)
    pp = spawner(loc)
    pp.commit([{"topic": "t", "body": {"k": "x" * 100, "i": i}} for i in range(5000)])
    pp.shutdown()
    from pipeproc._check import walk_pages
    assert walk_pages(os.path.join(loc, "store"), deep=True) == []
    with open(_data(loc), "r+b") as f:  # a leaf page of the logs (pages 2.. hold the trees)
        f.seek(4096 * 40)
        f.write(b"\0" * 4096)
    with pytest.raises(pipeproc.StoreCorrupted) as e:
        spawner(loc)
    assert "page 40" in str(e.value) and "data.mdb" in str(e.value)
    r = _check("--location", loc)
    assert r.returncode == 1 and "page 40" in r.stdout


def test_a_new_location_still_starts_and_marks_its_store(spawner, tmp_path):
    loc = _location(tmp_path)
    pp = spawner(loc)
    assert os.path.exists(os.path.join(loc, _node.STORE_MARKER))
    _fill(pp, 1)
    pp.shutdown()
    pp = spawner(loc)
    assert len(pp.range("t")) == 1


def test_an_lmdb_damage_error_keeps_the_connection(spawner, tmp_path, monkeypatch):
    """MDB_PAGE_NOTFOUND / MDB_CORRUPTED while serving: store_corrupted to the caller, the
    (healthy) client keeps its connection."""
    pp = spawner(_location(tmp_path))
    _fill(pp, 3)
    node = _node.Node.__new__(_node.Node)  # the I/O loop's handling, without a process
    sent = []

    class FakeConn:
        id = 1
        closed = False

        def send(self, data):
            sent.append(data)

    class FakeStore:
        path = "/x"

    def boom(conn, rid, *args):
        raise lmdb.PageNotFoundError("mdb_get: MDB_PAGE_NOTFOUND: Requested page not found")

    node.ops = {"range": boom}
    node.store = FakeStore()
    loop = _node.IOLoop.__new__(_node.IOLoop)
    loop.node = node
    loop.last_conn = None
    loop.talk = {}
    assert loop._serve(FakeConn(), msgpack.packb([7, "range", "t"])) is True
    rid, status, (code, message) = msgpack.unpackb(sent[0])
    assert (rid, status, code) == (7, 1, "store_corrupted")
    assert "MDB_PAGE_NOTFOUND" in message


# ------------------------------------------------------------------ pipeproc check (14.11)

def _check(*args):
    return subprocess.run([sys.executable, "-m", "pipeproc", "check", *args],
                          capture_output=True, text=True, timeout=60)


def test_check_ok_then_reports_damage(spawner, tmp_path):
    loc = _location(tmp_path)
    pp = spawner(loc)
    _fill(pp, 20)
    pp.proc("t", name="p", count=2)
    pp.shutdown()
    r = _check("--location", loc)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout and "20 logs" in r.stdout and "1 proc" in r.stdout
    _flip(_data(loc), MARK + b"0011", len(MARK) + 2)
    r = _check("--location", loc)
    assert r.returncode == 1
    assert "log 11 of topic 't'" in r.stdout + r.stderr


def test_check_refuses_a_truncated_store_and_a_running_node(spawner, tmp_path):
    loc = _location(tmp_path)
    pp = spawner(loc)
    _fill(pp, 5)
    r = _check("--location", loc)
    assert r.returncode == 2 and "running" in r.stderr
    pp.shutdown()
    os.truncate(_data(loc), 4096 * 2)
    r = _check("--location", loc)
    assert r.returncode == 1 and "truncated" in r.stdout + r.stderr


def test_check_reports_missing_logs(tmp_path):
    path = str(tmp_path / "loc" / "store")
    os.makedirs(path)
    store = Store(path)
    try:
        tx = store.begin()
        tx.append([("t", b"\xa1x")] * 10)
        tx.commit()
        with store.env.begin(write=True) as txn:
            txn.delete(_store.log_key(1, 4), db=store.db_logs)
            txn.delete(_store.log_key(1, 0), db=store.db_logs)
    finally:
        store.close()
    r = _check("--location", str(tmp_path / "loc"))
    assert r.returncode == 1
    assert "logs 0..0 of topic 't' are missing" in r.stdout
    assert "logs 4..4 of topic 't' are missing" in r.stdout


# ------------------------------------------------------------------ long names (14.13)

@pytest.mark.parametrize("char", ["漢", "😀"])
def test_a_200_character_cjk_or_emoji_proc_name_works(spawner, tmp_path, char):
    loc = _location(tmp_path)
    pp = spawner(loc)
    name = char * 200
    _fill(pp, 5)
    assert len(pp.proc("t", name=name, count=2)) == 2
    pp.ack(name)
    assert name in pp.stats()["procs"]
    pp.shutdown()
    pp = spawner(loc)
    assert pp.inspect_proc(name).name == name
    assert pp.proc("t", name=name, count=1).body["k"] == MARK + b"0002"
    pp.ack(name)
    pp.destroy_proc(name)
    assert name not in pp.stats()["procs"]


def test_long_names_are_keyed_by_digest_and_short_ones_keep_their_key(tmp_path):
    assert _store.name_key("p" * 200) == b"p" * 200
    long_key = _store.name_key("😀" * 200)
    assert long_key[:1] == b"\xff" and len(long_key) == 33


# ------------------------------------------------------------------ GC reserve (14.6)

def test_the_gc_frees_a_store_full_of_small_logs(spawner, tmp_path):
    """A store filled to storage_full with many small logs: once nothing holds them, the GC
    collects them and writes succeed again."""
    mb = 1 << 20
    pp = spawner(_location(tmp_path), max_map_size=4 * mb,
                 gc={"min_prune_time": 0, "interval": 0.05})
    pp.proc("t", name="guard", offset="$>")  # holds every log
    batch = [{"topic": "t", "body": [i]} for i in range(500)]
    n = 0
    with pytest.raises(pipeproc.StorageFull):
        for _ in range(1000):
            pp.commit(batch)
            n += len(batch)
    assert n > 10_000
    pp.destroy_proc("guard")
    import time
    deadline = time.monotonic() + 60
    while True:
        try:
            pp.commit(batch)
            break
        except pipeproc.StorageFull:
            assert time.monotonic() < deadline, "the GC never freed the full store"
            time.sleep(0.05)
    assert pp.stats()["topics"]["t"]["stored"] < n


# ------------------------------------------------------------------ full disk (14.12)

def test_eio_on_a_full_disk_is_storage_full(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "s"))
    try:
        assert not store.disk_full()
        monkeypatch.setattr(_store.os, "statvfs", lambda p: os.statvfs_result(
            (4096, 4096, 1000, 0, 0, 100, 0, 0, 0, 255)))
        assert store.disk_full()
    finally:
        store.close()


def test_write_private_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(_node.os, "write", full)
    target = str(tmp_path / "node.key")
    with pytest.raises(pipeproc.StorageFull):
        _node._write_private(target, b"k" * 32)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_a_store_whose_creation_fails_on_a_full_disk_leaves_no_half_store(tmp_path, monkeypatch):
    real = lmdb.open

    def full(path, **kw):
        real(path, **kw).close()  # LMDB created its files, then the disk filled up
        raise lmdb.Error("mdb_env_open: No space left on device")
    monkeypatch.setattr(_store.lmdb, "open", full)
    path = str(tmp_path / "s")
    with pytest.raises(pipeproc.StorageFull):
        Store(path)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(path, "data.mdb"))
    assert not os.path.exists(os.path.join(path, "lock.mdb"))
    Store(path).close()  # a later open creates it as new


def test_the_asyncio_client_gets_store_corrupted_too(spawner, tmp_path):
    import asyncio

    import pipeproc.aio as aio
    loc = _location(tmp_path)
    pp = spawner(loc)
    _fill(pp, 5)
    pp.shutdown()
    _flip(_data(loc), MARK + b"0003", len(MARK) + 3)
    pp = spawner(loc)

    async def main():
        client = await aio.connect(loc)
        try:
            with pytest.raises(pipeproc.StoreCorrupted):
                await client.range("t")
            assert len(await client.range("t", ":0", ":2")) == 3  # same connection
        finally:
            await client.close()
    asyncio.run(main())
