"""Triton `mixlora_ffn`, combination-sorted regime: each (token, slot) costs r rank columns, not E*r.

The dense-masked kernels (kernels/mixlora_ffn.py) run every slot's gate/up expand as a GEMM with K = E*r
whose other experts' columns are masked to zero: at E = 8, r = 16 that is 8x the useful work in every
expand, recompute and down shrink. Per token at H = 4096, I = 11008, k = 2 the three dense-masked kernels do
~79 MFLOP fwd + bwd (plus ~9 for the shrink, router and H-side expands) next to the frozen FFN's ~540: more
than the 10% the whole MixLoRA FFN may cost over a dense LoRA FFN. Here each slot's dots have K = r: ~12
MFLOP in the three kernels.

The sum over slots (hbar = sum_j w_j h_j forward; dG, dU backward) must stay in registers (no [T, k, I]
buffer, no atomics), so a block of tokens must share its experts: `combo_sort` sorts the tokens by their
combination of experts (each token's k experts in ascending order, unused slots last) and pads every
combination's run to a multiple of BT rows. A block then has one expert per canonical slot, read from
its first token; G, U and dG rows are gathered on load and scattered on store through the token ids.
Padding costs at most (number of combinations present) * (BT - 1) rows: with E = 8, k = 2 at most 45
combinations, at most 8% (about half that on average) at T = 8192 and BT = 16. The host bounds the
combinations by C(E + k, k), and the backend sends shapes whose padding could pass T rows (`regime_fits`)
to the dense kernels instead.

Kernels, in the order they run (ua = x's rank rows [T, P*E*r] fp32, from shrink_x or route_shrink):
- `ffn_sorted_fwd_kernel`: per (block, slice of I): for each slot, gg = G + s a_g,e Bg_e, uu likewise (K = r),
  h = act(gg) * uu, hbar += w h in registers, and the down shrink s w h Ad_e^T accumulated over the slice
  into a [BT, k*r] tile (slot j's columns hold its expert's r ranks), scattered to zd [T, E*r] at the end.
- the expand y = Wd hbar + zd @ Bd_all is mixlora_ffn.down_expand (moe_lora's kernel, K = E*r on the H side).
- backward, q = dy @ Bd_all^T (down_expand_bwd: moe_lora's shrink), then `ffn_sorted_bwd_kernel_rows` per (block, slice
  of I): recomputes gg, uu and D = dhbar + s q_e Ad_e, writes dG, dU (summed over slots in registers),
  accumulates the rank-space gradients s dgg Bg_e^T, s duu Bu_e^T into [BT, k*r] tiles and <D, h> into dw;
- `ffn_sorted_bwd_kernel_wgrad` (sorted_ffn_weight_grads): dBg, dBu, dAd per (block of I, expert), looping
  over the expert's contiguous (token, slot) pairs (kernels/moe_lora_sorted.sort_by_expert), K = r;
- grad_x, grad A: moe_lora's expand and wgrad on rank-space tensors, as in the dense regime.
Reductions over slices of I go through per-slice buffers summed in a fixed order: no atomics anywhere.
A token naming one expert in two slots (route never does) gets both slots' rank-space results summed in
the first such slot's columns. Token ids are int64, so gathered row offsets cannot overflow.
LoRA dropout of h_j as in the dense regime, its mask addressed by each canonical slot's original slot
(ComboSort.slots; the weight-gradient kernel's pairs carry it already).
Rank axis: a constexpr block RB >= 16 (tl.dot's K), masked, so r = 4 or 8 needs no padding in memory.
Dot operands as in the dense regime (16-bit with fp32 accumulate for 16-bit activations, ieee fp32 for
fp32), except that the down shrink rounds s w_j h_j (not h_j) to 16 bits: the same one rounding per operand.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from moelora.kernels import philox
from moelora.kernels._common import (
    ACTIVATIONS,
    NOMINAL_BI,
    _act,
    _dot_mode,
    _experts,
    _rank_views,
    _slices,
    _slot_act_grads,
    dot_operand_dtype,
)
from moelora.kernels.moe_lora import autotune_list, t_bucket
from moelora.kernels.moe_lora_sorted import ExpertSort, sort_by_expert
from torch import Tensor

from moelora.dropout import LoraDropout

# BT tokens of one combination per block, fixed: the combination sort pads each combination to it, and the
# padding grows with BT. BT=16, BI=64 at 4 warps is the tile without register spills in every 16-bit variant
# (sm_90, bench.compile_check: 88-188 registers); BT=32 spilled 8-690 B per thread.
BLOCK_T = 16
# The other tile sizes are autotuned on a GPU by bucketed T, the first entry pinned (the only one with
# MOELORA_TRITON_PIN_CONFIG=1); every entry is checked against the reference under the interpreter
# (tests/test_triton_configs.py) and on a GPU (bench.gpu_check's configs section).
# compile_check --all-configs (sm_90): in bf16 and fp16 none of these spills (BI=128 at 8 warps: 16-24 B with
# fp32 weights); BI=128 at 4 warps (16-64 B) and the weight gradients' BM=64/BI=128 (0.5 KB) did, left out.
BLOCK_TILES = [(64, 4), (64, 8), (128, 8)]  # (BI, warps) of the forward and rows backward
WGRAD_TILES = [(32, 64, 4), (64, 64, 4), (32, 128, 8), (64, 64, 8)]  # (BM pairs per step, BI, warps)
BLOCK_I_INTERPRET = 32  # under the interpreter: the tests' small I still spans several blocks
_TUNE_KEY = ["T_BUCKET", "I", "N", "K", "GATED", "GATE_LORA", "UP_LORA", "DOWN_LORA", "DOT_DT", "DROPOUT"]


def block_gpu_configs() -> list[triton.Config]:
    return [triton.Config({"BI": bi}, num_warps=w) for bi, w in BLOCK_TILES]


def wgrad_gpu_configs() -> list[triton.Config]:
    return [triton.Config({"BM": bm, "BI": bi}, num_warps=w) for bm, bi, w in WGRAD_TILES]


class ComboSort(NamedTuple):
    """Tokens sorted by their combination of experts, each combination padded to a multiple of BT rows.

    rows [P] int64: the token of each padded row, -1 for padding (P = a multiple of BT, from the shapes only);
    experts [T, k] int32: each token's experts in ascending order, E for an unused slot (the canonical slots);
    weights [T, k] fp32: the routing weights in the canonical slot order, 0 for an unused slot;
    slots [T, k] int64: the original slot of each canonical slot (to scatter d(weights) back).
    """

    rows: Tensor
    experts: Tensor
    weights: Tensor
    slots: Tensor


def max_combinations(E: int, k: int) -> int:
    """How many distinct canonical slot tuples there can be: multisets of k values from E experts + unused."""
    return math.comb(E + k, k)


def combo_sort(indices: Tensor, weights: Tensor, E: int, BT: int) -> ComboSort:
    """Sort the tokens of indices [T, k] by their expert combination, on the device, without a host sync."""
    T, k = indices.shape
    idx = indices.long()
    valid = (idx >= 0) & (idx < E)
    experts, slots = torch.where(valid, idx, E).sort(dim=1, stable=True)  # ascending, unused slots last
    w = torch.where(valid, weights.float(), 0.0).gather(1, slots)
    radix = (E + 1) ** torch.arange(k - 1, -1, -1, device=idx.device)
    key = (experts * radix).sum(1)  # [T] the combination, mixed radix E + 1
    key_sorted, order = key.sort(stable=True)
    pos = torch.arange(T, device=idx.device)
    first = torch.ones(T, dtype=torch.bool, device=idx.device)
    first[1:] = key_sorted[1:] != key_sorted[:-1]
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    run_start = torch.cummax(torch.where(first, pos, 0), dim=0).values
    pad = torch.where(last, (run_start - pos - 1) % BT, 0)  # at each run's last row: rows to the next block
    padded = pos + torch.cumsum(pad, 0) - pad  # every run starts on a block boundary
    P = triton.cdiv(T + min(T, max_combinations(E, k)) * (BT - 1), BT) * BT
    rows = torch.full((P,), -1, dtype=torch.int64, device=idx.device)
    rows[padded] = order
    return ComboSort(rows, experts.to(torch.int32), w, slots)


@triton.jit
def _block_tokens(rows_ptr, BT: tl.constexpr):
    """This program's token ids [BT] (-1 = padding) and its first token, which holds the block's experts (-1
    for a block past the last: the program returns)."""
    i_b = tl.program_id(0).to(tl.int64)
    b_tok = tl.load(rows_ptr + i_b * BT + tl.arange(0, BT))  # [BT] int64
    tok0 = tl.load(rows_ptr + i_b * BT)
    return b_tok, tok0


@triton.jit
def _first_slot(experts_ptr, tok0, e, K: tl.constexpr):
    """The first canonical slot of the block holding expert e: a token that names one expert in two slots gets
    both slots' rank-space results summed in that slot's columns (the dense regime and the reference add them)."""
    first = K
    for jj in tl.static_range(K):
        e_jj = tl.load(experts_ptr + tok0 * K + jj)
        first = tl.where((e_jj == e) & (first == K), jj, first)
    return first


@triton.jit
def _block_slots(experts_ptr, weights_ptr, tok0, b_tok, m_t, K: tl.constexpr, BK: tl.constexpr):
    """The block's slots, loaded once before its loop over I (they do not change along I): its canonical experts
    [BK] (E = unused slot), each slot's first slot with the same expert [BK] (_first_slot), and the tokens'
    canonical routing weights [BT, BK]. _slot picks slot j's out of them in registers."""
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_es = tl.load(experts_ptr + tok0 * K + o_k, mask=m_k, other=-1)  # [BK] int32
    same = (b_es[:, None] == b_es[None, :]) & m_k[None, :]  # [BK, BK]: slot jj (column) repeats slot j's expert
    b_first = tl.min(tl.where(same, o_k[None, :], K), axis=1)  # [BK]
    b_ws = tl.load(weights_ptr + b_tok[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
    return b_es, b_first, b_ws


@triton.jit
def _slot(b_es, b_first, b_ws, j, BK: tl.constexpr):
    """Slot j's expert, its first slot and its tokens' weights [BT], from _block_slots' registers."""
    o_k = tl.arange(0, BK)
    e = tl.sum(tl.where(o_k == j, b_es, 0))
    col = tl.sum(tl.where(o_k == j, b_first, 0))
    b_w = tl.sum(tl.where(o_k[None, :] == j, b_ws, 0.0), axis=1)
    return e, col, b_w


@triton.jit
def _slot_keep(seed, drop_threshold, slots_ptr, b_tok, m_t, j, o_i, K: tl.constexpr, I):
    """The dropout keep mask [BT, BI] of canonical slot j's h tile: the mask is defined on the original slots
    (element (t * K + slot) * I + i of stream H_STREAM), which slots_ptr [T, K] gives per canonical slot."""
    b_js = tl.load(slots_ptr + b_tok * K + j, mask=m_t, other=0)  # [BT] int64
    n = (b_tok * K + b_js)[:, None] * I + o_i.to(tl.int64)[None, :]
    return philox._keep(seed, philox.H_STREAM, n, drop_threshold)


@triton.jit
def _slot_expand(
    acc,  # [BT, BI] fp32
    a_ptr,  # [T, >= N] fp32 rank rows (column stride 1)
    stride_at,
    w_ptr,  # [N, I] rows (expert, rank)
    stride_wn,
    stride_wi,
    b_tok,  # [BT] int64, clamped to a valid row
    m_t,
    e,  # the slot's expert (scalar; E = unused)
    o_r,  # [RB]
    o_i,
    m_i,
    E,
    R,
    scaling,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
):
    """acc + s a[t, e*R:(e+1)*R] @ W[e*R:(e+1)*R, i-block]: one slot's LoRA expand with K = r (RB, masked)."""
    m_r = (o_r < R) & (tl.zeros_like(o_r) + e < E)  # [RB]; nothing for an unused slot (e = E)
    b_a = tl.load(
        a_ptr + b_tok[:, None] * stride_at + (e * R + o_r)[None, :], mask=m_t[:, None] & m_r[None, :], other=0.0
    )
    b_w = tl.load(
        w_ptr + (e * R + o_r).to(tl.int64)[:, None] * stride_wn + o_i[None, :] * stride_wi,
        mask=m_r[:, None] & m_i[None, :],
        other=0.0,
    )  # [RB, BI]
    return tl.dot((b_a * scaling).to(DOT_DT), b_w.to(DOT_DT), acc=acc, input_precision=PREC)


@triton.jit
def _slot_columns(w_ptr, stride_wn, stride_wi, col, e, o_i, m_i, o_c, E, R, RB: tl.constexpr, DOT_DT: tl.constexpr):
    """[BI, KR]: W[e*R + r, i-block]^T placed in the RB columns of canonical slot `col` (the first slot with expert
    e) of a k*RB-wide tile, zeros elsewhere: a dot with it adds one slot's r-column result into the block's
    [BT, KR] accumulator."""
    c_r = o_c % RB
    m_c = (o_c // RB == col) & (c_r < R) & (tl.zeros_like(o_c) + e < E)
    p = w_ptr + (e * R + c_r).to(tl.int64)[None, :] * stride_wn + o_i[:, None] * stride_wi
    return tl.load(p, mask=m_i[:, None] & m_c[None, :], other=0.0).to(DOT_DT)


@triton.jit
def _store_slot_columns(
    out_ptr, stride_ot, b_acc, b_tok, m_t, experts_ptr, tok0, o_c, E, R, RB: tl.constexpr, K: tl.constexpr
):
    """Scatter a [BT, KR] slot-column tile to out[t, e_j*R + r] (out [T, >= N] fp32, zero-initialised). Each
    (token, expert) is written once: a slot repeating an earlier slot's expert was summed into that slot's
    columns (_first_slot) and its own are not stored."""
    c_r = o_c % RB
    e_c = tl.zeros_like(o_c) + E
    for j in tl.static_range(K):
        e_j = tl.load(experts_ptr + tok0 * K + j)
        e_c = tl.where((o_c // RB == j) & (_first_slot(experts_ptr, tok0, e_j, K) == j), e_j, e_c)
    m_c = (c_r < R) & (e_c < E)
    p = out_ptr + b_tok[:, None] * stride_ot + (e_c * R + c_r)[None, :]
    tl.store(p, b_acc, mask=m_t[:, None] & m_c[None, :])


@triton.autotune(
    configs=autotune_list(block_gpu_configs(), triton.Config({"BI": BLOCK_I_INTERPRET}, num_warps=4)), key=_TUNE_KEY
)
@triton.jit
def ffn_sorted_fwd_kernel(
    g_ptr,  # [T, I] base G, read only when GATED
    u_ptr,  # [T, I] base U
    rows_ptr,  # [P] int64 token per padded row, -1 = padding
    experts_ptr,  # [T, K] int32 canonical experts (ascending; E = unused)
    weights_ptr,  # [T, K] fp32 canonical routing weights
    slots_ptr,  # [T, K] int64 the original slot of each canonical slot, read only when DROPOUT
    ag_ptr,  # [T, >= N] fp32 (row stride stride_at)
    au_ptr,
    bg_ptr,  # [N, I] gate B rows (expert, rank)
    bu_ptr,  # [N, I]
    ad_ptr,  # [N, I] down A
    hbar_ptr,  # [T, I] contiguous, U's dtype
    zd_ptr,  # [S, T, N] fp32 zero-initialised: this I-slice's share of zd, written only when DOWN_LORA
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
    KR: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    BI: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # grid: (padded blocks of BT tokens of one expert combination, slices of I)
    i_s = tl.program_id(1)
    b_tok, tok0 = _block_tokens(rows_ptr, BT)
    if tok0 < 0:  # past the last block
        return
    m_t = b_tok >= 0
    b_tok = tl.where(m_t, b_tok, tok0)  # padding rows read a real token, masked on store
    b_es, b_first, b_ws = _block_slots(experts_ptr, weights_ptr, tok0, b_tok, m_t, K, BK)
    o_r = tl.arange(0, RB)
    o_c = tl.arange(0, KR)
    n_ib = tl.cdiv(I, BI)
    per = tl.cdiv(n_ib, S)

    b_zd = tl.zeros([BT, KR], dtype=tl.float32)
    KCH: tl.constexpr = 1 if PREC == "ieee" else 1 << 30  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    ib_lo, ib_hi = i_s * per, tl.minimum(i_s * per + per, n_ib)
    for i_k in range(0, ib_hi - ib_lo if KCH == 1 else 1):
        b_part = tl.zeros([BT, KR], dtype=tl.float32) if KCH == 1 else b_zd
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
            b_hbar = tl.zeros([BT, BI], dtype=tl.float32)
            for j in range(0, K):
                # the block's expert in canonical slot j, where its rank-space columns go, its weights [BT]
                e, col, b_w = _slot(b_es, b_first, b_ws, j, BK)
                b_gg = b_g
                b_uu = b_u
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
                if GATED:  # noqa: SIM108 - a constexpr branch in a Triton kernel
                    b_h = _act(b_gg, ACT) * b_uu  # [BT, BI]
                else:
                    b_h = _act(b_uu, ACT)
                b_hbar += b_w[:, None] * b_h
                if DOWN_LORA:  # zd's slot-j columns += s w h Ad_e^T
                    b_ad = _slot_columns(ad_ptr, stride_adn, stride_adi, col, e, o_i, m_i, o_c, E, R, RB, DOT_DT)
                    if DROPOUT:  # the down LoRA reads drop(h_j), hbar h_j; 1 / (1 - p) goes on zd at the end
                        b_keep = _slot_keep(seed, drop_threshold, slots_ptr, b_tok, m_t, j, o_i, K, I)
                        b_h = tl.where(b_keep, b_h, 0.0)
                    b_hw = (b_w * scaling)[:, None] * b_h
                    b_part = tl.dot(b_hw.to(DOT_DT), b_ad, acc=b_part, input_precision=PREC)
            p_h = hbar_ptr + b_tok[:, None] * I + o_i[None, :]
            tl.store(p_h, b_hbar.to(hbar_ptr.dtype.element_ty), mask=m_ti)
        b_zd = b_zd + b_part if KCH == 1 else b_part
    if DOWN_LORA:
        if DROPOUT:
            b_zd = b_zd * drop_scale
        zd_s = zd_ptr + i_s.to(tl.int64) * T * N
        _store_slot_columns(zd_s, N, b_zd, b_tok, m_t, experts_ptr, tok0, o_c, E, R, RB, K)


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


def regime_fits(T: int, E: int, k: int) -> bool:
    """Whether the combination sort's padding stays within T rows (at most one padded block per combination
    present): then the sorted kernels do k*r rank work per token where the dense-masked ones do k*E*r."""
    return min(T, max_combinations(E, k)) * (BLOCK_T - 1) <= T


def _kernel_args(
    gate: Tensor | None,
    up: Tensor,
    sort: ComboSort,
    ag: Tensor,
    au: Tensor,
    bg: Tensor | None,
    bu: Tensor | None,
    ad: Tensor | None,
    E: int,
    R: int,
    scaling: float,
    act: str,
    dropout: LoraDropout | None = None,
) -> dict:
    """The arguments the two block kernels share; an absent tensor is replaced by `up` (never read). dropout: h_j's
    seeded mask before the down LoRA (stream H_STREAM, on the original slots)."""
    T, I = up.shape
    K = sort.experts.shape[1]
    g = gate if gate is not None else up
    bg_, bu_, ad_ = (w if w is not None else up for w in (bg, bu, ad))
    prec, dot_dt = _dot_mode(up.dtype)
    RB = max(16, triton.next_power_of_2(R))
    return dict(
        g_ptr=g,
        u_ptr=up,
        rows_ptr=sort.rows,
        experts_ptr=sort.experts,
        weights_ptr=sort.weights,
        slots_ptr=sort.slots,
        ag_ptr=ag,
        au_ptr=au,
        bg_ptr=bg_,
        bu_ptr=bu_,
        ad_ptr=ad_,
        T=T,
        I=I,
        E=E,
        N=E * R,
        R=R,
        scaling=scaling,
        stride_gt=g.stride(0),
        stride_gi=g.stride(1),
        stride_ut=up.stride(0),
        stride_ui=up.stride(1),
        stride_at=ag.stride(0),
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
        RB=RB,
        KR=triton.next_power_of_2(K * RB),
        BK=triton.next_power_of_2(K),
        BT=BLOCK_T,
        T_BUCKET=t_bucket(T),
        **philox.kernel_args(dropout if ad is not None else None),  # only the down LoRA's input h_j is dropped
    )


def _rows(w: Tensor | None, N: int, transpose: bool, dot_dt: tl.dtype, T: int) -> Tensor | None:
    """A per-expert LoRA weight as [N = E*R, I] rows (expert, rank), so that a slot's r rows are one strided
    block: Ad [E, R, I] as it comes (a view when contiguous and kept in its dtype), B [E, I, R]
    (transpose=True) through a copy of its E*R*I elements (2.8 MB at I = 11008, E = 8, r = 16 in bf16, next
    to the [T, I] activations); in mixlora_ffn.dot_operand_dtype, rounded in that same copy."""
    if w is None:
        return None
    src = w.transpose(1, 2) if transpose else w
    dt = dot_operand_dtype(w, dot_dt, T)
    if dt == w.dtype:
        return src.reshape(N, -1)
    return torch.empty(src.shape, dtype=dt, device=w.device).copy_(src).view(N, -1)


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


def mixlora_ffn_sorted_core_fwd(
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
) -> tuple[Tensor, Tensor]:
    """kernels.mixlora_ffn.mixlora_ffn_core_fwd in the combination-sorted regime: same arguments, same results.

    ua [T, P*E*r] fp32 -> hbar [T, I] in up's dtype, zd [T, E*r] fp32 ([T, 0] without a down LoRA).
    """
    T, I = up.shape
    E, R = _experts(gB, uB, dA)
    N = E * R
    if T == 0:
        return up.new_empty(0, I), up.new_empty(0, N if dA is not None else 0, dtype=torch.float32)
    ag, au = _rank_views(ua, gB is not None, uB is not None, shared_a, N)
    sort = combo_sort(indices, weights, E, BLOCK_T)
    n_blocks = sort.rows.shape[0] // BLOCK_T
    S = _slices(n_blocks, triton.cdiv(I, NOMINAL_BI), 1, up.device)
    hbar = torch.empty(T, I, dtype=up.dtype, device=up.device)
    zd_part = torch.zeros(S, T, N if dA is not None else 0, dtype=torch.float32, device=up.device)
    dot_dt = _dot_mode(up.dtype)[1]
    bg, bu, ad = _rows(gB, N, True, dot_dt, T), _rows(uB, N, True, dot_dt, T), _rows(dA, N, False, dot_dt, T)
    ffn_sorted_fwd_kernel[(n_blocks, S)](
        **_kernel_args(gate, up, sort, ag, au, bg, bu, ad, E, R, scaling, act, dropout),
        hbar_ptr=hbar,
        zd_ptr=zd_part if dA is not None else hbar,
        S=S,
    )  # fmt: skip
    zd = zd_part.sum(0) if S > 1 else zd_part[0]
    return hbar, zd


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
    """kernels.mixlora_ffn.mixlora_ffn_core_bwd in the combination-sorted regime: the gradients of (ua, gate,
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
