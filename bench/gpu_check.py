"""Everything issue 3 asks of a GPU, in one call: `python -m bench.gpu_check` (about 2-4 minutes on an H100).

1. Parity of the Triton ops (route, moe_lora (dense-masked, and sorted at the last shape), moe_lora_sorted at
   every shape, mixlora_ffn and routed_mixlora_ffn (route_shrink + the FFN), each in the fused FFN's dense and
   sorted regimes, and MiLoRA's prompt_route and segmented_lora)
   against moelora.reference in bf16, fp16 and fp32,
   forward and every gradient, with the tests' rule: the kernel's error against an fp64 reference may be
   at most twice PyTorch's own error at that dtype plus 4 ulps (of the largest value).
2. Races: the forward (and the backward) of each op repeated, bitwise equal every time.
3. Timings (triton.testing.do_bench, medians, L2 flushed) of one MixLoRA FFN at the issue's goal shape
   (H=4096, I=11008, E=8, k=2, r=16; T=8192 and T=32; bf16), forward and forward+backward, for
   `triton` (routed_mixlora_ffn: route_shrink + the fused FFN, as MixLoraFFN runs it), `triton-apart` (route,
   then mixlora_ffn), `triton-dense` and `triton-sorted` (routed, the fused FFN's regime forced), `lora` (the
   frozen FFN with one dense LoRA on gate/up/down), `loop` (the per-expert loop of mixlora / MoE-PEFT) and
   `base` (the frozen FFN alone), with the ratios the issue's goals name;
   the bandwidth of the one-read-of-x kernels (route; the gate+up shrink; route_shrink) against a copy; and
   moe_lora's two regimes at T=8192, E = 8..64, r=16 (where the dense-masked one stops paying).
Writes bench/results/gpu-check-<device>-<date>.json and .md (the device named) and prints the markdown.
MiLoRA's decode-step goals (issue 4) are the milora bench suite's:
`python -m bench --suite milora --preset llama2-7b --dtype bf16` (run it in the same GPU session).

`--dry-run` runs the same code on CPU tensors under TRITON_INTERPRET=1 with tiny shapes, fp32/fp16 and
wall-clock timing, so CI proves the script works before a GPU session spends its minutes on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.providers import PROVIDERS, FfnInputs, Shape, grad_targets, make_inputs
from moelora import reference
from moelora.reference import ExpertLora

LOOSE_OUTPUTS = {"grad numerator": 32, "grad denominator": 32}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GOAL = dict(H=4096, I=11008, E=8, k=2, r=16)
GOAL_T = (8192, 32)
BANDWIDTH_T = (4096, 8192)
REGIME_E = (8, 16, 32, 64)  # moe_lora at r=16: 128, 256, 512 and 1024 rank columns
# (T, H, I, E, k, r): odd sizes, edge cases of k, and one medium shape with several blocks on every axis
PARITY_SHAPES = [
    (1, 64, 176, 8, 2, 16),
    (63, 200, 344, 16, 16, 8),
    (1000, 512, 1376, 8, 2, 16),
    (517, 256, 704, 4, 1, 32),
    (777, 256, 704, 64, 2, 16),  # E*r = 1024: the backend's moe_lora takes the sorted regime
]
DRY_PARITY_SHAPES = [(7, 20, 40, 4, 2, 8), (9, 20, 40, 16, 3, 32)]  # the second: E*r = 512, moe_lora sorted
DRY_TIMING = dict(H=24, I=40, E=4, k=2, r=8)


def _tb():
    from moelora import triton_backend

    return triton_backend


# ---------------------------------------------------------------------------------------------- parity


def _errors(got: dict[str, Tensor], lp: dict[str, Tensor], want: dict[str, Tensor], dtype: torch.dtype) -> dict:
    """Per output: kernel error, torch error (both vs fp64), allowed bound, ok."""
    eps = torch.finfo(dtype).eps
    out = {}
    for name in want:
        gk, gt, gw = got[name].double(), lp[name].double(), want[name].double()
        if not gk.is_floating_point() or got[name].dtype in (torch.int32, torch.int64):
            out[name] = dict(ok=bool(torch.equal(got[name].cpu(), want[name].cpu())), exact=True)
            continue
        finite = bool(torch.isfinite(gk).all())
        err_k = (gk - gw).abs().max().item() if gk.numel() else 0.0
        err_t = (gt - gw).abs().max().item() if gk.numel() else 0.0
        bound = 2 * err_t + 4 * eps * (gw.abs().max().item() if gk.numel() else 0.0) + 1e-12
        # The rational's coefficient gradients sum B*H terms up to |x|^6 into a result near 1: the kernel's
        # reduction order costs up to 17x torch's error (interpreter, fp32), so they get 32x the bound.
        bound *= LOOSE_OUTPUTS.get(name, 1)
        out[name] = dict(err=err_k, torch_err=err_t, bound=bound, ok=finite and err_k <= bound)
    return out


def _grads(out: Tensor, inputs: list[Tensor], upstream: Tensor) -> list[Tensor]:
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype), allow_unused=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs, strict=True)]


def _leaf(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def _op_inputs(shape, dtype, device, seed=0) -> dict[str, Any]:
    T, H, I, E, k, r = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*s, std=1.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * std).to(device)

    w, idx = torch.softmax(rand(T, E), -1).topk(k, -1)
    return dict(
        x=rand(T, H).to(dtype),
        gate=rand(T, I).to(dtype),
        up=rand(T, I).to(dtype),
        router=rand(E, H, std=0.5).float(),
        weights=(w / w.sum(-1, keepdim=True)).float(),
        indices=idx,
        loras={
            "gate": (rand(E, r, H, std=H**-0.5).float(), rand(E, I, r, std=0.3).float()),
            "up": (rand(E, r, H, std=H**-0.5).float(), rand(E, I, r, std=0.3).float()),
            "down": (rand(E, r, I, std=I**-0.5).float(), rand(E, H, r, std=0.3).float()),
        },
        Wd=rand(H, I, std=I**-0.5).to(dtype),
        bias=rand(H).to(dtype),
        upstream_h=rand(T, H).to(dtype),
        upstream_i=rand(T, I).to(dtype),
        upstream_k=rand(T, k).float(),
    )


def _run_route(impl, d, cast):
    x, router = _leaf(cast(d["x"])), _leaf(cast(d["router"]))
    r = impl.route(x, router, top_k=d["weights"].shape[1])
    loss_w = (r.weights * cast(d["upstream_k"])).sum() + r.probs.square().sum()
    gx, gr = torch.autograd.grad(loss_w, [x, router])
    return {"weights": r.weights, "indices": r.indices, "probs": r.probs, "grad x": gx, "grad router": gr}


def _run_moe_lora(impl, d, cast):
    A, B = d["loras"]["up"]
    leaves = [_leaf(cast(d["x"])), _leaf(cast(d["weights"])), _leaf(cast(A)), _leaf(cast(B))]
    x, w, A, B = leaves
    y = impl.moe_lora(x, w, d["indices"], A, B, 2.0)
    names = ["y", "grad x", "grad weights", "grad A", "grad B"]
    return dict(zip(names, [y, *_grads(y, leaves, cast(d["upstream_i"]))], strict=True))


def _run_moe_lora_sorted(impl, d, cast):
    """moe_lora's sorted regime at the parity shape, whatever its E*r (the backend picks it only above 256)."""
    if impl is not reference:
        from moelora.kernels import moe_lora_sorted

        impl = SimpleNamespace(moe_lora=moe_lora_sorted.moe_lora_sorted)
    return _run_moe_lora(impl, d, cast)


