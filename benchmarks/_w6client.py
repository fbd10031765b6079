"""One W6 client process (started 4 times by `.venv/bin/python -m benchmarks --only W6`).

    python -m benchmarks._w6client LOCATION TOPIC N CLIENT_ID

Connects with ``pipeproc.connect(LOCATION)``, makes warmup commits (untimed, to a separate
topic), prints ``ready``, waits for ``go`` on stdin (the common start barrier), commits N
single logs to TOPIC and prints one JSON line: start/end (time.monotonic, a system-wide
clock on Linux) and the median commit latency.
"""

from __future__ import annotations

import sys


def main() -> None:
    import pipeproc
    from benchmarks._common import w6_client_run

    location, topic, n, cid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pp = pipeproc.connect(location, timeout=30)
    try:
        w6_client_run(lambda t, b: pp.commit({"topic": t, "body": b}), topic, n, cid)
    finally:
        pp.close()


if __name__ == "__main__":
    main()
