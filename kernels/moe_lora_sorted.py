"""Triton `moe_lora`, sorted regime (large E*r): y[t] = sum_j w[t, j] * s * B[e_j] A[e_j] x[t], ScatterMoE-style.

Each (token, slot) pair p = t*k + j is one row of work. `sort_by_expert` orders the pairs by expert (stable,
so token order within an expert; unused slots, index -1 or outside [0, E), last) and gives per-expert
offsets, with torch.argsort + torch.searchsorted: no host sync. The kernels then work on blocks of BM
sorted pairs of one expert: gather on load (x[t] through the pair's token), scatter on store (results go
to row p of a [T*k, ...] buffer, so every buffer stays in (token, slot) order). Unlike the dense-masked
regime (kernels/moe_lora.py), a pair costs r rank columns, not E*r: for E = 64, r = 16, 64x less shrink work.

Kernels, in the order they run:
- forward, `moe_lora_sorted_kernel_fused` on (x, A, B): per block of pairs of expert e,
  u = A_e x[tok] (fp32, ungated) -> u buffer [T*k, r] fp32 (kept for the backward), then
  y_pairs[p] = (w_p * s * u_p) B_e^T for every out block, u kept in registers: x is read once per pair.
  y = y_pairs.view(T, k, out).sum(1) in PyTorch (fixed order); y_pairs is in x's dtype (fp32 for fp32 x,
  the 16-bit dtype for 16-bit x, as vLLM and ScatterMoE do: half the traffic, within the tests' tolerance).
  For k = 1, y_pairs is y.
- backward, the same fused kernel on (dy, B, A): g_p = s * B_e^T dy[tok] -> g buffer [T*k, r] fp32, then
  dx_pairs[p] = (w_p * g_p) A_e in x's dtype; grad_x = dx_pairs.view(T, k, in).sum(1).
  grad_weights[t, j] = <g_p, u_p>: elementwise product and sum over r in PyTorch.
- backward, `moe_lora_sorted_kernel_wgrad`, twice: grad_A[e] = sum over e's pairs of (w_p * g_p) x[tok]^T and
  grad_B[e]^T = sum over e's pairs of (s * w_p * u_p) dy[tok]^T. One program per (expert, column block) loops
  over that expert's contiguous sorted pairs: a per-expert reduction, fp32 accumulate, exact zeros for an
  expert with no pairs. If one expert holds all T*k pairs, its programs loop over all of them (parallel
  over column blocks only); accepted, not split.

Grids depend on shapes only: the fused kernel launches cdiv(T*k, BM) + E programs, the most the E experts
plus the group of unused pairs can need (each group adds at most one partial block). Each program finds
its group and first sorted position from `offsets` in-kernel (per-group block counts, cumulative sum);
programs past the last block return at once. The unused pairs' group writes zero rows to every pair buffer,
so nothing is memset. No atomics anywhere (forward or backward): each output element is written by one
program, and the sums over slots run in PyTorch in a fixed order, so results are bitwise deterministic.

Rank axis: a constexpr block >= 16 (tl.dot needs K >= 16 for 16-bit inputs on the GPU), masked, so r = 4
or 8 needs no padding in memory. Expert weights are addressed in place through strides. 16-bit dots with
fp32 accumulation when x (dy), A and B share one 16-bit dtype; otherwise fp32 operands, "ieee" for fp32
activations and "tf32x3" for 16-bit ones (moe_lora.fp32_dot_precision). CUDA tensors; CPU tensors under
TRITON_INTERPRET=1 (tested there in fp32 and fp16); bf16 / fp16 parity passed on an H200 (2026-12-04).

Launchers only (sort_by_expert, moe_lora_sorted_fwd, moe_lora_sorted_bwd): the op, its autograd and its fake
kernel are moelora.triton_backend's moe_lora (regime "sorted"), which checks the inputs with moe_lora's
check_inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from moelora.kernels.moe_lora import _use_fp32, fp32_dot_precision
from torch import Tensor

# One pinned config per kernel: multi-config autotune crashes the Triton interpreter. BLOCK_M = 32 sorted
# pairs: each of the E experts may waste up to BLOCK_M - 1 rows of its last block, so big blocks hurt at
# E = 64 with few pairs per expert. Not tuned on a GPU yet.
BLOCK_M = 32
BLOCK_D = 32  # the shrink's reduction axis (in forward, out backward)
BLOCK_C = 64  # the expand's / wgrad's output columns
NUM_WARPS = 4


class ExpertSort(NamedTuple):
    """The (token, slot) pairs p = t*k + j sorted by expert, stable (token order within an expert).

    order [T*k] int64: pair ids; offsets [E+1] int64: expert e's pairs are order[offsets[e]:offsets[e+1]].
    Unused pairs (index -1 or outside [0, E)) sit at order[offsets[E]:], after every expert.
    """

    order: Tensor
    offsets: Tensor


def sort_by_expert(indices: Tensor, E: int) -> ExpertSort:
    """Stable sort of the flat (token, slot) pairs of indices [T, k] by expert, without a host sync."""
    flat = indices.reshape(-1).long()
    keys = torch.where((flat >= 0) & (flat < E), flat, E)  # unused slots sort after every expert
    order = torch.argsort(keys, stable=True)
    offsets = torch.searchsorted(keys[order], torch.arange(E + 1, device=indices.device))
    return ExpertSort(order, offsets)


@triton.jit
def _pair_block(offsets_ptr, NP, E, BM: tl.constexpr, BG: tl.constexpr):
    """Group (expert, or E = the unused pairs) of this program's block and its sorted positions [start, end).

    Groups g = 0..E span [offsets[g], offsets[g+1]) (offsets[E+1] = NP); each takes cdiv(count, BM) blocks
    in order. A program past the last block gets g > E.
    """
    i_b = tl.program_id(0)
    o_g = tl.arange(0, BG)  # [BG]
    b_start = tl.load(offsets_ptr + o_g, mask=o_g <= E, other=NP)
    b_end = tl.load(offsets_ptr + o_g + 1, mask=o_g < E, other=NP)
    b_blocks = tl.cdiv(b_end - b_start, BM)  # [BG], 0 for the padding past E
    b_last = tl.cumsum(b_blocks, axis=0)  # [BG] one past each group's last block
    g = tl.sum((b_last <= i_b).to(tl.int32), axis=0)
    m_g = o_g == g
    first = tl.sum(tl.where(m_g, b_last - b_blocks, 0), axis=0)
    start = tl.sum(tl.where(m_g, b_start, 0), axis=0) + (i_b - first) * BM
    end = tl.sum(tl.where(m_g, b_end, 0), axis=0)
    return g, start, end


@triton.jit
def moe_lora_sorted_kernel_fused(
    x_ptr,  # [T, D]: x (forward) or dy (backward), gathered by each pair's token
    w1_ptr,  # [E, D, R] through strides: A (forward) or B (backward)
    w2_ptr,  # [E, R, C] through strides: B (forward) or A (backward)
    weights_ptr,  # [T, K] routing weights
    order_ptr,  # [T*K] int64 pair ids sorted by expert
    offsets_ptr,  # [E+1] int64
    raw_ptr,  # [T*K, R] fp32: raw_scale * x[tok] W1_e per pair (u or g); written only if STORE_RAW
    out_ptr,  # [T*K, C]: (w_p * s * acc) W2_e per pair, scattered to row p
    K,
    D,
    C,
    R,
    E,
    NP,
    scaling,
    raw_scale,
    stride_xt,
    stride_xd,
    stride_w1e,
    stride_w1d,
    stride_w1r,
    stride_w2e,
    stride_w2r,
    stride_w2c,
    stride_gwt,
    stride_gwk,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BC: tl.constexpr,
    BR: tl.constexpr,
    BG: tl.constexpr,
    STORE_RAW: tl.constexpr,
    FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
):
    g, start, end = _pair_block(offsets_ptr, NP, E, BM, BG)
    if g > E:
        return
    o_m = start + tl.arange(0, BM)  # [BM] sorted positions
    m_m = o_m < end
    b_p = tl.load(order_ptr + o_m, mask=m_m, other=0)  # [BM] int64 pair ids
    b_tok = b_p // K
    o_r = tl.arange(0, BR).to(tl.int64)
    m_r = o_r < R
    if g == E:  # the unused pairs: zero rows, no GEMM work
        if STORE_RAW:
            tl.store(
                raw_ptr + b_p[:, None] * R + o_r[None, :],
                tl.zeros([BM, BR], dtype=tl.float32),
                mask=m_m[:, None] & m_r[None, :],
            )
        for i_c in range(0, tl.cdiv(C, BC)):
            o_c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
            b_zero = tl.zeros([BM, BC], dtype=out_ptr.dtype.element_ty)
            tl.store(out_ptr + b_p[:, None] * C + o_c[None, :], b_zero, mask=m_m[:, None] & (o_c < C)[None, :])
        return
    e = g.to(tl.int64)

    b_acc = tl.zeros([BM, BR], dtype=tl.float32)
    KCH: tl.constexpr = 1 if FP32_PREC == "ieee" else 1 << 30  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    n_d = tl.cdiv(D, BD)
    for i_k in range(0, n_d if KCH == 1 else 1):
        b_part = tl.zeros([BM, BR], dtype=tl.float32) if KCH == 1 else b_acc
        for i_d in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_d)):
            o_d = (i_d * BD + tl.arange(0, BD)).to(tl.int64)
            m_d = o_d < D
            b_x = tl.load(
                x_ptr + b_tok[:, None] * stride_xt + o_d[None, :] * stride_xd,
                mask=m_m[:, None] & m_d[None, :],
                other=0.0,
            )  # [BM, BD]
            p_w1 = w1_ptr + e * stride_w1e + o_d[:, None] * stride_w1d + o_r[None, :] * stride_w1r
            b_w1 = tl.load(p_w1, mask=m_d[:, None] & m_r[None, :], other=0.0)  # [BD, BR]
            if FP32:
                b_part = tl.dot(b_x.to(tl.float32), b_w1.to(tl.float32), acc=b_part, input_precision=FP32_PREC)
            else:
                b_part = tl.dot(b_x, b_w1.to(b_x.dtype), acc=b_part)
        b_acc = b_acc + b_part if KCH == 1 else b_part

    if STORE_RAW:
        tl.store(raw_ptr + b_p[:, None] * R + o_r[None, :], b_acc * raw_scale, mask=m_m[:, None] & m_r[None, :])
    b_w = tl.load(weights_ptr + b_tok * stride_gwt + (b_p % K) * stride_gwk, mask=m_m, other=0.0).to(tl.float32)
    b_v = b_acc * (b_w * scaling)[:, None]  # [BM, BR] fp32

    for i_c in range(0, tl.cdiv(C, BC)):
        o_c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
        m_c = o_c < C
        p_w2 = w2_ptr + e * stride_w2e + o_r[:, None] * stride_w2r + o_c[None, :] * stride_w2c
        b_w2 = tl.load(p_w2, mask=m_r[:, None] & m_c[None, :], other=0.0)  # [BR, BC]
        b_out = tl.zeros([BM, BC], dtype=tl.float32)
        if FP32:
            b_out = tl.dot(b_v, b_w2.to(tl.float32), acc=b_out, input_precision=FP32_PREC)
        else:
            # 16-bit weights: v rounded to their dtype for the tensor-core dot, fp32 accumulate.
            b_out = tl.dot(b_v.to(b_w2.dtype), b_w2, acc=b_out)
        p_out = out_ptr + b_p[:, None] * C + o_c[None, :]
        tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_c[None, :])


@triton.jit
def moe_lora_sorted_kernel_wgrad(
    lhs_ptr,  # [T*K, R] fp32 per pair: g (grad of A) or u (grad of B), scaled by lhs_scale * w_p
    rhs_ptr,  # [T, C]: x (grad of A) or dy (grad of B), gathered by each pair's token
    weights_ptr,  # [T, K] routing weights
    order_ptr,  # [T*K] int64 pair ids sorted by expert
    offsets_ptr,  # [E+1] int64
    grad_ptr,  # [E, R, C] through strides: grad_A, or grad_B as [E, r, out]
    K,
    C,
    R,
    lhs_scale,
    stride_rt,
    stride_rc,
    stride_gwt,
    stride_gwk,
    stride_ge,
    stride_gr,
    stride_gc,
    BM: tl.constexpr,
    BC: tl.constexpr,
    BR: tl.constexpr,
    FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
):
    # grad[e][r, c] = sum over e's pairs p of lhs_scale * w_p * lhs[p, r] * rhs[tok(p), c]: each program owns
    # its tile and loops over the expert's contiguous sorted pairs, so no split-K and no atomics.
    i_e, i_c = tl.program_id(0), tl.program_id(1)
    start = tl.load(offsets_ptr + i_e)
    end = tl.load(offsets_ptr + i_e + 1)
    o_r = tl.arange(0, BR).to(tl.int64)
    m_r = o_r < R
    o_c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
    m_c = o_c < C

    b_acc = tl.zeros([BR, BC], dtype=tl.float32)
    KCH: tl.constexpr = 1 if FP32_PREC == "ieee" else 1 << 30  # K-blocks per partial sum (moe_lora.fp32_dot_precision)
    n_mb = tl.cdiv(end - start, BM)
    for i_k in range(0, n_mb if KCH == 1 else 1):
        b_part = tl.zeros([BR, BC], dtype=tl.float32) if KCH == 1 else b_acc
        # one step of BM pairs per partial sum (ieee), else the whole loop over the expert's pairs
        for i_m in range(start + i_k * BM, start + i_k * BM + 1 if KCH == 1 else end, BM):
            o_m = i_m + tl.arange(0, BM)
            m_m = o_m < end
            b_p = tl.load(order_ptr + o_m, mask=m_m, other=0)  # [BM] int64
            b_tok = b_p // K
            b_w = tl.load(weights_ptr + b_tok * stride_gwt + (b_p % K) * stride_gwk, mask=m_m, other=0.0).to(tl.float32)
            b_l = tl.load(lhs_ptr + b_p[None, :] * R + o_r[:, None], mask=m_r[:, None] & m_m[None, :], other=0.0)
            b_l = b_l * (b_w * lhs_scale)[None, :]  # [BR, BM] fp32
            b_rhs = tl.load(
                rhs_ptr + b_tok[:, None] * stride_rt + o_c[None, :] * stride_rc,
                mask=m_m[:, None] & m_c[None, :],
                other=0.0,
            )  # [BM, BC]
            if FP32:
                b_part = tl.dot(b_l, b_rhs.to(tl.float32), acc=b_part, input_precision=FP32_PREC)
            else:
                b_part = tl.dot(b_l.to(b_rhs.dtype), b_rhs, acc=b_part)
        b_acc = b_acc + b_part if KCH == 1 else b_part

    p_g = grad_ptr + i_e.to(tl.int64) * stride_ge + o_r[:, None] * stride_gr + o_c[None, :] * stride_gc
    tl.store(p_g, b_acc.to(grad_ptr.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _fused(
    x: Tensor,
    w1: Tensor,
    w1_strides: tuple[int, int, int],
    w2: Tensor,
    w2_strides: tuple[int, int, int],
    R: int,
    weights: Tensor,
    sort: ExpertSort,
    scaling: float,
    raw_scale: float,
    raw: Tensor | None,
    out: Tensor,
    fp32: bool,
) -> None:
    """For every pair p: raw[p] = raw_scale * x[tok] W1_e (if raw is given), out[p] = (w_p * s * x[tok] W1_e) W2_e.

    W1_e seen as [D, R] and W2_e as [R, C] through the strides; raw [T*k, R] fp32, out [T*k, C] contiguous.
    """
    NP, C = out.shape
    E = w1.shape[0]
    grid = (triton.cdiv(NP, BLOCK_M) + E,)
    moe_lora_sorted_kernel_fused[grid](
        x_ptr=x,
        w1_ptr=w1,
        w2_ptr=w2,
        weights_ptr=weights,
        order_ptr=sort.order,
        offsets_ptr=sort.offsets,
        raw_ptr=out if raw is None else raw,  # any pointer when STORE_RAW is off: never written
        out_ptr=out,
        K=weights.shape[1],
        D=x.shape[1],
        C=C,
        R=R,
        E=E,
        NP=NP,
        scaling=scaling,
        raw_scale=raw_scale,
        stride_xt=x.stride(0),
        stride_xd=x.stride(1),
        stride_w1e=w1_strides[0],
        stride_w1d=w1_strides[1],
        stride_w1r=w1_strides[2],
        stride_w2e=w2_strides[0],
        stride_w2r=w2_strides[1],
        stride_w2c=w2_strides[2],
        stride_gwt=weights.stride(0),
        stride_gwk=weights.stride(1),
        BM=BLOCK_M,
        BD=BLOCK_D,
        BC=BLOCK_C,
        BR=_rank_block(R),
        BG=triton.next_power_of_2(E + 1),
        STORE_RAW=raw is not None,
        FP32=fp32,
        FP32_PREC=fp32_dot_precision(x.dtype),  # x: the activations (or dy)
        num_warps=NUM_WARPS,
    )


def _wgrad(
    lhs: Tensor,
    lhs_scale: float,
    rhs: Tensor,
    weights: Tensor,
    sort: ExpertSort,
    grad: Tensor,
    g_strides: tuple[int, int, int],
    fp32: bool,
) -> Tensor:
    """grad[e] seen as [R, C] through g_strides <- sum over e's pairs p of lhs_scale * w_p * lhs[p] (outer) rhs[tok]."""
    E = grad.shape[0]
    R = lhs.shape[1]
    C = rhs.shape[1]
    grid = (E, triton.cdiv(C, BLOCK_C))
    moe_lora_sorted_kernel_wgrad[grid](
        lhs_ptr=lhs,
        rhs_ptr=rhs,
        weights_ptr=weights,
        order_ptr=sort.order,
        offsets_ptr=sort.offsets,
        grad_ptr=grad,
        K=weights.shape[1],
        C=C,
        R=R,
        lhs_scale=lhs_scale,
        stride_rt=rhs.stride(0),
        stride_rc=rhs.stride(1),
        stride_gwt=weights.stride(0),
        stride_gwk=weights.stride(1),
        stride_ge=g_strides[0],
        stride_gr=g_strides[1],
        stride_gc=g_strides[2],
        BM=BLOCK_M,
        BC=BLOCK_C,
        BR=_rank_block(R),
        FP32=fp32,
        FP32_PREC=fp32_dot_precision(rhs.dtype),  # rhs: the activations (or dy)
        num_warps=NUM_WARPS,
    )
    return grad


