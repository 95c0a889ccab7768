"""JIT helpers and host-side tiling rules shared by the FFN kernels (mixlora_ffn*.py, mixlora_ffn_sorted*.py) and
route.py, kept apart so that those files import this one instead of each other.

- activations: `ACTIVATIONS` (name -> the ACT constexpr), `_act`, `_act_grad`, `_slot_act_grads` (h_j and the
  pre-activation gradients of one slot);
- dot modes: `_dot_mode` (PREC, DOT_DT of every tl.dot from the activation dtype), `dot_operand` /
  `dot_operand_dtype` (LoRA weights rounded to 16-bit dot operands once on the host from CAST_WEIGHTS_MIN_T
  tokens);
- tiling: `_slices` (how many slices a reduction axis is split into), NOMINAL_BT / NOMINAL_BI;
- the FFN's argument layout: `_experts` (E, R of the LoRAs present), `_rank_views` (ua's gate and up blocks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
NOMINAL_BT = 32  # the token block the slice counts are computed with (the tuned one may differ)
NOMINAL_BI = 64

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_TORCH_DTYPES = {v: k for k, v in _TL_DTYPES.items()}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # silu
        a = z * tl.sigmoid(z)
    elif ACT == 1:  # gelu, erf
        a = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        a = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:  # relu
        a = tl.maximum(z, 0.0)
    return a


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """(act(z), act'(z)); relu' is 0 at 0, as torch's."""
    if ACT == 0:
        sg = tl.sigmoid(z)
        a = z * sg
        da = sg * (1.0 + z * (1.0 - sg))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        a = z * cdf
        da = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        # 0.5 (1 + tanh(u)) = sigmoid(2u), u = c (z + 0.044715 z^3); d/dz = sg (1 - sg) 2c (1 + 3 * 0.044715 z^2)
        sg = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
        a = z * sg
        da = sg + z * sg * (1.0 - sg) * 1.5957691216057308 * (1.0 + 0.134145 * z * z)
    else:
        a = tl.maximum(z, 0.0)
        da = tl.where(z > 0.0, 1.0, 0.0)
    return a, da


@triton.jit
def _slot_act_grads(b_gg, b_uu, b_D, b_w, ACT: tl.constexpr, GATED: tl.constexpr):
    """From a slot's pre-activation gate and up rows and D_j (dh_j = w_j D_j): h_j and the gradients of the
    pre-activation rows, dgg and duu. All [BT, BI] fp32; b_w [BT]."""
    b_dhj = b_w[:, None] * b_D
    if GATED:
        b_a, b_da = _act_grad(b_gg, ACT)
        b_h = b_a * b_uu
        b_dgg = b_dhj * b_uu * b_da
        b_duu = b_dhj * b_a
    else:
        b_a, b_da = _act_grad(b_uu, ACT)
        b_h = b_a
        b_dgg = b_dhj  # unused: an ungated FFN has no G
        b_duu = b_dhj * b_da
    return b_h, b_dgg, b_duu


def _dot_mode(dtype: torch.dtype) -> tuple[str, tl.dtype]:
    """(PREC, DOT_DT) of every tl.dot: ieee fp32 for fp32 activations (and for bf16 under the interpreter,
    whose bf16 dots are wrong); otherwise 16-bit operands with fp32 accumulate (PREC is then moot)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting()):
        return "ieee", tl.float32
    return "tf32", _TL_DTYPES[dtype]


# From this many tokens the LoRA weights a kernel rounds to 16-bit dot operands are rounded once, on the host,
# instead of by every program that loads them: each token block re-reads every weight it uses, from L2 (the
# sorted FFN's fp32 B and Ad rows are ~4x its G/U bytes per block at I = 11008, k = 2, r = 16; the shrinks
# re-read A_all per block of x). The cast reads each weight once more; below a few blocks it would not pay.
# torch's .to and Triton's .to both round to nearest even: the same operands, the same results. Not timed
# on a GPU yet.
CAST_WEIGHTS_MIN_T = 256


def dot_operand_dtype(w: Tensor, dot_dt: tl.dtype, T: int) -> torch.dtype:
    """The dtype a LoRA weight goes to the kernels in: the 16-bit dot dtype DOT_DT when T >= CAST_WEIGHTS_MIN_T
    and w is wider (rounded once, here), w's own otherwise (the kernels round it as they load it)."""
    dt = _TORCH_DTYPES[dot_dt]
    return dt if T >= CAST_WEIGHTS_MIN_T and w.dtype.itemsize > dt.itemsize else w.dtype


def dot_operand(w: Tensor | None, dot_dt: tl.dtype, T: int) -> Tensor | None:
    """w in dot_operand_dtype, its layout kept (the kernels take its strides)."""
    return None if w is None else w.to(dot_operand_dtype(w, dot_dt, T))


def _target_programs(device: torch.device) -> int:
    """Programs worth having in flight: twice the SMs on a GPU; 4 under the interpreter, so that the tests'
    small shapes still split the reductions over several slices."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _slices(parallel_blocks: int, reduced_blocks: int, chunks: int, device: torch.device) -> int:
    """How many slices to split a reduction axis into: 1 when the other axes fill the device (training
    sizes), more at decode sizes, where one program per token block would leave most SMs idle."""
    return max(1, min(reduced_blocks, triton.cdiv(_target_programs(device), parallel_blocks * chunks)))


def _experts(gB: Tensor | None, uB: Tensor | None, dA: Tensor | None) -> tuple[int, int]:
    """(E, R) from the first LoRA present: gB, uB [E, I, R], dA [E, R, I]."""
    if gB is not None or uB is not None:
        B = gB if gB is not None else uB
        return B.shape[0], B.shape[2]
    return dA.shape[0], dA.shape[1]


def _rank_views(ua: Tensor, has_gate: bool, has_up: bool, shared_a: bool, N: int) -> tuple[Tensor, Tensor]:
    """The gate and up column blocks of ua [T, P*N] (ua itself stands in for an absent one). shared_a: gate
    and up LoRAs share one A (phi-3's fused gate_up_proj), so both read ua's only block."""
    ag = ua[:, :N] if has_gate else ua
    au = ua[:, N * (has_gate and not shared_a) :] if has_up else ua
    return ag, au
