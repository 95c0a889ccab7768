"""Drop-in modules: LoraLinear for attention projections, MixLoraFFN for the MoE-of-LoRA FFN.

Each wraps the original module as `base_layer` (frozen, untouched) and holds one small module per
adapter in `adapters`, so several adapters can live on one base; `active_adapter` picks one (None
disables them all). Adapter parameters are fp32 whatever the base dtype, as in MoE-PEFT.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora import ops
from moelora.reference import ExpertLora, dora_scale

# FFN shapes we know: the projections that feed the activation, and the one after it.
FFN_KINDS = {
    "gated": ("gate_proj", "up_proj", "down_proj"),  # llama, mistral, qwen2, gemma, gemma2
    "gated_fused": ("gate_up_proj", "down_proj"),  # phi3: gate and up in one Linear, chunked in two
    "plain": ("fc1", "fc2"),  # phi: act(fc1 x), no gate
}


def ffn_kind(mlp: nn.Module) -> str | None:
    """Which FFN_KINDS entry `mlp` matches, or None."""
    for kind, names in FFN_KINDS.items():
        if all(isinstance(getattr(mlp, n, None), nn.Module) for n in names):
            return kind
    return None


def ffn_activation(mlp: nn.Module) -> Callable[[Tensor], Tensor]:
    for name in ("act_fn", "activation_fn", "act"):
        act = getattr(mlp, name, None)
        if callable(act):
            return act
    raise ValueError(f"{type(mlp).__name__} has no act_fn/activation_fn; set MixLoraConfig.act_fn")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear-like module (quantised ones included)."""
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if out_f is None or in_f is None:
        out_f, in_f = module.weight.shape
    return int(out_f), int(in_f)


def _init_A(A: Tensor, init: str, r: int) -> None:
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:  # nn.Linear's default, as LoRA, PEFT and MoE-PEFT use
        for a in A.view(-1, *A.shape[-2:]):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def _row_norm(weight: Tensor) -> Tensor:
    return torch.linalg.norm(weight.detach().float(), dim=-1)


class LoraAdapter(nn.Module):
    """One adapter's LoRA on one projection: lora_A [r, in], lora_B [out, r], DoRA lora_magnitude [out]."""

    def __init__(
        self, base: nn.Module, r: int, scaling: float, dropout: float, use_dora: bool, init: str = "original"
    ) -> None:
        super().__init__()
        out_f, in_f = linear_shape(base)
        device = base.weight.device
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=device))
        _init_A(self.lora_A.data, init, r)
        self.lora_magnitude = nn.Parameter(_row_norm(base.weight)) if use_dora else None


