"""Peers' files both ways, against the real packages (the test extra): our MoE-PEFT export loads unedited in
the `mixlora` package, PEFT-saved LoRA adapters load in moelora, and our LoRA saves load in PEFT; each gives
the other's logits (fp32, tiny random local models: nothing is downloaded)."""

from __future__ import annotations

import mixlora
import peft
import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from moelora import LoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model

IDS = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
TOL = dict(rtol=1e-5, atol=1e-5)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _saved_base(family: str, path) -> nn.Module:
    """The tiny base saved to a folder and read back, as a user loads a checkpoint (its name_or_path is set)."""
    tiny_model(family).save_pretrained(str(path))
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _package_model(adapter_dir: str) -> nn.Module:
    """mixlora 0.2.3's own loader on the unedited folder: it reads the base from base_model_name_or_path."""
    model, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(adapter_dir)
    model.eval()
    # The package keeps its experts in plain dicts (mlp.mixlora_moes, moe.experts_), not submodules, so
    # model.eval() does not reach them and their LoRA dropout would stay on; switch it off by hand.
    for module in model.modules():
        for moe in getattr(module, "mixlora_moes", {}).values():
            for expert in moe.experts_.values():
                expert.eval()
    return model


# The package implements top-k routing ("mixlora") only, and ignores expert_lora (it builds every expert with
# the adapter's own r and alpha), so those are not exported to it here.
MIXLORA_CASES = [
    pytest.param("llama", dict(r=4, lora_alpha=8, num_experts=4, top_k=2), id="llama-all7-r4-E4-top2"),
    pytest.param("llama", dict(r=8, lora_alpha=16.0, num_experts=3, top_k=1), id="llama-r8-E3-top1-float-alpha"),
    pytest.param(
        "llama",
        dict(r=4, lora_alpha=8, num_experts=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        id="llama-qv-up-down",
    ),
    pytest.param("llama", dict(r=4, lora_alpha=8, num_experts=2, use_rslora=True), id="llama-rslora"),
    pytest.param(
        "llama",
        dict(r=4, lora_alpha=8, num_experts=2, router_aux_loss_coef=0, router_init_range=1, jitter_noise=0),
        id="llama-integer-router-fields",
    ),
    pytest.param("mistral", dict(r=4, lora_alpha=8, num_experts=4), id="mistral"),
    pytest.param("qwen2", dict(r=4, lora_alpha=8, num_experts=4), id="qwen2"),
    pytest.param("gemma", dict(r=4, lora_alpha=8, num_experts=4), id="gemma"),
    pytest.param("gemma2", dict(r=4, lora_alpha=8, num_experts=4), id="gemma2"),
    pytest.param("phi3", dict(r=4, lora_alpha=8, num_experts=4), id="phi3"),
    pytest.param("phi", dict(r=4, lora_alpha=8, num_experts=4), id="phi"),
]


@pytest.mark.parametrize(("family", "config"), MIXLORA_CASES)
def test_our_moe_peft_export_loads_unedited_in_the_mixlora_package(family, config, tmp_path):
    ours = get_moelora_model(_saved_base(family, tmp_path / "base"), MixLoraConfig(**config))
    randomize_adapters(ours, std=0.3)
    ours.eval()
    ours.save_pretrained(str(tmp_path / "adapter"), format="moe-peft")
    torch.testing.assert_close(_logits(_package_model(str(tmp_path / "adapter"))), _logits(ours), **TOL)


LORA_CASES = [
    pytest.param("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), id="llama-qv-r4"),
    pytest.param(
        "llama",
        dict(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]),
        id="llama-six-r8",
    ),
    pytest.param("llama", dict(r=16, lora_alpha=8, target_modules=["down_proj"], use_rslora=True), id="llama-rslora"),
    pytest.param("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True), id="dora"),
    pytest.param("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), id="qwen2"),
    pytest.param("phi3", dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]), id="phi3-fused"),
    pytest.param("phi", dict(r=4, lora_alpha=8, target_modules=["q_proj", "dense", "fc1", "fc2"]), id="phi"),
]


@pytest.mark.parametrize(("family", "config"), LORA_CASES)
def test_a_peft_saved_lora_loads_in_moelora_with_peft_logits(family, config, tmp_path):
    theirs = peft.get_peft_model(tiny_model(family), peft.LoraConfig(**config))
    randomize_adapters(theirs, std=0.3)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    ours = MoeLoraModel.from_pretrained(tiny_model(family), str(tmp_path))
    torch.testing.assert_close(_logits(ours), _logits(theirs), **TOL)


@pytest.mark.parametrize(("family", "config"), LORA_CASES)
def test_our_lora_save_loads_in_peft_with_our_logits(family, config, tmp_path):
    ours = get_moelora_model(tiny_model(family), LoraConfig(**config))
    randomize_adapters(ours, std=0.3)
    ours.eval()
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_model(family), str(tmp_path))
    assert isinstance(theirs.peft_config["default"], peft.LoraConfig)
    torch.testing.assert_close(_logits(theirs.eval()), _logits(ours), **TOL)
