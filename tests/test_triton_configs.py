"""Every GPU tile of every autotuned Triton kernel, forced one at a time under the interpreter, against the
reference (bench.gpu_check's configs section, on CPU): the other tests run each kernel's one pinned tile,
and a GPU's autotuner may pick any of the others. The shape spans several blocks of the largest tiles
(T = 130 > 128 rows, I = 264 > 2 * 128 columns, H = 72 > 64) and no block divides it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (130, 72, 264, 4, 2, 8)  # T, H, I, E, k, r
CHILD = f"""
from bench import parity  # --dry-run in argv: it sets TRITON_INTERPRET before triton is imported
import json, torch
rows = parity.config_parity({SHAPE!r}, ["fp32", "fp16"], torch.device("cpu"))
tiles = {{name: [str(c) for c in configs] for name, (_, configs, _) in parity._autotuned_kernels().items()}}
print(json.dumps(dict(rows=rows, tiles=tiles), default=str))
"""


@pytest.fixture(scope="module")
def result() -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MOELORA_TRITON_PIN_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "--dry-run"], env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_tile_was_run(result):
    ran = {(r["kernel"], r["config"], r["dtype"]) for r in result["rows"]}
    want = {(k, c, d) for k, configs in result["tiles"].items() for c in configs for d in ("fp32", "fp16")}
    assert ran == want
    assert len(result["tiles"]) == 10 and all(len(c) >= 3 for c in result["tiles"].values())


def test_every_tile_matches_the_reference(result):
    failed = [r for r in result["rows"] if not r["ok"]]
    bad = [(r["kernel"], r["config"], r["op"], r["dtype"], r.get("error") or r["errors"]) for r in failed]
    assert not bad, bad
