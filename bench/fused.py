"""The `fused` provider of every suite: moelora's ops under the fused backend of the tensors' device.

CPU tensors run backend "cpu" (the C++ extension), CUDA tensors backend "triton". Until a backend
registers itself, moelora.backend.resolve raises RuntimeError and the provider is skipped with a note.
"""

from __future__ import annotations

import torch

from moelora import backend


def backend_name(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpu"


def fused_backend(device: torch.device) -> str:
    """The fused backend's name for `device`, resolved once so that a lazily loaded extension is loaded now,
    in the provider's untimed set-up, not in its first timed (or memory-probed) call."""
    name = backend_name(device)
    with backend.set_backend(name):
        backend.resolve(device)
    return name


def fused_missing(device: torch.device) -> str | None:
    """Why the fused backend cannot run tensors on `device`, or None when it can."""
    with backend.set_backend(backend_name(device)):
        try:
            backend.resolve(device)
        except RuntimeError as exc:
            return f"fused skipped: {exc}"
    return None
