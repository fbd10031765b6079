"""pipeproc from asyncio: ``pipeproc.aio`` has the same API as ``PipeProc``, with ``await``.

A producer task commits words concurrently; an ``async def`` processor (run by the node's
worker) shouts them into ``shouts`` in batches of 10; the application follows ``shouts`` with
an async live proc (``async for``).

Run:

    python examples/asyncio_app.py                   # 100 words in a temporary store
    python examples/asyncio_app.py --count 2000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time

import pipeproc.aio


async def shout(logs):
    """An async processor (count=10: it receives a list of logs, returns a list of bodies)."""
    await asyncio.sleep(0)  # a processor may await I/O
    return [{"i": log.body["i"], "word": log.body["word"].upper() + "!"} for log in logs]


async def produce(pp: "pipeproc.aio.AsyncPipeProc", count: int) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    # many commits in flight at once on one client: each is its own atomic write
    await asyncio.gather(*(pp.commit({"topic": "words", "body": {"i": i, "word": words[i % 5]}})
                           for i in range(count)))


async def main(count: int, location: str) -> None:
    async with await pipeproc.aio.spawn(location, workers=1) as pp:
        await pp.system_proc(name="shouter", from_="words", processor=shout, to="shouts",
                             count=10)
        live = await pp.live_proc("shouts", mode="all", count=20)
        started = time.monotonic()
        producer = asyncio.create_task(produce(pp, count))
        seen = set()
        try:
            async for logs in live:  # a list of up to 20 logs per delivery
                for log in logs:
                    seen.add(log.body["i"])
                    if log.body["i"] < 3:
                        print(f"{log.id}  {log.body['word']}")
                await live.ack()
                if len(seen) >= count:
                    break
        finally:
            await live.cancel()
        await producer
        await pp.wait_for_procs(timeout=30)
        assert seen == set(range(count)), len(seen)
        print(f"{len(seen)} shouts in {time.monotonic() - started:.2f} s; "
              f"shouts topic length {await pp.length('shouts')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="words (default 100)")
    parser.add_argument("--location", help="store directory (default: a temporary one)")
    args = parser.parse_args()
    loc = args.location or tempfile.mkdtemp(prefix="pipeproc-aio-")
    try:
        asyncio.run(main(args.count, loc))
    finally:
        if not args.location:
            shutil.rmtree(loc, ignore_errors=True)
