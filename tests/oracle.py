"""A per-token float64 oracle for the MixLoRA ops, written from the formulas, not from moelora.reference.

Plain Python loops over tokens and routing slots; every tensor is cast to float64 where it is used, so
autograd through these functions gives float64 gradients (cast back to each leaf's own dtype). Slow on
purpose: it is meant to be read, and run on a few dozen tokens.

A routing decision for one token is a list of slots `(expert, weight)`, best first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

Slots = list[tuple[int, Tensor]]


def f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float64)


class Projection(NamedTuple):
    """A frozen Linear and, optionally, its LoRA.

    weight [out, in], bias [out] or None. Plain LoRA: A [r, in], B [out, r], DoRA magnitude [out].
    Experts: the same with a leading expert dimension, A [E, r, in], B [E, out, r], magnitude [E, out];
    `expert(e)` picks one. A None: the projection is not adapted (the base alone).
    """

    weight: Tensor
    bias: Tensor | None = None
    A: Tensor | None = None
    B: Tensor | None = None
    magnitude: Tensor | None = None

    def expert(self, e: int) -> Projection:
        if self.A is None:
            return self
        m = None if self.magnitude is None else self.magnitude[e]
        return Projection(self.weight, self.bias, self.A[e], self.B[e], m)


def route_token(
    x: Tensor, router: Tensor, top_k: int | None = None, top_p: float | None = None
) -> tuple[Slots, Tensor]:
    """One token's routing: (slots, probs [E]).

    p = softmax(Wr x). top-k: the k most probable experts, weights renormalised to sum to 1.
    top-p (MoE-PEFT's mixlora-dynamic): experts in descending probability, the shortest prefix whose
    cumulative probability exceeds top_p (every expert if none does), weights NOT renormalised.
    """
    probs = torch.softmax(f64(router) @ f64(x), dim=0)
    order = torch.sort(probs.detach(), descending=True, stable=True).indices.tolist()
    if top_k is not None:
        chosen = order[:top_k]
        total = sum(probs[e] for e in chosen)
        return [(e, probs[e] / total) for e in chosen], probs
    chosen, mass = [], 0.0
    for e in order:
        chosen.append(e)
        mass += probs[e].item()
        if mass > top_p:
            break
    return [(e, probs[e]) for e in chosen], probs


def lora_token(x: Tensor, proj: Projection, scaling: float) -> Tensor:
    """One projection of one token: W x + b + s B A x.

    DoRA (MoE-PEFT's convention): the whole of it, bias included, times m / ||W + s B A||_row, the norm
    detached.
    """
    x, W = f64(x), f64(proj.weight)
    y = W @ x
    if proj.bias is not None:
        y = y + f64(proj.bias)
    if proj.A is None:
        return y
    A, B = f64(proj.A), f64(proj.B)
    y = y + scaling * (B @ (A @ x))
    if proj.magnitude is not None:
        norm = torch.linalg.norm(W + scaling * (B @ A), dim=1).detach()
        y = f64(proj.magnitude) / norm * y
    return y


def moe_lora_token(x: Tensor, slots: Slots, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """sum over slots of w * s * B_e A_e x. A [E, r, in], B [E, out, r] -> [out]."""
    x = f64(x)
    y = torch.zeros(B.shape[1], dtype=torch.float64)
    for e, w in slots:
        y = y + f64(w) * scaling * (f64(B[e]) @ (f64(A[e]) @ x))
    return y


def mixlora_ffn_token(
    x: Tensor,
    slots: Slots,
    *,
    down: Projection,
    act: Callable[[Tensor], Tensor],
    scaling: float,
    gate: Projection | None = None,
    up: Projection | None = None,
    gate_up: Projection | None = None,
) -> Tensor:
    """The MixLoRA FFN of one token, the literal per-expert formula (the down projection runs per slot).

    Gated (llama): gate and up. Fused (phi3): gate_up alone, one LoRA with output 2I, chunked into gate
    and up after the LoRA. Ungated (phi's fc1/fc2): up alone, h = act(up). For slot (e, w):
        h = act(gate_e(x)) * up_e(x)
        y += w * down_e(h)            (down_e includes the bias, so it counts sum_j w_j times)
    """
    y = torch.zeros(down.weight.shape[0], dtype=torch.float64)
    for e, w in slots:
        if gate_up is not None:
            g, u = lora_token(x, gate_up.expert(e), scaling).chunk(2)
            h = act(g) * u
        elif gate is not None:
            h = act(lora_token(x, gate.expert(e), scaling)) * lora_token(x, up.expert(e), scaling)
        else:
            h = act(lora_token(x, up.expert(e), scaling))
        y = y + f64(w) * lora_token(h, down.expert(e), scaling)
    return y


def route(
    x: Tensor, router: Tensor, top_k: int | None = None, top_p: float | None = None
) -> tuple[list[Slots], Tensor]:
    """route_token on every row of x [T, H]: (slots per token, probs [T, E])."""
    per_token = [route_token(x_t, router, top_k, top_p) for x_t in x]
    return [s for s, _ in per_token], torch.stack([p for _, p in per_token])


def lora(x: Tensor, proj: Projection, scaling: float) -> Tensor:
    """lora_token on every row of x [T, in] -> [T, out]."""
    return torch.stack([lora_token(x_t, proj, scaling) for x_t in x])


def moe_lora(x: Tensor, slots: list[Slots], A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """moe_lora_token on every row of x [T, in] -> [T, out]."""
    return torch.stack([moe_lora_token(x_t, s, A, B, scaling) for x_t, s in zip(x, slots, strict=True)])


def mixlora_ffn(x: Tensor, slots: list[Slots], **kwargs) -> Tensor:
    """mixlora_ffn_token on every row of x [T, H] -> [T, H]."""
    return torch.stack([mixlora_ffn_token(x_t, s, **kwargs) for x_t, s in zip(x, slots, strict=True)])


# --- MiLoRA ---------------------------------------------------------------------------------------------


def rational_scalar(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """PAU's safe rational, written out: (a_0 + a_1 x + ... + a_6 x^6) / (1 + |b_1||x| + ... + |b_5||x|^5)."""
    x = f64(x)
    p = sum(f64(numerator)[i] * x**i for i in range(numerator.shape[0]))
    q = 1 + sum(f64(denominator)[j - 1].abs() * x.abs() ** j for j in range(1, denominator.shape[0] + 1))
    return p / q


def prompt_route_sequence(
    hidden: Tensor,
    keep: list[bool],
    router: Tensor,
    numerator: Tensor | None,
    denominator: Tensor | None,
    top_k: int,
    pooling: str,
    pool_weight: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One sequence's MiLoRA routing: (gates [M], probs [M]).

    hidden [S, H]; keep: which positions are prompt tokens. Pool over the kept rows only (attention: a
    softmax of h_s . w over them; mean; max per feature; last: the last kept row), apply the rational
    activation (GELU when numerator is None), softmax of router @ g, and keep p_m on the top_k modules.
    """
    rows = [f64(hidden[s]) for s in range(hidden.shape[0]) if keep[s]]
    if pooling == "attention":
        scores = torch.stack([h @ f64(pool_weight) for h in rows])
        a = torch.softmax(scores, dim=0)
        pooled = sum(a[i] * rows[i] for i in range(len(rows)))
    elif pooling == "mean":
        pooled = sum(rows) / len(rows)
    elif pooling == "max":
        pooled = torch.stack(rows).max(dim=0).values
    else:
        pooled = rows[-1]
    if numerator is None:
        g = torch.nn.functional.gelu(pooled)
    else:
        g = torch.stack([rational_scalar(v, numerator, denominator) for v in pooled])
    probs = torch.softmax(f64(router) @ g, dim=0)
    chosen = torch.sort(probs.detach(), descending=True, stable=True).indices[:top_k].tolist()
    gates = torch.stack([probs[m] if m in chosen else probs[m] * 0 for m in range(probs.shape[0])])
    return gates, probs


def segmented_lora(
    x: Tensor, token_seq: list[int], seq_lora: list[int], seq_gate: Tensor, A: Tensor, B: Tensor, scaling: Tensor
) -> Tensor:
    """Token by token: gate of its sequence * scaling of its LoRA * B_a A_a x (zero without a LoRA)."""
    out = []
    for t in range(x.shape[0]):
        s = token_seq[t]
        a = seq_lora[s]
        if a < 0:
            out.append(torch.zeros(B.shape[1], dtype=torch.float64))
            continue
        out.append(f64(seq_gate)[s] * f64(scaling)[a] * (f64(B[a]) @ (f64(A[a]) @ f64(x[t]))))
    return torch.stack(out)
