"""`prompt_route` in Triton: MiLoRA's once-per-prompt router (pool, rational activation, softmax, top-k).

The math of `moelora.reference.prompt_route`, in fp32 whatever the input dtype. Forward, three launches:
1. scores (attention pooling only): s[b, t] = hidden[b, t] . pool_weight, -inf on padding; grid (B, S blocks).
2. pool: pooled[b, h] over the prompt, padding ignored (attention: one online-softmax pass over hidden that
   also leaves lse[b] for the backward); grid (B, H blocks): prompts are long and H wide, B small.
3. head: g = rational(pooled) (or exact GELU when numerator = denominator = None), logits = g @ Wr^T,
   softmax, top-k, gates; one program per sequence, M small.
Backward (kernels/prompt_route_bwd.py): the head's (grid over H blocks, a loop over the B sequences inside,
so d router_weight sums in registers; d numerator / d denominator leave one partial row per H block, summed by
torch), then the pool's (attention: ds[b, t] first, then d hidden and one d pool_weight row per sequence,
summed by torch). No atomics anywhere: the results are deterministic. The top-k selection is piecewise
constant: gradients flow through the gate values (p on the selected modules) and the probabilities only.

No host sync. An all-padding sequence (a mask row of zeros) is where the reference raises; here it pools to
the zero vector, so its routing is that of g = rational(0) = numerator[0] (GELU: 0) in every feature, and
its hidden states get zero gradient. The model layer checks for empty prompts once at prefill.
CUDA tensors; CPU tensors under TRITON_INTERPRET=1 (tested there in fp32 and fp16; never run on a GPU yet).

This file: the forward's kernels and launcher (prompt_route_fwd), the JIT helpers and launch arguments the
backward shares, and check_inputs; the backward's kernels and launcher (prompt_route_bwd) are
kernels/prompt_route_bwd.py. The op, its autograd and fake kernel are moelora.triton_ops' (PromptRoute);
moelora.triton_backend's prompt_route checks the inputs and runs it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from moelora.reference import POOLINGS

# One pinned config (a multi-config autotune crashes the interpreter). The router is a few reductions over
# [B, S, H] with B small, memory-bound: blocks are sized for coalesced H loads, not tuned on a GPU yet.
BLOCK_S = 16
BLOCK_H = 64
NUM_WARPS = 4
MAX_MODULES = 64  # the head keeps [M, BLOCK_H] router tiles in registers; MiLoRA has M = 7

POOL_CODES = {name: code for code, name in enumerate(POOLINGS)}  # attention 0, mean 1, last 2, max 3
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _keep(mask_ptr, i_b, o_s, m_s, stride_mb, stride_ms, HAS_MASK: tl.constexpr):
    """[BS] True where position o_s of sequence i_b is a prompt token (in range, mask != 0)."""
    b_keep = m_s
    if HAS_MASK:
        b_m = tl.load(mask_ptr + i_b * stride_mb + o_s * stride_ms, mask=m_s, other=0)
        b_keep = m_s & (b_m != 0)
    return b_keep


@triton.jit
def _powers(x, BJ: tl.constexpr):
    """[BH, BJ]: x^0 .. x^(BJ-1) of each element of x [BH], by a running product along the second axis."""
    o_j = tl.arange(0, BJ)
    return tl.cumprod(tl.where(o_j[None, :] == 0, 1.0, x[:, None] + tl.zeros([1, BJ], dtype=tl.float32)), axis=1)


@triton.jit
def _coefficients(num_ptr, den_ptr, NUM: tl.constexpr, DEN: tl.constexpr, BJ: tl.constexpr):
    """The rational as power-series vectors [BJ]: a_j, and |b_j| at index j (0 at j = 0)."""
    o_j = tl.arange(0, BJ)
    b_a = tl.load(num_ptr + o_j, mask=o_j < NUM, other=0.0).to(tl.float32)
    b_b = tl.load(den_ptr + o_j - 1, mask=(o_j >= 1) & (o_j <= DEN), other=0.0).to(tl.float32)
    return b_a, tl.abs(b_b)


@triton.jit
def _activation(x, b_a, b_b, RATIONAL: tl.constexpr, BJ: tl.constexpr):
    """g(x) [BH], fp32: PAU's safe rational P(x) / (1 + sum_j |b_j| |x|^j) (or exact GELU).

    Power sums over [BH, BJ] tiles instead of Horner's rule: a handful of vector operations instead of one
    per coefficient (the interpreter pays per operation); the same fp32 accuracy at MiLoRA's degrees (6, 5).
    """
    if RATIONAL:
        b_p = tl.sum(_powers(x, BJ) * b_a[None, :], axis=1)
        b_g = b_p / (1.0 + tl.sum(_powers(tl.abs(x), BJ) * b_b[None, :], axis=1))
    else:
        b_g = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    return b_g


@triton.jit
def prompt_route_fwd_kernel_scores(
    hidden_ptr,  # [B, S, H] any float dtype, strided
    mask_ptr,  # [B, S] nonzero = prompt token; read only when HAS_MASK
    w_ptr,  # [H] pool_weight, contiguous
    scores_ptr,  # [B, S] fp32 contiguous: -inf on padding
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
    i_b, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_s = (i_s * BS + tl.arange(0, BS)).to(tl.int64)  # [BS]
    m_s = o_s < S
    m_keep = _keep(mask_ptr, i_b, o_s, m_s, stride_mb, stride_ms, HAS_MASK)
    p_row = hidden_ptr + i_b * stride_hb + o_s * stride_hs  # [BS]

    b_acc = tl.zeros([BS], dtype=tl.float32)
    for i_h in range(0, tl.cdiv(H, BH)):
        o_h = (i_h * BH + tl.arange(0, BH)).to(tl.int64)  # [BH]
        m_h = o_h < H
        b_x = tl.load(p_row[:, None] + o_h[None, :] * stride_hh, mask=m_keep[:, None] & m_h[None, :], other=0.0)
        b_w = tl.load(w_ptr + o_h, mask=m_h, other=0.0).to(tl.float32)  # [BH]
        b_acc += tl.sum(b_x.to(tl.float32) * b_w[None, :], axis=1)  # [BS]
    tl.store(scores_ptr + i_b * S + o_s, tl.where(m_keep, b_acc, float("-inf")), mask=m_s)


@triton.jit
def prompt_route_fwd_kernel_pool(
    hidden_ptr,  # [B, S, H] any float dtype, strided
    mask_ptr,  # [B, S]; read only when HAS_MASK
    scores_ptr,  # [B, S] fp32 contiguous; read only for attention pooling
    pooled_ptr,  # [B, H] fp32 contiguous
    lse_ptr,  # [B] fp32: log-sum-exp of the scores (attention pooling only; 0 for an empty prompt)
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

    if POOL == 2:  # last: the largest prompt position, then one row
        b_pos = tl.full([BS], -1, dtype=tl.int64)
        for i_s in range(0, tl.cdiv(S, BS)):
            o_s = (i_s * BS + tl.arange(0, BS)).to(tl.int64)
            m_keep = _keep(mask_ptr, i_b, o_s, o_s < S, stride_mb, stride_ms, HAS_MASK)
            b_pos = tl.maximum(b_pos, tl.where(m_keep, o_s, -1))
        last = tl.max(b_pos, axis=0)
        m_last = m_h & ((o_h * 0 + last) >= 0)  # [BH]; the interpreter rejects a vector & scalar mask
        b_h = tl.load(p_col + tl.maximum(last, 0) * stride_hs, mask=m_last, other=0.0).to(tl.float32)
    elif POOL == 0:  # attention: online softmax over the scores, hidden read once
        b_run = tl.full([BH], -1e30, dtype=tl.float32)  # running max (finite, so exp(-inf - max) = 0)
        b_l = tl.zeros([BH], dtype=tl.float32)  # running sum of exp; every lane holds the same value
        b_acc = tl.zeros([BH], dtype=tl.float32)
        for i_s in range(0, tl.cdiv(S, BS)):
            o_s = (i_s * BS + tl.arange(0, BS)).to(tl.int64)
            m_s = o_s < S
            m_keep = _keep(mask_ptr, i_b, o_s, m_s, stride_mb, stride_ms, HAS_MASK)
            b_s = tl.load(scores_ptr + i_b * S + o_s, mask=m_s, other=float("-inf"))  # [BS]
            b_new = tl.maximum(b_run, tl.max(b_s, axis=0))  # [BH]
            b_alpha = tl.exp(b_run - b_new)
            b_e = tl.exp(b_s[:, None] - b_new[None, :])  # [BS, BH]
            m_x = m_keep[:, None] & m_h[None, :]
            b_x = tl.load(p_col[None, :] + o_s[:, None] * stride_hs, mask=m_x, other=0.0).to(tl.float32)  # [BS, BH]
            b_acc = b_acc * b_alpha + tl.sum(b_e * b_x, axis=0)
            b_l = b_l * b_alpha + tl.sum(b_e, axis=0)
            b_run = b_new
        b_h = tl.where(b_l > 0, b_acc / tl.maximum(b_l, 1e-30), 0.0)
        if i_h == 0:
            b_lse = tl.where(b_l > 0, b_run + tl.log(tl.maximum(b_l, 1e-30)), 0.0)  # [BH], every lane equal
            tl.store(lse_ptr + i_b, tl.max(b_lse, axis=0))
    else:  # mean (1) or max (3)
        b_acc = tl.zeros([BH], dtype=tl.float32) if POOL == 1 else tl.full([BH], float("-inf"), dtype=tl.float32)
        b_n = tl.zeros([BS], dtype=tl.float32)
        for i_s in range(0, tl.cdiv(S, BS)):
            o_s = (i_s * BS + tl.arange(0, BS)).to(tl.int64)
            m_keep = _keep(mask_ptr, i_b, o_s, o_s < S, stride_mb, stride_ms, HAS_MASK)
            m_x = m_keep[:, None] & m_h[None, :]
            b_x = tl.load(p_col[None, :] + o_s[:, None] * stride_hs, mask=m_x, other=0.0).to(tl.float32)
            if POOL == 1:
                b_acc += tl.sum(b_x, axis=0)
            else:
                b_acc = tl.maximum(b_acc, tl.max(tl.where(m_x, b_x, float("-inf")), axis=0))
            b_n += m_keep.to(tl.float32)
        n = tl.sum(b_n, axis=0)
        b_h = b_acc / tl.maximum(n, 1.0) if POOL == 1 else tl.where(n > 0, b_acc, 0.0)
    tl.store(pooled_ptr + i_b * H + o_h, b_h, mask=m_h)


@triton.jit
def prompt_route_fwd_kernel_head(
    pooled_ptr,  # [B, H] fp32 contiguous
    wr_ptr,  # [M, H] router_weight, any float dtype, strided
    num_ptr,  # [NUM] rational numerator a_0..a_m, contiguous
    den_ptr,  # [DEN] rational denominator b_1..b_n, contiguous
    gates_ptr,  # [B, M] fp32 contiguous: p on the top-k modules, 0 elsewhere
    indices_ptr,  # [B, K] int64 contiguous: most probable first
    probs_ptr,  # [B, M] fp32 contiguous
    H,
    M,
    stride_wm,
    stride_wh,
    K: tl.constexpr,
    NUM: tl.constexpr,
    DEN: tl.constexpr,
    RATIONAL: tl.constexpr,
    BM: tl.constexpr,
    BH: tl.constexpr,
    BJ: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_m = tl.arange(0, BM)  # [BM]
    m_m = o_m < M
    b_a, b_b = _coefficients(num_ptr, den_ptr, NUM, DEN, BJ)

    b_logit = tl.zeros([BM], dtype=tl.float32)
    for i_h in range(0, tl.cdiv(H, BH)):
        o_h = (i_h * BH + tl.arange(0, BH)).to(tl.int64)  # [BH]
        m_h = o_h < H
        b_x = tl.load(pooled_ptr + i_b * H + o_h, mask=m_h, other=0.0)  # [BH]
        b_g = _activation(b_x, b_a, b_b, RATIONAL, BJ)
        p_w = wr_ptr + o_m[:, None] * stride_wm + o_h[None, :] * stride_wh
        b_w = tl.load(p_w, mask=m_m[:, None] & m_h[None, :], other=0.0).to(tl.float32)  # [BM, BH]
        b_logit += tl.sum(b_w * b_g[None, :], axis=1)  # the tail of g may be rational(0) != 0, but its W is 0

    b_logit = tl.where(m_m, b_logit, float("-inf"))
    b_p = tl.exp(b_logit - tl.max(b_logit, axis=0))
    b_p = tl.where(m_m, b_p, 0.0)
    b_p = b_p / tl.sum(b_p, axis=0)  # [BM]
    tl.store(probs_ptr + i_b * M + o_m, b_p, mask=m_m)

    # K rounds of argmax, ties to the lower index; probs are >= 0, so -1 marks padding and taken modules.
    b_cur = tl.where(m_m, b_p, -1.0)
    b_gate = tl.zeros([BM], dtype=tl.float32)
    for j in tl.static_range(K):
        b_max = tl.max(b_cur, axis=0)
        arg = tl.min(tl.where(b_cur == b_max, o_m, BM), axis=0)
        tl.store(indices_ptr + i_b * K + j, arg.to(tl.int64))
        b_gate = tl.where(o_m == arg, b_p, b_gate)
        b_cur = tl.where(o_m == arg, -1.0, b_cur)
    tl.store(gates_ptr + i_b * M + o_m, b_gate, mask=m_m)


def _activation_args(numerator: Tensor | None, denominator: Tensor | None, dummy: Tensor) -> dict:
    """Kernel arguments of the activation: the rational's coefficients, or exact GELU when both are None."""
    if numerator is None:
        return dict(num_ptr=dummy, den_ptr=dummy, NUM=1, DEN=1, RATIONAL=False, BJ=2)
    NUM, DEN = numerator.numel(), denominator.numel()
    BJ = triton.next_power_of_2(max(NUM, DEN + 1))  # powers x^0 .. x^max(m, n)
    return dict(
        num_ptr=numerator.contiguous(), den_ptr=denominator.contiguous(), NUM=NUM, DEN=DEN, RATIONAL=True, BJ=BJ
    )


