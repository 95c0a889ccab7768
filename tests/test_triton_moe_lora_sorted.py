"""Triton moe_lora, sorted regime (large E*r), under the Triton CPU interpreter against moelora.reference.moe_lora.

Forward and the gradients of x, weights, A and B, fp32 and fp16 (bf16 math is broken in the interpreter:
checked on a GPU only). Tolerances follow flash-attn's rule: both the kernel and PyTorch at the test dtype
are compared with an fp64 reference, and the kernel may err by twice PyTorch's own error plus 4 ulps of
the test dtype (relative to the largest value). Through the production op, moelora.triton_backend.moe_lora,
with the sorted regime forced. Also: `sort_by_expert` against a plain Python oracle, the
sorted regime against the dense-masked one, bitwise-equal reruns, and the input errors of `moe_lora`.

The kernels run in the interpreter worker (tests/_triton_worker.py: this file run as a script).
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
from moelora.kernels.moe_lora_sorted import moe_lora_sorted_bwd, moe_lora_sorted_fwd, sort_by_expert

from moelora import reference, triton_backend

IN, OUT = 20, 36  # not multiples of any block size
SCALING = 2.0
NAMES = ("y", "grad_x", "grad_weights", "grad_A", "grad_B")


def make_routing(T: int, E: int, k: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [T, k] fp32 and indices [T, k] int64 (int32 for kind "int32"); kind picks the MoE edge case."""
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if kind == "empty-expert" and k < E:  # the last expert gets no token
        indices = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
    elif kind == "one-expert":  # every token's first slot is expert 0, the other slots unused
        indices = torch.full((T, k), -1, dtype=torch.int64)
        indices[:, 0] = 0
    elif kind == "unused-slots":
        indices[torch.rand(T, k, generator=g) < 0.3] = -1
    elif kind == "int32":
        indices = indices.int()
    weights = torch.rand(T, k, generator=g) + 0.1
    return weights, indices


