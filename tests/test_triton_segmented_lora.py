"""Triton segmented_lora (multi-tenant LoRA through token -> sequence maps) under the Triton CPU interpreter,
against moelora.reference.segmented_lora, through the production op moelora.triton_backend.segmented_lora.

Forward and the gradients of x, seq_gate, A, B and scaling, fp32 and fp16 (bf16 math is broken in the
interpreter: checked on a GPU only). T in {1, 7, 40}, up to 8 sequences, 1, 3 or 8 LoRAs, r in {8, 16, 32}
(and 80: two rank blocks), in/out not multiples of the 64-wide blocks; sequences laid out contiguously
(prefill), one token each in a shuffled order (decode) or interleaved; some sequences without a LoRA (-1)
and some with gate 0. A gate of exactly 0 gets gradient 0 by design (the kernel skips that sequence; the
reference gives it s * sum <dy, B A x>), so seq_gate's gradient is compared with the reference's on the
non-zero gates and must be 0 on the others. Tolerances follow flash-attn's rule: the kernel and PyTorch at
the test dtype are both compared with an fp64 reference, and the kernel may err by twice PyTorch's own error
plus 4 ulps of the output's dtype (relative to the largest value).

The kernels run in a subprocess worker (this file run as a script): `import moelora` (conftest) already
imports triton, and TRITON_INTERPRET must be set before that for triton's own jit helpers to be
interpreted. The worker also keeps an interpreter segfault from killing the pytest process.
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

from moelora.kernels.segmented_lora import check_inputs

from moelora import reference
from moelora.triton_backend import segmented_lora

NAMES = ("y", "grad_x", "grad_seq_gate", "grad_A", "grad_B", "grad_scaling")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def make_maps(T: int, n_seq: int, n_lora: int, layout: str, g: torch.Generator):
    """token_seq [T] int64, seq_lora [n_seq] int64, seq_gate [n_seq] fp32 with the edge cases in place."""
    if layout == "decode":  # one token per sequence, in a shuffled order
        token_seq = torch.randperm(n_seq, generator=g)[:T]
    else:
        token_seq = torch.randint(0, n_seq, (T,), generator=g)
        token_seq[: min(T, n_seq)] = torch.arange(min(T, n_seq))  # every sequence has a token when T allows
        if layout == "prefill":  # each sequence's tokens contiguous
            token_seq = token_seq.sort().values
    seq_lora = torch.randint(0, n_lora, (n_seq,), generator=g)
    seq_gate = torch.rand(n_seq, generator=g) + 0.1
    if n_seq >= 3:
        seq_lora[1] = -1  # no LoRA
        seq_gate[2] = 0.0  # not selected: skipped
    seq_lora[0] = n_lora - 1  # at least one active sequence, on the last LoRA
    return token_seq, seq_lora, seq_gate


def run(fn, x, token_seq, seq_lora, seq_gate, A, B, scaling, upstream):
    y = fn(x, token_seq, seq_lora, seq_gate, A, B, scaling)
    return (y, *torch.autograd.grad(y, (x, seq_gate, A, B, scaling), upstream))


CASES = [
    # T, n_seq, n_lora, r, in, out, layout, dtype
    (1, 1, 1, 8, 20, 36, "prefill", "fp32"),
    (7, 3, 3, 16, 20, 36, "prefill", "fp32"),
    (7, 7, 3, 8, 20, 36, "decode", "fp32"),
    (40, 8, 8, 32, 20, 36, "interleaved", "fp32"),
    (40, 5, 1, 16, 70, 130, "prefill", "fp32"),
    (40, 8, 3, 8, 20, 36, "interleaved", "fp32"),
    (40, 4, 3, 80, 20, 36, "prefill", "fp32"),  # two rank blocks
    (8, 8, 8, 16, 70, 36, "decode", "fp32"),
    (7, 7, 3, 16, 20, 36, "decode", "fp16"),
    (40, 8, 8, 32, 20, 36, "interleaved", "fp16"),
    (40, 5, 3, 8, 70, 130, "prefill", "fp16"),
]


def case_id(T, n_seq, n_lora, r, d_in, d_out, layout, dtype_name):
    return f"T{T}-seq{n_seq}-lora{n_lora}-r{r}-in{d_in}-out{d_out}-{layout}-{dtype_name}"


def check_case(T, n_seq, n_lora, r, d_in, d_out, layout, dtype_name) -> list[str]:
    """Kernel vs reference for one case; returns the failures (empty = pass). Runs in the worker."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(T * 10007 + n_seq * 101 + n_lora * 11 + r)
    token_seq, seq_lora, seq_gate = make_maps(T, n_seq, n_lora, layout, g)
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64).to(dtype)
    A = (torch.randn(n_lora, r, d_in, generator=g, dtype=torch.float64) / d_in**0.5).to(dtype)
    B = (torch.randn(n_lora, d_out, r, generator=g, dtype=torch.float64) / r**0.5).to(dtype)
    scaling = torch.rand(n_lora, generator=g) + 0.5
    upstream = torch.randn(T, d_out, generator=g, dtype=torch.float64).to(dtype)

    def leaves(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    want = run(reference.segmented_lora, *leaves(x.double()), token_seq, seq_lora,
               *leaves(seq_gate.double(), A.double(), B.double(), scaling.double()), upstream.double())  # fmt: skip
    torch_lp = run(
        reference.segmented_lora, *leaves(x), token_seq, seq_lora, *leaves(seq_gate, A, B, scaling), upstream
    )
    with nan_empty():
        got = run(segmented_lora, *leaves(x), token_seq, seq_lora, *leaves(seq_gate, A, B, scaling), upstream)

    active = (seq_gate != 0).to(torch.float64)
    failures = []
    for name, gk, gt, gw in zip(NAMES, got, torch_lp, want, strict=True):
        if gk.dtype != gt.dtype or gk.shape != gt.shape:
            failures.append(f"{name}: {gk.dtype}{tuple(gk.shape)} != {gt.dtype}{tuple(gt.shape)}")
            continue
        if not torch.isfinite(gk).all():
            failures.append(f"{name}: non-finite values (an unwritten output?)")
            continue
        if name == "grad_seq_gate":  # a zero gate is skipped: its gradient is 0 by design
            if (gk[active == 0] != 0).any():
                failures.append("grad_seq_gate: a zero gate got a non-zero gradient")
            gt, gw = gt * active, gw * active
        if (failure := tolerance_failure(name, gk, gt, gw, torch.finfo(gk.dtype).eps)) is not None:
            failures.append(failure)
    return failures


def check_variants() -> dict[str, list[str]]:
    """Inference path with int32 maps and a strided x; a batch where no token has an active LoRA; T = 0."""
    results = {}
    g = torch.Generator().manual_seed(0)
    token_seq, seq_lora, seq_gate = make_maps(7, 3, 3, "interleaved", g)
    x = torch.randn(20, 7, generator=g).t()  # [7, 20], strided
    A, B, scaling = torch.randn(3, 16, 20, generator=g), torch.randn(3, 36, 16, generator=g), torch.rand(3) + 0.5
    with torch.no_grad(), nan_empty():
        got = segmented_lora(x, token_seq.int(), seq_lora.int(), seq_gate, A, B, scaling)
    want = reference.segmented_lora(x, token_seq, seq_lora, seq_gate, A, B, scaling)
    err = (got - want).abs().max().item() / want.abs().max().item()
    results["no-grad-int32-strided"] = [] if err < 1e-5 else [f"relative error {err:.3g}"]

    seq_lora = torch.tensor([-1, 0, 2])
    seq_gate = torch.tensor([0.5, 0.0, 0.0])  # no LoRA, or gate 0: nothing to compute
    xs, gs, As, Bs, ss = (t.clone().requires_grad_() for t in (x, seq_gate, A, B, scaling))
    with nan_empty():
        y = segmented_lora(xs, token_seq, seq_lora, gs, As, Bs, ss)
        grads = torch.autograd.grad(y, (xs, gs, As, Bs, ss), torch.randn(y.shape, generator=g))
    failures = [] if torch.equal(y, torch.zeros_like(y)) else ["output is not zero"]
    failures += [
        f"{n}: not zero" for n, t in zip(NAMES[1:], grads, strict=True) if not torch.equal(t, torch.zeros_like(t))
    ]
    results["all-inactive"] = failures

    y = segmented_lora(torch.zeros(0, 20), torch.zeros(0, dtype=torch.long), seq_lora, seq_gate, A, B, scaling)
    results["no-tokens"] = [] if y.shape == (0, 36) else [f"shape {tuple(y.shape)}"]
    return results


def worker() -> dict[str, list[str]]:
    results = {case_id(*c): check_case(*c) for c in CASES}
    results.update(check_variants())
    return results


@pytest.mark.parametrize("case", [pytest.param(c, id=case_id(*c)) for c in CASES])
def test_matches_reference(worker_results, case):
    failures = worker_results[case_id(*case)]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("name", ["no-grad-int32-strided", "all-inactive", "no-tokens"])
def test_variants(worker_results, name):
    failures = worker_results[name]
    assert not failures, "; ".join(failures)


def _good(**change):
    args = dict(
        x=torch.randn(5, 20),
        token_seq=torch.tensor([0, 0, 1, 1, 1]),
        seq_lora=torch.tensor([1, -1]),
        seq_gate=torch.tensor([0.5, 1.0]),
        A=torch.randn(2, 8, 20),
        B=torch.randn(2, 36, 8),
        scaling=torch.tensor([2.0, 1.0]),
    )
    return {**args, **change}


BAD = [
    ("x-1d", dict(x=torch.randn(20)), ValueError, "x must be 2-d"),
    ("x-int", dict(x=torch.ones(5, 20, dtype=torch.long)), TypeError, "x must be float16"),
    ("x-fp64", dict(x=torch.randn(5, 20, dtype=torch.float64)), TypeError, "x must be float16"),
    ("token_seq-float", dict(token_seq=torch.zeros(5)), TypeError, "token_seq must be int32 or int64"),
    ("seq_lora-float", dict(seq_lora=torch.zeros(2)), TypeError, "seq_lora must be int32 or int64"),
    ("seq_gate-fp16", dict(seq_gate=torch.ones(2, dtype=torch.float16)), TypeError, "seq_gate must be float32"),
    ("scaling-fp64", dict(scaling=torch.ones(2, dtype=torch.float64)), TypeError, "scaling must be float32"),
    ("token_seq-length", dict(token_seq=torch.zeros(4, dtype=torch.long)), ValueError, "token_seq must be"),
    ("seq_gate-length", dict(seq_gate=torch.ones(3)), ValueError, "seq_gate must be"),
    ("A-in", dict(A=torch.randn(2, 8, 21)), ValueError, "A is"),
    ("B-loras", dict(B=torch.randn(3, 36, 8)), ValueError, "B must be"),
    ("B-rank", dict(B=torch.randn(2, 36, 4)), ValueError, "B must be"),
    ("scaling-length", dict(scaling=torch.ones(3)), ValueError, "scaling must be"),
    ("no-lora", dict(A=torch.randn(0, 8, 20), B=torch.randn(0, 36, 8), scaling=torch.ones(0)), ValueError, "no LoRA"),
    ("token-out-of-range", dict(token_seq=torch.tensor([0, 0, 1, 1, 2])), ValueError, "token_seq must lie in"),
    ("lora-out-of-range", dict(seq_lora=torch.tensor([2, -1])), ValueError, "seq_lora must lie in"),
    ("lora-below-minus-1", dict(seq_lora=torch.tensor([0, -2])), ValueError, "seq_lora must lie in"),
    ("A-device", dict(A=torch.randn(2, 8, 20, device="meta")), ValueError, "A is on meta"),
    (
        "T0-A-in",
        dict(x=torch.randn(0, 20), token_seq=torch.zeros(0, dtype=torch.long), A=torch.randn(2, 8, 21)),
        ValueError,
        "A is",
    ),
    ("cpu-uninterpreted", dict(), ValueError, "need CUDA tensors"),
]


@pytest.mark.parametrize(("change", "error", "match"), [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_inputs(change, error, match):
    """The kernels' checks; the backend runs them before any launch, except on an x the kernels do not take
    (an integer or fp64 x goes to the reference: test_fp64_runs_the_reference)."""
    if os.environ.get("TRITON_INTERPRET") == "1" and match == "need CUDA tensors":
        pytest.skip("the interpreter runs CPU tensors")
    args = _good(**change)
    with pytest.raises(error, match=match):
        check_inputs(**args)
    if args["x"].dtype in (torch.float16, torch.bfloat16, torch.float32):
        with pytest.raises(error, match=match):
            segmented_lora(**args)


def test_fp64_runs_the_reference():
    args = _good(x=torch.randn(5, 20, dtype=torch.float64))
    assert torch.equal(segmented_lora(**args), reference.segmented_lora(**args))


if __name__ == "__main__":
    serve(worker)
