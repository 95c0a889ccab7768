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


def test_ops_ran_counts_each_op_under_the_backend_that_ran_it():
    backend.reset_ops_ran()
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    ops.route(x, w, top_k=2)
    ops.route(x, w, top_k=1)
    ops.lora(x, torch.randn(2, 8), torch.randn(3, 2), 2.0)
    assert backend.ops_ran() == {"lora": {"reference": 1}, "route": {"reference": 2}}
    backend.reset_ops_ran()
    assert backend.ops_ran() == {}


class _NoMiLoraOps:
    """A fused backend without MiLoRA's ops and with a fallback inside moe_lora."""

    @staticmethod
    def moe_lora(x, weights, indices, A, B, scaling):
        backend.fell_back("moe_lora", "test reason")
        return reference.moe_lora(x, weights, indices, A, B, scaling)


def test_fallbacks_warn_once_per_reason_and_count_as_reference(monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_registered", {"reference": reference, "cpu": _NoMiLoraOps})
    monkeypatch.setattr(backend, "_cpu_tried", True)
    backend.reset_ops_ran()
    x = torch.randn(4, 6)
    weights, indices = torch.full((4, 1), 1.0), torch.zeros(4, 1, dtype=torch.int64)
    A, B = torch.randn(1, 2, 6), torch.randn(1, 3, 2)
    token_seq, seq = torch.arange(4), torch.zeros(4, dtype=torch.int64)
    with moelora.set_backend("cpu"):
        with pytest.warns(RuntimeWarning, match="moe_lora ran on the reference backend.*test reason"):
            ops.moe_lora(x, weights, indices, A, B, 1.0)
        with pytest.warns(RuntimeWarning, match="the cpu backend has no segmented_lora op"):
            ops.segmented_lora(x, token_seq, seq, torch.ones(4), A, B, torch.ones(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same reasons again: no second warning
            ops.moe_lora(x, weights, indices, A, B, 1.0)
            ops.segmented_lora(x, token_seq, seq, torch.ones(4), A, B, torch.ones(1))
    assert backend.ops_ran() == {"moe_lora": {"reference": 2}, "segmented_lora": {"reference": 2}}


def test_a_model_forward_reports_the_ops_it_ran():
    from conftest import randomize_adapters, tiny_model

    model = moelora.get_moelora_model(tiny_model(), moelora.MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        model(torch.randint(3, 60, (2, 5)))
    ran = backend.ops_ran()
    # two layers on the reference backend (conftest), which has no fused routed op: route, then the FFN
    assert ran["route"] == {"reference": 2} and ran["mixlora_ffn"] == {"reference": 2}
    assert set(ran["lora"]) == {"reference"}
