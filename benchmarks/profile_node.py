"""Where the node's time goes under single-log commits from 4 client processes (issue 17).

    .venv/bin/pip install py-spy          # not a dependency of pipeproc
    .venv/bin/python -m benchmarks.profile_node [--n 20000] [--durability fast]

Spawns a node, samples it with ``py-spy record -r 500 -f raw`` while 4 client processes
commit single logs, and prints the share of the samples of the node's threads per place:
epoll, the writer waiting, the recv and send syscall lines, Python, the LMDB commit. py-spy
samples wall-clock time: a thread descheduled inside a syscall counts on that line.
Skipped (with the reason) without py-spy.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pipeproc


def _recv_lines() -> tuple:
    """``_conn.py:N)`` of each ``recv_into`` call of the node's I/O loop."""
    import pipeproc._conn as conn
    with open(conn.__file__, encoding="utf-8") as f:
        return tuple(f"_conn.py:{i})" for i, line in enumerate(f, 1) if "sock.recv_into(" in line)


_RECV_LINE = _recv_lines()


def categorize(path: str) -> "collections.Counter[str]":
    cats: "collections.Counter[str]" = collections.Counter()
    for line in open(path, encoding="utf-8"):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        if ("lifeline" in stack or "accept" in stack or "Timers._run" in stack
                or ("IOLoop" not in stack and "Writer" not in stack)):
            continue  # threads that only wait: not the request path
        leaf = stack.split(";")[-1]
        if "select" in leaf:
            c = "epoll between requests"
        elif "IOLoop._readable" in leaf and leaf.endswith(_RECV_LINE):
            c = "the recv syscall line"
        elif "Conn.send" in leaf:
            c = "the send syscall line"
        elif "Condition.wait" in leaf:
            c = "the writer thread waiting"
        elif "_txn" in leaf and "commit" in leaf.lower():
            c = "the LMDB commit"
        else:
            c = "Python: decode, validate, handler, append, reply"
        cats[c] += int(n)
    return cats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="commits per client")
    ap.add_argument("--durability", default="fast", choices=("full", "fast"))
    args = ap.parse_args()
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("skipped: py-spy is not installed (pip install py-spy)")
        return
    tmp = tempfile.mkdtemp(prefix="pp-profile-")
    try:
        loc = os.path.join(tmp, "store")
        pp = pipeproc.spawn(loc, workers=0, durability=args.durability)
        out = os.path.join(tmp, "node.txt")
        rec = subprocess.Popen([spy, "record", "-p", str(pp._process.pid), "-o", out, "-f", "raw",
                                "-r", "500", "-d", "8"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        code = (f"import pipeproc\nc = pipeproc.connect({loc!r})\n"
                f"for k in range({args.n}): c.commit({{'topic': 't', 'body': {{'i': k}}}})\n")
        t0 = time.monotonic()
        clients = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
        for c in clients:
            c.wait()
        rate = 4 * args.n / (time.monotonic() - t0)
        rec.wait()
        pp.shutdown()
        cats = categorize(out)
        total = sum(cats.values()) or 1
        print(f"{rate:,.0f} commits/s ({args.durability}); node samples by place:")
        for c, n in cats.most_common():
            print(f"  {n / total * 100:5.1f} %  {c}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
