"""The Triton kernel tests' accuracy rule (flash-attn's), shared by their files and interpreter children."""

from __future__ import annotations

import torch


def tolerance_failure(
    name: str, got: torch.Tensor, torch_lp: torch.Tensor, want: torch.Tensor, eps: float
) -> str | None:
    """None if `got` passes, else why. `want` is the fp64 oracle, `torch_lp` PyTorch at the test dtype: the
    kernel may err by twice PyTorch's own error plus 4 ulps (eps) of the largest value; NaN/inf never pass."""
    if not torch.isfinite(got).all():
        return f"{name}: non-finite values (an unwritten output?)"
    err_kernel = (got.double() - want).abs().max().item()
    err_torch = (torch_lp.double() - want).abs().max().item()
    tol = 2 * err_torch + 4 * eps * want.abs().max().item() + 1e-12
    if err_kernel > tol:
        return f"{name}: error {err_kernel:.3g} > {tol:.3g} (torch {err_torch:.3g})"
    return None
