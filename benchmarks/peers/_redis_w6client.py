"""One W6 client process for the Redis peer (started 4 times by
`.venv/bin/python -m benchmarks.peers.redis_streams`).

    python -m benchmarks.peers._redis_w6client SOCKET STREAM N CLIENT_ID

Connects to the Redis Unix socket SOCKET, makes 50 warmup XADDs (untimed, to a separate
stream), prints ``ready``, waits for ``go`` on stdin (the common start barrier), XADDs N single
entries (msgpack body in one field) to STREAM, one round trip each, and prints one JSON line:
start/end (time.monotonic, a system-wide clock on Linux) and the median XADD latency.
"""

from __future__ import annotations

import sys


def main() -> None:
    from benchmarks._common import w6_client_run
    from benchmarks.peers.redis_streams import Resp, xadd

    sock, stream, n, cid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with Resp(sock) as r:
        w6_client_run(lambda s, b: r.call(*xadd(s, b)), stream, n, cid)


if __name__ == "__main__":
    main()
