"""A processor module loaded by file path (``"tests/procmods/byfile.py"`` → ``process``)."""


def process(log):
    return {"n": log.body["n"], "via": "process"}


def other(log):
    return {"n": log.body["n"], "via": "other"}
