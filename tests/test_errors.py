"""Bad input raises a ValueError that names the problem, before the model is touched."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

import moelora
from moelora import MixLoraConfig, MoeLoraModel, get_moelora_model


def _snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snapshot):
    types, state = snapshot
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


BAD_CONFIGS = [
    pytest.param(dict(top_k=0), "top_k", id="top_k-0"),
    pytest.param(dict(top_k=9, num_experts=8), "top_k", id="top_k-above-E"),
    pytest.param(dict(routing_strategy="mixlora-dynamic", top_p=0.0), "top_p", id="top_p-0"),
    pytest.param(dict(routing_strategy="mixlora-dynamic", top_p=1.5), "top_p", id="top_p-1.5"),
    pytest.param(dict(r=0), "r must", id="r-0"),
    pytest.param(dict(r=-4), "r must", id="r-negative"),
    pytest.param(dict(num_experts=0), "num_experts", id="E-0"),
    pytest.param(dict(routing_strategy="switch"), "routing_strategy", id="unknown-routing"),
    pytest.param(dict(lora_dropout=1.0), "lora_dropout", id="dropout-1"),
    pytest.param(dict(expert_lora={"r": 0}), "expert_lora.r", id="expert-r-0"),
    pytest.param(dict(act_fn="nope"), "act_fn", id="unknown-act"),
    pytest.param(dict(target_modules=[]), "target_modules", id="no-targets"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIGS)
def test_bad_config_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixLoraConfig(**kwargs)


MODEL_ERRORS = [
    pytest.param("llama", dict(target_modules=["q_proj", "fc1"]), "fc1", id="llama-missing-target"),
    pytest.param("phi3", dict(target_modules=["q_proj"]), "q_proj", id="phi3-has-no-q_proj"),
    pytest.param("phi", dict(target_modules=["gate_proj", "fc2"]), "gate_proj", id="phi-has-no-gate"),
]


@pytest.mark.parametrize(("family", "kwargs", "message"), MODEL_ERRORS)
def test_target_module_the_model_lacks_raises_before_touching_it(family, kwargs, message):
    model = tiny_model(family)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=f"target_modules .*{message}.* do not exist"):
        get_moelora_model(model, MixLoraConfig(**kwargs))
    _assert_untouched(model, snap)


def test_unsupported_family_raises():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'"):
        get_moelora_model(model, MixLoraConfig())
    _assert_untouched(model, snap)


def test_adapter_name_in_use_raises_and_changes_nothing(tmp_path):
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig())
    pm.save_pretrained(str(tmp_path))
    snap = _snapshot(pm)
    with pytest.raises(ValueError, match="adapter_name 'default' is already in use"):
        get_moelora_model(pm, MixLoraConfig(), adapter_name="default")
    with pytest.raises(ValueError, match="adapter_name 'default' is already in use"):
        pm.load_adapter(str(tmp_path), "default")
    _assert_untouched(pm, snap)


def _saved(tmp_path, **overrides):
    pm = get_moelora_model(tiny_model("llama", **overrides), MixLoraConfig(r=4, num_experts=3))
    pm.save_pretrained(str(tmp_path))
    return tmp_path


def _corrupt_json(d):
    (d / "adapter_config.json").write_text("{not json")


def _corrupt_weights(d):
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)


def _missing_weights(d):
    (d / "adapter_model.safetensors").unlink()


def _missing_config(d):
    (d / "adapter_config.json").unlink()


def _other_peft_type(d):
    conf = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(dict(conf, peft_type="IA3")))


def _bad_top_k(d):
    conf = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(dict(conf, top_k=7)))


BAD_DIRS = [
    pytest.param(_corrupt_json, "not valid JSON", id="corrupt-config"),
    pytest.param(_corrupt_weights, "not a readable safetensors", id="corrupt-weights"),
    pytest.param(_missing_weights, "has neither adapter_model.safetensors nor adapter_model.bin", id="no-weights"),
    pytest.param(_missing_config, "has no adapter_config.json", id="no-config"),
    pytest.param(_other_peft_type, "peft_type must be one of .*got 'IA3'", id="peft-type-IA3"),
    pytest.param(_bad_top_k, "top_k", id="top_k-above-E"),
]


@pytest.mark.parametrize(("damage", "message"), BAD_DIRS)
def test_bad_adapter_directory_raises_before_touching_the_model(damage, message, tmp_path):
    directory = _saved(tmp_path)
    damage(directory)
    model = tiny_model("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        MoeLoraModel.from_pretrained(model, str(directory))
    assert all(p.requires_grad for p in model.parameters())
    _assert_untouched(model, snap)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MoeLoraModel.from_pretrained(tiny_model("llama"), str(tmp_path / "nowhere"))


MISMATCHES = [
    pytest.param(dict(intermediate_size=48), r"has shape \(3, 40, 4\), the model needs \(3, 48, 4\)", id="other-I"),
    pytest.param(dict(num_hidden_layers=1), "unexpected tensors", id="fewer-layers"),
    pytest.param(dict(num_hidden_layers=3), "missing tensors", id="more-layers"),
]


@pytest.mark.parametrize(("model_overrides", "message"), MISMATCHES)
def test_adapter_shapes_that_do_not_match_the_base_raise(model_overrides, message, tmp_path):
    directory = _saved(tmp_path)
    model = tiny_model("llama", **model_overrides)
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        MoeLoraModel.from_pretrained(model, str(directory))
    assert [type(m) for m in model.modules()] == types


def test_unknown_adapter_and_format_names_raise(tmp_path):
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig())
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        pm.set_adapter("nope")
    with pytest.raises(ValueError, match="format must be one of"):
        pm.save_pretrained(str(tmp_path), format="peft")
    with pytest.raises(TypeError, match="config must be a MixLoraConfig"):
        get_moelora_model(tiny_model("llama"), {"r": 8})


def test_bad_backend_names_raise(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        moelora.set_backend("cuda")
    monkeypatch.setenv("MOELORA_BACKEND", "fast")
    with moelora.set_backend("auto"):
        pass
    from moelora import backend

    backend._override.clear()
    with pytest.raises(ValueError, match="MOELORA_BACKEND: backend must be one of"):
        moelora.get_backend()
