"""The Triton backend: the dispatch policy over the ops of moelora.triton_ops (custom ops, fake kernels, autograd).

Importing this module imports triton (ImportError without it: moelora.backend then reports why). The ops
run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slowly, for tests). Here: each op's input
checks (the kernels' check_inputs) before any launch, what goes to the reference instead, and moe_lora's
regime (dense-masked up to DENSE_MAX_RANK_COLUMNS rank columns, sorted above). The fused FFN's regime is the
op's own choice (moelora.triton_ops.ffn_regime, re-exported here with MOELORA_FFN_REGIME).

MixLoRA's FFN: `mixlora_ffn` runs rank_shrink, mixlora_ffn and down_expand with the frozen down projection on
hbar between the last two; `routed_mixlora_ffn` (what MixLoraFFN uses) starts from route_shrink instead, the
router fused with the gate/up shrink. LoRA dropout (moelora.dropout, training with lora_dropout > 0) runs
inside the kernels; `dropout_mask` gives the mask they use.

What the kernels do not cover goes to the reference, as in the cpu backend: DoRA (supports_dora = False),
activations other than SiLU, GELU (erf or tanh) and ReLU, float64 tensors, and empty batches. `lora` (one
dense LoRA) is the reference's two GEMMs. MiLoRA's `prompt_route` and `segmented_lora` are kernels too (fp64:
the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelora import backend, reference, triton_ops
from moelora.activations import activation_name
from moelora.dropout import LoraDropout
from moelora.kernels import mixlora_ffn as _ffn_kernels
from moelora.kernels import mixlora_ffn_shrink_expand as _shrink_expand_kernels
from moelora.kernels import moe_lora as _moe_lora_kernels
from moelora.kernels import philox as _philox
from moelora.kernels import prompt_route as _prompt_route_kernels
from moelora.kernels import route as _route_kernels
from moelora.kernels import segmented_lora as _segmented_kernels
from moelora.reference import FFNSpec, PromptRouting, Routing

# Re-exported: the fused FFN op's choice of kernels, which the op makes itself (moelora.triton_ops).
from moelora.triton_ops import FFN_REGIME_ENV as FFN_REGIME_ENV
from moelora.triton_ops import FFN_SORTED_MIN_T as FFN_SORTED_MIN_T
from moelora.triton_ops import ffn_regime as ffn_regime

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_ops = torch.ops.moelora_triton
supports_dora = False


def dropout_mask(seed: int, stream: int, numel: int, p: float, device: torch.device | str) -> Tensor:
    """The keep mask (bool [numel]) the kernels apply for LoRA dropout (seed, stream, p), computed by their own
    Philox helper (kernels/philox.py): bitwise moelora.dropout.dropout_mask."""
    return _philox.dropout_mask(seed, stream, numel, p, device)


lora = reference.lora  # a dense LoRA is two cuBLAS GEMMs already


def route(x: Tensor, router_weight: Tensor, top_k: int | None = None, top_p: float | None = None) -> Routing:
    """moelora.reference.route in one Triton kernel (logits, softmax, top-k / top-p); see kernels/route.py."""
    _route_kernels.check_inputs(x, router_weight, top_k, top_p)
    if x.shape[0] == 0:
        backend.fell_back("route", "no tokens (T = 0)")
        return reference.route(x, router_weight, top_k=top_k, top_p=top_p)
    weights, indices, probs = triton_ops.Route.apply(x, router_weight, top_k or 0, float(top_p or 0.0))
    return Routing(weights, indices, probs)


# Past this many rank columns (E*r) moe_lora takes the sorted regime: the dense-masked shrink keeps 256
# columns of a token block in one program, and past that every token pays E*r columns for its k*r useful
# ones (E=64, r=16: 64x the sorted regime's shrink work). On an H200 at T=8192 (bf16, H=4096, I=11008, k=2,
# r=16, fwd+bwd) dense-masked against sorted: 1.17 / 1.23 ms at E*r = 128, 1.83 / 1.19 at 256, 6.19 / 1.24
# at 1024 (bench/results/gpu-check-cuda-nvidia-h200-2026-12-04.md): 256 already pays for the sort there.
# Kept until gpu_check's regimes section has timed smaller T, where the sort's fixed cost weighs more.
DENSE_MAX_RANK_COLUMNS = 256


MOE_LORA_REGIMES = ("dense", "sorted")


def moe_lora(
    x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float, *, regime: str | None = None
) -> Tensor:
    """moelora.reference.moe_lora in Triton: dense-masked (kernels/moe_lora.py) up to 256 rank columns E*r,
    sorted (kernels/moe_lora_sorted.py) above; fp64 and T = 0: the reference. regime "dense" or "sorted"
    forces one (the kernel tests and benchmarks run each at any E*r); None picks by E*r."""
    if regime is not None and regime not in MOE_LORA_REGIMES:
        raise ValueError(f"moe_lora: regime must be None, 'dense' or 'sorted', got {regime!r}")
    if x.dtype in _KERNEL_DTYPES:  # T = 0 too: the same errors whether or not a kernel launches
        _moe_lora_kernels.check_inputs(x, weights, indices, A, B)
    if x.dtype not in _KERNEL_DTYPES or x.shape[0] == 0:
        backend.fell_back("moe_lora", _fallback_reason(x))
        return reference.moe_lora(x, weights, indices, A, B, scaling)
    if regime is None:
        regime = "sorted" if A.shape[0] * A.shape[1] > DENSE_MAX_RANK_COLUMNS else "dense"
    if regime == "sorted":
        return triton_ops.MoeLoraSorted.apply(x, weights, indices, A, B, float(scaling))
    return triton_ops.MoeLora.apply(x, weights, indices, A, B, float(scaling))


def _fallback_reason(x: Tensor) -> str:
    """Why a call on x goes to the reference (for backend.fell_back): its dtype or no rows."""
    if x.dtype not in _KERNEL_DTYPES:
        return f"the triton backend does not cover {x.dtype} tensors"
    return "no tokens (T = 0)"


def _ffn_fallback_reason(ffn: FFNSpec, act_name: str | None, up: Tensor) -> str:
    if act_name is None:
        return f"the triton backend does not cover the activation {ffn.act!r}"
    if ffn.uses_dora:
        return "the triton backend does not cover DoRA"
    return _fallback_reason(up)


def _kernels_take(ffn: FFNSpec, act_name: str | None, up: Tensor) -> bool:
    """Whether the fused kernels cover this call (else the reference runs it); see the module docstring. LoRA
    dropout (ffn.dropout) runs inside the kernels."""
    return not (
        act_name is None or not ffn.has_lora or ffn.uses_dora or up.dtype not in _KERNEL_DTYPES or up.shape[0] == 0
    )


def _lora_pairs(ffn: FFNSpec) -> dict[str, tuple[Tensor, Tensor] | None]:
    """The (A, B) of each projection's LoRA, as the kernels' check_inputs takes them."""
    names = ("gate", "up", "down")
    return {p: (lo.A, lo.B) if lo is not None else None for p, lo in zip(names, ffn.loras, strict=True)}


def _ffn_from_ua(
    ua: Tensor,
    shared_a: bool,
    gate: Tensor | None,
    up: Tensor,
    weights: Tensor,
    indices: Tensor,
    ffn: FFNSpec,
    act_name: str,
    drop: tuple[float, int],
) -> Tensor:
    """The fused FFN from the gate/up rank-space rows on; the frozen down projection runs once, on hbar. drop:
    (p, seed) of LoRA dropout, (0.0, 0) without."""
    down_lora = ffn.down_lora
    gB, uB = (lo.B if lo is not None else None for lo in (ffn.gate_lora, ffn.up_lora))
    dA = down_lora.A if down_lora is not None else None
    args = (float(ffn.scaling), act_name, shared_a, *drop)
    hbar, zd = triton_ops.MixLoraFfn.apply(ua, gate, up, weights, indices, gB, uB, dA, *args)
    base = ffn.down_proj(hbar)
    if ffn.down_bias is None and base.dtype == up.dtype:
        if down_lora is None:
            return base
        # Wd hbar + the down delta, summed in fp32 and rounded once, in one kernel pass over [T, H]
        return triton_ops.DownExpand.apply(zd, down_lora.B, base, up.dtype)
    y = base.float()
    if ffn.down_bias is not None:
        y = y + (weights.float().sum(dim=-1, keepdim=True) - 1.0) * ffn.down_bias.float()
    if down_lora is not None:
        y = y + triton_ops.DownExpand.apply(zd, down_lora.B, None, up.dtype)
    return y.to(up.dtype)


def _drop_args(ffn: FFNSpec) -> tuple[float, int]:
    """(p, seed) of the call's LoRA dropout (ffn.dropout, a moelora.dropout.LoraDropout), (0.0, 0) without: the
    ops' drop_p and drop_seed."""
    dropout = ffn.dropout
    if dropout is not None and not isinstance(dropout, LoraDropout):
        raise TypeError(f"mixlora_ffn: dropout must be a moelora.dropout.LoraDropout, got {type(dropout).__name__}")
    if dropout is None or dropout.p == 0.0:
        return 0.0, 0
    if not 0 <= dropout.seed < 2**63:
        raise ValueError(f"mixlora_ffn: dropout.seed must be in [0, 2^63) for the Triton ops, got {dropout.seed}")
    return float(dropout.p), int(dropout.seed)


