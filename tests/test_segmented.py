"""moelora.segmented (the CPU backend's segmented_lora, grouped by adapter) against the float64 oracle."""

from __future__ import annotations

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