class LoraLinear(nn.Module):
    """y = base(x) + s B A drop(x); with DoRA y = m / ||W + s B A|| * (base(x) + s B A drop(x))."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.active_adapter is None or self.active_adapter not in self.adapters:
            return y
        a: LoraAdapter = self.adapters[self.active_adapter]
        y = y + ops.lora(a.dropout(x), a.lora_A, a.lora_B, a.scaling).to(y.dtype)
        if a.lora_magnitude is not None:
            scale = dora_scale(self.base_layer.weight, a.lora_A, a.lora_B, a.scaling, a.lora_magnitude)
            y = (y.to(scale.dtype) * scale).to(y.dtype)
        return y


class MixLoraAdapter(nn.Module):
    """One MixLoRA adapter on one FFN: router [E, H] fp32 and, per adapted projection, stacked experts
    lora_A[proj] [E, r, in], lora_B[proj] [E, out, r], DoRA lora_magnitude[proj] [E, out]."""

    def __init__(
        self,
        mlp: nn.Module,
        projections: list[str],
        *,
        num_experts: int,
        top_k: int | None,
        top_p: float | None,
        r: int,
        scaling: float,
        dropout: float,
        jitter_noise: float,
        router_init_range: float,
        use_dora: bool,
        init: str = "original",
    ) -> None:
        super().__init__()
        first = getattr(mlp, FFN_KINDS[ffn_kind(mlp)][0])
        hidden = linear_shape(first)[1]
        device = first.weight.device
        self.num_experts, self.top_k, self.top_p = num_experts, top_k, top_p
        self.scaling, self.jitter_noise = scaling, jitter_noise
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.down_dropout = dropout
        self.router = nn.Parameter(torch.empty(num_experts, hidden, device=device).normal_(0.0, router_init_range))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        for name in projections:
            base = getattr(mlp, name)
            out_f, in_f = linear_shape(base)
            A = torch.empty(num_experts, r, in_f, device=device)
            _init_A(A, init, r)
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(num_experts, out_f, r, device=device))
            if use_dora:
                self.lora_magnitude[name] = nn.Parameter(_row_norm(base.weight).expand(num_experts, -1).clone())

    def expert_lora(self, name: str, rows: slice | None = None) -> ExpertLora | None:
        if name not in self.lora_A:
            return None
        B = self.lora_B[name]
        m = self.lora_magnitude.get(name)
        if rows is not None:
            B = B[:, rows]
            m = m[:, rows] if m is not None else None
        return ExpertLora(self.lora_A[name], B, m)


class MixLoraFFN(nn.Module):
    """MixLoRA FFN: router over LoRA experts on the frozen FFN `base_layer`, one down projection per token.

    Routing statistics for the load-balance loss go to `router_log` (a list the model sets) as
    (probs [T, E], indices [T, k]) per call.
    """

    def __init__(self, base_layer: nn.Module, act: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        kind = ffn_kind(base_layer)
        if kind is None:
            raise ValueError(f"MixLoraFFN: {type(base_layer).__name__} matches none of the FFN layouts {FFN_KINDS}")
        self.base_layer = base_layer
        self.kind = kind
        self.act = act if act is not None else ffn_activation(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.router_log: list[tuple[Tensor, Tensor]] | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.active_adapter is None or self.active_adapter not in self.adapters:
            return self.base_layer(hidden_states)
        a: MixLoraAdapter = self.adapters[self.active_adapter]
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.training and a.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - a.jitter_noise, 1.0 + a.jitter_noise)

        routing = ops.route(x, a.router, top_k=a.top_k, top_p=a.top_p)
        if self.router_log is not None:
            self.router_log.append((routing.probs, routing.indices))

        base = self.base_layer
        if self.kind == "gated":
            gate, up, down = base.gate_proj(x), base.up_proj(x), base.down_proj
            gate_lora, up_lora, down_lora = (
                a.expert_lora("gate_proj"),
                a.expert_lora("up_proj"),
                a.expert_lora("down_proj"),
            )
            gate_w, up_w = base.gate_proj.weight, base.up_proj.weight
        elif self.kind == "gated_fused":
            gate, up = base.gate_up_proj(x).chunk(2, dim=-1)
            inter = gate.shape[-1]
            # Splitting the fused B by rows is exact: the shared A gives both halves' rank-space input.
            gate_lora = a.expert_lora("gate_up_proj", slice(0, inter))
            up_lora = a.expert_lora("gate_up_proj", slice(inter, 2 * inter))
            down, down_lora = base.down_proj, a.expert_lora("down_proj")
            gate_w, up_w = base.gate_up_proj.weight[:inter], base.gate_up_proj.weight[inter:]
        else:
            gate, up, down = None, base.fc1(x), base.fc2
            gate_lora, up_lora, down_lora = None, a.expert_lora("fc1"), a.expert_lora("fc2")
            gate_w, up_w = None, base.fc1.weight

        down_dropout = None
        if self.training and a.down_dropout > 0:
            p = a.down_dropout

            def down_dropout(h: Tensor) -> Tensor:
                return F.dropout(h, p=p, training=True)

        y = ops.mixlora_ffn(
            a.dropout(x),
            gate,
            up,
            routing.weights,
            routing.indices,
            gate_lora=gate_lora,
            up_lora=up_lora,
            down_lora=down_lora,
            down_proj=down,
            act=self.act,
            scaling=a.scaling,
            gate_weight=gate_w,
            up_weight=up_w,
            down_weight=down.weight,
            down_bias=getattr(down, "bias", None),
            down_dropout=down_dropout,
        )
        return y.reshape(*shape[:-1], y.shape[-1])
