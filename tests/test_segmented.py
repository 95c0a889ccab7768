"""moelora.segmented (the CPU backend's segmented_lora, grouped by adapter) against the float64 oracle."""

from __future__ import annotations

import re

import oracle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelora import segmented

F64 = torch.float64

CASES = [
    # T, token_seq, seq_lora, n_lora, gates (None: random, the first sequence's 0)
    pytest.param(7, [0, 0, 1, 1, 1, 2, 2], [1, -1, 0], 2, None, id="one-seq-without-lora"),
    pytest.param(5, [0, 1, 2, 3, 4], [0, 1, 2, 0, 1], 3, None, id="decode-five-tenants"),
    pytest.param(6, [0, 0, 0, 0, 0, 0], [0], 1, [0.7], id="one-adapter-every-row"),
    pytest.param(4, [0, 0, 1, 1], [0, 0], 1, [0.0, 0.0], id="every-gate-zero"),
    pytest.param(4, [0, 0, 1, 1], [-1, -1], 1, [1.0, 1.0], id="no-adapter-at-all"),
    pytest.param(0, [], [0, 1], 2, [1.0, 1.0], id="no-tokens"),
]


def _inputs(T, seq_lora, n_lora, gates, g):
    x = torch.randn(T, 6, generator=g, dtype=F64)
    A = torch.randn(n_lora, 4, 6, generator=g, dtype=F64)
    B = torch.randn(n_lora, 5, 4, generator=g, dtype=F64)
    gate = torch.rand(len(seq_lora), generator=g, dtype=F64) if gates is None else torch.tensor(gates, dtype=F64)
    if gates is None:
        gate[0] = 0.0  # a module the sequence's router did not pick
    scaling = torch.tensor([2.0, 0.5, 1.0][:n_lora], dtype=F64)
    return x, A, B, gate, scaling


