"""`route` in Triton: router logits, softmax, then top-k (renormalised) or top-p (not renormalised).

The math of `moelora.reference.route`, fused per block of tokens: one read of x and the router weight
gives the logits in registers (never written), then softmax, selection and the outputs. The backward
turns the upstream gradients of weights and probs into grad_logits [T, E] in a kernel; grad_x and
grad_router are then two GEMMs, left to torch. CUDA tensors; CPU tensors under TRITON_INTERPRET=1.

`route_shrink` is the dense-masked regime's first step (design.md, op 2): the same routing plus every
expert's LoRA shrink ua = x @ A_all^T (MixLoRA's gate and up A stacked, up to ROUTE_SHRINK_MAX_N = 256
rank columns) from ONE read of x, each tile of x feeding both dots. mixlora_ffn's fused FFN then starts
from ua. Its backward is route_bwd plus the shrink's (moe_lora's expand and wgrad kernels). With LoRA dropout
the shrink reads each tile of x through its seeded mask (kernels/philox.py) and the router the tile itself. Large E*r
takes the sorted path instead (kernels/moe_lora_sorted.py: sort_by_expert, no host sync).

Launchers only (route_fwd / route_bwd, route_shrink_fwd / route_shrink_bwd; shapes in their docstrings) and
check_inputs: the ops, their autograd and fake kernels are in moelora.triton_ops, the dispatch (route, and
routed_mixlora_ffn for route_shrink) in moelora.triton_backend.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from moelora.kernels import philox
from moelora.kernels._common import _dot_mode, dot_operand
from moelora.kernels.mixlora_ffn_shrink_expand import shrink_x_bwd
from moelora.kernels.moe_lora import autotune_list, fp32_dot_precision, t_bucket
from torch import Tensor

from moelora.dropout import LoraDropout
from moelora.reference import compute_dtype

# One pinned config: routing is memory-bound (E is small), and a multi-config autotune crashes the
# interpreter. BT >= 16 and BH >= 16 because tl.dot needs 16 on the GPU.
BLOCK_T = 32
BLOCK_H = 64
NUM_WARPS = 4
# route_shrink keeps all rank columns of one token block in registers ([32, 256] fp32 = 64 per thread at 4
# warps), so that x is read once: MixLoRA's gate + up at E=8, r=16 is exactly 256.
ROUTE_SHRINK_MAX_N = 256


def _route_shrink_configs() -> list[triton.Config]:
    """Tiles of route_shrink. At N = 256 rank columns the GEMM x @ [Wr | A_all]^T sits near the H100's ridge
    (2 * 256 flop per 2-byte element of x), so the tile decides whether it stays bandwidth-bound: larger BT
    re-reads A_all (N * H, from L2) fewer times per byte of x. Registers (`python -m bench.compile_check`,
    sm_90, bf16, N = 256): BT=32/BH=64 at 4 warps spills 248 B per thread, BT=32 or 64 with BH=32 at 8 warps
    spill nothing (138 / 176 registers); those two lead the list, and BT=64/BH=32/8 warps is the pinned
    GPU config (MOELORA_TRITON_PIN_CONFIG=1). Under the interpreter (a multi-config autotune crashes it):
    one small config. Timed once (H200, T=8192, bf16, before the router's dot moved to tf32x3): x read at
    177 GB/s, 0.05 of a copy's bandwidth."""
    interpreted = triton.Config({"BT": BLOCK_T, "BH": BLOCK_H}, num_warps=NUM_WARPS)
    return autotune_list(route_shrink_gpu_configs(), interpreted)


ROUTE_SHRINK_TILES = [(64, 32, 8, 3), (32, 32, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3)]


def route_shrink_gpu_configs() -> list[triton.Config]:
    """route_shrink's GPU tiles (BT, BH, warps, stages), the pinned one first (see _route_shrink_configs)."""
    return [triton.Config({"BT": bt, "BH": bh}, num_warps=w, num_stages=st) for bt, bh, w, st in ROUTE_SHRINK_TILES]


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _select(
    b_l,  # [BT, BE] router logits in DT; padding columns (>= E) are masked here
    o_t64,  # [BT] int64 token ids
    m_t,  # [BT] valid tokens
    weights_ptr,
    indices_ptr,
    probs_ptr,
    top_p,
    E,
    K: tl.constexpr,
    TOP_P: tl.constexpr,
    DT: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
):
    """Softmax, top-k (renormalised) or top-p, and the stores of probs, weights and indices."""
    o_e = tl.arange(0, BE)  # [BE]
    m_e = o_e < E
    o_k = tl.arange(0, BK)  # [BK]
    m_k = o_k < K
    b_l = tl.where(m_e[None, :], b_l, float("-inf"))
    b_p = tl.exp(b_l - tl.max(b_l, axis=1)[:, None])
    b_p = tl.where(m_e[None, :], b_p, 0.0)
    b_p = b_p / tl.sum(b_p, axis=1)[:, None]  # [BT, BE]
    p_p = probs_ptr + o_t64[:, None] * E + o_e[None, :]
    tl.store(p_p, b_p.to(probs_ptr.dtype.element_ty), mask=m_t[:, None] & m_e[None, :])

    # K rounds of argmax, ties to the lower index: slot j holds the j-th largest probability.
    # probs are >= 0: -1 marks padding and taken experts; a NaN prob ranks first (as torch.topk) as 2.0, and
    # its weight is taken from b_p, so that NaN propagates and every index stays in [0, E).
    b_cur = tl.where(m_e[None, :], tl.where(b_p != b_p, 2.0, b_p), -1.0)
    b_w = tl.zeros([BT, BK], dtype=DT)
    b_i = tl.full([BT, BK], -1, dtype=tl.int64)
    for j in range(0, K):
        b_max = tl.max(b_cur, axis=1)  # [BT]
        b_arg = tl.min(tl.where(b_cur == b_max[:, None], o_e[None, :], BE), axis=1)  # [BT]
        b_val = tl.sum(tl.where(o_e[None, :] == b_arg[:, None], b_p, 0.0), axis=1)  # [BT]: b_p at b_arg
        b_w = tl.where(o_k[None, :] == j, b_val[:, None], b_w)
        b_i = tl.where(o_k[None, :] == j, b_arg.to(tl.int64)[:, None], b_i)
        b_cur = tl.where(o_e[None, :] == b_arg[:, None], -1.0, b_cur)

    if TOP_P:
        # MoE-PEFT: keep a slot while the mass before it is <= top_p; the first slot always; not renormalised.
        b_before = tl.cumsum(b_w, axis=1) - b_w
        b_keep = (b_before <= top_p) | (top_p >= 1.0) | (o_k[None, :] == 0)
        b_w = tl.where(b_keep, b_w, 0.0)
        b_i = tl.where(b_keep, b_i, -1)
    else:
        b_w = b_w / tl.sum(b_w, axis=1)[:, None]

    m_tk = m_t[:, None] & m_k[None, :]
    tl.store(weights_ptr + o_t64[:, None] * K + o_k[None, :], b_w.to(weights_ptr.dtype.element_ty), mask=m_tk)
    tl.store(indices_ptr + o_t64[:, None] * K + o_k[None, :], b_i, mask=m_tk)


@triton.jit
def route_fwd_kernel(
    x_ptr,  # [T, H] any float dtype
    wr_ptr,  # [E, H] any float dtype
    weights_ptr,  # [T, K] compute dtype, contiguous
    indices_ptr,  # [T, K] int64, contiguous
    probs_ptr,  # [T, E] compute dtype, contiguous
    top_p,  # fp32 scalar, used only when TOP_P
    T,
    H,
    E,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wh,
    K: tl.constexpr,
    TOP_P: tl.constexpr,
    DT: tl.constexpr,
    ROUTER_PREC: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
):
    i_t = tl.program_id(0)
    o_t = i_t * BT + tl.arange(0, BT)  # [BT]
    m_t = o_t < T
    o_t64 = o_t.to(tl.int64)
    o_e = tl.arange(0, BE)  # [BE]
    m_e = o_e < E

    b_l = tl.zeros([BT, BE], dtype=DT)
    KCH: tl.constexpr = (
        1 if ROUTER_PREC == "ieee" else 1 << 30
    )  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    n_h = tl.cdiv(H, BH)
    for i_k in range(0, n_h if KCH == 1 else 1):
        b_part = tl.zeros([BT, BE], dtype=DT) if KCH == 1 else b_l
        for i_h in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_h)):
            o_h = i_h * BH + tl.arange(0, BH)  # [BH]
            m_h = o_h < H
            p_x = x_ptr + o_t64[:, None] * stride_xt + o_h[None, :] * stride_xh
            b_x = tl.load(p_x, mask=m_t[:, None] & m_h[None, :], other=0.0).to(DT)  # [BT, BH]
            p_w = wr_ptr + o_e.to(tl.int64)[:, None] * stride_we + o_h[None, :] * stride_wh
            b_w = tl.load(p_w, mask=m_e[:, None] & m_h[None, :], other=0.0).to(DT)  # [BE, BH]
            b_part = tl.dot(b_x, tl.trans(b_w), acc=b_part, input_precision=ROUTER_PREC)  # [BT, BE]
        b_l = b_l + b_part if KCH == 1 else b_part

    _select(b_l, o_t64, m_t, weights_ptr, indices_ptr, probs_ptr, top_p, E, K, TOP_P, DT, BT, BE, BK)


