"""pytest-benchmark suite of the tiny llama with MixLoRA: train step and generation, parity as a real test."""

from __future__ import annotations

import pytest
import torch

from bench import model
from bench.conftest import skip_if_missing, tiny_shape
from bench.suites import MODEL
from bench.timing import check_parity


@pytest.fixture
def tiny_model_inputs() -> model.ModelInputs:
    return model.make_inputs(tiny_shape(MODEL))


@pytest.mark.parametrize("with_grads", [False, True], ids=["logits", "logits+grads"])
def test_fused_parity(with_grads, tiny_model_inputs):
    skip_if_missing(MODEL, "fused")
    parity = check_parity(MODEL, "fused", tiny_model_inputs, with_grads)
    assert parity.ok, parity.summary()


def test_reference_outputs_cover_every_adapter_tensor(tiny_model_inputs):
    out = model.outputs("reference", tiny_model_inputs, with_grads=True)
    grads = {k: v for k, v in out.items() if k.startswith("d")}
    s = tiny_model_inputs.shape
    assert len(grads) == s.L * (4 * 2 + 1 + 3 * 2)  # per layer: q/k/v/o A and B, the router, 3 experts' A and B
    assert all(g.abs().sum() > 0 for g in grads.values())  # B is drawn non-zero: every gradient counts
    assert out["logits"].shape == (s.B, s.S, s.V)


def test_models_are_rebuilt_identically(tiny_model_inputs):
    a, b = model.build(tiny_model_inputs, adapters=True), model.build(tiny_model_inputs, adapters=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("mode", model.MODES)
@pytest.mark.parametrize("provider", MODEL.providers)
def test_latency(benchmark, provider, mode, tiny_model_inputs):
    skip_if_missing(MODEL, provider)
    if not MODEL.runs(provider, mode):
        pytest.skip(f"{provider} has no {mode} mode")
    out = benchmark(MODEL.step(provider, tiny_model_inputs, mode))
    s = tiny_model_inputs.shape
    if mode == "generate":
        assert out.shape == (s.B, s.P + s.N)  # exactly N new tokens
    else:
        assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))


def test_tokens_per_call():
    shape = tiny_shape(MODEL)
    assert MODEL.tokens_per_call(shape, "generate") == shape.B * shape.N
    assert MODEL.tokens_per_call(shape, "train") is None


def test_milora_mixed_loads_one_adapter_per_sequence(tiny_model_inputs):
    s = tiny_model_inputs.shape
    mixed = model.build_milora(tiny_model_inputs, adapters=s.B)
    assert sorted(mixed.peft_config) == sorted(model.milora_names(s.B)) and s.B > 1
    assert all(type(c).__name__ == "MiLoraConfig" for c in mixed.peft_config.values())
    with pytest.raises(ValueError, match="no train mode"):
        MODEL.step("milora-mixed", tiny_model_inputs, "train")
