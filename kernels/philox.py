"""The seeded LoRA-dropout mask of moelora.dropout inside Triton kernels: Philox4x32-10 on uint32 lanes.

`_keep(seed, stream, n, threshold)` gives, for a tile of int64 element indices n, the keep decision of
moelora.dropout.dropout_mask bit for bit: group g = n // 8, Philox4x32-10 with key (seed lo32, seed hi32) and
counter (g lo32, g hi32, stream, 0), the element's 16-bit uniform u from word (n % 8) // 2, half n % 2, and
keep iff u >= threshold = round(p * 65536) (drop_threshold). The fused FFN kernels call it on their x and h
tiles in the forward and again in the backward, so no mask is ever stored; `dropout_mask` here launches it
alone, so that the mask a kernel used can be checked outside it (tests/test_triton_dropout.py).

GPU cost, not yet timed: every element runs its own 10 Philox rounds (2 umulhi, 2 mul, 4 xor and 2 add
each) although one call serves 8 elements, 8x the work a group-wise generator would do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moelora import dropout as seeded_dropout
from moelora.dropout import LoraDropout, drop_threshold

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
X_STREAM = tl.constexpr(seeded_dropout.X_STREAM)  # x [T, H]: n = t * H + c
H_STREAM = tl.constexpr(seeded_dropout.H_STREAM)  # h [T, k, I]: n = (t * k + j) * I + i
BLOCK = 1024


def kernel_args(dropout: LoraDropout | None) -> dict:
    """The dropout arguments every dropout-capable kernel takes: DROPOUT (constexpr: off for None or p = 0, so
    that those launches compile as kernels without dropout), seed, drop_threshold and drop_scale = 1 / (1 - p).
    The kernels mask with `keep` and multiply by drop_scale once, on the accumulated result (the reference
    scales each dropped element: the same product up to the order of the fp32 roundings)."""
    if dropout is None or dropout.p == 0.0:
        return dict(seed=0, drop_threshold=0, drop_scale=1.0, DROPOUT=False)
    if not 0 <= dropout.seed < 2**63:
        raise ValueError(f"dropout: the Triton backend takes seeds in [0, 2^63), got {dropout.seed}")
    return dict(seed=dropout.seed, drop_threshold=dropout.threshold, drop_scale=dropout.scale, DROPOUT=True)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 tensors of one shape; k0, k1 uint32 scalars."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _keep(seed, stream, n, threshold):
    """The keep mask (bool, n's shape) of elements n (int64 >= 0) for (seed, stream): u(n) >= threshold."""
    s = tl.to_tensor(seed).to(tl.uint64)  # to_tensor: a seed, stream or threshold of 1 arrives as a constexpr
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    g = n // 8
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + tl.to_tensor(stream).to(tl.uint32)
    c3 = tl.zeros_like(c0)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    word = (n % 8) // 2
    w = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    u = (w >> ((n % 2) * 16).to(tl.uint32)) & 0xFFFF
    return u.to(tl.int32) >= threshold


@triton.jit
def dropout_mask_kernel(
    out_ptr,  # [numel] int8 (bool) out
    seed,
    stream,
    numel,
    threshold,
    BLOCK: tl.constexpr,
):
    o_n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    m_n = o_n < numel
    tl.store(out_ptr + o_n, _keep(seed, stream, o_n, threshold).to(tl.int8), mask=m_n)


def dropout_mask(seed: int, stream: int, numel: int, p: float, device: torch.device | str) -> Tensor:
    """moelora.dropout.dropout_mask computed by the kernels' Philox helper: bool [numel] on device."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"dropout_mask: seed must be in [0, 2^64), got {seed}")
    if not 0 <= stream < 2**32:
        raise ValueError(f"dropout_mask: stream must be in [0, 2^32), got {stream}")
    if numel < 0:
        raise ValueError(f"dropout_mask: numel must be >= 0, got {numel}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_mask: p must be in [0, 1), got {p!r}")
    out = torch.empty(numel, dtype=torch.int8, device=device)
    if numel > 0:
        dropout_mask_kernel[(triton.cdiv(numel, BLOCK),)](
            out_ptr=out, seed=seed, stream=stream, numel=numel, threshold=drop_threshold(p), BLOCK=BLOCK
        )
    return out.view(torch.bool)