def _sum_slots(pairs: Tensor, T: int, k: int) -> Tensor:
    """[T*k, C] per-pair rows -> [T, C], summed over the k slots in a fixed order (no atomics)."""
    C = pairs.shape[1]
    return pairs.view(T, C) if k == 1 else pairs.view(T, k, C).sum(dim=1)


def _new_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)  # contiguous, whatever t's strides


def moe_lora_sorted_fwd(
    x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float, save: bool
) -> tuple[Tensor, Tensor | None, ExpertSort]:
    """-> y [T, out] in x's dtype, u [T*k, r] fp32 in (token, slot) order (None unless save), the sort."""
    T, k = indices.shape
    E, r, _ = A.shape
    sort = sort_by_expert(indices, E)
    u = torch.empty(T * k, r, dtype=torch.float32, device=x.device) if save else None
    y_pairs = torch.empty(T * k, B.shape[1], dtype=x.dtype, device=x.device)
    a_as_w1 = (A.stride(0), A.stride(2), A.stride(1))  # A [E, r, in] as (expert, in, rank)
    b_as_w2 = (B.stride(0), B.stride(2), B.stride(1))  # B [E, out, r] as (expert, rank, out)
    _fused(x, A, a_as_w1, B, b_as_w2, r, weights, sort, scaling, 1.0, u, y_pairs, _use_fp32(x, A, B))
    return _sum_slots(y_pairs, T, k), u, sort


