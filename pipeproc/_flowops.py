"""The ops of workflow runs (``pipeproc.flow``): what clients ask of :class:`_flows.Flows`.

Owns :class:`FlowOps`: ``fstart`` (idempotent start), ``finfo``, ``fruns``, ``fhist``,
``fresult`` (parked until the run ends), ``fsignal``, ``fcancel``, ``fresume``, ``fdelete``
and ``frec`` (an attempt's records); each checks its arguments, then reads the run records
or submits a write to the writer.

Node side. May import: ``_flows``, ``_handlers`` (``write``), ``_conn``, ``_protocol``,
``errors``, msgpack and the standard library.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

from ._conn import Conn, Malformed
from ._flows import RESUMABLE, TERMINAL, Flows, info
from ._handlers import write
from ._protocol import PUSH, array_header, ok_reply, ok_reply_raw
from .errors import InvalidArgument, InvalidRun, InvalidState, Timeout


class FlowOps:
    """The op handlers of workflow runs, over the node's :class:`~pipeproc._flows.Flows`."""

    def __init__(self, flows: Flows) -> None:
        self.f = flows

    def op_start(self, conn: Conn, rid: int, *start: Any) -> None:
        """``fstart``: create a run unless its id exists: ``[info, created]``."""
        s = list(start)
        if len(s) != 9 or type(s[4]) is not int or s[4] < 1:
            raise Malformed("bad start")
        if not isinstance(s[5], (int, float)) or not math.isfinite(s[5]) or s[5] <= 0:
            raise InvalidArgument("lease must be a number of seconds > 0")

        def fn(tx: Any) -> list:
            self.f._check_start(tx, s)
            rec, created = self.f._start(tx, *s)
            return [s[0], created]

        def done(ok: bool, value: Any) -> None:
            if ok:
                conn.reply(rid, [self.f._info(value[0]), value[1]])
            else:
                conn.fail(rid, value)
        self.f.writer.submit(fn, done, conn.id)

    def op_info(self, conn: Conn, rid: int, run: Any) -> None:
        """``finfo``: a run's info, or ``None`` when no run has that id."""
        if type(run) is not str:
            raise Malformed("a run id is a str")
        conn.reply(rid, self.f._info(run))

    def op_runs(self, conn: Conn, rid: int, statuses: Any, wf: Any, limit: Any) -> None:
        """``fruns``: every run matching the filters, oldest first (the newest ``limit``)."""
        with self.f.lock:
            live = dict(self.f.live)
        keyed = []
        for r, rec in list(self.f.store.runs.items()):
            i = info(r, rec, live.get(r))
            if (statuses is None or i[2] in statuses) and (wf is None or rec["wf"] == wf):
                keyed.append(((i[4], rec.get("n", 0)), i))
        keyed.sort(key=lambda k: k[0])  # creation order
        out = [i for _, i in keyed]
        if limit is not None:
            out = out[-limit:] if limit > 0 else []
        conn.reply(rid, out)

    def op_history(self, conn: Conn, rid: int, run: Any) -> None:
        """``fhist``: the run's journal, stored records ``[ms, seq, event]``."""
        rec = self.f.store.runs.get(run) if type(run) is str else None
        if rec is None:
            raise InvalidRun(f"no run with id {run!r}")
        with self.f.store.reader() as r:
            meta = r.topic(rec["topic"])
            recs = [] if meta is None else r.records(meta, meta.first, meta.next - 1, 1 << 62,
                                                     False, 1 << 62)
        conn.send(ok_reply_raw(rid, array_header(len(recs)) + b"".join(recs)))

    def op_result(self, conn: Conn, rid: int, run: Any, timeout: Any) -> None:
        """``fresult``: once the run is terminal, ``[info, last event record]``; with
        ``timeout`` 0 at once (``[info, None]`` when not terminal)."""
        if type(run) is not str:
            raise Malformed("a run id is a str")
        if timeout is not None and (not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout < 0):
            raise InvalidArgument("timeout must be a number of seconds >= 0 or None")
        rec = self.f.store.runs.get(run)
        if rec is None:
            raise InvalidRun(f"no run with id {run!r}")
        if rec["status"] in TERMINAL or timeout == 0:
            self.f._send_result(conn, rid, run)
            return
        entry = (conn, rid, [False])
        conn.parked = True
        with self.f.lock:
            self.f.results.setdefault(run, []).append(entry)
        rec = self.f.store.runs.get(run)  # it may have ended meanwhile
        if rec is None or rec["status"] in TERMINAL:
            self.f._answer(run)
        if timeout is not None:
            def expire() -> None:
                with self.f.lock:
                    if entry[2][0]:
                        return
                    entry[2][0] = True
                conn.fail(rid, Timeout(f"run {run!r} did not end within {timeout:g} s"))
            self.f.timers.after(timeout, expire)

    def op_signal(self, conn: Conn, rid: int, run: Any, name: Any, payload: Any) -> None:
        """``fsignal``: record a signal for a run (``False``: dropped, the run ended)."""
        if type(run) is not str or type(name) is not str or type(payload) is not bytes:
            raise Malformed("fsignal takes run, name, payload")
        write(self.f.writer, conn, rid, lambda tx: self.f._signal(tx, run, name, payload))

    def op_cancel(self, conn: Conn, rid: int, run: Any) -> None:
        """``fcancel``: ``False`` when the run is already terminal."""
        def fn(tx: Any) -> bool:
            pushes.clear()  # a round run again starts over
            rec = tx.run(run)
            if rec is None:
                raise InvalidRun(f"no run with id {run!r}")
            if rec["status"] in TERMINAL:
                return False
            if run in self.f.live or rec["status"] == "running":
                new = dict(rec)
                new["cancel"] = True
                tx.put_run(run, new)
                att = self.f.live.get(run)
                if att is not None:  # told once the flag is durable (done, below)
                    pushes.append(ok_reply(PUSH, ["cancel", run, att.token]))
                    pushes.append(att.conn)
            else:
                self.f._set(tx, run, rec, "cancelled", None, wait=None, due=None)
            return True

        def done(ok: bool, value: Any) -> None:
            if not ok:
                conn.fail(rid, value)
                return
            conn.reply(rid, value)
            if pushes:  # the attempt stops at its next ctx call (FLOW.md §3)
                pushes[1].send(pushes[0])
        pushes: list = []
        self.f.writer.submit(fn, done, conn.id)

    def op_resume(self, conn: Conn, rid: int, run: Any) -> None:
        """``fresume``: a failed, aborted or cancelled run back to ``pending``."""
        def fn(tx: Any) -> None:
            rec = tx.run(run)
            if rec is None:
                raise InvalidRun(f"no run with id {run!r}")
            if rec["status"] not in RESUMABLE:
                raise InvalidState(f"run {run!r} is {rec['status']}: only a failed, aborted "
                                   "or cancelled run can be resumed")
            self.f._set(tx, run, rec, "pending", None, fails=0, cancel=False, due=None,
                        new=False, attempt=rec["attempt"] + 1)
        write(self.f.writer, conn, rid, fn)

    def op_delete(self, conn: Conn, rid: int, run: Any) -> None:
        """``fdelete``: a terminal run and its journal."""
        def fn(tx: Any) -> None:
            rec = tx.run(run)
            if rec is None:
                raise InvalidRun(f"no run with id {run!r}")
            if rec["status"] not in TERMINAL:
                raise InvalidState(f"run {run!r} is {rec['status']}: only a run that ended "
                                   "can be deleted")
            parent = tx.run(rec["parent"]) if rec["parent"] else None
            if parent is not None and parent["status"] not in TERMINAL:
                raise InvalidState(f"run {run!r} is a child of run {rec['parent']!r}, which "
                                   f"is {parent['status']}")
            tx.drop_topic(rec["topic"])
            tx.put_run(run, None)
        write(self.f.writer, conn, rid, fn)

    def op_record(self, conn: Conn, rid: int, msg: Any) -> None:
        """``frec``: an attempt's records (a step's result, buffered values, starts of
        children, signals it sends): ``"ok"``, ``"fenced"`` or ``"cancelled"``."""
        if type(msg) is not dict or msg.get("end") is not None:
            raise Malformed("frec takes a record map without an end")
        write(self.f.writer, conn, rid, lambda tx: self.f.apply(tx, conn, msg))

    def ops(self) -> Dict[str, Callable[..., None]]:
        """The op table's flow entries."""
        return {"fstart": self.op_start, "finfo": self.op_info, "fruns": self.op_runs,
                "fhist": self.op_history, "fresult": self.op_result, "fsignal": self.op_signal,
                "fcancel": self.op_cancel, "fresume": self.op_resume, "fdelete": self.op_delete,
                "frec": self.op_record}
