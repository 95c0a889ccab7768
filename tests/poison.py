"""NaN-poisoned allocations for the Triton kernel tests (each kernel's test file and its interpreter child)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def nan_empty() -> Iterator[None]:
    """torch.empty / empty_like return NaN-filled float tensors, so an output a kernel leaves unwritten fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: nan_fill(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: nan_fill(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
