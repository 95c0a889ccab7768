"""Compile every Triton kernel for a GPU, on a machine without one: `python -m bench.compile_check`.

The Triton interpreter (the CPU tests) runs the kernels' math, not the GPU compiler: a `tl.dot` whose K is
below 16 for 16-bit inputs, a bf16 path, an unsupported op, a tile that needs more shared memory than the
device has, or register spills show only when the kernel is compiled for a real target. Triton compiles
ahead of time without a device (its wheel carries ptxas), so this script:
1. runs every `moelora_triton` op (forward and backward) on CPU tensors, in bf16 / fp16 / fp32 (and bf16
   activations with fp32 LoRA weights), with every kernel launch captured instead of run: the kernel, its
   arguments, and (autotuned kernels) every config it could pick;
2. compiles each distinct (kernel, argument types, constexprs, config) for the target (sm_90 = H100/H200 by
   default) to a cubin, and reads its registers, stack frame (spilled registers) and shared memory with
   cuobjdump.
It fails when a kernel does not compile or needs more shared memory than the target allows. Spills are
reported, not failed: they cost speed, not correctness.

By default the autotuned kernels are compiled with their one pinned config (MOELORA_TRITON_PIN_CONFIG=1,
what the CI test runs); `--all-configs` compiles every config of every autotune list (what a GPU run may
pick). Writes bench/results/compile-check-sm<arch>-<date>.json and .md with `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if "--all-configs" not in sys.argv:
    os.environ.setdefault("MOELORA_TRITON_PIN_CONFIG", "1")  # before the kernels (their autotune lists) import
os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, native_specialize_impl

# Shared memory one block may use, by compute capability (bytes, the opt-in maximum): H100 / H200, A100.
SHARED_LIMIT = {90: 232448, 80: 166912}
SHAPE = dict(T=64, H=256, I=704, E=8, k=2, r=16)  # small: the argument types and constexprs matter, not sizes
DROP = (0.1, 2**40 + 1)  # LoRA dropout (drop_p, drop_seed) of the dropout launches: a drawn seed is int64
VARIANTS = {  # activation dtype, LoRA / router weight dtype
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16+fp32-weights": (torch.bfloat16, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "fp32": (torch.float32, torch.float32),
}


@dataclass
class Launch:
    """One captured kernel launch: the JIT function, its bound arguments and the configs it may run with."""

    fn: JITFunction
    args: dict[str, Any]
    configs: list[dict[str, Any]] = field(default_factory=lambda: [{}])


def _capture(run) -> list[Launch]:
    """Run `run()` with every Triton launch recorded instead of executed."""
    launches: list[Launch] = []
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def bind(fn: JITFunction, args, kwargs) -> dict[str, Any]:
        names = [p.name for p in fn.params]
        bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        return bound | options

    def fake_jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, bind(self, args, kwargs)))

    def fake_tuner_run(self, *args, **kwargs):
        fn = self.fn
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        launches.append(Launch(fn, bind(fn, args, kwargs), [c.all_kwargs() for c in self.configs]))

    JITFunction.run, Autotuner.run = fake_jit_run, fake_tuner_run
    try:
        run()
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
    return launches


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


def _exercise_ffn(ops, ua, gate, up, w, idx, gB, uB, dA, dB, act, g) -> None:
    """The mixlora_ffn op forward and backward: llama, phi-3's shared A, phi (ungated), no down LoRA; then
    down_expand with Wd hbar (the activation dtype) and without (the fp32 delta), and its backward. `act`
    makes a random tensor in the activation dtype."""
    (T, I), E, r, H = up.shape, gB.shape[0], gB.shape[2], dB.shape[1]
    for args in (
        (ua, gate, up, w, idx, gB, uB, dA, 2.0, "silu", False),
        (ua[:, : E * r], gate, up, w, idx, gB, uB, dA, 2.0, "gelu", True),  # phi-3's shared A
        (ua[:, : E * r], None, up, w, idx, None, uB, dA, 2.0, "gelu_tanh", False),  # phi: ungated
        (ua[:, : E * r], gate, up, w, idx, gB, uB, None, 2.0, "relu", False),
        (ua, gate, up, w, idx, gB, uB, dA, 2.0, "silu", False, *DROP),  # LoRA dropout of h_j
    ):
        ops.mixlora_ffn(*args)
        grad_zd = torch.randn(T, E * r, generator=g) if args[7] is not None else None
        ops.mixlora_ffn_backward(act(T, I), grad_zd, *args)
    zd = torch.randn(T, E * r, generator=g)
    for base in (act(T, H), None):
        ops.down_expand(zd, dB, base, up.dtype)
    ops.down_expand_backward(act(T, H), zd, dB, up.dtype)


def _exercise_ops(act_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    """Every moelora_triton op, forward and backward, on CPU tensors (launches are captured, not run)."""
    from moelora import reference, triton_backend  # importing triton_backend registers the ops

    ops = torch.ops.moelora_triton
    T, H, I, E, k, r = (SHAPE[n] for n in ("T", "H", "I", "E", "k", "r"))
    g = torch.Generator().manual_seed(0)

    def act(*s):
        return torch.randn(*s, generator=g).to(act_dtype)

    def wt(*s):
        return torch.randn(*s, generator=g).to(w_dtype)

    f32 = dict(dtype=torch.float32)
    x, gate, up = act(T, H), act(T, I), act(T, I)
    router = torch.randn(E, H, generator=g)
    w, idx = torch.rand(T, k, generator=g), torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gA, gB, uA, uB, dA, dB = wt(E, r, H), wt(E, I, r), wt(E, r, H), wt(E, I, r), wt(E, r, I), wt(E, H, r)
    probs = torch.rand(T, E, generator=g)

    ops.route(x, router, k, 0.0)
    ops.route(x, router, 0, 0.7)
    ops.route_backward(w, probs, x, router, w, idx, probs, True)
    A_cat = torch.cat([gA, uA])
    ops.rank_shrink(x, A_cat)
    ops.rank_shrink_backward(torch.randn(T, 2 * E * r, generator=g), x, A_cat)
    ops.route_shrink(x, router, A_cat, k, 0.0)
    ops.route_shrink(x, router, uA, 0, 0.7)
    ops.route_shrink_backward(w, probs, torch.randn(T, 2 * E * r, generator=g), x, router, A_cat, w, idx, probs, True)
    ops.rank_shrink(x, A_cat, *DROP)  # LoRA dropout of x
    ops.rank_shrink_backward(torch.randn(T, 2 * E * r, generator=g), x, A_cat, *DROP)
    ops.route_shrink(x, router, A_cat, k, 0.0, *DROP)
    grad_ua = torch.randn(T, 2 * E * r, generator=g)
    ops.route_shrink_backward(w, probs, grad_ua, x, router, A_cat, w, idx, probs, True, *DROP)
    triton_backend.dropout_mask(DROP[1], 1, T * I, DROP[0], "cpu")  # the mask alone, as tests reproduce it
    ops.moe_lora(x, w, idx, uA, uB, 2.0)
    u = torch.randn(T, E * r, generator=g)
    ops.moe_lora_backward(act(T, I), x, w, idx, uA, uB, u, u, 2.0)
    big_A, big_B = wt(4 * E, r, H), wt(4 * E, I, r)  # E*r = 512: the sorted regime
    ops.moe_lora_sorted(x, w, idx, big_A, big_B, 2.0)
    order, offsets = torch.arange(T * k), torch.linspace(0, T * k, 4 * E + 1).long()
    ops.moe_lora_sorted_backward(
        act(T, I), x, w, idx, big_A, big_B, torch.randn(T * k, r, generator=g), order, offsets, 2.0
    )
    ua = torch.randn(T, 2 * E * r, generator=g)
    for regime in ("dense", "sorted"):  # the fused FFN's two regimes (the backend picks one from the shapes)
        with _env(triton_backend.FFN_REGIME_ENV, regime):
            _exercise_ffn(ops, ua, gate, up, w, idx, gB, uB, dA, dB, act, g)

    B, S, M = 4, 16, 7
    hidden, mask = act(B, S, H), torch.ones(B, S, dtype=torch.bool)
    mask[0, :5] = False
    mrouter, pool_w = torch.randn(M, H, generator=g), torch.randn(H, generator=g)
    num, den = torch.tensor(reference.RATIONAL_GELU_NUMERATOR), torch.tensor(reference.RATIONAL_GELU_DENOMINATOR)
    for pooling in ("attention", "mean", "last", "max"):
        for rational in (True, False):
            args = (hidden, mask, mrouter, num if rational else None, den if rational else None, pool_w, 3, pooling)
            _gates, pidx, pprobs, pooled, scores, lse = ops.prompt_route(*args)
            ops.prompt_route_backward(
                torch.randn(B, M, generator=g), None, *args[:6], pidx.clamp(0, M - 1), pprobs, pooled,
                torch.randn(*scores.shape, **f32), torch.randn(*lse.shape, **f32), pooling,
            )  # fmt: skip
    token_seq, seq_lora = torch.arange(T) % 4, torch.tensor([0, 1, -1, 2])
    seq_args = (x, token_seq, seq_lora, torch.rand(4, generator=g), uA[:3], uB[:3], torch.tensor([2.0, 0.5, 1.0]))
    ops.segmented_lora(*seq_args)
    ops.segmented_lora_backward(act(T, I), *seq_args, torch.randn(T, r, generator=g))


def _signature(fn: JITFunction, bound: dict[str, Any], arch: int) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher specialises a launch on a GPU: an int argument equal to 1
    becomes a constexpr, and pointers and ints divisible by 16 carry tt.divisibility, which is what lets a unit-
    stride, aligned tile load as vectors. Without it the compiler sees a generic kernel: one 64-bit address per
    element, registers and spills that the GPU's JIT would never produce."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound.get(p.name, p.default if p.has_default else None)
        if p.is_constexpr:
            kind, spec = "constexpr", value
        else:
            kind, spec = native_specialize_impl(
                backend, value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
            )
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs


# An FMA-lowered tl.dot unrolls M*N*K/threads fused multiply-adds (>= 256 for the smallest tile here, a
# [32, 16] x [16, 64] router dot at 4 warps); elementwise code has a few dozen.
FMA_DOT_MIN = 256


def _dot_engine(ptx: str) -> dict[str, Any]:
    """Which units the kernel's dots run on, from its PTX: wgmma (Hopper warpgroup MMA), mma.sync (tensor-core
    MMA of Ampere's kind), or FMA loops (an "ieee" fp32 dot on the CUDA cores: 67 TFLOP/s against 990 for
    bf16 tensor cores, by an H100's datasheet)."""
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    mma = len(re.findall(r"\bmma\.sync", ptx))
    fma = len(re.findall(r"\bfma\.rn\.f32", ptx))
    engine = "wgmma" if wgmma else "mma" if mma else "FMA" if fma >= FMA_DOT_MIN else "-"
    return dict(dot=engine, wgmma=wgmma, mma=mma, fma=fma)


