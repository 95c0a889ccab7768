"""Pure-PyTorch reference of every op: the test oracle, the fallback backend, the `reference` provider.

Vectorised over tokens, a loop over experts only. Router math and rank-space activations run in fp32
whatever the model dtype (as MoE-PEFT does); results are cast back to the input dtype. Autograd gives
the backward. Shapes: x [T, H], E experts, k routing slots, rank r, intermediate I.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Routing(NamedTuple):
    """weights [T, k] fp32 (0 in unused slots), indices [T, k] int64 (-1 in unused slots), probs [T, E] fp32."""

    weights: Tensor
    indices: Tensor
    probs: Tensor


class ExpertLora(NamedTuple):
    """One projection's LoRA for all experts: A [E, r, in], B [E, out, r], DoRA magnitude [E, out] or None."""

    A: Tensor
    B: Tensor
    magnitude: Tensor | None = None


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs, fp64 for fp64 inputs: the precision every op computes in."""
    return torch.promote_types(x.dtype, torch.float32)


def route(x: Tensor, router_weight: Tensor, top_k: int | None = None, top_p: float | None = None) -> Routing:
    """Router logits in fp32 (fp64 for fp64 input), softmax, then top-k renormalised, or top-p not renormalised.

    x [T, H] any float dtype; router_weight [E, H]. Exactly one of top_k / top_p.
    top-k: k = top_k slots, weights sum to 1.
    top-p (MoE-PEFT's mixlora-dynamic): E slots in descending probability; a slot is kept while the
    probability mass before it is <= top_p (the shortest prefix whose sum exceeds top_p, or all;
    top_p = 1 keeps all).
    """
    if (top_k is None) == (top_p is None):
        raise ValueError("route: pass exactly one of top_k and top_p")
    dt = compute_dtype(x)
    logits = F.linear(x.to(dt), router_weight.to(dt))
    probs = torch.softmax(logits, dim=-1)
    if top_k is not None:
        weights, indices = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, indices, probs)
    sorted_probs, indices = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep = (mass_before <= top_p) | (top_p >= 1.0)  # top_p = 1 keeps every expert, whatever the rounding
    keep[:, 0] = True
    weights = sorted_probs * keep
    indices = torch.where(keep, indices, torch.full_like(indices, -1))
    return Routing(weights, indices, probs)


def load_balance_loss(probs: Tensor, indices: Tensor, num_experts: int, token_mask: Tensor | None = None) -> Tensor:
    """Mixtral / MoE-PEFT load-balance loss: E * sum_e F_e * P_e over all given tokens.

    probs [N, E] fp32 (router softmax, layers concatenated), indices [N, k] (-1 = unused slot),
    token_mask [N] bool or None (padding = False). F_e: mean over tokens of how many slots chose e
    (= sum over slots of Mixtral's per-slot fraction), P_e: mean router probability of e.
    """
    counts = F.one_hot(indices.clamp(min=0), num_experts).to(probs.dtype)  # [N, k, E]
    counts = (counts * (indices >= 0).unsqueeze(-1)).sum(dim=1)  # [N, E]
    if token_mask is None:
        tokens_per_expert = counts.mean(dim=0)
        prob_per_expert = probs.mean(dim=0)
    else:
        m = token_mask.to(probs.dtype).unsqueeze(-1)
        n = m.sum().clamp(min=1.0)
        tokens_per_expert = (counts * m).sum(dim=0) / n
        prob_per_expert = (probs * m).sum(dim=0) / n
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


def lora(x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Dense LoRA delta s * B A x. x [..., in], A [r, in], B [out, r] -> [..., out] in x's dtype."""
    dt = compute_dtype(x)
    return (F.linear(F.linear(x.to(dt), A.to(dt)), B.to(dt)) * scaling).to(x.dtype)


def dora_scale(weight: Tensor, A: Tensor, B: Tensor, scaling: float, magnitude: Tensor) -> Tensor:
    """DoRA's per-output scale m / ||W + s B A||_row, the norm detached (DoRA paper, PEFT, MoE-PEFT)."""
    dt = torch.promote_types(compute_dtype(weight), magnitude.dtype)
    norm = torch.linalg.norm(weight.to(dt) + scaling * (B.to(dt) @ A.to(dt)), dim=1).detach()
    return magnitude.to(dt) / norm


class _Pairs(NamedTuple):
    """The used (token, slot) pairs sorted by expert: token [P], weight [P, 1], segment sizes per expert."""

    token: Tensor
    weight: Tensor
    counts: list[int]


def _sorted_pairs(weights: Tensor, indices: Tensor, num_experts: int, dt: torch.dtype) -> _Pairs:
    flat = indices.reshape(-1)
    order = torch.argsort(torch.where(flat >= 0, flat, num_experts), stable=True)
    counts = torch.bincount(flat[flat >= 0], minlength=num_experts).tolist()  # host sync: reference only
    order = order[: sum(counts)]
    token = torch.div(order, indices.shape[1], rounding_mode="floor")
    return _Pairs(token, weights.reshape(-1)[order].to(dt).unsqueeze(-1), counts)


def _per_expert(rows: Tensor, counts: list[int], fn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """fn(e, rows of expert e) on each expert's contiguous segment, concatenated back."""
    out = [fn(e, seg) for e, seg in enumerate(torch.split(rows, counts)) if counts[e] > 0]
    return torch.cat(out) if out else rows.new_zeros(0, 0)


def moe_lora(x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Gathered per-expert LoRA: y[t] = sum_j weights[t, j] * s * B[e] A[e] x[t], e = indices[t, j].

    x [T, in]; weights [T, k] fp32; indices [T, k] (-1 = unused); A [E, r, in]; B [E, out, r].
    Returns [T, out] in x's dtype.
    """
    dt = compute_dtype(x)
    pairs = _sorted_pairs(weights, indices, A.shape[0], dt)
    y = x.new_zeros(x.shape[0], B.shape[1], dtype=dt)
    if pairs.token.numel() == 0:
        return y.to(x.dtype)
    delta = _per_expert(
        x[pairs.token].to(dt), pairs.counts, lambda e, xe: F.linear(F.linear(xe, A[e].to(dt)), B[e].to(dt))
    )
    return y.index_add(0, pairs.token, delta * (pairs.weight * scaling)).to(x.dtype)


def mixlora_ffn(
    x: Tensor,
    gate: Tensor | None,
    up: Tensor,
    weights: Tensor,
    indices: Tensor,
    *,
    gate_lora: ExpertLora | None,
    up_lora: ExpertLora | None,
    down_lora: ExpertLora | None,
    down_proj: Callable[[Tensor], Tensor],
    act: Callable[[Tensor], Tensor],
    scaling: float,
    gate_weight: Tensor | None = None,
    up_weight: Tensor | None = None,
    down_weight: Tensor | None = None,
    down_bias: Tensor | None = None,
    down_dropout: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """MixLoRA FFN from the frozen base's G = Wg x and U = Wu x (gate None: ungated, h = act(U + dU)).

    x [T, H] (the LoRA input, dropout already applied); gate, up [T, I]; weights [T, k] fp32;
    indices [T, k] (-1 = unused); *_lora: ExpertLora or None (that projection stays the base);
    down_proj: the frozen down projection (bias included); down_bias [H] or None, so that the bias counts
    sum_j w_j times as in the per-expert formula; *_weight: frozen weights, needed only for DoRA norms.

        h_j  = act(G + dG_j) * (U + dU_j)          dP_j = s B_e A_e x  for expert e = indices[:, j]
        y    = Wd (sum_j w_j h_j) + sum_j w_j s Bd_e Ad_e drop(h_j)      (Wd runs once, on T rows)

    The reference keeps h for every (token, slot) pair, [T*k, I]; the fused backends do not. With DoRA on
    the down projection each expert scales Wd h_j by its own vector, so Wd then runs per pair: the identity
    no longer holds. Returns [T, H] in up's dtype.
    """
    T, out_dtype, dt = x.shape[0], up.dtype, compute_dtype(up)
    E = next((p.A.shape[0] for p in (gate_lora, up_lora, down_lora) if p is not None), int(indices.max()) + 1)
    pairs = _sorted_pairs(weights, indices, max(E, 1), dt)
    x_pairs = x[pairs.token].to(dt)

    def adapt(base: Tensor, proj: ExpertLora | None, weight: Tensor | None) -> Tensor:
        """base rows of every pair, with the pair's expert LoRA (and DoRA scale) applied."""
        rows = base[pairs.token].to(dt)
        if proj is None:
            return rows

        def expert(e: int, seg: Tensor) -> Tensor:
            return F.linear(F.linear(seg, proj.A[e].to(dt)), proj.B[e].to(dt)) * scaling

        value = rows + _per_expert(x_pairs, pairs.counts, expert)
        if proj.magnitude is not None:
            scales = [dora_scale(weight, proj.A[e], proj.B[e], scaling, proj.magnitude[e]) for e in range(E)]
            value = value * torch.repeat_interleave(torch.stack(scales), torch.tensor(pairs.counts), dim=0)
        return value

    u = adapt(up, up_lora, up_weight)
    h = act(adapt(gate, gate_lora, gate_weight)) * u if gate is not None else act(u)  # [P, I]
    h_in = down_dropout(h) if down_dropout is not None else h

    if down_lora is not None and down_lora.magnitude is not None:
        y_pairs = (
            down_proj(h.to(out_dtype)).to(dt)
            + _per_expert(
                h_in, pairs.counts, lambda e, he: F.linear(F.linear(he, down_lora.A[e].to(dt)), down_lora.B[e].to(dt))
            )
            * scaling
        )
        scales = [
            dora_scale(down_weight, down_lora.A[e], down_lora.B[e], scaling, down_lora.magnitude[e]) for e in range(E)
        ]
        y_pairs = y_pairs * torch.repeat_interleave(torch.stack(scales), torch.tensor(pairs.counts), dim=0)
        y = up.new_zeros(T, y_pairs.shape[1], dtype=dt).index_add(0, pairs.token, pairs.weight * y_pairs)
        return y.to(out_dtype)

    hbar = up.new_zeros(T, h.shape[1], dtype=dt).index_add(0, pairs.token, pairs.weight * h)
    y = down_proj(hbar.to(out_dtype)).to(dt)
    if down_bias is not None:
        y = y + (weights.to(dt).sum(dim=-1, keepdim=True) - 1.0) * down_bias.to(dt)
    if down_lora is not None and pairs.token.numel() > 0:
        delta = _per_expert(
            h_in, pairs.counts, lambda e, he: F.linear(F.linear(he, down_lora.A[e].to(dt)), down_lora.B[e].to(dt))
        )
        y = y.index_add(0, pairs.token, pairs.weight * scaling * delta)
    return y.to(out_dtype)
