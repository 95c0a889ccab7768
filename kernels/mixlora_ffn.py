"""Triton `mixlora_ffn`: MixLoRA's FFN from the frozen base's G = Wg x and U = Wu x, never materialising [T, k, I].

For token t, slot j, expert e = indices[t, j] (design.md, op 3):

    h_j   = act(G + s Bg_e Ag_e x) * (U + s Bu_e Au_e x)          (ungated, gate None: act(U + s Bu_e Au_e x))
    hbar  = sum_j w_j h_j                                           [T, I], written in U's dtype
    zd    = sum_j w_j s [Ad_e h_j in expert e's r columns]          [T, E*r] fp32, the down-LoRA shrink
    y_lora = zd @ Bd_all                                            [T, H]

The caller runs the frozen down projection once on hbar and adds y_lora: y = Wd hbar + y_lora (down_expand
does the add in the expand's epilogue).

Kernels, in the order they run:
- `mixlora_ffn_fwd_kernel_shrink` (shrink_x, kernels/mixlora_ffn_shrink_expand.py): ua = x @ [Ag_all | Au_all]^T,
  [T, P*E*r] fp32, one read of x per 128 rank columns; or, with the router, `moelora.kernels.route.route_shrink_fwd`
  (one read of x in all). Phi-3's gate and up share one A: ua has one block then, read by both (shared_a).
- `mixlora_ffn_fwd_kernel` (this file): per (token block, slice of I): the gate/up LoRA expand of each slot as a
  dense-masked GEMM with K = E*r (the slot's expert keeps its r columns of ua, the others are masked to 0,
  so one tile of B_all serves every token whatever its expert), activation, product, the weighted sum into
  hbar in registers, and the down shrink of each h_j, accumulated over the slice into zd.
- `down_expand` (kernels/mixlora_ffn_shrink_expand.py): y = Wd hbar + zd @ Bd_all (moe_lora's expand kernel,
  K = E*r, with Wd hbar added before its one rounding), once the caller has run the frozen Wd on hbar; without
  Wd hbar, the fp32 delta y_lora alone.
The part after the shrink is mixlora_ffn_core_fwd / _bwd (from ua to hbar and zd; the triton backend's op), then
down_expand / down_expand_bwd; the shrink's backward is shrink_x_bwd (grad_x, grad A from the rank-space
gradient of ua).
Backward (kernels/mixlora_ffn_bwd.py), recomputing h (two more expand GEMMs of K = E*r per slot) instead of
storing [T, k, I]:
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
moe_lora's expand and wgrad kernels, dAd and the down path's share of D_j there). Without dropout every kernel
compiles as before (bench.compile_check: same registers and spills).

This is the dense-masked regime: every slot pays E*r rank columns for its r. kernels/mixlora_ffn_sorted.py
(tokens sorted by their combination of experts) pays r; the triton backend picks between them by shape
(moelora.triton_backend.ffn_regime, or MOELORA_FFN_REGIME).

This file: the tiles, the JIT slot helpers and the kernel arguments both directions share (_h_keep,
_slot_pre, _common_args: kernels/mixlora_ffn_bwd.py imports them), the forward kernel and its launcher
mixlora_ffn_core_fwd (shapes in its docstring), and check_inputs. The ops (rank_shrink, mixlora_ffn,
down_expand and their backward), their fake kernels and autograd are moelora.triton_ops'; the triton
backend's mixlora_ffn and routed_mixlora_ffn run them. The JIT helpers shared with the sorted regime and
route.py (activations, dot modes, slicing) are kernels/_common.py.
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
    dot_operand,
)
from moelora.kernels.moe_lora import autotune_list, t_bucket
from torch import Tensor

from moelora.dropout import LoraDropout

RANK_CHUNK = 128  # rank-space columns one program accumulates in registers ([BT, 128] fp32 per target)
EXPAND_BLOCK_N = 64  # K-block of the dense-masked expand GEMMs

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


def _rank_chunk(N: int) -> int:
    return min(RANK_CHUNK, max(16, triton.next_power_of_2(N)))


def _expand_block(N: int) -> int:
    """K-block of the dense-masked expands; all of N at once under the interpreter (fewer, larger numpy ops)."""
    n = max(16, triton.next_power_of_2(N))
    return n if _interpreting() else min(EXPAND_BLOCK_N, n)


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
