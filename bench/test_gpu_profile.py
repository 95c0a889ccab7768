"""bench/gpu_profile.py end to end under the interpreter (CPU ops stand in for kernels): it proves the script
before a GPU session spends its minutes on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_profile_dry_run(tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_profile", "--dry-run", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-profile-cpu-interpreter-*.json")
    report = json.loads(path.read_text())
    assert [(c["provider"], c["T"]) for c in report["cases"]] == [("triton", 7), ("triton-sorted", 7), ("lora", 7)]
    for case in report["cases"]:
        assert case["kernel_ms_per_step"] > 0 and case["top"], case
        assert all(r["ms_per_step"] >= 0 and r["calls_per_step"] > 0 for r in case["top"])
    assert path.with_suffix(".md").read_text().startswith("# gpu_profile on cpu-interpreter")