@pytest.mark.parametrize(("T", "token_seq", "seq_lora", "n_lora", "gates"), CASES)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_segmented_lora_matches_the_oracle(T, token_seq, seq_lora, n_lora, gates, grad):
    x, A, B, gate, scaling = _inputs(T, seq_lora, n_lora, gates, torch.Generator().manual_seed(3))
    leaves = [x, A, B, gate]
    for t in leaves:
        t.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = segmented.segmented_lora(
            x, torch.tensor(token_seq, dtype=torch.int64), torch.tensor(seq_lora), gate, A, B, scaling
        )
    assert y.shape == (T, 5) and y.dtype == F64
    if T == 0:
        return
    expected = oracle.segmented_lora(x, token_seq, seq_lora, gate, A, B, scaling)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    if grad:
        up = torch.randn(T, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
        if not y.requires_grad:  # no row has an adapter: a constant 0, as in the reference
            assert not expected.requires_grad or (
                torch.autograd.grad(expected, leaves, up, allow_unused=True)[0] is None
            )
            return
        got = torch.autograd.grad(y, leaves, up, allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad(expected, leaves, up, allow_unused=True, materialize_grads=True)
        for name, a, e in zip(["x", "A", "B", "seq_gate"], got, want, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_segmented_lora_keeps_the_input_dtype(dtype):
    x, A, B, gate, scaling = _inputs(5, [0, 1, 2, 0, 1], 3, None, torch.Generator().manual_seed(5))
    token_seq, seq_lora = torch.arange(5), torch.tensor([0, 1, 2, 0, 1])
    y = segmented.segmented_lora(x.to(dtype), token_seq, seq_lora, gate.float(), A, B, scaling.float())
    expected = oracle.segmented_lora(x.to(dtype).double(), token_seq.tolist(), seq_lora.tolist(), gate, A, B, scaling)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    T=st.integers(0, 70),
    n_seq=st.integers(1, 5),
    n_lora=st.integers(1, 4),
    r=st.integers(1, 6),
    zero_gates=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_segmented_lora_property_against_the_oracle(T, n_seq, n_lora, r, zero_gates, seed):
    g = torch.Generator().manual_seed(seed)
    token_seq = torch.randint(0, n_seq, (T,), generator=g)
    seq_lora = torch.randint(-1, n_lora, (n_seq,), generator=g)
    x = torch.randn(T, 5, generator=g, dtype=F64)
    A, B = torch.randn(n_lora, r, 5, generator=g, dtype=F64), torch.randn(n_lora, 3, r, generator=g, dtype=F64)
    gate, scaling = torch.rand(n_seq, generator=g, dtype=F64), torch.rand(n_lora, generator=g, dtype=F64) + 0.5
    if zero_gates:
        gate = gate * (torch.rand(n_seq, generator=g) < 0.5)
    y = segmented.segmented_lora(x, token_seq, seq_lora, gate, A, B, scaling)
    assert y.shape == (T, 3)
    if T:
        expected = oracle.segmented_lora(x, token_seq.tolist(), seq_lora.tolist(), gate, A, B, scaling)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


# The C++ decode kernel (csrc/segmented_lora.cpp): the cpu backend's segmented_lora up to
# SEGMENTED_DECODE_TOKENS tokens without a gradient. Built wherever there is a compiler (test_cpu_backend.py
# fails loudly when it is not).
DECODE_CASES = [
    # T, n_seq, n_lora, r, in (in = 13: a tail after the 8-wide partial sums), dtype
    pytest.param(1, 1, 1, 4, 16, F64, id="one-token"),
    pytest.param(8, 8, 8, 32, 64, F64, id="decode-8-tenants"),
    pytest.param(7, 3, 2, 5, 13, F64, id="odd-sizes"),
    pytest.param(64, 32, 5, 8, 24, F64, id="most-tokens"),
    pytest.param(8, 8, 3, 16, 40, torch.float32, id="fp32"),
    pytest.param(8, 4, 3, 16, 40, torch.bfloat16, id="bf16"),
]


@pytest.mark.parametrize(("T", "n_seq", "n_lora", "r", "width", "dtype"), DECODE_CASES)
def test_cpu_decode_kernel_matches_the_oracle(T, n_seq, n_lora, r, width, dtype):
    cpu = pytest.importorskip("moelora.cpu_backend", reason="moelora._C not built")
    g = torch.Generator().manual_seed(T + r)
    token_seq = torch.randint(0, n_seq, (T,), generator=g)
    seq_lora = torch.randint(-1, n_lora, (n_seq,), generator=g)
    x = torch.randn(T, width, generator=g, dtype=F64).to(dtype)
    A, B = torch.randn(n_lora, r, width, generator=g, dtype=F64), torch.randn(n_lora, 9, r, generator=g, dtype=F64)
    gate = torch.rand(n_seq, generator=g, dtype=F64) * (torch.rand(n_seq, generator=g) < 0.7)
    scaling = torch.rand(n_lora, generator=g, dtype=F64) + 0.5
    if dtype != F64:
        A, B, gate, scaling = A.float(), B.float(), gate.float(), scaling.float()
    with torch.no_grad():
        y = cpu.segmented_lora(x, token_seq, seq_lora, gate, A, B, scaling)
    ran = torch.ops.moelora.segmented_lora_decode(x, token_seq, seq_lora, gate, A, B, scaling)
    assert torch.equal(y, ran)  # the kernel is what ran
    expected = oracle.segmented_lora(x.double(), token_seq.tolist(), seq_lora.tolist(), gate, A, B, scaling)
    assert y.dtype == dtype
    tol = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


BAD_DECODE_INPUTS = [
    pytest.param({"token_seq": torch.tensor([0, 2])}, "token_seq[1] = 2 outside [0, 2)", id="token-seq-range"),
    pytest.param({"seq_lora": torch.tensor([0, 1])}, "seq_lora[1] = 1 outside [-1, 1)", id="seq-lora-range"),
    pytest.param({"token_seq": torch.tensor([0, 1], dtype=torch.int32)}, "token_seq must be int64", id="int32"),
    pytest.param({"A": torch.randn(1, 4, 5)}, "A must be [n_lora, r, in=6]", id="A-width"),
    pytest.param({"scaling": torch.ones(2)}, "scaling must be [n_lora=1]", id="scaling-size"),
    pytest.param({"seq_gate": torch.ones(3)}, "seq_gate must be [n_seq]", id="gate-size"),
]


@pytest.mark.parametrize(("change", "message"), BAD_DECODE_INPUTS)
def test_cpu_decode_kernel_names_bad_input(change, message):
    pytest.importorskip("moelora.cpu_backend", reason="moelora._C not built")
    args = {
        "x": torch.randn(2, 6),
        "token_seq": torch.tensor([0, 1]),
        "seq_lora": torch.tensor([0, -1]),
        "seq_gate": torch.ones(2),
        "A": torch.randn(1, 4, 6),
        "B": torch.randn(1, 3, 4),
        "scaling": torch.ones(1),
    }
    args.update(change)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.moelora.segmented_lora_decode(**args)
