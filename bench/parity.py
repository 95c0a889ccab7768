"""gpu_check's parity library: each Triton op (forward and every gradient) against moelora.reference.

`parity` checks every op at each shape and dtype with the tests' rule (the kernel's error against an fp64
reference may be at most twice PyTorch's own error at that dtype plus 4 ulps of the largest value), `races`
repeats each op and asks for bitwise-equal results, `config_parity` forces each GPU tile of every autotuned
kernel in turn. `python -m bench.gpu_check` reports them; tests (tests/test_triton_configs.py,
tests/test_triton_backend.py) run them under the interpreter. With `--dry-run` in argv, importing this module
sets TRITON_INTERPRET=1 before triton is imported, as gpu_check does.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F
from torch import Tensor

from moelora import reference
from moelora.reference import ExpertLora, FFNSpec

LOOSE_OUTPUTS = {"grad numerator": 32, "grad denominator": 32}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_START = time.perf_counter()


def _log(message: str) -> None:
    """Progress on stderr with the seconds since start: a GPU session is short, and a log cut off by its
    time limit should still say how far it got."""
    print(f"[gpu_check {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"


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
        impl = SimpleNamespace(moe_lora=functools.partial(impl.moe_lora, regime="sorted"))
    return _run_moe_lora(impl, d, cast)


def _run_ffn(impl, d, cast):
    x, gate, up, w = (_leaf(cast(d[n])) for n in ("x", "gate", "up", "weights"))
    lo = {p: ExpertLora(_leaf(cast(A)), _leaf(cast(B))) for p, (A, B) in d["loras"].items()}
    Wd, bias = cast(d["Wd"]), cast(d["bias"])
    ffn = FFNSpec(
        gate_lora=lo["gate"],
        up_lora=lo["up"],
        down_lora=lo["down"],
        down_proj=lambda h: F.linear(h, Wd.to(h.dtype), bias.to(h.dtype)),
        act=F.silu,
        scaling=2.0,
        down_bias=bias,
    )
    y = impl.mixlora_ffn(x, gate, up, w, d["indices"], ffn)
    inputs = [x, gate, up, w, *(t for p in lo.values() for t in (p.A, p.B))]
    names = ["y", "grad x", "grad gate", "grad up", "grad weights"] + [f"grad {p}.{ab}" for p in lo for ab in "AB"]
    return dict(zip(names, [y, *_grads(y, inputs, cast(d["upstream_h"]))], strict=True))


def _run_routed_ffn(impl, d, cast):
    """route + mixlora_ffn on the same x: the triton backend's routed_mixlora_ffn (route_shrink: one read of x
    for the router and the gate/up shrink), the reference's route then mixlora_ffn."""
    x, gate, up, router = (_leaf(cast(d[n])) for n in ("x", "gate", "up", "router"))
    lo = {p: ExpertLora(_leaf(cast(A)), _leaf(cast(B))) for p, (A, B) in d["loras"].items()}
    Wd = cast(d["Wd"])
    ffn = FFNSpec(
        gate_lora=lo["gate"],
        up_lora=lo["up"],
        down_lora=lo["down"],
        down_proj=lambda h: F.linear(h, Wd.to(h.dtype)),
        act=F.silu,
        scaling=2.0,
    )
    k = d["weights"].shape[1]
    if hasattr(impl, "routed_mixlora_ffn"):
        y, r = impl.routed_mixlora_ffn(x, router, gate, up, ffn, top_k=k, top_p=None)
    else:
        r = impl.route(x, router, top_k=k)
        y = impl.mixlora_ffn(x, gate, up, r.weights, r.indices, ffn)
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
                try:
                    want = fn(reference, d, lambda t: t.double() if t.is_floating_point() else t)
                    lp = fn(reference, d, lambda t: t)
                    got = fn(_tb(), d, lambda t: t)
                except Exception as e:  # one broken op (a compile error, say) must not lose the others' rows
                    rows.append(dict(op=op, shape=shape, dtype=dname, ok=False, errors={}, error=_describe(e)))
                    _log(f"parity {op} {shape} {dname}: ERROR {_describe(e)}")
                    continue
                errs = _errors(got, lp, want, dtype)
                if "indices" in errs:  # near-ties may pick another expert at 16-bit: not bounded
                    errs.pop("indices")
                rows.append(dict(op=op, shape=shape, dtype=dname, ok=all(e["ok"] for e in errs.values()), errors=errs))
            _log(f"parity {shape} {dname}: {sum(r['ok'] for r in rows)}/{len(rows)} ok so far")
    return rows


def races(shapes, dtypes: list[str], device: torch.device, repeats: int) -> list[dict]:
    """The same inputs `repeats` times: every output and gradient must be bitwise equal to the first run's."""
    rows = []
    for shape in shapes:
        for dname in dtypes:
            d = _op_inputs(shape, DTYPES[dname], device, seed=1)
            for op, fn in OPS.items():
                try:
                    first = fn(_tb(), d, lambda t: t)
                    bad = set()
                    for _ in range(repeats - 1):
                        again = fn(_tb(), d, lambda t: t)
                        bad |= {n for n in first if not torch.equal(first[n], again[n])}
                except Exception as e:
                    rows.append(
                        dict(
                            op=op,
                            shape=shape,
                            dtype=dname,
                            forward_bitwise=False,
                            backward_bitwise=False,
                            differing=[],
                            error=_describe(e),
                        )
                    )
                    continue
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