def _run_ffn(impl, d, cast):
    x, gate, up, w = (_leaf(cast(d[n])) for n in ("x", "gate", "up", "weights"))
    lo = {p: ExpertLora(_leaf(cast(A)), _leaf(cast(B))) for p, (A, B) in d["loras"].items()}
    Wd, bias = cast(d["Wd"]), cast(d["bias"])
    y = impl.mixlora_ffn(
        x,
        gate,
        up,
        w,
        d["indices"],
        gate_lora=lo["gate"],
        up_lora=lo["up"],
        down_lora=lo["down"],
        down_proj=lambda h: F.linear(h, Wd.to(h.dtype), bias.to(h.dtype)),
        act=F.silu,
        scaling=2.0,
        down_bias=bias,
    )
    inputs = [x, gate, up, w, *(t for p in lo.values() for t in (p.A, p.B))]
    names = ["y", "grad x", "grad gate", "grad up", "grad weights"] + [f"grad {p}.{ab}" for p in lo for ab in "AB"]
    return dict(zip(names, [y, *_grads(y, inputs, cast(d["upstream_h"]))], strict=True))


def _run_routed_ffn(impl, d, cast):
    """route + mixlora_ffn on the same x: the triton backend's routed_mixlora_ffn (route_shrink: one read of x
    for the router and the gate/up shrink), the reference's route then mixlora_ffn."""
    x, gate, up, router = (_leaf(cast(d[n])) for n in ("x", "gate", "up", "router"))
    lo = {p: ExpertLora(_leaf(cast(A)), _leaf(cast(B))) for p, (A, B) in d["loras"].items()}
    Wd = cast(d["Wd"])
    ffn = dict(
        gate_lora=lo["gate"],
        up_lora=lo["up"],
        down_lora=lo["down"],
        down_proj=lambda h: F.linear(h, Wd.to(h.dtype)),
        act=F.silu,
        scaling=2.0,
    )
    k = d["weights"].shape[1]
    if hasattr(impl, "routed_mixlora_ffn"):
        y, r = impl.routed_mixlora_ffn(x, router, gate, up, top_k=k, top_p=None, **ffn)
    else:
        r = impl.route(x, router, top_k=k)
        y = impl.mixlora_ffn(x, gate, up, r.weights, r.indices, **ffn)
    loss = (y * cast(d["upstream_h"]).to(y.dtype)).sum() + r.probs.square().sum()
    inputs = [x, gate, up, router, *(t for p in lo.values() for t in (p.A, p.B))]
    names = ["grad x", "grad gate", "grad up", "grad router"] + [f"grad {p}.{ab}" for p in lo for ab in "AB"]
    grads = torch.autograd.grad(loss, inputs)
    return {
        "y": y,
        "weights": r.weights,
        "indices": r.indices,
        "probs": r.probs,
        **dict(zip(names, grads, strict=True)),
    }


