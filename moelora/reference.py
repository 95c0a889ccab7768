"""Pure-PyTorch reference of every op: the test oracle, the fallback backend, the `reference` provider.

Vectorised over tokens, a loop over experts only. Router math and rank-space activations run in fp32
whatever the model dtype (as MoE-PEFT does); results are cast back to the input dtype. Autograd gives
the backward. Shapes: x [T, H], E experts, k routing slots, rank r, intermediate I.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moelora import dropout as seeded_dropout
from moelora.dropout import LoraDropout


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


@dataclass(frozen=True, eq=False)
class FFNSpec:
    """What mixlora_ffn needs besides the tokens and their routing: the expert LoRAs of the three projections,
    the frozen base pieces, the activation, the LoRA scaling and dropout. E experts, rank r, hidden H,
    intermediate I, H_out the down projection's output width.

    gate_lora: ExpertLora A [E, r, H], B [E, I, r], or None (gate stays the base; ungated FFNs have none);
    up_lora: A [E, r, H], B [E, I, r], or None; down_lora: A [E, r, I], B [E, H_out, r], or None;
    down_proj: the frozen down projection, [.., I] -> [.., H_out] (bias included);
    act: the activation (moelora.activations names the fused backends' ones); scaling: the LoRA scale s;
    gate_weight [I, H], up_weight [I, H], down_weight [H_out, I]: the frozen weights, read only for DoRA norms;
    down_bias [H_out] or None: down_proj's bias, so that it counts sum_j w_j times as in the per-expert formula;
    dropout: LoRA dropout in training (moelora.dropout.LoraDropout), None in eval.
    """

    gate_lora: ExpertLora | None
    up_lora: ExpertLora | None
    down_lora: ExpertLora | None
    down_proj: Callable[[Tensor], Tensor]
    act: Callable[[Tensor], Tensor]
    scaling: float
    gate_weight: Tensor | None = None
    up_weight: Tensor | None = None
    down_weight: Tensor | None = None
    down_bias: Tensor | None = None
    dropout: LoraDropout | None = None

    @property
    def loras(self) -> tuple[ExpertLora | None, ExpertLora | None, ExpertLora | None]:
        """(gate_lora, up_lora, down_lora)."""
        return self.gate_lora, self.up_lora, self.down_lora

    @property
    def has_lora(self) -> bool:
        """Whether any projection has a LoRA (without one the experts are only names)."""
        return any(p is not None for p in self.loras)

    @property
    def uses_dora(self) -> bool:
        """Whether any of the three LoRAs has a DoRA magnitude."""
        return any(p is not None and p.magnitude is not None for p in self.loras)

    @property
    def num_experts(self) -> int | None:
        """E, from the first LoRA present; None without any."""
        return next((p.A.shape[0] for p in self.loras if p is not None), None)


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for 16-bit and fp32 inputs, fp64 for fp64 inputs: the precision every op computes in."""
    # In Python, not torch.promote_types: that is an op call, and a decoding step makes one per LoRA module.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


def lora(x: Tensor, A: Tensor, B: Tensor, scaling: float | Tensor) -> Tensor:
    """Dense LoRA delta s * B A x. x [..., in], A [r, in], B [out, r] -> [..., out] in x's dtype.

    scaling: a float, or an fp32 tensor that broadcasts against the output (MiLoRA's gate x s per sequence,
    [rows, 1, ...])."""
    dt = compute_dtype(x)
    if x.dtype == A.dtype == B.dtype == dt:  # the usual fp32 case, without four no-op casts (decoding runs many)
        return F.linear(F.linear(x, A), B) * scaling
    return (F.linear(F.linear(x.to(dt), A.to(dt)), B.to(dt)) * scaling).to(x.dtype)


def dora_scale(weight: Tensor, A: Tensor, B: Tensor, scaling: float, magnitude: Tensor) -> Tensor:
    """DoRA's per-output scale m / ||W + s B A||_row, the norm detached (DoRA paper, PEFT, MoE-PEFT)."""
    dt = torch.promote_types(compute_dtype(weight), magnitude.dtype)
    norm = torch.linalg.norm(weight.to(dt) + scaling * (B.to(dt) @ A.to(dt)), dim=1).detach()
    return magnitude.to(dt) / norm


class _Pairs(NamedTuple):
    """The used (token, slot) pairs sorted by expert: token [P], weight [P, 1], segment sizes per expert,
    flat [P] (token * k + slot: the pair's row in [T, k] tensors)."""

    token: Tensor
    weight: Tensor
    counts: list[int]
    flat: Tensor


def _sorted_pairs(weights: Tensor, indices: Tensor, num_experts: int, dt: torch.dtype) -> _Pairs:
    flat = indices.reshape(-1)
    order = torch.argsort(torch.where(flat >= 0, flat, num_experts), stable=True)
    counts = torch.bincount(flat[flat >= 0], minlength=num_experts).tolist()  # host sync: reference only
    order = order[: sum(counts)]
    token = torch.div(order, indices.shape[1], rounding_mode="floor")
    return _Pairs(token, weights.reshape(-1)[order].to(dt).unsqueeze(-1), counts, order)


def _per_expert(rows: Tensor, counts: list[int], fn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """fn(e, rows of expert e) on each expert's contiguous segment, concatenated back."""
    out = [fn(e, seg) for e, seg in enumerate(torch.split(rows, counts)) if counts[e] > 0]
    return torch.cat(out) if out else fn(0, rows[:0])  # no pair: an empty result of the right width


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


def mixlora_ffn(x: Tensor, gate: Tensor | None, up: Tensor, weights: Tensor, indices: Tensor, ffn: FFNSpec) -> Tensor:
    """MixLoRA FFN from the frozen base's G = Wg x and U = Wu x (gate None: ungated, h = act(U + dU)).

    x [T, H] (the LoRA input); gate, up [T, I]; weights [T, k] fp32; indices [T, k] (-1 = unused);
    ffn: the LoRAs, frozen pieces, activation, scaling and dropout (FFNSpec: shapes there). A LoRA that is
    None leaves its projection the base. ffn.dropout (moelora.dropout): the seeded mask of stream X_STREAM
    drops x before the gate/up shrinks, that of H_STREAM drops h_j (element (t * k + j) * I + i) before the
    down shrink.

        h_j  = act(G + dG_j) * (U + dU_j)          dP_j = s B_e A_e drop(x)  for expert e = indices[:, j]
        y    = Wd (sum_j w_j h_j) + sum_j w_j s Bd_e Ad_e drop(h_j)      (Wd runs once, on T rows)

    The reference keeps h for every (token, slot) pair, [T*k, I]; the fused backends do not. With DoRA on
    the down projection each expert scales Wd h_j by its own vector, so Wd then runs per pair: the identity
    no longer holds. Returns [T, H] in up's dtype.
    """
    T, out_dtype, dt = x.shape[0], up.dtype, compute_dtype(up)
    gate_lora, up_lora, down_lora = ffn.loras
    scaling, dropout, down_proj, down_weight = ffn.scaling, ffn.dropout, ffn.down_proj, ffn.down_weight
    E = ffn.num_experts
    if E is None:  # no LoRA at all: the experts are only names; an empty batch has none
        E = int(indices.max()) + 1 if indices.numel() else 1
    pairs = _sorted_pairs(weights, indices, max(E, 1), dt)
    if dropout is not None:
        x = seeded_dropout.apply(x.to(dt), dropout, seeded_dropout.X_STREAM)
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

    u = adapt(up, up_lora, ffn.up_weight)
    h = ffn.act(adapt(gate, gate_lora, ffn.gate_weight)) * u if gate is not None else ffn.act(u)  # [P, I]
    h_in = h
    if dropout is not None:
        rows, inter = T * indices.shape[1], h.shape[1]
        keep = seeded_dropout.dropout_mask(dropout.seed, seeded_dropout.H_STREAM, rows * inter, dropout.p, h.device)
        h_in = h * keep.reshape(rows, inter)[pairs.flat].to(dt) * dropout.scale

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
    if ffn.down_bias is not None:
        y = y + (weights.to(dt).sum(dim=-1, keepdim=True) - 1.0) * ffn.down_bias.to(dt)
    if down_lora is not None and pairs.token.numel() > 0:
        delta = _per_expert(
            h_in, pairs.counts, lambda e, he: F.linear(F.linear(he, down_lora.A[e].to(dt)), down_lora.B[e].to(dt))
        )
        y = y.index_add(0, pairs.token, pairs.weight * scaling * delta)
    return y.to(out_dtype)


# --- MiLoRA (arXiv 2410.18035): prompt-aware routing over a layer's LoRA modules --------------------------

POOLINGS = ("attention", "mean", "last", "max")
# segmented_lora gathers per-token weights up to this many tokens (decode batches): T * r * (in + out)
# gathered values beat a Python loop with a host sync per LoRA there; past it the loop reads each LoRA once.
SEGMENTED_GATHER_TOKENS = 64

# PAU "safe" rational P6(x) / (1 + sum_j |b_j| |x|^j) fitted to GELU (float64 LBFGS on [-5, 5], with a
# penalty keeping |f(x)| <= |x| outside; a (6, 5) rational grows like c|x| at both ends, so it cannot follow
# GELU's two asymptotes). Max |f - gelu|: 0.0094 on [-3, 3], 0.022 on [-5, 5]. b_1 and b_3 start at small
# non-zero values because |b| has zero gradient at exactly 0.
RATIONAL_GELU_NUMERATOR = (
    0.00514160513,
    0.50470133,
    0.398456507,
    0.1009933,
    0.00883067544,
    0.000520574593,
    8.68976491e-05,
)
RATIONAL_GELU_DENOMINATOR = (1e-3, 0.207974559, 1e-4, 1e-5, 0.000169725096)


class PromptRouting(NamedTuple):
    """One routing per sequence: gates [B, M] fp32 (p_m for the top-k modules, 0 elsewhere),
    indices [B, k] int64 (selected modules, most probable first), probs [B, M] fp32 (softmax)."""

    gates: Tensor
    indices: Tensor
    probs: Tensor


def rational(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """Pade activation unit, PAU's safe form: P(x) / (1 + sum_j |b_j| |x|^j), elementwise.

    numerator [m + 1] (a_0..a_m), denominator [n] (b_1..b_n). Horner's rule in x's dtype.
    """
    p = numerator[-1].expand_as(x)
    for a in numerator.flip(0)[1:]:
        p = p * x + a
    ax = x.abs()
    b = denominator.abs()
    q = b[-1].expand_as(x)
    for bj in b.flip(0)[1:]:
        q = q * ax + bj
    return p / (1.0 + q * ax)


def pool(hidden: Tensor, mask: Tensor | None, pooling: str, pool_weight: Tensor | None = None) -> Tensor:
    """Pool each sequence's prompt states into one vector, padding ignored.

    hidden [B, S, H]; mask [B, S] (1/True = prompt token) or None (every token); pooling: "attention"
    (a = softmax over the sequence of hidden @ pool_weight, h = a^T hidden; pool_weight [H]), "mean",
    "last" (the last prompt token, left or right padding) or "max". Returns [B, H] in the compute dtype.
    A sequence without a single prompt token raises ValueError (this check syncs with the host).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pool: pooling must be one of {POOLINGS}, got {pooling!r}")
    dt = compute_dtype(hidden)
    h = hidden.to(dt)
    B, S, _ = h.shape
    if S == 0:
        raise ValueError("MiLoRA: the prompt is empty (sequence length 0); routing needs at least one prompt token")
    keep = torch.ones(B, S, dtype=torch.bool, device=h.device) if mask is None else mask.to(h.device).bool()
    if mask is not None and not torch.compiler.is_compiling():  # compiled: no host sync, an empty row gives NaN
        empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"MiLoRA: sequences {empty} have an empty prompt (no token with attention_mask = 1)")
    if pooling == "attention":
        if pool_weight is None:
            raise ValueError("pool: pooling='attention' needs pool_weight [H]")
        scores = (h @ pool_weight.to(dt)).masked_fill(~keep, float("-inf"))
        return torch.einsum("bs,bsh->bh", torch.softmax(scores, dim=1), h)
    if pooling == "mean":
        m = keep.to(dt).unsqueeze(-1)
        return (h * m).sum(dim=1) / m.sum(dim=1)
    if pooling == "max":
        return h.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)
    last = (keep * torch.arange(1, S + 1, device=h.device)).argmax(dim=1)  # the last position holding a prompt token
    return h[torch.arange(B, device=h.device), last]


def _check_top_k(top_k: int, M: int) -> None:
    if not 1 <= top_k <= M:
        raise ValueError(f"prompt_route: top_k must be in [1, {M}] (the number of LoRA modules), got {top_k}")


def route_pooled(
    pooled: Tensor, router_weight: Tensor, numerator: Tensor | None, denominator: Tensor | None, *, top_k: int
) -> PromptRouting:
    """MiLoRA's router from pooled prompt states [B, H] (compute dtype): rational activation, softmax, top-k."""
    _check_top_k(top_k, router_weight.shape[0])
    dt = pooled.dtype
    g = F.gelu(pooled) if numerator is None else rational(pooled, numerator.to(dt), denominator.to(dt))
    probs = torch.softmax(g @ router_weight.to(dt).T, dim=-1)
    top, indices = torch.topk(probs, top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, indices, top)
    return PromptRouting(gates, indices, probs)


def prompt_route(
    hidden: Tensor,
    mask: Tensor | None,
    router_weight: Tensor,
    numerator: Tensor | None,
    denominator: Tensor | None,
    *,
    top_k: int,
    pooling: str = "attention",
    pool_weight: Tensor | None = None,
) -> PromptRouting:
    """MiLoRA's router for one layer: pool the prompt, rational activation, softmax over the M modules, top-k.

    hidden [B, S, H] (the states entering the layer); mask [B, S] or None; router_weight [M, H];
    numerator [7], denominator [5] (the layer's rational activation; both None: exact GELU instead).
    In fp32 (fp64 for fp64 input).
        g = rational(pool(hidden)),  p = softmax(g @ router_weight^T),  gates = p on the top-k modules, else 0.
    The gates are not renormalised (design.md: module m adds [m in top-k] * p_m * s * B_m A_m x).
    """
    _check_top_k(top_k, router_weight.shape[0])
    pooled = pool(hidden, mask, pooling, pool_weight)
    return route_pooled(pooled, router_weight, numerator, denominator, top_k=top_k)


class PoolState(NamedTuple):
    """A running pool of each sequence's prompt states, extended chunk by chunk (pool_extend), so that a
    prompt run in several calls on a KV cache pools exactly as one call over all of it. Compute dtype.

    count [B]: prompt tokens pooled so far. total [B, H]: mean: their sum; max: their elementwise max;
    last: the last one; attention (online softmax): sum of exp(score - peak) * state.
    peak [B], norm [B] (attention only, else None): the highest score so far, sum of exp(score - peak).
    """

    count: Tensor
    total: Tensor
    peak: Tensor | None = None
    norm: Tensor | None = None


def pool_extend(
    state: PoolState | None, hidden: Tensor, mask: Tensor | None, pooling: str, pool_weight: Tensor | None = None
) -> PoolState:
    """`state` (None: nothing pooled yet) with the prompt tokens of hidden [B, S, H] (mask [B, S] or None) pooled in.

    A sequence may have no prompt token in this chunk (its state is unchanged). No host sync.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pool: pooling must be one of {POOLINGS}, got {pooling!r}")
    dt = state.total.dtype if state is not None else compute_dtype(hidden)
    h = hidden.to(dt)
    B, S, H = h.shape
    keep = torch.ones(B, S, dtype=torch.bool, device=h.device) if mask is None else mask.to(h.device).bool()
    if state is None:
        fill = float("-inf") if pooling == "max" else 0.0
        start = h.new_full((B, H), fill)
        peak = h.new_full((B,), float("-inf")) if pooling == "attention" else None
        state = PoolState(h.new_zeros(B), start, peak, h.new_zeros(B) if pooling == "attention" else None)
    count = state.count + keep.sum(dim=1).to(dt)
    if pooling == "mean":
        return PoolState(count, state.total + (h * keep.unsqueeze(-1)).sum(dim=1))
    if pooling == "max":
        chunk = h.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)
        return PoolState(count, torch.maximum(state.total, chunk))
    if pooling == "last":
        last = (keep * torch.arange(1, S + 1, device=h.device)).argmax(dim=1)
        chunk = h[torch.arange(B, device=h.device), last]
        return PoolState(count, torch.where(keep.any(dim=1, keepdim=True), chunk, state.total))
    if pool_weight is None:
        raise ValueError("pool: pooling='attention' needs pool_weight [H]")
    scores = (h @ pool_weight.to(dt)).masked_fill(~keep, float("-inf"))
    peak = torch.maximum(state.peak, scores.amax(dim=1))
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # no token yet: keep exp() finite
    rescale = torch.exp(state.peak - safe)  # the old sums, moved to the new peak (0 when there were none)
    e = torch.exp(scores - safe.unsqueeze(1))  # 0 at non-prompt tokens
    norm = state.norm * rescale + e.sum(dim=1)
    total = state.total * rescale.unsqueeze(1) + torch.einsum("bs,bsh->bh", e, h)
    return PoolState(count, total, peak, norm)


def pool_finish(state: PoolState, pooling: str) -> Tensor:
    """The pooled prompt states [B, H] of `state` (as pool() over every token pooled into it)."""
    if pooling == "mean":
        return state.total / state.count.unsqueeze(1)
    if pooling == "attention":
        return state.total / state.norm.unsqueeze(1)
    return state.total


def prompt_balance_loss(probs: Tensor) -> Tensor:
    """MiLoRA's load-balance loss: M * sum_m f_m p_m per layer, averaged over layers.

    probs [L, B, M] (every layer's routing probabilities for the same B prompts); f_m: fraction of prompts
    whose most probable module is m (no gradient), p_m: mean probability of m.
    """
    M = probs.shape[-1]
    f = F.one_hot(probs.argmax(dim=-1), M).to(probs.dtype).mean(dim=1)  # [L, M]
    p = probs.mean(dim=1)  # [L, M]
    return (M * (f * p).sum(dim=-1)).mean()


def segmented_lora(
    x: Tensor,
    token_seq: Tensor,
    seq_lora: Tensor,
    seq_gate: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: Tensor,
) -> Tensor:
    """Many LoRAs in one batch, one per sequence, each scaled by its sequence's gate (MiLoRA, multi-tenant).

    x [T, in]; token_seq [T] int (the sequence of each token); seq_lora [n_seq] int (the LoRA of each
    sequence, -1 = none); seq_gate [n_seq] fp32 (MiLoRA's p_m, or 1); A [n_lora, r, in], B [n_lora, out, r]
    (smaller ranks zero-padded to r); scaling [n_lora] fp32.
        y[t] = seq_gate[s] * scaling[a] * B[a] A[a] x[t],   s = token_seq[t], a = seq_lora[s]   (0 when a = -1)
    Returns [T, out] in x's dtype. Up to SEGMENTED_GATHER_TOKENS tokens (decoding), each token's A and B are
    gathered and applied in one batched GEMM (no host sync); more tokens loop over the LoRAs present.
    """
    dt = compute_dtype(x)
    lora_of_token = seq_lora[token_seq]
    has_lora = lora_of_token >= 0
    if x.shape[0] <= SEGMENTED_GATHER_TOKENS:
        idx = lora_of_token.clamp(min=0)
        scale = torch.where(has_lora, scaling.to(dt)[idx], torch.zeros((), dtype=dt, device=x.device))
        u = torch.bmm(A[idx].to(dt), x.to(dt).unsqueeze(-1))  # [T, r, 1]
        y = torch.bmm(B[idx].to(dt), u).squeeze(-1) * (seq_gate.to(dt)[token_seq] * scale).unsqueeze(-1)
        return y.to(x.dtype)
    gate_of_token = seq_gate.to(dt)[token_seq]
    y = x.new_zeros(x.shape[0], B.shape[1], dtype=dt)
    for a in torch.unique(lora_of_token[has_lora]).tolist():
        rows = (lora_of_token == a).nonzero().flatten()
        delta = F.linear(F.linear(x[rows].to(dt), A[a].to(dt)), B[a].to(dt))
        # In place: an out-of-place index_add copies all of y once per LoRA (383 -> 135 ms at T=1024, 32 LoRAs).
        y.index_add_(0, rows, delta * (gate_of_token[rows] * scaling[a].to(dt)).unsqueeze(-1))
    return y.to(x.dtype)