def make_inputs(T, E, r, k, kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weights, indices = make_routing(T, E, k, kind, g)
    x = torch.randn(T, IN, generator=g, dtype=torch.float64).to(dtype)
    A = (torch.randn(E, r, IN, generator=g, dtype=torch.float64) / IN**0.5).to(dtype)
    B = (torch.randn(E, OUT, r, generator=g, dtype=torch.float64) / r**0.5).to(dtype)
    upstream = torch.randn(T, OUT, generator=g, dtype=torch.float64).to(dtype)
    return x, weights, indices, A, B, upstream


def moe_lora(x, weights, indices, A, B, scaling):
    """The production op in the dense-masked regime."""
    return triton_backend.moe_lora(x, weights, indices, A, B, scaling, regime="dense")


def moe_lora_sorted(x, weights, indices, A, B, scaling):
    """The production op in the sorted regime (the backend takes it above 256 rank columns; here at any E*r)."""
    return triton_backend.moe_lora(x, weights, indices, A, B, scaling, regime="sorted")


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def run(fn, x, weights, indices, A, B, upstream):
    x, weights, A, B = leaves(x, weights, A, B)
    y = fn(x, weights, indices, A, B, SCALING)
    return (y, *torch.autograd.grad(y, (x, weights, A, B), upstream))


CASES = [
    # T, E, r, k, kind
    (1, 1, 4, 1, "topk"),
    (7, 4, 8, 2, "topk"),
    (7, 8, 4, 8, "topk"),  # k == E
    (63, 4, 16, 4, "int32"),  # k == E, int32 indices
    (63, 8, 16, 2, "empty-expert"),
    (63, 4, 8, 2, "one-expert"),  # every pair in one expert's blocks, the rest unused
    (63, 8, 32, 2, "unused-slots"),
    (63, 16, 32, 1, "topk"),  # k == 1: the pair buffer is y itself
    (500, 16, 16, 2, "unused-slots"),
    (500, 64, 16, 2, "topk"),  # E*r = 1024: the regime's reason to exist
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def case_id(T, E, r, k, kind, dtype_name):
    return f"T{T}-E{E}-r{r}-k{k}-{kind}-{dtype_name}"


def check_case(T, E, r, k, kind, dtype_name) -> list[str]:
    """Kernel vs reference for one case; returns the failures (empty = pass). Runs in the worker."""
    dtype = DTYPES[dtype_name]
    x, weights, indices, A, B, upstream = make_inputs(T, E, r, k, kind, dtype, T * 1000 + E * 10 + r + k)
    # fp64 oracle from the same inputs, already rounded to the test dtype.
    want = run(
        reference.moe_lora, *(t.double() for t in (x, weights)), indices, A.double(), B.double(), upstream.double()
    )
    torch_lp = run(reference.moe_lora, x, weights, indices, A, B, upstream)
    with nan_empty():
        got = run(moe_lora_sorted, x, weights, indices, A, B, upstream)

    eps = torch.finfo(dtype).eps
    failures = []
    for name, gk, gt, gw in zip(NAMES, got, torch_lp, want, strict=True):
        if gk.dtype != gt.dtype or gk.shape != gt.shape or not gk.is_contiguous():
            failures.append(f"{name}: {gk.dtype}{tuple(gk.shape)} != {gt.dtype}{tuple(gt.shape)} or not contiguous")
            continue
        if (failure := tolerance_failure(name, gk, gt, gw, eps)) is not None:
            failures.append(failure)
    return failures


def check_no_grad() -> list[str]:
    """Inference: the op without autograd matches the reference; the launcher with save=False stores no u and
    writes the same y, bitwise, as with save=True."""
    x, weights, indices, A, B, _ = make_inputs(63, 16, 16, 2, "unused-slots", torch.float32, 0)
    with torch.no_grad(), nan_empty():
        got = moe_lora_sorted(x, weights, indices, A, B, SCALING)
        y_lean, u_lean, _ = moe_lora_sorted_fwd(x, weights, indices, A, B, SCALING, save=False)
        y_saved, u_saved, _ = moe_lora_sorted_fwd(x, weights, indices, A, B, SCALING, save=True)
    want = reference.moe_lora(x, weights, indices, A, B, SCALING)
    err = (got - want).abs().max().item() / want.abs().max().item()
    failures = [] if err < 1e-5 else [f"relative error {err:.3g}"]
    if u_lean is not None or u_saved is None or not torch.equal(y_lean, y_saved):
        failures.append("save=False: u stored, or y differs from save=True's")
    return failures


def check_matches_dense() -> list[str]:
    """The sorted regime against the dense-masked kernel (same math, different schedule), fp32."""
    failures = []
    for T, E, r, k, kind in [(63, 8, 16, 2, "unused-slots"), (100, 16, 32, 4, "topk")]:
        inputs = make_inputs(T, E, r, k, kind, torch.float32, 7)
        with nan_empty():
            dense = run(moe_lora, *inputs)
            got = run(moe_lora_sorted, *inputs)
        for name, a, b in zip(NAMES, got, dense, strict=True):
            err = (a - b).abs().max().item() / b.abs().max().item()
            if not err < 1e-5:
                failures.append(f"T{T}-E{E} {name}: relative error {err:.3g}")
    return failures


def check_deterministic() -> list[str]:
    """Two runs give bitwise-equal outputs and gradients (no atomics anywhere)."""
    failures = []
    for dtype in DTYPES.values():
        inputs = make_inputs(200, 16, 16, 2, "unused-slots", dtype, 3)
        first, second = run(moe_lora_sorted, *inputs), run(moe_lora_sorted, *inputs)
        failures += [
            f"{dtype} {n} differs" for n, a, b in zip(NAMES, first, second, strict=True) if not torch.equal(a, b)
        ]
    return failures


def check_empty_host() -> list[str]:
    """T = 0 through the host functions themselves (the public function returns early): exact zero gradients."""
    x, dy, weights, indices = torch.zeros(0, IN), torch.zeros(0, OUT), torch.zeros(0, 2), torch.zeros(0, 2).long()
    A, B = torch.randn(4, 8, IN), torch.randn(4, OUT, 8)
    with nan_empty():
        y, u, sort = moe_lora_sorted_fwd(x, weights, indices, A, B, SCALING, save=True)
        grads = moe_lora_sorted_bwd(dy, x, weights, indices, A, B, u, sort, SCALING)
    shapes = [tuple(t.shape) for t in (y, *grads)]
    failures = [] if shapes == [(0, OUT), (0, IN), (0, 2), (4, 8, IN), (4, OUT, 8)] else [f"shapes {shapes}"]
    return failures + ([] if grads[2].eq(0).all() and grads[3].eq(0).all() else ["grad_A / grad_B not zero"])


def worker() -> dict[str, list[str]]:
    results = {case_id(*c, d): check_case(*c, d) for c in CASES for d in DTYPES}
    for name, check in [
        ("no-grad", check_no_grad),
        ("dense", check_matches_dense),
        ("deterministic", check_deterministic),
        ("empty-host", check_empty_host),
    ]:
        results[name] = check()
    return results


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(
    ("T", "E", "r", "k", "kind"), [pytest.param(*c, id="T{}-E{}-r{}-k{}-{}".format(*c)) for c in CASES]
)
def test_matches_reference(worker_results, T, E, r, k, kind, dtype_name):
    failures = worker_results[case_id(T, E, r, k, kind, dtype_name)]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("check", ["no-grad", "dense", "deterministic", "empty-host"])
def test_worker_check(worker_results, check):
    failures = worker_results[check]
    assert not failures, "; ".join(failures)


def sort_oracle(indices: torch.Tensor, E: int) -> tuple[list[int], list[int]]:
    """Pair ids grouped by expert in pair order, then the unused ones; offsets from the group sizes."""
    flat = indices.reshape(-1).tolist()
    groups = [[p for p, e in enumerate(flat) if e == g] for g in range(E)]
    unused = [p for p, e in enumerate(flat) if not 0 <= e < E]
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + len(group))
    return [p for group in groups for p in group] + unused, offsets


SORTS = [
    ("random", torch.randint(0, 6, (50, 2), generator=torch.Generator().manual_seed(0)), 6),
    ("unused-and-out-of-range", torch.tensor([[2, -1], [0, 2], [5, 0], [-1, -1], [1, 3]]), 3),
    ("int32-k1-empty-experts", torch.tensor([[3], [3], [0], [3]], dtype=torch.int32), 5),
    ("all-unused", torch.full((4, 3), -1), 2),
    ("no-tokens", torch.zeros(0, 2, dtype=torch.long), 4),
]


@pytest.mark.parametrize(("indices", "E"), [pytest.param(*s[1:], id=s[0]) for s in SORTS])
def test_sort_by_expert(indices, E):
    order, offsets = sort_by_expert(indices, E)
    want_order, want_offsets = sort_oracle(indices, E)
    assert order.dtype == offsets.dtype == torch.int64
    assert order.tolist() == want_order
    assert offsets.tolist() == want_offsets


def test_empty_tokens():
    A, B = torch.randn(4, 8, IN), torch.randn(4, OUT, 8)
    y = moe_lora_sorted(torch.zeros(0, IN), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), A, B, SCALING)
    assert y.shape == (0, OUT) and y.dtype == torch.float32


