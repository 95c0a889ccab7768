"""The ops, dispatched to the chosen backend (see moelora.backend). Signatures: moelora.reference.

Every call is counted in moelora.backend.ops_ran() under the backend that ran it."""

from __future__ import annotations

from torch import Tensor

from moelora import backend, reference
from moelora.reference import FFNSpec, Routing


def route(x: Tensor, router_weight: Tensor, top_k: int | None = None, top_p: float | None = None) -> Routing:
    """Router softmax + top-k (renormalised) or top-p. x [T, H], router_weight [E, H] -> Routing."""
    impl = backend.resolve(x.device)
    return backend.run_op("route", impl, impl.route, x, router_weight, top_k=top_k, top_p=top_p)


def lora(x: Tensor, A: Tensor, B: Tensor, scaling: float | Tensor) -> Tensor:
    """Dense LoRA delta. x [..., in], A [r, in], B [out, r] -> [..., out]; scaling a float or a tensor that
    broadcasts against the output (a per-sequence scale)."""
    impl = backend.resolve(x.device)
    return backend.run_op("lora", impl, impl.lora, x, A, B, scaling)


def moe_lora(x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Gathered per-expert LoRA. x [T, in], weights/indices [T, k], A [E, r, in], B [E, out, r] -> [T, out]."""
    impl = backend.resolve(x.device)
    return backend.run_op("moe_lora", impl, impl.moe_lora, x, weights, indices, A, B, scaling)


def mixlora_ffn(x: Tensor, gate: Tensor | None, up: Tensor, weights: Tensor, indices: Tensor, ffn: FFNSpec) -> Tensor:
    """MixLoRA FFN with one frozen down projection; see moelora.reference.mixlora_ffn for every argument."""
    impl = backend.resolve_for_dora(x.device) if ffn.uses_dora else backend.resolve(x.device)
    return backend.run_op("mixlora_ffn", impl, impl.mixlora_ffn, x, gate, up, weights, indices, ffn)


def routed_mixlora_ffn(
    x: Tensor,
    router_weight: Tensor,
    gate: Tensor | None,
    up: Tensor,
    ffn: FFNSpec,
    *,
    top_k: int | None,
    top_p: float | None,
) -> tuple[Tensor, Routing]:
    """route(x), then mixlora_ffn on the same tokens -> (y, Routing). The router reads x undropped; ffn.dropout
    drops the LoRAs' input inside mixlora_ffn. One op so that a backend can read x once for the router and
    every expert's gate/up shrink: the triton backend does when no LoRA uses DoRA."""
    impl = backend.resolve(x.device)
    fused = getattr(impl, "routed_mixlora_ffn", None)
    if fused is not None and not ffn.uses_dora:
        return backend.run_op(
            "routed_mixlora_ffn", impl, fused, x, router_weight, gate, up, ffn, top_k=top_k, top_p=top_p
        )
    routing = route(x, router_weight, top_k=top_k, top_p=top_p)
    y = mixlora_ffn(x, gate, up, routing.weights, routing.indices, ffn)
    return y, routing


def _or_reference(op: str, impl) -> tuple:
    """impl's `op`, or the reference's with a one-time notice when the backend has none."""
    fn = getattr(impl, op, None)
    if fn is not None:
        return impl, fn
    if impl is not reference:
        backend.fell_back(op, f"the {backend.backend_name(impl)} backend has no {op} op")
    return reference, getattr(reference, op)


def prompt_route(hidden: Tensor, mask: Tensor | None, router_weight: Tensor, numerator, denominator, **kwargs):
    """MiLoRA's per-prompt router. hidden [B, S, H], mask [B, S] -> PromptRouting (gates [B, M])."""
    impl, fn = _or_reference("prompt_route", backend.resolve(hidden.device))
    return backend.run_op("prompt_route", impl, fn, hidden, mask, router_weight, numerator, denominator, **kwargs)


def segmented_lora(
    x: Tensor, token_seq: Tensor, seq_lora: Tensor, seq_gate: Tensor, A: Tensor, B: Tensor, scaling: Tensor
) -> Tensor:
    """One gated LoRA per sequence. x [T, in], token_seq [T], seq_lora/seq_gate [n_seq], A [n, r, in], B [n, out, r]."""
    impl, fn = _or_reference("segmented_lora", backend.resolve(x.device))
    return backend.run_op("segmented_lora", impl, fn, x, token_seq, seq_lora, seq_gate, A, B, scaling)
