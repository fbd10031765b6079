"""Peer benchmarks: the workloads W1–W6 of /work/shared/BENCHMARKS.md run against other
systems on the same machine, so pipeproc's figures can be compared in the same hour.

Run from the repository root (/work/main):

    .venv/bin/python -m benchmarks.peers.redis_streams [--quick] [--json OUT] [--reps N]

Each peer is optional: when its server is not installed the script says so and exits 0.
"""
