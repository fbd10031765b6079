"""Embed a pipeproc node in an application.

A system proc, run by the node's worker process, squares every number committed to the
``numbers`` topic into ``squares``; the application follows ``squares`` with a live proc and
reacts to each result as it is committed.

Run (from the repository root; any working directory works):

    python examples/embedded_app.py              # 100 numbers in a temporary store
    python examples/embedded_app.py --count 5000 --location ./embedded_data
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import pipeproc


def square(log):
    """The processor: runs in a worker process, once per log of ``numbers``.

    Returning a body commits it to the system proc's ``to`` topic, atomically with the ack.
    """
    n = log.body["n"]
    return {"n": n, "square": n * n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="numbers to commit (default 100)")
    parser.add_argument("--location", help="store directory (default: a temporary one)")
    args = parser.parse_args()
    location = args.location or tempfile.mkdtemp(prefix="pipeproc-embedded-")

    try:
        # spawn() starts the node (and its worker) as separate processes; `with` shuts them down
        with pipeproc.spawn(location, workers=1) as pp:
            # idempotent: on a rerun over the same store this returns the existing system proc
            pp.system_proc(name="squarer", from_="numbers", processor=square, to="squares")

            # follow the results; "live" = only squares committed from now on
            live = pp.live_proc("squares", mode="live")
            try:
                started = time.monotonic()
                pp.commit([{"topic": "numbers", "body": {"n": i}} for i in range(args.count)])
                total = seen = 0
                for log in live:  # blocks until the worker commits a square
                    total += log.body["square"]
                    seen += 1
                    if seen <= 3 or seen == args.count:
                        print(f"{log.id}  {log.body['n']}^2 = {log.body['square']}")
                    elif seen == 4:
                        print("...")
                    live.ack()  # acks are explicit
                    if seen == args.count:
                        break
            finally:
                live.cancel()  # stops delivery and destroys the hidden proc

            expected = sum(i * i for i in range(args.count))
            assert total == expected, (total, expected)
            print(f"{seen} squares, sum {total}, in {time.monotonic() - started:.2f} s")
            print(f"squares topic length: {pp.length('squares')}")
    finally:
        if not args.location:
            shutil.rmtree(location, ignore_errors=True)


if __name__ == "__main__":
    main()
