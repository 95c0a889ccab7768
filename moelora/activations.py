"""Which FFN activations the fused backends implement: one table for the C++ (csrc/common.h) and the Triton
(kernels/mixlora_ffn.py) kernels, which compute the same four."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

# By class name: HF's activation classes and torch's modules.
_ACTIVATION_CLASSES = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "ReLU": "relu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
}
_ACTIVATION_FUNCTIONS = {F.silu: "silu", F.relu: "relu", F.gelu: "gelu"}


def activation_name(act: Callable[[Tensor], Tensor]) -> str | None:
    """The kernels' name of a known activation module or function, or None (then the reference runs)."""
    kind = type(act).__name__
    if kind == "GELU":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if kind == "GELUActivation":  # HF's "gelu": erf GELU through F.gelu (its python variant is not matched)
        return "gelu" if getattr(act, "act", None) is F.gelu else None
    return _ACTIVATION_CLASSES.get(kind) or _ACTIVATION_FUNCTIONS.get(act)
