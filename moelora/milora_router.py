"""MiLoRA's router: one MiLoraRouter per adapter and decoder layer, held in the layer's MiLoraRouters.

The router pools each prompt, routes it once over the layer's adapted modules (their LoraLinear wrappers in
moelora.layers read the gates), keeps that routing for every decoding step, and keeps a running pool of
every token run so far so that more tokens on the same KV cache (chunked prefill, a new turn) route on all
of them (moelora.routing_hooks decides which call is which).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelora import ops
from moelora.reference import (
    RATIONAL_GELU_DENOMINATOR,
    RATIONAL_GELU_NUMERATOR,
    PoolState,
    PromptRouting,
    pool_extend,
    pool_finish,
    route_pooled,
)

# MiLoRA pools a decoding step's token (for a later prompt on the same cache) with this many steps at once.
POOL_PENDING_STEPS = 16


class MiLoraRouter(nn.Module):
    """One MiLoRA adapter's router on one decoder layer (arXiv 2410.18035).

    weight [M, H] fp32 (M = the layer's adapted modules, in `module_names` order), pool_weight [H]
    (attention pooling, zero at init: mean pooling), rational_numerator [7] / rational_denominator [5]
    (the Pade activation, initialised to approximate GELU; absent with activation="gelu").
    `routing` keeps the last prefill's PromptRouting for every decoding step; `pool` (a PoolState, inference
    only) the running pool of every token run so far, which `extend` grows; `calls` counts router runs.
    """

    def __init__(
        self,
        hidden: int,
        module_names: list[str],
        *,
        top_k: int,
        pooling: str,
        activation: str,
        router_init_range: float,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.module_names = list(module_names)
        self.top_k, self.pooling = top_k, pooling
        M = len(self.module_names)
        self.weight = nn.Parameter(torch.empty(M, hidden, device=device).normal_(0.0, router_init_range))
        self.pool_weight = nn.Parameter(torch.zeros(hidden, device=device)) if pooling == "attention" else None
        if activation == "rational":
            self.rational_numerator = nn.Parameter(torch.tensor(RATIONAL_GELU_NUMERATOR, device=device))
            self.rational_denominator = nn.Parameter(torch.tensor(RATIONAL_GELU_DENOMINATOR, device=device))
        else:
            self.rational_numerator = self.rational_denominator = None
        self.routing: PromptRouting | None = None
        self.pool: PoolState | None = None
        self.pending: list[tuple[Tensor, Tensor | None]] = []  # decoding steps' tokens not yet pooled
        self.calls = 0

    def forward(self, hidden: Tensor, mask: Tensor | None, keep_pool: bool = False) -> PromptRouting:
        """Route the prompts: hidden [B, S, H], mask [B, S] or None. Keeps and returns the routing (gates [B, M]).

        keep_pool: also keep the running pool of these prompts, for `extend` (a detached copy: inference only).
        """
        self.calls += 1
        self.pool = None
        self.pending = []
        if keep_pool:
            with torch.no_grad():
                self.pool = pool_extend(None, hidden, mask, self.pooling, self.pool_weight)
        self.routing = ops.prompt_route(
            hidden,
            mask,
            self.weight,
            self.rational_numerator,
            self.rational_denominator,
            top_k=self.top_k,
            pooling=self.pooling,
            pool_weight=self.pool_weight,
        )
        return self.routing

    def gates(self, column: int, rows: int) -> Tensor:
        """Module `column`'s gate for each of the `rows` sequences routed at prefill [rows] fp32."""
        if self.routing is None:
            raise RuntimeError(
                "MiLoRA: no routing for this batch yet; run the prompts through the model (prefill) before "
                "decoding steps"
            )
        gates = self.routing.gates
        if gates.shape[0] != rows:
            raise RuntimeError(
                f"MiLoRA: the routing was computed for {gates.shape[0]} prompts but this call has {rows} sequences; "
                "run the prompts of this batch through the model (prefill) first"
            )
        return gates[:, column]

    def extend(self, hidden: Tensor, mask: Tensor | None, reroute: bool) -> PromptRouting | None:
        """Pool more tokens of the same sequences (hidden [B, S, H], mask [B, S] or None) into the kept pool;
        reroute: route again from it (on every token so far) and keep that routing.

        The pooled math is the reference's (moelora.reference.pool_extend), whatever the backend; no gradient.
        """
        if self.pool is None:
            raise RuntimeError(
                "MiLoRA: no routing for this batch yet; run the prompts through the model (prefill) before "
                "decoding steps or more chunks"
            )
        kept = self.pool.count.shape[0]
        if hidden.shape[0] != kept:
            raise RuntimeError(
                f"MiLoRA: the routing was computed for {kept} prompts but this call has {hidden.shape[0]} sequences; "
                "run the prompts of this batch through the model (prefill) first"
            )
        with torch.no_grad():
            if not reroute:
                # A decoding step: its token waits and is pooled with the next POOL_PENDING_STEPS - 1 (one
                # pool_extend of ~15 ops per 16 steps instead of per step; the same sums, in another order).
                self.pending.append((hidden.clone(), None if mask is None else mask.clone()))
                if len(self.pending) >= POOL_PENDING_STEPS:
                    self._pool_pending()
                return None
            self._pool_pending()
            self.pool = pool_extend(self.pool, hidden, mask, self.pooling, self.pool_weight)
            self.calls += 1
            pooled = pool_finish(self.pool, self.pooling)
            self.routing = route_pooled(
                pooled, self.weight, self.rational_numerator, self.rational_denominator, top_k=self.top_k
            )
        return self.routing

    def _pool_pending(self) -> None:
        """Pool the waiting decoding-step tokens into `pool`, as one chunk."""
        if not self.pending:
            return
        hidden = torch.cat([h for h, _ in self.pending], dim=1)
        masks = [m for _, m in self.pending]
        if all(m is None for m in masks):
            mask = None
        else:
            ones = [torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) for h, _ in self.pending]
            mask = torch.cat([o if m is None else m.bool() for o, m in zip(ones, masks, strict=True)], dim=1)
        self.pending = []
        self.pool = pool_extend(self.pool, hidden, mask, self.pooling, self.pool_weight)

    def clear(self) -> None:
        self.routing = None
        self.pool = None
        self.pending = []


class MiLoraRouters(nn.Module):
    """Every MiLoRA adapter's router of one decoder layer (set as the layer's `milora_routers`)."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
