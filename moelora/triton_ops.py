"""The Triton ops: each kernel launch of moelora.kernels as a `torch.library.custom_op` (namespace moelora_triton)
with its fake kernel, and the autograd Functions that call the forward and backward ops. Each op lives here once;
moelora.triton_backend (the dispatch policy: input checks, fallbacks to the reference, moe_lora's regime)
calls these Functions, and the kernel tests (tests/test_triton_*.py) run them through it.

Importing this module imports triton and registers the ops. They run on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (slowly, for tests). With a fake kernel each, torch.compile traces a model through them as
opaque calls.

MixLoRA's FFN runs three ops: the gate/up shrink `rank_shrink` (or `route_shrink`, the router fused with it:
one read of x for both), then `mixlora_ffn` from the rank-space rows to hbar and the down LoRA's rank-space
rows zd, then `down_expand`: Wd hbar + zd @ Bd_all in one pass, rounded once. The frozen down projection runs
between the last two, on hbar, outside the ops (so a quantised base layer still works). `mixlora_ffn` and its
backward op pick their kernels (dense-masked or sorted) from the shapes by ffn_regime, inside the op, so that
forward and backward agree and a compiled graph holds one op. LoRA dropout runs inside the kernels from
(drop_p, drop_seed) op arguments: the shrinks read x through its seeded mask (the router reads x itself, in the
same pass), the down LoRA each h_j through its own; the backward regenerates both masks, none is stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton  # noqa: F401 - fail the import here, with triton's own message, when triton is missing
from torch import Tensor

from moelora import reference
from moelora.dropout import LoraDropout
from moelora.kernels import mixlora_ffn as _ffn_kernels
from moelora.kernels import mixlora_ffn_bwd as _ffn_bwd_kernels
from moelora.kernels import mixlora_ffn_shrink_expand as _shrink_expand_kernels
from moelora.kernels import mixlora_ffn_sorted as _ffn_sorted_kernels
from moelora.kernels import mixlora_ffn_sorted_bwd as _ffn_sorted_bwd_kernels
from moelora.kernels import moe_lora as _moe_lora_kernels
from moelora.kernels import moe_lora_sorted as _sorted_kernels
from moelora.kernels import prompt_route as _prompt_route_kernels
from moelora.kernels import prompt_route_bwd as _prompt_route_bwd_kernels
from moelora.kernels import route as _route_kernels
from moelora.kernels import segmented_lora as _segmented_kernels

_ops = torch.ops.moelora_triton


def _none(t: Tensor | None, like: Tensor) -> Tensor:
    """custom ops cannot return None: an absent gradient travels as a 1-d empty tensor."""
    return t if t is not None else like.new_empty(0)


def _or_none(t: Tensor) -> Tensor | None:
    return None if t.dim() == 1 and t.numel() == 0 else t


@torch.library.custom_op("moelora_triton::route", mutates_args=())
def _route_op(x: Tensor, router_weight: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """top_k > 0: top-k renormalised; top_k == 0: top-p."""
    k = top_k if top_k > 0 else router_weight.shape[0]
    return _route_kernels.route_fwd(x, router_weight, k, top_p if top_k == 0 else None)


@_route_op.register_fake
def _(x, router_weight, top_k, top_p):
    dt = reference.compute_dtype(x)
    k = top_k if top_k > 0 else router_weight.shape[0]
    T, E = x.shape[0], router_weight.shape[0]
    return x.new_empty(T, k, dtype=dt), x.new_empty(T, k, dtype=torch.int64), x.new_empty(T, E, dtype=dt)


@torch.library.custom_op("moelora_triton::route_backward", mutates_args=())
def _route_backward_op(
    grad_weights: Tensor,
    grad_probs: Tensor | None,
    x: Tensor,
    router_weight: Tensor,
    weights: Tensor,
    indices: Tensor,
    probs: Tensor,
    renormalized: bool,
) -> tuple[Tensor, Tensor]:
    return _route_kernels.route_bwd(grad_weights, grad_probs, x, router_weight, weights, indices, probs, renormalized)


@_route_backward_op.register_fake
def _(grad_weights, grad_probs, x, router_weight, weights, indices, probs, renormalized):
    return x.new_empty(x.shape), router_weight.new_empty(router_weight.shape)


@torch.library.custom_op("moelora_triton::moe_lora", mutates_args=())
def _moe_lora_op(
    x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float
) -> tuple[Tensor, Tensor, Tensor]:
    """-> y [T, out], and the rank-space u, v [T, E*r] fp32 that the backward needs."""
    return _moe_lora_kernels.moe_lora_fwd(x, weights, indices, A, B, scaling, save_u=True)


@_moe_lora_op.register_fake
def _(x, weights, indices, A, B, scaling):
    rank_space = x.new_empty(x.shape[0], A.shape[0] * A.shape[1], dtype=torch.float32)
    return x.new_empty(x.shape[0], B.shape[1]), rank_space, torch.empty_like(rank_space)


@torch.library.custom_op("moelora_triton::moe_lora_backward", mutates_args=())
def _moe_lora_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weights: Tensor,
    indices: Tensor,
    A: Tensor,
    B: Tensor,
    u: Tensor,
    v: Tensor,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _moe_lora_kernels.moe_lora_bwd(grad_y.contiguous(), x, weights, indices, A, B, u, v, scaling)


@_moe_lora_backward_op.register_fake
def _(grad_y, x, weights, indices, A, B, u, v, scaling):
    # grad_A and grad_B are written into empty_like(A / B) by the real kernel, so they keep A's and B's strides
    return x.new_empty(x.shape), weights.new_empty(weights.shape), torch.empty_like(A), torch.empty_like(B)


@torch.library.custom_op("moelora_triton::moe_lora_sorted", mutates_args=())
def _moe_lora_sorted_op(
    x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> y [T, out], u [T*k, r] fp32 and the expert sort (order [T*k], offsets [E+1] int64) for the backward."""
    y, u, sort = _sorted_kernels.moe_lora_sorted_fwd(x, weights, indices, A, B, scaling, save=True)
    return y, u, sort.order, sort.offsets


