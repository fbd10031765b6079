"""One W6 client process (started 4 times by `.venv/bin/python -m benchmarks --only W6`).

    python -m benchmarks._w6client LOCATION TOPIC N CLIENT_ID

Connects with ``pipeproc.connect(LOCATION)``, makes warmup commits (untimed, to a separate
topic), prints ``ready``, waits for ``go`` on stdin (the common start barrier), commits N
single logs to TOPIC and prints one JSON line: start/end (time.monotonic, a system-wide
clock on Linux) and the median commit latency.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import pipeproc
    from benchmarks._common import body, median

    location, topic, n, cid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pp = pipeproc.connect(location, timeout=30)
    try:
        for i in range(50):
            pp.commit({"topic": "w6warm", "body": body(i)})
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        if sys.stdin.readline().strip() != "go":
            return
        commit = pp.commit
        lat = []
        base = cid * n
        start = time.monotonic()
        for i in range(n):
            t = time.perf_counter()
            commit({"topic": topic, "body": body(base + i)})
            lat.append(time.perf_counter() - t)
        end = time.monotonic()
        sys.stdout.write(json.dumps({"start": start, "end": end, "median": median(lat)}) + "\n")
        sys.stdout.flush()
    finally:
        pp.close()


if __name__ == "__main__":
    main()
