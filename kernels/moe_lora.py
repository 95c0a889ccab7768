"""Triton `moe_lora`, dense-masked regime (small E*r): y[t] = sum_j w[t, j] * s * B[e_j] A[e_j] x[t].

One pass over x computes every expert's rank-space activation, u = x @ A_all^T [T, E*r] (A_all is A seen
as [E*r, in]); the routing gates zero the columns of unpicked experts, v = s * gate * u; one GEMM with
K = E*r, y = v @ B_all (B_all is B seen as [E*r, out]), sums the k picked experts in registers. No sort,
no padding of token groups, no atomics anywhere (forward or backward): results are deterministic. Worth it
while E*r is small (MixLoRA: 8 x 16 = 128): the (E - k) * r wasted columns are cheap next to reading x.
Large E*r wants the sorted, ScatterMoE-style path instead.

The rank r never reaches `tl.dot` alone: every GEMM tiles the flat E*r axis with constexpr blocks >= 16
and masks the tail, so r = 4 or 8 needs no padding and 16-bit dots stay legal on the GPU. Expert weights
are addressed in place through (expert, rank, column) strides: no permuted copies of A or B.
The rank-space tensors u, v, dv, du stay in fp32 (design.md, op 2).

Launchers only (moe_lora_fwd, moe_lora_bwd; shapes in their docstrings) and check_inputs: the op, its
autograd and its fake kernel are moelora.triton_backend's moe_lora.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from moelora.kernels import philox
from torch import Tensor

from moelora.dropout import LoraDropout

PIN_CONFIG_ENV = "MOELORA_TRITON_PIN_CONFIG"  # "1": each kernel's first (pinned) tile, no autotuning

# Tiles per kernel, autotuned on a GPU by bucketed T. The first is the pinned one: the only one under the
# interpreter (a multi-config autotune crashes it) and with MOELORA_TRITON_PIN_CONFIG=1. At the first GPU run
# (H200, 2026-12-04) the pinned tiles ran moe_lora at ~64 TFLOP/s (T=8192, H=4096, I=11008, E=8, r=16:
# ~32 GFLOP fwd in 0.49 ms) on mma.sync; the others offer 64-128-row blocks that Hopper's wgmma can take.
# Every tile is checked against the reference under the interpreter (tests/test_triton_configs.py) and
# on a GPU (bench.gpu_check's configs section).
SHRINK_TILES = [(32, 32, 4), (64, 32, 4), (64, 64, 8), (128, 32, 8)]  # (BT, BD, warps); BN from E*r
EXPAND_TILES = [(32, 64, 4), (64, 64, 4), (64, 128, 8), (128, 128, 8)]  # (BT, BC, warps); BN = 64
WGRAD_TILES = [(64, 32, 4), (128, 32, 4), (128, 64, 8), (256, 32, 8)]  # (BC, BT, warps); BN from E*r
SHRINK_MAX_BLOCK_N = 256  # E*r <= 256 columns in one program: x is read once
EXPAND_BLOCK_N = 64
WGRAD_BLOCK_N = 64
_KEY = ["T_BUCKET", "N", "FP32", "FP32_PREC"]


def gpu_configs(tiles: list[tuple[int, int, int]], names: tuple[str, str]) -> list[triton.Config]:
    """(block, block, warps) tiles as triton Configs."""
    return [triton.Config(dict(zip(names, t[:2], strict=True)), num_warps=t[2]) for t in tiles]


def autotune_list(gpu: list[triton.Config], interpreted: triton.Config | None = None) -> list[triton.Config]:
    """An autotuned kernel's configs: all of `gpu` on a GPU; its first (pinned) one with
    MOELORA_TRITON_PIN_CONFIG=1; under the interpreter (a multi-config autotune crashes it) `interpreted`,
    or the pinned one when none is given."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [interpreted or gpu[0]]
    return gpu[: 1 if os.environ.get(PIN_CONFIG_ENV) == "1" else None]


