"""pipeproc benchmark suite (workloads W1–W6 of /work/shared/BENCHMARKS.md).

Run from the repository root (/work/main):

    .venv/bin/python -m benchmarks                  # full run (~1-2 min on 2 cores)
    .venv/bin/python -m benchmarks --quick          # ~10x smaller smoke run
    .venv/bin/python -m benchmarks --json out.json --only W1,W3

Other scripts:

    .venv/bin/python -m benchmarks.latency [--quick]    # live-proc latency, idle CPU
    .venv/bin/python -m benchmarks.scale [--big]        # cost vs topic size
    .venv/bin/python -m benchmarks.stages [--stages 20] # W5 count=1 beside drained stages

Every node and every scratch store lives in a fresh directory under /tmp and is removed at
the end; nodes are always shut down (try/finally).
"""
