"""One client process of the 8-client load test (``tests/stress/test_load.py``).

    python tests/stress/load_client.py CONFIG_JSON

CONFIG_JSON is ``{"address", "authkey" (hex), "role", "index", "duration", "topics",
"procs", "seed", "out"}``. The process connects with ``pipeproc.connect(address=...,
authkey=...)``, prints ``ready``, waits for ``go`` on stdin (the common start barrier), runs
its role for ``duration`` seconds, writes what it did to ``out`` (JSON) and prints ``done``.

Roles:

* ``writer``: single commits and atomic batches across the topics; reports every id it got
  back with the body's key ``k`` (the body is ``body_for(index, k)``), and checks what it
  can see itself (a batch shares one ms; a topic's logs inside one batch get consecutive
  sequences; its own commits to a topic get increasing sequences; the node clock never goes
  back between its calls).
* ``reader``: ``length`` / ``range`` by ``:seq``, by id and by timestamp / ``revrange`` /
  ``iter_range`` on random topics, checking contiguity, order, monotonic lengths and bodies.
* ``consumer``: ``proc`` + ``ack`` (count 1 and count > 1) and ``proc`` + ``ack_commit``
  on procs shared with the other consumers, always with ``claimed=``; sometimes
  ``reclaim`` instead of ack (those logs must come back); reports every acked claim.

Violations are recorded (not raised) so the test sees all of them; unexpected exceptions
are recorded with their code. Also importable: :func:`sys_derive` is the processor of the
test's system proc.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback

# Error codes a role may meet under this load without anything being wrong.
EXPECTED = {
    # a claim outlived its reclaim_timeout under load and was re-issued: ack fails, the
    # logs are delivered again (at-least-once); never seen with the 60 s timeout used here
    "consumer": {"stale_claim"},
    "writer": set(),
    "reader": set(),
}


def body_for(w: int, k: int) -> dict:
    """The body writer ``w`` commits as its ``k``-th log (sizes vary with ``k``)."""
    return {"w": w, "k": k, "pad": "x" * (k % 61)}


def sys_derive(logs):
    """System proc processor (``count > 1``): one derived log per source log, naming it."""
    return [{"src": lg.id, "w": lg.body["w"], "k": lg.body["k"]} for lg in logs]


def _seq(log_id: str) -> int:
    return int(log_id.split("-")[1])


def _ms(log_id: str) -> int:
    return int(log_id.split("-")[0])


class Run:
    def __init__(self, cfg: dict) -> None:
        import pipeproc
        self.cfg = cfg
        self.rng = random.Random(cfg["seed"])
        self.pp = pipeproc.connect(address=cfg["address"], authkey=bytes.fromhex(cfg["authkey"]),
                                   timeout=30)
        self.errors: list = []          # unexpected: [code or type, message]
        self.expected: dict = {}        # code -> count
        self.violations: list = []      # failed checks (strings)
        self.ops: dict = {}             # op name -> count
        self.out: dict = {}

    def op(self, name: str, n: int = 1) -> None:
        self.ops[name] = self.ops.get(name, 0) + n

    def bad(self, msg: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(msg)

    def error(self, exc: BaseException) -> None:
        from pipeproc import PipeProcError
        code = exc.code if isinstance(exc, PipeProcError) else type(exc).__name__
        if code in EXPECTED[self.cfg["role"]]:
            self.expected[code] = self.expected.get(code, 0) + 1
        elif len(self.errors) < 200:
            self.errors.append([code, str(exc)[:300], traceback.format_exc()[-800:]])

    # ------------------------------------------------------------------ writer

    def writer(self, deadline: float) -> None:
        pp, rng, w = self.pp, self.rng, self.cfg["index"]
        topics = self.cfg["topics"]
        logs = []                    # [k, topic, id]
        batches = []                 # list of [k...] committed together
        last_seq = {t: -1 for t in topics}
        last_ms = 0
        k = 0
        while time.monotonic() < deadline:
            try:
                if rng.random() < 0.5:
                    t = rng.choice(topics)
                    i = pp.commit({"topic": t, "body": body_for(w, k)})
                    self.op("commit single")
                    items = [(k, t, i)]
                    k += 1
                else:
                    n = rng.randint(2, 20)
                    ts = [rng.choice(topics) for _ in range(n)]
                    ids = pp.commit([{"topic": t, "body": body_for(w, k + j)}
                                     for j, t in enumerate(ts)])
                    self.op("commit batch")
                    self.op("logs in batches", n)
                    items = [(k + j, t, i) for j, (t, i) in enumerate(zip(ts, ids))]
                    k += n
                    if len({_ms(i) for i in ids}) != 1:
                        self.bad(f"batch ids do not share one ms: {ids}")
                    per: dict = {}
                    for _, t, i in items:
                        per.setdefault(t, []).append(_seq(i))
                    for t, seqs in per.items():
                        if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                            self.bad(f"batch logs of {t} not consecutive: {seqs}")
                    batches.append([it[0] for it in items])
            except Exception as exc:  # pragma: no cover - reported to the test
                self.error(exc)
                k += 100  # never reuse a k whose commit may or may not have happened
                continue
            for kk, t, i in items:
                s, m = _seq(i), _ms(i)
                if s <= last_seq[t]:
                    self.bad(f"{t}: seq {s} after my earlier {last_seq[t]}")
                last_seq[t] = s
                if m < last_ms:
                    self.bad(f"node clock went back: {m} < {last_ms}")
                last_ms = max(last_ms, m)
                logs.append([kk, t, i])
        self.out["logs"] = logs
        self.out["batches"] = batches

    # ------------------------------------------------------------------ reader

    def _check_body(self, t: str, log) -> None:
        b = log.body
        if not isinstance(b, dict) or set(b) != {"w", "k", "pad"} or b != body_for(b["w"], b["k"]):
            self.bad(f"{t} {log.id}: malformed body {b!r}")

    def _check_run(self, t: str, logs, first: int, step: int, what: str) -> bool:
        seqs = [_seq(lg.id) for lg in logs]
        want = list(range(first, first + step * len(seqs), step))
        if seqs != want:
            self.bad(f"{what} on {t}: seqs {seqs[:5]}... not {want[:5]}... (n={len(seqs)})")
            return False
        ms = [_ms(lg.id) for lg in logs]
        if ms != sorted(ms, reverse=step < 0):
            self.bad(f"{what} on {t}: ms out of order")
            return False
        for lg in logs:
            self._check_body(t, lg)
        return True

    def reader(self, deadline: float) -> None:
        pp, rng = self.pp, self.rng
        topics = self.cfg["topics"]
        known = {t: 0 for t in topics}
        seen_ids: dict = {t: [] for t in topics}
        while time.monotonic() < deadline:
            t = rng.choice(topics)
            r = rng.random()
            try:
                if r < 0.2:
                    n = pp.length(t)
                    self.op("length")
                    if n < known[t]:
                        self.bad(f"length({t}) went back: {n} < {known[t]}")
                    known[t] = max(known[t], n)
                elif r < 0.45 and known[t]:
                    s = rng.randrange(known[t])
                    lim = rng.randint(1, 500)
                    logs = pp.range(t, start=f":{s}", limit=lim)
                    self.op("range :seq")
                    want = min(lim, known[t] - s)
                    if not (want <= len(logs) <= lim):
                        self.bad(f"range({t}, :{s}, limit={lim}) gave {len(logs)}, known {known[t]}")
                    if self._check_run(t, logs, s, 1, "range :seq") and logs:
                        seen_ids[t].append(logs[-1].id)
                        known[t] = max(known[t], _seq(logs[-1].id) + 1)
                elif r < 0.6 and seen_ids[t]:
                    i = rng.choice(seen_ids[t][-50:])
                    lim = rng.randint(1, 500)
                    logs = pp.range(t, start=i, exclusive=True, limit=lim)
                    self.op("range by id")
                    self._check_run(t, logs, _seq(i) + 1, 1, "range by id")
                    if len(logs) < min(lim, known[t] - _seq(i) - 1):
                        self.bad(f"range({t}, {i}, exclusive) short: {len(logs)}")
                elif r < 0.7 and seen_ids[t]:
                    i = rng.choice(seen_ids[t][-50:])
                    ms = _ms(i)
                    logs = pp.range(t, start=str(ms), limit=200)
                    self.op("range by ms")
                    if logs:
                        self._check_run(t, logs, _seq(logs[0].id), 1, "range by ms")
                        if any(_ms(lg.id) < ms for lg in logs) or _seq(logs[0].id) > _seq(i):
                            self.bad(f"range({t}, start={ms}) starts at {logs[0].id}, had {i}")
                    else:
                        self.bad(f"range({t}, start={ms}) empty though {i} exists")
                elif r < 0.9:
                    lim = rng.randint(1, 300)
                    logs = pp.revrange(t, limit=lim)
                    self.op("revrange newest")
                    if logs:
                        top = _seq(logs[0].id)
                        if top + 1 < known[t]:
                            self.bad(f"revrange({t}) newest {top} below known length {known[t]}")
                        self._check_run(t, logs, top, -1, "revrange")
                        known[t] = max(known[t], top + 1)
                        if len(logs) < min(lim, top + 1):
                            self.bad(f"revrange({t}, limit={lim}) short: {len(logs)}")
                elif known[t]:
                    s = rng.randrange(known[t])
                    logs = list(pp.iter_range(t, start=f":{s}", limit=3000, page_size=250))
                    self.op("iter_range")
                    self._check_run(t, logs, s, 1, "iter_range")
                    if len(logs) < min(3000, known[t] - s):
                        self.bad(f"iter_range({t}, :{s}) short: {len(logs)}")
            except Exception as exc:
                self.error(exc)
        self.out["known_lengths"] = known

    # ------------------------------------------------------------------ consumer

    def consumer(self, deadline: float) -> None:
        pp, rng = self.pp, self.rng
        procs = self.cfg["procs"]   # [{"name", "topic", "count", "kind", "to"}]
        acks = []                   # [name, [ids...], [[w, k]...]]
        idle = 0
        while time.monotonic() < deadline:
            spec = rng.choice(procs)
            name, topic, count = spec["name"], spec["topic"], spec["count"]
            try:
                got = pp.proc(topic, name=name, count=count, max_reclaims=-1,
                              reclaim_timeout=60.0)
                self.op("proc")
            except Exception as exc:
                self.error(exc)
                continue
            if got is None:
                idle += 1
                if idle >= len(procs):  # nothing anywhere: yield the CPU a moment
                    time.sleep(0.002)
                    idle = 0
                continue
            idle = 0
            logs = got if isinstance(got, list) else [got]
            self.op("logs delivered", len(logs))
            seqs = [_seq(lg.id) for lg in logs]
            if seqs != list(range(seqs[0], seqs[0] + len(seqs))) or len(logs) > count:
                self.bad(f"{name}: claim not contiguous/too long: {seqs[:5]}... n={len(seqs)}")
            for lg in logs:
                self._check_body(topic, lg)
            try:
                if rng.random() < 0.02:
                    pp.reclaim(name, claimed=got)
                    self.op("reclaim")
                    continue
                if spec["kind"] == "ack_commit":
                    res = pp.ack_commit(name, [{"topic": spec["to"], "body": {"src": lg.id}}
                                               for lg in logs], claimed=got)
                    self.op("ack_commit")
                    if len(res.id) != len(logs):
                        self.bad(f"{name}: ack_commit returned {len(res.id)} ids")
                    acked = res.acked
                else:
                    acked = pp.ack(name, claimed=got)
                    self.op("ack")
                if acked != f"{logs[0].id}..{logs[-1].id}":
                    self.bad(f"{name}: acked {acked!r}, claimed {logs[0].id}..{logs[-1].id}")
                acks.append([name, [lg.id for lg in logs],
                             [[lg.body["w"], lg.body["k"]] for lg in logs]])
            except Exception as exc:
                self.error(exc)
        self.out["acks"] = acks


def main() -> None:
    cfg = json.loads(sys.argv[1])
    run = Run(cfg)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        return
    t0 = time.monotonic()
    try:
        getattr(run, cfg["role"])(t0 + cfg["duration"])
    except Exception as exc:  # a crash of the role itself: reported, the file still written
        run.errors.append(["crash", repr(exc), traceback.format_exc()[-2000:]])
    run.out.update(role=cfg["role"], index=cfg["index"], pid=os.getpid(),
                   elapsed=time.monotonic() - t0, ops=run.ops, errors=run.errors,
                   expected=run.expected, violations=run.violations)
    tmp = cfg["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(run.out, f)
    os.replace(tmp, cfg["out"])
    run.pp.close()
    sys.stdout.write("done\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