@_moe_lora_sorted_op.register_fake
def _(x, weights, indices, A, B, scaling):
    pairs = indices.numel()
    return (
        x.new_empty(x.shape[0], B.shape[1]),
        x.new_empty(pairs, A.shape[1], dtype=torch.float32),
        x.new_empty(pairs, dtype=torch.int64),
        x.new_empty(A.shape[0] + 1, dtype=torch.int64),
    )


@torch.library.custom_op("moelora_triton::moe_lora_sorted_backward", mutates_args=())
def _moe_lora_sorted_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weights: Tensor,
    indices: Tensor,
    A: Tensor,
    B: Tensor,
    u: Tensor,
    order: Tensor,
    offsets: Tensor,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sort = _sorted_kernels.ExpertSort(order, offsets)
    return _sorted_kernels.moe_lora_sorted_bwd(grad_y.contiguous(), x, weights, indices, A, B, u, sort, scaling)


@_moe_lora_sorted_backward_op.register_fake
def _(grad_y, x, weights, indices, A, B, u, order, offsets, scaling):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weights, memory_format=torch.contiguous_format),
        torch.empty_like(A, memory_format=torch.contiguous_format),
        torch.empty_like(B, memory_format=torch.contiguous_format),
    )


def _dropout(p: float, seed: int) -> LoraDropout | None:
    """The ops' (drop_p, drop_seed) pair as the kernels take it: p == 0 is no dropout."""
    return LoraDropout(p, seed) if p > 0.0 else None


@torch.library.custom_op("moelora_triton::rank_shrink", mutates_args=())
def _rank_shrink_op(x: Tensor, A: Tensor, drop_p: float = 0.0, drop_seed: int = 0) -> Tensor:
    """ua = drop(x) @ A_all^T [T, E'*r] fp32, A [E', r, H]: the gate and up LoRAs' shrink, one read of x; drop is
    LoRA dropout with (drop_p, drop_seed) (moelora.dropout, stream X_STREAM), none at drop_p = 0."""
    return _shrink_expand_kernels.shrink_x(x, A, _dropout(drop_p, drop_seed))


@_rank_shrink_op.register_fake
def _(x, A, drop_p=0.0, drop_seed=0):
    return x.new_empty(x.shape[0], A.shape[0] * A.shape[1], dtype=torch.float32)


