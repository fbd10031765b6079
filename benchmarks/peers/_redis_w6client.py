"""One W6 client process for the Redis peer (started 4 times by
`.venv/bin/python -m benchmarks.peers.redis_streams`).

    python -m benchmarks.peers._redis_w6client SOCKET STREAM N CLIENT_ID

Connects to the Redis Unix socket SOCKET, makes 50 warmup XADDs (untimed, to a separate
stream), prints ``ready``, waits for ``go`` on stdin (the common start barrier), XADDs N single
entries (msgpack body in one field) to STREAM, one round trip each, and prints one JSON line:
start/end (time.monotonic, a system-wide clock on Linux) and the median XADD latency.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from benchmarks._common import body, median
    from benchmarks.peers.redis_streams import Resp, xadd

    sock, stream, n, cid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with Resp(sock) as r:
        for i in range(50):
            r.call(*xadd("w6warm", body(i)))
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        if sys.stdin.readline().strip() != "go":
            return
        call = r.call
        lat = []
        base = cid * n
        start = time.monotonic()
        for i in range(n):
            t = time.perf_counter()
            call(*xadd(stream, body(base + i)))
            lat.append(time.perf_counter() - t)
        end = time.monotonic()
        sys.stdout.write(json.dumps({"start": start, "end": end, "median": median(lat)}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