def moe_lora_sorted_bwd(
    dy: Tensor,
    x: Tensor,
    weights: Tensor,
    indices: Tensor,
    A: Tensor,
    B: Tensor,
    u: Tensor,
    sort: ExpertSort,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> grad_x [T, in] (x's dtype), grad_weights [T, k] (weights' dtype), grad_A [E, r, in], grad_B [E, out, r].

    The fused kernel on (dy, B, A) gives g [T*k, r] fp32 (g_p = s * B_e^T dy[tok]) and the per-pair rows of
    grad_x; the wgrad kernel gives grad_A from (w * g, x) and grad_B from (s * w * u, dy). grad_weights is
    <g_p, u_p>, an elementwise product and a sum over r in PyTorch (zero for unused slots: their g and u rows
    are zero). All gradients are contiguous. No atomics.
    """
    T, k = indices.shape
    r, d_in = A.shape[1:]
    fp32 = _use_fp32(dy, x, A, B)
    g = torch.empty(T * k, r, dtype=torch.float32, device=x.device)
    dx_pairs = torch.empty(T * k, d_in, dtype=x.dtype, device=x.device)
    b_as_w1 = (B.stride(0), B.stride(1), B.stride(2))  # B [E, out, r] as (expert, out, rank)
    a_as_w2 = (A.stride(0), A.stride(1), A.stride(2))  # A [E, r, in] as (expert, rank, in)
    _fused(dy, B, b_as_w1, A, a_as_w2, r, weights, sort, scaling, scaling, g, dx_pairs, fp32)
    grad_x = _sum_slots(dx_pairs, T, k)
    grad_w = (g * u).sum(dim=-1).view(T, k).to(weights.dtype)
    grad_A = _new_like(A)
    _wgrad(g, 1.0, x, weights, sort, grad_A, (grad_A.stride(0), grad_A.stride(1), grad_A.stride(2)), fp32)
    grad_B = _new_like(B)
    _wgrad(u, scaling, dy, weights, sort, grad_B, (grad_B.stride(0), grad_B.stride(2), grad_B.stride(1)), fp32)
    return grad_x, grad_w, grad_A, grad_B