@triton.autotune(configs=_route_shrink_configs(), key=["T_BUCKET", "H", "N", "E", "K", "DOT_DT", "DROPOUT"])
@triton.jit
def route_shrink_fwd_kernel(
    x_ptr,  # [T, H] fp16 / bf16 / fp32
    wr_ptr,  # [E, H] router weight, any float dtype
    a_ptr,  # [E', R, H] through strides (expert, rank, column): every expert's LoRA A, gate and up stacked
    weights_ptr,  # [T, K] fp32, contiguous
    indices_ptr,  # [T, K] int64, contiguous
    probs_ptr,  # [T, E] fp32, contiguous
    ua_ptr,  # [T, N] fp32, contiguous, N = E' * R: x @ A_all^T, ungated
    top_p,
    T,
    H,
    E,
    N,
    R,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wh,
    stride_ae,
    stride_ar,
    stride_ah,
    T_BUCKET,
    seed,  # LoRA dropout of x (kernels/philox.py, stream X_STREAM), read only when DROPOUT
    drop_threshold,
    drop_scale,
    K: tl.constexpr,
    TOP_P: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    ROUTER_PREC: tl.constexpr,
    BT: tl.constexpr,
    BH: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # x @ [Wr | A_all]^T: each tile of x is loaded once and feeds both dots. The router's dot has fp32 operands
    # (the reference routes in fp32): tf32x3 tensor-core passes for 16-bit x, which tf32 holds exactly, so only
    # the router weight's lo half rounds (ieee, on the FMA units, read x at 0.05 of an H200's copy bandwidth
    # in this kernel and 0.06 in route_fwd_kernel); the shrink's dot takes 16-bit operands for 16-bit x.
    # With DROPOUT the shrink reads the tile through x's dropout mask (1 / (1 - p) applied to ua at the end)
    # and the router the tile itself: still one read of x.
    i_t = tl.program_id(0)
    o_t = i_t * BT + tl.arange(0, BT)  # [BT]
    m_t = o_t < T
    o_t64 = o_t.to(tl.int64)
    o_e = tl.arange(0, BE)  # [BE]
    m_e = o_e < E
    o_n = tl.arange(0, BN)  # [BN] all rank columns: N <= BN
    m_n = o_n < N
    p_a = a_ptr + (o_n // R).to(tl.int64) * stride_ae + (o_n % R).to(tl.int64) * stride_ar  # [BN]

    b_l = tl.zeros([BT, BE], dtype=tl.float32)
    b_u = tl.zeros([BT, BN], dtype=tl.float32)
    KCH: tl.constexpr = (
        1 if ROUTER_PREC == "ieee" else 1 << 30
    )  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    n_h = tl.cdiv(H, BH)
    for i_k in range(0, n_h if KCH == 1 else 1):
        b_part_l = tl.zeros([BT, BE], dtype=tl.float32) if KCH == 1 else b_l
        b_part_u = tl.zeros([BT, BN], dtype=tl.float32) if KCH == 1 else b_u
        for i_h in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_h)):
            o_h = (i_h * BH + tl.arange(0, BH)).to(tl.int64)  # [BH]
            m_h = o_h < H
            b_x = tl.load(
                x_ptr + o_t64[:, None] * stride_xt + o_h[None, :] * stride_xh,
                mask=m_t[:, None] & m_h[None, :],
                other=0.0,
            )  # [BT, BH]
            p_w = wr_ptr + o_e.to(tl.int64)[:, None] * stride_we + o_h[None, :] * stride_wh
            b_w = tl.load(p_w, mask=m_e[:, None] & m_h[None, :], other=0.0).to(tl.float32)  # [BE, BH]
            b_part_l = tl.dot(b_x.to(tl.float32), tl.trans(b_w), acc=b_part_l, input_precision=ROUTER_PREC)
            b_a = tl.load(
                p_a[None, :] + o_h[:, None] * stride_ah, mask=m_h[:, None] & m_n[None, :], other=0.0
            )  # [BH, BN]
            if DROPOUT:
                b_keep = philox._keep(seed, philox.X_STREAM, o_t64[:, None] * H + o_h[None, :], drop_threshold)
                b_x = tl.where(b_keep, b_x, 0.0)
            b_part_u = tl.dot(b_x.to(DOT_DT), b_a.to(DOT_DT), acc=b_part_u, input_precision=PREC)  # [BT, BN]
        b_l = b_l + b_part_l if KCH == 1 else b_part_l
        b_u = b_u + b_part_u if KCH == 1 else b_part_u
    if DROPOUT:
        b_u = b_u * drop_scale

    tl.store(ua_ptr + o_t64[:, None] * N + o_n[None, :], b_u, mask=m_t[:, None] & m_n[None, :])
    _select(b_l, o_t64, m_t, weights_ptr, indices_ptr, probs_ptr, top_p, E, K, TOP_P, tl.float32, BT, BE, BK)


