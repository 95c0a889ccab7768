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
- the expand y = Wd hbar + zd @ Bd_all is mixlora_ffn_shrink_expand.down_expand (moe_lora's kernel, K = E*r on
  the H side).
- backward (kernels/mixlora_ffn_sorted_bwd.py), q = dy @ Bd_all^T (down_expand_bwd: moe_lora's shrink), then
  `ffn_sorted_bwd_kernel_rows` per (block, slice of I): recomputes gg, uu and D = dhbar + s q_e Ad_e, writes
  dG, dU (summed over slots in registers), accumulates the rank-space gradients s dgg Bg_e^T, s duu Bu_e^T
  into [BT, k*r] tiles and <D, h> into dw;
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

This file: the tiles, the combination sort, the JIT block and slot helpers and the kernel arguments both
directions share (kernels/mixlora_ffn_sorted_bwd.py imports them), the forward kernel and its launcher
mixlora_ffn_sorted_core_fwd, and regime_fits. The shrink before and the expand after are
kernels/mixlora_ffn_shrink_expand.py's, as in the dense regime.
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
    dot_operand_dtype,
)
from moelora.kernels.moe_lora import autotune_list, t_bucket
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
