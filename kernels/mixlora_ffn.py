"""Triton `mixlora_ffn`: MixLoRA's FFN from the frozen base's G = Wg x and U = Wu x, never materialising [T, k, I].

For token t, slot j, expert e = indices[t, j] (design.md, op 3):

    h_j   = act(G + s Bg_e Ag_e x) * (U + s Bu_e Au_e x)          (ungated, gate None: act(U + s Bu_e Au_e x))
    hbar  = sum_j w_j h_j                                           [T, I], written in U's dtype
    zd    = sum_j w_j s [Ad_e h_j in expert e's r columns]          [T, E*r] fp32, the down-LoRA shrink
    y_lora = zd @ Bd_all                                            [T, H]

The caller runs the frozen down projection once on hbar and adds y_lora: y = Wd hbar + y_lora (down_expand
does the add in the expand's epilogue).

Kernels, in the order they run:
- `mixlora_ffn_fwd_kernel_shrink` (shrink_x): ua = x @ [Ag_all | Au_all]^T, [T, P*E*r] fp32, one read of x per
  128 rank columns; or, with the router, `moelora.kernels.route.route_shrink_fwd` (one read of x in all).
  Phi-3's gate and up share one A: ua has one block then, read by both (shared_a).
- `mixlora_ffn_fwd_kernel`: per (token block, slice of I): the gate/up LoRA expand of each slot as a
  dense-masked GEMM with K = E*r (the slot's expert keeps its r columns of ua, the others are masked to 0,
  so one tile of B_all serves every token whatever its expert), activation, product, the weighted sum into
  hbar in registers, and the down shrink of each h_j, accumulated over the slice into zd.
- `down_expand`: y = Wd hbar + zd @ Bd_all (moe_lora's expand kernel, K = E*r, with Wd hbar added before its one
  rounding), once the caller has run the frozen Wd on hbar; without Wd hbar, the fp32 delta y_lora alone.
The part after the shrink is mixlora_ffn_core_fwd / _bwd (from ua to hbar and zd; the triton backend's op), then
down_expand / down_expand_bwd; the shrink's backward is shrink_x_bwd (grad_x, grad A from the rank-space
gradient of ua).
Backward, recomputing h (two more expand GEMMs of K = E*r per slot) instead of storing [T, k, I]:
- q = dy_lora @ Bd_all^T [T, E*r] (moe_lora's shrink kernel, in down_expand_bwd, with grad Bd), then
- `mixlora_ffn_bwd_kernel_rows`: grid over (token block, slice of I); the reductions over I: rank-space
  gradients of the gate/up LoRA [T, P*E*r] and of the routing weights [T, k]; writes dG and dU.
- `mixlora_ffn_bwd_kernel_cols`: grid over (block of I, slice of tokens); the reductions over T: the
  gradients of Bg, Bu and Ad.
- grad_x, grad Ag/Au and grad Bd are moe_lora's expand and wgrad kernels on rank-space tensors.

Reductions across programs (over the slices of I, or of T) go through per-slice partial buffers summed by
torch in a fixed order: no atomics anywhere, forward or backward, so results are deterministic. The slice
count is chosen from the shapes alone (enough programs to fill the device at decode sizes), no host sync.

Dot precision: with 16-bit activations every `tl.dot` takes 16-bit operands (LoRA weights and fp32
rank-space values rounded to the activation dtype, fp32 accumulate: tensor cores); with fp32 activations,
ieee fp32 dots. The down LoRA's expand and its backward (moe_lora's helpers, on fp32 rank-space values and
gradients) and the route_shrink backward keep fp32 operands: "tf32x3" for 16-bit activations
(moe_lora.fp32_dot_precision). Under the interpreter, bf16 dots are computed in fp32 (the interpreter's bf16 math is
broken). Elementwise math (activation, product, weighted sum, gradients) is fp32. The rank axis only
reaches `tl.dot` through the flat E*r axis tiled by constexpr blocks >= 16, so r = 4 or 8 needs no padding.
Expert ranks beyond one block of RANK_CHUNK columns (E*r > 128) are split over a third grid axis, each
program recomputing h for its chunk: correct, but wasteful at large E*r.

LoRA dropout (DROPOUT constexpr; kernels/philox.py): the shrink reads x through its seeded mask, the forward
kernel's down shrink reads h_j through its own (hbar sums the undropped h_j), 1 / (1 - p) multiplies the
accumulated result once; the backward regenerates both masks (grad_x of the LoRA path and grad A in
moe_lora's expand and wgrad kernels, dAd and the down path's share of D_j here). Without dropout every kernel
compiles as before (bench.compile_check: same registers and spills).

This is the dense-masked regime: every slot pays E*r rank columns for its r. kernels/mixlora_ffn_sorted.py
(tokens sorted by their combination of experts) pays r; the triton backend picks between them by shape
(moelora.triton_backend.ffn_regime, or MOELORA_FFN_REGIME).

Launchers only (shrink_x, mixlora_ffn_core_fwd / _bwd, down_expand / down_expand_bwd; shapes in their
docstrings), the shared A of gate and up (stack_gate_up_a) and check_inputs. The ops (rank_shrink,
mixlora_ffn, down_expand and their backward), their fake kernels and autograd are moelora.triton_backend's;
its mixlora_ffn and routed_mixlora_ffn run them. The JIT helpers shared with the sorted regime and route.py
(activations, dot modes, slicing) are kernels/_common.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moelora.kernels import philox
from moelora.kernels._common import (
    ACTIVATIONS,
    NOMINAL_BI,
    NOMINAL_BT,
    _act,
    _dot_mode,
    _experts,
    _interpreting,
    _rank_views,
    _slices,
    _slot_act_grads,
    dot_operand,
)
from moelora.kernels.moe_lora import (
    _a_strides,
    _b_strides,
    _expand,
    _shrink,
    _wgrad,
    autotune_list,
    fp32_dot_precision,
    t_bucket,
)
from torch import Tensor

from moelora.dropout import LoraDropout

RANK_CHUNK = 128  # rank-space columns one program accumulates in registers ([BT, 128] fp32 per target)
EXPAND_BLOCK_N = 64  # K-block of the dense-masked expand GEMMs
SHRINK_BLOCK_T = 32
SHRINK_BLOCK_N = 128
SHRINK_BLOCK_D = 64

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _configs() -> list[triton.Config]:
    """Tile configs of the three fused kernels. One pinned config under the interpreter (a multi-config
    autotune crashes it) or with MOELORA_TRITON_PIN_CONFIG=1; small tiles there so that the tests cross
    block boundaries. Autotuned on a GPU once, untuned beyond this list: dense-masked, the whole MixLoRA FFN
    took 28.2 ms fwd+bwd at T=8192 on an H200 (the sorted regime 14.5), 3.28 ms at T=32.

    Register pressure, from `python -m bench.compile_check --all-configs` (sm_90, bf16, specialised as the
    launcher does): BT=16, BI=64 at 8 warps (last entry) spills nothing in the forward and the rows
    backward and 0-24 B in the cols backward; BT=32, BI=64 at 4 warps spills 32-120 B (forward), 48-456 B
    (rows) and 0.5-1.5 KB (cols); BT=64 spills more (cols up to 2.7 KB at 4 warps). Which config wins
    despite the spills is for the GPU's autotuner to say."""
    return autotune_list(gpu_configs(), interpreted=triton.Config({"BT": 32, "BI": 32}, num_warps=4))


