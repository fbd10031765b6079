"""Child driver of the "client killed mid-request" case of test_crash_matrix.py.

Usage: crash_client.py LOCATION PROGRESS CLIENT_ID SEED RECLAIM_TIMEOUT

Connects to the node on LOCATION and loops forever over random requests, appending one line
to PROGRESS after each one returned (a single ``os.write``: a line is whole or absent):

* ``C <k> <id,...>``: a batch commit of 1-4 logs to ``cin`` (bodies ``{"c", "k", "i", "n"}``);
* ``L <id,...>``: ``proc("cin", name="cshared")`` returned this claim (about to process it);
* ``A <src id,...> <out id,...>``: ``ack_commit`` of that claim into ``cout`` returned;
* ``S <src id,...>``: that ack_commit was refused (``stale_claim``/``invalid_ack``: the claim
  timed out);
* ``R <n>``: a read of ``cin`` returned ``n`` logs;
* ``W``: a ``wait_for_procs`` (parked in the node) returned or timed out.

Half of the clients also follow ``cping`` with a live proc (acking on a background thread),
whose hidden proc the node must destroy when the client dies.

The test SIGKILLs it at random points, possibly while it holds a claim.
"""

import os
import random
import sys
import time

import pipeproc

location, progress, cid, seed, rto = sys.argv[1:6]
cid, rto = int(cid), float(rto)
rng = random.Random(seed)
fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
pp = pipeproc.connect(location, timeout=10)


def out(line: str) -> None:
    os.write(fd, (line + "\n").encode())


if rng.random() < 0.5:
    pp.live_proc("cping", mode="all").changes(lambda live, logs: live.ack())

k = 0
while True:
    r = rng.random()
    if r < 0.4:
        n = rng.randint(1, 4)
        ids = pp.commit([{"topic": "cin", "body": {"c": cid, "k": k, "i": i, "n": n,
                                                    "pad": "x" * rng.randint(0, 300)}}
                         for i in range(n)])
        out(f"C {k} {','.join(ids)}")
        k += 1
    elif r < 0.9:
        got = pp.proc("cin", name="cshared", count=rng.randint(1, 3), reclaim_timeout=rto,
                      max_reclaims=-1)
        if not got:
            time.sleep(0.002)
            continue
        if isinstance(got, pipeproc.Log):  # count == 1
            got = [got]
        srcs = ",".join(lg.id for lg in got)
        out(f"L {srcs}")
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.02)  # "processing"
        try:
            res = pp.ack_commit("cshared", [{"topic": "cout", "body": {"src": lg.id, "c": cid}}
                                            for lg in got], claimed=got)
        except (pipeproc.StaleClaim, pipeproc.InvalidAck):  # timed out meanwhile
            out(f"S {srcs}")
            continue
        out(f"A {srcs} {','.join(res.id)}")
    elif r < 0.95:
        try:
            pp.wait_for_procs(["cshared"], timeout=rng.random() * 0.05)
        except pipeproc.Timeout:
            pass
        out("W")
    else:
        logs = pp.revrange("cin", limit=rng.randint(1, 200)) if "cin" in pp.topics() else []
        out(f"R {len(logs)}")
