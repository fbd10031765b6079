"""Processor functions used by workload W5 (system procs run by the node's workers).

Not run directly; `.venv/bin/python -m benchmarks --only W5` uses them as
``benchmarks.processors:incr`` (``count=1``) and ``benchmarks.processors:incr_batch``
(``count=100``).
"""


def incr(log):
    return {"n": log.body["i"] + 1}


def incr_batch(logs):
    return [{"n": log.body["i"] + 1} for log in logs]