def _milora_inputs(d: dict[str, Any]) -> dict[str, Any]:
    """MiLoRA inputs from the same shape: B=4 prompts of T/4 tokens (row 0 left-padded), M=7 modules, and
    T tokens of 4 sequences over 3 LoRAs (one sequence without one). Gates stay away from 0: the kernel
    gives a zero gate zero gradient, the reference s * <dy, B A x> (documented in kernels/segmented_lora.py)."""
    g = torch.Generator().manual_seed(7)
    x = d["x"]
    T, H = x.shape
    S = max(T // 4, 2)
    device = x.device

    def rand(*s, std=1.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * std).to(device)

    mask = torch.ones(4, S, dtype=torch.bool, device=device)
    mask[0, : S // 2] = False
    A, B = d["loras"]["up"]
    return dict(
        hidden=rand(4, S, H).to(x.dtype),
        mask=mask,
        router_w=rand(7, H, std=H**-0.5).float(),
        numerator=torch.tensor(reference.RATIONAL_GELU_NUMERATOR, device=device),
        denominator=torch.tensor(reference.RATIONAL_GELU_DENOMINATOR, device=device),
        pool_weight=rand(H, std=H**-0.5).float(),
        upstream_m=rand(4, 7).float(),
        token_seq=torch.arange(T, device=device) % 4,
        seq_lora=torch.tensor([0, 1, -1, 2], device=device),
        seq_gate=(torch.rand(4, generator=g, dtype=torch.float64) * 0.9 + 0.1).float().to(device),
        A=A[:3],
        B=B[:3],
        scaling=torch.tensor([2.0, 0.5, 1.0], device=device),
    )


def _run_prompt_route(impl, d, cast):
    m = _milora_inputs(d)
    leaves = [_leaf(cast(m[n])) for n in ("hidden", "router_w", "numerator", "denominator", "pool_weight")]
    hidden, router_w, num, den, pool_w = leaves
    r = impl.prompt_route(hidden, m["mask"], router_w, num, den, top_k=3, pooling="attention", pool_weight=pool_w)
    loss = (r.gates * cast(m["upstream_m"])).sum() + r.probs.square().sum()
    names = ["grad hidden", "grad router", "grad numerator", "grad denominator", "grad pool_weight"]
    grads = torch.autograd.grad(loss, leaves)
    return {"gates": r.gates, "indices": r.indices, "probs": r.probs, **dict(zip(names, grads, strict=True))}


def _run_segmented_lora(impl, d, cast):
    m = _milora_inputs(d)
    leaves = [_leaf(cast(d["x"])), _leaf(cast(m["seq_gate"])), _leaf(cast(m["A"])), _leaf(cast(m["B"]))]
    x, gate, A, B = leaves
    y = impl.segmented_lora(x, m["token_seq"], m["seq_lora"], gate, A, B, cast(m["scaling"]))
    names = ["y", "grad x", "grad seq_gate", "grad A", "grad B"]
    return dict(zip(names, [y, *_grads(y, leaves, cast(d["upstream_i"]))], strict=True))


@contextmanager
def _ffn_regime(regime: str | None) -> Iterator[None]:
    """Force the triton backend's fused-FFN regime ("dense" or "sorted"; None: the backend's own choice from
    the shapes). Forward and backward read it: keep both inside."""
    from moelora.triton_backend import FFN_REGIME_ENV

    old = os.environ.get(FFN_REGIME_ENV)
    if regime is not None:
        os.environ[FFN_REGIME_ENV] = regime
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FFN_REGIME_ENV, None)
        else:
            os.environ[FFN_REGIME_ENV] = old


def _in_regime(run: Callable, regime: str) -> Callable:
    """An op runner with the fused-FFN regime forced while it runs (its forward and its gradients)."""

    def run_in_regime(impl, d, cast):
        with _ffn_regime(regime):
            return run(impl, d, cast)

    return run_in_regime


OPS: dict[str, Callable] = {
    "route": _run_route,
    "moe_lora": _run_moe_lora,
    "moe_lora_sorted": _run_moe_lora_sorted,
    "mixlora_ffn dense": _in_regime(_run_ffn, "dense"),
    "mixlora_ffn sorted": _in_regime(_run_ffn, "sorted"),
    "routed_mixlora_ffn dense": _in_regime(_run_routed_ffn, "dense"),
    "routed_mixlora_ffn sorted": _in_regime(_run_routed_ffn, "sorted"),
    "prompt_route": _run_prompt_route,
    "segmented_lora": _run_segmented_lora,
}


def parity(shapes, dtypes: list[str], device: torch.device) -> list[dict]:
    rows = []
    for shape in shapes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            d = _op_inputs(shape, dtype, device)
            for op, fn in OPS.items():
                want = fn(reference, d, lambda t: t.double() if t.is_floating_point() else t)
                lp = fn(reference, d, lambda t: t)
                got = fn(_tb(), d, lambda t: t)
                errs = _errors(got, lp, want, dtype)
                if "indices" in errs:  # near-ties may pick another expert at 16-bit: not bounded
                    errs.pop("indices")
                rows.append(dict(op=op, shape=shape, dtype=dname, ok=all(e["ok"] for e in errs.values()), errors=errs))
    return rows


def races(shapes, dtypes: list[str], device: torch.device, repeats: int) -> list[dict]:
    """The same inputs `repeats` times: every output and gradient must be bitwise equal to the first run's."""
    rows = []
    for shape in shapes:
        for dname in dtypes:
            d = _op_inputs(shape, DTYPES[dname], device, seed=1)
            for op, fn in OPS.items():
                first = fn(_tb(), d, lambda t: t)
                bad = set()
                for _ in range(repeats - 1):
                    again = fn(_tb(), d, lambda t: t)
                    bad |= {n for n in first if not torch.equal(first[n], again[n])}
                fwd = {"y", "weights", "indices", "probs", "gates"}
                rows.append(
                    dict(
                        op=op,
                        shape=shape,
                        dtype=dname,
                        forward_bitwise=not (bad & fwd),
                        backward_bitwise=not (bad - fwd),
                        differing=sorted(bad),
                    )
                )
    return rows


# --------------------------------------------------------------------------------------------- timings


def _triton_ffn(inp: FfnInputs, fused_router: bool = True) -> Callable[[], Tensor]:
    """The triton backend's MixLoRA FFN as MixLoraFFN runs it (gate and up from the base): routed_mixlora_ffn
    (the router fused into the gate/up shrink); with fused_router=False, route then mixlora_ffn."""
    tb = _tb()
    loras = {p: ExpertLora(*inp.experts[p]) for p in ("gate_proj", "up_proj", "down_proj")}
    ffn = dict(
        gate_lora=loras["gate_proj"],
        up_lora=loras["up_proj"],
        down_lora=loras["down_proj"],
        down_proj=inp.down_proj,
        act=F.silu,
        scaling=inp.scaling,
    )

    def run() -> Tensor:
        x = inp.x
        gate, up = inp.gate_proj(x), inp.up_proj(x)
        if fused_router:
            return tb.routed_mixlora_ffn(x, inp.router, gate, up, top_k=inp.top_k, top_p=None, **ffn)[0]
        routing = tb.route(x, inp.router, top_k=inp.top_k)
        return tb.mixlora_ffn(x, gate, up, routing.weights, routing.indices, **ffn)

    return run


def _bench(step: Callable[[], object], device: torch.device, dry: bool) -> float:
    """Median milliseconds: triton.testing.do_bench on a GPU (it flushes L2), wall clock under --dry-run."""
    if dry:
        step()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing

    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def ffn_timings(Ts, dims: dict, dtype: torch.dtype, device: torch.device, dry: bool) -> list[dict]:
    providers = {
        "triton": _triton_ffn,
        "triton-apart": lambda inp: _triton_ffn(inp, fused_router=False),
        "triton-dense": _triton_ffn,
        "triton-sorted": _triton_ffn,
        "lora": PROVIDERS["lora"],
        "loop": PROVIDERS["loop"],
        "base": PROVIDERS["base"],
    }
    rows = []
    for T in Ts:
        shape = Shape(T=T, **dims)
        inp = make_inputs(shape, dtype, device)
        row: dict[str, Any] = dict(T=T, **dims, ms={})
        for name, factory in providers.items():
            fn = factory(inp)
            targets = [t for _, t in grad_targets("fused" if name.startswith("triton") else name, inp)]
            regime = name.removeprefix("triton-") if name in ("triton-dense", "triton-sorted") else None
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":

                    def step(fn=fn):
                        with torch.no_grad():
                            return fn()
                else:

                    def step(fn=fn, targets=targets, grad_out=inp.grad_out):
                        return torch.autograd.grad(fn(), targets, grad_out)

                with _ffn_regime(regime):
                    row["ms"][f"{name} {mode}"] = _bench(step, device, dry)
            del fn
        ms = row["ms"]
        row["ratios"] = {}
        for m in ("fwd", "fwd+bwd"):
            row["ratios"][f"triton / lora {m}"] = ms[f"triton {m}"] / ms[f"lora {m}"]
            row["ratios"][f"loop / triton {m}"] = ms[f"loop {m}"] / ms[f"triton {m}"]
            row["ratios"][f"triton-apart / triton {m}"] = ms[f"triton-apart {m}"] / ms[f"triton {m}"]
            row["ratios"][f"triton-dense / triton-sorted {m}"] = ms[f"triton-dense {m}"] / ms[f"triton-sorted {m}"]
        rows.append(row)
        del inp
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def regime_timings(T: int, dims: dict, Es, dtype: torch.dtype, device: torch.device, dry: bool) -> list[dict]:
    """moe_lora (the up projection's LoRA: in H, out I) in both regimes at E experts of rank r, top-k: where
    the dense-masked regime (every token computes E*r rank columns) stops paying; the backend switches at 256."""
    from moelora.kernels import moe_lora as dense_kernels
    from moelora.kernels import moe_lora_sorted as sorted_kernels

    H, I, k, r = dims["H"], dims["I"], dims["k"], dims["r"]
    rows = []
    for E in Es:
        g = torch.Generator().manual_seed(E)
        x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
        routing = reference.route(x.detach(), (torch.randn(E, H, generator=g) * 0.02).to(device), top_k=k)
        w = routing.weights.detach().requires_grad_()
        A = (torch.randn(E, r, H, generator=g) * H**-0.5).to(device=device, dtype=dtype).requires_grad_()
        B = (torch.randn(E, I, r, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_()
        dy = torch.randn(T, I, generator=g).to(device=device, dtype=dtype)
        row: dict[str, Any] = dict(T=T, H=H, I=I, E=E, k=k, r=r, ms={})
        args, leaves = (x, w, routing.indices, A, B, 2.0), (x, w, A, B)
        for name, fn in (("dense", dense_kernels.moe_lora), ("sorted", sorted_kernels.moe_lora_sorted)):

            def fwd(fn=fn, args=args):
                with torch.no_grad():
                    return fn(*args)

            def fwd_bwd(fn=fn, args=args, leaves=leaves, dy=dy):
                return torch.autograd.grad(fn(*args), leaves, dy)

            row["ms"][f"{name} fwd"] = _bench(fwd, device, dry)
            row["ms"][f"{name} fwd+bwd"] = _bench(fwd_bwd, device, dry)
        row["dense / sorted"] = {m: row["ms"][f"dense {m}"] / row["ms"][f"sorted {m}"] for m in ("fwd", "fwd+bwd")}
        rows.append(row)
    return rows


def bandwidth(Ts, dims: dict, dtype: torch.dtype, device: torch.device, dry: bool) -> list[dict]:
    """GB/s of the kernels that read x once (route alone; the gate+up shrink alone; route_shrink, the two fused),
    as bytes of x over time, next to a device copy's (which reads and writes x)."""
    from moelora.kernels import mixlora_ffn as ffn_kernels
    from moelora.kernels import route as route_kernels

    rows = []
    H, E, r, k = dims["H"], dims["E"], dims["r"], dims["k"]
    for T in Ts:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
        router = (torch.randn(E, H, generator=g) * 0.02).to(device)
        A = (torch.randn(2 * E, r, H, generator=g) * H**-0.5).to(device=device, dtype=dtype)  # gate's and up's
        x_bytes = x.numel() * x.element_size()
        copy_gbs = 2 * x_bytes / _bench(x.clone, device, dry) / 1e6
        ms = {
            "route": _bench(lambda x=x, router=router: route_kernels.route_fwd(x, router, k, None), device, dry),
            "shrink": _bench(lambda x=x, A=A: ffn_kernels.shrink_x(x, A), device, dry),
            "route_shrink": _bench(
                lambda x=x, router=router, A=A: route_kernels.route_shrink_fwd(x, router, A, k, None), device, dry
            ),
        }
        row: dict[str, Any] = dict(T=T, H=H, copy_GBps=copy_gbs)
        for name, t in ms.items():
            row[f"{name}_GBps"] = x_bytes / t / 1e6
            row[f"{name}_fraction_of_copy"] = x_bytes / t / 1e6 / copy_gbs
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    from bench.cli import _slug, device_string

    if device.type == "cuda":
        return device_string(device, 0)
    return _slug(f"cpu-interpreter-{torch.get_num_threads()}t")


def markdown(report: dict) -> str:
    lines = [f"# gpu_check on {report['device']} ({report['date']})", ""]
    lines += [f"torch {report['versions']['torch']}, triton {report['versions']['triton']}"]
    if report["dry_run"]:
        lines += ["", "**Dry run** (CPU, Triton interpreter, tiny shapes): proves the script, measures nothing."]
    bad = [r for r in report["parity"] if not r["ok"]]
    lines += [
        "",
        f"## Parity: {len(report['parity']) - len(bad)}/{len(report['parity'])} op x shape x dtype cases pass",
    ]
    for r in bad:
        worst = {n: e for n, e in r["errors"].items() if not e["ok"]}
        lines.append(f"- FAIL {r['op']} {r['shape']} {r['dtype']}: {worst}")
    racy = [r for r in report["races"] if not (r["forward_bitwise"] and r["backward_bitwise"])]
    lines += [
        "",
        f"## Repeat runs: {len(report['races']) - len(racy)}/{len(report['races'])} bitwise equal (fwd + bwd)",
    ]
    for r in racy:
        lines.append(f"- {r['op']} {r['shape']} {r['dtype']}: differing {r['differing']}")
    lines += ["", f"## MixLoRA FFN timings ({report['timing_dtype']}, median ms)", ""]
    for row in report["ffn"]:
        dims = ", ".join(f"{n}={row[n]}" for n in ("T", "H", "I", "E", "k", "r"))
        lines += [f"### {dims}", "", "| provider | fwd | fwd+bwd |", "|---|---|---|"]
        for p in ("triton", "triton-apart", "triton-dense", "triton-sorted", "lora", "loop", "base"):
            lines.append(f"| {p} | {row['ms'][f'{p} fwd']:.3f} | {row['ms'][f'{p} fwd+bwd']:.3f} |")
        lines += [""] + [f"- {k}: {v:.2f}x" for k, v in row["ratios"].items()] + [""]
    lines += ["Goals: triton / lora fwd+bwd <= 1.10 at T=8192; loop / triton >= 3 (fwd, fwd+bwd), >= 5 at T=32.", ""]
    lines += [
        "`triton` reads x once for the router and the gate/up shrink (route_shrink); `triton-apart` routes first.",
        "`triton-dense` / `triton-sorted` force the fused FFN's regime (`triton` lets the backend pick by shape).",
    ]
    lines += ["", f"## moe_lora regimes ({report['timing_dtype']}, median ms)", ""]
    lines += ["| T | H | I | E | k | r | dense fwd | sorted fwd | dense fwd+bwd | sorted fwd+bwd |"]
    lines += ["|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["regimes"]:
        dims = " | ".join(str(row[n]) for n in ("T", "H", "I", "E", "k", "r"))
        ms = " | ".join(f"{row['ms'][f'{p} {m}']:.3f}" for m in ("fwd", "fwd+bwd") for p in ("dense", "sorted"))
        lines.append(f"| {dims} | {ms} |")
    lines += ["", "The backend takes the sorted regime above E*r = 256 rank columns."]
    lines += ["", "## One read of x: bandwidth (GB/s of x read, fraction of a copy's)", ""]
    lines += ["| T | copy | route | shrink | route_shrink |", "|---|---|---|---|---|"]
    for b in report["bandwidth"]:
        cells = [
            f"{b[f'{n}_GBps']:.0f} ({b[f'{n}_fraction_of_copy']:.2f})" for n in ("route", "shrink", "route_shrink")
        ]
        lines.append(f"| {b['T']} | {b['copy_GBps']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Goal: route_shrink at >= 0.75 of copy bandwidth for T >= 4096."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, wall clock")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where the files go")
    ap.add_argument("--repeats", type=int, default=10, help="runs per op for the bitwise race check")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if dry:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    else:
        print("gpu_check: no CUDA device; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    import triton

    dtypes = ["fp32", "fp16"] if dry else ["bf16", "fp16", "fp32"]
    shapes = DRY_PARITY_SHAPES if dry else PARITY_SHAPES
    timing_dtype = torch.float32 if dry else torch.bfloat16
    dims = DRY_TIMING if dry else GOAL
    Ts = (7, 3) if dry else GOAL_T
    report = dict(
        device=device_name(device),
        date=datetime.date.today().isoformat(),
        dry_run=dry,
        versions=dict(torch=torch.__version__, triton=triton.__version__),
        parity=parity(shapes, dtypes, device),
        races=races(shapes[:1] if dry else shapes[1:3], dtypes, device, 2 if dry else args.repeats),
        timing_dtype=str(timing_dtype).removeprefix("torch."),
        ffn=ffn_timings(Ts, dims, timing_dtype, device, dry),
        bandwidth=bandwidth((5,) if dry else BANDWIDTH_T, dims, timing_dtype, device, dry),
        regimes=regime_timings(7 if dry else 8192, dims, (4, 16) if dry else REGIME_E, timing_dtype, device, dry),
    )
    text = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu-check-{report['device']}-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    ok = all(r["ok"] for r in report["parity"]) and all(
        r["forward_bitwise"] and r["backward_bitwise"] for r in report["races"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