@triton.jit
def route_bwd_kernel_logits(
    dw_ptr,  # [T, K] contiguous: upstream gradient of weights
    dp_ptr,  # [T, E] contiguous: upstream gradient of probs, read only when HAS_DP
    weights_ptr,  # [T, K] contiguous
    indices_ptr,  # [T, K] int64 contiguous, -1 = unused slot
    probs_ptr,  # [T, E] contiguous
    dl_ptr,  # [T, E] contiguous, compute dtype: gradient of the router logits
    T,
    E,
    K: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_DP: tl.constexpr,
    DT: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BK: tl.constexpr,
):
    i_t = tl.program_id(0)
    o_t = i_t * BT + tl.arange(0, BT)  # [BT]
    m_t = o_t < T
    o_t64 = o_t.to(tl.int64)
    o_e = tl.arange(0, BE)  # [BE]
    m_te = m_t[:, None] & (o_e < E)[None, :]
    o_k = tl.arange(0, BK)  # [BK]
    m_tk = m_t[:, None] & (o_k < K)[None, :]

    b_p = tl.load(probs_ptr + o_t64[:, None] * E + o_e[None, :], mask=m_te, other=0.0).to(DT)  # [BT, BE]
    if HAS_DP:
        b_dp = tl.load(dp_ptr + o_t64[:, None] * E + o_e[None, :], mask=m_te, other=0.0).to(DT)
    else:
        b_dp = tl.zeros([BT, BE], dtype=DT)
    b_dw = tl.load(dw_ptr + o_t64[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(DT)  # [BT, BK]

    # Scatter the slot gradients onto their experts; an unused slot (-1) matches no expert.
    b_sel = tl.zeros([BT, BE], dtype=DT)  # 1 where the expert was selected
    b_dsel = tl.zeros([BT, BE], dtype=DT)  # dw of the slot that selected the expert
    for j in range(0, K):
        b_dwj = tl.sum(tl.where(o_k[None, :] == j, b_dw, 0.0), axis=1)  # [BT]
        b_ij = tl.load(indices_ptr + o_t64 * K + j, mask=m_t, other=-1)  # [BT]
        b_hit = o_e[None, :] == b_ij[:, None]  # [BT, BE]
        b_sel = tl.where(b_hit, 1.0, b_sel)
        b_dsel = tl.where(b_hit, b_dwj[:, None], b_dsel)

    if RENORM:
        # w_j = p_{e_j} / S, S = sum of selected probs: dp_{e_j} += (dw_j - sum_i dw_i w_i) / S.
        b_w = tl.load(weights_ptr + o_t64[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(DT)
        b_c = tl.sum(b_dw * b_w, axis=1)  # [BT]
        b_s = tl.sum(b_p * b_sel, axis=1)  # [BT]
        b_s = tl.where(m_t, b_s, 1.0)
        b_dp += b_sel * (b_dsel - b_c[:, None]) / b_s[:, None]
    else:
        b_dp += b_dsel

    b_dl = b_p * (b_dp - tl.sum(b_p * b_dp, axis=1)[:, None])  # softmax backward
    tl.store(dl_ptr + o_t64[:, None] * E + o_e[None, :], b_dl.to(dl_ptr.dtype.element_ty), mask=m_te)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def route_fwd(x: Tensor, router_weight: Tensor, k: int, top_p: float | None) -> tuple[Tensor, Tensor, Tensor]:
    T, H = x.shape
    E = router_weight.shape[0]
    dt = compute_dtype(x)
    weights = torch.empty(T, k, dtype=dt, device=x.device)
    indices = torch.empty(T, k, dtype=torch.int64, device=x.device)
    probs = torch.empty(T, E, dtype=dt, device=x.device)
    if T == 0:
        return weights, indices, probs
    route_fwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        x_ptr=x,
        wr_ptr=router_weight,
        weights_ptr=weights,
        indices_ptr=indices,
        probs_ptr=probs,
        top_p=float(top_p or 0.0),
        T=T,
        H=H,
        E=E,
        stride_xt=x.stride(0),
        stride_xh=x.stride(1),
        stride_we=router_weight.stride(0),
        stride_wh=router_weight.stride(1),
        K=k,
        TOP_P=top_p is not None,
        DT=_TL_DTYPES[dt],
        ROUTER_PREC=fp32_dot_precision(x.dtype),
        BT=BLOCK_T,
        BH=BLOCK_H,
        BE=_pad(E),
        BK=triton.next_power_of_2(k),
        num_warps=NUM_WARPS,
    )
    return weights, indices, probs


def _logits_grad(
    grad_weights: Tensor,
    grad_probs: Tensor | None,
    weights: Tensor,
    indices: Tensor,
    probs: Tensor,
    renormalized: bool,
) -> Tensor:
    """The gradient of the router logits [T, E] in probs' dtype (the compute dtype)."""
    T, k = weights.shape
    E = probs.shape[1]
    dt = probs.dtype
    grad_weights = grad_weights.contiguous()
    grad_probs = grad_probs.contiguous() if grad_probs is not None else None
    grad_logits = torch.empty(T, E, dtype=dt, device=probs.device)
    if T > 0:  # a grid of 0 programs is not launchable; the empty [0, E] gives zero gradients below
        route_bwd_kernel_logits[(triton.cdiv(T, BLOCK_T),)](
            dw_ptr=grad_weights,
            dp_ptr=grad_probs if grad_probs is not None else probs,
            weights_ptr=weights,
            indices_ptr=indices,
            probs_ptr=probs,
            dl_ptr=grad_logits,
            T=T,
            E=E,
            K=k,
            RENORM=renormalized,
            HAS_DP=grad_probs is not None,
            DT=_TL_DTYPES[dt],
            BT=BLOCK_T,
            BE=_pad(E),
            BK=triton.next_power_of_2(k),
            num_warps=NUM_WARPS,
        )
    return grad_logits


def route_bwd(
    grad_weights: Tensor,
    grad_probs: Tensor | None,
    x: Tensor,
    router_weight: Tensor,
    weights: Tensor,
    indices: Tensor,
    probs: Tensor,
    renormalized: bool,
) -> tuple[Tensor, Tensor]:
    grad_logits = _logits_grad(grad_weights, grad_probs, weights, indices, probs, renormalized)
    dt = grad_logits.dtype
    grad_x = (grad_logits @ router_weight.to(dt)).to(x.dtype)  # [T, H]
    grad_router = (grad_logits.t() @ x.to(dt)).to(router_weight.dtype)  # [E, H]
    return grad_x, grad_router


def route_shrink_fwd(
    x: Tensor, router_weight: Tensor, A: Tensor, k: int, top_p: float | None, dropout: LoraDropout | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """route_fwd and ua = x @ A_all^T [T, E'*R] fp32 (A [E', R, H]) from one read of x; E'*R <= ROUTE_SHRINK_MAX_N.
    dropout: ua = drop(x) @ A_all^T with x's seeded mask (moelora.dropout, stream X_STREAM); the router reads x."""
    T, H = x.shape
    E = router_weight.shape[0]
    N = A.shape[0] * A.shape[1]
    if N > ROUTE_SHRINK_MAX_N:
        raise ValueError(f"route_shrink: A has {N} rank columns, more than the fused kernel's {ROUTE_SHRINK_MAX_N}")
    f32 = dict(dtype=torch.float32, device=x.device)
    weights, probs = torch.empty(T, k, **f32), torch.empty(T, E, **f32)
    indices = torch.empty(T, k, dtype=torch.int64, device=x.device)
    ua = torch.empty(T, N, **f32)
    if T == 0:
        return weights, indices, probs, ua
    prec, dot_dt = _dot_mode(x.dtype)
    A = dot_operand(A, dot_dt, T)  # the router weight stays fp32: its dot is tf32x3 / ieee
    route_shrink_fwd_kernel[lambda META: (triton.cdiv(T, META["BT"]),)](
        x_ptr=x,
        wr_ptr=router_weight,
        a_ptr=A,
        weights_ptr=weights,
        indices_ptr=indices,
        probs_ptr=probs,
        ua_ptr=ua,
        top_p=float(top_p or 0.0),
        T=T,
        H=H,
        E=E,
        N=N,
        R=A.shape[1],
        stride_xt=x.stride(0),
        stride_xh=x.stride(1),
        stride_we=router_weight.stride(0),
        stride_wh=router_weight.stride(1),
        stride_ae=A.stride(0),
        stride_ar=A.stride(1),
        stride_ah=A.stride(2),
        T_BUCKET=t_bucket(T),
        K=k,
        TOP_P=top_p is not None,
        PREC=prec,
        ROUTER_PREC=fp32_dot_precision(x.dtype),
        DOT_DT=dot_dt,
        BE=_pad(E),
        BK=triton.next_power_of_2(k),
        BN=_pad(N),
        **philox.kernel_args(dropout),
    )
    return weights, indices, probs, ua


def route_shrink_bwd(
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
    dropout: LoraDropout | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> grad_x [T, H] (x's dtype), grad_router [E, H], grad_A [E', R, H] (contiguous, A's dtype); with the
    forward's dropout, the LoRA part of grad_x goes through x's mask and grad_A = grad_ua^T @ drop(x).

    grad_x = grad_logits @ Wr + grad_ua @ A_all: the router's part in the compute dtype, added to the LoRA's in
    the epilogue of its expand before the one rounding to x's dtype (shrink_x_bwd: moe_lora's expand and wgrad
    kernels, which give grad_A = grad_ua^T @ x too). No atomics.
    """
    grad_logits = _logits_grad(grad_weights, grad_probs, weights, indices, probs, renormalized)
    dt = grad_logits.dtype
    grad_router = (grad_logits.t() @ x.to(dt)).to(router_weight.dtype)  # [E, H]
    grad_x, grad_A = shrink_x_bwd(grad_ua, x, A, grad_x_base=grad_logits @ router_weight.to(dt), dropout=dropout)
    return grad_x, grad_router, grad_A


def check_inputs(x: Tensor, router_weight: Tensor, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError / TypeError for arguments the route kernels cannot run; the device last, after the arguments."""
    if (top_k is None) == (top_p is None):
        raise ValueError("route: pass exactly one of top_k and top_p")
    if x.dim() != 2:
        raise ValueError(f"route: x must be 2-D [T, H], got shape {tuple(x.shape)}")
    if router_weight.dim() != 2:
        raise ValueError(f"route: router_weight must be 2-D [E, H], got shape {tuple(router_weight.shape)}")
    if x.shape[1] != router_weight.shape[1]:
        raise ValueError(f"route: x has H={x.shape[1]} but router_weight has H={router_weight.shape[1]}")
    for name, t in (("x", x), ("router_weight", router_weight)):
        if not t.is_floating_point():
            raise TypeError(f"route: {name} must be a floating-point tensor, got {t.dtype}")
    if x.device != router_weight.device:
        raise ValueError(f"route: x is on {x.device} but router_weight is on {router_weight.device}")
    E = router_weight.shape[0]
    if E < 1:
        raise ValueError("route: router_weight has no experts (E = 0)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E):
        raise ValueError(f"route: top_k must be an int in 1..{E} (E experts), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"route: top_p must be in (0, 1], got {top_p!r}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"route: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
