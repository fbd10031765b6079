"""Processor references and loading (SPEC §6): what ``system_proc`` sends, what workers run.

A processor is referenced by a string the workers can import:

* ``"package.module:function"`` (a module-level function; dotted names allowed after ``:``);
* ``"/abs/path/file.py"`` (function ``process``) or ``"/abs/path/file.py:function"``;
* ``"script:/abs/path/app.py:function"``: a function of the application's own main script,
  loaded by workers as the module ``__mp_main__`` (see :func:`script_problem`).

:func:`processor_ref` turns what a user passes to ``system_proc`` into such a string and
checks, in the caller's process, that it can be loaded (``invalid_processor`` otherwise);
:func:`load` imports it in a worker (cached per process).

Client side: imports only ``errors`` (never a node-side module).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import symtable
import sys
import threading
import types
from typing import Any, Callable, Dict, Optional

from .errors import InvalidProcessor


SCRIPT = "script:"


def _split(ref: str) -> tuple:
    if ref.startswith(SCRIPT):
        path, _, func = ref[len(SCRIPT):].rpartition(":")
        return "script", path, func
    path, sep, func = ref.rpartition(":")
    if sep and path.endswith(".py"):
        return "file", path, func
    if ref.endswith(".py"):
        return "file", ref, "process"
    if not sep:
        raise InvalidProcessor(
            f"processor {ref!r} is neither 'package.module:function' nor a path to a .py file"
        )
    return "module", path, func


def processor_ref(processor: Any) -> str:
    """The import string of ``processor``, checked to be loadable.

    Raises:
        InvalidProcessor: a lambda, a closure, a method, or a missing module, file or function.
    """
    if callable(processor) and not isinstance(processor, str):
        qual = getattr(processor, "__qualname__", "")
        module = getattr(processor, "__module__", None)
        if not inspect.isfunction(processor) or "<" in qual or "." in qual or module is None:
            raise InvalidProcessor(
                f"processor {processor!r} is not a module-level function (lambdas, closures "
                "and methods cannot be imported by workers)"
            )
        if module in ("__main__", MAIN_MODULE):
            main = sys.modules.get(module)
            file = getattr(main, "__file__", None)
            if not file or not os.path.isfile(file):  # python -c, python - <<EOF, a REPL
                raise InvalidProcessor(
                    f"processor {qual!r} is defined in an interactive session (or a script read "
                    "from stdin or -c), which workers cannot import: define it in a module "
                    "(a .py file) and pass it from there, or as 'module:function'"
                )
            # the application's own script: loaded by workers as __mp_main__ (see _load_script)
            ref = f"{SCRIPT}{os.path.abspath(file)}:{qual}"
        else:
            ref = f"{module}:{qual}"
    elif isinstance(processor, str):
        ref = processor
    else:
        raise InvalidProcessor(f"a processor is a function or an import string, got {processor!r}")
    kind, path, func = _split(ref)
    if kind == "file":
        path = os.path.abspath(path)
        ref = f"{path}:{func}"
        _check_file(path, func)
        load(ref)  # what workers could not import is refused now, not at the first log
    elif kind == "script":
        _check_file(path, func)
        problem = script_problem(path)
        if problem is not None:
            raise InvalidProcessor(f"processor {func!r} of {path}: {problem}")
    else:
        load(ref)
    return ref


MAIN_MODULE = "__mp_main__"

_IMPORT_SAFE = (
    "move the processor into a module of its own (pass it from there, or as "
    "'module:function'), or put the script's work under `if __name__ == \"__main__\":`"
)


def _safe_statement(node: ast.stmt) -> bool:
    """Top-level statements of an unguarded application script that workers execute:
    imports, function and class definitions, and assignments that call nothing."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.ClassDef)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        return node.value is not None and not any(
            isinstance(n, (ast.Call, ast.Await)) for n in ast.walk(node.value))
    return False


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either operand order)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    t = node.test
    if len(t.ops) != 1 or not isinstance(t.ops[0], ast.Eq):
        return False
    sides = [t.left, t.comparators[0]]
    return (any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides)
            and any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides))


def _bound_names(node: ast.AST) -> set:
    """Module-level names a top-level statement binds (not looking into function bodies)."""
    out: set = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
            todo.extend(n.decorator_list)
            continue
        if isinstance(n, ast.Lambda):
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
        todo.extend(ast.iter_child_nodes(n))
    return out


def _used_globals(tree: ast.Module, path: str) -> set:
    """Global names the statements of ``tree`` read (at module level or in its functions)."""
    out: set = set()
    top = symtable.symtable(ast.unparse(tree), path, "exec")
    todo = [top]
    while todo:
        table = todo.pop()
        for sym in table.get_symbols():
            if table is top:
                if sym.is_referenced():
                    out.add(sym.get_name())
            elif sym.is_global() and (sym.is_referenced() or sym.is_declared_global()):
                out.add(sym.get_name())
        todo.extend(table.get_children())
    return out


