"""Triton mixlora_ffn under the Triton CPU interpreter against moelora.reference.mixlora_ffn, in both regimes:
dense-masked (kernels/mixlora_ffn.py) and combination-sorted (kernels/mixlora_ffn_sorted.py).

Through the production op, moelora.triton_backend.mixlora_ffn (rank_shrink, mixlora_ffn and down_expand,
the frozen Wd between the last two), with the regime forced by MOELORA_FFN_REGIME. Its y is compared with
the reference's y; then the gradients
of x, gate, up, the routing weights and every present A and B. fp32 and fp16 activations (bf16 math is
broken in the interpreter: checked on a GPU only); LoRA weights in fp32, as in a model (the kernel rounds
them to fp16 inside its dots). Tolerances follow flash-attn's rule: the kernel and PyTorch at the test
dtype are both compared with an fp64 reference, and the kernel may err by twice PyTorch's own error plus
4 ulps of the test dtype (relative to the largest value).

The kernels run in a worker process (this file run as a script) with TRITON_INTERPRET=1 set before triton
is imported; the worker also keeps an interpreter segfault from killing the pytest process. The test
shapes cross every block boundary of the interpreter's tiles (32 tokens, 32 columns of I, 128 rank
columns) and split the reductions over several slices (the interpreter asks for 4 programs).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

if __name__ == "__main__":  # the worker, before triton is imported; the pytest process stays uninterpreted
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from _triton_worker import serve
from poison import nan_empty
from tolerance import tolerance_failure
from transformers.activations import ACT2FN

pytest.importorskip("triton")

from moelora.kernels.mixlora_ffn import check_inputs

from moelora import reference, triton_backend
from moelora.reference import ExpertLora, FFNSpec

WORKER_TIMEOUT = 900  # seconds: the interpreter worker (tests/_triton_worker.py)

SCALING = 1.7
ACT_FUNCTIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": ACT2FN["gelu_pytorch_tanh"], "relu": F.relu}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ALL = ("gate", "up", "down")


def make_routing(T: int, E: int, k: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [T, k] fp32 (renormalised top-k of random probabilities) and indices [T, k] int64."""
    logits = torch.randn(T, E, generator=g)
    if kind == "empty-expert" and k < E:
        logits[:, E - 1] = -1e9  # the last expert gets no token
    if kind == "one-expert":
        logits[:, 0] = 1e9  # every token's first slot is expert 0
    weights, indices = torch.softmax(logits, -1).topk(k, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    if kind == "one-expert":  # and its other slots unused, with a non-zero weight the kernel must ignore
        indices[:, 1:] = -1
    if kind == "unused-slots":
        unused = torch.rand(T, k, generator=g) < 0.3
        unused[:, 0] = False
        indices[unused] = -1
    return weights, indices


# T, H, I, E, k, r, kind, act, adapted projections, gated, dtypes
CASES = [
    (1, 20, 40, 1, 1, 4, "topk", "silu", ALL, True, ("fp32",)),
    (7, 20, 40, 4, 2, 8, "topk", "silu", ALL, True, ("fp32", "fp16")),
    (7, 20, 40, 4, 4, 16, "topk", "gelu", ALL, True, ("fp32",)),  # k = E
    (63, 36, 72, 8, 2, 16, "empty-expert", "silu", ALL, True, ("fp32", "fp16")),
    (63, 20, 40, 8, 2, 32, "one-expert", "silu", ALL, True, ("fp32",)),  # E*r = 256: two rank chunks
    (63, 20, 40, 16, 2, 4, "unused-slots", "gelu_tanh", ALL, True, ("fp32",)),
    (7, 20, 40, 16, 16, 8, "topk", "silu", ALL, True, ("fp32",)),  # k = E = 16
    (7, 20, 40, 16, 1, 32, "topk", "silu", ALL, True, ("fp32",)),  # E*r = 512: four rank chunks
    (33, 20, 40, 4, 2, 8, "topk", "silu", ("up", "down"), True, ("fp32", "fp16")),
    (33, 20, 40, 4, 2, 8, "topk", "gelu", ("gate", "up"), True, ("fp32",)),
    (33, 20, 40, 4, 2, 8, "topk", "relu", ("gate", "down"), True, ("fp32",)),
    (33, 20, 40, 4, 2, 8, "topk", "silu", ("down",), True, ("fp32",)),
    (33, 20, 40, 4, 2, 8, "topk", "gelu_tanh", ("up", "down"), False, ("fp32", "fp16")),  # phi: fc1/fc2
    (33, 20, 40, 4, 2, 8, "unused-slots", "relu", ("up",), False, ("fp32",)),
    (200, 20, 40, 8, 2, 16, "topk", "silu", ALL, True, ("fp32",)),
]
NAMED_CASES = {
    "T{}-H{}-I{}-E{}-k{}-r{}-{}-{}-{}-{}".format(
        T, H, I, E, k, r, kind, act, "+".join(adapted), "gated" if gated else "ungated"
    ): (T, H, I, E, k, r, kind, act, adapted, gated, dtypes)
    for T, H, I, E, k, r, kind, act, adapted, gated, dtypes in CASES
}


def _inputs(T, H, I, E, k, r, kind, gated, adapted, dtype, g, strided=False, shared_a=False):
    weights, indices = make_routing(T, E, k, kind, g)

    def rand(*shape, std=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(dtype)

    x = rand(T, H)
    if strided:  # phi3's gate_up_proj output chunked in two: row stride 2I; x a column-strided view
        gate, up = rand(T, 2 * I).chunk(2, dim=-1)
        x = rand(T, 2 * H)[:, ::2]
    else:
        gate, up = (rand(T, I) if gated else None), rand(T, I)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    loras = {
        p: (
            torch.randn(E, r, dims[p][0], generator=g) * dims[p][0] ** -0.5,
            torch.randn(E, dims[p][1], r, generator=g) * 0.3,
        )
        for p in adapted
    }
    if shared_a:  # phi-3's gate_up_proj: one A, its B split by rows into the gate and up halves
        loras["up"] = (loras["gate"][0], loras["up"][1])
    Wd = rand(H, I, std=I**-0.5)
    upstream = rand(T, H)
    return x, gate, up, weights, indices, loras, Wd, upstream


@contextmanager
def ffn_regime(regime: str | None):
    """The fused FFN's regime forced (MOELORA_FFN_REGIME) for the forward and backward ops run inside."""
    old = os.environ.get(triton_backend.FFN_REGIME_ENV)
    if regime is not None:
        os.environ[triton_backend.FFN_REGIME_ENV] = regime
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(triton_backend.FFN_REGIME_ENV, None)
        else:
            os.environ[triton_backend.FFN_REGIME_ENV] = old


def mixlora_ffn(x, gate, up, weights, indices, loras, Wd, act, impl=triton_backend):
    """y of impl's mixlora_ffn (the Triton backend's op, or the reference) with the frozen down projection Wd;
    loras: {projection: (A, B)}."""
    ffn = FFNSpec(
        **{f"{p}_lora": ExpertLora(*loras[p]) if p in loras else None for p in ALL},
        down_proj=lambda h: F.linear(h, Wd.to(h.dtype)),
        act=ACT_FUNCTIONS[act],
        scaling=SCALING,
    )
    return impl.mixlora_ffn(x, gate, up, weights, indices, ffn)


def _run(impl, x, gate, up, weights, indices, loras, Wd, upstream, act, regime=None):
    """y and the gradients of (x, gate, up, weights, each A and B) through impl (triton_backend, in `regime`, or
    the reference)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, gate, up, weights)]
    lo = {p: tuple(t.detach().clone().requires_grad_() for t in ab) for p, ab in loras.items()}
    if "gate" in loras and "up" in loras and loras["up"][0] is loras["gate"][0]:
        lo["up"] = (lo["gate"][0], lo["up"][1])  # keep the one shared A one leaf: its gradient sums both uses
    x, gate, up, weights = leaves
    names = ["x", "gate", "up", "weights"] + [f"{p}.{ab}" for p in lo for ab in "AB"]
    inputs = [*leaves, *(t for ab in lo.values() for t in ab)]
    kept = [(n, t) for n, t in zip(names, inputs, strict=True) if t is not None]
    with ffn_regime(regime):
        y = mixlora_ffn(x, gate, up, weights, indices, lo, Wd, act, impl)
        # x is unused without a gate or up LoRA: its gradient is then zero
        grads = torch.autograd.grad(y, [t for _, t in kept], upstream.to(y.dtype), allow_unused=True)
    return {
        "y": y,
        **{f"grad {n}": gr if gr is not None else torch.zeros_like(t) for (n, t), gr in zip(kept, grads, strict=True)},
    }


def check(
    T, H, I, E, k, r, kind, act, adapted, gated, dtype_name, strided=False, shared_a=False, regime=None
) -> list[str]:
    """Kernel vs reference for one case; returns the failures (empty = pass). Runs in the worker."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + r + k + I)
    args = _inputs(T, H, I, E, k, r, kind, gated, adapted, dtype, g, strided, shared_a)
    x, gate, up, weights, indices, loras, Wd, upstream = args

    def f64(t):
        return t.double() if t is not None else None

    loras64 = {p: (A.double(), B.double()) for p, (A, B) in loras.items()}
    if shared_a:
        loras64["up"] = (loras64["gate"][0], loras64["up"][1])
    want = _run(reference, *map(f64, (x, gate, up, weights)), indices, loras64, Wd.double(), upstream.double(), act)
    torch_lp = _run(reference, *args, act)
    with nan_empty():
        got = _run(triton_backend, *args, act, regime)

    eps = torch.finfo(dtype).eps
    failures = []
    assert got.keys() == want.keys(), (got.keys(), want.keys())
    for name in want:
        gk, gt, gw = got[name], torch_lp[name], want[name]
        if gk.dtype != gt.dtype or gk.shape != gt.shape:
            failures.append(f"{name}: {gk.dtype}{tuple(gk.shape)} != {gt.dtype}{tuple(gt.shape)}")
            continue
        if (failure := tolerance_failure(name, gk, gt, gw, eps)) is not None:
            failures.append(failure)
    return failures


def check_no_grad_int32(regime: str) -> list[str]:
    """Inference path (no autograd) with int32 indices, a bf16-free fp32 run: y against the reference."""
    g = torch.Generator().manual_seed(0)
    x, gate, up, weights, indices, loras, Wd, _ = _inputs(
        9, 20, 40, 4, 2, 8, "unused-slots", True, ALL, torch.float32, g
    )
    with torch.no_grad(), nan_empty(), ffn_regime(regime):
        got = mixlora_ffn(x, gate, up, weights, indices.int(), loras, Wd, "silu")
    want = mixlora_ffn(x, gate, up, weights, indices, loras, Wd, "silu", reference)
    err = (got - want).abs().max().item() / want.abs().max().item()
    return [] if err < 1e-5 else [f"relative error {err:.3g}"]


def check_deterministic(regime: str) -> list[str]:
    """Two runs, forward and backward, agree bitwise: no atomics, fixed-order sums over slices."""
    g = torch.Generator().manual_seed(1)
    args = _inputs(40, 20, 72, 8, 2, 16, "topk", True, ALL, torch.float32, g)
    runs = [_run(triton_backend, *args, "silu", regime) for _ in range(2)]
    return [name for name in runs[0] if not torch.equal(runs[0][name], runs[1][name])]


def check_duplicate_experts(regime: str) -> list[str]:
    """A token naming one expert in two slots (route never does; a caller may): both slots' work adds up."""
    g = torch.Generator().manual_seed(2)
    x, gate, up, weights, indices, loras, Wd, upstream = _inputs(
        40, 20, 40, 4, 3, 8, "topk", True, ALL, torch.float32, g
    )
    indices[::3, 2] = indices[::3, 0]
    want = _run(reference, x, gate, up, weights, indices, loras, Wd, upstream, "silu")
    got = _run(triton_backend, x, gate, up, weights, indices, loras, Wd, upstream, "silu", regime)
    return [name for name in want if not torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-4)]


def check_weights_cast_once(regime: str) -> list[str]:
    """fp16 activations, fp32 LoRA weights: rounding the weights to fp16 once on the host (from
    CAST_WEIGHTS_MIN_T tokens) gives the same outputs and gradients, bitwise, as rounding them in the kernels."""
    from moelora.kernels import _common

    g = torch.Generator().manual_seed(3)
    args = _inputs(40, 20, 72, 8, 2, 16, "topk", True, ALL, torch.float16, g)
    default = _common.CAST_WEIGHTS_MIN_T
    runs = []
    try:
        for min_t in (0, 1 << 30):  # always cast on the host; never
            _common.CAST_WEIGHTS_MIN_T = min_t
            runs.append(_run(triton_backend, *args, "silu", regime))
    finally:
        _common.CAST_WEIGHTS_MIN_T = default
    return [name for name in runs[0] if not torch.equal(runs[0][name], runs[1][name])]


def check_down_expand_rounds_once() -> list[str]:
    """down_expand with Wd hbar (fp16, contiguous or strided) is the fp32 delta added to Wd hbar in fp32 and
    rounded once, bitwise: what the caller's separate add and cast computed before the epilogue took them."""
    from moelora.kernels.mixlora_ffn_shrink_expand import down_expand

    g = torch.Generator().manual_seed(4)
    zd, dB = torch.randn(40, 32, generator=g), torch.randn(4, 20, 8, generator=g) * 0.3
    bases = {
        "contiguous": torch.randn(40, 20, generator=g).half(),
        "strided": torch.randn(40, 40, generator=g).half()[:, ::2],
    }
    failures = []
    for name, base in bases.items():
        got = down_expand(zd, dB, base, torch.float16)
        want = (base.float() + down_expand(zd, dB, None, torch.float16)).half()
        if got.dtype != torch.float16 or not torch.equal(got, want):
            failures.append(f"{name}: differs from the separate fp32 add")
    return failures


REGIMES = ("dense", "sorted")


def worker() -> dict[str, list[str]]:
    results = {
        f"{name}-{d}-{regime}": check(*case[:-1], d, regime=regime)
        for name, case in NAMED_CASES.items()
        for d in case[-1]
        for regime in REGIMES
    }
    for regime in REGIMES:
        results[f"strided-phi3-layout-{regime}"] = check(
            33, 20, 40, 4, 2, 8, "topk", "silu", ALL, True, "fp32", strided=True, regime=regime
        )
        for d in DTYPES:
            results[f"shared-A-phi3-{d}-{regime}"] = check(
                33, 20, 40, 4, 2, 8, "topk", "silu", ALL, True, d, shared_a=True, regime=regime
            )
        results[f"no-grad-int32-{regime}"] = check_no_grad_int32(regime)
        results[f"deterministic-{regime}"] = check_deterministic(regime)
        results[f"duplicate-experts-{regime}"] = check_duplicate_experts(regime)
        results[f"weights-cast-once-{regime}"] = check_weights_cast_once(regime)
    results["down-expand-rounds-once"] = check_down_expand_rounds_once()
    return results


@pytest.mark.parametrize(
    "case_id", [f"{name}-{d}-{r}" for name, case in NAMED_CASES.items() for d in case[-1] for r in REGIMES]
)
def test_matches_reference(worker_results, case_id):
    failures = worker_results[case_id]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize(
    "case_id",
    [
        f"{name}-{regime}"
        for regime in REGIMES
        for name in (
            "strided-phi3-layout",
            "shared-A-phi3-fp32",
            "shared-A-phi3-fp16",
            "no-grad-int32",
            "deterministic",
            "duplicate-experts",
            "weights-cast-once",
        )
    ],
)
def test_layouts_inference_and_determinism(worker_results, case_id):
    failures = worker_results[case_id]
    assert not failures, "; ".join(failures)


def test_down_expand_adds_wd_hbar_before_its_one_rounding(worker_results):
    failures = worker_results["down-expand-rounds-once"]
    assert not failures, "; ".join(failures)


def _good(T=5, H=12, I=20, E=4, r=8):
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(T, H, generator=g),
        gate=torch.randn(T, I, generator=g),
        up=torch.randn(T, I, generator=g),
        weights=torch.rand(T, 2, generator=g),
        indices=torch.zeros(T, 2, dtype=torch.long),
        gate_lora=(torch.randn(E, r, H, generator=g), torch.randn(E, I, r, generator=g)),
        up_lora=(torch.randn(E, r, H, generator=g), torch.randn(E, I, r, generator=g)),
        down_lora=(torch.randn(E, r, I, generator=g), torch.randn(E, H, r, generator=g)),
    )