# (64, 128, 8) at 3 stages wanted 232-280 KB of shared memory in the rows backward (and the forward with
# fp32 weights), over the H100/H200's 227 KB (bench.compile_check --all-configs): 2 stages.
FFN_TILES = [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (16, 64, 4, 2), (16, 64, 8, 2)]


def gpu_configs() -> list[triton.Config]:
    """The fused kernels' GPU tiles (BT, BI, warps, stages), the pinned one first (see _configs)."""
    return [triton.Config({"BT": bt, "BI": bi}, num_warps=w, num_stages=st) for bt, bi, w, st in FFN_TILES]


_TUNE_KEY = ["T_BUCKET", "I", "N", "K", "GATED", "GATE_LORA", "UP_LORA", "DOWN_LORA", "DOT_DT", "DROPOUT"]


@triton.jit
def _h_keep(seed, drop_threshold, o_t, j, o_i, K: tl.constexpr, I):
    """The dropout keep mask [BT, BI] of h_j's tile: element (t * K + j) * I + i of stream H_STREAM; o_t and
    o_i int64."""
    return philox._keep(seed, philox.H_STREAM, (o_t[:, None] * K + j) * I + o_i[None, :], drop_threshold)


@triton.jit
def _slot_pre(
    b_g,  # [BT, BI] fp32 base G (ignored unless GATE_LORA)
    b_u,  # [BT, BI] fp32 base U
    ag_ptr,  # [T, N] fp32 rank-space rows x @ Ag_all^T (column stride 1)
    au_ptr,  # [T, N] fp32: x @ Au_all^T
    stride_at,
    bg_ptr,  # [E, I, R] through strides
    stride_bge,
    stride_bgi,
    stride_bgr,
    bu_ptr,  # [E, I, R]
    stride_bue,
    stride_bui,
    stride_bur,
    o_t,
    m_t,
    b_e,  # [BT] the slot's expert per token
    o_i,
    m_i,
    N,
    R,
    scaling,
    GATE_LORA: tl.constexpr,
    UP_LORA: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
):
    """The slot's pre-activation gate and up rows, G + s Bg_e (Ag_e x) and U + s Bu_e (Au_e x), [BT, BI] fp32.

    Dense-masked: sum_n [n // R == e_t] a[t, n] B[n // R, i, n % R] over all N = E*R columns, so that one
    tile of B_all serves every token whatever its expert."""
    b_gg = b_g
    b_uu = b_u
    for i_n in range(0, tl.cdiv(N, BN)):
        o_n = i_n * BN + tl.arange(0, BN)  # [BN]
        m_n = o_n < N
        e_n = o_n // R
        m_sel = m_t[:, None] & m_n[None, :] & (e_n[None, :] == b_e[:, None])  # [BT, BN]
        o_tn = o_t[:, None] * stride_at + o_n[None, :]
        m_ni = m_n[:, None] & m_i[None, :]
        if GATE_LORA:
            b_a = tl.load(ag_ptr + o_tn, mask=m_sel, other=0.0) * scaling  # [BT, BN]
            p_b = bg_ptr + e_n.to(tl.int64)[:, None] * stride_bge + (o_n % R).to(tl.int64)[:, None] * stride_bgr
            b_b = tl.load(p_b + o_i[None, :] * stride_bgi, mask=m_ni, other=0.0)  # [BN, BI]
            b_gg = tl.dot(b_a.to(DOT_DT), b_b.to(DOT_DT), acc=b_gg, input_precision=PREC)
        if UP_LORA:
            b_a = tl.load(au_ptr + o_tn, mask=m_sel, other=0.0) * scaling
            p_b = bu_ptr + e_n.to(tl.int64)[:, None] * stride_bue + (o_n % R).to(tl.int64)[:, None] * stride_bur
            b_b = tl.load(p_b + o_i[None, :] * stride_bui, mask=m_ni, other=0.0)
            b_uu = tl.dot(b_a.to(DOT_DT), b_b.to(DOT_DT), acc=b_uu, input_precision=PREC)
    return b_gg, b_uu


