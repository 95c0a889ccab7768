"""Triton `segmented_lora`: many LoRAs in one batch, one per sequence, each scaled by its sequence's gate.

    y[t] = seq_gate[s] * scaling[a] * B[a] A[a] x[t],   s = token_seq[t], a = seq_lora[s]   (0 when a = -1)

Punica's BGMV/SGMV and vLLM's token_lora_mapping, for MiLoRA's multi-tenant decoding: each token finds its
sequence, then that sequence's LoRA and gate, through the two maps. No sort, no host sync, no `.item()`:
the launch grids depend on the shapes only, so a decode step is CUDA-graph capturable.

Every kernel puts the LoRA id on a grid axis: program (token block, ..., a) works only on the tokens of
block whose LoRA is a, and returns after reading the block's maps (a few bytes) when there is none. So a
token with LoRA -1 or gate 0 costs no GEMM work, a block of one LoRA (prefill: sequences are contiguous)
costs one program's work, and a decode block mixing LoRAs costs one small program per LoRA present (the
16-row tl.dot tile then carries one real row: decoding is memory-bound on A and B, which each program
reads once). Each token's output row is written by exactly one program; an extra slot a = n_lora on the
expand grid writes the zeros of the tokens without an active LoRA (no memset of y).

Shrink u = A[a] x (fp32, ungated), then expand y = (gate * s * u) @ B[a]^T. The backward reuses both kernels
(dv = B[a]^T dy by the shrink, dx = (gate * s * dv) @ A[a] by the expand) and adds: a wgrad kernel whose
program (column block, rank block, a) owns its tile of grad_A[a] / grad_B[a] and loops over all tokens,
skipping blocks without LoRA a: a per-LoRA reduction, deterministic, no atomics; and a reduce kernel for
grad seq_gate / grad scaling from the per-token <dv, u> that the dy shrink leaves: deterministic, no atomics.

A gate of exactly 0 means "skip this sequence" (MiLoRA: the module is not in the prompt's top-k): no work,
zero output, and zero gradient for that gate. The reference gives that gate s * sum_t <dy_t, B A x_t>;
MiLoRA's unselected gates are constant zeros of the top-k scatter, so the difference never reaches a
parameter there. Token/sequence ids out of range (checked on CPU tensors, not on CUDA, which would need a
host sync) count as "no LoRA". CUDA tensors; CPU tensors under TRITON_INTERPRET=1 (tested there in fp32 and
fp16; never run on a GPU yet).

Launchers only (segmented_lora_fwd / segmented_lora_bwd, shapes in their docstrings) and check_inputs: the op,
its autograd and fake kernel are moelora.triton_backend's segmented_lora.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from moelora.kernels.moe_lora import fp32_dot_precision
from torch import Tensor

# One pinned config per kernel (a multi-config autotune crashes the interpreter). Rank blocks are >= 16 so
# 16-bit tl.dot stays legal on the GPU whatever r is; r = 8 is masked, not padded, here. BLOCK_T = 16: a
# decode step has one token per sequence, so smaller token blocks waste fewer rows of the dot. Not tuned on
# a GPU yet.
BLOCK_T = 16
MAX_BLOCK_R = 64
BLOCK_D = 64  # shrink: the reduction (input) axis
BLOCK_C = 64  # expand and wgrad: the output-column axis
WGRAD_BLOCK_T = 32
REDUCE_BLOCK_N = 16
REDUCE_BLOCK_T = 64
NUM_WARPS = 4

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _token_lora(token_seq_ptr, seq_lora_ptr, seq_gate_ptr, o_t, m_t, n_seq, n_lora):
    """Sequence, LoRA and gate of a block of tokens, and whether each has an active LoRA (in range, gate != 0)."""
    b_seq = tl.load(token_seq_ptr + o_t, mask=m_t, other=-1).to(tl.int64)  # [BT]
    m_seq = m_t & (b_seq >= 0) & (b_seq < n_seq)
    b_lora = tl.load(seq_lora_ptr + b_seq, mask=m_seq, other=-1).to(tl.int64)  # [BT]
    b_gate = tl.load(seq_gate_ptr + b_seq, mask=m_seq, other=0.0)  # [BT] fp32
    m_active = m_seq & (b_lora >= 0) & (b_lora < n_lora) & (b_gate != 0)
    return b_seq, b_lora, b_gate, m_active


@triton.jit
def segmented_lora_fwd_kernel_shrink(
    x_ptr,  # [T, D]: x (forward) or dy (backward)
    w_ptr,  # [n_lora, R, D] through strides: A, or B seen as [n_lora, r, out]
    token_seq_ptr,  # [T] int32/int64 contiguous
    seq_lora_ptr,  # [n_seq] int32/int64 contiguous, -1 = none
    seq_gate_ptr,  # [n_seq] fp32 contiguous
    u_ptr,  # [T, R] fp32 contiguous: A x or B^T dy, ungated; rows of inactive tokens are not written
    ref_ptr,  # [T, R] fp32 contiguous: u, read only when DOT
    dot_ptr,  # [n_rblocks, T] fp32: this rank block's share of <dv, u> per active token, written when DOT
    T,
    D,
    R,
    n_seq,
    n_lora,
    stride_xt,
    stride_xd,
    stride_wa,
    stride_wr,
    stride_wd,
    DOT: tl.constexpr,
    FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
    BT: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    i_t, i_r, i_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
    _, b_lora, _, m_active = _token_lora(token_seq_ptr, seq_lora_ptr, seq_gate_ptr, o_t, o_t < T, n_seq, n_lora)
    m_tok = m_active & (b_lora == i_a)
    if tl.max(m_tok.to(tl.int32), axis=0) > 0:
        o_r = i_r * BR + tl.arange(0, BR)  # [BR]
        m_r = o_r < R
        p_w = w_ptr + tl.cast(i_a, tl.int64) * stride_wa + o_r.to(tl.int64) * stride_wr  # [BR]
        b_acc = tl.zeros([BT, BR], dtype=tl.float32)
        KCH: tl.constexpr = (
            1 if FP32_PREC == "ieee" else 1 << 30
        )  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
        n_d = tl.cdiv(D, BD)
        for i_k in range(0, n_d if KCH == 1 else 1):
            b_part = tl.zeros([BT, BR], dtype=tl.float32) if KCH == 1 else b_acc
            for i_d in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_d)):
                o_d = (i_d * BD + tl.arange(0, BD)).to(tl.int64)  # [BD]
                m_d = o_d < D
                p_x = x_ptr + o_t[:, None] * stride_xt + o_d[None, :] * stride_xd
                b_x = tl.load(p_x, mask=m_tok[:, None] & m_d[None, :], other=0.0)  # [BT, BD]
                b_w = tl.load(p_w[None, :] + o_d[:, None] * stride_wd, mask=m_d[:, None] & m_r[None, :], other=0.0)
                if FP32:
                    b_part = tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), acc=b_part, input_precision=FP32_PREC)
                else:
                    b_part = tl.dot(b_x, b_w.to(b_x.dtype), acc=b_part)  # [BT, BR]
            b_acc = b_acc + b_part if KCH == 1 else b_part
        m_out = m_tok[:, None] & m_r[None, :]
        o_out = o_t[:, None] * R + o_r[None, :]
        tl.store(u_ptr + o_out, b_acc, mask=m_out)
        if DOT:
            b_u = tl.load(ref_ptr + o_out, mask=m_out, other=0.0)
            tl.store(dot_ptr + i_r * T + o_t, tl.sum(b_acc * b_u, axis=1), mask=m_tok)


@triton.jit
def segmented_lora_fwd_kernel_expand(
    u_ptr,  # [T, R] fp32 contiguous, ungated: u (forward) or dv (backward); rows read only for active tokens
    w_ptr,  # [n_lora, R, C] through strides: B seen as [n_lora, r, out] (forward) or A (backward, grad_x)
    token_seq_ptr,  # [T] contiguous
    seq_lora_ptr,  # [n_seq] contiguous
    seq_gate_ptr,  # [n_seq] fp32 contiguous
    scaling_ptr,  # [n_lora] fp32 contiguous
    y_ptr,  # [T, C]: every row written, zeros for tokens without an active LoRA
    T,
    C,
    R,
    n_seq,
    n_lora,
    stride_wa,
    stride_wr,
    stride_wc,
    stride_yt,
    stride_yc,
    FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BR: tl.constexpr,
):
    i_t, i_c, i_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
    m_t = o_t < T
    o_c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)  # [BC]
    m_c = o_c < C
    _, b_lora, b_gate, m_active = _token_lora(token_seq_ptr, seq_lora_ptr, seq_gate_ptr, o_t, m_t, n_seq, n_lora)
    p_y = y_ptr + o_t[:, None] * stride_yt + o_c[None, :] * stride_yc  # [BT, BC]
    if i_a == n_lora:  # the zero writer
        m_zero = m_t & ~m_active
        if tl.max(m_zero.to(tl.int32), axis=0) > 0:
            tl.store(p_y, tl.zeros([BT, BC], dtype=y_ptr.dtype.element_ty), mask=m_zero[:, None] & m_c[None, :])
    else:
        m_tok = m_active & (b_lora == i_a)
        if tl.max(m_tok.to(tl.int32), axis=0) > 0:
            b_scale = b_gate * tl.load(scaling_ptr + i_a)  # [BT]
            p_w = w_ptr + tl.cast(i_a, tl.int64) * stride_wa + o_c[None, :] * stride_wc  # [1, BC]
            b_acc = tl.zeros([BT, BC], dtype=tl.float32)
            for i_r in range(0, tl.cdiv(R, BR)):
                o_r = i_r * BR + tl.arange(0, BR)  # [BR]
                m_r = o_r < R
                p_u = u_ptr + o_t[:, None] * R + o_r[None, :]
                b_u = tl.load(p_u, mask=m_tok[:, None] & m_r[None, :], other=0.0) * b_scale[:, None]  # [BT, BR]
                b_w = tl.load(p_w + o_r.to(tl.int64)[:, None] * stride_wr, mask=m_r[:, None] & m_c[None, :], other=0.0)
                if FP32:
                    b_acc = tl.dot(b_u, b_w.to(tl.float32), acc=b_acc, input_precision=FP32_PREC)
                else:
                    # 16-bit weights: the gated rank-space rows rounded to their dtype for the tensor-core dot.
                    b_acc = tl.dot(b_u.to(b_w.dtype), b_w, acc=b_acc)  # [BT, BC]
            tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_tok[:, None] & m_c[None, :])


@triton.jit
def segmented_lora_bwd_kernel_wgrad(
    lhs_ptr,  # [T, R] fp32 contiguous, ungated: dv (grad_A) or u (grad_B)
    rhs_ptr,  # [T, C]: x (grad_A) or dy (grad_B)
    token_seq_ptr,  # [T] contiguous
    seq_lora_ptr,  # [n_seq] contiguous
    seq_gate_ptr,  # [n_seq] fp32 contiguous
    scaling_ptr,  # [n_lora] fp32 contiguous
    g_ptr,  # [n_lora, R, C] through strides: grad_A, or grad_B seen as [n_lora, r, out]
    T,
    C,
    R,
    n_seq,
    n_lora,
    stride_rt,
    stride_rc,
    stride_ga,
    stride_gr,
    stride_gc,
    FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
    BT: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    # g[a, r, c] = sum over the active tokens t of LoRA a of gate_t * s_a * lhs[t, r] * rhs[t, c]: each
    # program owns its output tile and walks every token block in order, so no split-K and no atomics.
    i_c, i_r, i_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_r = i_r * BR + tl.arange(0, BR)  # [BR]
    m_r = o_r < R
    o_c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)  # [BC]
    m_c = o_c < C
    s_a = tl.load(scaling_ptr + i_a)

    b_acc = tl.zeros([BR, BC], dtype=tl.float32)
    KCH: tl.constexpr = 1 if FP32_PREC == "ieee" else 1 << 30  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    n_t = tl.cdiv(T, BT)
    for i_k in range(0, n_t if KCH == 1 else 1):
        b_part = tl.zeros([BR, BC], dtype=tl.float32) if KCH == 1 else b_acc
        for i_t in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_t)):
            o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
            _, b_lora, b_gate, m_active = _token_lora(
                token_seq_ptr, seq_lora_ptr, seq_gate_ptr, o_t, o_t < T, n_seq, n_lora
            )
            m_tok = m_active & (b_lora == i_a)
            if tl.max(m_tok.to(tl.int32), axis=0) > 0:
                p_l = lhs_ptr + o_t[None, :] * R + o_r[:, None]
                b_l = tl.load(p_l, mask=m_r[:, None] & m_tok[None, :], other=0.0) * (b_gate * s_a)[None, :]  # [BR, BT]
                p_rhs = rhs_ptr + o_t[:, None] * stride_rt + o_c[None, :] * stride_rc
                b_rhs = tl.load(p_rhs, mask=m_tok[:, None] & m_c[None, :], other=0.0)  # [BT, BC]
                if FP32:
                    b_part = tl.dot(b_l, b_rhs.to(tl.float32), acc=b_part, input_precision=FP32_PREC)
                else:
                    b_part = tl.dot(b_l.to(b_rhs.dtype), b_rhs, acc=b_part)  # [BR, BC]
        b_acc = b_acc + b_part if KCH == 1 else b_part

    p_g = g_ptr + tl.cast(i_a, tl.int64) * stride_ga + o_r.to(tl.int64)[:, None] * stride_gr + o_c[None, :] * stride_gc
    tl.store(p_g, b_acc.to(g_ptr.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@triton.jit
def segmented_lora_bwd_kernel_reduce(
    dot_ptr,  # [NR, T] fp32: per rank block, <dv, u> of each active token
    token_seq_ptr,  # [T] contiguous
    seq_lora_ptr,  # [n_seq] contiguous
    seq_gate_ptr,  # [n_seq] fp32 contiguous
    scaling_ptr,  # [n_lora] fp32 contiguous
    out_ptr,  # [N] fp32: grad seq_gate (N = n_seq) or, BY_LORA, grad scaling (N = n_lora)
    T,
    N,
    NR,
    n_seq,
    n_lora,
    BY_LORA: tl.constexpr,
    BN: tl.constexpr,
    BT: tl.constexpr,
):
    # out[n] = sum over active tokens t with key_t = n of w_t * <dv_t, u_t>; key = sequence, w = s_a (grad
    # seq_gate) or key = LoRA, w = gate (grad scaling). Each program owns BN outputs and walks every token
    # block in order: deterministic, no atomics; the T x N comparisons are cheap next to the GEMMs.
    i_n = tl.program_id(0)
    o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)  # [BN]
    b_acc = tl.zeros([BN], dtype=tl.float32)
    for i_t in range(0, tl.cdiv(T, BT)):
        o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
        b_seq, b_lora, b_gate, m_active = _token_lora(
            token_seq_ptr, seq_lora_ptr, seq_gate_ptr, o_t, o_t < T, n_seq, n_lora
        )
        b_q = tl.zeros([BT], dtype=tl.float32)
        for i_r in range(0, NR):
            b_q += tl.load(dot_ptr + i_r * T + o_t, mask=m_active, other=0.0)
        if BY_LORA:
            b_key = b_lora
            b_q = b_q * b_gate
        else:
            b_key = b_seq
            b_q = b_q * tl.load(scaling_ptr + b_lora, mask=m_active, other=0.0)
        b_q = tl.where(m_active, b_q, 0.0)
        b_acc += tl.sum(tl.where(b_key[None, :] == o_n[:, None], b_q[None, :], 0.0), axis=1)
    tl.store(out_ptr + o_n, b_acc, mask=o_n < N)


def _use_fp32(*tensors: Tensor) -> bool:
    """fp32 dots (moe_lora.fp32_dot_precision) unless every operand shares one 16-bit dtype (then 16-bit
    tensor-core dots, fp32 accumulate)."""
    dtypes = {t.dtype for t in tensors}
    return len(dtypes) != 1 or torch.float32 in dtypes


def _rank_block(R: int) -> int:
    return min(MAX_BLOCK_R, max(16, triton.next_power_of_2(R)))


def _a_strides(A: Tensor) -> tuple[int, int, int]:
    return A.stride(0), A.stride(1), A.stride(2)  # A [n_lora, r, in] as (lora, rank, column)


def _b_strides(B: Tensor) -> tuple[int, int, int]:
    return B.stride(0), B.stride(2), B.stride(1)  # B [n_lora, out, r] as (lora, rank, column)


def _shrink(
    x: Tensor, w: Tensor, w_strides: tuple[int, int, int], maps: dict, ref: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """x [T, D] against w seen as [n_lora, R, D] -> (u [T, R] fp32, <u, ref> partials [n_rblocks, T] or None)."""
    T, D = x.shape
    n_lora, R = w.shape[0], maps["R"]
    BR = _rank_block(R)
    n_r = triton.cdiv(R, BR)
    u = torch.empty(T, R, dtype=torch.float32, device=x.device)
    dot = torch.empty(n_r, T, dtype=torch.float32, device=x.device) if ref is not None else None
    segmented_lora_fwd_kernel_shrink[(triton.cdiv(T, BLOCK_T), n_r, n_lora)](
        x_ptr=x,
        w_ptr=w,
        token_seq_ptr=maps["token_seq"],
        seq_lora_ptr=maps["seq_lora"],
        seq_gate_ptr=maps["seq_gate"],
        u_ptr=u,
        ref_ptr=ref if ref is not None else u,
        dot_ptr=dot if dot is not None else u,
        T=T,
        D=D,
        R=R,
        n_seq=maps["n_seq"],
        n_lora=n_lora,
        stride_xt=x.stride(0),
        stride_xd=x.stride(1),
        stride_wa=w_strides[0],
        stride_wr=w_strides[1],
        stride_wd=w_strides[2],
        DOT=ref is not None,
        FP32=_use_fp32(x, w),
        FP32_PREC=fp32_dot_precision(x.dtype),  # x: the activations (or dy)
        BT=BLOCK_T,
        BR=BR,
        BD=BLOCK_D,
        num_warps=NUM_WARPS,
    )
    return u, dot


def _expand(u: Tensor, w: Tensor, w_strides: tuple[int, int, int], C: int, dtype: torch.dtype, maps: dict) -> Tensor:
    """u [T, R] fp32 times w seen as [n_lora, R, C], gated per token -> [T, C] in dtype, every row written."""
    T, R = u.shape
    n_lora = w.shape[0]
    y = torch.empty(T, C, dtype=dtype, device=u.device)
    segmented_lora_fwd_kernel_expand[(triton.cdiv(T, BLOCK_T), triton.cdiv(C, BLOCK_C), n_lora + 1)](
        u_ptr=u,
        w_ptr=w,
        token_seq_ptr=maps["token_seq"],
        seq_lora_ptr=maps["seq_lora"],
        seq_gate_ptr=maps["seq_gate"],
        scaling_ptr=maps["scaling"],
        y_ptr=y,
        T=T,
        C=C,
        R=R,
        n_seq=maps["n_seq"],
        n_lora=n_lora,
        stride_wa=w_strides[0],
        stride_wr=w_strides[1],
        stride_wc=w_strides[2],
        stride_yt=y.stride(0),
        stride_yc=y.stride(1),
        FP32=w.dtype == torch.float32,
        FP32_PREC=fp32_dot_precision(dtype),  # dtype: the activations'
        BT=BLOCK_T,
        BC=BLOCK_C,
        BR=_rank_block(R),
        num_warps=NUM_WARPS,
    )
    return y


def _wgrad(lhs: Tensor, rhs: Tensor, grad: Tensor, g_strides: tuple[int, int, int], maps: dict) -> Tensor:
    """grad seen as [n_lora, R, C] <- per LoRA, sum over its active tokens of gate * s * lhs^T rhs."""
    T, R = lhs.shape
    C = rhs.shape[1]
    BR = _rank_block(R)
    segmented_lora_bwd_kernel_wgrad[(triton.cdiv(C, BLOCK_C), triton.cdiv(R, BR), grad.shape[0])](
        lhs_ptr=lhs,
        rhs_ptr=rhs,
        token_seq_ptr=maps["token_seq"],
        seq_lora_ptr=maps["seq_lora"],
        seq_gate_ptr=maps["seq_gate"],
        scaling_ptr=maps["scaling"],
        g_ptr=grad,
        T=T,
        C=C,
        R=R,
        n_seq=maps["n_seq"],
        n_lora=grad.shape[0],
        stride_rt=rhs.stride(0),
        stride_rc=rhs.stride(1),
        stride_ga=g_strides[0],
        stride_gr=g_strides[1],
        stride_gc=g_strides[2],
        FP32=rhs.dtype == torch.float32,
        FP32_PREC=fp32_dot_precision(rhs.dtype),  # rhs: the activations (or dy)
        BT=WGRAD_BLOCK_T,
        BR=BR,
        BC=BLOCK_C,
        num_warps=NUM_WARPS,
    )
    return grad


def _reduce(dot: Tensor, N: int, by_lora: bool, maps: dict, n_lora: int) -> Tensor:
    """Per-token <dv, u> partials [n_rblocks, T] -> grad seq_gate [n_seq] or (by_lora) grad scaling [n_lora]."""
    NR, T = dot.shape
    out = torch.empty(N, dtype=torch.float32, device=dot.device)
    segmented_lora_bwd_kernel_reduce[(triton.cdiv(N, REDUCE_BLOCK_N),)](
        dot_ptr=dot,
        token_seq_ptr=maps["token_seq"],
        seq_lora_ptr=maps["seq_lora"],
        seq_gate_ptr=maps["seq_gate"],
        scaling_ptr=maps["scaling"],
        out_ptr=out,
        T=T,
        N=N,
        NR=NR,
        n_seq=maps["n_seq"],
        n_lora=n_lora,
        BY_LORA=by_lora,
        BN=REDUCE_BLOCK_N,
        BT=REDUCE_BLOCK_T,
        num_warps=NUM_WARPS,
    )
    return out


def _maps(token_seq: Tensor, seq_lora: Tensor, seq_gate: Tensor, scaling: Tensor, R: int) -> dict:
    return dict(
        token_seq=token_seq.contiguous(),
        seq_lora=seq_lora.contiguous(),
        seq_gate=seq_gate.contiguous(),
        scaling=scaling.contiguous(),
        n_seq=seq_lora.shape[0],
        R=R,
    )


def segmented_lora_fwd(
    x: Tensor, token_seq: Tensor, seq_lora: Tensor, seq_gate: Tensor, A: Tensor, B: Tensor, scaling: Tensor
) -> tuple[Tensor, Tensor]:
    """-> y [T, out] in x's dtype, u = A[a] x [T, r] fp32 (ungated; rows of inactive tokens unwritten)."""
    if x.shape[0] == 0:  # a grid of 0 programs is not launchable
        return x.new_empty(0, B.shape[1]), x.new_empty(0, A.shape[1], dtype=torch.float32)
    maps = _maps(token_seq, seq_lora, seq_gate, scaling, A.shape[1])
    u, _ = _shrink(x, A, _a_strides(A), maps, None)
    y = _expand(u, B, _b_strides(B), B.shape[1], x.dtype, maps)
    return y, u


