"""The router fused with the gate/up LoRA shrink (x @ [Wr | A_all]^T, one read of x), under the interpreter.

Two levels, fp32 and fp16, forward and every gradient, with NaN-poisoned allocations:
- the kernel (moelora.kernels.route.route_shrink_fwd / route_shrink_bwd) against reference.route and the
  plain product x @ A_all^T, by the flash-attn rule of tests/test_triton_moe_lora.py (fp64 oracle; the kernel
  may err by twice PyTorch's own error at the test dtype plus 4 ulps);
- the triton backend's routed_mixlora_ffn (route_shrink, then the fused FFN from its rank-space rows) against
  the reference route + mixlora_ffn: llama-style, phi-3's shared gate/up A, phi's ungated fc1/fc2, top-p,
  partial LoRAs, LoRA dropout (a seeded LoraDropout on both sides); a counter on route_shrink_fwd says which
  path ran (fused at <= 256 rank columns, with or without dropout; apart above that and without gate/up LoRAs).

Kernels run in a subprocess worker (this file as a script), as in the other Triton test files.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the child, before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from _triton_worker import serve
from poison import nan_empty
from tolerance import tolerance_failure

pytest.importorskip("triton")

from moelora import reference
from moelora.dropout import LoraDropout
from moelora.reference import ExpertLora, FFNSpec

WORKER_TIMEOUT = 900  # seconds: the interpreter worker (tests/_triton_worker.py)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
H, I = 20, 28  # not multiples of any block size

# --- kernel level -------------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # id, T, E, r, P (LoRAs stacked in A), k (None = top-p 0.6)
    ("T1-E1-r4-P1-k1", 1, 1, 4, 1, 1),
    ("T7-E4-r8-P2-k2", 7, 4, 8, 2, 2),
    ("T63-E4-r4-P1-kE", 63, 4, 4, 1, 4),
    ("T63-E8-r16-P2-k2", 63, 8, 16, 2, 2),  # MixLoRA: 256 rank columns, the kernel's limit
    ("T200-E16-r8-P2-k1", 200, 16, 8, 2, 1),
    ("T63-E8-r4-P2-topp", 63, 8, 4, 2, None),
]
KERNEL_NAMES = ("weights", "probs", "ua", "grad_x", "grad_router", "grad_A")


def _tolerance_failures(names, got, torch_lp, want, dtype) -> list[str]:
    eps = torch.finfo(dtype).eps
    failures = []
    for name, gk, gt, gw in zip(names, got, torch_lp, want, strict=True):
        if gk.shape != gt.shape:
            failures.append(f"{name}: shape {tuple(gk.shape)} != {tuple(gt.shape)}")
            continue
        if (failure := tolerance_failure(name, gk, gt, gw, eps)) is not None:
            failures.append(failure)
    return failures


def _reference_route_shrink(x, router, A, k, top_p, upstream):
    """(weights, probs, ua, grad_x, grad_router, grad_A) by plain PyTorch autograd; ua in the compute dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, router, A)]
    xl, rl, al = leaves
    routing = reference.route(xl, rl, top_k=k, top_p=top_p)
    dt = reference.compute_dtype(xl)
    ua = xl.to(dt) @ al.reshape(-1, al.shape[-1]).to(dt).t()
    gw, gp, gu = upstream
    loss = (routing.weights * gw.to(dt)).sum() + (routing.probs * gp.to(dt)).sum() + (ua * gu.to(dt)).sum()
    return (routing.weights, routing.probs, ua, *torch.autograd.grad(loss, leaves)), routing.indices