@torch.library.custom_op("moelora_triton::rank_shrink_backward", mutates_args=())
def _rank_shrink_backward_op(
    grad_ua: Tensor, x: Tensor, A: Tensor, drop_p: float = 0.0, drop_seed: int = 0
) -> tuple[Tensor, Tensor]:
    return _shrink_expand_kernels.shrink_x_bwd(grad_ua, x, A, dropout=_dropout(drop_p, drop_seed))


@_rank_shrink_backward_op.register_fake
def _(grad_ua, x, A, drop_p=0.0, drop_seed=0):
    return x.new_empty(x.shape), A.new_empty(A.shape)


@torch.library.custom_op("moelora_triton::route_shrink", mutates_args=())
def _route_shrink_op(
    x: Tensor, router_weight: Tensor, A: Tensor, top_k: int, top_p: float, drop_p: float = 0.0, drop_seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """route (top_k > 0: top-k renormalised; 0: top-p) and rank_shrink from one read of x; the router reads x,
    the shrink drop(x) (as rank_shrink)."""
    k = top_k if top_k > 0 else router_weight.shape[0]
    top = top_p if top_k == 0 else None
    return _route_kernels.route_shrink_fwd(x, router_weight, A, k, top, _dropout(drop_p, drop_seed))


@_route_shrink_op.register_fake
def _(x, router_weight, A, top_k, top_p, drop_p=0.0, drop_seed=0):
    k = top_k if top_k > 0 else router_weight.shape[0]
    T, E = x.shape[0], router_weight.shape[0]
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty(T, k, **f32),
        x.new_empty(T, k, dtype=torch.int64),
        x.new_empty(T, E, **f32),
        x.new_empty(T, A.shape[0] * A.shape[1], **f32),
    )


