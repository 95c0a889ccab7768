"""Triton `mixlora_ffn`, combination-sorted regime: the backward (kernels/mixlora_ffn_sorted.py has the forward,
the combination sort and the design).

- `ffn_sorted_bwd_kernel_rows` per (block of one combination, slice of I): recomputes gg, uu and
  D = dhbar + s q_e Ad_e, writes dG, dU (summed over slots in registers), accumulates the rank-space
  gradients s dgg Bg_e^T, s duu Bu_e^T into [BT, k*r] tiles and <D, h> into dw;
- `ffn_sorted_bwd_kernel_wgrad` (sorted_ffn_weight_grads): dBg, dBu, dAd per (block of I, expert), looping
  over the expert's contiguous (token, slot) pairs (kernels/moe_lora_sorted.sort_by_expert), K = r;
- mixlora_ffn_sorted_core_bwd: the launcher of both, same arguments and results as the dense regime's
  mixlora_ffn_core_bwd. Per-slice buffers summed in a fixed order: no atomics.
The tiles, the JIT block and slot helpers and the kernel arguments are the forward's, imported from there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moelora.kernels import philox
from moelora.kernels._common import (
    ACTIVATIONS,
    NOMINAL_BI,
    _dot_mode,
    _experts,
    _rank_views,
    _slices,
    _slot_act_grads,
)
from moelora.kernels.mixlora_ffn_sorted import (
    _TUNE_KEY,
    BLOCK_I_INTERPRET,
    BLOCK_T,
    _block_slots,
    _block_tokens,
    _kernel_args,
    _rows,
    _slot,
    _slot_columns,
    _slot_expand,
    _slot_keep,
    _store_slot_columns,
    block_gpu_configs,
    combo_sort,
    wgrad_gpu_configs,
)
from moelora.kernels.moe_lora import autotune_list, t_bucket
from moelora.kernels.moe_lora_sorted import ExpertSort, sort_by_expert
from torch import Tensor

from moelora.dropout import LoraDropout


@triton.autotune(
    configs=autotune_list(block_gpu_configs(), triton.Config({"BI": BLOCK_I_INTERPRET}, num_warps=4)), key=_TUNE_KEY
)
@triton.jit
def ffn_sorted_bwd_kernel_rows(
    g_ptr,  # [T, I] base G, read only when GATED
    u_ptr,  # [T, I] base U
    dh_ptr,  # [T, I] upstream gradient of hbar
    rows_ptr,  # [P] int64
    experts_ptr,  # [T, K] int32
    weights_ptr,  # [T, K] fp32 canonical
    slots_ptr,  # [T, K] int64 original slots, read only when DROPOUT
    ag_ptr,  # [T, >= N] fp32
    au_ptr,
    q_ptr,  # [T, N] fp32 contiguous: dy_lora @ Bd_all, read only when DOWN_LORA
    bg_ptr,  # [N, I]
    bu_ptr,
    ad_ptr,
    dg_ptr,  # [T, I] contiguous out: grad of G, written only when GATED
    du_ptr,  # [T, I] contiguous out: grad of U
    dag_ptr,  # [S, T, >= N] fp32 zero-initialised out (strides stride_das, stride_dat, 1): s Bg_e^T dgg
    dau_ptr,  # [S, T, >= N] fp32 out: s Bu_e^T duu
    dw_ptr,  # [S, T, K] fp32 contiguous out: <D_j, h_j> per canonical slot, this I-slice's share
    T,
    I,
    E,
    N,
    R,
    S,
    scaling,
    T_BUCKET,  # autotune key only
    stride_gt,
    stride_gi,
    stride_ut,
    stride_ui,
    stride_dht,
    stride_dhi,
    stride_at,
    stride_bgn,
    stride_bgi,
    stride_bun,
    stride_bui,
    stride_adn,
    stride_adi,
    stride_das,
    stride_dat,
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
    RB: tl.constexpr,
    KR: tl.constexpr,
    BT: tl.constexpr,
    BI: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # grid: (padded blocks, slices of I)
    i_s = tl.program_id(1)
    b_tok, tok0 = _block_tokens(rows_ptr, BT)
    if tok0 < 0:
        return
    m_t = b_tok >= 0
    b_tok = tl.where(m_t, b_tok, tok0)
    b_es, b_first, b_ws = _block_slots(experts_ptr, weights_ptr, tok0, b_tok, m_t, K, BK)
    o_r = tl.arange(0, RB)
    o_c = tl.arange(0, KR)
    o_k = tl.arange(0, BK)
    n_ib = tl.cdiv(I, BI)
    per = tl.cdiv(n_ib, S)

    b_dag = tl.zeros([BT, KR], dtype=tl.float32)
    b_dau = tl.zeros([BT, KR], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    KCH: tl.constexpr = 1 if PREC == "ieee" else 1 << 30  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    ib_lo, ib_hi = i_s * per, tl.minimum(i_s * per + per, n_ib)
    for i_k in range(0, ib_hi - ib_lo if KCH == 1 else 1):
        b_part_dag = tl.zeros([BT, KR], dtype=tl.float32) if KCH == 1 else b_dag
        b_part_dau = tl.zeros([BT, KR], dtype=tl.float32) if KCH == 1 else b_dau
        for i_b in range(ib_lo + i_k * KCH, tl.minimum(ib_lo + i_k * KCH + KCH, ib_hi)):
            o_i = i_b * BI + tl.arange(0, BI)  # [BI]
            m_i = o_i < I
            m_ti = m_t[:, None] & m_i[None, :]
            b_u = tl.load(u_ptr + b_tok[:, None] * stride_ut + o_i[None, :] * stride_ui, mask=m_ti, other=0.0)
            b_u = b_u.to(tl.float32)
            b_g = b_u
            if GATED:
                b_g = tl.load(g_ptr + b_tok[:, None] * stride_gt + o_i[None, :] * stride_gi, mask=m_ti, other=0.0)
                b_g = b_g.to(tl.float32)
            b_dh = tl.load(dh_ptr + b_tok[:, None] * stride_dht + o_i[None, :] * stride_dhi, mask=m_ti, other=0.0)
            b_dh = b_dh.to(tl.float32)
            b_dgs = tl.zeros([BT, BI], dtype=tl.float32)
            b_dus = tl.zeros([BT, BI], dtype=tl.float32)
            for j in range(0, K):
                e, col, b_w = _slot(b_es, b_first, b_ws, j, BK)
                b_gg = b_g
                b_uu = b_u
                b_D = b_dh
                if GATE_LORA:
                    b_gg = _slot_expand(
                        b_gg, ag_ptr, stride_at, bg_ptr, stride_bgn, stride_bgi,
                        b_tok, m_t, e, o_r, o_i, m_i, E, R, scaling, PREC, DOT_DT,
                    )  # fmt: skip
                if UP_LORA:
                    b_uu = _slot_expand(
                        b_uu, au_ptr, stride_at, bu_ptr, stride_bun, stride_bui,
                        b_tok, m_t, e, o_r, o_i, m_i, E, R, scaling, PREC, DOT_DT,
                    )  # fmt: skip
                if DOWN_LORA:  # D = dhbar + s q_e Ad_e
                    if DROPOUT:  # through h_j's mask: D = dhbar + keep / (1 - p) s q_e Ad_e (as the dense regime)
                        b_D = _slot_expand(
                            tl.zeros_like(b_dh), q_ptr, N, ad_ptr, stride_adn, stride_adi,
                            b_tok, m_t, e, o_r, o_i, m_i, E, R, scaling, PREC, DOT_DT,
                        )  # fmt: skip
                        b_keep = _slot_keep(seed, drop_threshold, slots_ptr, b_tok, m_t, j, o_i, K, I)
                        b_D = b_dh + tl.where(b_keep, b_D * drop_scale, 0.0)
                    else:
                        b_D = _slot_expand(
                            b_D, q_ptr, N, ad_ptr, stride_adn, stride_adi,
                            b_tok, m_t, e, o_r, o_i, m_i, E, R, scaling, PREC, DOT_DT,
                        )  # fmt: skip
                b_h, b_dgg, b_duu = _slot_act_grads(b_gg, b_uu, b_D, b_w, ACT, GATED)
                b_dwj = tl.where(e < E, tl.sum(b_D * b_h, axis=1), 0.0)  # [BT]
                b_dw += tl.where(o_k[None, :] == j, b_dwj[:, None], 0.0)
                b_dgs += b_dgg
                b_dus += b_duu
                if GATE_LORA:
                    b_bg = _slot_columns(bg_ptr, stride_bgn, stride_bgi, col, e, o_i, m_i, o_c, E, R, RB, DOT_DT)
                    b_part_dag = tl.dot((scaling * b_dgg).to(DOT_DT), b_bg, acc=b_part_dag, input_precision=PREC)
                if UP_LORA:
                    b_bu = _slot_columns(bu_ptr, stride_bun, stride_bui, col, e, o_i, m_i, o_c, E, R, RB, DOT_DT)
                    b_part_dau = tl.dot((scaling * b_duu).to(DOT_DT), b_bu, acc=b_part_dau, input_precision=PREC)
            p_ti = b_tok[:, None] * I + o_i[None, :]
            if GATED:
                tl.store(dg_ptr + p_ti, b_dgs.to(dg_ptr.dtype.element_ty), mask=m_ti)
            tl.store(du_ptr + p_ti, b_dus.to(du_ptr.dtype.element_ty), mask=m_ti)
        b_dag = b_dag + b_part_dag if KCH == 1 else b_part_dag
        b_dau = b_dau + b_part_dau if KCH == 1 else b_part_dau

    if GATE_LORA:
        _store_slot_columns(
            dag_ptr + i_s.to(tl.int64) * stride_das, stride_dat, b_dag, b_tok, m_t, experts_ptr, tok0, o_c, E, R, RB, K
        )
    if UP_LORA:
        _store_slot_columns(
            dau_ptr + i_s.to(tl.int64) * stride_das, stride_dat, b_dau, b_tok, m_t, experts_ptr, tok0, o_c, E, R, RB, K
        )
    p_dw = dw_ptr + i_s.to(tl.int64) * T * K + b_tok[:, None] * K + o_k[None, :]
    tl.store(p_dw, b_dw, mask=m_t[:, None] & (o_k < K)[None, :])


@triton.autotune(
    configs=autotune_list(wgrad_gpu_configs(), triton.Config({"BM": 32, "BI": BLOCK_I_INTERPRET}, num_warps=4)),
    key=_TUNE_KEY,
)
@triton.jit
def ffn_sorted_bwd_kernel_wgrad(
    g_ptr,  # [T, I] base G, read only when GATED
    u_ptr,  # [T, I] base U
    dh_ptr,  # [T, I] upstream gradient of hbar
    weights_ptr,  # [T, K] routing weights (the original slots)
    order_ptr,  # [T*K] int64 pair ids p = t*K + j sorted by expert
    offsets_ptr,  # [E+1] int64: expert e's pairs are order[offsets[e]:offsets[e+1]]
    ag_ptr,  # [T, >= N] fp32
    au_ptr,
    q_ptr,  # [T, N] fp32 contiguous, read only when DOWN_LORA
    bg_ptr,  # [N, I] rows (expert, rank)
    bu_ptr,
    ad_ptr,
    dbg_ptr,  # [N, I] fp32 contiguous out: grad of Bg as rows (expert, rank)
    dbu_ptr,  # [N, I] fp32 out: grad of Bu
    dad_ptr,  # [N, I] fp32 out: grad of Ad
    I,
    N,
    R,
    scaling,
    T_BUCKET,  # autotune key only
    stride_gt,
    stride_gi,
    stride_ut,
    stride_ui,
    stride_dht,
    stride_dhi,
    stride_wt,
    stride_wk,
    stride_at,
    stride_bgn,
    stride_bgi,
    stride_bun,
    stride_bui,
    stride_adn,
    stride_adi,
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
    RB: tl.constexpr,
    BM: tl.constexpr,
    BI: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # grid: (blocks of I, experts). Each program owns expert e's R rows of the three weight gradients on its
    # columns and loops over e's contiguous sorted pairs, gathering their tokens' rows: a per-expert reduction
    # in registers, no atomics, no split over pairs (one expert holding every pair makes its programs loop
    # over all of them; parallel over I only).
    i_i, e = tl.program_id(0), tl.program_id(1)
    o_i = i_i * BI + tl.arange(0, BI)  # [BI]
    m_i = o_i < I
    o_r = tl.arange(0, RB)
    m_r = o_r < R
    rows = (e * R + o_r).to(tl.int64)  # [RB] this expert's rows of every [N, *] tensor
    m_ri = m_r[:, None] & m_i[None, :]
    # the expert's weight rows on these columns: invariant over its pairs, loaded once
    if GATE_LORA:
        b_bg = tl.load(bg_ptr + rows[:, None] * stride_bgn + o_i[None, :] * stride_bgi, mask=m_ri, other=0.0)
        b_bg = b_bg.to(DOT_DT)
    if UP_LORA:
        b_bu = tl.load(bu_ptr + rows[:, None] * stride_bun + o_i[None, :] * stride_bui, mask=m_ri, other=0.0)
        b_bu = b_bu.to(DOT_DT)
    if DOWN_LORA:
        b_ad = tl.load(ad_ptr + rows[:, None] * stride_adn + o_i[None, :] * stride_adi, mask=m_ri, other=0.0)
        b_ad = b_ad.to(DOT_DT)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)

    b_dbg = tl.zeros([RB, BI], dtype=tl.float32)
    b_dbu = tl.zeros([RB, BI], dtype=tl.float32)
    b_dad = tl.zeros([RB, BI], dtype=tl.float32)
    KCH: tl.constexpr = 1 if PREC == "ieee" else 1 << 30  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    n_mb = tl.cdiv(end - start, BM)
    for i_k in range(0, n_mb if KCH == 1 else 1):
        b_part_dbg = tl.zeros([RB, BI], dtype=tl.float32) if KCH == 1 else b_dbg
        b_part_dbu = tl.zeros([RB, BI], dtype=tl.float32) if KCH == 1 else b_dbu
        b_part_dad = tl.zeros([RB, BI], dtype=tl.float32) if KCH == 1 else b_dad
        # one step of BM pairs per partial sum (ieee), else the whole loop over the expert's pairs
        for i_m in range(start + i_k * BM, start + i_k * BM + 1 if KCH == 1 else end, BM):
            o_m = i_m + tl.arange(0, BM)
            m_m = o_m < end
            b_p = tl.load(order_ptr + o_m, mask=m_m, other=0)  # [BM] int64
            b_tok = b_p // K
            b_w = tl.load(weights_ptr + b_tok * stride_wt + (b_p % K) * stride_wk, mask=m_m, other=0.0)
            b_w = b_w.to(tl.float32)
            m_mi = m_m[:, None] & m_i[None, :]
            m_mr = m_m[:, None] & m_r[None, :]
            b_u = tl.load(u_ptr + b_tok[:, None] * stride_ut + o_i[None, :] * stride_ui, mask=m_mi, other=0.0)
            b_uu = b_u.to(tl.float32)
            b_gg = b_uu
            if GATED:
                b_g = tl.load(g_ptr + b_tok[:, None] * stride_gt + o_i[None, :] * stride_gi, mask=m_mi, other=0.0)
                b_gg = b_g.to(tl.float32)
            b_D = tl.load(dh_ptr + b_tok[:, None] * stride_dht + o_i[None, :] * stride_dhi, mask=m_mi, other=0.0)
            b_D = b_D.to(tl.float32)
            if GATE_LORA:  # gg = G + s a_g,e Bg_e
                b_ag = tl.load(ag_ptr + b_tok[:, None] * stride_at + rows[None, :], mask=m_mr, other=0.0)
                b_ag = (b_ag * scaling).to(DOT_DT)  # [BM, RB]
                b_gg = tl.dot(b_ag, b_bg, acc=b_gg, input_precision=PREC)
            if UP_LORA:
                b_au = tl.load(au_ptr + b_tok[:, None] * stride_at + rows[None, :], mask=m_mr, other=0.0)
                b_au = (b_au * scaling).to(DOT_DT)
                b_uu = tl.dot(b_au, b_bu, acc=b_uu, input_precision=PREC)
            if DOWN_LORA:  # D = dhbar + s q_e Ad_e
                b_q = tl.load(q_ptr + b_tok[:, None] * N + rows[None, :], mask=m_mr, other=0.0)
                b_q = (b_q * scaling).to(DOT_DT)
                if DROPOUT:  # through h_j's mask, element (pair p = t * K + j) * I + i
                    b_keep = philox._keep(seed, philox.H_STREAM, b_p[:, None] * I + o_i[None, :], drop_threshold)
                    b_D += tl.where(b_keep, tl.dot(b_q, b_ad, input_precision=PREC) * drop_scale, 0.0)
                else:
                    b_D = tl.dot(b_q, b_ad, acc=b_D, input_precision=PREC)
            b_h, b_dgg, b_duu = _slot_act_grads(b_gg, b_uu, b_D, b_w, ACT, GATED)
            if GATE_LORA:  # dBg_e += (s a_g,e)^T dgg
                b_part_dbg = tl.dot(tl.trans(b_ag), b_dgg.to(DOT_DT), acc=b_part_dbg, input_precision=PREC)
            if UP_LORA:
                b_part_dbu = tl.dot(tl.trans(b_au), b_duu.to(DOT_DT), acc=b_part_dbu, input_precision=PREC)
            if DOWN_LORA:  # dAd_e += (s q_e)^T (w h): dc_j = w_j s q_e
                if DROPOUT:  # drop(h_j) without its 1 / (1 - p), applied to dAd at the end
                    b_h = tl.where(b_keep, b_h, 0.0)
                b_part_dad = tl.dot(
                    tl.trans(b_q), (b_w[:, None] * b_h).to(DOT_DT), acc=b_part_dad, input_precision=PREC
                )
        b_dbg = b_dbg + b_part_dbg if KCH == 1 else b_part_dbg
        b_dbu = b_dbu + b_part_dbu if KCH == 1 else b_part_dbu
        b_dad = b_dad + b_part_dad if KCH == 1 else b_part_dad

    o_ri = rows[:, None] * I + o_i[None, :]
    if GATE_LORA:
        tl.store(dbg_ptr + o_ri, b_dbg, mask=m_ri)
    if UP_LORA:
        tl.store(dbu_ptr + o_ri, b_dbu, mask=m_ri)
    if DOWN_LORA:
        if DROPOUT:
            b_dad = b_dad * drop_scale
        tl.store(dad_ptr + o_ri, b_dad, mask=m_ri)


def sorted_ffn_weight_grads(
    gate: Tensor | None,
    up: Tensor,
    grad_hbar: Tensor,
    weights: Tensor,
    ag: Tensor | None,
    au: Tensor | None,
    q: Tensor | None,
    bg: Tensor | None,
    bu: Tensor | None,
    ad: Tensor | None,
    sort: ExpertSort,
    E: int,
    R: int,
    scaling: float,
    act: str,
    dropout: LoraDropout | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The fused FFN's weight gradients per expert over its (token, slot) pairs: K = r per pair.

    gate, up, grad_hbar [T, I]; weights [T, k]; ag, au [T, >= N] fp32 (x's gate / up rank rows), q [T, N] fp32
    (dy_lora @ Bd_all), each None without that LoRA; bg, bu, ad [N, I] rows (expert, rank); sort: sort_by_expert
    of the indices. -> (dBg, dBu, dAd) [N, I] fp32, None where that LoRA is absent; an expert with no pairs
    gets zeros.
    """
    T, I = up.shape
    N = E * R
    K = weights.shape[1]
    present = {"bg": (ag, bg), "bu": (au, bu), "ad": (q, ad)}
    # every row of every present output is stored (an expert without pairs stores zeros): no memset
    new = torch.zeros if T == 0 else torch.empty
    outs = {n: new(N, I, dtype=torch.float32, device=up.device) if w is not None else None
            for n, (_, w) in present.items()}  # fmt: skip
    if T == 0 or all(o is None for o in outs.values()):
        return outs["bg"], outs["bu"], outs["ad"]
    g = gate if gate is not None else up
    rank = next(a for a, _ in present.values() if a is not None)
    bg_, bu_, ad_ = (w if w is not None else up for w in (bg, bu, ad))
    prec, dot_dt = _dot_mode(up.dtype)
    ffn_sorted_bwd_kernel_wgrad[lambda META: (triton.cdiv(I, META["BI"]), E)](
        g_ptr=g,
        u_ptr=up,
        dh_ptr=grad_hbar,
        weights_ptr=weights,
        order_ptr=sort.order,
        offsets_ptr=sort.offsets,
        ag_ptr=ag if ag is not None else rank,
        au_ptr=au if au is not None else rank,
        q_ptr=q if q is not None else rank,
        bg_ptr=bg_,
        bu_ptr=bu_,
        ad_ptr=ad_,
        dbg_ptr=outs["bg"] if outs["bg"] is not None else up,
        dbu_ptr=outs["bu"] if outs["bu"] is not None else up,
        dad_ptr=outs["ad"] if outs["ad"] is not None else up,
        I=I,
        N=N,
        R=R,
        scaling=scaling,
        stride_gt=g.stride(0),
        stride_gi=g.stride(1),
        stride_ut=up.stride(0),
        stride_ui=up.stride(1),
        stride_dht=grad_hbar.stride(0),
        stride_dhi=grad_hbar.stride(1),
        stride_wt=weights.stride(0),
        stride_wk=weights.stride(1),
        stride_at=(ag if ag is not None else au if au is not None else rank).stride(0),
        stride_bgn=bg_.stride(0),
        stride_bgi=bg_.stride(1),
        stride_bun=bu_.stride(0),
        stride_bui=bu_.stride(1),
        stride_adn=ad_.stride(0),
        stride_adi=ad_.stride(1),
        K=K,
        ACT=ACTIVATIONS[act],
        GATED=gate is not None,
        GATE_LORA=bg is not None,
        UP_LORA=bu is not None,
        DOWN_LORA=ad is not None,
        PREC=prec,
        DOT_DT=dot_dt,
        RB=max(16, triton.next_power_of_2(R)),
        T_BUCKET=t_bucket(T),
        **philox.kernel_args(dropout if ad is not None else None),  # only the down LoRA's input h_j is dropped
    )
    return outs["bg"], outs["bu"], outs["ad"]