def _pipeproc_starts(stmts: list) -> list:
    """Lines of calls to pipeproc's ``spawn``/``connect`` in ``stmts`` (outside functions)."""
    mods: set[str] = set()
    funcs: set[str] = set()
    for n in stmts:
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.name == "pipeproc" or a.name.startswith("pipeproc."):
                    mods.add(a.asname or "pipeproc")
        elif isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "pipeproc":
            for a in n.names:
                (funcs if a.name in ("spawn", "connect") else mods).add(a.asname or a.name)
    lines = []
    todo: list = list(stmts)
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Name) and f.id in funcs:
                lines.append(n.lineno)
            elif isinstance(f, ast.Attribute) and f.attr in ("spawn", "connect"):
                root = f.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in mods:
                    lines.append(n.lineno)
        todo.extend(ast.iter_child_nodes(n))
    return sorted(lines)


def script_problem(path: str) -> Optional[str]:
    """Why workers cannot load the application script ``path``, or ``None``.

    The rule (README "System procs and workers"): workers load the script as the module
    ``__mp_main__``, as ``multiprocessing``'s spawn does, so its
    ``if __name__ == "__main__":`` block does not run.

    * A script with that guard is run whole; it is refused when a statement outside the
      guard calls pipeproc's ``spawn()`` or ``connect()`` (every worker would run it).
    * A script without the guard is not run whole: workers run only its imports, ``def``,
      ``class`` and assignments that call nothing, and the script is refused when those use
      a name that another top-level statement sets (such as ``CFG = load()``), which workers
      would not have or would see with another value.
    """
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read the script: {exc}"
    if any(_is_main_guard(n) for n in tree.body):
        lines = _pipeproc_starts([n for n in tree.body if not _is_main_guard(n)])
        if lines:
            return (f"the script calls pipeproc's spawn()/connect() outside its "
                    f"`if __name__ == \"__main__\":` block (line {lines[0]}), and workers load "
                    f"the whole script except that block: {_IMPORT_SAFE}")
        return None
    kept = [n for n in tree.body if _safe_statement(n)]
    skipped = [n for n in tree.body if not _safe_statement(n)]
    set_by_skipped: Dict[str, int] = {}
    for n in skipped:
        for name in _bound_names(n):
            set_by_skipped.setdefault(name, n.lineno)
    if not set_by_skipped:
        return None
    used = _used_globals(ast.Module(body=kept, type_ignores=[]), path)
    missing = sorted((set_by_skipped[x], x) for x in used if x in set_by_skipped)
    if not missing:
        return None
    names = ", ".join(f"{x!r} (line {ln})" for ln, x in missing)
    return (f"the script has no `if __name__ == \"__main__\":` block, so workers run only its "
            f"imports, definitions and assignments that call nothing; its functions use {names}, "
            f"set by other top-level statements, which workers would not run: {_IMPORT_SAFE}")


def _load_script(path: str) -> Any:
    """Load the application's main script in a worker as ``__mp_main__`` (the rule is in
    :func:`script_problem`, checked again here in case the script changed)."""
    problem = script_problem(path)
    if problem is not None:
        raise InvalidProcessor(f"cannot load {path}: {problem}")
    mod = sys.modules.get(MAIN_MODULE)
    if mod is not None and getattr(mod, "__file__", None) == path:
        return mod  # another processor of the same script
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    if not any(_is_main_guard(n) for n in tree.body):
        tree.body = [n for n in tree.body if _safe_statement(n)]
    mod = types.ModuleType(MAIN_MODULE)
    mod.__file__ = path
    sys.modules[MAIN_MODULE] = mod
    try:
        exec(compile(tree, path, "exec"), mod.__dict__)
    except BaseException:
        del sys.modules[MAIN_MODULE]
        raise
    return mod


def _check_file(path: str, func: str) -> None:
    """Check a file defines ``func`` at top level, without executing it."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidProcessor(f"cannot load processor file {path}: {exc}") from None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            return
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == func for t in node.targets):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name) == func for a in node.names):
            return
    raise InvalidProcessor(f"{path} defines no top-level function {func!r}")


_cache: Dict[str, Callable] = {}
_cache_lock = threading.Lock()


def load(ref: str) -> Callable:
    """Import the processor named by ``ref`` (cached per process)."""
    fn = _cache.get(ref)
    if fn is not None:
        return fn
    with _cache_lock:
        fn = _cache.get(ref)
        if fn is not None:
            return fn
        kind, path, func = _split(ref)
        try:
            if kind == "script":
                mod = _load_script(path)
            elif kind == "file":
                name = "pipeproc_processor_" + str(abs(hash(path)))
                mod = sys.modules.get(name)
                if mod is None:
                    spec = importlib.util.spec_from_file_location(name, path)
                    if spec is None or spec.loader is None:
                        raise ImportError(f"cannot load {path}")
                    mod = importlib.util.module_from_spec(spec)
                    sys.modules[name] = mod
                    try:
                        spec.loader.exec_module(mod)
                    except BaseException:
                        del sys.modules[name]
                        raise
            else:
                mod = importlib.import_module(path)
            obj: Any = mod
            for part in func.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise InvalidProcessor(f"cannot load processor {ref!r}: {type(exc).__name__}: {exc}") from None
        if not callable(obj):
            raise InvalidProcessor(f"processor {ref!r} is not callable")
        _cache[ref] = obj
        return obj