def segmented_lora_bwd(
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
    """-> grad_x [T, in], grad seq_gate [n_seq] fp32, grad_A [n_lora, r, in], grad_B [n_lora, out, r],
    grad scaling [n_lora] fp32. Six launches, no atomics: deterministic.

    dv = B[a]^T dy (shrink on dy, which also leaves <dv, u> per token); grad_x = gate s dv @ A[a] (expand);
    grad_A[a] = sum_t gate s dv_t x_t^T, grad_B[a] = sum_t gate s dy_t u_t^T (wgrad, one program per tile);
    grad seq_gate[s] = s_a sum_{t in s} <dv_t, u_t>, grad scaling[a] = sum_{t of a} gate <dv_t, u_t> (reduce).
    """
    n_lora = A.shape[0]
    if x.shape[0] == 0:
        zeros = seq_gate.new_zeros
        return torch.empty_like(x), zeros(seq_gate.shape), torch.zeros_like(A), torch.zeros_like(B), zeros(n_lora)
    maps = _maps(token_seq, seq_lora, seq_gate, scaling, A.shape[1])
    dv, dot = _shrink(dy, B, _b_strides(B), maps, u)
    grad_x = _expand(dv, A, _a_strides(A), A.shape[2], x.dtype, maps)
    grad_A = _wgrad(dv, x, torch.empty_like(A), _a_strides(A), maps)
    grad_B = torch.empty_like(B)
    _wgrad(u, dy, grad_B, _b_strides(grad_B), maps)
    grad_gate = _reduce(dot, seq_lora.shape[0], False, maps, n_lora)
    grad_scaling = _reduce(dot, n_lora, True, maps, n_lora)
    return grad_x, grad_gate, grad_A, grad_B, grad_scaling


def check_inputs(
    x: Tensor, token_seq: Tensor, seq_lora: Tensor, seq_gate: Tensor, A: Tensor, B: Tensor, scaling: Tensor
) -> None:
    """Raise ValueError / TypeError for arguments the segmented_lora kernels cannot run."""
    named = [("x", x, 2), ("token_seq", token_seq, 1), ("seq_lora", seq_lora, 1), ("seq_gate", seq_gate, 1)]
    named += [("A", A, 3), ("B", B, 3), ("scaling", scaling, 1)]
    for name, t, dims in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"segmented_lora: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"segmented_lora: {name} must be {dims}-d, got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"segmented_lora: {name} is on {t.device} but x is on {x.device}")
    for name, t in (("x", x), ("A", A), ("B", B)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"segmented_lora: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    for name, t in (("token_seq", token_seq), ("seq_lora", seq_lora)):
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"segmented_lora: {name} must be int32 or int64, got {t.dtype}")
    for name, t in (("seq_gate", seq_gate), ("scaling", scaling)):
        if t.dtype != torch.float32:
            raise TypeError(f"segmented_lora: {name} must be float32, got {t.dtype}")
    T, d_in = x.shape
    n_lora, r, a_in = A.shape
    n_seq = seq_lora.shape[0]
    if token_seq.shape[0] != T:
        raise ValueError(f"segmented_lora: token_seq must be [T={T}], got {tuple(token_seq.shape)}")
    if seq_gate.shape[0] != n_seq:
        raise ValueError(f"segmented_lora: seq_gate must be [n_seq={n_seq}] like seq_lora, got {tuple(seq_gate.shape)}")
    if n_lora == 0 or r == 0:
        raise ValueError(f"segmented_lora: A has no LoRA or rank 0: {tuple(A.shape)}")
    if a_in != d_in:
        raise ValueError(f"segmented_lora: A is [n_lora, r, in={a_in}] but x has in={d_in}")
    if B.shape[0] != n_lora or B.shape[2] != r:
        raise ValueError(f"segmented_lora: B must be [n_lora={n_lora}, out, r={r}], got {tuple(B.shape)}")
    if scaling.shape[0] != n_lora:
        raise ValueError(f"segmented_lora: scaling must be [n_lora={n_lora}], got {tuple(scaling.shape)}")
    if T > 0 and n_seq == 0:
        raise ValueError("segmented_lora: tokens but no sequences (seq_lora is empty)")
    # Ranges: checked only where it costs no host sync (eager CPU tensors: the interpreter). On CUDA a token
    # whose sequence or LoRA is out of range is treated as having no LoRA (zero output, no gradient).
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if T > 0 and not bool(((token_seq >= 0) & (token_seq < n_seq)).all()):
            lo, hi = int(token_seq.min()), int(token_seq.max())
            raise ValueError(f"segmented_lora: token_seq must lie in [0, n_seq={n_seq}), got values in [{lo}, {hi}]")
        if n_seq > 0 and not bool(((seq_lora >= -1) & (seq_lora < n_lora)).all()):
            lo, hi = int(seq_lora.min()), int(seq_lora.max())
            raise ValueError(f"segmented_lora: seq_lora must lie in [-1, n_lora={n_lora}), got values in [{lo}, {hi}]")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"segmented_lora: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}"
        )