def check_kernel(T, E, r, P, k, dtype_name) -> list[str]:
    from moelora.kernels.route import route_shrink_bwd, route_shrink_fwd

    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(T * 100 + E * 10 + r + P)
    x = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    router = (torch.randn(E, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    A = (torch.randn(P * E, r, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    kk = k if k is not None else E
    upstream = [torch.randn(T, kk, generator=g), torch.randn(T, E, generator=g), torch.randn(T, P * E * r, generator=g)]
    top_p = None if k is not None else 0.6

    want, want_idx = _reference_route_shrink(x.double(), router.double(), A.double(), k, top_p, upstream)
    torch_lp, _ = _reference_route_shrink(x, router, A, k, top_p, upstream)
    with nan_empty():
        weights, indices, probs, ua = route_shrink_fwd(x, router, A, kk, top_p)
        grads = route_shrink_bwd(*upstream, x, router, A, weights, indices, probs, k is not None)
    failures = []
    if not torch.equal(indices, want_idx):
        failures.append("indices differ from the reference's")
    if ua.dtype != torch.float32 or weights.dtype != torch.float32:
        failures.append(f"ua {ua.dtype}, weights {weights.dtype}: both must be fp32")
    torch_lp = [t.float() if i < 3 else t for i, t in enumerate(torch_lp)]  # the fp16 torch oracle routes in fp32
    return failures + _tolerance_failures(KERNEL_NAMES, (weights, probs, ua, *grads), torch_lp, want, dtype)


def check_weights_cast_once() -> list[str]:
    """fp16 x, fp32 A: A rounded to fp16 once on the host (from CAST_WEIGHTS_MIN_T tokens) gives the kernel's
    outputs bitwise as rounding it in the kernel."""
    from moelora.kernels import _common
    from moelora.kernels.route import route_shrink_fwd

    g = torch.Generator().manual_seed(5)
    x = torch.randn(63, H, generator=g).half()
    router = torch.randn(8, H, generator=g) * 0.5
    A = torch.randn(16, 16, H, generator=g) / H**0.5
    default = _common.CAST_WEIGHTS_MIN_T
    runs = []
    try:
        for min_t in (0, 1 << 30):  # always cast on the host; never
            _common.CAST_WEIGHTS_MIN_T = min_t
            runs.append(route_shrink_fwd(x, router, A, 2, None))
    finally:
        _common.CAST_WEIGHTS_MIN_T = default
    names = ("weights", "indices", "probs", "ua")
    return [f"{n} differs" for n, a, b in zip(names, *runs, strict=True) if not torch.equal(a, b)]


# --- backend level ------------------------------------------------------------------------------------------------

FFN_CASES = [
    # id, family, E, r, k (None = top-p 0.6), loras, LoRA dropout, expected path
    ("llama-E4-r8-k2", "gated", 4, 8, 2, "gate,up,down", False, "fused"),
    ("llama-E8-r16-k2", "gated", 8, 16, 2, "gate,up,down", False, "fused"),  # MixLoRA's shape: 256 rank columns
    ("llama-topp", "gated", 4, 4, None, "gate,up,down", False, "fused"),
    ("phi3-shared-A", "shared", 4, 8, 2, "gate,up,down", False, "fused"),
    ("phi-ungated", "ungated", 4, 8, 2, "up,down", False, "fused"),
    ("llama-up-only", "gated", 4, 8, 1, "up", False, "fused"),
    ("llama-down-only", "gated", 4, 8, 2, "down", False, "apart"),  # no gate/up shrink to fuse with
    ("llama-E16-r16", "gated", 16, 16, 2, "gate,up,down", False, "apart"),  # 512 rank columns: route + mixlora_ffn
    ("llama-lora-dropout", "gated", 4, 8, 2, "gate,up,down", True, "fused"),  # the masks run inside the kernels
]
FFN_ACT = {"gated": F.silu, "shared": F.silu, "ungated": torch.nn.GELU(approximate="tanh")}


def _ffn_inputs(family, E, r, loras, g, T=37):
    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    d = dict(x=rand(T, H), router=rand(E, H, scale=0.5), Wg=rand(I, H, scale=H**-0.5), Wu=rand(I, H, scale=H**-0.5))
    d["Wd"] = rand(H, I, scale=I**-0.5)
    d["gate_A"] = rand(E, r, H, scale=H**-0.5)
    d["up_A"] = d["gate_A"] if family == "shared" else rand(E, r, H, scale=H**-0.5)
    d["gate_B"], d["up_B"] = rand(E, I, r, scale=0.3), rand(E, I, r, scale=0.3)
    d["down_A"], d["down_B"] = rand(E, r, I, scale=I**-0.5), rand(E, H, r, scale=0.3)
    d["upstream"] = rand(T, H)
    if family == "ungated" or "gate" not in loras:
        del d["gate_A"], d["gate_B"]
    for p in ("up", "down"):
        if p not in loras:
            del d[f"{p}_A"], d[f"{p}_B"]
    return d


def _run_ffn(impl, d, family, k, dtype, dropout_input: bool):
    """(y, weights, probs, grads of every leaf) through impl.routed_mixlora_ffn (or ops-style route + ffn)."""
    names = [n for n in d if n not in ("upstream", "up_A") or (n == "up_A" and family != "shared")]
    leaves = {n: d[n].to(dtype).detach().clone().requires_grad_() for n in names}
    if family == "shared" and "up_A" in d:
        leaves["up_A"] = leaves["gate_A"]
    x = leaves["x"]
    gate = F.linear(x, leaves["Wg"]) if family != "ungated" else None
    up = F.linear(x, leaves["Wu"])

    def lora(p):
        return ExpertLora(leaves[f"{p}_A"], leaves[f"{p}_B"], None) if f"{p}_A" in leaves else None

    kw = dict(gate_lora=lora("gate"), up_lora=lora("up"), down_lora=lora("down"), act=FFN_ACT[family], scaling=2.0)
    kw["down_proj"] = lambda h: F.linear(h, leaves["Wd"])
    top = dict(top_k=k, top_p=None if k is not None else 0.6)
    if dropout_input:  # what the layer passes in training with lora_dropout > 0: a seeded dropout
        kw["dropout"] = LoraDropout(0.25, 11)
    if impl is reference:
        routing = reference.route(x, leaves["router"], **top)
        y = reference.mixlora_ffn(x, gate, up, routing.weights, routing.indices, FFNSpec(**kw))
    else:
        y, routing = impl.routed_mixlora_ffn(x, leaves["router"], gate, up, FFNSpec(**kw), **top)
    loss = (y * d["upstream"].to(dtype)).sum() + (routing.probs**2).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    named = {"y": y, "weights": routing.weights, "probs": routing.probs}
    named.update({f"grad_{n}": gr for n, gr in zip(leaves, grads, strict=True) if n != "up_A" or family != "shared"})
    return named


def check_ffn(family, E, r, k, loras, dropout, path, dtype_name) -> list[str]:
    import moelora.kernels.route as route_kernels

    from moelora import set_backend, triton_backend

    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(E * 100 + r)
    d = _ffn_inputs(family, E, r, loras.split(","), g)
    calls = []
    fused_fwd = route_kernels.route_shrink_fwd

    def counting(*args):
        calls.append(1)
        return fused_fwd(*args)

    route_kernels.route_shrink_fwd = counting
    try:
        want = _run_ffn(reference, {n: t.double() for n, t in d.items()}, family, k, torch.float64, dropout)
        torch_lp = _run_ffn(reference, d, family, k, dtype, dropout)
        with nan_empty(), set_backend("triton"):
            got = _run_ffn(triton_backend, d, family, k, dtype, dropout)
    finally:
        route_kernels.route_shrink_fwd = fused_fwd
    failures = []
    ran = "fused" if calls else "apart"
    if ran != path:
        failures.append(f"expected the {path} path, ran {ran} (route_shrink_fwd called {len(calls)} times)")
    keys = [n for n in want if want[n] is not None]
    torch_lp = {n: t.float() if n in ("weights", "probs") else t for n, t in torch_lp.items()}
    return failures + _tolerance_failures(
        keys, [got[n] for n in keys], [torch_lp[n] for n in keys], [want[n] for n in keys], dtype
    )


def worker() -> dict[str, list[str]]:
    out = {}
    for case_id, *args in KERNEL_CASES:
        for dtype_name in DTYPES:
            out[f"kernel-{case_id}-{dtype_name}"] = check_kernel(*args, dtype_name)
    for case_id, *args in FFN_CASES:
        for dtype_name in DTYPES:
            out[f"ffn-{case_id}-{dtype_name}"] = check_ffn(*args, dtype_name)
    out["weights-cast-once"] = check_weights_cast_once()
    return out


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", [c[0] for c in KERNEL_CASES])
def test_route_shrink_kernel_matches_reference(worker_results, case, dtype_name):
    failures = worker_results[f"kernel-{case}-{dtype_name}"]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", [c[0] for c in FFN_CASES])
def test_routed_mixlora_ffn_matches_reference(worker_results, case, dtype_name):
    failures = worker_results[f"ffn-{case}-{dtype_name}"]
    assert not failures, "; ".join(failures)


def test_weights_cast_once_changes_nothing(worker_results):
    failures = worker_results["weights-cast-once"]
    assert not failures, "; ".join(failures)


def test_route_shrink_rejects_too_many_rank_columns():
    from moelora.kernels.route import ROUTE_SHRINK_MAX_N, route_shrink_fwd

    A = torch.zeros(ROUTE_SHRINK_MAX_N // 16 + 1, 16, H)
    with pytest.raises(ValueError, match="rank columns"):
        route_shrink_fwd(torch.zeros(3, H), torch.zeros(4, H), A, 2, None)


if __name__ == "__main__":
    serve(worker)
