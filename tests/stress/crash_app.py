"""Child driver of the "spawning app killed" case of test_crash_matrix.py.

Usage: crash_app.py LOCATION PROGRESS START_BATCH WORKERS DURABILITY

Spawns a node on LOCATION, writes ``node <pid> <worker pids...>`` to PROGRESS, then commits
batches (numbered from START_BATCH, 6 logs over topics ``a``, ``b``, ``c``) forever, appending
``<batch> <id,id,...>`` to PROGRESS after each commit returned. The test SIGKILLs it.
"""

import os
import sys

import pipeproc

location, progress, n, workers, durability = sys.argv[1:6]
n, workers = int(n), int(workers)
fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
pp = pipeproc.spawn(location, workers=workers, durability=durability)
st = pp.stats()
pids = [st["node"]["pid"]] + [w["pid"] for w in st["workers"]]
os.write(fd, ("node " + " ".join(map(str, pids)) + "\n").encode())
TOPICS = ("a", "b", "c")
while True:
    ids = pp.commit([{"topic": TOPICS[i % 3], "body": {"batch": n, "i": i}} for i in range(6)])
    os.write(fd, f"{n} {','.join(ids)}\n".encode())  # one write: a line is whole or absent
    n += 1
