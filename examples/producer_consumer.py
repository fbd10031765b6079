"""Several processes, one node: a producer process and a consumer process.

The parent process spawns the node; a producer and a consumer, started as independent
programs, attach to it with ``pipeproc.connect(location)``. The consumer reads with a named
proc (``billing``): a durable cursor kept by the node, so a consumer that crashes and starts
again continues where its last ack left off, and a claim it never acked is delivered again.

Run:

    python examples/producer_consumer.py             # 200 orders in a temporary store
    python examples/producer_consumer.py --count 5000

Each role can also be run by hand against a running node (``pipeproc node``)::

    python examples/producer_consumer.py producer --location ./pipeproc_data --count 100
    python examples/producer_consumer.py consumer --location ./pipeproc_data --count 100
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pipeproc


def producer(location: str, count: int) -> None:
    """Commit ``count`` orders in small atomic batches."""
    with pipeproc.connect(location) as pp:  # a connecting client: `with` only disconnects
        for start in range(0, count, 10):
            batch = [{"topic": "orders", "body": {"order": i, "amount": (i * 7) % 100 + 1}}
                     for i in range(start, min(start + 10, count))]
            pp.commit(batch)
            time.sleep(0.005)  # a producer that trickles in
    print(f"producer {os.getpid()}: committed {count} orders", flush=True)


def consumer(location: str, count: int) -> None:
    """Bill orders with the ``billing`` proc until ``count`` orders are done."""
    done = total = 0
    idle = 0.001
    with pipeproc.connect(location) as pp:
        while done < count:
            claimed = pp.proc("orders", name="billing", count=50)
            if claimed is None:  # nothing new yet: back off a little
                time.sleep(idle)
                idle = min(idle * 2, 0.05)
                continue
            idle = 0.001
            invoices = [{"topic": "invoices",
                         "body": {"order": log.body["order"], "due": log.body["amount"]}}
                        for log in claimed]
            # ack the claim and commit the invoices in one atomic write; claimed= makes sure
            # we ack exactly what we were given (not a claim re-issued after a timeout)
            pp.ack_commit("billing", invoices, claimed=claimed)
            done += len(claimed)
            total += sum(log.body["amount"] for log in claimed)
    print(f"consumer {os.getpid()}: billed {done} orders, total {total}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", choices=("producer", "consumer"),
                        help="run one role against a running node (default: run everything)")
    parser.add_argument("--count", type=int, default=200, help="orders (default 200)")
    parser.add_argument("--location", help="store directory (default: a temporary one)")
    args = parser.parse_args()
    if args.role:
        location = args.location or "./pipeproc_data"
        (producer if args.role == "producer" else consumer)(location, args.count)
        return

    location = args.location or tempfile.mkdtemp(prefix="pipeproc-pc-")
    try:
        with pipeproc.spawn(location, workers=0) as pp:
            started = time.monotonic()
            me = [sys.executable, os.path.abspath(__file__)]
            opts = ["--location", location, "--count", str(args.count)]
            children = [subprocess.Popen(me + ["consumer"] + opts),
                        subprocess.Popen(me + ["producer"] + opts)]
            try:
                codes = [c.wait(timeout=120) for c in children]
            finally:
                for c in children:
                    if c.poll() is None:
                        c.kill()
                        c.wait()
            assert codes == [0, 0], codes
            state = pp.inspect_proc("billing")
            print(f"node: {pp.length('orders')} orders, {pp.length('invoices')} invoices, "
                  f"billing acked up to {state.last_acked_range.split('..')[-1]}, "
                  f"{time.monotonic() - started:.2f} s")
            assert pp.length("invoices") >= args.count
    finally:
        if not args.location:
            shutil.rmtree(location, ignore_errors=True)


if __name__ == "__main__":
    main()
