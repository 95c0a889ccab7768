"""The sorted-regime weight gradients of the fused MixLoRA FFN (`sorted_ffn_weight_grads` of
kernels/mixlora_ffn_sorted_bwd.py) under the Triton CPU interpreter, alone against a float64 per-pair oracle (the
whole regime is tested against the reference in tests/test_triton_mixlora_ffn.py).

The oracle is the math itself in float64, one (token, slot) pair at a time (`oracle` below). fp32 and fp16
activations (bf16 math is broken in the interpreter: checked on a GPU only), rank-space rows and LoRA weights
in fp32 as in a model. Tolerances follow flash-attn's rule: the kernel and the same oracle run in the test
dtype are both compared with the float64 oracle, and the kernel may err by twice the oracle's own error plus
4 ulps of the test dtype (relative to the largest value). Also: an expert without pairs gets exact zeros,
the outputs equal the dense-masked regime's (`mixlora_ffn_core_bwd`) in fp32, and reruns are bitwise equal.
The function is internal (its callers have checked their arguments), so bad inputs are tested at the public
mixlora_ffn.

The kernel runs in a worker process (this file run as a script) with TRITON_INTERPRET=1 set before triton is
imported; the worker also keeps an interpreter segfault from killing the pytest process. I is never a
multiple of the interpreter's 32-column block, and T*k/E crosses the 32-pair block in the larger cases.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the worker, before triton is imported; the pytest process stays uninterpreted
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from _triton_worker import serve
from poison import nan_empty
from tolerance import tolerance_failure

pytest.importorskip("triton")

from moelora.kernels.mixlora_ffn_bwd import mixlora_ffn_core_bwd
from moelora.kernels.mixlora_ffn_sorted_bwd import sorted_ffn_weight_grads
from moelora.kernels.moe_lora_sorted import sort_by_expert

SCALING = 1.7
H = 20  # the down LoRA's output width, for the dense comparison's q = dy_lora @ Bd_all
ACT_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ALL = ("gate", "up", "down")
NAMES = {"gate": "dBg", "up": "dBu", "down": "dAd"}


def make_routing(T: int, E: int, k: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [T, k] fp32 and indices [T, k] int64 (int32 for kind "int32"); kind picks the MoE edge case."""
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if kind == "empty-expert":  # the last expert gets no pair
        indices = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    elif kind == "one-expert":  # every pair of expert 0 (slot 0), the other slots unused
        indices = torch.full((T, k), -1, dtype=torch.int64)
        indices[:, 0] = 0
    elif kind == "unused-slots":
        indices[torch.rand(T, k, generator=g) < 0.3] = -1
    elif kind == "int32":
        indices = indices.int()
    return torch.rand(T, k, generator=g) + 0.1, indices


def make_inputs(T, I, E, R, k, kind, adapted, gated, option, dtype, seed) -> dict:
    """The launcher's arguments (less sort, E, R, ...) plus indices. option: "strided" (gate and up halves of a
    [T, 2I] tensor, grad_hbar and weights column-major), "shared-a" (au is ag) or ""."""
    g = torch.Generator().manual_seed(seed)
    weights, indices = make_routing(T, E, k, kind, g)
    N = E * R

    def rand(*shape, std=1.0, to=dtype):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(to)

    if option == "strided":
        gate, up = rand(T, 2 * I).chunk(2, dim=-1)
        grad_hbar = rand(I, T).t()
        weights = weights.t().contiguous().t()
    else:
        gate, up, grad_hbar = rand(T, I), rand(T, I), rand(T, I)
    # gate and up rank rows side by side, as the shrink writes them (row stride 2N); one block if shared
    ua = rand(T, N if option == "shared-a" else 2 * N, std=0.5, to=torch.float32)
    ag, au = (ua, ua) if option == "shared-a" else (ua[:, :N], ua[:, N:])
    return dict(
        gate=gate if gated else None,
        up=up,
        grad_hbar=grad_hbar,
        weights=weights,
        indices=indices,
        ag=ag if "gate" in adapted else None,
        au=au if "up" in adapted else None,
        q=rand(T, N, to=torch.float32) if "down" in adapted else None,
        bg=rand(N, I, std=0.3, to=torch.float32) if "gate" in adapted else None,
        bu=rand(N, I, std=0.3, to=torch.float32) if "up" in adapted else None,
        ad=rand(N, I, std=0.3, to=torch.float32) if "down" in adapted else None,
    )


def kernel(inp: dict, E: int, R: int, act: str) -> tuple:
    sort = sort_by_expert(inp["indices"], E)
    args = {n: v for n, v in inp.items() if n != "indices"}
    return sorted_ffn_weight_grads(**args, sort=sort, E=E, R=R, scaling=SCALING, act=act)


