"""Triton `mixlora_ffn`, dense-masked regime: the backward (kernels/mixlora_ffn.py has the forward, the math and
the design). Recomputes h_j (two more expand GEMMs of K = E*r per slot) instead of storing [T, k, I]:

- `mixlora_ffn_bwd_kernel_rows`: grid over (token block, slice of I); per slot, h_j again and D_j = dhbar +
  s Ad_e^T q_e (q = dy_lora @ Bd_all^T from down_expand_bwd); the reductions over I: rank-space gradients of
  the gate/up LoRA [T, P*E*r] and of the routing weights [T, k]; writes dG and dU (summed over slots).
- `mixlora_ffn_bwd_kernel_cols`: grid over (block of I, slice of tokens); the reductions over T: the
  gradients of Bg, Bu and Ad.
- mixlora_ffn_core_bwd: the launcher of both (shapes in its docstring), the per-slice partial buffers
  summed in a fixed order (no atomics).
With LoRA dropout the down path's share of D_j and dAd go through h_j's regenerated mask. The tiles, the JIT
slot helpers and the kernel arguments are the forward's (kernels/mixlora_ffn.py), imported from there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moelora.kernels._common import (
    NOMINAL_BI,
    NOMINAL_BT,
    _experts,
    _rank_views,
    _slices,
    _slot_act_grads,
)
from moelora.kernels.mixlora_ffn import _TUNE_KEY, _common_args, _configs, _h_keep, _rank_chunk, _slot_pre
from torch import Tensor

from moelora.dropout import LoraDropout


@triton.jit
def _slot_grads(
    b_g,
    b_u,
    b_dh,  # [BT, BI] fp32 upstream gradient of hbar
    b_e,
    b_w,  # [BT] fp32, 0 for unused slots
    ag_ptr,
    au_ptr,
    stride_at,
    bg_ptr,
    stride_bge,
    stride_bgi,
    stride_bgr,
    bu_ptr,
    stride_bue,
    stride_bui,
    stride_bur,
    q_ptr,  # [T, N] fp32 contiguous: dy_lora @ Bd_all
    ad_ptr,  # [E, R, I] through strides
    stride_ade,
    stride_adr,
    stride_adi,
    o_t,
    m_t,
    o_i,
    m_i,
    N,
    R,
    scaling,
    j,  # the slot
    I,
    seed,
    drop_threshold,
    drop_scale,
    K: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    GATE_LORA: tl.constexpr,
    UP_LORA: tl.constexpr,
    DOWN_LORA: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """One slot, recomputed: h_j, D_j = dhbar + s Ad_e^T q_e (so dw_j = <D_j, h_j> and dh_j = w_j D_j), and the
    gradients of the pre-activation gate and up rows, dgg and duu, all [BT, BI] fp32; and h_j as the down LoRA
    read it (drop(h_j) without its 1 / (1 - p) with DROPOUT, else h_j). With dropout the down path's share of
    D_j goes through h_j's mask and 1 / (1 - p): D_j = dhbar + keep / (1 - p) * s Ad_e^T q_e, so that
    <D_j, h_j> = <dhbar, h_j> + <s Ad_e^T q_e, drop(h_j)> is still dw_j."""
    b_gg, b_uu = _slot_pre(
        b_g, b_u, ag_ptr, au_ptr, stride_at,
        bg_ptr, stride_bge, stride_bgi, stride_bgr, bu_ptr, stride_bue, stride_bui, stride_bur,
        o_t, m_t, b_e, o_i, m_i, N, R, scaling, GATE_LORA, UP_LORA, BN, PREC, DOT_DT,
    )  # fmt: skip
    b_D = b_dh
    if DROPOUT:
        b_D = tl.zeros_like(b_dh)  # the down path's share alone, masked below
    if DOWN_LORA:
        for i_n in range(0, tl.cdiv(N, BN)):  # D += s q_e @ Ad_e, dense-masked as in _slot_pre
            o_n = i_n * BN + tl.arange(0, BN)  # [BN]
            m_n = o_n < N
            e_n = o_n // R
            m_sel = m_t[:, None] & m_n[None, :] & (e_n[None, :] == b_e[:, None])  # [BT, BN]
            b_q = tl.load(q_ptr + o_t[:, None] * N + o_n[None, :], mask=m_sel, other=0.0) * scaling  # [BT, BN]
            p_a = ad_ptr + e_n.to(tl.int64)[:, None] * stride_ade + (o_n % R).to(tl.int64)[:, None] * stride_adr
            b_a = tl.load(p_a + o_i[None, :] * stride_adi, mask=m_n[:, None] & m_i[None, :], other=0.0)  # [BN, BI]
            b_D = tl.dot(b_q.to(DOT_DT), b_a.to(DOT_DT), acc=b_D, input_precision=PREC)
    if DROPOUT:
        b_keep = _h_keep(seed, drop_threshold, o_t, j, o_i, K, I)
        b_D = b_dh + tl.where(b_keep, b_D * drop_scale, 0.0)
    b_h, b_dgg, b_duu = _slot_act_grads(b_gg, b_uu, b_D, b_w, ACT, GATED)
    b_hd = b_h
    if DROPOUT:
        b_hd = tl.where(b_keep, b_h, 0.0)
    return b_h, b_D, b_dgg, b_duu, b_hd


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def mixlora_ffn_bwd_kernel_rows(
    g_ptr,  # [T, I] base G, read only when GATED
    u_ptr,  # [T, I] base U
    dh_ptr,  # [T, I] upstream gradient of hbar
    weights_ptr,  # [T, K]
    indices_ptr,  # [T, K] int
    ag_ptr,  # [T, N] fp32
    au_ptr,  # [T, N] fp32
    q_ptr,  # [T, N] fp32 contiguous: dy_lora @ Bd_all, read only when DOWN_LORA
    bg_ptr,  # [E, I, R]
    bu_ptr,  # [E, I, R]
    ad_ptr,  # [E, R, I]
    dg_ptr,  # [T, I] contiguous out: grad of G, written only when GATED
    du_ptr,  # [T, I] contiguous out: grad of U
    dag_ptr,  # [S, T, N] fp32 out (strides stride_das, stride_dat, 1): s Bg_e^T dgg, this I-slice's share
    dau_ptr,  # [S, T, N] fp32 out: s Bu_e^T duu
    dw_ptr,  # [S, T, K] fp32 contiguous out: <D_j, h_j>, this I-slice's share
    T,
    I,
    E,
    N,
    R,
    S,
    scaling,
    stride_gt,
    stride_gi,
    stride_ut,
    stride_ui,
    stride_dht,
    stride_dhi,
    stride_wt,
    stride_wk,
    stride_it,
    stride_ik,
    stride_at,
    stride_bge,
    stride_bgi,
    stride_bgr,
    stride_bue,
    stride_bui,
    stride_bur,
    stride_ade,
    stride_adr,
    stride_adi,
    stride_das,
    stride_dat,
    T_BUCKET,
    seed,  # LoRA dropout of h_j (kernels/philox.py, stream H_STREAM), read only when DROPOUT
    drop_threshold,
    drop_scale,
    K: tl.constexpr,
    BK: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    GATE_LORA: tl.constexpr,
    UP_LORA: tl.constexpr,
    DOWN_LORA: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    BN: tl.constexpr,
    NC: tl.constexpr,
    BT: tl.constexpr,
    BI: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # grid: (token blocks, slices of I, chunks of the rank columns of dag/dau)
    i_t, i_s, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
    m_t = o_t < T
    o_c = i_c * NC + tl.arange(0, NC)  # [NC]
    m_c = o_c < N
    e_c = o_c // R
    o_k = tl.arange(0, BK)  # [BK]
    m_first = m_t & (tl.zeros([BT], dtype=tl.int32) + i_c == 0)  # chunk 0 writes dG, dU and dw
    n_ib = tl.cdiv(I, BI)
    per = tl.cdiv(n_ib, S)

    b_dag = tl.zeros([BT, NC], dtype=tl.float32)
    b_dau = tl.zeros([BT, NC], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    for i_b in range(i_s * per, tl.minimum(i_s * per + per, n_ib)):
        o_i = (i_b * BI + tl.arange(0, BI)).to(tl.int64)  # [BI]
        m_i = o_i < I
        m_ti = m_t[:, None] & m_i[None, :]
        b_u = tl.load(u_ptr + o_t[:, None] * stride_ut + o_i[None, :] * stride_ui, mask=m_ti, other=0.0).to(tl.float32)
        b_g = b_u
        if GATED:
            b_g = tl.load(g_ptr + o_t[:, None] * stride_gt + o_i[None, :] * stride_gi, mask=m_ti, other=0.0)
            b_g = b_g.to(tl.float32)
        b_dh = tl.load(dh_ptr + o_t[:, None] * stride_dht + o_i[None, :] * stride_dhi, mask=m_ti, other=0.0)
        b_dh = b_dh.to(tl.float32)
        m_ic = m_i[:, None] & m_c[None, :]
        if GATE_LORA:
            p_bg = bg_ptr + e_c.to(tl.int64)[None, :] * stride_bge + (o_c % R).to(tl.int64)[None, :] * stride_bgr
            b_bg = tl.load(p_bg + o_i[:, None] * stride_bgi, mask=m_ic, other=0.0)  # [BI, NC]
        if UP_LORA:
            p_bu = bu_ptr + e_c.to(tl.int64)[None, :] * stride_bue + (o_c % R).to(tl.int64)[None, :] * stride_bur
            b_bu = tl.load(p_bu + o_i[:, None] * stride_bui, mask=m_ic, other=0.0)  # [BI, NC]
        b_dgs = tl.zeros([BT, BI], dtype=tl.float32)
        b_dus = tl.zeros([BT, BI], dtype=tl.float32)
        for j in range(0, K):
            b_e = tl.load(indices_ptr + o_t * stride_it + j * stride_ik, mask=m_t, other=-1)  # [BT]
            # int32 for the [BT, N] compares against the column's expert (int64 there cost registers: sm_90
            # compile_check); an out-of-range id becomes -1 first, so that it cannot wrap onto an expert
            b_e = tl.where((b_e >= 0) & (b_e < E), b_e, -1).to(tl.int32)
            b_valid = (b_e >= 0) & (b_e < E)
            b_w = tl.load(weights_ptr + o_t * stride_wt + j * stride_wk, mask=m_t, other=0.0).to(tl.float32)
            b_w = tl.where(b_valid, b_w, 0.0)
            b_h, b_D, b_dgg, b_duu, _ = _slot_grads(
                b_g, b_u, b_dh, b_e, b_w, ag_ptr, au_ptr, stride_at,
                bg_ptr, stride_bge, stride_bgi, stride_bgr, bu_ptr, stride_bue, stride_bui, stride_bur,
                q_ptr, ad_ptr, stride_ade, stride_adr, stride_adi,
                o_t, m_t, o_i, m_i, N, R, scaling, j, I, seed, drop_threshold, drop_scale,
                K, ACT, GATED, GATE_LORA, UP_LORA, DOWN_LORA, BN, PREC, DOT_DT, DROPOUT,
            )  # fmt: skip
            b_dwj = tl.where(b_valid, tl.sum(b_D * b_h, axis=1), 0.0)  # [BT]
            b_dw += tl.where(o_k[None, :] == j, b_dwj[:, None], 0.0)
            b_dgs += b_dgg
            b_dus += b_duu
            b_sel = tl.where(e_c[None, :] == b_e[:, None], scaling, 0.0)  # [BT, NC]
            if GATE_LORA:
                b_dag += b_sel * tl.dot(b_dgg.to(DOT_DT), b_bg.to(DOT_DT), input_precision=PREC)
            if UP_LORA:
                b_dau += b_sel * tl.dot(b_duu.to(DOT_DT), b_bu.to(DOT_DT), input_precision=PREC)
        o_ti = o_t[:, None] * I + o_i[None, :]
        if GATED:
            tl.store(dg_ptr + o_ti, b_dgs.to(dg_ptr.dtype.element_ty), mask=m_first[:, None] & m_i[None, :])
        tl.store(du_ptr + o_ti, b_dus.to(du_ptr.dtype.element_ty), mask=m_first[:, None] & m_i[None, :])

    m_tc = m_t[:, None] & m_c[None, :]
    o_tc = i_s.to(tl.int64) * stride_das + o_t[:, None] * stride_dat + o_c[None, :]
    if GATE_LORA:
        tl.store(dag_ptr + o_tc, b_dag, mask=m_tc)
    if UP_LORA:
        tl.store(dau_ptr + o_tc, b_dau, mask=m_tc)
    p_dw = dw_ptr + i_s.to(tl.int64) * T * K + o_t[:, None] * K + o_k[None, :]
    tl.store(p_dw, b_dw, mask=m_first[:, None] & (o_k < K)[None, :])


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def mixlora_ffn_bwd_kernel_cols(
    g_ptr,  # [T, I] base G, read only when GATED
    u_ptr,  # [T, I] base U
    dh_ptr,  # [T, I] upstream gradient of hbar
    weights_ptr,  # [T, K]
    indices_ptr,  # [T, K] int
    ag_ptr,  # [T, N] fp32
    au_ptr,  # [T, N] fp32
    q_ptr,  # [T, N] fp32 contiguous
    bg_ptr,  # [E, I, R]
    bu_ptr,  # [E, I, R]
    ad_ptr,  # [E, R, I]
    dbg_ptr,  # [S, N, I] fp32 contiguous out: grad of Bg as (expert*rank, column), this T-slice's share
    dbu_ptr,  # [S, N, I] fp32 out: grad of Bu
    dad_ptr,  # [S, N, I] fp32 out: grad of Ad
    T,
    I,
    E,
    N,
    R,
    S,
    scaling,
    stride_gt,
    stride_gi,
    stride_ut,
    stride_ui,
    stride_dht,
    stride_dhi,
    stride_wt,
    stride_wk,
    stride_it,
    stride_ik,
    stride_at,
    stride_bge,
    stride_bgi,
    stride_bgr,
    stride_bue,
    stride_bui,
    stride_bur,
    stride_ade,
    stride_adr,
    stride_adi,
    T_BUCKET,
    seed,  # LoRA dropout of h_j (kernels/philox.py, stream H_STREAM), read only when DROPOUT
    drop_threshold,
    drop_scale,
    K: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    GATE_LORA: tl.constexpr,
    UP_LORA: tl.constexpr,
    DOWN_LORA: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    BN: tl.constexpr,
    NC: tl.constexpr,
    BT: tl.constexpr,
    BI: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # grid: (blocks of I, slices of T, chunks of the rank rows of the weight gradients)
    i_i, i_s, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_i = (i_i * BI + tl.arange(0, BI)).to(tl.int64)  # [BI]
    m_i = o_i < I
    o_c = i_c * NC + tl.arange(0, NC)  # [NC]
    m_c = o_c < N
    e_c = o_c // R
    n_tb = tl.cdiv(T, BT)
    per = tl.cdiv(n_tb, S)

    b_dbg = tl.zeros([NC, BI], dtype=tl.float32)
    b_dbu = tl.zeros([NC, BI], dtype=tl.float32)
    b_dad = tl.zeros([NC, BI], dtype=tl.float32)
    KCH: tl.constexpr = 1 if PREC == "ieee" else 1 << 30  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    tb_lo, tb_hi = i_s * per, tl.minimum(i_s * per + per, n_tb)
    for i_k in range(0, tb_hi - tb_lo if KCH == 1 else 1):
        b_part_dbg = tl.zeros([NC, BI], dtype=tl.float32) if KCH == 1 else b_dbg
        b_part_dbu = tl.zeros([NC, BI], dtype=tl.float32) if KCH == 1 else b_dbu
        b_part_dad = tl.zeros([NC, BI], dtype=tl.float32) if KCH == 1 else b_dad
        for i_tb in range(tb_lo + i_k * KCH, tl.minimum(tb_lo + i_k * KCH + KCH, tb_hi)):
            o_t = (i_tb * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
            m_t = o_t < T
            m_ti = m_t[:, None] & m_i[None, :]
            b_u = tl.load(u_ptr + o_t[:, None] * stride_ut + o_i[None, :] * stride_ui, mask=m_ti, other=0.0).to(
                tl.float32
            )
            b_g = b_u
            if GATED:
                b_g = tl.load(g_ptr + o_t[:, None] * stride_gt + o_i[None, :] * stride_gi, mask=m_ti, other=0.0)
                b_g = b_g.to(tl.float32)
            b_dh = tl.load(dh_ptr + o_t[:, None] * stride_dht + o_i[None, :] * stride_dhi, mask=m_ti, other=0.0)
            b_dh = b_dh.to(tl.float32)
            for j in range(0, K):
                b_e = tl.load(indices_ptr + o_t * stride_it + j * stride_ik, mask=m_t, other=-1)  # [BT]
                # int32 for the [BT, N] compares against the column's expert (int64 there cost registers: sm_90
                # compile_check); an out-of-range id becomes -1 first, so that it cannot wrap onto an expert
                b_e = tl.where((b_e >= 0) & (b_e < E), b_e, -1).to(tl.int32)
                b_w = tl.load(weights_ptr + o_t * stride_wt + j * stride_wk, mask=m_t, other=0.0).to(tl.float32)
                b_w = tl.where((b_e >= 0) & (b_e < E), b_w, 0.0)
                _, _, b_dgg, b_duu, b_h = _slot_grads(
                    b_g, b_u, b_dh, b_e, b_w, ag_ptr, au_ptr, stride_at,
                    bg_ptr, stride_bge, stride_bgi, stride_bgr, bu_ptr, stride_bue, stride_bui, stride_bur,
                    q_ptr, ad_ptr, stride_ade, stride_adr, stride_adi,
                    o_t, m_t, o_i, m_i, N, R, scaling, j, I, seed, drop_threshold, drop_scale,
                    K, ACT, GATED, GATE_LORA, UP_LORA, DOWN_LORA, BN, PREC, DOT_DT, DROPOUT,
                )  # fmt: skip
                m_sel = m_t[:, None] & m_c[None, :] & (e_c[None, :] == b_e[:, None])  # [BT, NC]
                o_tc = o_t[:, None] * stride_at + o_c[None, :]
                if GATE_LORA:
                    b_l = tl.load(ag_ptr + o_tc, mask=m_sel, other=0.0) * scaling  # [BT, NC]
                    b_part_dbg = tl.dot(
                        tl.trans(b_l).to(DOT_DT), b_dgg.to(DOT_DT), acc=b_part_dbg, input_precision=PREC
                    )  # [NC, BI]
                if UP_LORA:
                    b_l = tl.load(au_ptr + o_tc, mask=m_sel, other=0.0) * scaling
                    b_part_dbu = tl.dot(
                        tl.trans(b_l).to(DOT_DT), b_duu.to(DOT_DT), acc=b_part_dbu, input_precision=PREC
                    )
                if DOWN_LORA:  # dAd_e += dc_j^T drop(h_j): b_h is h_j as the down LoRA read it
                    b_l = tl.load(q_ptr + o_t[:, None] * N + o_c[None, :], mask=m_sel, other=0.0)
                    b_l = b_l * (b_w * scaling)[:, None]  # dc_j = w_j s q_e
                    b_part_dad = tl.dot(tl.trans(b_l).to(DOT_DT), b_h.to(DOT_DT), acc=b_part_dad, input_precision=PREC)
        b_dbg = b_dbg + b_part_dbg if KCH == 1 else b_part_dbg
        b_dbu = b_dbu + b_part_dbu if KCH == 1 else b_part_dbu
        b_dad = b_dad + b_part_dad if KCH == 1 else b_part_dad

    m_ci = m_c[:, None] & m_i[None, :]
    o_ci = i_s.to(tl.int64) * N * I + o_c.to(tl.int64)[:, None] * I + o_i[None, :]
    if GATE_LORA:
        tl.store(dbg_ptr + o_ci, b_dbg, mask=m_ci)
    if UP_LORA:
        tl.store(dbu_ptr + o_ci, b_dbu, mask=m_ci)
    if DOWN_LORA:
        if DROPOUT:
            b_dad = b_dad * drop_scale
        tl.store(dad_ptr + o_ci, b_dad, mask=m_ci)


def mixlora_ffn_core_bwd(
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
    dropout: LoraDropout | None = None,
) -> tuple[Tensor | None, ...]:
    """-> the gradients of (ua, gate, up, weights, gB, uB, dA) of mixlora_ffn_core_fwd; None for an absent input
    (grad_ua is [T, 0] without gate and up LoRAs). grad_zd [T, E*r] fp32 (down_expand_bwd's q = dy_lora @
    Bd_all^T), or None when zd has no gradient. dropout: the forward's (the mask is recomputed)."""
    T, I = up.shape
    E, R = _experts(gB, uB, dA)
    N = E * R
    K = weights.shape[1]
    dev = up.device
    has_down = dA is not None and grad_zd is not None
    q = grad_zd.contiguous() if has_down else ua  # ua stands in, unread, without a down LoRA
    ag, au = _rank_views(ua, gB is not None, uB is not None, shared_a, N)
    common = _common_args(
        gate, up, weights, indices, ag, au, gB, uB, dA if has_down else None, E, R, scaling, act, dropout
    )
    strides = dict(stride_dht=grad_hbar.stride(0), stride_dhi=grad_hbar.stride(1))

    # Reductions over I: rank-space gradients of the gate/up LoRA, routing-weight gradients; dG and dU.
    P = (gB is not None) + (uB is not None)  # the kernel writes gate's and up's blocks apart, even when shared_a
    chunks = triton.cdiv(N, _rank_chunk(N)) if P else 1
    S = _slices(triton.cdiv(T, NOMINAL_BT), triton.cdiv(I, NOMINAL_BI), chunks, dev)
    da = torch.empty(S, T, P * N, dtype=torch.float32, device=dev)
    dag, dau = (da[:, :, :N], da[:, :, N * (gB is not None) :]) if P else (da, da)
    dw = torch.empty(S, T, K, dtype=torch.float32, device=dev)
    grad_gate = torch.empty(T, I, dtype=gate.dtype, device=dev) if gate is not None else None
    grad_up = torch.empty(T, I, dtype=up.dtype, device=dev)
    mixlora_ffn_bwd_kernel_rows[lambda META: (triton.cdiv(T, META["BT"]), S, chunks)](
        **common,
        **strides,
        dh_ptr=grad_hbar,
        q_ptr=q,
        dg_ptr=grad_gate if gate is not None else grad_up,
        du_ptr=grad_up,
        dag_ptr=dag,
        dau_ptr=dau,
        dw_ptr=dw,
        S=S,
        stride_das=da.stride(0),
        stride_dat=da.stride(1),
        BK=triton.next_power_of_2(K),
    )
    da = da.sum(0) if S > 1 else da[0]  # [T, P*N]
    grad_w = (dw.sum(0) if S > 1 else dw[0]).to(weights.dtype)
    grad_ua = da[:, :N] + da[:, N:] if shared_a else da  # one A: its rank-space gradient sums gate's and up's

    # Reductions over T: the gradients of Bg, Bu and Ad, as [N, I] per T-slice.
    chunks = triton.cdiv(N, _rank_chunk(N))
    S = _slices(triton.cdiv(I, NOMINAL_BI), triton.cdiv(T, NOMINAL_BT), chunks, dev)
    parts = {
        name: torch.empty(S, N, I, dtype=torch.float32, device=dev) if present else None
        for name, present in (("bg", gB is not None), ("bu", uB is not None), ("ad", has_down))
    }
    mixlora_ffn_bwd_kernel_cols[lambda META: (triton.cdiv(I, META["BI"]), S, chunks)](
        **common,
        **strides,
        dh_ptr=grad_hbar,
        q_ptr=q,
        dbg_ptr=parts["bg"] if parts["bg"] is not None else up,
        dbu_ptr=parts["bu"] if parts["bu"] is not None else up,
        dad_ptr=parts["ad"] if parts["ad"] is not None else up,
        S=S,
    )

    def total(name: str) -> Tensor | None:
        part = parts[name]
        return None if part is None else (part.sum(0) if S > 1 else part[0]).view(E, R, I)

    grad_gB = total("bg")
    grad_uB = total("bu")
    grad_dA = total("ad")
    grad_gB = grad_gB.transpose(1, 2).to(gB.dtype).contiguous() if grad_gB is not None else None
    grad_uB = grad_uB.transpose(1, 2).to(uB.dtype).contiguous() if grad_uB is not None else None
    grad_dA = grad_dA.to(dA.dtype) if grad_dA is not None else None
    if dA is not None and grad_dA is None:
        grad_dA = torch.zeros_like(dA)
    return grad_ua, grad_gate, grad_up, grad_w, grad_gB, grad_uB, grad_dA