@torch.library.custom_op("moelora_triton::route_shrink_backward", mutates_args=())
def _route_shrink_backward_op(
    grad_weights: Tensor,
    grad_probs: Tensor | None,
    grad_ua: Tensor,
    x: Tensor,
    router_weight: Tensor,
    A: Tensor,
    weights: Tensor,
    indices: Tensor,
    probs: Tensor,
    renormalized: bool,
    drop_p: float = 0.0,
    drop_seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    return _route_kernels.route_shrink_bwd(
        grad_weights, grad_probs, grad_ua, x, router_weight, A, weights, indices, probs, renormalized,
        _dropout(drop_p, drop_seed),
    )  # fmt: skip


@_route_shrink_backward_op.register_fake
def _(grad_weights, grad_probs, grad_ua, x, router_weight, A, weights, indices, probs, renormalized, *drop):
    return x.new_empty(x.shape), router_weight.new_empty(router_weight.shape), A.new_empty(A.shape)


FFN_REGIME_ENV = "MOELORA_FFN_REGIME"  # "dense" or "sorted" forces the fused FFN's kernels; unset or "auto": ffn_regime


# Below this token count the sorted regime lost to the dense-masked one on an H200 (bf16, H=4096, I=11008,
# E=8, k=2, r=16, fwd+bwd): 6.85 against 4.28 ms at T=1024, while it won 5.31 against 7.76 ms at T=2048 and
# 14.5 against 28.2 ms at T=8192 (bench/results/gpu-check-cuda-nvidia-h200-2026-12-04.md).
FFN_SORTED_MIN_T = 2048


def ffn_regime(T: int, E: int, k: int) -> str:
    """Which kernels run the fused FFN (forward and backward decide alike, from the shapes):
    - "sorted" (kernels/mixlora_ffn_sorted.py, _bwd.py): tokens sorted by their combination of experts, K = r
      per slot;
    - "dense" (kernels/mixlora_ffn.py, _bwd.py): every slot's expand masked over all E*r rank columns, no sort.
    By default sorted when E > 1, T >= FFN_SORTED_MIN_T (the measured crossover at E = 8, k = 2) and the sort's
    padding stays within T rows (regime_fits; at E = 64, k = 2: T >= 32175); dense otherwise. Only E = 8,
    k = 2 was timed: other E and k take the same threshold untested."""
    forced = os.environ.get(FFN_REGIME_ENV, "auto")
    if forced not in ("auto", "dense", "sorted"):
        raise ValueError(f"{FFN_REGIME_ENV} must be 'auto', 'dense' or 'sorted', got {forced!r}")
    if forced != "auto":
        return forced
    return "sorted" if E > 1 and T >= FFN_SORTED_MIN_T and _ffn_sorted_kernels.regime_fits(T, E, k) else "dense"


class _FfnCore(NamedTuple):
    """A regime's mixlora_ffn_core_fwd and _bwd (same arguments, same results in both regimes)."""

    fwd: Callable[..., Any]
    bwd: Callable[..., Any]


def _ffn_core(up: Tensor, weights: Tensor, gB: Tensor | None, uB: Tensor | None, dA: Tensor | None) -> _FfnCore:
    """The fused FFN's kernels for this call, by ffn_regime."""
    E = next(w.shape[0] for w in (gB, uB, dA) if w is not None)
    sorted_ = ffn_regime(up.shape[0], E, weights.shape[1]) == "sorted"
    return _FfnCore(
        _ffn_sorted_kernels.mixlora_ffn_sorted_core_fwd if sorted_ else _ffn_kernels.mixlora_ffn_core_fwd,
        _ffn_sorted_bwd_kernels.mixlora_ffn_sorted_core_bwd if sorted_ else _ffn_bwd_kernels.mixlora_ffn_core_bwd,
    )


@torch.library.custom_op("moelora_triton::mixlora_ffn", mutates_args=())
def _mixlora_ffn_op(
    ua: Tensor,
    gate: Tensor | None,
    up: Tensor,
    weights: Tensor,
    indices: Tensor,
    gB: Tensor | None,
    uB: Tensor | None,
    dA: Tensor | None,
    scaling: float,
    act: str,
    shared_a: bool,
    drop_p: float = 0.0,
    drop_seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """From ua (rank_shrink or route_shrink) -> hbar [T, I] (up's dtype) and zd [T, E*r] fp32 ([T, 0] without
    a down LoRA): the down LoRA's weighted rank-space rows, which down_expand turns into its delta. With
    drop_p > 0 the down LoRA reads each h_j through LoRA dropout (moelora.dropout, stream H_STREAM); hbar not."""
    core = _ffn_core(up, weights, gB, uB, dA)
    return core.fwd(ua, gate, up, weights, indices, gB, uB, dA, scaling, act, shared_a, _dropout(drop_p, drop_seed))


@_mixlora_ffn_op.register_fake
def _(ua, gate, up, weights, indices, gB, uB, dA, scaling, act, shared_a, drop_p=0.0, drop_seed=0):
    T, I = up.shape
    rank_columns = dA.shape[0] * dA.shape[1] if dA is not None else 0
    return up.new_empty(T, I), up.new_empty(T, rank_columns, dtype=torch.float32)


@torch.library.custom_op("moelora_triton::mixlora_ffn_backward", mutates_args=())
def _mixlora_ffn_backward_op(
    grad_hbar: Tensor,
    grad_zd: Tensor | None,
    ua: Tensor,
    gate: Tensor | None,
    up: Tensor,
    weights: Tensor,
    indices: Tensor,
    gB: Tensor | None,
    uB: Tensor | None,
    dA: Tensor | None,
    scaling: float,
    act: str,
    shared_a: bool,
    drop_p: float = 0.0,
    drop_seed: int = 0,
) -> list[Tensor]:
    """-> grads of (ua, gate, up, weights, gB, uB, dA); an absent input's is a 1-d empty tensor. grad_zd: from
    down_expand_backward, None without a down LoRA. (drop_p, drop_seed): the forward's."""
    grads = _ffn_core(up, weights, gB, uB, dA).bwd(
        grad_hbar, grad_zd, ua, gate, up, weights, indices, gB, uB, dA, scaling, act, shared_a,
        _dropout(drop_p, drop_seed),
    )  # fmt: skip
    return [_none(g, up) for g in grads]


@_mixlora_ffn_backward_op.register_fake
def _(grad_hbar, grad_zd, ua, gate, up, weights, indices, gB, uB, dA, scaling, act, shared_a, *drop):
    return [t.new_empty(t.shape) if t is not None else up.new_empty(0) for t in (ua, gate, up, weights, gB, uB, dA)]


@torch.library.custom_op("moelora_triton::down_expand", mutates_args=())
def _down_expand_op(zd: Tensor, dB: Tensor, base: Tensor | None, activation_dtype: torch.dtype) -> Tensor:
    """base + zd @ Bd_all [T, H] in base's dtype, rounded once (fp32 delta alone without base)."""
    return _shrink_expand_kernels.down_expand(zd, dB, base, activation_dtype)


@_down_expand_op.register_fake
def _(zd, dB, base, activation_dtype):
    return zd.new_empty(zd.shape[0], dB.shape[1], dtype=base.dtype if base is not None else torch.float32)


@torch.library.custom_op("moelora_triton::down_expand_backward", mutates_args=())
def _down_expand_backward_op(
    grad_y: Tensor, zd: Tensor, dB: Tensor, activation_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """-> (grad_zd [T, E*r] fp32, grad_dB like dB); base's gradient is grad_y itself."""
    return _shrink_expand_kernels.down_expand_bwd(grad_y, zd, dB, activation_dtype)


@_down_expand_backward_op.register_fake
def _(grad_y, zd, dB, activation_dtype):
    return zd.new_empty(zd.shape), dB.new_empty(dB.shape)


class Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, router_weight: Tensor, top_k: int, top_p: float):
        weights, indices, probs = _ops.route(x, router_weight, top_k, top_p)
        ctx.save_for_backward(x, router_weight, weights, indices, probs)
        ctx.renormalized = top_k > 0
        ctx.mark_non_differentiable(indices)
        return weights, indices, probs

    @staticmethod
    def backward(ctx, grad_weights, _grad_indices, grad_probs):
        x, router_weight, weights, indices, probs = ctx.saved_tensors
        grad_x, grad_router = _ops.route_backward(
            grad_weights.contiguous(), grad_probs, x, router_weight, weights, indices, probs, ctx.renormalized
        )
        return grad_x, grad_router, None, None


class MoeLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, indices, A, B, scaling):
        y, u, v = _ops.moe_lora(x, weights, indices, A, B, scaling)
        ctx.save_for_backward(x, weights, indices, A, B, u, v)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weights, indices, A, B, u, v = ctx.saved_tensors
        grad_x, grad_w, grad_A, grad_B = _ops.moe_lora_backward(grad_y, x, weights, indices, A, B, u, v, ctx.scaling)
        return grad_x, grad_w, None, grad_A, grad_B, None


class MoeLoraSorted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, indices, A, B, scaling):
        y, u, order, offsets = _ops.moe_lora_sorted(x, weights, indices, A, B, scaling)
        ctx.save_for_backward(x, weights, indices, A, B, u, order, offsets)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weights, indices, A, B, u, order, offsets = ctx.saved_tensors
        grads = _ops.moe_lora_sorted_backward(grad_y, x, weights, indices, A, B, u, order, offsets, ctx.scaling)
        grad_x, grad_w, grad_A, grad_B = grads
        return grad_x, grad_w, None, grad_A, grad_B, None


class RankShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, drop_p, drop_seed):
        ctx.save_for_backward(x, A)
        ctx.drop = (drop_p, drop_seed)
        return _ops.rank_shrink(x, A, drop_p, drop_seed)

    @staticmethod
    def backward(ctx, grad_ua):
        x, A = ctx.saved_tensors
        return *_ops.rank_shrink_backward(grad_ua, x, A, *ctx.drop), None, None


class RouteShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, router_weight, A, top_k, top_p, drop_p, drop_seed):
        weights, indices, probs, ua = _ops.route_shrink(x, router_weight, A, top_k, top_p, drop_p, drop_seed)
        ctx.save_for_backward(x, router_weight, A, weights, indices, probs)
        ctx.renormalized = top_k > 0
        ctx.drop = (drop_p, drop_seed)
        ctx.mark_non_differentiable(indices)
        return weights, indices, probs, ua

    @staticmethod
    def backward(ctx, grad_weights, _grad_indices, grad_probs, grad_ua):
        x, router_weight, A, weights, indices, probs = ctx.saved_tensors
        grad_x, grad_router, grad_A = _ops.route_shrink_backward(
            grad_weights.contiguous(),
            grad_probs,
            grad_ua,
            x,
            router_weight,
            A,
            weights,
            indices,
            probs,
            ctx.renormalized,
            *ctx.drop,
        )
        return grad_x, grad_router, grad_A, None, None, None, None


