"""Processors defined in the application's own script (issue 13 item 6, issue 15 "Processor
loading"): workers load the script as ``__mp_main__``; a script they cannot load that way is
refused by ``system_proc`` with ``invalid_processor`` and a message saying what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def run_script(tmp_path, source: str, *, stdin: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    source = textwrap.dedent(source).replace("LOC", repr(str(tmp_path / "store")))
    if stdin:
        cmd, inp = [sys.executable, "-"], source
    else:
        script = tmp_path / "app.py"
        script.write_text(source)
        cmd, inp = [sys.executable, str(script)], None
    return subprocess.run(cmd, cwd=str(tmp_path), env=env, input=inp,
                          capture_output=True, text=True, timeout=60)


# the issue's script: guarded, a compiled regex at module level used by the processor
ISSUE_SCRIPT = r'''
import re

import pipeproc

NUMBER = re.compile(r"\d+")


def numbers(log):
    return {"numbers": NUMBER.findall(log.body["text"])}


if __name__ == "__main__":
    open("main_ran.txt", "a").write("ran\n")
    with pipeproc.spawn(LOC, workers=1) as pp:
        pp.system_proc(name="numbers", from_="text", processor=numbers, to="numbers")
        pp.commit([{"topic": "text", "body": {"text": "3 apples and 12 pears"}}])
        pp.wait_for_procs(timeout=30)
        st = pp.inspect_proc("numbers")
        print("STATUS", st.status, flush=True)
        print("OUT", [lg.body for lg in pp.range("numbers")], flush=True)
'''


def test_guarded_script_module_level_values_reach_the_workers(tmp_path):
    proc = run_script(tmp_path, ISSUE_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert "NameError" not in proc.stderr
    assert "OUT [{'numbers': ['3', '12']}]" in proc.stdout, (proc.stdout, proc.stderr)
    assert "STATUS active" in proc.stdout
    # the `if __name__ == "__main__":` block ran once: in the application, not in the worker
    assert (tmp_path / "main_ran.txt").read_text() == "ran\n"


UNGUARDED_WITH_CALL = '''
import json

import pipeproc

CFG = json.loads('{"factor": 3}')


def scale(log):
    return {"n": log.body["n"] * CFG["factor"]}


pp = pipeproc.spawn(LOC, workers=1)
try:
    pp.system_proc(name="scale", from_="in", processor=scale, to="out")
except pipeproc.PipeProcError as e:
    print("CODE", e.code, flush=True)
    print("MSG", e, flush=True)
print("PROCS", sorted(pp.stats()["procs"]), flush=True)
pp.shutdown()
'''


def test_unguarded_script_whose_functions_need_a_call_is_refused(tmp_path):
    proc = run_script(tmp_path, UNGUARDED_WITH_CALL)
    assert proc.returncode == 0, proc.stderr
    assert "CODE invalid_processor" in proc.stdout, (proc.stdout, proc.stderr)
    msg = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MSG"))
    assert "'CFG' (line 6)" in msg
    assert 'if __name__ == "__main__":' in msg and "module" in msg
    assert "PROCS []" in proc.stdout  # nothing created


GUARDED_BUT_SPAWNS_OUTSIDE = '''
import pipeproc

pp = pipeproc.spawn(LOC, workers=1)


def double(log):
    return {"n": log.body["n"] * 2}


if __name__ == "__main__":
    try:
        pp.system_proc(name="d", from_="in", processor=double, to="out")
    except pipeproc.PipeProcError as e:
        print("CODE", e.code, flush=True)
        print("MSG", e, flush=True)
    pp.shutdown()
'''


def test_guarded_script_that_spawns_outside_the_guard_is_refused(tmp_path):
    proc = run_script(tmp_path, GUARDED_BUT_SPAWNS_OUTSIDE)
    assert proc.returncode == 0, proc.stderr
    assert "CODE invalid_processor" in proc.stdout, (proc.stdout, proc.stderr)
    assert "outside its `if __name__" in proc.stdout and "(line 4)" in proc.stdout


STDIN_SCRIPT = '''
import pipeproc


def double(log):
    return {"n": log.body["n"] * 2}


with pipeproc.spawn(LOC, workers=0) as pp:
    try:
        pp.system_proc(name="d", from_="in", processor=double, to="out")
    except pipeproc.PipeProcError as e:
        print("CODE", e.code, flush=True)
        print("MSG", e, flush=True)
'''


def test_processor_from_a_script_on_stdin_gets_the_interactive_message(tmp_path):
    proc = run_script(tmp_path, STDIN_SCRIPT, stdin=True)
    assert proc.returncode == 0, proc.stderr
    assert "CODE invalid_processor" in proc.stdout, (proc.stdout, proc.stderr)
    assert "<stdin>" not in proc.stdout
    assert "interactive session" in proc.stdout and "define it in a module" in proc.stdout
