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


def route(x: Tensor, router_weight: Tensor, top_k: int | None = None, top_p: float | None = None) -> Routing:
    """Router logits in fp32, softmax, then top-k renormalised, or top-p not renormalised.

    x [T, H] any float dtype; router_weight [E, H]. Exactly one of top_k / top_p.
    top-k: k = top_k slots, weights sum to 1.
    top-p (MoE-PEFT's mixlora-dynamic): E slots in descending probability; a slot is kept while the
    probability mass before it is <= top_p (the shortest prefix whose sum exceeds top_p, or all).
    """
    if (top_k is None) == (top_p is None):
        raise ValueError("route: pass exactly one of top_k and top_p")
    logits = F.linear(x.float(), router_weight.float())
    probs = torch.softmax(logits, dim=-1)
    if top_k is not None:
        weights, indices = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights, indices, probs)
    sorted_probs, indices = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep = mass_before <= top_p
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
    return (F.linear(F.linear(x.float(), A.float()), B.float()) * scaling).to(x.dtype)


def dora_scale(weight: Tensor, A: Tensor, B: Tensor, scaling: float, magnitude: Tensor) -> Tensor:
    """DoRA's per-output scale m / ||W + s B A||_row, the norm detached (DoRA paper, PEFT, MoE-PEFT)."""
    norm = torch.linalg.norm(weight.float() + scaling * (B.float() @ A.float()), dim=1).detach()
    return magnitude.float() / norm


def _expert_slots(indices: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """(token, slot) pairs routed to expert e."""
    return torch.nonzero(indices == e, as_tuple=True)


def moe_lora(x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Gathered per-expert LoRA: y[t] = sum_j weights[t, j] * s * B[e] A[e] x[t], e = indices[t, j].

    x [T, in]; weights [T, k] fp32; indices [T, k] (-1 = unused); A [E, r, in]; B [E, out, r].
    Returns [T, out] in x's dtype.
    """
    y = x.new_zeros(x.shape[0], B.shape[1], dtype=torch.float32)
    for e in range(A.shape[0]):
        tokens, slots = _expert_slots(indices, e)
        if tokens.numel() == 0:
            continue
        delta = F.linear(F.linear(x[tokens].float(), A[e].float()), B[e].float())
        y = y.index_add(0, tokens, delta * (weights[tokens, slots].unsqueeze(-1) * scaling))
    return y.to(x.dtype)


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

    With DoRA on the down projection each expert scales Wd h_j by its own vector, so Wd then runs per
    (token, slot): the identity no longer holds. Returns [T, H] in x's dtype.
    """
    T = x.shape[0]
    tokens, slots = torch.nonzero(indices >= 0, as_tuple=True)  # every used (token, slot) pair
    experts = indices[tokens, slots]
    w = weights[tokens, slots].unsqueeze(-1)  # [P, 1]
    out_dtype = up.dtype

    def adapt(base: Tensor, proj: ExpertLora | None, weight: Tensor | None) -> Tensor:
        """Rows of `base` at `tokens`, each with its pair's expert LoRA (and DoRA scale) applied."""
        rows = base[tokens].float()
        if proj is None:
            return rows
        pieces = []
        for e in range(proj.A.shape[0]):
            sel = torch.nonzero(experts == e, as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            delta = F.linear(F.linear(x[tokens[sel]].float(), proj.A[e].float()), proj.B[e].float()) * scaling
            value = rows[sel] + delta
            if proj.magnitude is not None:
                value = value * dora_scale(weight, proj.A[e], proj.B[e], scaling, proj.magnitude[e])
            pieces.append((sel, value))
        return _scatter_rows(rows, pieces)

    u = adapt(up, up_lora, up_weight)
    h = act(adapt(gate, gate_lora, gate_weight)) * u if gate is not None else act(u)  # [P, I] fp32
    h_in = down_dropout(h) if down_dropout is not None else h

    dora_down = down_lora is not None and down_lora.magnitude is not None
    if dora_down:
        y_pairs = down_proj(h.to(out_dtype)).float()
    else:
        hbar = x.new_zeros(T, h.shape[1], dtype=torch.float32).index_add(0, tokens, w * h)
        y = down_proj(hbar.to(out_dtype)).float()
        if down_bias is not None:
            wsum = weights.sum(dim=-1, keepdim=True)
            y = y + (wsum - 1.0) * down_bias.float()
        y_pairs = None
    if down_lora is not None:
        pieces = []
        for e in range(down_lora.A.shape[0]):
            sel = torch.nonzero(experts == e, as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            delta = F.linear(F.linear(h_in[sel], down_lora.A[e].float()), down_lora.B[e].float()) * scaling
            if dora_down:
                value = (y_pairs[sel] + delta) * dora_scale(
                    down_weight, down_lora.A[e], down_lora.B[e], scaling, down_lora.magnitude[e]
                )
            else:
                value = delta
            pieces.append((sel, value))
        d_pairs = _scatter_rows(torch.zeros_like(h[:, : down_lora.B.shape[1]]), pieces)
        if dora_down:
            y = x.new_zeros(T, d_pairs.shape[1], dtype=torch.float32).index_add(0, tokens, w * d_pairs)
        else:
            y = y.index_add(0, tokens, w * d_pairs)
    return y.to(out_dtype)


def _scatter_rows(rows: Tensor, pieces: list[tuple[Tensor, Tensor]]) -> Tensor:
    """`rows` with each (selection, values) piece written in, out of place so autograd sees every piece."""
    if not pieces:
        return rows
    sel = torch.cat([s for s, _ in pieces])
    values = torch.cat([v for _, v in pieces])
    return rows.index_put((sel,), values)
