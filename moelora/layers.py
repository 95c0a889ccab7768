"""Drop-in modules: LoraLinear for projections, MixLoraFFN for the MoE-of-LoRA FFN, MiLoraRouter per layer.

Each wrapper keeps the original module as `base_layer` (frozen, untouched) and holds one small module per
adapter in `adapters`, so several adapters can live on one base; `active_adapter` picks one (None
disables them all). Adapter parameters are fp32 whatever the base dtype, as in MoE-PEFT.

Mixed batches (one adapter per sequence, PEFT's `adapter_names`): the model sets a shared BatchPlan on
every wrapper (`batch_plan`); a wrapper then applies each adapter it holds to that adapter's rows only.
MiLoRA: a LoraAdapter on a MiLoRA module reads its per-sequence gate from its layer's MiLoraRouter,
whose routing is computed at prefill and kept (`MiLoraRouter.routing`) for every decoding step; the router
also keeps a running pool of the prompt (`MiLoraRouter.pool`) so that more tokens on the same KV cache
(chunked prefill, a new turn) route on every token so far. Routing is per prompt, not causal: earlier
tokens keep the states and cached keys/values of their own call's gates, so only the first layer (it pools
embeddings) routes exactly as one prefill over the whole text; deeper layers pool states made under the
earlier calls' gates and may pick other modules.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from moelora import ops
from moelora.dropout import LoraDropout
from moelora.milora_router import MiLoraRouter
from moelora.reference import ExpertLora, FFNSpec, PromptRouting, dora_scale

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


def keep_quantized_trainable(model: nn.Module) -> None:
    """Keep bitsandbytes 4-bit layers of `model` on their autograd path on CPUs with AVX512-BF16.

    There, bitsandbytes (0.50) repacks a Linear4bit in place at its first eval-mode forward without grad, for
    a bf16 inference kernel that has no autograd: every later forward, training included, returns outputs with
    no gradient, so the LoRAs behind that layer would silently stop learning (e.g. after a Trainer evaluation).
    This turns the repacking off (inference then runs the layer's dequantising path) and undoes it, with
    bitsandbytes' own inverse, where it already happened; its absmax stays rounded to bf16 by the packing.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    packed = [m for m in layers if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]
    unpack = None
    if packed:
        from bitsandbytes import functional as bnb_functional

        unpack = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
        if unpack is None:
            raise RuntimeError(
                f"{len(packed)} bitsandbytes 4-bit layers were repacked for CPU inference (an eval forward without "
                "grad ran before the adapter was added) and this bitsandbytes has no inverse: gradients would not "
                "flow through them; load the model again and add the adapter before any eval forward"
            )
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    for m in packed:
        m.weight.data, m.weight.quant_state = unpack(m.weight.data, m.weight.quant_state)


# MiLoRA inference calls of at most this many tokens (decoding steps) run two dense GEMMs scaled per sequence;
# larger ones (prefill) run segmented_lora, whose fused kernels skip the sequences that did not pick the module.
# At decode size the ops around a segmented call cost more than the work they skip: 26 against 139 us per
# module at T=8, H=512, r=32 (AMD EPYC, 2 threads).
GATED_DENSE_TOKENS = 64


_ONE_SEGMENT: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _one_segment(rows: int, tokens: int, scaling: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """segmented_lora's index tensors for one adapter on every row: token_seq [tokens], seq_lora [rows] (all 0),
    scaling [1]. Cached: a decoding step asks for the same ones in every module (4 ops saved per module call)."""
    key = (rows, tokens, scaling, device)
    if key not in _ONE_SEGMENT:
        if len(_ONE_SEGMENT) >= 64:  # prompt lengths vary: keep the cache small
            _ONE_SEGMENT.clear()
        token_seq = torch.arange(rows, device=device).repeat_interleave(tokens // rows)
        only_lora = torch.zeros(rows, dtype=torch.int64, device=device)
        _ONE_SEGMENT[key] = (token_seq, only_lora, torch.full((1,), scaling, dtype=torch.float32, device=device))
    return _ONE_SEGMENT[key]


def _init_A(A: Tensor, init: str, r: int) -> None:
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / r)
    else:  # nn.Linear's default, as LoRA, PEFT and MoE-PEFT use
        for a in A.view(-1, *A.shape[-2:]):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def _row_norm(weight: Tensor) -> Tensor:
    """DoRA's initial magnitude ||W|| per output row."""
    if not weight.is_floating_point():
        # A bitsandbytes 4-bit or 8-bit weight holds codes, not W: its norm (and DoRA's scale) would be wrong.
        raise ValueError(
            f"use_dora=True needs the base projection's weight in floating point, got {weight.dtype} "
            "(a quantised layer, e.g. bitsandbytes 4-bit or 8-bit); use use_dora=False on a quantised base"
        )
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
        # MiLoRA: (the layer's router, this module's column in its gates); a tuple, so not a submodule.
        self.milora: tuple[MiLoraRouter, int] | None = None
        self._gate_scale: tuple[PromptRouting | None, tuple[int, int], Tensor | None] | None = None

    def gates(self, rows: int) -> Tensor | None:
        """This module's MiLoRA gate per sequence [rows] fp32, or None for a plain LoRA."""
        if self.milora is None:
            return None
        router, column = self.milora
        return router.gates(column, rows)

    def gate_scale(self, rows: int, ndim: int) -> Tensor | None:
        """MiLoRA at inference: this module's gate x scaling per sequence, [rows, 1, ...] for an input of `ndim`
        dims (fp32), or None when every gate is 0 on a CPU tensor (nothing to run; read on the host only where
        that is free). Made once per routing and reused by every decoding step until the router routes again."""
        router, column = self.milora
        cached = self._gate_scale
        if cached is not None and cached[0] is router.routing and cached[1] == (rows, ndim):
            return cached[2]
        scale = (router.gates(column, rows) * self.scaling).view(rows, *[1] * (ndim - 1))
        if scale.device.type == "cpu" and not bool(scale.any()):
            scale = None
        self._gate_scale = (router.routing, (rows, ndim), scale)
        return scale


def _plus(y: Tensor, delta: Tensor) -> Tensor:
    """y + delta in y's dtype, without a no-op cast when they match (a decoding step adds one per module)."""
    return y + (delta if delta.dtype == y.dtype else delta.to(y.dtype))


def _picked_sequences(gates: Tensor, x: Tensor) -> Tensor | None:
    """The rows [n] of the sequences whose gate is not 0, or None to run every row: when all are picked, off
    CPU (reading the gates would stop a GPU stream) and under torch.compile (a data-dependent shape)."""
    if x.device.type != "cpu" or x.dim() < 2 or torch.compiler.is_compiling():
        return None
    picked = gates.detach().nonzero().flatten()
    return None if picked.numel() == gates.numel() else picked


class LoraLinear(nn.Module):
    """y = base(x) + s B A drop(x); with DoRA y = m / ||W + s B A|| * (base(x) + s B A drop(x)).

    A MiLoRA module multiplies its delta by its sequence's gate (0 when the router did not pick it).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.batch_plan: BatchPlan | None = None
        self._stacks: tuple[tuple, tuple[Tensor, Tensor, Tensor, dict[str, int]]] | None = None
        self._gate_cache: tuple[tuple, tuple, Tensor] | None = None

    # The frozen layer's attributes, so code that reads a Linear (a MixLoraFFN over this FFN) still works.
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        return linear_shape(self.base_layer)[1]

    @property
    def out_features(self) -> int:
        return linear_shape(self.base_layer)[0]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.batch_plan is not None:
            return self._forward_mixed(x, y, self.batch_plan)
        if self.active_adapter is None or self.active_adapter not in self.adapters:
            return y
        a: LoraAdapter = self.adapters[self.active_adapter]
        return self._add_delta(a, x, y)

    def _add_delta(self, a: LoraAdapter, x: Tensor, y: Tensor) -> Tensor:
        """y + this adapter's delta on every row of x (gated per sequence for MiLoRA)."""
        if a.milora is not None and not torch.is_grad_enabled() and x.dim() >= 2 and a.lora_magnitude is None:
            return self._add_gated(a, x, y)
        gates = a.gates(x.shape[0])
        if gates is None:
            delta = ops.lora(a.dropout(x), a.lora_A, a.lora_B, a.scaling)
            y = _plus(y, delta)
        else:
            # MiLoRA training: the gate folded into the scale (one op on the output fewer, forward and backward).
            scale = (gates * a.scaling).view(-1, *[1] * (x.dim() - 1))
            picked = _picked_sequences(gates, x)
            if picked is None:
                delta = ops.lora(a.dropout(x), a.lora_A, a.lora_B, scale)
                y = _plus(y, delta)
            else:
                # Only the sequences that picked this module: a gate of 0 is an unpicked module, whose delta
                # and every gradient through it are 0 (the top-k mask), so skipping its rows changes nothing
                # but the work. A and B still get their (partly zero) gradients, as PEFT's optimiser expects.
                x_picked = x.index_select(0, picked)
                delta = ops.lora(a.dropout(x_picked), a.lora_A, a.lora_B, scale.index_select(0, picked))
                y = y.index_add(0, picked, delta.to(y.dtype))
        if a.lora_magnitude is not None:
            scale = dora_scale(self.base_layer.weight, a.lora_A, a.lora_B, a.scaling, a.lora_magnitude)
            y = (y.to(scale.dtype) * scale).to(y.dtype)
        return y

    def _add_gated(self, a: LoraAdapter, x: Tensor, y: Tensor) -> Tensor:
        """MiLoRA inference: y + each sequence's gate x this module's delta (x [rows, ..., in])."""
        tokens = x.numel() // x.shape[-1]
        if tokens <= GATED_DENSE_TOKENS:
            # Decoding: two GEMMs over every row, scaled per sequence (the gate-x-scaling cached per routing),
            # as many ops as a plain LoRA; a module no sequence picked runs nothing on CPU.
            scale = a.gate_scale(x.shape[0], x.dim())
            if scale is None:
                return y
            delta = ops.lora(x, a.lora_A, a.lora_B, scale)
            return _plus(y, delta)
        # Prefill: one segmented_lora call, in which the fused kernels skip sequences whose gate is 0.
        flat = x.reshape(-1, x.shape[-1])
        token_seq, only_lora, scaling = _one_segment(x.shape[0], flat.shape[0], a.scaling, x.device)
        gates = a.gates(x.shape[0])
        delta = ops.segmented_lora(flat, token_seq, only_lora, gates, a.lora_A[None], a.lora_B[None], scaling)
        return y + delta.reshape(*x.shape[:-1], delta.shape[-1]).to(y.dtype)

    def _forward_mixed(self, x: Tensor, y: Tensor, plan: BatchPlan) -> Tensor:
        groups = [(name, rows) for name, rows in plan.groups(x.shape[0], x.device) if name in self.adapters]
        if not groups:
            return y
        if len(groups) == 1 and groups[0][1] is None:  # the whole batch runs one adapter
            return self._add_delta(self.adapters[groups[0][0]], x, y)
        adapters = [self.adapters[name] for name, _ in groups]
        if torch.is_grad_enabled() or any(a.lora_magnitude is not None for a in adapters):
            for a, (_, rows) in zip(adapters, groups, strict=True):
                y = y.index_copy(0, rows, self._add_delta(a, x[rows], y[rows]))
            return y
        return y + self._segmented(x, plan).to(y.dtype)

    def _segmented(self, x: Tensor, plan: BatchPlan) -> Tensor:
        """Every row's adapter in one segmented_lora call over stacked (rank zero-padded) LoRAs."""
        A, B, scaling, slot = self._stacked()
        rows, seq = x.shape[0], x.shape[1] if x.dim() == 3 else 1
        seq_lora = plan.slots(slot, x.device)
        seq_gate = self._seq_gates(plan, rows, x.device)
        token_seq = _one_segment(rows, rows * seq, 1.0, x.device)[0]
        flat = x.reshape(-1, x.shape[-1])
        delta = ops.segmented_lora(flat, token_seq, seq_lora, seq_gate, A, B, scaling)
        return delta.reshape(*x.shape[:-1], delta.shape[-1])

    def _seq_gates(self, plan: BatchPlan, rows: int, device: torch.device) -> Tensor:
        """Each sequence's gate [rows] fp32 (its MiLoRA module's gate, 1 for other adapters), inference only;
        made once per batch layout and routing and reused by every decoding step."""
        groups = plan.groups(rows, device)
        routers = [self.adapters[n].milora if n in self.adapters else None for n, _ in groups]
        routings = tuple(None if m is None else m[0].routing for m in routers)
        key = (tuple(plan.names()), rows, device)
        cached = self._gate_cache
        if cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1], routings, strict=True)):
            return cached[2]
        seq_gate = torch.ones(rows, dtype=torch.float32, device=device)
        for (name, idx), m in zip(groups, routers, strict=True):
            if m is not None:
                gates = self.adapters[name].gates(rows if idx is None else idx.numel()).float()
                seq_gate = seq_gate.index_copy(0, idx, gates) if idx is not None else gates
        self._gate_cache = (key, routings, seq_gate)
        return seq_gate

    def _stacked(self) -> tuple[Tensor, Tensor, Tensor, dict[str, int]]:
        """Every adapter's A [n, r_max, in], B [n, out, r_max] and scaling [n], rebuilt only when a weight changed."""
        names = list(self.adapters)
        if torch.compiler.is_compiling() and self._stacks is not None and list(self._stacks[1][3]) == names:
            # Tensor._version cannot be guarded on: checking it breaks the graph (35 graphs per decoding step
            # of a mixed batch instead of 1). A compiled call (a decoding step) reuses the stack that the last
            # eager call (the prefill) built or checked.
            return self._stacks[1]
        key = tuple((n, self.adapters[n].lora_A._version, self.adapters[n].lora_B._version) for n in names)
        key += tuple((id(self.adapters[n].lora_A), self.adapters[n].lora_A.device) for n in names)
        if self._stacks is None or self._stacks[0] != key:
            r = max(self.adapters[n].lora_A.shape[0] for n in names)
            first = self.adapters[names[0]]
            A = first.lora_A.new_zeros(len(names), r, first.lora_A.shape[1])
            B = first.lora_B.new_zeros(len(names), first.lora_B.shape[0], r)
            with torch.no_grad():
                for i, n in enumerate(names):
                    a = self.adapters[n]
                    A[i, : a.lora_A.shape[0]] = a.lora_A
                    B[i, :, : a.lora_B.shape[1]] = a.lora_B
            scaling = torch.tensor([self.adapters[n].scaling for n in names], dtype=torch.float32, device=A.device)
            self._stacks = (key, (A, B, scaling, {n: i for i, n in enumerate(names)}))
        return self._stacks[1]


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
        self.lora_dropout = dropout  # of x before the gate/up shrinks and of each h_j before the down shrink
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
        self.batch_plan: BatchPlan | None = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.batch_plan is not None:
            return self._forward_mixed(hidden_states, self.batch_plan)
        if self.active_adapter is None or self.active_adapter not in self.adapters:
            return self.base_layer(hidden_states)
        return self._mixlora(self.adapters[self.active_adapter], hidden_states)

    def _forward_mixed(self, hidden_states: Tensor, plan: BatchPlan) -> Tensor:
        """MixLoRA rows through their adapter, the other rows through the base FFN (whose own LoRA
        wrappers then see only those rows: the plan is narrowed to them)."""
        rows_total = hidden_states.shape[0]
        groups = [(n, rows) for n, rows in plan.groups(rows_total, hidden_states.device) if n in self.adapters]
        if not groups:
            return self.base_layer(hidden_states)
        if len(groups) == 1 and groups[0][1] is None:
            with plan.narrowed([]):
                return self._mixlora(self.adapters[groups[0][0]], hidden_states)
        names = plan.names()
        mine = {n for n, _ in groups}
        rest = [i for i, n in enumerate(names) if n not in mine]
        out = None
        if rest:
            rest_rows = plan.index(rest, hidden_states.device)
            with plan.narrowed(rest):
                base_out = self.base_layer(hidden_states[rest_rows])
            out = base_out.new_empty(rows_total, *base_out.shape[1:]).index_copy(0, rest_rows, base_out)
        for name, rows in groups:
            with plan.narrowed([]):
                part = self._mixlora(self.adapters[name], hidden_states[rows])
            if out is None:
                out = part.new_empty(rows_total, *part.shape[1:])
            out = out.index_copy(0, rows, part)
        return out

    def _mixlora(self, a: MixLoraAdapter, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.training and a.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - a.jitter_noise, 1.0 + a.jitter_noise)

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

        # LoRA dropout runs inside the op from a seed (moelora.dropout): no dropped copy of x or h_j is made,
        # and the router reads x undropped, so a fused backend still reads x once for the router and the LoRAs.
        dropout = LoraDropout.draw(a.lora_dropout) if self.training else None
        y, routing = ops.routed_mixlora_ffn(
            x,
            a.router,
            gate,
            up,
            FFNSpec(
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
                dropout=dropout,
            ),
            top_k=a.top_k,
            top_p=a.top_p,
        )
        if self.router_log is not None:
            self.router_log.append((routing.probs, routing.indices))
        return y.reshape(*shape[:-1], y.shape[-1])


