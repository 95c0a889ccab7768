"""The ops, dispatched to the chosen backend (see moelora.backend). Signatures: moelora.reference."""

from __future__ import annotations

from torch import Tensor

from moelora import backend, reference
from moelora.reference import ExpertLora, Routing


def route(x: Tensor, router_weight: Tensor, top_k: int | None = None, top_p: float | None = None) -> Routing:
    """Router softmax + top-k (renormalised) or top-p. x [T, H], router_weight [E, H] -> Routing."""
    return backend.resolve(x.device).route(x, router_weight, top_k=top_k, top_p=top_p)


def lora(x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Dense LoRA delta. x [..., in], A [r, in], B [out, r] -> [..., out]."""
    return backend.resolve(x.device).lora(x, A, B, scaling)


def moe_lora(x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Gathered per-expert LoRA. x [T, in], weights/indices [T, k], A [E, r, in], B [E, out, r] -> [T, out]."""
    return backend.resolve(x.device).moe_lora(x, weights, indices, A, B, scaling)


def mixlora_ffn(x: Tensor, gate: Tensor | None, up: Tensor, weights: Tensor, indices: Tensor, **kwargs) -> Tensor:
    """MixLoRA FFN with one frozen down projection; see moelora.reference.mixlora_ffn for every argument."""
    loras: list[ExpertLora | None] = [kwargs.get("gate_lora"), kwargs.get("up_lora"), kwargs.get("down_lora")]
    uses_dora = any(p is not None and p.magnitude is not None for p in loras)
    impl = backend.resolve_for_dora(x.device) if uses_dora else backend.resolve(x.device)
    return impl.mixlora_ffn(x, gate, up, weights, indices, **kwargs)


def routed_mixlora_ffn(
    x: Tensor,
    router_weight: Tensor,
    gate: Tensor | None,
    up: Tensor,
    *,
    top_k: int | None,
    top_p: float | None,
    **kwargs,
) -> tuple[Tensor, Routing]:
    """route(x), then mixlora_ffn on the same tokens -> (y, Routing). The router reads x undropped; a
    `dropout=LoraDropout(...)` in kwargs drops the LoRAs' input inside mixlora_ffn. One op so that a backend
    can read x once for the router and every expert's gate/up shrink: the triton backend does when no LoRA
    uses DoRA."""
    loras = [kwargs.get("gate_lora"), kwargs.get("up_lora"), kwargs.get("down_lora")]
    uses_dora = any(p is not None and p.magnitude is not None for p in loras)
    fused = getattr(backend.resolve(x.device), "routed_mixlora_ffn", None)
    if fused is not None and not uses_dora:
        return fused(x, router_weight, gate, up, top_k=top_k, top_p=top_p, **kwargs)
    routing = route(x, router_weight, top_k=top_k, top_p=top_p)
    y = mixlora_ffn(x, gate, up, routing.weights, routing.indices, **kwargs)
    return y, routing


def prompt_route(hidden: Tensor, mask: Tensor | None, router_weight: Tensor, numerator, denominator, **kwargs):
    """MiLoRA's per-prompt router. hidden [B, S, H], mask [B, S] -> PromptRouting (gates [B, M])."""
    impl = backend.resolve(hidden.device)
    fn = getattr(impl, "prompt_route", reference.prompt_route)  # a backend without it: the reference
    return fn(hidden, mask, router_weight, numerator, denominator, **kwargs)


def segmented_lora(
    x: Tensor, token_seq: Tensor, seq_lora: Tensor, seq_gate: Tensor, A: Tensor, B: Tensor, scaling: Tensor
) -> Tensor:
    """One gated LoRA per sequence. x [T, in], token_seq [T], seq_lora/seq_gate [n_seq], A [n, r, in], B [n, out, r]."""
    impl = backend.resolve(x.device)
    fn = getattr(impl, "segmented_lora", reference.segmented_lora)
    return fn(x, token_seq, seq_lora, seq_gate, A, B, scaling)
