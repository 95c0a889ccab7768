"""The ops, dispatched to the chosen backend (see moelora.backend). Signatures: moelora.reference."""

from __future__ import annotations

from torch import Tensor

from moelora import backend
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
