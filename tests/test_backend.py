"""Backend choice: env var, setter and context manager, auto's fallback warning, clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import moelora
from moelora import backend, ops, reference


def test_set_backend_is_a_setter_and_a_context_manager(monkeypatch):
    monkeypatch.setenv("MOELORA_BACKEND", "auto")
    with moelora.set_backend("auto"):
        assert moelora.get_backend() == "auto"
        with moelora.set_backend("reference"):
            assert moelora.get_backend() == "reference"
        assert moelora.get_backend() == "auto"


def test_env_var_picks_the_backend(monkeypatch):
    monkeypatch.setattr(backend, "_override", [])
    monkeypatch.setenv("MOELORA_BACKEND", "Reference")
    assert moelora.get_backend() == "reference"
    monkeypatch.delenv("MOELORA_BACKEND")
    assert moelora.get_backend() == "auto"


@pytest.fixture
def no_fused_backend(monkeypatch):
    """As on a machine where neither moelora._C nor the Triton kernels exist."""
    monkeypatch.setattr(backend, "_registered", {"reference": reference})
    monkeypatch.setattr(backend, "_cpu_tried", True)
    monkeypatch.setattr(backend, "_warned", set())


def test_auto_falls_back_to_reference_with_one_warning(no_fused_backend):
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    with moelora.set_backend("auto"), pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference"):
        assert backend.resolve(x.device) is reference
        first = ops.route(x, w, top_k=2)
    with moelora.set_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        second = ops.route(x, w, top_k=2)
    assert torch.equal(first.weights, second.weights)


@pytest.mark.parametrize("name", ["triton", "cpu"])
def test_unavailable_fused_backend_raises_a_clear_error(name, no_fused_backend):
    with moelora.set_backend(name), pytest.raises(RuntimeError, match=f"backend '{name}' was requested but"):
        ops.route(torch.randn(3, 8), torch.randn(4, 8), top_k=1)


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with moelora.set_backend("triton"), pytest.raises(RuntimeError, match="cannot run tensors on cpu"):
        ops.route(torch.randn(3, 8), torch.randn(4, 8), top_k=1)


def test_route_needs_exactly_one_of_top_k_and_top_p():
    with pytest.raises(ValueError, match="exactly one of top_k and top_p"):
        ops.route(torch.randn(3, 8), torch.randn(4, 8))
