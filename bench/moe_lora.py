"""The providers of the `moe_lora` suite: the gathered per-expert LoRA `y = sum_j w_j s B_e A_e x` alone.

The shape is the up projection's LoRA: in = H, out = I. Every provider is a factory:
`PROVIDERS[name](inputs)` returns a no-argument callable giving y [T, I].

    loop       the per-expert loop of mixlora / MoE-PEFT: gather each expert's tokens, LoRA, weighted index_add
    reference  moelora.reference.moe_lora, called directly (sorted expert segments)
    fused      moelora.ops.moe_lora under the fused backend, when available
    lora       one dense LoRA of the same rank on every token (no router): the floor

fwd+bwd differentiates sum(y * grad_out) with respect to x, the routing weights and A, B (lora: x, A, B).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.fused import fused_backend
from bench.providers import Shape
from moelora import backend, ops, reference


@dataclass
class MoeLoraInputs:
    x: Tensor  # [T, H] model dtype, requires grad
    weights: Tensor  # [T, k] fp32 routing weights (renormalised top-k of a random router), requires grad
    indices: Tensor  # [T, k] int64
    A: Tensor  # [E, r, H] fp32, requires grad
    B: Tensor  # [E, I, r] fp32, requires grad
    dense: tuple[Tensor, Tensor]  # A [r, H], B [I, r] fp32, for `lora`
    scaling: float
    grad_out: Tensor  # [T, I] model dtype


def make_inputs(
    shape: Shape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> MoeLoraInputs:
    """Seeded, drawn on the CPU, B non-zero so that every gradient is; the routing of a random router."""
    g = torch.Generator().manual_seed(seed)
    T, H, inter, E, r = shape.T, shape.H, shape.I, shape.E, shape.r

    def randn(*size: int, std: float) -> Tensor:
        return (torch.randn(size, generator=g) * std).to(device)

    x = randn(T, H, std=1.0).to(dtype)
    routing = reference.route(x, randn(E, H, std=0.02), top_k=shape.k)
    return MoeLoraInputs(
        x=x.requires_grad_(),
        weights=routing.weights.detach().requires_grad_(),
        indices=routing.indices,
        A=randn(E, r, H, std=H**-0.5).requires_grad_(),
        B=randn(E, inter, r, std=0.1 * r**-0.5).requires_grad_(),
        dense=(randn(r, H, std=H**-0.5).requires_grad_(), randn(inter, r, std=0.1 * r**-0.5).requires_grad_()),
        scaling=2.0,
        grad_out=randn(T, inter, std=1.0).to(dtype),
    )


def grad_targets(name: str, inp: MoeLoraInputs) -> list[tuple[str, Tensor]]:
    if name == "lora":
        return [("x", inp.x), ("A", inp.dense[0]), ("B", inp.dense[1])]
    return [("x", inp.x), ("weights", inp.weights), ("A", inp.A), ("B", inp.B)]


def loop_moe_lora(inp: MoeLoraInputs) -> Tensor:
    """The mixlora / MoE-PEFT way: one gather, two skinny GEMMs and one index_add per expert, every expert."""
    x = inp.x
    xf = x.float()
    y = xf.new_zeros(x.shape[0], inp.B.shape[1])
    for e in range(inp.A.shape[0]):
        tokens, slots = torch.where(inp.indices == e)
        delta = F.linear(F.linear(xf[tokens], inp.A[e]), inp.B[e]) * inp.scaling
        y.index_add_(0, tokens, delta * inp.weights[tokens, slots].unsqueeze(-1))
    return y.to(x.dtype)


def fused_moe_lora(inp: MoeLoraInputs) -> Callable[[], Tensor]:
    name = fused_backend(inp.x.device)

    def run() -> Tensor:
        with backend.set_backend(name):
            return ops.moe_lora(inp.x, inp.weights, inp.indices, inp.A, inp.B, inp.scaling)

    return run


PROVIDERS: dict[str, Callable[[MoeLoraInputs], Callable[[], Tensor]]] = {
    "loop": lambda inp: lambda: loop_moe_lora(inp),
    "reference": lambda inp: lambda: reference.moe_lora(inp.x, inp.weights, inp.indices, inp.A, inp.B, inp.scaling),
    "fused": fused_moe_lora,
    "lora": lambda inp: lambda: reference.lora(inp.x, *inp.dense, inp.scaling),
}