def t_bucket(T: int) -> int:
    """The autotune key for the token count: its power of two, capped, so that tuning runs once per bucket."""
    return min(triton.next_power_of_2(max(T, 1)), 16384)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.autotune(
    configs=autotune_list(gpu_configs(SHRINK_TILES, ("BT", "BD"))), key=[*_KEY, "D", "K", "STORE_RAW", "STORE_GATED"]
)
@triton.jit
def moe_lora_fwd_kernel_shrink(
    x_ptr,  # [T, D]: x (forward) or dy (backward)
    w_ptr,  # [E, R, D] through strides: A (forward) or B as [E, r, out] (backward)
    weights_ptr,  # [T, K] routing weights
    indices_ptr,  # [T, K] int, -1 = unused slot
    raw_ptr,  # [T, N] fp32, N = E*R: u or dv, ungated (written only if STORE_RAW)
    gated_ptr,  # [T, N] fp32: s * gate * raw, i.e. v or du (written only if STORE_GATED)
    T,
    D,
    N,
    R,
    scaling,
    stride_xt,
    stride_xd,
    stride_we,
    stride_wr,
    stride_wd,
    stride_gwt,
    stride_gwk,
    stride_it,
    stride_ik,
    stride_ot,
    T_BUCKET,  # autotune key only
    K: tl.constexpr,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    STORE_RAW: tl.constexpr,
    STORE_GATED: tl.constexpr,
    FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
):
    i_t, i_n = tl.program_id(0), tl.program_id(1)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
    o_n = i_n * BN + tl.arange(0, BN)  # [BN]
    m_t = o_t < T
    m_n = o_n < N
    e_n = o_n // R  # [BN] expert of each rank-space column
    p_w = w_ptr + e_n.to(tl.int64) * stride_we + (o_n % R).to(tl.int64) * stride_wr  # [BN]

    b_acc = tl.zeros([BT, BN], dtype=tl.float32)
    KCH: tl.constexpr = 1 if FP32_PREC == "ieee" else 1 << 30  # K-blocks per partial sum (fp32_dot_precision)
    n_d = tl.cdiv(D, BD)
    for i_k in range(0, n_d if KCH == 1 else 1):
        b_part = tl.zeros([BT, BN], dtype=tl.float32) if KCH == 1 else b_acc
        for i_d in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_d)):
            o_d = (i_d * BD + tl.arange(0, BD)).to(tl.int64)
            m_d = o_d < D
            b_x = tl.load(
                x_ptr + o_t[:, None] * stride_xt + o_d[None, :] * stride_xd,
                mask=m_t[:, None] & m_d[None, :],
                other=0.0,
            )  # [BT, BD]
            b_w = tl.load(
                p_w[None, :] + o_d[:, None] * stride_wd, mask=m_d[:, None] & m_n[None, :], other=0.0
            )  # [BD, BN]
            if FP32:
                b_part = tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), acc=b_part, input_precision=FP32_PREC)
            else:
                b_part = tl.dot(b_x, b_w.to(b_x.dtype), acc=b_part)
        b_acc = b_acc + b_part if KCH == 1 else b_part

    m_tn = m_t[:, None] & m_n[None, :]
    o_out = o_t[:, None] * stride_ot + o_n[None, :]  # [BT, BN]
    if STORE_RAW:
        tl.store(raw_ptr + o_out, b_acc, mask=m_tn)
    if STORE_GATED:
        # gate[t, n] = sum of the weights of the slots of t that picked column n's expert (0 if none did);
        # -1 and out-of-range indices match no column.
        b_gate = tl.zeros([BT, BN], dtype=tl.float32)
        for j in tl.static_range(K):
            b_e = tl.load(indices_ptr + o_t * stride_it + j * stride_ik, mask=m_t, other=-1)  # [BT]
            # int32 for the [BT, N] compares against the column's expert (int64 there cost registers: sm_90
            # compile_check); an out-of-range id becomes -1 first, so that it cannot wrap onto an expert
            b_e = tl.where((b_e >= 0) & (b_e < N // R), b_e, -1).to(tl.int32)
            b_wj = tl.load(weights_ptr + o_t * stride_gwt + j * stride_gwk, mask=m_t, other=0.0).to(tl.float32)
            b_gate += tl.where(b_e[:, None] == e_n[None, :], b_wj[:, None], 0.0)
        tl.store(gated_ptr + o_out, b_acc * b_gate * scaling, mask=m_tn)


@triton.autotune(configs=autotune_list(gpu_configs(EXPAND_TILES, ("BT", "BC"))), key=[*_KEY, "C", "DROPOUT"])
@triton.jit
def moe_lora_fwd_kernel_expand(
    v_ptr,  # [T, N] fp32 gated rank-space activations, N = E*R
    w_ptr,  # [E, R, C] through strides: B as [E, r, out] (forward) or A (backward, grad_x)
    y_ptr,  # [T, C]
    base_ptr,  # [T, C] added to the product before y's one rounding, read only when HAS_BASE
    T,
    C,
    N,
    R,
    stride_vt,
    stride_we,
    stride_wr,
    stride_wc,
    stride_yt,
    stride_yc,
    stride_bt,
    stride_bc,
    T_BUCKET,  # autotune key only
    seed,  # LoRA dropout (kernels/philox.py), read only when DROPOUT: y's dropout mask of stream X_STREAM
    drop_threshold,
    drop_scale,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BN: tl.constexpr,
    FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)  # [BT]
    o_c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)  # [BC]
    m_t = o_t < T
    m_c = o_c < C

    b_acc = tl.zeros([BT, BC], dtype=tl.float32)
    KCH: tl.constexpr = 1 if FP32_PREC == "ieee" else 1 << 30  # K-blocks per partial sum (fp32_dot_precision)
    n_n = tl.cdiv(N, BN)
    for i_k in range(0, n_n if KCH == 1 else 1):
        b_part = tl.zeros([BT, BC], dtype=tl.float32) if KCH == 1 else b_acc
        for i_n in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_n)):
            o_n = i_n * BN + tl.arange(0, BN)
            m_n = o_n < N
            b_v = tl.load(v_ptr + o_t[:, None] * stride_vt + o_n[None, :], mask=m_t[:, None] & m_n[None, :], other=0.0)
            p_w = w_ptr + (o_n // R).to(tl.int64) * stride_we + (o_n % R).to(tl.int64) * stride_wr  # [BN]
            b_w = tl.load(
                p_w[:, None] + o_c[None, :] * stride_wc, mask=m_n[:, None] & m_c[None, :], other=0.0
            )  # [BN, BC]
            if FP32:
                b_part = tl.dot(b_v, b_w.to(tl.float32), acc=b_part, input_precision=FP32_PREC)
            else:
                # 16-bit weights: v rounded to their dtype for the tensor-core dot, fp32 accumulate.
                b_part = tl.dot(b_v.to(b_w.dtype), b_w, acc=b_part)
        b_acc = b_acc + b_part if KCH == 1 else b_part

    m_tc = m_t[:, None] & m_c[None, :]
    if DROPOUT:  # grad_x of a dropped LoRA input [T, C]: through x's mask, before base (the router's part) joins
        b_keep = philox._keep(seed, philox.X_STREAM, o_t[:, None] * C + o_c[None, :], drop_threshold)
        b_acc = tl.where(b_keep, b_acc * drop_scale, 0.0)
    if HAS_BASE:
        p_b = base_ptr + o_t[:, None] * stride_bt + o_c[None, :] * stride_bc
        b_acc += tl.load(p_b, mask=m_tc, other=0.0).to(tl.float32)
    p_y = y_ptr + o_t[:, None] * stride_yt + o_c[None, :] * stride_yc
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_tc)