def oracle(inp: dict, E: int, R: int, act: str, dtype: torch.dtype) -> tuple:
    """(dBg, dBu, dAd) [N, I] by the math, one (token, slot) pair at a time, every operation in `dtype`."""
    t_ = {n: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for n, v in inp.items()}
    G, U, dh, w, ag, au, q, bg, bu, ad = (
        t_[n] for n in ("gate", "up", "grad_hbar", "weights", "ag", "au", "q", "bg", "bu", "ad")
    )
    s = SCALING
    N, I = E * R, U.shape[1]
    out = [torch.zeros(N, I, dtype=dtype) if b is not None else None for b in (bg, bu, ad)]
    for t in range(U.shape[0]):
        for j in range(w.shape[1]):
            e = int(inp["indices"][t, j])
            if not 0 <= e < E:
                continue
            rows = slice(e * R, (e + 1) * R)
            uu = U[t] + s * au[t, rows] @ bu[rows] if bu is not None else U[t]
            D = dh[t] + s * q[t, rows] @ ad[rows] if ad is not None else dh[t]
            dhj = w[t, j] * D
            if G is not None:
                gg = G[t] + s * ag[t, rows] @ bg[rows] if bg is not None else G[t]
            z = (gg if G is not None else uu).detach().requires_grad_()
            a = ACT_FUNCTIONS[act](z)
            (da,) = torch.autograd.grad(a.sum(), z)
            a = a.detach()
            if G is not None:
                h, dgg, duu = a * uu, dhj * uu * da, dhj * a
            else:
                h, dgg, duu = a, None, dhj * da
            if bg is not None:
                out[0][rows] += s * ag[t, rows, None] * dgg
            if bu is not None:
                out[1][rows] += s * au[t, rows, None] * duu
            if ad is not None:
                out[2][rows] += w[t, j] * s * q[t, rows, None] * h
    return tuple(out)


# T, I, E, R, k, kind, act, adapted projections, gated, option, dtypes
CASES = [
    (1, 45, 1, 4, 1, "topk", "silu", ALL, True, "", ("fp32", "fp16")),
    (7, 45, 4, 8, 2, "topk", "silu", ALL, True, "", ("fp32", "fp16")),
    (7, 45, 4, 16, 4, "topk", "gelu", ALL, True, "", ("fp32",)),  # k = E
    (63, 100, 8, 16, 2, "empty-expert", "silu", ALL, True, "", ("fp32", "fp16")),
    (63, 45, 4, 8, 2, "one-expert", "silu", ALL, True, "", ("fp32", "fp16")),  # 63 pairs in one expert's loop
    (63, 45, 16, 4, 2, "unused-slots", "gelu_tanh", ALL, True, "", ("fp32",)),
    (63, 45, 8, 32, 1, "int32", "relu", ALL, True, "", ("fp32", "fp16")),
    (33, 45, 4, 8, 2, "topk", "silu", ("up", "down"), True, "", ("fp32",)),
    (33, 45, 4, 8, 2, "topk", "gelu", ("gate", "up"), True, "", ("fp32",)),
    (33, 45, 4, 8, 2, "topk", "relu", ("gate", "down"), True, "", ("fp32",)),
    (33, 45, 4, 8, 2, "topk", "silu", ("down",), True, "", ("fp32",)),
    (33, 45, 4, 8, 2, "topk", "gelu_tanh", ("up", "down"), False, "", ("fp32", "fp16")),  # phi: fc1 / fc2
    (33, 45, 4, 8, 2, "unused-slots", "relu", ("up",), False, "", ("fp32",)),
    (33, 45, 4, 8, 2, "topk", "silu", ALL, True, "strided", ("fp32", "fp16")),
    (33, 45, 4, 8, 2, "topk", "gelu", ALL, True, "shared-a", ("fp32", "fp16")),  # phi-3: one A for gate and up
    (200, 100, 16, 4, 2, "topk", "silu", ALL, True, "", ("fp32",)),
    (200, 45, 4, 16, 2, "unused-slots", "silu", ALL, True, "", ("fp16",)),  # ~75 pairs an expert: 3 blocks
]


def case_id(T, I, E, R, k, kind, act, adapted, gated, option) -> str:
    parts = [f"T{T}-I{I}-E{E}-r{R}-k{k}", kind, act, "+".join(adapted), "gated" if gated else "ungated"]
    return "-".join([*parts, option] if option else parts)


def check_case(T, I, E, R, k, kind, act, adapted, gated, option, dtype_name) -> list[str]:
    """Kernel vs oracle for one case in one dtype; returns the failures (empty = pass). Runs in the worker."""
    dtype = DTYPES[dtype_name]
    inp = make_inputs(T, I, E, R, k, kind, adapted, gated, option, dtype, seed=T * 1000 + E * 10 + R + k)
    with nan_empty():
        got = kernel(inp, E, R, act)
    want = oracle(inp, E, R, act, torch.float64)
    torch_lp = oracle(inp, E, R, act, dtype)
    eps = torch.finfo(dtype).eps
    counts = torch.bincount(inp["indices"][(inp["indices"] >= 0)].long(), minlength=E)
    failures = []
    for proj, gk, gt, gw in zip(ALL, got, torch_lp, want, strict=True):
        name = NAMES[proj]
        if (gk is None) != (proj not in adapted):
            failures.append(f"{name}: {'None' if gk is None else 'a tensor'} with adapted={adapted}")
            continue
        if gk is None:
            continue
        if gk.dtype != torch.float32 or gk.shape != gw.shape or not gk.is_contiguous():
            failures.append(f"{name}: {gk.dtype}{tuple(gk.shape)}, want contiguous float32{tuple(gw.shape)}")
            continue
        empty = gk.view(E, R, I)[counts == 0]
        if not empty.eq(0).all():
            failures.append(f"{name}: an expert without pairs has non-zero rows")
        if (failure := tolerance_failure(name, gk, gt, gw, eps)) is not None:
            failures.append(failure)
    return failures


