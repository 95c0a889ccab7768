"""Shared fixtures: tiny random-weight models of every supported family, built locally (nothing downloaded)."""

from __future__ import annotations

import _triton_worker
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moelora

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "phi"]
VOCAB = 64


def tiny_config(family: str, **overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random-weight causal LM of `family` in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).to(dtype)
    return model.eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Give every adapter tensor (B included, which starts at zero) random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g) * std
            if "magnitude" in name:
                p.mul_(1.0 + noise.abs())
            elif "rational" in name:
                # Near its GELU initialisation: random coefficients make a nearly constant activation, and then
                # MiLoRA's router picks the same modules for every prompt (no test would see per-prompt gates).
                p.mul_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise)


@pytest.fixture(autouse=True)
def _reference_backend():
    """Tests run the reference backend unless they pick another; TF32 stays off for references."""
    with moelora.set_backend("reference"):
        yield


@pytest.fixture(scope="module")
def worker_results(request) -> dict[str, list[str]]:
    """The Triton test module's interpreter worker, run once per module (tests/_triton_worker.py)."""
    timeout = getattr(request.module, "WORKER_TIMEOUT", _triton_worker.DEFAULT_TIMEOUT)
    return _triton_worker.worker_results(request.module.__file__, timeout)