def _grid_h(H: int) -> int:
    return triton.cdiv(H, BLOCK_H)


def _mask_arg(mask: Tensor | None, hidden: Tensor) -> tuple[Tensor, int, int]:
    """(pointer tensor, stride_b, stride_s): a bool mask is read as its bytes; no mask -> hidden as a dummy."""
    if mask is None:
        return hidden, 0, 0
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)


def prompt_route_fwd(
    hidden: Tensor,
    mask: Tensor | None,
    router_weight: Tensor,
    numerator: Tensor | None,
    denominator: Tensor | None,
    pool_weight: Tensor | None,
    top_k: int,
    pooling: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> gates [B, M], indices [B, k] int64, probs [B, M], and for the backward pooled [B, H] fp32,
    scores [B, S] and lse [B] fp32 (attention pooling; empty tensors otherwise)."""
    Bn, S, H = hidden.shape
    M = router_weight.shape[0]
    dev = hidden.device
    pool = POOL_CODES[pooling]
    mask_t, stride_mb, stride_ms = _mask_arg(mask, hidden)
    strides = dict(stride_hb=hidden.stride(0), stride_hs=hidden.stride(1), stride_hh=hidden.stride(2))
    mask_args = dict(mask_ptr=mask_t, stride_mb=stride_mb, stride_ms=stride_ms, HAS_MASK=mask is not None)

    pooled = torch.empty(Bn, H, dtype=torch.float32, device=dev)
    if pool == POOL_CODES["attention"]:
        pool_weight = pool_weight.contiguous()
        scores = torch.empty(Bn, S, dtype=torch.float32, device=dev)
        lse = torch.empty(Bn, dtype=torch.float32, device=dev)
        prompt_route_fwd_kernel_scores[(Bn, triton.cdiv(S, BLOCK_S))](
            hidden_ptr=hidden,
            w_ptr=pool_weight,
            scores_ptr=scores,
            S=S,
            H=H,
            BS=BLOCK_S,
            BH=BLOCK_H,
            num_warps=NUM_WARPS,
            **strides,
            **mask_args,
        )
    else:
        # Two distinct empty tensors: outputs of a torch.library op must not alias each other.
        scores, lse = (torch.empty(0, dtype=torch.float32, device=dev) for _ in range(2))
    prompt_route_fwd_kernel_pool[(Bn, _grid_h(H))](
        hidden_ptr=hidden,
        scores_ptr=scores if scores.numel() else pooled,
        pooled_ptr=pooled,
        lse_ptr=lse if lse.numel() else pooled,
        S=S,
        H=H,
        POOL=pool,
        BS=BLOCK_S,
        BH=BLOCK_H,
        num_warps=NUM_WARPS,
        **strides,
        **mask_args,
    )

    gates = torch.empty(Bn, M, dtype=torch.float32, device=dev)
    indices = torch.empty(Bn, top_k, dtype=torch.int64, device=dev)
    probs = torch.empty(Bn, M, dtype=torch.float32, device=dev)
    prompt_route_fwd_kernel_head[(Bn,)](
        pooled_ptr=pooled,
        wr_ptr=router_weight,
        **_activation_args(numerator, denominator, pooled),
        gates_ptr=gates,
        indices_ptr=indices,
        probs_ptr=probs,
        H=H,
        M=M,
        stride_wm=router_weight.stride(0),
        stride_wh=router_weight.stride(1),
        K=top_k,
        BM=triton.next_power_of_2(max(M, 2)),
        BH=BLOCK_H,
        num_warps=NUM_WARPS,
    )
    return gates, indices, probs, pooled, scores, lse


def check_inputs(
    hidden: Tensor,
    mask: Tensor | None,
    router_weight: Tensor,
    numerator: Tensor | None,
    denominator: Tensor | None,
    top_k: int,
    pooling: str,
    pool_weight: Tensor | None,
) -> None:
    """Raise ValueError / TypeError for arguments the prompt_route kernels cannot run; no host sync."""
    if pooling not in POOLINGS:
        raise ValueError(f"prompt_route: pooling must be one of {POOLINGS}, got {pooling!r}")
    if (numerator is None) != (denominator is None):
        raise ValueError("prompt_route: pass both numerator and denominator (rational), or neither (exact GELU)")
    named = [("hidden", hidden, 3), ("router_weight", router_weight, 2)]
    if numerator is not None:
        named += [("numerator", numerator, 1), ("denominator", denominator, 1)]
    if mask is not None:
        named.append(("mask", mask, 2))
    if pooling == "attention":
        if pool_weight is None:
            raise ValueError("prompt_route: pooling='attention' needs pool_weight [H]")
        named.append(("pool_weight", pool_weight, 1))
    for name, t, dims in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"prompt_route: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"prompt_route: {name} must be {dims}-d, got shape {tuple(t.shape)}")
        if t.device != hidden.device:
            raise ValueError(f"prompt_route: {name} is on {t.device} but hidden is on {hidden.device}")
        if name != "mask" and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"prompt_route: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    Bn, S, H = hidden.shape
    M = router_weight.shape[0]
    if Bn == 0:
        raise ValueError("prompt_route: hidden has no sequences (B = 0)")
    if S == 0:
        raise ValueError("prompt_route: the prompt is empty (sequence length 0); routing needs a prompt token")
    if mask is not None and tuple(mask.shape) != (Bn, S):
        raise ValueError(f"prompt_route: mask must be [B={Bn}, S={S}], got {tuple(mask.shape)}")
    if mask is not None and mask.is_complex():
        raise TypeError(f"prompt_route: mask must be bool, an integer or a float dtype, got {mask.dtype}")
    if router_weight.shape[1] != H:
        raise ValueError(f"prompt_route: router_weight is [M, H={router_weight.shape[1]}] but hidden has H={H}")
    if not 1 <= M <= MAX_MODULES:
        raise ValueError(f"prompt_route: router_weight must have 1..{MAX_MODULES} modules (rows), got {M}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= M:
        raise ValueError(f"prompt_route: top_k must be in [1, {M}] (the number of LoRA modules), got {top_k!r}")
    if numerator is not None and (numerator.numel() < 1 or denominator.numel() < 1):
        raise ValueError(
            f"prompt_route: the rational needs numerator [m + 1] and denominator [n], m, n >= 0 / >= 1; got "
            f"{tuple(numerator.shape)} and {tuple(denominator.shape)}"
        )
    if pooling == "attention" and pool_weight.shape[0] != H:
        raise ValueError(f"prompt_route: pool_weight must be [H={H}], got {tuple(pool_weight.shape)}")
    if hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"prompt_route: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {hidden.device}"
        )
