"""Triton moe_lora (dense-masked) under the Triton CPU interpreter against moelora.reference.moe_lora.

Through the production op, moelora.triton_backend.moe_lora, with the dense-masked regime forced (the backend
takes it up to 256 rank columns E*r; here at any E*r).

Forward and the gradients of x, weights, A and B, fp32 and fp16 (bf16 math is broken in the interpreter:
checked on a GPU only). Tolerances follow flash-attn's rule: both the kernel and PyTorch at the test dtype
are compared with an fp64 reference, and the kernel may err by twice PyTorch's own error plus 4 ulps of
the test dtype (relative to the largest value).

The kernel runs in the interpreter worker (tests/_triton_worker.py: this file run as a script).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the child, before triton is imported; the pytest process itself stays uninterpreted
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from _triton_worker import serve
from poison import nan_empty
from tolerance import tolerance_failure

pytest.importorskip("triton")

from moelora.kernels.moe_lora import check_inputs

from moelora import reference, triton_backend

IN, OUT = 20, 36  # not multiples of any block size
SCALING = 2.0
NAMES = ("y", "grad_x", "grad_weights", "grad_A", "grad_B")


def make_routing(T: int, E: int, k: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [T, k] fp32 and indices [T, k] int64; kind picks the MoE edge case."""
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if kind == "empty-expert" and k < E:  # the last expert gets no token
        indices = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    elif kind == "one-expert":  # every token's first slot is expert 0, the other slots unused
        indices = torch.full((T, k), -1, dtype=torch.int64)
        indices[:, 0] = 0
    elif kind == "unused-slots":
        indices[torch.rand(T, k, generator=g) < 0.3] = -1
    weights = torch.rand(T, k, generator=g) + 0.1
    return weights, indices


def moe_lora(x, weights, indices, A, B, scaling):
    return triton_backend.moe_lora(x, weights, indices, A, B, scaling, regime="dense")


def run(fn, x, weights, indices, A, B, upstream):
    y = fn(x, weights, indices, A, B, SCALING)
    return (y, *torch.autograd.grad(y, (x, weights, A, B), upstream))