@triton.jit
def mixlora_ffn_fwd_kernel_shrink(
    x_ptr,  # [T, D]
    w_ptr,  # [E', R, D] through strides (expert, rank, column): Ag, Au or both stacked
    out_ptr,  # [T, N] fp32 contiguous, N = E' * R
    T,
    D,
    N,
    R,
    stride_xt,
    stride_xd,
    stride_we,
    stride_wr,
    stride_wd,
    seed,  # LoRA dropout of x (kernels/philox.py, stream X_STREAM), read only when DROPOUT
    drop_threshold,
    drop_scale,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
    DOT_DT: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    i_t, i_n = tl.program_id(0), tl.program_id(1)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
    o_n = i_n * BN + tl.arange(0, BN)  # [BN]
    m_t = o_t < T
    m_n = o_n < N
    p_w = w_ptr + (o_n // R).to(tl.int64) * stride_we + (o_n % R).to(tl.int64) * stride_wr  # [BN]
    b_acc = tl.zeros([BT, BN], dtype=tl.float32)
    KCH: tl.constexpr = 1 if PREC == "ieee" else 1 << 30  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    n_d = tl.cdiv(D, BD)
    for i_k in range(0, n_d if KCH == 1 else 1):
        b_part = tl.zeros([BT, BN], dtype=tl.float32) if KCH == 1 else b_acc
        for i_d in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_d)):
            o_d = (i_d * BD + tl.arange(0, BD)).to(tl.int64)
            m_d = o_d < D
            b_x = tl.load(
                x_ptr + o_t[:, None] * stride_xt + o_d[None, :] * stride_xd, mask=m_t[:, None] & m_d[None, :], other=0.0
            )  # [BT, BD]
            b_w = tl.load(
                p_w[None, :] + o_d[:, None] * stride_wd, mask=m_d[:, None] & m_n[None, :], other=0.0
            )  # [BD, BN]
            if DROPOUT:  # drop(x) without its 1 / (1 - p), applied to the sum below
                b_keep = philox._keep(seed, philox.X_STREAM, o_t[:, None] * D + o_d[None, :], drop_threshold)
                b_x = tl.where(b_keep, b_x, 0.0)
            b_part = tl.dot(b_x.to(DOT_DT), b_w.to(DOT_DT), acc=b_part, input_precision=PREC)
        b_acc = b_acc + b_part if KCH == 1 else b_part
    if DROPOUT:
        b_acc = b_acc * drop_scale
    tl.store(out_ptr + o_t[:, None] * N + o_n[None, :], b_acc, mask=m_t[:, None] & m_n[None, :])


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def mixlora_ffn_fwd_kernel(
    g_ptr,  # [T, I] base G, read only when GATED
    u_ptr,  # [T, I] base U
    weights_ptr,  # [T, K] routing weights
    indices_ptr,  # [T, K] int, -1 = unused slot
    ag_ptr,  # [T, N] fp32 (row stride stride_at): x @ Ag_all^T, read only when GATE_LORA
    au_ptr,  # [T, N] fp32: x @ Au_all^T, read only when UP_LORA
    bg_ptr,  # [E, I, R] gate B
    bu_ptr,  # [E, I, R] up B
    ad_ptr,  # [E, R, I] down A
    hbar_ptr,  # [T, I] contiguous, U's dtype
    zd_ptr,  # [S, T, N] fp32 contiguous: this I-slice's share of zd, written only when DOWN_LORA
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
    # grid: (token blocks, slices of I, chunks of the E*R rank columns of zd)
    i_t, i_s, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
    m_t = o_t < T
    o_c = i_c * NC + tl.arange(0, NC)  # [NC] this program's rank columns of zd
    m_c = o_c < N
    e_c = o_c // R
    # chunk 0 writes hbar; other chunks recompute it for their zd columns only ([BT] so that masks broadcast)
    m_first = m_t & (tl.zeros([BT], dtype=tl.int32) + i_c == 0)
    n_ib = tl.cdiv(I, BI)
    per = tl.cdiv(n_ib, S)

    b_zd = tl.zeros([BT, NC], dtype=tl.float32)
    for i_b in range(i_s * per, tl.minimum(i_s * per + per, n_ib)):
        o_i = (i_b * BI + tl.arange(0, BI)).to(tl.int64)  # [BI]
        m_i = o_i < I
        m_ti = m_t[:, None] & m_i[None, :]
        b_u = tl.load(u_ptr + o_t[:, None] * stride_ut + o_i[None, :] * stride_ui, mask=m_ti, other=0.0).to(tl.float32)
        b_g = b_u
        if GATED:
            b_g = tl.load(g_ptr + o_t[:, None] * stride_gt + o_i[None, :] * stride_gi, mask=m_ti, other=0.0)
            b_g = b_g.to(tl.float32)
        if DOWN_LORA:
            p_ad = ad_ptr + e_c.to(tl.int64)[None, :] * stride_ade + (o_c % R).to(tl.int64)[None, :] * stride_adr
            b_ad = tl.load(p_ad + o_i[:, None] * stride_adi, mask=m_i[:, None] & m_c[None, :], other=0.0)  # [BI, NC]
        b_hbar = tl.zeros([BT, BI], dtype=tl.float32)
        for j in range(0, K):
            b_e = tl.load(indices_ptr + o_t * stride_it + j * stride_ik, mask=m_t, other=-1)  # [BT]
            # int32 for the [BT, N] compares against the column's expert (int64 there cost registers: sm_90
            # compile_check); an out-of-range id becomes -1 first, so that it cannot wrap onto an expert
            b_e = tl.where((b_e >= 0) & (b_e < E), b_e, -1).to(tl.int32)
            b_w = tl.load(weights_ptr + o_t * stride_wt + j * stride_wk, mask=m_t, other=0.0).to(tl.float32)
            b_w = tl.where((b_e >= 0) & (b_e < E), b_w, 0.0)  # an unused slot adds nothing, whatever its weight
            b_gg, b_uu = _slot_pre(
                b_g, b_u, ag_ptr, au_ptr, stride_at,
                bg_ptr, stride_bge, stride_bgi, stride_bgr, bu_ptr, stride_bue, stride_bui, stride_bur,
                o_t, m_t, b_e, o_i, m_i, N, R, scaling, GATE_LORA, UP_LORA, BN, PREC, DOT_DT,
            )  # fmt: skip
            if GATED:  # noqa: SIM108 - a constexpr branch in a Triton kernel
                b_h = _act(b_gg, ACT) * b_uu  # [BT, BI]
            else:
                b_h = _act(b_uu, ACT)
            b_hbar += b_w[:, None] * b_h
            if DOWN_LORA:
                if DROPOUT:  # the down LoRA reads drop(h_j), hbar h_j; 1 / (1 - p) goes on zd at the end
                    b_h = tl.where(_h_keep(seed, drop_threshold, o_t, j, o_i, K, I), b_h, 0.0)
                b_sel = tl.where(e_c[None, :] == b_e[:, None], b_w[:, None] * scaling, 0.0)  # [BT, NC]
                b_zd += b_sel * tl.dot(b_h.to(DOT_DT), b_ad.to(DOT_DT), input_precision=PREC)
        p_h = hbar_ptr + o_t[:, None] * I + o_i[None, :]
        tl.store(p_h, b_hbar.to(hbar_ptr.dtype.element_ty), mask=m_first[:, None] & m_i[None, :])
    if DOWN_LORA:
        if DROPOUT:
            b_zd = b_zd * drop_scale
        p_zd = zd_ptr + i_s.to(tl.int64) * T * N + o_t[:, None] * N + o_c[None, :]
        tl.store(p_zd, b_zd, mask=m_t[:, None] & m_c[None, :])


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


def _rank_chunk(N: int) -> int:
    return min(RANK_CHUNK, max(16, triton.next_power_of_2(N)))


def _expand_block(N: int) -> int:
    """K-block of the dense-masked expands; all of N at once under the interpreter (fewer, larger numpy ops)."""
    n = max(16, triton.next_power_of_2(N))
    return n if _interpreting() else min(EXPAND_BLOCK_N, n)


def shrink_x(x: Tensor, A: Tensor, dropout: LoraDropout | None = None) -> Tensor:
    """ua = x [T, D] @ A_all^T with A [E', R, D] (gate and up experts stacked: E' = P*E) -> [T, E'*R] fp32;
    with dropout, drop(x) @ A_all^T (x's seeded mask, stream X_STREAM).

    One program holds up to SHRINK_BLOCK_N rank columns; with more (MixLoRA gate + up at E=8, r=16 is 256)
    x is read once per SHRINK_BLOCK_N columns. `moelora.kernels.route.route_shrink_fwd` reads it once for
    the router and all 256 columns together.
    """
    T, D = x.shape
    R = A.shape[1]
    N = A.shape[0] * R
    out = torch.empty(T, N, dtype=torch.float32, device=x.device)
    if N == 0 or T == 0:
        return out
    prec, dot_dt = _dot_mode(x.dtype)
    A = dot_operand(A, dot_dt, T)
    BN = min(SHRINK_BLOCK_N, max(16, triton.next_power_of_2(N)))
    mixlora_ffn_fwd_kernel_shrink[(triton.cdiv(T, SHRINK_BLOCK_T), triton.cdiv(N, BN))](
        x_ptr=x,
        w_ptr=A,
        out_ptr=out,
        T=T,
        D=D,
        N=N,
        R=R,
        stride_xt=x.stride(0),
        stride_xd=x.stride(1),
        stride_we=A.stride(0),
        stride_wr=A.stride(1),
        stride_wd=A.stride(2),
        BT=SHRINK_BLOCK_T,
        BN=BN,
        BD=SHRINK_BLOCK_D,
        PREC=prec,
        DOT_DT=dot_dt,
        num_warps=4,
        **philox.kernel_args(dropout),
    )
    return out


def shrink_x_bwd(
    grad_ua: Tensor,
    x: Tensor,
    A: Tensor,
    grad_x_base: Tensor | None = None,
    dropout: LoraDropout | None = None,
) -> tuple[Tensor, Tensor]:
    """The backward of shrink_x: grad_x = grad_x_base + grad_ua @ A_all [T, D] (x's dtype, one rounding;
    grad_x_base [T, D] any float dtype: another use of x's gradient, e.g. the router's), grad_A = grad_ua^T @ x
    (A's dtype). With the forward's dropout: grad_ua @ A_all through x's mask and 1 / (1 - p) (grad_x_base
    not), grad_A = grad_ua^T @ drop(x)."""
    R = A.shape[1]
    grad_ua = grad_ua.contiguous()
    prec = fp32_dot_precision(x.dtype)
    grad_x = _expand(grad_ua, A, _a_strides(A), R, x.shape[1], x.dtype, prec, grad_x_base, dropout)
    grad_A = _wgrad(grad_ua, x, _new(A), _a_strides(A), R, prec, dropout)
    return grad_x, grad_A


def _common_args(
    gate: Tensor | None,
    up: Tensor,
    weights: Tensor,
    indices: Tensor,
    ag: Tensor,
    au: Tensor,
    gB: Tensor | None,
    uB: Tensor | None,
    dA: Tensor | None,
    E: int,
    R: int,
    scaling: float,
    act: str,
    dropout: LoraDropout | None = None,
) -> dict:
    """The arguments the three fused kernels share. An absent tensor is replaced by `up` (never read: its
    constexpr flag is off) with strides 0. dropout: h_j's seeded mask before the down LoRA (stream H_STREAM)."""
    T, I = up.shape
    g = gate if gate is not None else up
    prec, dot_dt = _dot_mode(up.dtype)
    gB, uB, dA = (dot_operand(w, dot_dt, T) for w in (gB, uB, dA))
    bg = gB if gB is not None else up.new_empty(1, 1, 1)
    bu = uB if uB is not None else up.new_empty(1, 1, 1)
    ad = dA if dA is not None else up.new_empty(1, 1, 1)
    N = E * R
    return dict(
        g_ptr=g,
        u_ptr=up,
        weights_ptr=weights,
        indices_ptr=indices,
        ag_ptr=ag,
        au_ptr=au,
        bg_ptr=bg,
        bu_ptr=bu,
        ad_ptr=ad,
        T=T,
        I=I,
        E=E,
        N=N,
        R=R,
        scaling=scaling,
        stride_gt=g.stride(0),
        stride_gi=g.stride(1),
        stride_ut=up.stride(0),
        stride_ui=up.stride(1),
        stride_wt=weights.stride(0),
        stride_wk=weights.stride(1),
        stride_it=indices.stride(0),
        stride_ik=indices.stride(1),
        stride_at=ag.stride(0),
        stride_bge=bg.stride(0),
        stride_bgi=bg.stride(1),
        stride_bgr=bg.stride(2),
        stride_bue=bu.stride(0),
        stride_bui=bu.stride(1),
        stride_bur=bu.stride(2),
        stride_ade=ad.stride(0),
        stride_adr=ad.stride(1),
        stride_adi=ad.stride(2),
        T_BUCKET=t_bucket(T),
        K=weights.shape[1],
        ACT=ACTIVATIONS[act],
        GATED=gate is not None,
        GATE_LORA=gB is not None,
        UP_LORA=uB is not None,
        DOWN_LORA=dA is not None,
        PREC=prec,
        DOT_DT=dot_dt,
        BN=_expand_block(N),
        NC=_rank_chunk(N),
        **philox.kernel_args(dropout if dA is not None else None),  # only the down LoRA's input h_j is dropped
    )


def _new(like: Tensor) -> Tensor:
    """A contiguous uninitialised tensor like `like`: every gradient leaves contiguous, as the fake kernels say."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def stack_gate_up_a(gA: Tensor | None, uA: Tensor | None) -> tuple[Tensor | None, bool]:
    """The A of shrink_x / route_shrink: gate's and up's stacked [P*E, R, H] (a differentiable cat), the one A
    they share (gA is uA: phi-3's fused gate_up_proj, shrunk once), or None without either; and whether shared."""
    if gA is not None and uA is not None:
        return (gA, True) if gA is uA else (torch.cat([gA, uA]), False)
    return (gA if gA is not None else uA), False


def mixlora_ffn_core_fwd(
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
    """mixlora_ffn from the gate/up rank-space rows ua (shrink_x or route_shrink) to the down LoRA's shrink.

    ua [T, P*E*r] fp32: the gate block then the up block (one block for both when shared_a), [T, 0] without
    gate and up LoRAs. -> hbar [T, I] in up's dtype and zd [T, E*r] fp32 ([T, 0] without a down LoRA), the
    down LoRA's weighted rank-space rows: its delta is down_expand(zd, dB), added to Wd hbar by the caller.
    dropout: the down LoRA reads drop(h_j) (moelora.dropout, stream H_STREAM, element (t * k + j) * I + i);
    hbar sums the undropped h_j.
    """
    T, I = up.shape
    E, R = _experts(gB, uB, dA)
    N = E * R
    ag, au = _rank_views(ua, gB is not None, uB is not None, shared_a, N)
    hbar = torch.empty(T, I, dtype=up.dtype, device=up.device)
    chunks = triton.cdiv(N, _rank_chunk(N)) if dA is not None else 1
    S = _slices(triton.cdiv(T, NOMINAL_BT), triton.cdiv(I, NOMINAL_BI), chunks, up.device)
    zd_part = torch.empty(S, T, N if dA is not None else 0, dtype=torch.float32, device=up.device)
    mixlora_ffn_fwd_kernel[lambda META: (triton.cdiv(T, META["BT"]), S, chunks)](
        **_common_args(gate, up, weights, indices, ag, au, gB, uB, dA, E, R, scaling, act, dropout),
        hbar_ptr=hbar,
        zd_ptr=zd_part if dA is not None else hbar,
        S=S,
    )
    zd = zd_part.sum(0) if S > 1 else zd_part[0]  # fixed-order sum over the I-slices: deterministic
    return hbar, zd


def down_expand(zd: Tensor, dB: Tensor, base: Tensor | None, activation_dtype: torch.dtype) -> Tensor:
    """The down LoRA's delta zd @ Bd_all (zd [T, E*r] fp32, dB [E, H, r]) added to base [T, H] (Wd hbar, any
    float dtype and strides) in fp32 and rounded once to base's dtype, as the reference rounds Wd hbar + delta:
    one pass over [T, H] where a separate fp32 delta, its add and the cast made four. Without base: the delta
    alone, fp32 [T, H]."""
    R = dB.shape[2]
    dtype = base.dtype if base is not None else torch.float32
    return _expand(zd, dB, _b_strides(dB), R, dB.shape[1], dtype, fp32_dot_precision(activation_dtype), base)


def down_expand_bwd(grad_y: Tensor, zd: Tensor, dB: Tensor, activation_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The backward of down_expand in zd and dB: q = grad_y @ Bd_all^T [T, E*r] fp32 (the gradient of zd, which
    the fused FFN's backward takes) and grad_dB = zd^T @ grad_y [E, H, r] in dB's dtype. The gradient of base is
    grad_y itself. moe_lora's shrink runs without routing: zd carries the routing weights already."""
    R = dB.shape[2]
    prec = fp32_dot_precision(activation_dtype)
    grad_y = grad_y.contiguous()
    q = _shrink(grad_y, dB, _b_strides(dB), R, None, None, 1.0, raw=True, fp32_prec=prec)[0]
    grad_dB = _new(dB)
    _wgrad(zd, grad_y, grad_dB, _b_strides(grad_dB), R, prec)
    return q, grad_dB


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


def check_inputs(
    x: Tensor,
    gate: Tensor | None,
    up: Tensor,
    weights: Tensor | None,
    indices: Tensor | None,
    loras: dict[str, tuple[Tensor, Tensor] | None],
    act: str,
) -> None:
    """Raise ValueError / TypeError for arguments the kernels cannot run. weights and indices may be None (not
    known yet: route_shrink computes them), then only the rest is checked."""
    named = [("x", x, 2), ("gate", gate, 2), ("up", up, 2), ("weights", weights, 2), ("indices", indices, 2)]
    for p, lo in loras.items():
        if lo is not None:
            if not isinstance(lo, tuple | list) or len(lo) < 2:
                raise TypeError(f"mixlora_ffn: {p}_lora must be an (A, B) pair, got {type(lo).__name__}")
            named += [(f"{p}_lora.A", lo[0], 3), (f"{p}_lora.B", lo[1], 3)]
    for name, t, dims in named:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"mixlora_ffn: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"mixlora_ffn: {name} must be {dims}-d, got shape {tuple(t.shape)}")
        if t.device != up.device:
            raise ValueError(f"mixlora_ffn: {name} is on {t.device} but up is on {up.device}")
        if name != "indices" and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"mixlora_ffn: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if indices is not None and indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"mixlora_ffn: indices must be int32 or int64, got {indices.dtype}")
    for name, t in (("x", x), ("gate", gate)):
        if t is not None and t.dtype != up.dtype:
            raise TypeError(f"mixlora_ffn: dtype mismatch: {name} is {t.dtype} but up is {up.dtype}")
    if act not in ACTIVATIONS:
        raise ValueError(f"mixlora_ffn: act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    T, I = up.shape
    H = x.shape[1]
    if x.shape[0] != T or (gate is not None and gate.shape != up.shape):
        raise ValueError(
            f"mixlora_ffn: x {tuple(x.shape)}, gate {None if gate is None else tuple(gate.shape)} and up "
            f"{tuple(up.shape)} must be [T, H], [T, I], [T, I]"
        )
    if weights is not None and (weights.shape[0] != T or indices.shape != weights.shape):
        raise ValueError(
            f"mixlora_ffn: weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be [T={T}, k]"
        )
    present = {p: lo for p, lo in loras.items() if lo is not None}
    if not present:
        raise ValueError("mixlora_ffn: no LoRA on any of gate, up, down: nothing for the kernel to do")
    if loras["gate"] is not None and gate is None:
        raise ValueError("mixlora_ffn: a gate LoRA needs the base gate G (gate is None: ungated FFN)")
    E, r = next(iter(present.values()))[0].shape[:2]
    if E == 0 or r == 0:
        raise ValueError(f"mixlora_ffn: LoRA A has no experts or rank 0: [E={E}, r={r}, ...]")
    expect = {"gate": ((E, r, H), (E, I, r)), "up": ((E, r, H), (E, I, r)), "down": ((E, r, I), (E, None, r))}
    for p, (A, B) in present.items():
        (a_shape, b_shape) = expect[p]
        if tuple(A.shape) != a_shape or B.shape[0] != E or B.shape[2] != r or (b_shape[1] and B.shape[1] != b_shape[1]):
            raise ValueError(
                f"mixlora_ffn: {p}_lora must be A {list(a_shape)}, B [{E}, {b_shape[1] or 'H_out'}, {r}] "
                f"(E={E}, r={r}, H={H}, I={I}), got A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
    # Range of indices: checked only where it costs no host sync (eager CPU tensors: the interpreter). On
    # CUDA an index >= E (or < -1) silently contributes nothing and gets a zero weight gradient.
    if (
        indices is not None
        and indices.device.type == "cpu"
        and indices.numel() > 0
        and not torch.compiler.is_compiling()
    ):
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= E:
            raise ValueError(f"mixlora_ffn: indices must lie in [-1, E={E}), got values in [{lo}, {hi}]")
    if up.device.type != "cuda" and not _interpreting():
        raise ValueError(f"mixlora_ffn: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {up.device}")