def check_matches_dense() -> list[str]:
    """fp32: the same gradients as the dense-masked regime's backward (mixlora_ffn_core_bwd), which pays E*r
    rank columns per pair; both take the same q = dy_lora @ Bd_all^T."""
    failures = []
    for T, I, E, R, k, kind, act, adapted, gated, option in [
        (63, 45, 8, 16, 2, "unused-slots", "silu", ALL, True, ""),
        (33, 45, 4, 8, 2, "topk", "gelu_tanh", ("up", "down"), False, ""),
        (33, 45, 4, 8, 2, "empty-expert", "gelu", ALL, True, "shared-a"),
    ]:
        inp = make_inputs(T, I, E, R, k, kind, adapted, gated, option, torch.float32, seed=5)
        N = E * R
        g = torch.Generator().manual_seed(6)
        dy, dB = torch.randn(T, H, generator=g), torch.randn(E, H, R, generator=g) * 0.3
        inp["q"] = (dy.double() @ dB.double().permute(1, 0, 2).reshape(H, N)).float() if "down" in adapted else None
        got = kernel(inp, E, R, act)
        shared = option == "shared-a"
        blocks = [inp[n][:, :N] for n in ("ag", "au") if inp[n] is not None]
        ua = blocks[0] if shared else torch.cat(blocks, dim=1)
        gB, uB = (inp[n].view(E, R, I).transpose(1, 2) if inp[n] is not None else None for n in ("bg", "bu"))
        dA = inp["ad"].view(E, R, I) if inp["ad"] is not None else None
        down = "down" in adapted
        dense = mixlora_ffn_core_bwd(
            inp["grad_hbar"], inp["q"], ua, inp["gate"], inp["up"], inp["weights"], inp["indices"],
            gB, uB, dA, SCALING, act, shared,
        )  # fmt: skip
        dense_rows = [
            dense[4].transpose(1, 2).reshape(N, I) if dense[4] is not None else None,
            dense[5].transpose(1, 2).reshape(N, I) if dense[5] is not None else None,
            dense[6].reshape(N, I) if down else None,
        ]
        for proj, a, b in zip(ALL, got, dense_rows, strict=True):
            if (a is None) != (b is None):
                failures.append(f"T{T}-E{E} {NAMES[proj]}: present in one regime only")
            elif a is not None and not (err := (a - b).abs().max().item() / b.abs().max().item()) < 1e-5:
                failures.append(f"T{T}-E{E} {NAMES[proj]}: relative error {err:.3g} against the dense regime")
    return failures


def check_deterministic() -> list[str]:
    """Two runs give bitwise-equal gradients (no atomics)."""
    failures = []
    for dtype in DTYPES.values():
        inp = make_inputs(200, 45, 4, 16, 2, "unused-slots", ALL, True, "", dtype, seed=3)
        first, second = kernel(inp, 4, 16, "silu"), kernel(inp, 4, 16, "silu")
        failures += [
            f"{dtype} {n} differs" for n, a, b in zip(ALL, first, second, strict=True) if not torch.equal(a, b)
        ]
    return failures


def check_no_tokens() -> list[str]:
    """T = 0: exact zeros [N, I], no launch."""
    inp = make_inputs(1, 45, 4, 8, 2, "topk", ALL, True, "", torch.float32, seed=0)
    inp = {n: v[:0] if n not in ("bg", "bu", "ad") else v for n, v in inp.items()}
    with nan_empty():
        got = kernel(inp, 4, 8, "silu")
    ok = all(t.shape == (32, 45) and t.eq(0).all() for t in got)
    return [] if ok else [f"shapes {[tuple(t.shape) for t in got]} or non-zero values"]


def worker() -> dict[str, list[str]]:
    results = {f"{case_id(*c[:-1])}-{d}": check_case(*c[:-1], d) for c in CASES for d in c[-1]}
    checks = {"dense": check_matches_dense, "deterministic": check_deterministic, "no-tokens": check_no_tokens}
    for name, check in checks.items():
        results[name] = check()
    return results


@pytest.mark.parametrize(
    "name", [pytest.param(f"{case_id(*c[:-1])}-{d}", id=f"{case_id(*c[:-1])}-{d}") for c in CASES for d in c[-1]]
)
def test_matches_oracle(worker_results, name):
    failures = worker_results[name]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("check", ["dense", "deterministic", "no-tokens"])
def test_worker_check(worker_results, check):
    failures = worker_results[check]
    assert not failures, "; ".join(failures)


if __name__ == "__main__":
    serve(worker)
