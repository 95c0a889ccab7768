"""The fused FFN's regime choice and the combination sort behind the sorted regime (torch ops only: no kernel).

combo_sort must give every token exactly one padded row, start every combination on a block boundary (so a
block shares one expert per canonical slot), keep the canonical slots a permutation of the original ones,
and stay within the padded size the host computes from the shapes alone.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moelora.kernels.mixlora_ffn_sorted import combo_sort, max_combinations, regime_fits

from moelora import triton_backend


def _routing(T: int, E: int, k: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    indices = indices.long()
    if kind == "unused" and T:
        indices[torch.rand(T, k, generator=g) < 0.3] = -1
    if kind == "out-of-range" and T:
        indices[::2, 0] = E + 3  # treated as unused, as the kernels do
    if kind == "duplicates" and T and k > 1:
        indices[::3, 1] = indices[::3, 0]
    if kind == "one-combination" and T:
        indices[:] = torch.arange(k)
    return torch.rand(T, k, generator=g), indices


# T, E, k, block, kind
SORT_CASES = [
    (1, 4, 2, 4, "topk"),
    (7, 4, 2, 4, "topk"),
    (63, 8, 2, 8, "topk"),
    (200, 8, 2, 32, "topk"),
    (200, 16, 1, 32, "topk"),
    (50, 4, 4, 4, "topk"),  # k = E: one combination
    (90, 6, 3, 8, "unused"),
    (40, 4, 2, 4, "out-of-range"),
    (40, 4, 3, 4, "duplicates"),
    (70, 8, 2, 16, "one-combination"),
]


@pytest.mark.parametrize(
    ("T", "E", "k", "BT", "kind"), [pytest.param(*c, id="T{}-E{}-k{}-BT{}-{}".format(*c)) for c in SORT_CASES]
)
def test_combo_sort_layout(T, E, k, BT, kind):
    g = torch.Generator().manual_seed(T + E + k)
    weights, indices = _routing(T, E, k, kind, g)
    s = combo_sort(indices, weights, E, BT)
    P = s.rows.shape[0]
    assert P % BT == 0 and P >= T
    assert T + min(T, max_combinations(E, k)) * (BT - 1) + BT >= P
    real = s.rows[s.rows >= 0]
    assert torch.equal(real.sort().values, torch.arange(T)), "every token exactly once"
    valid = (indices >= 0) & (indices < E)
    keyed = torch.where(valid, indices, E)
    # canonical slots: ascending experts, a permutation of the original slots, weights moved along
    assert torch.equal(s.experts.long(), keyed.gather(1, s.slots))
    assert bool((s.experts[:, 1:] >= s.experts[:, :-1]).all())
    assert torch.equal(s.slots.sort(1).values, torch.arange(k).expand(T, k))
    assert torch.equal(s.weights, torch.where(valid, weights, 0.0).gather(1, s.slots))
    for b in range(P // BT):
        block = s.rows[b * BT : (b + 1) * BT]
        toks = block[block >= 0]
        if block[0] < 0:  # a block past the last one: all padding
            assert toks.numel() == 0
            continue
        assert bool((block[: toks.numel()] >= 0).all()), "padding only at the end of a block"
        assert bool((s.experts[toks] == s.experts[block[0]]).all()), f"block {b} mixes expert combinations"
    blocks_used = int((s.rows.view(-1, BT)[:, 0] >= 0).sum())
    combos = torch.unique(s.experts, dim=0).shape[0] if T else 0
    assert blocks_used == sum(
        -(-int((s.experts == c).all(1).sum()) // BT) for c in (torch.unique(s.experts, dim=0) if T else [])
    )
    assert blocks_used <= -(-T // BT) + combos


def test_combo_sort_empty_batch():
    s = combo_sort(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4, 8)
    assert s.rows.numel() == 0 and s.experts.shape == (0, 2)


# T, E, k, expected regime with MOELORA_FFN_REGIME unset
REGIME_CASES = [
    (8192, 8, 2, "sorted"),  # the training shape: 45 combinations * 15 padding rows <= T
    (2048, 8, 2, "sorted"),  # FFN_SORTED_MIN_T: the measured crossover
    (2047, 8, 2, "dense"),  # the padding fits (T >= 675) but the sorted kernels lost on the GPU
    (674, 8, 2, "dense"),
    (32, 8, 2, "dense"),  # decode: the padding would dominate
    (8192, 1, 1, "dense"),  # one expert: nothing to save
    (8192, 64, 2, "dense"),  # 2145 combinations: too much padding at this T
    (200000, 64, 2, "sorted"),
]


@pytest.mark.parametrize(
    ("T", "E", "k", "want"), [pytest.param(*c, id="T{}-E{}-k{}-{}".format(*c)) for c in REGIME_CASES]
)
def test_ffn_regime_by_shape(T, E, k, want, monkeypatch):
    monkeypatch.delenv(triton_backend.FFN_REGIME_ENV, raising=False)
    assert triton_backend.ffn_regime(T, E, k) == want
    assert regime_fits(T, E, k) == (want == "sorted" or E == 1 or T in range(675, triton_backend.FFN_SORTED_MIN_T))


@pytest.mark.parametrize("forced", ["dense", "sorted"])
def test_ffn_regime_env_forces(forced, monkeypatch):
    monkeypatch.setenv(triton_backend.FFN_REGIME_ENV, forced)
    assert {triton_backend.ffn_regime(T, 8, 2) for T in (32, 8192)} == {forced}


def test_ffn_regime_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv(triton_backend.FFN_REGIME_ENV, "fastest")
    with pytest.raises(ValueError, match="MOELORA_FFN_REGIME must be 'auto', 'dense' or 'sorted', got 'fastest'"):
        triton_backend.ffn_regime(8192, 8, 2)