class BatchPlan:
    """Which adapter each sequence of a batch runs (PEFT's `adapter_names`), shared by every wrapper.

    The model binds the plan to each call's batch size (`bind`): the names as given, or each repeated
    rows / len(names) times when generate() expanded the batch (beams, num_return_sequences). A MixLoraFFN
    narrows it to the rows it passes on to its base layer (`narrowed`). Row-index tensors are built once
    per layout and device and cached, so decoding steps copy nothing to the device.
    """

    def __init__(self, names: list[str]) -> None:
        self.given = list(names)
        self._stack: list[list[str]] = []
        self._cache: dict[tuple, object] = {}

    def bind(self, rows: int) -> None:
        """Set the batch of the call about to run: `rows` sequences."""
        names = self.given
        if rows != len(names):
            if rows % len(names) != 0:
                raise ValueError(
                    f"adapter_names has {len(names)} entries but the batch has {rows} sequences; "
                    "pass one adapter name per sequence"
                )
            names = [n for n in names for _ in range(rows // len(names))]
        self._stack = [names]

    def names(self) -> list[str]:
        if not self._stack:
            raise RuntimeError("BatchPlan: used before bind(); run the model through MoeLoraModel")
        return self._stack[-1]

    @contextlib.contextmanager
    def narrowed(self, keep: list[int]) -> Iterator[None]:
        """Inside: the batch is the rows `keep` of the current one (an empty list: no adapter rows at all)."""
        current = self.names()
        self._stack.append([current[i] for i in keep])
        try:
            yield
        finally:
            self._stack.pop()

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, Tensor | None]]:
        """(adapter name, its row indices [n] int64 on `device`) per adapter present; None = every row."""
        names = self.names()
        if not names:  # narrowed to no rows: a MixLoraFFN's own projections, for rows it adapts itself
            return []
        if rows != len(names):
            raise ValueError(f"BatchPlan: a wrapper got {rows} rows, the plan has {len(names)} sequences")
        key = ("groups", tuple(names), str(device))
        if key not in self._cache:
            order = list(dict.fromkeys(names))
            if len(order) == 1:
                self._cache[key] = [(order[0], None)]
            else:
                self._cache[key] = [
                    (n, torch.tensor([i for i, m in enumerate(names) if m == n], device=device)) for n in order
                ]
        return self._cache[key]

    def index(self, rows: list[int], device: torch.device) -> Tensor:
        """rows as an int64 tensor on `device`, made once per list and device (no copy per decoding step)."""
        key = ("index", tuple(rows), str(device))
        if key not in self._cache:
            self._cache[key] = torch.tensor(rows, dtype=torch.int64, device=device)
        return self._cache[key]

    def slots(self, slot: dict[str, int], device: torch.device) -> Tensor:
        """seq_lora [rows] int64: each row's index into a wrapper's stacked LoRAs (-1: not held there)."""
        names = self.names()
        key = ("slots", tuple(names), tuple(slot.items()), str(device))
        if key not in self._cache:
            self._cache[key] = torch.tensor([slot.get(n, -1) for n in names], dtype=torch.int64, device=device)
        return self._cache[key]
