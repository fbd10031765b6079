"""Shared fixtures: every node a test starts is shut down in a ``finally``."""

from __future__ import annotations

import os
import sys

import pytest

import pipeproc

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # tests/ helper modules (processors for system procs) importable
    sys.path.insert(0, HERE)


def _spawn(location, **kw):
    kw.setdefault("workers", 0)
    return pipeproc.spawn(location, **kw)


@pytest.fixture
def node(tmp_path):
    """A disk node with no workers on a fresh location."""
    pp = _spawn(tmp_path / "store")
    try:
        yield pp
    finally:
        pp.shutdown()


@pytest.fixture
def mem_node(tmp_path):
    """A memory node with no workers."""
    pp = _spawn(tmp_path / "mem", memory=True)
    try:
        yield pp
    finally:
        pp.shutdown()


@pytest.fixture(params=["disk", "memory"])
def any_node(request, tmp_path):
    """The same test on a disk node and on a memory node."""
    pp = _spawn(tmp_path / "store", memory=request.param == "memory")
    try:
        yield pp
    finally:
        pp.shutdown()


@pytest.fixture
def spawner(tmp_path):
    """A factory of nodes (any options) that shuts down whatever it started."""
    started = []

    def make(location=None, **kw):
        pp = _spawn(location if location is not None else tmp_path / "store", **kw)
        started.append(pp)
        return pp

    try:
        yield make
    finally:
        for pp in reversed(started):
            try:
                pp.shutdown()
            except Exception:
                pass