# id, change, error, match, whether the backend hands these inputs to the kernels (else the reference runs them:
# an integer or fp64 up, no LoRA, an activation without a kernel) or fails before (not an (A, B) pair)
BAD = [
    ("x-1d", dict(x=torch.randn(12)), ValueError, "x must be 2-d", True),
    ("up-int", dict(up=torch.ones(5, 20, dtype=torch.long)), TypeError, "up must be float16", False),
    ("up-fp64", dict(up=torch.randn(5, 20, dtype=torch.float64)), TypeError, "up must be float16", False),
    ("dtype-mismatch", dict(x=torch.randn(5, 12, dtype=torch.float16)), TypeError, "dtype mismatch: x", True),
    ("gate-shape", dict(gate=torch.randn(5, 21)), ValueError, "must be \\[T, H\\], \\[T, I\\]", True),
    ("weights-rows", dict(weights=torch.rand(4, 2)), ValueError, "weights", True),
    ("indices-float", dict(indices=torch.zeros(5, 2)), TypeError, "indices must be int32 or int64", True),
    (
        "gate-A-in",
        dict(gate_lora=(torch.randn(4, 8, 13), torch.randn(4, 20, 8))),
        ValueError,
        "gate_lora must be",
        True,
    ),
    ("up-B-rank", dict(up_lora=(torch.randn(4, 8, 12), torch.randn(4, 20, 4))), ValueError, "up_lora must be", True),
    (
        "down-experts",
        dict(down_lora=(torch.randn(3, 8, 20), torch.randn(3, 12, 8))),
        ValueError,
        "down_lora must be",
        True,
    ),
    ("lora-not-pair", dict(up_lora=torch.randn(4, 8, 12)), TypeError, "up_lora must be an \\(A, B\\) pair", False),
    ("no-lora", dict(gate_lora=None, up_lora=None, down_lora=None), ValueError, "no LoRA", False),
    ("gate-lora-ungated", dict(gate=None), ValueError, "gate LoRA needs the base gate", True),
    ("device", dict(up=torch.randn(5, 20, device="meta")), ValueError, "is on cpu but up is on meta", True),
    ("index-too-big", dict(indices=torch.full((5, 2), 4)), ValueError, "indices must lie in", True),
    ("act", dict(act="tanh"), ValueError, "act must be one of", False),
    ("cpu-tensors", dict(), ValueError, "need CUDA tensors", True),  # this process does not interpret
]


