"""Every Triton kernel compiles for an H100 (sm_90), in bf16 and fp32, on this GPU-less machine.

The interpreter tests check the kernels' math; they never run the GPU compiler, which rejects what the
interpreter accepts (a 16-bit tl.dot with K < 16, a shared-memory tile over the device's limit, ...).
bench/compile_check.py captures every launch of every moelora_triton op and compiles it ahead of time for
sm_90 with Triton's own ptxas (about 3 minutes cold on 2 cores; Triton's cache makes reruns fast). Here:
it exits 0 (every compile passed, shared memory within the H100's limit), and every public kernel of
moelora.kernels was among the compiled ones, so a new kernel cannot slip past the check unexercised.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _public_kernels() -> set[str]:
    """Names of the module-level @triton.jit (or autotuned) kernels of moelora.kernels; helpers start with _."""
    import moelora.kernels
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    names = set()
    for info in pkgutil.iter_modules(moelora.kernels.__path__):
        module = import_module(f"moelora.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction | Autotuner) and not name.startswith("_"):
                names.add(name)
    return names


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.compile_check", "--variants", "bf16,fp32", "--jobs", "2", "--out", tmp_path]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    (report,) = tmp_path.glob("compile-check-sm90-*.json")
    rows = json.loads(report.read_text())
    assert rows and all(r["ok"] and r["reg"] > 0 for r in rows)
    missing = _public_kernels() - {r["kernel"] for r in rows}
    assert not missing, f"kernels no op launched, so never compiled: {sorted(missing)}"
    assert {r["variant"] for r in rows} == {"bf16", "fp32"}
    # 16-bit models run every dot on tensor cores; fp32 operands there (fp32 adapters, rank-space gradients)
    # take tf32x3, never an ieee dot unrolled on the CUDA cores (which ran the first GPU run's down LoRA)
    fma = sorted({r["kernel"] for r in rows if r["variant"] == "bf16" and r["dot"] == "FMA"})
    assert not fma, f"16-bit launches with dots on FMA units: {fma}"
    assert any(r["dot"] == "FMA" for r in rows if r["variant"] == "fp32")  # the detector sees ieee dots


def test_launches_are_specialised_as_on_a_gpu(monkeypatch):
    """compile_check compiles what Triton's launcher would: a unit stride becomes a constexpr and 16-byte
    aligned pointers carry tt.divisibility (without them the compiler sees a generic kernel, scalar loads and
    spills the GPU never has: the first report overstated them up to 12 KB per thread)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from bench import compile_check

    (job,) = [j for j in compile_check.jobs(["bf16"], {"route_fwd_kernel"}) if j.constexprs["BK"] == 2]
    assert job.signature["stride_xh"] == "constexpr" and job.constexprs["stride_xh"] == 1
    divisible = {job.fn.arg_names[i] for (i,), attr in job.attrs.items() if ["tt.divisibility", 16] in attr}
    assert {"x_ptr", "wr_ptr", "weights_ptr"} <= divisible
