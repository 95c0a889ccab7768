"""Seeded LoRA dropout: a counter-based mask that every backend regenerates instead of storing.

The fused FFNs drop x before the gate/up shrinks and each h_j before the down shrink without writing a
mask: every backend computes the same keep/drop decision for an element from (seed, stream, element
index) with Philox4x32-10 (Salmon et al., SC'11), in the forward and again in the backward. This module
is the definition and the pure-PyTorch implementation that the C++ and Triton ones are tested against.

The mask of `numel` elements for (seed, stream, p):
    element n lies in group g = n // 8; Philox4x32-10 with key (seed mod 2^32, seed // 2^32) and counter
    (g mod 2^32, g // 2^32, stream, 0) gives four 32-bit words w0..w3;
    u(n) = (w[(n % 8) // 2] >> (16 * (n % 2))) & 0xFFFF            (a 16-bit uniform)
    keep(n) = u(n) >= round(p * 65536)                               (drop probability p, to 2^-17)
    dropped value = value * keep / (1 - p)                            (PyTorch's inverted dropout)
One Philox call serves eight elements. Streams: X_STREAM for the LoRA input x [T, H] (n = t * H + c),
H_STREAM for the down LoRA's input h [T, k, I] (n = (t * k + j) * I + i, j the routing slot). The seed
is a fresh draw from torch's default CPU generator per call (`LoraDropout.draw`), so `torch.manual_seed`
reproduces a run, and neither the thread count nor the device changes the mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

X_STREAM = 0
H_STREAM = 1
ELEMENTS_PER_CALL = 8

PHILOX_ROUNDS = 10
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_U32 = 0xFFFFFFFF


class LoraDropout(NamedTuple):
    """One call's LoRA dropout: probability p in (0, 1) and the Philox seed (0 <= seed < 2^63)."""

    p: float
    seed: int

    @staticmethod
    def draw(p: float) -> LoraDropout | None:
        """A fresh seed from torch's default CPU generator (no device sync); None when p == 0."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LoraDropout: p must be in [0, 1), got {p!r}")
        if p == 0.0:
            return None
        return LoraDropout(float(p), int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item()))

    @property
    def threshold(self) -> int:
        """u < threshold drops: round(p * 2^16)."""
        return drop_threshold(self.p)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def drop_threshold(p: float) -> int:
    return round(p * 65536.0)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**64:
        raise ValueError(f"dropout seed must be in [0, 2^64), got {seed}")


def _mul_hi_lo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(a * b) >> 32 and (a * b) mod 2^32 for a constant a < 2^32 and b int64 holding uint32 values, by 16-bit
    halves so that no intermediate leaves int64's range."""
    a1, a0 = a >> 16, a & 0xFFFF
    b1, b0 = b >> 16, b & 0xFFFF
    mid = a1 * b0 + a0 * b1  # < 2^33
    low = a0 * b0 + ((mid & 0xFFFF) << 16)  # < 2^33
    hi = a1 * b1 + (mid >> 16) + (low >> 32)
    return hi & _U32, low & _U32


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 counters; key = the 64-bit seed's two halves."""
    _check_seed(seed)
    c0, c1, c2, c3 = counter
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(PHILOX_M0, c0)
        hi1, lo1 = _mul_hi_lo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def uniform16(seed: int, stream: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """The 16-bit uniforms u(0..numel-1) of (seed, stream) as int64 [numel] (see the module docstring)."""
    if numel < 0:
        raise ValueError(f"uniform16: numel must be >= 0, got {numel}")
    if not 0 <= stream < 2**32:
        raise ValueError(f"uniform16: stream must be in [0, 2^32), got {stream}")
    groups = (numel + ELEMENTS_PER_CALL - 1) // ELEMENTS_PER_CALL
    g = torch.arange(groups, dtype=torch.int64, device=device)
    words = philox4x32((g & _U32, g >> 32, torch.full_like(g, stream), torch.zeros_like(g)), seed)
    w = torch.stack(words, dim=1)  # [groups, 4]
    halves = torch.stack((w & 0xFFFF, w >> 16), dim=2)  # [groups, 4, 2]: element 8g + 2i + h
    return halves.reshape(-1)[:numel]


def dropout_mask(seed: int, stream: int, numel: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """The keep mask (bool [numel]) that every backend's fused dropout uses for (seed, stream, p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_mask: p must be in [0, 1), got {p!r}")
    return uniform16(seed, stream, numel, device) >= drop_threshold(p)


def apply(value: Tensor, dropout: LoraDropout, stream: int) -> Tensor:
    """value * keep / (1 - p), the mask over value's elements in row-major order (value contiguous shape)."""
    keep = dropout_mask(dropout.seed, stream, value.numel(), dropout.p, value.device).reshape(value.shape)
    return value * keep.to(value.dtype) * dropout.scale