def _autotuned_kernels() -> dict[str, tuple[Any, list, tuple[str, ...]]]:
    """name -> (the kernel's Autotuner, its GPU tiles, the ops of OPS that launch it)."""
    from moelora.kernels import mixlora_ffn as ffn_kernels
    from moelora.kernels import mixlora_ffn_bwd as ffn_bwd_kernels
    from moelora.kernels import mixlora_ffn_sorted as sorted_kernels
    from moelora.kernels import mixlora_ffn_sorted_bwd as sorted_bwd_kernels
    from moelora.kernels import moe_lora as lora_kernels
    from moelora.kernels import route as route_kernels

    ffn_ops = ("routed_mixlora_ffn dense",)
    lora_ops = ("moe_lora", "routed_mixlora_ffn dense")  # the FFN's down LoRA and route_shrink backward too
    lora_tiles = {
        "moe_lora_fwd_kernel_shrink": (lora_kernels.SHRINK_TILES, ("BT", "BD")),
        "moe_lora_fwd_kernel_expand": (lora_kernels.EXPAND_TILES, ("BT", "BC")),
        "moe_lora_bwd_kernel_wgrad": (lora_kernels.WGRAD_TILES, ("BC", "BT")),
    }
    route_shrink = route_kernels.route_shrink_fwd_kernel
    kernels = {"route_shrink_fwd_kernel": (route_shrink, route_kernels.route_shrink_gpu_configs(), ffn_ops)}
    for module, name in (
        (ffn_kernels, "mixlora_ffn_fwd_kernel"),
        (ffn_bwd_kernels, "mixlora_ffn_bwd_kernel_rows"),
        (ffn_bwd_kernels, "mixlora_ffn_bwd_kernel_cols"),
    ):
        kernels[name] = (getattr(module, name), ffn_kernels.gpu_configs(), ffn_ops)
    for name, (tiles, names) in lora_tiles.items():
        kernels[name] = (getattr(lora_kernels, name), lora_kernels.gpu_configs(tiles, names), lora_ops)
    sorted_ops = ("routed_mixlora_ffn sorted",)
    for module, name in ((sorted_kernels, "ffn_sorted_fwd_kernel"), (sorted_bwd_kernels, "ffn_sorted_bwd_kernel_rows")):
        kernels[name] = (getattr(module, name), sorted_kernels.block_gpu_configs(), sorted_ops)
    wgrad = sorted_bwd_kernels.ffn_sorted_bwd_kernel_wgrad
    kernels["ffn_sorted_bwd_kernel_wgrad"] = (wgrad, sorted_kernels.wgrad_gpu_configs(), sorted_ops)
    return kernels


@contextmanager
def _forced_config(kernel: Any, config: Any) -> Iterator[None]:
    """Run `kernel` (an Autotuner) with this one config: a one-config list is launched without tuning."""
    saved = kernel.configs
    kernel.configs = [config]
    kernel.cache.clear()
    try:
        yield
    finally:
        kernel.configs = saved
        kernel.cache.clear()


def config_parity(shape, dtypes: list[str], device: torch.device) -> list[dict]:
    """Every GPU tile of every autotuned kernel, forced in turn, against the reference, through the ops that
    launch the kernel: the parity section runs the pinned tiles (MOELORA_TRITON_PIN_CONFIG=1), the timings
    whichever tile the autotuner picks; this checks them all. A tile over the device's shared memory or
    registers is recorded as skipped (ok: the autotuner skips it too). Under the interpreter (tests) the same
    GPU tiles run, one at a time, as numpy."""
    from triton.runtime.errors import OutOfResources

    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        d = _op_inputs(shape, dtype, device)
        refs: dict[str, tuple] = {}
        for name, (kernel, configs, ops) in _autotuned_kernels().items():
            for op in ops:
                run = OPS[op]
                if op not in refs:
                    refs[op] = (
                        run(reference, d, lambda t: t.double() if t.is_floating_point() else t),
                        run(reference, d, lambda t: t),
                    )
                want, lp = refs[op]
                for config in configs:
                    row: dict[str, Any] = dict(kernel=name, config=str(config), op=op, shape=shape, dtype=dname)
                    try:
                        with _forced_config(kernel, config):
                            got = run(_tb(), d, lambda t: t)
                    except OutOfResources as e:  # the autotuner skips such a tile too: not a wrong answer
                        rows.append(row | dict(ok=True, errors={}, skipped=_describe(e)))
                        continue
                    except Exception as e:
                        rows.append(row | dict(ok=False, errors={}, error=_describe(e)))
                        _log(f"configs {name} {config} {op} {dname}: ERROR {_describe(e)}")
                        continue
                    errs = _errors(got, lp, want, dtype)
                    errs.pop("indices", None)  # near-ties may pick another expert at 16-bit: not bounded
                    rows.append(row | dict(ok=all(e["ok"] for e in errs.values()), errors=errs))
            _log(f"configs {name} {dname}: {sum(r['ok'] for r in rows)}/{len(rows)} ok so far")
    return rows
