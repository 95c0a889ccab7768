"""The rank-space ends of Triton `mixlora_ffn`, shared by its dense-masked (kernels/mixlora_ffn.py) and
combination-sorted (kernels/mixlora_ffn_sorted.py) regimes: the gate/up shrink before them, the down LoRA's
expand after them.

- `mixlora_ffn_fwd_kernel_shrink` (shrink_x): ua = x @ [Ag_all | Au_all]^T, [T, P*E*r] fp32, one read of x
  per SHRINK_BLOCK_N = 128 rank columns; with the router, `moelora.kernels.route.route_shrink_fwd` does the
  same from one read of x in all. stack_gate_up_a gives the A: gate's and up's stacked, or phi-3's one shared
  A (ua then has one block, read by both: shared_a). shrink_x_bwd: grad_x and grad A from the rank-space
  gradient of ua (moe_lora's expand and wgrad kernels).
- `down_expand`: y = Wd hbar + zd @ Bd_all (moe_lora's expand kernel, K = E*r, with Wd hbar added before its
  one rounding), once the caller has run the frozen Wd on hbar; without Wd hbar, the fp32 delta alone.
  down_expand_bwd: q = dy @ Bd_all^T (the gradient of zd) and grad Bd (moe_lora's shrink and wgrad kernels).
With LoRA dropout the shrink reads x through its seeded mask (stream X_STREAM, kernels/philox.py) and its
backward regenerates it. Launchers here, shapes in their docstrings; the ops rank_shrink and down_expand over
them (fake kernels, autograd) are moelora.triton_ops'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moelora.kernels import philox
from moelora.kernels._common import _dot_mode, dot_operand
from moelora.kernels.moe_lora import _a_strides, _b_strides, _expand, _shrink, _wgrad, fp32_dot_precision
from torch import Tensor

from moelora.dropout import LoraDropout

SHRINK_BLOCK_T = 32
SHRINK_BLOCK_N = 128
SHRINK_BLOCK_D = 64


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


def _new(like: Tensor) -> Tensor:
    """A contiguous uninitialised tensor like `like`: every gradient leaves contiguous, as the fake kernels say."""
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


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


def stack_gate_up_a(gA: Tensor | None, uA: Tensor | None) -> tuple[Tensor | None, bool]:
    """The A of shrink_x / route_shrink: gate's and up's stacked [P*E, R, H] (a differentiable cat), the one A
    they share (gA is uA: phi-3's fused gate_up_proj, shrunk once), or None without either; and whether shared."""
    if gA is not None and uA is not None:
        return (gA, True) if gA is uA else (torch.cat([gA, uA]), False)
    return (gA if gA is not None else uA), False


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