def _backend_call(args: dict) -> torch.Tensor:
    loras = {p: args[f"{p}_lora"] for p in ALL if args[f"{p}_lora"] is not None}
    Wd = torch.randn(args["x"].shape[-1], args["up"].shape[-1])
    return mixlora_ffn(args["x"], args["gate"], args["up"], args["weights"], args["indices"], loras, Wd, args["act"])


@pytest.mark.parametrize(("change", "error", "match", "kernels"), [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_inputs(change, error, match, kernels, monkeypatch):
    """The kernels' checks; the backend runs them before any launch on the inputs it gives the kernels."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = {**_good(), "act": "silu", **change}
    loras = {p: args[f"{p}_lora"] for p in ALL}
    with pytest.raises(error, match=match):
        check_inputs(args["x"], args["gate"], args["up"], args["weights"], args["indices"], loras, args["act"])
    if kernels:
        with pytest.raises(error, match=match):
            _backend_call(args)


def test_bad_regime(monkeypatch):
    """The ops pick their kernels with ffn_regime, which refuses an unknown forced regime."""
    monkeypatch.setenv(triton_backend.FFN_REGIME_ENV, "fast")
    with pytest.raises(ValueError, match="MOELORA_FFN_REGIME must be 'auto', 'dense' or 'sorted', got 'fast'"):
        triton_backend.ffn_regime(5, 4, 2)


def test_empty_batch_runs_no_kernel(monkeypatch):
    """T = 0 goes to the reference: an empty y, nothing launched."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a launch would raise: CPU tensors, not interpreted
    y = _backend_call({**_good(T=0), "act": "silu"})
    assert y.shape == (0, 12) and y.dtype == torch.float32


if __name__ == "__main__":
    serve(worker)
