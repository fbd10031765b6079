"""Live procs (placeholder until the live-proc module lands)."""
class LiveProc:  # replaced below in this session
    pass
