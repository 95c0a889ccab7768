"""MiLoRA's decoding steps: two dense GEMMs scaled per sequence (moelora.layers.GATED_DENSE_TOKENS), the
gate x scaling cached per routing, nothing run for a module no sequence picked; checked against the prefill
path (segmented_lora) on every backend of this machine."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model

import moelora
from moelora import MiLoraConfig, get_moelora_model, layers

# The C++ extension is built on every machine with a compiler (test_cpu_backend.py fails loudly otherwise).
BACKENDS = [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu")]


def _model(top_k: int = 2, layers_: int = 2):
    config = MiLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, top_k=top_k)
    model = get_moelora_model(tiny_model("llama", num_hidden_layers=layers_), config)
    randomize_adapters(model, seed=3, std=0.5)
    return model.eval()


def _prompts(rows: int, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if rows > 1:
        mask[1, :2] = 0  # left padding
        ids[1, :2] = 0
    return ids, mask


def _decode(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill, then `steps` greedy decoding steps; each step's logits."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        logits = []
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    return logits


@pytest.mark.parametrize("rows", [1, 3], ids=["one-sequence", "three-sequences"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_decoding_steps_equal_the_segmented_path(backend, rows, monkeypatch):
    model = _model()
    ids, mask = _prompts(rows)
    with moelora.set_backend(backend):
        dense = _decode(model, ids, mask, steps=4)
        monkeypatch.setattr(layers, "GATED_DENSE_TOKENS", 0)  # every call through segmented_lora
        segmented = _decode(model, ids, mask, steps=4)
    for got, want in zip(dense, segmented, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_module_no_sequence_picked_runs_nothing_on_cpu(backend):
    """One sequence, top-1 of the 7 modules: a decoding step runs one LoRA per layer."""
    model = _model(top_k=1, layers_=2)
    ids, mask = _prompts(rows=1)
    with moelora.set_backend(backend):
        _decode(model, ids, mask, steps=2)
        ran = moelora.backend.ops_ran()  # the last forward: a decoding step
    assert sum(ran.get("lora", {}).values()) == 2
    assert "segmented_lora" not in ran


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_prefill_replaces_the_cached_gate_scales(backend):
    model = _model()
    fresh = _model()  # the same weights and routers (seeded)
    first, first_mask = _prompts(rows=2, seed=1)
    second, second_mask = _prompts(rows=2, seed=2)
    with moelora.set_backend(backend):
        _decode(model, first, first_mask, steps=2)
        gates_first = [r.routing.gates.clone() for r in model.milora_routers()]
        reused = _decode(model, second, second_mask, steps=2)
        gates_second = [r.routing.gates for r in model.milora_routers()]
        alone = _decode(fresh, second, second_mask, steps=2)
    # The prompts route differently, so stale cached scales would show in the logits.
    assert any(not torch.equal(a, b) for a, b in zip(gates_first, gates_second, strict=True))
    for got, want in zip(reused, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
