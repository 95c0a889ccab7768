"""The interpreter worker the Triton test files share: each file runs itself as a script in a child process.

Why a child: `import moelora` (conftest) imports triton, and TRITON_INTERPRET must be set before that for
triton's own jit helpers (tl.zeros, ...) to be interpreted; the pytest process itself stays uninterpreted. The
child also keeps an interpreter segfault (an out-of-bounds load) from killing the pytest process.

A test file defines `worker() -> {check name: [failure, ...]}` and ends with `serve(worker)`; its tests take
the `worker_results` fixture (conftest.py), which runs the file once per module and returns that dict. A file
may set WORKER_TIMEOUT (seconds, default 600).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT = 600
# One BLAS / OpenMP thread: the interpreter runs one program at a time anyway, and idle numpy / torch threads
# spin against each other on a small shared machine (24 ms -> 0.1 ms for one of the interpreter's 32x512x32
# dots; the reference's backward 5x faster).
WORKER_ENV = {"TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def run_script(script: str | Path, *args: str, timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `script` with `args` under the interpreter from the repository root; fail the test if it fails."""
    env = {**os.environ, **WORKER_ENV}
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker {Path(script).name} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def worker_results(script: str | Path, timeout: float = DEFAULT_TIMEOUT) -> dict[str, list[str]]:
    """{check name: failures} that `script`'s worker() printed as the last line of its output."""
    return json.loads(run_script(script, timeout=timeout).stdout.strip().splitlines()[-1])


def serve(worker: Callable[[], dict[str, list[str]]]) -> None:
    """The child's side: run every check and print the results as one JSON line."""
    print(json.dumps(worker()))