def _resources(cubin: bytes) -> dict[str, int]:
    """REG, LOCAL (spill), SHARED and STACK of the cubin's one function, from cuobjdump -res-usage."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


@dataclass
class Job:
    """One distinct compile: kernel, argument types, constexprs, launch options."""

    fn: JITFunction
    variant: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, int]
    attrs: dict[tuple[int, ...], Any] = field(default_factory=dict)  # tt.divisibility, as the launcher specialises


def jobs(variants: list[str], kernels: set[str] | None = None, arch: int = 90) -> list[Job]:
    """Every distinct compile the ops launch in these variants (optionally only the named kernels)."""
    out, seen = [], set()
    for variant in variants:
        act_dtype, w_dtype = VARIANTS[variant]
        for launch in _capture(lambda a=act_dtype, w=w_dtype: _exercise_ops(a, w)):
            if kernels is not None and launch.fn.__name__ not in kernels:
                continue
            for config in launch.configs:
                bound = launch.args | config
                signature, constexprs, attrs = _signature(launch.fn, bound, arch)
                options = {k: bound[k] for k in ("num_warps", "num_stages") if k in bound}
                key = (launch.fn.__name__, tuple(signature.items()), repr(sorted(constexprs.items())), repr(options))
                key += (repr(sorted(attrs.items())),)
                if key not in seen:
                    seen.add(key)
                    out.append(Job(launch.fn, variant, signature, constexprs, options, attrs))
    return out


def compile_job(job: Job, arch: int) -> dict[str, Any]:
    """Compile one job for sm_<arch>: ok, registers, spill (stack / local) and shared bytes, or the error."""
    row: dict[str, Any] = dict(kernel=job.fn.__name__, variant=job.variant, options=job.options)
    row["constexprs"] = {k: str(v) for k, v in job.constexprs.items()}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=job.fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job.options)
        row |= _resources(compiled.asm["cubin"]) | dict(shared=compiled.metadata.shared, ok=True)
        row |= _dot_engine(compiled.asm["ptx"])
        limit = SHARED_LIMIT.get(arch)
        if limit is not None and row["shared"] > limit:
            row |= dict(ok=False, error=f"shared memory {row['shared']} B > the target's {limit} B")
    except Exception as exc:  # a compile error is the finding: report it, go on with the rest
        row |= dict(ok=False, error=f"{type(exc).__name__}: {str(exc)[-800:]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


_TODO: list[Job] = []  # the jobs of the running check, inherited by forked workers (JIT functions do not pickle)


def _compile_nth(i_arch: tuple[int, int]) -> dict[str, Any]:
    return compile_job(_TODO[i_arch[0]], i_arch[1])


def check(
    arch: int = 90, variants: list[str] | None = None, kernels: set[str] | None = None, processes: int = 1
) -> list[dict[str, Any]]:
    """Compile every distinct launch for sm_<arch>, one row each, with progress on stderr. Compiling is
    single-threaded, so `processes` forked workers divide the wall time (9 min for the default variants and
    pinned configs in one process on this project's 2-core VM)."""
    _TODO[:] = jobs(variants or list(VARIANTS), kernels, arch)
    work = [(i, arch) for i in range(len(_TODO))]
    rows = []
    with multiprocessing.get_context("fork").Pool(processes) if processes > 1 else nullcontext() as pool:
        results = pool.imap(_compile_nth, work) if pool is not None else map(_compile_nth, work)
        for i, row in enumerate(results, 1):
            rows.append(row)
            status = "ok  " if row["ok"] else "FAIL"
            print(f"[{i}/{len(work)}] {status} {row['kernel']} [{row['variant']}] {row['options']} {row['seconds']} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], arch: int, all_configs: bool) -> str:
    bad = [r for r in rows if not r["ok"]]
    spills = [r for r in rows if r.get("stack", 0) > 0 or r.get("local", 0) > 0]
    lines = [
        f"# compile_check: the Triton kernels compiled for sm_{arch} ({datetime.date.today().isoformat()})",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; "
        + ("every autotune config" if all_configs else "the pinned config of each autotuned kernel"),
        "",
        f"{len(rows) - len(bad)}/{len(rows)} compiles pass; {len(spills)} use a stack frame (spilled registers).",
        "`dots on`: wgmma (Hopper warpgroup MMA), mma (mma.sync tensor cores), FMA (an fp32 dot unrolled on the",
        "CUDA cores), - (no dot), read from the PTX.",
        "",
        "| kernel | variant | tile | warps, stages | regs | stack B | shared B | dots on | ok |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        opts = f"{r['options'].get('num_warps', '-')}, {r['options'].get('num_stages', '-')}"
        tile = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if re.fullmatch(r"B[A-Z]{1,2}|NC", k))
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {tile} | {opts} | {r.get('reg', '-')} | {r.get('stack', '-')} "
            f"| {r.get('shared', '-')} | {r.get('dot', '-')} | {'yes' if r['ok'] else 'NO: ' + r['error'][:120]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 (H100/H200), 80 (A100)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not the pinned one")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--kernels", default=None, help="comma list of kernel names (default: all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    ap.add_argument("--out", type=Path, default=None, help="write compile-check-sm<arch>-<date>.json/.md here")
    args = ap.parse_args(argv)
    kernels = set(args.kernels.split(",")) if args.kernels else None
    rows = check(args.arch, args.variants.split(","), kernels, args.jobs)
    text = markdown(rows, args.arch, args.all_configs)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"compile-check-sm{args.arch}-{datetime.date.today().isoformat()}"
        stem.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        stem.with_suffix(".md").write_text(text)
    print(text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