def mixlora_ffn_sorted_core_bwd(
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
    """kernels.mixlora_ffn_bwd.mixlora_ffn_core_bwd in the combination-sorted regime: the gradients of (ua, gate,
    up, weights, gB, uB, dA); None for an absent input."""
    T, I = up.shape
    E, R = _experts(gB, uB, dA)
    N = E * R
    K = weights.shape[1]
    dev = up.device
    has_down = dA is not None and grad_zd is not None
    q = grad_zd.contiguous() if has_down else ua  # ua stands in, unread, without a down LoRA
    ag, au = _rank_views(ua, gB is not None, uB is not None, shared_a, N)
    dot_dt = _dot_mode(up.dtype)[1]
    bg, bu = _rows(gB, N, True, dot_dt, T), _rows(uB, N, True, dot_dt, T)
    ad = _rows(dA, N, False, dot_dt, T) if has_down else None
    sort = combo_sort(indices, weights, E, BLOCK_T)
    n_blocks = sort.rows.shape[0] // BLOCK_T

    # Per block of one combination: dG, dU, the rank-space gradients of the gate/up LoRA, d(weights).
    P = (gB is not None) + (uB is not None)
    S = _slices(n_blocks, triton.cdiv(I, NOMINAL_BI), 1, dev)
    da = torch.zeros(S, T, P * N, dtype=torch.float32, device=dev)
    dag, dau = (da[:, :, :N], da[:, :, N * (gB is not None) :]) if P else (da, da)
    dw = torch.empty(S, T, K, dtype=torch.float32, device=dev)
    grad_gate = torch.empty(T, I, dtype=gate.dtype, device=dev) if gate is not None else None
    grad_up = torch.empty(T, I, dtype=up.dtype, device=dev)
    ffn_sorted_bwd_kernel_rows[(n_blocks, S)](
        **_kernel_args(gate, up, sort, ag, au, bg, bu, ad, E, R, scaling, act, dropout),
        dh_ptr=grad_hbar,
        q_ptr=q,
        dg_ptr=grad_gate if gate is not None else grad_up,
        du_ptr=grad_up,
        dag_ptr=dag,
        dau_ptr=dau,
        dw_ptr=dw,
        S=S,
        stride_dht=grad_hbar.stride(0),
        stride_dhi=grad_hbar.stride(1),
        stride_das=da.stride(0),
        stride_dat=da.stride(1),
    )
    da = da.sum(0) if S > 1 else da[0]
    dw_canonical = dw.sum(0) if S > 1 else dw[0]
    grad_w = torch.empty_like(dw_canonical).scatter_(1, sort.slots, dw_canonical).to(weights.dtype)
    grad_ua = da[:, :N] + da[:, N:] if shared_a else da

    # Per expert over its (token, slot) pairs: the gradients of Bg, Bu and Ad as [N, I].
    dbg, dbu, dad = sorted_ffn_weight_grads(
        gate, up, grad_hbar, weights,
        ag if gB is not None else None, au if uB is not None else None, q if has_down else None,
        bg, bu, ad, sort_by_expert(indices, E), E, R, scaling, act, dropout,
    )  # fmt: skip
    grad_gB = dbg.view(E, R, I).transpose(1, 2).to(gB.dtype).contiguous() if dbg is not None else None
    grad_uB = dbu.view(E, R, I).transpose(1, 2).to(uB.dtype).contiguous() if dbu is not None else None
    grad_dA = dad.view(E, R, I).to(dA.dtype) if dad is not None else None
    if dA is not None and grad_dA is None:
        grad_dA = torch.zeros_like(dA)
    return grad_ua, grad_gate, grad_up, grad_w, grad_gB, grad_uB, grad_dA
