"""Where a MixLoRA FFN step's GPU time goes: `python -m bench.gpu_profile --out DIR` (about a minute on an H200).

torch.profiler over a few forward+backward steps of one provider at one token count (the goal's H, I, E, k, r,
bf16), per case: the kernels by their own device time, per step. bench.gpu_check says how fast; this says
which kernel to work on. Cases: the backend's choice at T = 8192 (sorted regime) and T = 32 (dense), both
regimes forced at T = 1024 (where the sorted one lost), dense forced at T = 8192, and the dense-LoRA baseline.
Writes gpu-profile-<device>-<date>.json and .md. `--dry-run`: CPU, Triton interpreter, tiny shapes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu_check import DRY_TIMING, GOAL, _ffn_providers, _ffn_regime, _log, device_name
from bench.providers import Shape, grad_targets, make_inputs

CASES = [("triton", 8192), ("lora", 8192), ("triton-dense", 8192), ("triton", 32), ("lora", 32)]
CASES += [("triton-sorted", 1024), ("triton-dense", 1024)]
DRY_CASES = [("triton", 7), ("triton-sorted", 7), ("lora", 7)]
STEPS = 3
TOP = 15


def _step(name: str, inp) -> Any:
    fn = _ffn_providers()[name](inp)
    targets = [t for _, t in grad_targets("fused" if name.startswith("triton") else name, inp)]
    return lambda: torch.autograd.grad(fn(), targets, inp.grad_out)


def profile_case(name: str, T: int, dims: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """The top kernels of one provider's fwd+bwd step by self device time (ms per step), and the step total."""
    inp = make_inputs(Shape(T=T, **dims), dtype, device)
    regime = name.removeprefix("triton-") if name in ("triton-dense", "triton-sorted") else None
    with _ffn_regime(regime):
        step = _step(name, inp)
        for _ in range(2):  # compile and autotune outside the profile
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(STEPS):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    if device.type != "cuda":  # the dry run: CPU ops stand in for kernels
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    rows = []
    for e in events:
        us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        rows.append(dict(kernel=e.key[:120], calls_per_step=e.count / STEPS, ms_per_step=us / 1e3 / STEPS))
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    _log(f"profile {name} T={T}: {total:.3f} ms of kernels per step, {len(rows)} kernels")
    return dict(provider=name, T=T, **dims, kernel_ms_per_step=total, top=rows[:TOP], kernels=len(rows))


def markdown(report: dict) -> str:
    lines = [f"# gpu_profile on {report['device']} ({report['date']})", ""]
    lines += [f"torch {report['versions']['torch']}, triton {report['versions']['triton']}; {report['dtype']}"]
    lines += ["", "Self device time per fwd+bwd step (torch.profiler, mean of the profiled steps).", ""]
    for case in report["cases"]:
        if "error" in case:
            lines += [f"## {case['provider']} T={case['T']}: error {case['error']}", ""]
            continue
        lines += [f"## {case['provider']} T={case['T']}: {case['kernel_ms_per_step']:.3f} ms of kernels", ""]
        lines += ["| kernel | calls | ms | share |", "|---|---|---|---|"]
        for r in case["top"]:
            share = r["ms_per_step"] / case["kernel_ms_per_step"] if case["kernel_ms_per_step"] else 0.0
            name = r["kernel"].replace("|", "/")
            lines.append(f"| `{name}` | {r['calls_per_step']:.0f} | {r['ms_per_step']:.3f} | {share:.0%} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where the files go")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, dtype, dims, cases = torch.device("cpu"), torch.float32, DRY_TIMING, DRY_CASES
    elif torch.cuda.is_available():
        device, dtype, dims, cases = torch.device("cuda"), torch.bfloat16, GOAL, CASES
    else:
        print("gpu_profile: no CUDA device; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    import triton

    report: dict[str, Any] = dict(
        device=device_name(device),
        date=datetime.date.today().isoformat(),
        dry_run=args.dry_run,
        versions=dict(torch=torch.__version__, triton=triton.__version__),
        dtype=str(dtype).removeprefix("torch."),
        cases=[],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu-profile-{report['device']}-{report['date']}"
    for name, T in cases:
        try:
            report["cases"].append(profile_case(name, T, dims, dtype, device))
        except Exception as e:  # one failing case must not lose the others
            report["cases"].append(dict(provider=name, T=T, error=f"{type(e).__name__}: {e}"[:300]))
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(report))
    return 0 if all("error" not in c for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
