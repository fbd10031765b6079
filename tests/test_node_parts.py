"""The node's parts in-process (issue 15's split): a worker that disconnects while the node
claims for it gets its claim reclaimed at once, as any dead worker's."""

import threading

import msgpack

from pipeproc import _procs
from pipeproc._store import Store
from pipeproc._syshandlers import SysHandlers
from pipeproc._waits import Deadlines, SysDefs, Timers, Waits
from pipeproc._writer import Writer


class _WorkerConn:
    """A worker's connection that is already closed when its claim comes back."""

    id = 1
    closed = True
    recycled = False

    def __init__(self):
        self.lock = threading.Lock()
        self.claims = {}
        self.worker = {"slot": 0, "pid": 12345}
        self.sent = []

    def send(self, data):
        self.sent.append(data)

    reply = fail = send


def test_a_claim_made_for_a_worker_that_disconnected_meanwhile_is_reclaimed(tmp_path):
    store = Store(str(tmp_path))
    try:
        tx = store.begin()
        tx.append([("t", msgpack.packb({"n": 1}))])
        _procs.ensure(tx, "sp", "t", ">", 3, 30.0, "disable")
        tx.put_sysproc("sp", {"procs": ["sp"], "topics": ["t"], "processor": "m:f", "to": [],
                              "count": 1, "multi": False, "created_at": tx.now,
                              "backoff": [0.1, 30.0]})
        tx.commit()
        sysdefs = SysDefs(store)
        timers = Timers()  # never started: nothing here waits on a timer
        writer = Writer(store, False, sysdefs.committed)
        waits = Waits(store, writer, timers, sysdefs)
        deadlines = Deadlines(store, writer, timers, sysdefs, waits)
        sys = SysHandlers(store, writer, timers, waits, deadlines, sysdefs, threading.Event())
        conn = _WorkerConn()
        sys.op_work(conn, 7, None, True)  # claims "sp" for a connection already gone
        rec = store.procs["sp"]
        assert not _procs.pending(rec), "the orphan claim was left pending"
        assert rec["reclaims"] == 1 and rec["last_error"]["type"] == "WorkerDied"
        assert conn.sent == [] and conn.claims == {}
    finally:
        store.close()
