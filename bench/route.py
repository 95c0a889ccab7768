"""The providers of the `route` suite: router logits, softmax, top-k (renormalised) or top-p, alone.

Every provider is a factory: `PROVIDERS[name](inputs)` returns a no-argument callable giving a Routing
(weights, indices, probs), as moelora.reference.route does.

    reference    moelora.reference.route, called directly
    fused        moelora.ops.route under the fused backend, when available
    torch-naive  F.linear + softmax + topk + renormalise written out, as the mixlora code does

fwd+bwd differentiates sum(weights * grad_out) with respect to x and the router weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.fused import fused_backend
from moelora import backend, ops, reference
from moelora.reference import Routing


@dataclass(frozen=True)
class RouteShape:
    """T tokens, hidden H, E experts, top-k; top_p set means top-p routing (then E slots, k unused)."""

    T: int
    H: int
    E: int
    k: int
    top_p: float | None = None

    def label(self) -> str:
        pick = f"k{self.k}" if self.top_p is None else f"p{self.top_p}"
        return f"T{self.T}-H{self.H}-E{self.E}-{pick}"


@dataclass
class RouteInputs:
    x: Tensor  # [T, H] model dtype, requires grad
    router: Tensor  # [E, H] fp32, requires grad
    top_k: int | None
    top_p: float | None
    grad_out: Tensor  # [T, slots] fp32, the upstream gradient of the weights (slots = k, or E with top-p)


def make_inputs(
    shape: RouteShape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> RouteInputs:
    """Seeded, drawn on the CPU; router std 0.02 as MoE-PEFT's router_init_range."""
    g = torch.Generator().manual_seed(seed)
    slots = shape.E if shape.top_p is not None else shape.k
    x = torch.randn(shape.T, shape.H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    router = (torch.randn(shape.E, shape.H, generator=g) * 0.02).to(device).requires_grad_()
    grad_out = torch.randn(shape.T, slots, generator=g).to(device)
    top_k = shape.k if shape.top_p is None else None
    return RouteInputs(x, router, top_k, shape.top_p, grad_out)


def grad_targets(name: str, inp: RouteInputs) -> list[tuple[str, Tensor]]:
    return [("x", inp.x), ("router", inp.router)]


def naive_route(inp: RouteInputs) -> Routing:
    """The routing of mixlora / MoE-PEFT, written the plain way: fp32 logits, softmax, then top-k or top-p."""
    probs = torch.softmax(F.linear(inp.x.float(), inp.router), dim=-1)
    if inp.top_p is None:
        weights, indices = torch.topk(probs, inp.top_k, dim=-1)
        return Routing(weights / weights.sum(dim=-1, keepdim=True), indices, probs)
    sorted_probs, indices = torch.sort(probs, dim=-1, descending=True)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs > inp.top_p  # the mass before this slot already exceeds p
    return Routing(sorted_probs.masked_fill(drop, 0.0), indices.masked_fill(drop, -1), probs)


def fused_route(inp: RouteInputs) -> Callable[[], Routing]:
    name = fused_backend(inp.x.device)

    def run() -> Routing:
        with backend.set_backend(name):
            return ops.route(inp.x, inp.router, top_k=inp.top_k, top_p=inp.top_p)

    return run


PROVIDERS: dict[str, Callable[[RouteInputs], Callable[[], Routing]]] = {
    "reference": lambda inp: lambda: reference.route(inp.x, inp.router, top_k=inp.top_k, top_p=inp.top_p),
    "fused": fused_route,
    "torch-naive": lambda inp: lambda: naive_route(inp),
}


def compared(out: Routing) -> dict[str, Tensor]:
    """What parity compares: the weights scattered to [T, E] (slot order and unused slots do not matter), probs."""
    used = out.indices >= 0
    dense = torch.zeros_like(out.probs).scatter_add(1, out.indices.clamp(min=0).long(), out.weights * used)
    return {"weights": dense, "probs": out.probs}