BAD = [
    ("x-1d", dict(x=torch.randn(IN))),
    ("x-fp64", dict(x=torch.randn(5, IN, dtype=torch.float64))),
    ("indices-float", dict(indices=torch.zeros(5, 2))),
    ("B-rank", dict(B=torch.randn(4, OUT, 4))),
    ("index-too-big", dict(indices=torch.full((5, 2), 4))),
]


def _good():
    A, B = torch.randn(4, 8, IN), torch.randn(4, OUT, 8)
    return dict(x=torch.randn(5, IN), weights=torch.rand(5, 2), indices=torch.zeros(5, 2, dtype=torch.long), A=A, B=B)


@pytest.mark.parametrize("change", [pytest.param(b[1], id=b[0]) for b in BAD])
def test_bad_inputs_match_dense(change):
    """Both regimes raise what the kernels' checks raise; fp64, which the kernels refuse, runs the reference in
    both."""
    args = {**_good(), **change}
    with pytest.raises((TypeError, ValueError)) as checked:
        check_inputs(*args.values())
    if args["x"].dtype == torch.float64:
        want = reference.moe_lora(*args.values(), SCALING)
        assert torch.equal(moe_lora(*args.values(), SCALING), want)
        assert torch.equal(moe_lora_sorted(*args.values(), SCALING), want)
        return
    for fn in (moe_lora, moe_lora_sorted):
        with pytest.raises(checked.type) as got:
            fn(*args.values(), SCALING)
        assert str(got.value) == str(checked.value)


if __name__ == "__main__":
    serve(worker)
