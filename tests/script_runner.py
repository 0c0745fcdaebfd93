"""Test helper: several command lines of the project's entry points in one interpreter, each run as
`python SCRIPT ARGS...` would run it (runpy, run_name "__main__"), saving an interpreter start and a torch import per
command. Prints one JSON line per command: {"argv": ..., "exit": status, "stdout": ..., "stderr": ...}.

    python tests/script_runner.py '["scripts/sample.py", "RUN_DIR"]' '["train.py", "--out", "DIR", "--resume"]'

Between commands the project's modules are forgotten and sys.path is restored, so each command finds the project
by itself (a script that relied on the one before it would fail here as it fails alone)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

PROJECT_PACKAGES = ("data", "model", "training", "train")


def run_one(argv: list[str], base_path: list[str]) -> dict:
    for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *base_path]  # as `python SCRIPT` sets sys.path[0]
    sys.argv = list(argv)
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # an uncaught error: what `python SCRIPT` prints, and its status
            traceback.print_exc()
            status = 1
    return {"argv": argv, "exit": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


def run_commands(commands: list[list], *, cwd: Path, env: dict, flags: tuple[str, ...] = (),
                 timeout: float = 300) -> list[dict]:
    """Each command ([SCRIPT, ARG, ...], paths allowed) run by this file in one new interpreter (`python FLAGS`)."""
    argv = [sys.executable, *flags, __file__, *(json.dumps([str(a) for a in c]) for c in commands)]
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"argv"')]
    assert p.returncode == 0 and len(results) == len(commands), p.stdout[-3000:] + p.stderr[-3000:]
    return results


if __name__ == "__main__":
    base = sys.path[1:]  # without tests/ (this file's folder): each command gets its own script's folder instead
    for command in sys.argv[1:]:
        print(json.dumps(run_one(json.loads(command), base)), flush=True)