def _gate_up_a(ffn: FFNSpec) -> tuple[Tensor | None, bool]:
    """The A of the gate/up shrink and whether gate and up share it (see kernels' stack_gate_up_a)."""
    gA, uA = (lo.A if lo is not None else None for lo in (ffn.gate_lora, ffn.up_lora))
    return _shrink_expand_kernels.stack_gate_up_a(gA, uA)


def mixlora_ffn(x: Tensor, gate: Tensor | None, up: Tensor, weights: Tensor, indices: Tensor, ffn: FFNSpec) -> Tensor:
    """moelora.reference.mixlora_ffn with the rank-r work, activation and weighted sum fused in Triton.

    The frozen down projection runs here, once, on hbar (so a quantised base layer still works).
    """
    act_name = activation_name(ffn.act)
    if not _kernels_take(ffn, act_name, up):
        if ffn.has_lora:  # without any LoRA there is nothing to fuse
            backend.fell_back("mixlora_ffn", _ffn_fallback_reason(ffn, act_name, up))
        return reference.mixlora_ffn(x, gate, up, weights, indices, ffn)
    _ffn_kernels.check_inputs(x, gate, up, weights, indices, _lora_pairs(ffn), act_name)
    A, shared_a = _gate_up_a(ffn)
    drop = _drop_args(ffn)
    ua = triton_ops.RankShrink.apply(x, A, *drop) if A is not None else x.new_empty(x.shape[0], 0, dtype=torch.float32)
    return _ffn_from_ua(ua, shared_a, gate, up, weights, indices, ffn, act_name, drop)


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
    """route, then mixlora_ffn on the same x, with the router fused into the gate/up shrink: one read of x
    computes x @ [Wr | Ag_all | Au_all]^T (kernels/route.py, route_shrink) when the gate and up LoRAs have at
    most ROUTE_SHRINK_MAX_N rank columns together (MixLoRA's 8 x 16 x 2 = 256); otherwise route and
    mixlora_ffn apart. -> (y [T, H_out] in up's dtype, Routing)."""
    act_name = activation_name(ffn.act)
    A, shared_a = _gate_up_a(ffn)
    fused = (
        _kernels_take(ffn, act_name, up)
        and A is not None
        and A.shape[0] * A.shape[1] <= _route_kernels.ROUTE_SHRINK_MAX_N
        and x.dtype in _KERNEL_DTYPES
    )
    if not fused:
        routing = route(x, router_weight, top_k=top_k, top_p=top_p)
        return mixlora_ffn(x, gate, up, routing.weights, routing.indices, ffn), routing
    _route_kernels.check_inputs(x, router_weight, top_k, top_p)
    _ffn_kernels.check_inputs(x, gate, up, None, None, _lora_pairs(ffn), act_name)
    drop = _drop_args(ffn)
    weights, indices, probs, ua = triton_ops.RouteShrink.apply(
        x, router_weight, A, top_k or 0, float(top_p or 0.0), *drop
    )
    y = _ffn_from_ua(ua, shared_a, gate, up, weights, indices, ffn, act_name, drop)
    return y, Routing(weights, indices, probs)


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
    """moelora.reference.prompt_route in Triton (kernels/prompt_route.py): pooling, rational, softmax, top-k.

    Unlike the reference, an all-padding sequence does not raise here (no host sync): it pools to zeros.
    The model checks for empty prompts once, at prefill, through the reference's rule.
    """
    if hidden.dtype not in _KERNEL_DTYPES:
        backend.fell_back("prompt_route", _fallback_reason(hidden))
        return reference.prompt_route(
            hidden, mask, router_weight, numerator, denominator, top_k=top_k, pooling=pooling, pool_weight=pool_weight
        )
    _prompt_route_kernels.check_inputs(hidden, mask, router_weight, numerator, denominator, top_k, pooling, pool_weight)
    gates, indices, probs = triton_ops.PromptRoute.apply(
        hidden, mask, router_weight, numerator, denominator, pool_weight if pooling == "attention" else None,
        top_k, pooling,
    )  # fmt: skip
    return PromptRouting(gates, indices, probs)


def segmented_lora(
    x: Tensor, token_seq: Tensor, seq_lora: Tensor, seq_gate: Tensor, A: Tensor, B: Tensor, scaling: Tensor
) -> Tensor:
    """moelora.reference.segmented_lora in Triton (kernels/segmented_lora.py); fp64 and T = 0: the reference.

    A gate of exactly 0 gets gradient 0 here (its tokens are skipped), the reference gives s * <dy, B A x>.
    """
    if x.dtype in _KERNEL_DTYPES:  # T = 0 too: an empty batch gets the same errors as any other
        _segmented_kernels.check_inputs(x, token_seq, seq_lora, seq_gate, A, B, scaling)
    if x.dtype not in _KERNEL_DTYPES or x.shape[0] == 0:
        backend.fell_back("segmented_lora", _fallback_reason(x))
        return reference.segmented_lora(x, token_seq, seq_lora, seq_gate, A, B, scaling)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, seq_gate, A, B, scaling)):
        return triton_ops.SegmentedLora.apply(x, token_seq, seq_lora, seq_gate, A, B, scaling)
    return _ops.segmented_lora(x, token_seq, seq_lora, seq_gate, A, B, scaling)[0]