class MixLoraFfn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ua, gate, up, weights, indices, gB, uB, dA, scaling, act, shared_a, drop_p, drop_seed):
        args = (scaling, act, shared_a, drop_p, drop_seed)
        hbar, zd = _ops.mixlora_ffn(ua, gate, up, weights, indices, gB, uB, dA, *args)
        ctx.save_for_backward(ua, gate, up, weights, indices, gB, uB, dA)
        ctx.args = args
        return hbar, zd

    @staticmethod
    def backward(ctx, grad_hbar, grad_zd):
        ua, gate, up, weights, indices, gB, uB, dA = ctx.saved_tensors
        grads = _ops.mixlora_ffn_backward(
            grad_hbar, grad_zd if dA is not None else None, ua, gate, up, weights, indices, gB, uB, dA, *ctx.args
        )
        grad_ua, grad_gate, grad_up, grad_w, *lora_grads = (_or_none(g) for g in grads)
        return (grad_ua, grad_gate, grad_up, grad_w, None, *lora_grads, None, None, None, None, None)


class DownExpand(torch.autograd.Function):
    """y = base + zd @ Bd_all (ops down_expand / down_expand_backward)."""

    @staticmethod
    def forward(ctx, zd, dB, base, activation_dtype):
        ctx.save_for_backward(zd, dB)
        ctx.activation_dtype = activation_dtype
        ctx.has_base = base is not None
        return _ops.down_expand(zd, dB, base, activation_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        zd, dB = ctx.saved_tensors
        grad_zd, grad_dB = _ops.down_expand_backward(grad_y, zd, dB, ctx.activation_dtype)
        return grad_zd, grad_dB, grad_y if ctx.has_base else None, None


# --- MiLoRA: prompt_route and segmented_lora -----------------------------------------------------------------


@torch.library.custom_op("moelora_triton::prompt_route", mutates_args=())
def _prompt_route_op(
    hidden: Tensor,
    mask: Tensor | None,
    router_weight: Tensor,
    numerator: Tensor | None,
    denominator: Tensor | None,
    pool_weight: Tensor | None,
    top_k: int,
    pooling: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> gates, indices, probs, and the backward's pooled [B, H], scores [B, S], lse [B] (attention only)."""
    return _prompt_route_kernels.prompt_route_fwd(
        hidden, mask, router_weight, numerator, denominator, pool_weight, top_k, pooling
    )


@_prompt_route_op.register_fake
def _(hidden, mask, router_weight, numerator, denominator, pool_weight, top_k, pooling):
    B, S, H = hidden.shape
    M = router_weight.shape[0]
    f32 = dict(dtype=torch.float32)
    attention = pooling == "attention"
    return (
        hidden.new_empty(B, M, **f32),
        hidden.new_empty(B, top_k, dtype=torch.int64),
        hidden.new_empty(B, M, **f32),
        hidden.new_empty(B, H, **f32),
        hidden.new_empty(B, S, **f32) if attention else hidden.new_empty(0, **f32),
        hidden.new_empty(B, **f32) if attention else hidden.new_empty(0, **f32),
    )


@torch.library.custom_op("moelora_triton::prompt_route_backward", mutates_args=())
def _prompt_route_backward_op(
    grad_gates: Tensor | None,
    grad_probs: Tensor | None,
    hidden: Tensor,
    mask: Tensor | None,
    router_weight: Tensor,
    numerator: Tensor | None,
    denominator: Tensor | None,
    pool_weight: Tensor | None,
    indices: Tensor,
    probs: Tensor,
    pooled: Tensor,
    scores: Tensor,
    lse: Tensor,
    pooling: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    d_hidden, d_router, d_num, d_den, d_pool = _prompt_route_bwd_kernels.prompt_route_bwd(
        grad_gates, grad_probs, hidden, mask, router_weight, numerator, denominator, pool_weight,
        indices, probs, pooled, scores, lse, pooling,
    )  # fmt: skip
    # The coefficient gradients come back as slices of one partial-sum buffer; a custom op must return
    # fresh tensors (storage offset 0), and they are a dozen numbers.
    d_num, d_den = (None if t is None else t.clone() for t in (d_num, d_den))
    return d_hidden, d_router, _none(d_num, hidden), _none(d_den, hidden), _none(d_pool, hidden)


@_prompt_route_backward_op.register_fake
def _(grad_gates, grad_probs, hidden, mask, router_weight, numerator, denominator, pool_weight, *rest):
    def like(t: Tensor | None) -> Tensor:
        return hidden.new_empty(0) if t is None else torch.empty_like(t)

    return (
        torch.empty_like(hidden),
        torch.empty_like(router_weight),
        like(numerator),
        like(denominator),
        like(pool_weight),
    )


class PromptRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, router_weight, numerator, denominator, pool_weight, top_k, pooling):
        gates, indices, probs, pooled, scores, lse = _ops.prompt_route(
            hidden, mask, router_weight, numerator, denominator, pool_weight, top_k, pooling
        )
        ctx.save_for_backward(
            hidden, mask, router_weight, numerator, denominator, pool_weight, indices, probs, pooled, scores, lse
        )
        ctx.pooling = pooling
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return gates, indices, probs

    @staticmethod
    def backward(ctx, grad_gates, _grad_indices, grad_probs):
        d_hidden, d_router, d_num, d_den, d_pool = _ops.prompt_route_backward(
            grad_gates, grad_probs, *ctx.saved_tensors, ctx.pooling
        )
        return d_hidden, None, d_router, _or_none(d_num), _or_none(d_den), _or_none(d_pool), None, None


@torch.library.custom_op("moelora_triton::segmented_lora", mutates_args=())
def _segmented_lora_op(
    x: Tensor, token_seq: Tensor, seq_lora: Tensor, seq_gate: Tensor, A: Tensor, B: Tensor, scaling: Tensor
) -> tuple[Tensor, Tensor]:
    """-> y [T, out] in x's dtype, and the backward's u [T, r] fp32."""
    return _segmented_kernels.segmented_lora_fwd(x, token_seq, seq_lora, seq_gate, A, B, scaling)


@_segmented_lora_op.register_fake
def _(x, token_seq, seq_lora, seq_gate, A, B, scaling):
    return x.new_empty(x.shape[0], B.shape[1]), x.new_empty(x.shape[0], A.shape[1], dtype=torch.float32)


@torch.library.custom_op("moelora_triton::segmented_lora_backward", mutates_args=())
def _segmented_lora_backward_op(
    dy: Tensor,
    x: Tensor,
    token_seq: Tensor,
    seq_lora: Tensor,
    seq_gate: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: Tensor,
    u: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _segmented_kernels.segmented_lora_bwd(dy.contiguous(), x, token_seq, seq_lora, seq_gate, A, B, scaling, u)


@_segmented_lora_backward_op.register_fake
def _(dy, x, token_seq, seq_lora, seq_gate, A, B, scaling, u):
    f32 = dict(dtype=torch.float32)
    return (
        torch.empty_like(x),
        seq_gate.new_empty(seq_gate.shape, **f32),
        torch.empty_like(A),
        torch.empty_like(B),
        scaling.new_empty(scaling.shape, **f32),
    )


class SegmentedLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_seq, seq_lora, seq_gate, A, B, scaling):
        y, u = _ops.segmented_lora(x, token_seq, seq_lora, seq_gate, A, B, scaling)
        ctx.save_for_backward(x, token_seq, seq_lora, seq_gate, A, B, scaling, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, token_seq, seq_lora, seq_gate, A, B, scaling, u = ctx.saved_tensors
        grad_x, grad_gate, grad_A, grad_B, grad_scaling = _ops.segmented_lora_backward(
            dy, x, token_seq, seq_lora, seq_gate, A, B, scaling, u
        )
        return grad_x, None, None, grad_gate.to(seq_gate.dtype), grad_A, grad_B, grad_scaling.to(scaling.dtype)