@triton.autotune(configs=autotune_list(gpu_configs(WGRAD_TILES, ("BC", "BT"))), key=[*_KEY, "C", "DROPOUT"])
@triton.jit
def moe_lora_bwd_kernel_wgrad(
    lhs_ptr,  # [T, N] fp32: du (grad of A) or v (grad of B)
    rhs_ptr,  # [T, C]: x (grad of A) or dy (grad of B)
    g_ptr,  # [E, R, C] through strides: grad_A, or grad_B as [E, r, out]
    T,
    C,
    N,
    R,
    stride_lt,
    stride_rt,
    stride_rc,
    stride_ge,
    stride_gr,
    stride_gc,
    T_BUCKET,  # autotune key only
    seed,  # LoRA dropout (kernels/philox.py), read only when DROPOUT: rhs is x, dropped with stream X_STREAM
    drop_threshold,
    drop_scale,
    BN: tl.constexpr,
    BC: tl.constexpr,
    BT: tl.constexpr,
    FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    # g[n, c] = sum_t lhs[t, n] * rhs[t, c]: each program owns its output tile and loops over all tokens,
    # so no split-K and no atomics.
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)  # [BN]
    o_c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)  # [BC]
    m_n = o_n < N
    m_c = o_c < C

    b_acc = tl.zeros([BN, BC], dtype=tl.float32)
    KCH: tl.constexpr = 1 if FP32_PREC == "ieee" else 1 << 30  # K-blocks per partial sum (fp32_dot_precision)
    n_t = tl.cdiv(T, BT)
    for i_k in range(0, n_t if KCH == 1 else 1):
        b_part = tl.zeros([BN, BC], dtype=tl.float32) if KCH == 1 else b_acc
        for i_t in range(i_k * KCH, tl.minimum(i_k * KCH + KCH, n_t)):
            o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)
            m_t = o_t < T
            b_l = tl.load(
                lhs_ptr + o_t[None, :] * stride_lt + o_n[:, None], mask=m_n[:, None] & m_t[None, :], other=0.0
            )
            b_r = tl.load(
                rhs_ptr + o_t[:, None] * stride_rt + o_c[None, :] * stride_rc,
                mask=m_t[:, None] & m_c[None, :],
                other=0.0,
            )  # [BT, BC]
            if DROPOUT:  # drop(x) without its 1 / (1 - p), applied to the sum below
                b_keep = philox._keep(seed, philox.X_STREAM, o_t[:, None] * C + o_c[None, :], drop_threshold)
                b_r = tl.where(b_keep, b_r, 0.0)
            if FP32:
                b_part = tl.dot(b_l, b_r.to(tl.float32), acc=b_part, input_precision=FP32_PREC)  # [BN, BT] @ [BT, BC]
            else:
                b_part = tl.dot(b_l.to(b_r.dtype), b_r, acc=b_part)
        b_acc = b_acc + b_part if KCH == 1 else b_part
    if DROPOUT:
        b_acc = b_acc * drop_scale

    p_g = g_ptr + (o_n // R).to(tl.int64)[:, None] * stride_ge + (o_n % R).to(tl.int64)[:, None] * stride_gr
    tl.store(p_g + o_c[None, :] * stride_gc, b_acc.to(g_ptr.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])


def _use_fp32(*tensors: Tensor) -> bool:
    """fp32 dots unless every operand shares one 16-bit dtype (then 16-bit tensor-core dots, fp32 accumulate)."""
    dtypes = {t.dtype for t in tensors}
    return len(dtypes) != 1 or torch.float32 in dtypes


def fp32_dot_precision(activation_dtype: torch.dtype) -> str:
    """input_precision of the dots that take fp32 operands (fp32 adapters, the default; fp32 rank-space values
    and gradients), by the model's activation dtype: "ieee" for fp32 activations (fp32 parity with the
    reference); "tf32x3" for 16-bit ones: three tensor-core passes over the operands' tf32 hi/lo halves,
    close to fp32 (the 16-bit output's rounding dominates). "ieee" dots compile to FMA loops (1024
    fma.rn.f32 per tile in their sm_90 PTX, no mma); these ran the down LoRA and the route_shrink backward of
    the H200 run of 2026-12-04 (not yet timed apart).

    An FMA loop chains every product of its K-block onto the accumulator it is given, so `acc = tl.dot(a,
    b, acc)` over a K loop is one rounding chain over the whole reduction (and Triton folds `acc + tl.dot(a,
    b)` back into that). Every ieee K loop over H, I, the tokens, an expert's pairs or moe_lora's E*r columns
    therefore starts a fresh partial sum per K-block (`KCH = 1` K-blocks per partial) and adds it to the total
    (the fused FFNs' per-slot rank loops, r live terms each, keep one chain): the error of summing K terms
    then grows with the block size plus the number of blocks, not with K. In a float64-checked CPU emulation
    (`python -m bench.accumulation_error`: fp32 FMA steps, BK = 32, K = 512-4096) the one-chain sum erred
    3.5-4.9x more than the blocked one, and 2.6-3.5x more than torch's CPU matmul, which the blocked one
    stays within; the H200 run's fp32 parity misses (errors up to 7.5x cuBLAS's, at reductions of 512-1376)
    look like the one-chain kind (not verified on a GPU since this change). Tensor-core dots keep one
    chain: KCH = 2**30, one pass of the outer loop, and the total itself runs through the inner one (no second
    accumulator live: the sm_90 compile of the 16-bit kernels keeps its registers; that K loop is what
    Triton pipelines)."""
    return "ieee" if activation_dtype in (torch.float32, torch.float64) else "tf32x3"


def _rank_block(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _shrink(
    x: Tensor,
    w: Tensor,
    w_strides: tuple[int, int, int],
    R: int,
    weights: Tensor | None,
    indices: Tensor | None,
    scaling: float,
    raw: bool,
    fp32_prec: str,
) -> tuple[Tensor | None, Tensor | None]:
    """x [T, D] against w seen as [E, R, D] through w_strides -> (raw [T, E*R] fp32 or None, gated [T, E*R] fp32
    or None). Without routing (weights and indices None) only raw is computed. fp32_prec: fp32_dot_precision of
    the model's activations, for the dots with fp32 operands."""
    T, D = x.shape
    N = w.shape[0] * R
    gated_on = weights is not None
    if gated_on != (indices is not None) or not (raw or gated_on):
        raise ValueError("_shrink: pass both weights and indices (gated output) or neither with raw=True")
    out_raw = torch.empty(T, N, dtype=torch.float32, device=x.device) if raw else None
    gated = torch.empty(T, N, dtype=torch.float32, device=x.device) if gated_on else None
    out = gated if gated is not None else out_raw  # the pointer an output that is not written stands in for
    BN = _rank_block(N, SHRINK_MAX_BLOCK_N)
    moe_lora_fwd_kernel_shrink[lambda META: (triton.cdiv(T, META["BT"]), triton.cdiv(N, BN))](
        x_ptr=x,
        w_ptr=w,
        weights_ptr=weights if gated_on else out,  # routing pointers are only read for the gated output
        indices_ptr=indices if gated_on else out,
        raw_ptr=out_raw if raw else out,
        gated_ptr=out,
        T=T,
        D=D,
        N=N,
        R=R,
        scaling=scaling,
        stride_xt=x.stride(0),
        stride_xd=x.stride(1),
        stride_we=w_strides[0],
        stride_wr=w_strides[1],
        stride_wd=w_strides[2],
        stride_gwt=weights.stride(0) if gated_on else 0,
        stride_gwk=weights.stride(1) if gated_on else 0,
        stride_it=indices.stride(0) if gated_on else 0,
        stride_ik=indices.stride(1) if gated_on else 0,
        stride_ot=out.stride(0),
        K=weights.shape[1] if gated_on else 1,
        T_BUCKET=t_bucket(T),
        BN=BN,
        STORE_RAW=raw,
        STORE_GATED=gated_on,
        FP32=_use_fp32(x, w),
        FP32_PREC=fp32_prec,
    )
    return out_raw, gated


def _expand(
    v: Tensor,
    w: Tensor,
    w_strides: tuple[int, int, int],
    R: int,
    C: int,
    dtype: torch.dtype,
    fp32_prec: str,
    base: Tensor | None = None,
    dropout: LoraDropout | None = None,
) -> Tensor:
    """v [T, E*R] fp32 times w seen as [E*R, C] through w_strides (expert, rank, column), plus base [T, C] (any
    float dtype and strides) when given, summed in fp32 -> [T, C] in dtype, rounded once; fp32_prec as in
    _shrink. dropout: the product is the gradient of a dropped LoRA input x [T, C]: it goes through x's mask
    (stream X_STREAM) and 1 / (1 - p) before base is added."""
    T, N = v.shape
    y = torch.empty(T, C, dtype=dtype, device=v.device)
    moe_lora_fwd_kernel_expand[lambda META: (triton.cdiv(T, META["BT"]), triton.cdiv(C, META["BC"]))](
        v_ptr=v,
        w_ptr=w,
        y_ptr=y,
        base_ptr=base if base is not None else y,
        T=T,
        C=C,
        N=N,
        R=R,
        stride_vt=v.stride(0),
        stride_we=w_strides[0],
        stride_wr=w_strides[1],
        stride_wc=w_strides[2],
        stride_yt=y.stride(0),
        stride_yc=y.stride(1),
        stride_bt=base.stride(0) if base is not None else 0,
        stride_bc=base.stride(1) if base is not None else 0,
        T_BUCKET=t_bucket(T),
        BN=_rank_block(N, EXPAND_BLOCK_N),
        FP32=w.dtype == torch.float32,
        FP32_PREC=fp32_prec,
        HAS_BASE=base is not None,
        **philox.kernel_args(dropout),
    )
    return y


def _wgrad(
    lhs: Tensor,
    rhs: Tensor,
    grad: Tensor,
    g_strides: tuple[int, int, int],
    R: int,
    fp32_prec: str,
    dropout: LoraDropout | None = None,
) -> Tensor:
    """grad seen as [E*R, C] through g_strides <- lhs^T @ rhs; lhs [T, E*R] fp32, rhs [T, C]; fp32_prec as in
    _shrink. dropout: rhs is a LoRA input x dropped with it (stream X_STREAM): lhs^T @ drop(x)."""
    T, N = lhs.shape
    C = rhs.shape[1]
    BN = _rank_block(N, WGRAD_BLOCK_N)
    moe_lora_bwd_kernel_wgrad[lambda META: (triton.cdiv(N, BN), triton.cdiv(C, META["BC"]))](
        lhs_ptr=lhs,
        rhs_ptr=rhs,
        g_ptr=grad,
        T=T,
        C=C,
        N=N,
        R=R,
        stride_lt=lhs.stride(0),
        stride_rt=rhs.stride(0),
        stride_rc=rhs.stride(1),
        stride_ge=g_strides[0],
        stride_gr=g_strides[1],
        stride_gc=g_strides[2],
        T_BUCKET=t_bucket(T),
        BN=BN,
        FP32=rhs.dtype == torch.float32,
        FP32_PREC=fp32_prec,
        **philox.kernel_args(dropout),
    )
    return grad


def _a_strides(A: Tensor) -> tuple[int, int, int]:
    return A.stride(0), A.stride(1), A.stride(2)  # A [E, r, in] as (expert, rank, column)


def _b_strides(B: Tensor) -> tuple[int, int, int]:
    return B.stride(0), B.stride(2), B.stride(1)  # B [E, out, r] as (expert, rank, column)


def moe_lora_fwd(
    x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float, save_u: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """-> y [T, out] in x's dtype, u [T, E*r] fp32 (None unless save_u), v [T, E*r] fp32."""
    prec = fp32_dot_precision(x.dtype)
    u, v = _shrink(x, A, _a_strides(A), A.shape[1], weights, indices, scaling, raw=save_u, fp32_prec=prec)
    y = _expand(v, B, _b_strides(B), A.shape[1], B.shape[1], x.dtype, prec)
    return y, u, v


def moe_lora_bwd(
    dy: Tensor,
    x: Tensor,
    weights: Tensor,
    indices: Tensor,
    A: Tensor,
    B: Tensor,
    u: Tensor,
    v: Tensor,
    scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> grad_x [T, in], grad_weights [T, k] (weights' dtype), grad_A [E, r, in], grad_B [E, out, r].

    dv = dy @ B_all^T and du = s * gate * dv come from the shrink kernel run on dy; grad_x = du @ A_all
    from the expand kernel; grad_A = du^T @ x and grad_B = v^T @ dy from the wgrad kernel. grad_weights is
    an elementwise product and a sum over r columns in PyTorch (no GEMM). No atomics.
    """
    E, r, _ = A.shape
    T = weights.shape[0]
    prec = fp32_dot_precision(x.dtype)
    dv, du = _shrink(dy, B, _b_strides(B), r, weights, indices, scaling, raw=True, fp32_prec=prec)
    grad_x = _expand(du, A, _a_strides(A), r, x.shape[1], x.dtype, prec)
    grad_A = _wgrad(du, x, torch.empty_like(A), _a_strides(A), r, prec)
    grad_B = torch.empty_like(B)
    _wgrad(v, dy, grad_B, _b_strides(grad_B), r, prec)
    per_expert = (dv * u).view(T, E, r).sum(dim=-1)  # [T, E]: <dy, B_e A_e x> per expert
    valid = (indices >= 0) & (indices < E)
    picked = per_expert.gather(1, torch.where(valid, indices, 0).long())  # [T, k]
    grad_w = torch.where(valid, picked * scaling, 0.0).to(weights.dtype)
    return grad_x, grad_w, grad_A, grad_B


def check_inputs(x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor) -> None:
    """Raise ValueError / TypeError for arguments the moe_lora kernels (either regime) cannot run."""
    for name, t, dims in (("x", x, 2), ("weights", weights, 2), ("indices", indices, 2), ("A", A, 3), ("B", B, 3)):
        if not isinstance(t, Tensor):
            raise TypeError(f"moe_lora: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"moe_lora: {name} must be {dims}-d, got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"moe_lora: {name} is on {t.device} but x is on {x.device}")
    for name, t in (("x", x), ("weights", weights), ("A", A), ("B", B)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"moe_lora: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_lora: indices must be int32 or int64, got {indices.dtype}")
    T, d_in = x.shape
    E, r, a_in = A.shape
    if weights.shape[0] != T or indices.shape != weights.shape:
        raise ValueError(
            f"moe_lora: weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be [T={T}, k]"
        )
    if a_in != d_in:
        raise ValueError(f"moe_lora: A is [E, r, in={a_in}] but x has in={d_in}")
    if B.shape[0] != E or B.shape[2] != r:
        raise ValueError(f"moe_lora: B must be [E={E}, out, r={r}], got {tuple(B.shape)}")
    if E == 0 or r == 0:
        raise ValueError(f"moe_lora: A has no experts or rank 0: {tuple(A.shape)}")
    # Range of indices: checked only where it costs no host sync (eager CPU tensors: the interpreter). On
    # CUDA an index >= E (or < -1) silently contributes nothing and gets a zero weight gradient.
    if indices.device.type == "cpu" and indices.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= E:
            raise ValueError(f"moe_lora: indices must lie in [-1, E={E}), got values in [{lo}, {hi}]")
