"""The package's layers, stated as data and checked over the source with ``ast``.

pipeproc has two sides that run in different processes: the **node** (it owns the store)
and the **clients** (applications, workers, the CLI). They meet only in a few shared
modules. This test fails when an import crosses a line: a client-side module importing a
node-side one or the reverse, a module of the pure core importing I/O, threads or a clock,
a package import hidden inside a function, or an import cycle.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set, Tuple

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeproc")

#: modules both sides may import
SHARED = {"errors", "_ids", "_records", "_protocol", "_platform"}
#: the pure core: no I/O, no threads, no clock (time arrives as an argument)
PURE = {"_ids", "_records", "_procs", "_gc"}
NODE = {"_node", "_conn", "_handlers", "_syshandlers", "_writer", "_waits", "_gc", "_store",
        "_supervisor", "_check", "_damage", "_procs", "_layout", "_txn", "_flows", "_flowops"}
CLIENT = {"__init__", "__main__", "_client", "aio", "_aio_conn", "_aio_live", "_live", "_calls",
          "_docs", "_spawn", "_processors", "_workers", "_text", "cli", "_cli_commands", "_demo",
          "demo_processors", "flow", "_cli_flow", "_demo_flow", "demo_flows", "_execute",
          # the Redis backend (SCALE.md): a transport of the clients, no node
          "_rlua", "_rscripts", "_rsupscripts", "_rbackend", "_rops", "_rclient", "_rworkers",
          "_cli_redis", "_rworker"}
#: what the pure core must not import (standard library modules that do I/O, run threads or
#: read a clock)
IMPURE = {"socket", "threading", "subprocess", "lmdb", "selectors", "multiprocessing",
          "time", "datetime", "asyncio", "signal", "os"}
#: modules allowed to import package modules inside functions (the CLI starts fast)
LAZY_OK = {"cli"}


def _modules() -> Dict[str, ast.Module]:
    out = {}
    for fn in sorted(os.listdir(PKG)):
        if fn.endswith(".py"):
            with open(os.path.join(PKG, fn), encoding="utf-8") as f:
                out[fn[:-3]] = ast.parse(f.read(), fn)
    return out


MODULES = _modules()


def _imports(tree: ast.Module) -> List[Tuple[str, bool, int]]:
    """(imported name, at module level, line): package modules by their short name, other
    modules by their top-level name."""
    found: List[Tuple[str, bool, int]] = []
    top = {id(n) for n in tree.body}
    # statements nested in if/try at module level still count as module level
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    top.add(id(sub))
    for node in ast.walk(tree):
        level = id(node) in top
        if isinstance(node, ast.Import):
            for a in node.names:
                name = a.name
                if name.startswith("pipeproc."):
                    found.append((name.split(".")[1], level, node.lineno))
                elif name != "pipeproc":
                    found.append((name.split(".")[0], level, node.lineno))
                else:
                    found.append(("__init__", level, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and not node.module.startswith("pipeproc"):
                found.append((node.module.split(".")[0], level, node.lineno))
                continue
            mod = node.module or ""
            if node.level == 0:
                mod = mod[len("pipeproc"):].lstrip(".")
            if mod:
                found.append((mod.split(".")[0], level, node.lineno))
            else:  # from . import x, y
                for a in node.names:
                    found.append((a.name, level, node.lineno))
    return found


def _package_edges() -> Dict[str, Set[str]]:
    return {m: {n for n, _, _ in _imports(t) if n in MODULES} - {m}
            for m, t in MODULES.items()}


def test_every_module_has_a_side():
    unknown = set(MODULES) - SHARED - NODE - CLIENT
    assert not unknown, f"modules with no layer (add them to SHARED, NODE or CLIENT): {unknown}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_import_crosses_sides(mod):
    if mod in SHARED:
        allowed = SHARED
    elif mod in NODE:
        allowed = NODE | SHARED
    else:
        allowed = CLIENT | SHARED
    bad = sorted(n for n in _package_edges()[mod] if n not in allowed)
    assert not bad, f"{mod} imports {bad}, outside what its layer may import"


@pytest.mark.parametrize("mod", sorted(PURE))
def test_the_pure_core_does_no_io_and_reads_no_clock(mod):
    bad = sorted({n for n, _, _ in _imports(MODULES[mod]) if n in IMPURE})
    assert not bad, f"{mod} is pure but imports {bad}"
    shared_ok = {m for m in _package_edges()[mod]} <= PURE | {"errors"}
    assert shared_ok, f"{mod} imports {_package_edges()[mod] - PURE - {'errors'}}"


@pytest.mark.parametrize("mod", sorted(set(MODULES) - LAZY_OK))
def test_no_package_import_inside_a_function(mod):
    lazy = [(n, line) for n, top, line in _imports(MODULES[mod]) if not top and n in MODULES]
    assert not lazy, f"{mod} imports package modules inside functions: {lazy}"


def test_no_import_cycle():
    edges = _package_edges()
    # only module-level imports make a cycle at import time; lazy ones (cli) cannot
    top_edges = {m: {n for n, top, _ in _imports(t) if top and n in MODULES} - {m}
                 for m, t in MODULES.items()}
    top_edges.pop("__init__", None)
    for m in top_edges:
        top_edges[m].discard("__init__")
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(top_edges.get(m, ())):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(n):
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(top_edges):
        if not state.get(m):
            visit(m)
    assert edges  # the graph was read


def test_no_module_is_a_whole_house():
    big = {}
    for fn in os.listdir(PKG):
        if fn.endswith(".py"):
            with open(os.path.join(PKG, fn), encoding="utf-8") as f:
                n = sum(1 for _ in f)
            if n > 620:
                big[fn] = n
    assert not big, f"modules over ~600 lines (split them by concern): {big}"


FLOW_PKG = os.path.join(PKG, "flow")


def _flow_modules() -> Dict[str, ast.Module]:
    out = {}
    for fn in sorted(os.listdir(FLOW_PKG)):
        if fn.endswith(".py"):
            with open(os.path.join(FLOW_PKG, fn), encoding="utf-8") as f:
                out[fn[:-3]] = ast.parse(f.read(), fn)
    return out


def _flow_imports(tree: ast.Module) -> List[Tuple[str, bool]]:
    """(imported module, at module level): ``..x`` is the package's ``x``, ``.y`` the flow
    package's ``flow.y``."""
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            mod = (node.module or "").split(".")[0]
            name = mod if node.level == 2 else f"flow.{mod}"
            found.append((name, id(node) in top))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            for n in names:
                if n.startswith("pipeproc."):
                    found.append((n.split(".")[1], id(node) in top))
    return found


@pytest.mark.parametrize("mod", sorted(_flow_modules()))
def test_the_flow_package_is_client_side(mod):
    """pipeproc.flow runs in applications and workers: it never imports the node's
    modules, imports package modules at module level only, and stays small."""
    tree = _flow_modules()[mod]
    bad = sorted(n for n, _ in _flow_imports(tree) if n in NODE)
    assert not bad, f"flow.{mod} imports node-side modules {bad}"
    lazy = sorted(n for n, top in _flow_imports(tree) if not top)
    assert not lazy, f"flow.{mod} imports {lazy} inside functions"
    with open(os.path.join(FLOW_PKG, mod + ".py"), encoding="utf-8") as f:
        assert sum(1 for _ in f) <= 620
