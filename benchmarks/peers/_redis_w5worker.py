"""One W5 worker process for the Redis peer (started twice per repetition by
`.venv/bin/python -m benchmarks.peers.redis_streams`), the counterpart of a pipeproc node
worker running the system proc ``benchmarks.processors:incr`` / ``incr_batch``.

    python -m benchmarks.peers._redis_w5worker SOCKET SRC DST GROUP CONSUMER COUNT

Connects to the Redis Unix socket SOCKET, warms up (untimed: round trips and one empty
transaction), prints ``ready`` and waits for ``go`` on stdin. Then, until the consumer group
GROUP has nothing new on SRC: ``XREADGROUP GROUP GROUP CONSUMER COUNT COUNT STREAMS SRC >``,
and for what it read, in one ``MULTI``/``EXEC`` sent as one write: an ``XADD DST`` of
``{"n": body["i"] + 1}`` per entry and one ``XACK SRC GROUP <ids>``. Prints one JSON line:
how many entries it processed, in how many reads, and its start/end (time.monotonic).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from benchmarks.peers.redis_streams import Resp, readgroup, xadd

    sock, src, dst, group, consumer, count = sys.argv[1:7]
    count_n = int(count)
    with Resp(sock) as r:
        for _ in range(50):
            r.call(b"PING")
        r.transaction([(b"PING",)])
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        if sys.stdin.readline().strip() != "go":
            return
        processed = reads = 0
        start = time.monotonic()
        while True:
            got = readgroup(r, src, group, consumer, count_n)
            if got is None:
                break
            cmds = [xadd(dst, {"n": b["i"] + 1}) for _, b in got]
            cmds.append((b"XACK", src, group, *[eid for eid, _ in got]))
            r.transaction(cmds)
            processed += len(got)
            reads += 1
        end = time.monotonic()
        sys.stdout.write(json.dumps({"processed": processed, "reads": reads,
                                     "start": start, "end": end}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
