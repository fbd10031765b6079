"""Worker processes: processor references, loading, and the worker loop.

A processor is referenced by a string the workers can import:

* ``"package.module:function"`` (a module-level function; dotted names allowed after ``:``);
* ``"/abs/path/file.py"`` (function ``process``) or ``"/abs/path/file.py:function"``.

:func:`processor_ref` turns what a user passes to ``system_proc`` into such a string and
checks, in the caller's process, that it can be loaded (``invalid_processor`` otherwise).

A worker (``python -m pipeproc._workers``) is a client of its node. Each of its
``worker_concurrency`` loops holds one connection and sends ``work`` requests that carry the
outcome of the previous claim (ack, ack + commit, or reclaim) and ask for the next claim in
the same round trip; the node answers when it has a claim for it (the wait is a parked
request, not a polling loop), or tells it to exit.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
from typing import Any, Callable, Dict, Optional

from ._protocol import ERR, REPLY_LIMIT, decode, encode_body, pack
from .errors import InvalidProcessor, PipeProcError

log = logging.getLogger("pipeproc.worker")


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
        if module == "__main__":
            main = sys.modules.get("__main__")
            if getattr(main, "__file__", None):
                # the application's own script: workers must not run it again (it may call
                # spawn() at top level), so they load only its definitions (see _load_script)
                ref = f"{SCRIPT}{os.path.abspath(main.__file__)}:{qual}"  # type: ignore[union-attr]
            else:
                raise InvalidProcessor(
                    "a function defined in an interactive session cannot be imported by "
                    "workers; put it in a module"
                )
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
    else:
        load(ref)
    return ref


def _safe_statement(node: ast.stmt) -> bool:
    """Top-level statements of an application script that workers execute: imports,
    function and class definitions, and assignments that call nothing."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.ClassDef)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        return node.value is not None and not any(
            isinstance(n, (ast.Call, ast.Await)) for n in ast.walk(node.value))
    return False


def _load_script(path: str) -> Any:
    """Load the definitions of the application's main script without running it."""
    import types
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    tree.body = [n for n in tree.body if _safe_statement(n)]
    mod = types.ModuleType("__pipeproc_script__")
    mod.__file__ = path
    sys.modules[mod.__name__] = mod
    exec(compile(tree, path, "exec"), mod.__dict__)
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


# ------------------------------------------------------------------------- the worker process

class _Loop:
    """One processing loop: a connection, an event loop for async processors."""

    def __init__(self, cfg: dict, index: int, stats: dict) -> None:
        self.cfg = cfg
        self.index = index
        self.stats = stats
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def run(self) -> None:
        cfg = self.cfg
        from ._client import open_connection
        address = cfg["address"]
        try:
            c = open_connection(address if isinstance(address, str) else tuple(address),
                                cfg["authkey"])
        except PipeProcError:
            return  # the node is gone (shutting down)
        rid = 0
        done: Optional[list] = None
        try:
            c.send_bytes(pack([0, "hello_worker", cfg["slot"], os.getpid()]))
            decode(c.recv_bytes(REPLY_LIMIT))
            while True:
                rid += 1
                more = True
                limit = cfg.get("restart_after") or 0
                if limit and self.stats["executions"] >= limit:
                    more = False
                c.send_bytes(pack([rid, "work", done, more]))
                reply = decode(c.recv_bytes(REPLY_LIMIT))
                done = None
                if reply[1] == ERR:
                    log.error("work request failed: %s", reply[2])
                    return
                job = reply[2]
                if job is None or job == "exit":
                    return
                done = self.execute(job)
        except (EOFError, OSError):
            return  # the node went away
        finally:
            c.close()
            if self.loop is not None:
                self.loop.close()

    def execute(self, job: list) -> list:
        name, ref, tos, many, rows, key = job
        from ._client import Log
        logs = [Log(f"{ms}-{seq}", body) for ms, seq, body in rows]
        with _stats_lock:
            self.stats["executions"] += 1
        try:
            fn = load(ref)
            result = fn(logs if many else logs[0])
            if inspect.isawaitable(result):
                if self.loop is None:
                    self.loop = asyncio.new_event_loop()
                result = self.loop.run_until_complete(result)
            if result is None or not tos:
                return [name, key, "ack", None]
            bodies = result if isinstance(result, list) else [result]
            items = [[t, encode_body(b)] for t in tos for b in bodies]
            return [name, key, "commit", items]
        except Exception as exc:
            import traceback
            with _stats_lock:
                self.stats["failures"] += 1
            # the node logs it (WARNING, ERROR when it disables the proc), naming the proc
            # and the logs, and keeps it as the proc's last_error
            log.debug("processor %s failed on %s: %s: %s", ref,
                      logs[0].id if logs else "?", type(exc).__name__, exc)
            return [name, key, "reclaim", {"type": type(exc).__name__, "message": str(exc),
                                           "traceback": traceback.format_exc()}]


_stats_lock = threading.Lock()


def _lifeline(stdin: Any) -> None:
    """The node keeps our stdin open; EOF means it is gone: stop now, even mid-processor
    (its claim is reclaimed and delivered again: at-least-once)."""
    try:
        while stdin.read(4096):
            pass
    except (OSError, ValueError):
        pass
    os._exit(3)


def main() -> None:
    """Entry point of a worker process (``python -m pipeproc._workers``)."""
    import msgpack

    stdin = sys.stdin.buffer
    size = int.from_bytes(stdin.read(4), "big")
    cfg = msgpack.unpackb(stdin.read(size), raw=False)
    logging.basicConfig(level=cfg.get("log_level") or "WARNING", stream=sys.stderr,
                        format="%(asctime)s pipeproc-worker[%(process)d] %(levelname)s %(message)s")
    if cfg.get("cwd"):
        try:
            os.chdir(cfg["cwd"])
        except OSError:
            pass
    for p in reversed(cfg.get("sys_path") or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    threading.Thread(target=_lifeline, args=(stdin,), name="lifeline", daemon=True).start()
    stats = {"executions": 0, "failures": 0}
    loops = [_Loop(cfg, i, stats) for i in range(max(1, cfg.get("concurrency", 1)))]
    threads = [threading.Thread(target=lp.run, name=f"loop-{i}", daemon=True)
               for i, lp in enumerate(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
