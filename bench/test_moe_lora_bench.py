"""pytest-benchmark suite of the gathered per-expert LoRA alone, with parity as a real test."""

from __future__ import annotations

import pytest
import torch

from bench import moe_lora
from bench.conftest import skip_if_missing, tiny_shape
from bench.suites import MOE_LORA
from bench.timing import MODES, check_parity


@pytest.mark.parametrize("with_grads", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", MOE_LORA.checked)
def test_parity(provider, with_grads):
    skip_if_missing(MOE_LORA, provider)
    parity = check_parity(MOE_LORA, provider, moe_lora.make_inputs(tiny_shape(MOE_LORA)), with_grads)
    assert parity.ok, parity.summary()
    assert set(parity.rel_err) == {"y"} | ({"dx", "dweights", "dA", "dB"} if with_grads else set())


def test_parity_catches_unweighted_experts(monkeypatch):
    def unweighted(inp):
        ones = torch.ones_like(inp.weights)
        return lambda: moe_lora.reference.moe_lora(inp.x, ones, inp.indices, inp.A, inp.B, inp.scaling)

    monkeypatch.setitem(moe_lora.PROVIDERS, "loop", unweighted)
    parity = check_parity(MOE_LORA, "loop", moe_lora.make_inputs(tiny_shape(MOE_LORA)), with_grads=False)
    assert not parity.ok


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", MOE_LORA.providers)
def test_latency(benchmark, provider, mode):
    skip_if_missing(MOE_LORA, provider)
    out = benchmark(MOE_LORA.step(provider, moe_lora.make_inputs(tiny_shape(MOE_LORA)), mode))
    assert torch.isfinite(out if mode == "fwd" else out[0]).all()