CASES = [
    # T, E, r, k, kind
    (1, 1, 4, 1, "topk"),
    (7, 4, 8, 2, "topk"),
    (7, 8, 4, 8, "topk"),
    (63, 4, 4, 4, "topk"),
    (63, 8, 16, 2, "empty-expert"),
    (63, 4, 8, 2, "one-expert"),
    (63, 8, 16, 2, "unused-slots"),
    (63, 16, 32, 1, "topk"),  # E*r = 512: several rank-space tiles
    (500, 8, 16, 2, "topk"),  # MixLoRA's 8 x 16
    (500, 16, 16, 2, "empty-expert"),  # E*r = 256: one tile
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def case_id(T, E, r, k, kind, dtype_name):
    return f"T{T}-E{E}-r{r}-k{k}-{kind}-{dtype_name}"


def check_case(T, E, r, k, kind, dtype_name) -> list[str]:
    """Kernel vs reference for one case; returns the failures (empty = pass). Runs in the worker."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + r + k)
    weights, indices = make_routing(T, E, k, kind, g)
    x = torch.randn(T, IN, generator=g, dtype=torch.float64).to(dtype)
    A = (torch.randn(E, r, IN, generator=g, dtype=torch.float64) / IN**0.5).to(dtype)
    B = (torch.randn(E, OUT, r, generator=g, dtype=torch.float64) / r**0.5).to(dtype)
    upstream = torch.randn(T, OUT, generator=g, dtype=torch.float64).to(dtype)

    def leaves(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    # fp64 oracle from the same inputs, already rounded to the test dtype.
    x64, w64, A64, B64 = (t.double() for t in (x, weights, A, B))
    want = run(reference.moe_lora, *leaves(x64, w64), indices, *leaves(A64, B64), upstream.double())
    torch_lp = run(reference.moe_lora, *leaves(x, weights), indices, *leaves(A, B), upstream)
    with nan_empty():
        got = run(moe_lora, *leaves(x, weights), indices, *leaves(A, B), upstream)

    eps = torch.finfo(dtype).eps
    failures = []
    for name, gk, gt, gw in zip(NAMES, got, torch_lp, want, strict=True):
        if gk.dtype != gt.dtype or gk.shape != gt.shape:
            failures.append(f"{name}: {gk.dtype}{tuple(gk.shape)} != {gt.dtype}{tuple(gt.shape)}")
            continue
        if (failure := tolerance_failure(name, gk, gt, gw, eps)) is not None:
            failures.append(failure)
    return failures


def check_no_grad_int32() -> list[str]:
    """Inference (no autograd) with int32 indices."""
    g = torch.Generator().manual_seed(0)
    weights, indices = make_routing(7, 4, 2, "unused-slots", g)
    x, A, B = torch.randn(7, IN, generator=g), torch.randn(4, 8, IN, generator=g), torch.randn(4, OUT, 8, generator=g)
    with torch.no_grad(), nan_empty():
        got = moe_lora(x, weights, indices.int(), A, B, SCALING)
    want = reference.moe_lora(x, weights, indices, A, B, SCALING)
    err = (got - want).abs().max().item() / want.abs().max().item()
    return [] if err < 1e-5 else [f"relative error {err:.3g}"]


def worker() -> dict[str, list[str]]:
    results = {case_id(*c, d): check_case(*c, d) for c in CASES for d in DTYPES}
    results["no-grad-int32"] = check_no_grad_int32()
    return results


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(
    ("T", "E", "r", "k", "kind"), [pytest.param(*c, id="T{}-E{}-r{}-k{}-{}".format(*c)) for c in CASES]
)
def test_matches_reference(worker_results, T, E, r, k, kind, dtype_name):
    failures = worker_results[case_id(T, E, r, k, kind, dtype_name)]
    assert not failures, "; ".join(failures)


def test_no_grad_path_and_int32_indices(worker_results):
    failures = worker_results["no-grad-int32"]
    assert not failures, "; ".join(failures)


def test_empty_tokens():
    y = moe_lora(torch.zeros(0, IN), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), *_weights(), SCALING)
    assert y.shape == (0, OUT)


def _weights(E=4, r=8):
    return torch.randn(E, r, IN), torch.randn(E, OUT, r)


def _good():
    A, B = _weights()
    return dict(x=torch.randn(5, IN), weights=torch.rand(5, 2), indices=torch.zeros(5, 2, dtype=torch.long), A=A, B=B)


T0 = dict(x=torch.randn(0, IN), weights=torch.rand(0, 2), indices=torch.zeros(0, 2, dtype=torch.long))
BAD = [
    ("x-1d", dict(x=torch.randn(IN)), ValueError, "x must be 2-d"),
    ("x-int", dict(x=torch.ones(5, IN, dtype=torch.long)), TypeError, "x must be float16"),
    ("x-fp64", dict(x=torch.randn(5, IN, dtype=torch.float64)), TypeError, "x must be float16"),
    ("weights-rows", dict(weights=torch.rand(4, 2)), ValueError, "weights"),
    ("indices-shape", dict(indices=torch.zeros(5, 3, dtype=torch.long)), ValueError, "indices"),
    ("indices-float", dict(indices=torch.zeros(5, 2)), TypeError, "indices must be int32 or int64"),
    ("A-in", dict(A=torch.randn(4, 8, IN + 1)), ValueError, "A is"),
    ("B-experts", dict(B=torch.randn(3, OUT, 8)), ValueError, "B must be"),
    ("B-rank", dict(B=torch.randn(4, OUT, 4)), ValueError, "B must be"),
    ("A-device", dict(A=torch.randn(4, 8, IN, device="meta")), ValueError, "A is on meta"),
    ("index-too-big", dict(indices=torch.full((5, 2), 4)), ValueError, "indices must lie in"),
    ("index-below-minus-1", dict(indices=torch.full((5, 2), -2)), ValueError, "indices must lie in"),
    # T = 0: checked like any T before the backend hands the empty batch to the reference
    ("T0-A-in", {**T0, "A": torch.randn(4, 8, IN + 1)}, ValueError, "A is"),
    ("T0-indices-float", {**T0, "indices": torch.zeros(0, 2)}, TypeError, "indices must be int32 or int64"),
]


@pytest.mark.parametrize(("change", "error", "match"), [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_inputs(change, error, match):
    """The kernels' checks; the backend runs them before any launch, except on an x the kernels do not take
    (an integer or fp64 x goes to the reference: test_fp64_runs_the_reference)."""
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        check_inputs(*args.values())
    if args["x"].dtype in (torch.float16, torch.bfloat16, torch.float32):
        with pytest.raises(error, match=match):
            moe_lora(*args.values(), SCALING)


def test_fp64_runs_the_reference():
    args = {**_good(), "x": torch.randn(5, IN, dtype=torch.float64)}
    assert torch.equal(moe_lora(*args.values(), SCALING), reference.moe_lora(*args.values(), SCALING))


if __name__ == "__main__":
    serve(worker)
