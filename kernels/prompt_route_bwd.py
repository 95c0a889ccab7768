"""`prompt_route` in Triton, the backward (kernels/prompt_route.py has the forward, the math and the design).

Two steps, no atomics: the head's (`prompt_route_bwd_kernel_head`: grid over H blocks, a loop over the B
sequences inside, so d router_weight sums in registers; d numerator / d denominator leave one partial row per
H block, summed by torch), then the pool's (`prompt_route_bwd_kernel_pool`; attention pooling first runs
`prompt_route_bwd_kernel_scores` for ds[b, t], then d hidden and one d pool_weight row per sequence, summed
by torch). The launcher prompt_route_bwd gives the shapes; the tiles and JIT helpers are the forward's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moelora.kernels.prompt_route import (
    BLOCK_H,
    BLOCK_S,
    NUM_WARPS,
    POOL_CODES,
    _activation_args,
    _coefficients,
    _grid_h,
    _keep,
    _mask_arg,
    _powers,
)
from torch import Tensor


@triton.jit
def prompt_route_bwd_kernel_head(
    dgates_ptr,  # [B, M] contiguous; read only when HAS_DG
    dprobs_ptr,  # [B, M] contiguous; read only when HAS_DP
    probs_ptr,  # [B, M] fp32 contiguous
    indices_ptr,  # [B, K] int64 contiguous
    pooled_ptr,  # [B, H] fp32 contiguous
    wr_ptr,  # [M, H] router_weight, strided
    num_ptr,  # [NUM] contiguous
    den_ptr,  # [DEN] contiguous
    dpooled_ptr,  # [B, H] fp32 contiguous
    dwr_ptr,  # [M, H] contiguous, router_weight's dtype
    dnum_ptr,  # [n_hblocks, BJ] fp32: this H block's share of d numerator
    dden_ptr,  # [n_hblocks, BJ] fp32: this H block's share of d denominator, b_j at index j
    NB,
    H,
    M,
    stride_wm,
    stride_wh,
    K: tl.constexpr,
    NUM: tl.constexpr,
    DEN: tl.constexpr,
    RATIONAL: tl.constexpr,
    HAS_DG: tl.constexpr,
    HAS_DP: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BJ: tl.constexpr,
):
    i_h = tl.program_id(0)
    o_h = (i_h * BH + tl.arange(0, BH)).to(tl.int64)  # [BH]
    m_h = o_h < H
    o_m = tl.arange(0, BM)  # [BM]
    m_m = o_m < M
    o_j = tl.arange(0, BJ)  # [BJ] coefficient index
    m_mh = m_m[:, None] & m_h[None, :]
    b_w = tl.load(wr_ptr + o_m[:, None] * stride_wm + o_h[None, :] * stride_wh, mask=m_mh, other=0.0).to(tl.float32)

    b_a, b_b = _coefficients(num_ptr, den_ptr, NUM, DEN, BJ)
    b_da = tl.load(num_ptr + o_j + 1, mask=o_j + 1 < NUM, other=0.0).to(tl.float32) * (o_j + 1)  # P' coefficients
    b_db = tl.abs(tl.load(den_ptr + o_j, mask=o_j < DEN, other=0.0).to(tl.float32)) * (o_j + 1)  # dQ/d|x| coeffs

    b_dw = tl.zeros([BM, BH], dtype=tl.float32)
    b_dnum = tl.zeros([BJ], dtype=tl.float32)
    b_dden = tl.zeros([BJ], dtype=tl.float32)  # sum of dg * dg/d|b_j|; the sign of b_j comes after the loop
    for i_b in range(0, NB):
        i_b64 = tl.cast(i_b, tl.int64)
        # d logits: gates = p * selected, so dp = dprobs + selected * dgates; then the softmax backward.
        b_p = tl.load(probs_ptr + i_b64 * M + o_m, mask=m_m, other=0.0)  # [BM]
        b_dp = tl.zeros([BM], dtype=tl.float32)
        if HAS_DP:
            b_dp += tl.load(dprobs_ptr + i_b64 * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        if HAS_DG:
            b_sel = tl.zeros([BM], dtype=tl.float32)
            for j in tl.static_range(K):
                b_sel = tl.where(o_m == tl.load(indices_ptr + i_b64 * K + j), 1.0, b_sel)
            b_dp += b_sel * tl.load(dgates_ptr + i_b64 * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_dl = b_p * (b_dp - tl.sum(b_p * b_dp, axis=0))  # [BM]

        b_x = tl.load(pooled_ptr + i_b64 * H + o_h, mask=m_h, other=0.0)  # [BH]
        if RATIONAL:
            b_px = _powers(b_x, BJ)  # [BH, BJ] x^j
            b_pa = _powers(tl.abs(b_x), BJ)  # [BH, BJ] |x|^j
            b_q = 1.0 + tl.sum(b_pa * b_b[None, :], axis=1)
            b_g = tl.sum(b_px * b_a[None, :], axis=1) / b_q
            b_sign = tl.where(b_x > 0, 1.0, tl.where(b_x < 0, -1.0, 0.0))  # torch's abs'(0) = 0
            b_gprime = (
                tl.sum(b_px * b_da[None, :], axis=1) - b_g * tl.sum(b_pa * b_db[None, :], axis=1) * b_sign
            ) / b_q
        else:  # exact GELU: g' = Phi(x) + x phi(x)
            b_cdf = 0.5 * (1.0 + tl.erf(b_x * 0.7071067811865476))
            b_g = b_x * b_cdf
            b_gprime = b_cdf + b_x * 0.3989422804014327 * tl.exp(-0.5 * b_x * b_x)

        b_dw += b_dl[:, None] * b_g[None, :]
        b_dg = tl.sum(b_dl[:, None] * b_w, axis=0)  # [BH]; 0 in the tail, so the tail adds nothing below
        tl.store(dpooled_ptr + i_b64 * H + o_h, b_dg * b_gprime, mask=m_h)
        if RATIONAL:
            b_dnum += tl.sum((b_dg / b_q)[:, None] * b_px, axis=0)  # dg/da_j = x^j / Q
            b_dden += tl.sum((-b_dg * b_g / b_q)[:, None] * b_pa, axis=0)  # dg/d|b_j| = -P / Q^2 * |x|^j

    # d b_j = sign(b_j) d|b_j|; index j of the dden row holds b_j (index 0 unused).
    b_den = tl.load(den_ptr + o_j - 1, mask=(o_j >= 1) & (o_j <= DEN), other=0.0).to(tl.float32)
    b_dden = b_dden * tl.where(b_den > 0, 1.0, tl.where(b_den < 0, -1.0, 0.0))
    tl.store(dwr_ptr + o_m[:, None] * H + o_h[None, :], b_dw.to(dwr_ptr.dtype.element_ty), mask=m_mh)
    tl.store(dnum_ptr + i_h * BJ + o_j, b_dnum)
    tl.store(dden_ptr + i_h * BJ + o_j, b_dden)


@triton.jit
def prompt_route_bwd_kernel_scores(
    hidden_ptr,  # [B, S, H] strided
    mask_ptr,  # [B, S]; read only when HAS_MASK
    scores_ptr,  # [B, S] fp32 contiguous, -inf on padding
    lse_ptr,  # [B] fp32
    pooled_ptr,  # [B, H] fp32 contiguous
    dpooled_ptr,  # [B, H] fp32 contiguous
    ds_ptr,  # [B, S] fp32 contiguous: gradient of the scores
    S,
    H,
    stride_hb,
    stride_hs,
    stride_hh,
    stride_mb,
    stride_ms,
    HAS_MASK: tl.constexpr,
    BS: tl.constexpr,
    BH: tl.constexpr,
):
    # h = sum_t a_t x_t: da_t = dh . x_t, and the softmax backward's sum_t a_t da_t is dh . h.
    i_b, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_s = (i_s * BS + tl.arange(0, BS)).to(tl.int64)  # [BS]
    m_s = o_s < S
    m_keep = _keep(mask_ptr, i_b, o_s, m_s, stride_mb, stride_ms, HAS_MASK)
    p_row = hidden_ptr + i_b * stride_hb + o_s * stride_hs  # [BS]

    # ds_t = a_t (da_t - dh . h) = a_t dh . (x_t - h): one sum, without the cancellation of two (a prompt of
    # one token gets exactly 0, as the reference does).
    b_dd = tl.zeros([BS], dtype=tl.float32)
    for i_h in range(0, tl.cdiv(H, BH)):
        o_h = (i_h * BH + tl.arange(0, BH)).to(tl.int64)
        m_h = o_h < H
        b_dh = tl.load(dpooled_ptr + i_b * H + o_h, mask=m_h, other=0.0)  # [BH]
        b_h = tl.load(pooled_ptr + i_b * H + o_h, mask=m_h, other=0.0)  # [BH]
        b_x = tl.load(p_row[:, None] + o_h[None, :] * stride_hh, mask=m_keep[:, None] & m_h[None, :], other=0.0)
        b_dd += tl.sum((b_x.to(tl.float32) - b_h[None, :]) * b_dh[None, :], axis=1)  # [BS]
    b_s = tl.load(scores_ptr + i_b * S + o_s, mask=m_s, other=float("-inf"))
    b_a = tl.exp(b_s - tl.load(lse_ptr + i_b))  # [BS], 0 on padding
    tl.store(ds_ptr + i_b * S + o_s, tl.where(m_keep, b_a * b_dd, 0.0), mask=m_s)


@triton.jit
def prompt_route_bwd_kernel_pool(
    hidden_ptr,  # [B, S, H] strided
    mask_ptr,  # [B, S]; read only when HAS_MASK
    pooled_ptr,  # [B, H] fp32 contiguous
    dpooled_ptr,  # [B, H] fp32 contiguous
    scores_ptr,  # [B, S] fp32 (attention only)
    lse_ptr,  # [B] fp32 (attention only)
    ds_ptr,  # [B, S] fp32 (attention only)
    w_ptr,  # [H] pool_weight contiguous (attention only)
    dhidden_ptr,  # [B, S, H] contiguous, hidden's dtype: every position written, 0 on padding
    dw_ptr,  # [B, H] fp32 contiguous: each sequence's share of d pool_weight (attention only)
    S,
    H,
    stride_hb,
    stride_hs,
    stride_hh,
    stride_mb,
    stride_ms,
    POOL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BS: tl.constexpr,
    BH: tl.constexpr,
):
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_h = (i_h * BH + tl.arange(0, BH)).to(tl.int64)  # [BH]
    m_h = o_h < H
    p_col = hidden_ptr + i_b * stride_hb + o_h * stride_hh  # [BH]
    b_dh = tl.load(dpooled_ptr + i_b * H + o_h, mask=m_h, other=0.0)  # [BH]

    # A first pass where the pooling needs a per-sequence number before writing d hidden.
    b_scale = tl.zeros([BH], dtype=tl.float32)  # mean: 1 / n; max: 1 / (ties at the max), as torch's amax
    last = -1
    if POOL == 0:
        b_w = tl.load(w_ptr + o_h, mask=m_h, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + i_b)
        b_dw = tl.zeros([BH], dtype=tl.float32)
    elif POOL == 3:
        b_h = tl.load(pooled_ptr + i_b * H + o_h, mask=m_h, other=0.0)
    if POOL != 0:
        b_pos = tl.full([BS], -1, dtype=tl.int64)
        for i_s in range(0, tl.cdiv(S, BS)):
            o_s = (i_s * BS + tl.arange(0, BS)).to(tl.int64)
            m_keep = _keep(mask_ptr, i_b, o_s, o_s < S, stride_mb, stride_ms, HAS_MASK)
            if POOL == 1:
                b_scale += tl.sum(m_keep.to(tl.float32), axis=0)
            elif POOL == 2:
                b_pos = tl.maximum(b_pos, tl.where(m_keep, o_s, -1))
            else:
                m_x = m_keep[:, None] & m_h[None, :]
                b_x = tl.load(p_col[None, :] + o_s[:, None] * stride_hs, mask=m_x, other=0.0).to(tl.float32)
                b_scale += tl.sum((m_x & (b_x == b_h[None, :])).to(tl.float32), axis=0)
        b_scale = 1.0 / tl.maximum(b_scale, 1.0)
        last = tl.max(b_pos, axis=0)

    for i_s in range(0, tl.cdiv(S, BS)):
        o_s = (i_s * BS + tl.arange(0, BS)).to(tl.int64)
        m_s = o_s < S
        m_keep = _keep(mask_ptr, i_b, o_s, m_s, stride_mb, stride_ms, HAS_MASK)
        m_x = m_keep[:, None] & m_h[None, :]
        if POOL == 0:  # dx_t = a_t dh + ds_t w;  dw += ds_t x_t
            b_a = tl.exp(tl.load(scores_ptr + i_b * S + o_s, mask=m_s, other=float("-inf")) - lse)  # [BS]
            b_ds = tl.load(ds_ptr + i_b * S + o_s, mask=m_s, other=0.0)  # [BS]
            b_x = tl.load(p_col[None, :] + o_s[:, None] * stride_hs, mask=m_x, other=0.0).to(tl.float32)
            b_dw += tl.sum(b_ds[:, None] * b_x, axis=0)
            b_dx = b_a[:, None] * b_dh[None, :] + b_ds[:, None] * b_w[None, :]
        elif POOL == 1:
            b_dx = tl.zeros([BS, BH], dtype=tl.float32) + b_dh[None, :] * b_scale[None, :]
        elif POOL == 2:
            b_dx = tl.where(o_s[:, None] == last, b_dh[None, :], 0.0)
        else:
            b_x = tl.load(p_col[None, :] + o_s[:, None] * stride_hs, mask=m_x, other=0.0).to(tl.float32)
            b_dx = tl.where(b_x == b_h[None, :], b_dh[None, :] * b_scale[None, :], 0.0)
        b_dx = tl.where(m_x, b_dx, 0.0)
        p_dx = dhidden_ptr + i_b * S * H + o_s[:, None] * H + o_h[None, :]
        tl.store(p_dx, b_dx.to(dhidden_ptr.dtype.element_ty), mask=m_s[:, None] & m_h[None, :])
    if POOL == 0:
        tl.store(dw_ptr + i_b * H + o_h, b_dw, mask=m_h)


def prompt_route_bwd(
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
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """-> d hidden [B, S, H] (hidden's dtype), d router_weight [M, H], d numerator, d denominator (their
    dtypes; None with GELU), d pool_weight [H] (attention pooling; None otherwise). A None upstream
    gradient counts as 0."""
    Bn, S, H = hidden.shape
    M, k = probs.shape[1], indices.shape[1]
    dev = hidden.device
    pool = POOL_CODES[pooling]
    act = _activation_args(numerator, denominator, pooled)
    BJ = act["BJ"]
    n_h = _grid_h(H)

    dpooled = torch.empty(Bn, H, dtype=torch.float32, device=dev)
    d_router = torch.empty(M, H, dtype=router_weight.dtype, device=dev)
    dnum = torch.empty(n_h, BJ, dtype=torch.float32, device=dev)
    dden = torch.empty(n_h, BJ, dtype=torch.float32, device=dev)
    prompt_route_bwd_kernel_head[(n_h,)](
        dgates_ptr=grad_gates.contiguous() if grad_gates is not None else probs,
        dprobs_ptr=grad_probs.contiguous() if grad_probs is not None else probs,
        probs_ptr=probs,
        indices_ptr=indices,
        pooled_ptr=pooled,
        wr_ptr=router_weight,
        dpooled_ptr=dpooled,
        dwr_ptr=d_router,
        dnum_ptr=dnum,
        dden_ptr=dden,
        NB=Bn,
        H=H,
        M=M,
        stride_wm=router_weight.stride(0),
        stride_wh=router_weight.stride(1),
        K=k,
        HAS_DG=grad_gates is not None,
        HAS_DP=grad_probs is not None,
        BM=triton.next_power_of_2(max(M, 2)),
        BH=BLOCK_H,
        num_warps=NUM_WARPS,
        **act,
    )

    mask_t, stride_mb, stride_ms = _mask_arg(mask, hidden)
    strides = dict(stride_hb=hidden.stride(0), stride_hs=hidden.stride(1), stride_hh=hidden.stride(2))
    mask_args = dict(mask_ptr=mask_t, stride_mb=stride_mb, stride_ms=stride_ms, HAS_MASK=mask is not None)
    d_hidden = torch.empty(Bn, S, H, dtype=hidden.dtype, device=dev)
    attention = pool == POOL_CODES["attention"]
    ds = torch.empty(Bn, S, dtype=torch.float32, device=dev) if attention else pooled
    dw = torch.empty(Bn, H, dtype=torch.float32, device=dev) if attention else pooled
    if attention:
        prompt_route_bwd_kernel_scores[(Bn, triton.cdiv(S, BLOCK_S))](
            hidden_ptr=hidden,
            scores_ptr=scores,
            lse_ptr=lse,
            pooled_ptr=pooled,
            dpooled_ptr=dpooled,
            ds_ptr=ds,
            S=S,
            H=H,
            BS=BLOCK_S,
            BH=BLOCK_H,
            num_warps=NUM_WARPS,
            **strides,
            **mask_args,
        )
    prompt_route_bwd_kernel_pool[(Bn, n_h)](
        hidden_ptr=hidden,
        pooled_ptr=pooled,
        dpooled_ptr=dpooled,
        scores_ptr=scores if attention else pooled,
        lse_ptr=lse if attention else pooled,
        ds_ptr=ds,
        w_ptr=pool_weight.contiguous() if attention else pooled,
        dhidden_ptr=d_hidden,
        dw_ptr=dw,
        S=S,
        H=H,
        POOL=pool,
        BS=BLOCK_S,
        BH=BLOCK_H,
        num_warps=NUM_WARPS,
        **strides,
        **mask_args,
    )
    d_num = d_den = None
    if act["RATIONAL"]:
        d_num = dnum.sum(dim=0)[: act["NUM"]].to(numerator.dtype)
        d_den = dden.sum(dim=0)[1 : act["DEN"] + 1].to(denominator.dtype)
    d_pool_weight = dw.sum(dim=0).to(pool_weight.dtype) if attention else None
    return d_hidden, d_router, d_num, d_den, d_pool_weight
