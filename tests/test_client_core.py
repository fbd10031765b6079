"""The twin clients over one core (issue 15, client side): one docstring per operation for
both clients, the busy_poll keyword, and the client side importing no node-side module."""

from __future__ import annotations

import ast
import asyncio
import inspect
import os

import pytest

import pipeproc
import pipeproc.aio as aio
from pipeproc.errors import InvalidArgument

PKG = os.path.dirname(pipeproc.__file__)
CLIENT_SIDE = ["_client", "aio", "_aio_conn", "_aio_live", "_live", "_calls", "_docs", "_spawn",
               "_processors", "_workers", "cli", "_cli_commands", "_demo", "_text"]
NODE_SIDE = {"_node", "_store", "_layout", "_txn", "_supervisor", "_check", "_damage", "_conn",
             "_handlers", "_syshandlers", "_writer", "_waits", "_gc"}


def _public(cls):
    return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}


def test_both_clients_have_the_same_methods_signatures_and_docstrings():
    for sync_cls, async_cls in [(pipeproc.PipeProc, aio.AsyncPipeProc),
                                (pipeproc.LiveProc, aio.AsyncLiveProc)]:
        names = _public(sync_cls)
        assert names <= _public(async_cls) | {"changes"}, names - _public(async_cls)
        for name in names:
            s, a = getattr(sync_cls, name), getattr(async_cls, name)
            params = [inspect.signature(f).parameters for f in (s, a)]
            assert params[0] == params[1] or name == "changes", name  # results: a coroutine
            assert s.__doc__ and s.__doc__.strip(), name
            if name not in ("changes", "cancel"):
                assert s.__doc__ == a.__doc__, name
    for fn in (pipeproc.spawn, pipeproc.connect, aio.spawn, aio.connect):
        assert "busy_poll:" in fn.__doc__ and "Raises:" in fn.__doc__


def test_busy_poll_is_a_checked_keyword(tmp_path):
    for bad in (-1e-6, 0.5, float("nan"), True, "50"):
        with pytest.raises(InvalidArgument, match="busy_poll"):
            pipeproc.spawn(tmp_path / "n", workers=0, busy_poll=bad)
        with pytest.raises(InvalidArgument, match="busy_poll"):
            pipeproc.connect(tmp_path / "n", busy_poll=bad)
        with pytest.raises(InvalidArgument, match="busy_poll"):
            asyncio.run(aio.connect(tmp_path / "n", busy_poll=bad))
    assert not (tmp_path / "n").exists()  # refused before anything was started


def test_busy_poll_reaches_the_client_channels(tmp_path):
    pp = pipeproc.spawn(tmp_path / "n", workers=0, durability="fast", busy_poll=0)
    try:
        pp.commit({"topic": "t", "body": {"n": 1}})
        assert pp._idle and all(c.spin == 0 for c in pp._idle)
        other = pipeproc.connect(tmp_path / "n", busy_poll=20e-6)
        try:
            assert other.length("t") == 1
            assert [c.spin for c in other._idle] == [20e-6]
        finally:
            other.close()
    finally:
        pp.shutdown()


def _imports(module: str) -> set:
    with open(os.path.join(PKG, module + ".py")) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module.split(".")[0]] if node.module else
                       [a.name for a in node.names])
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names]):
                parts = name.split(".")
                if parts[0] == "pipeproc" and len(parts) > 1:
                    out.add(parts[1])
    return out


def test_client_side_imports_no_node_side_module():
    for module in CLIENT_SIDE:
        assert not _imports(module) & NODE_SIDE, module
