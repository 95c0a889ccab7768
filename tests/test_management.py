"""PEFT's adapter management (active_adapters, delete_adapter, unload, merge_and_unload), checked against the
`peft` package itself on the same adapters, and for MixLoRA / MiLoRA against moelora's own unmerged model."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model
from torch import nn

from moelora import LoraConfig, MiLoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model
from moelora.layers import LoraLinear, MixLoraFFN
from moelora.milora_router import MiLoraRouters

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL7 = [*ATTN, "gate_proj", "up_proj", "down_proj"]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _peft_adapter(path, seed: int, **lora) -> str:
    """A LoRA adapter trained nowhere but with random non-zero B, saved by PEFT itself."""
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**lora))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(str(path))
    return str(path)


def _both(tmp_path, **lora) -> tuple[nn.Module, MoeLoraModel]:
    """PEFT and moelora, each with the same two PEFT-saved adapters 'a' (active) and 'b'."""
    a = _peft_adapter(tmp_path / "a", seed=1, **lora)
    b = _peft_adapter(tmp_path / "b", seed=2, **lora)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), a, adapter_name="a")
    theirs.load_adapter(b, adapter_name="b")
    ours = MoeLoraModel.from_pretrained(tiny_model("llama"), a, adapter_name="a")
    ours.load_adapter(b, "b")
    return theirs.eval(), ours.eval()


LORAS = [
    pytest.param(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), id="qv-r4"),
    pytest.param(dict(r=8, lora_alpha=16, target_modules=ALL7), id="all7-r8"),
    pytest.param(dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True), id="rslora"),
    pytest.param(dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True), id="dora"),
]


@pytest.mark.parametrize("lora", LORAS)
def test_active_adapters_as_peft(lora, tmp_path):
    theirs, ours = _both(tmp_path, **lora)
    assert ours.active_adapters == theirs.active_adapters == ["a"]
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    theirs.set_adapter("b")
    ours.set_adapter("b")
    assert ours.active_adapters == theirs.active_adapters == ["b"]
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)


DELETIONS = [
    pytest.param(["a"], id="the-active-one"),
    pytest.param(["b"], id="an-inactive-one"),
    pytest.param(["a", "b"], id="both"),
]


@pytest.mark.parametrize("order", DELETIONS)
def test_delete_adapter_as_peft(order, tmp_path):
    theirs, ours = _both(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    for name in order:
        switches = name == ours.active_adapter and len(ours.peft_config) > 1  # PEFT warns then, and so do we
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours.delete_adapter(name)
        assert len([w for w in caught if "was the active adapter" in str(w.message)]) == switches
        theirs.delete_adapter(name)
        assert ours.active_adapters == theirs.active_adapters
        assert sorted(ours.peft_config) == sorted(theirs.peft_config)
        assert not [k for k, _ in ours.named_parameters() if f".adapters.{name}." in k]
        if ours.peft_config:
            torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
        else:  # nothing left: the base model runs (PEFT 0.21's PeftModel raises KeyError in forward here)
            assert ours.active_adapters == []
            torch.testing.assert_close(_logits(ours), _logits(tiny_model("llama")), rtol=0, atol=0)


def test_delete_unknown_adapter_names_it_and_the_loaded_ones():
    pm = get_moelora_model(tiny_model("llama"), LoraConfig(r=4))
    with pytest.raises(ValueError, match=r"delete_adapter: adapter_name must be one of .*\['default'\].*'nope'"):
        pm.delete_adapter("nope")


def _mixed_model() -> MoeLoraModel:
    """MixLoRA 'mix' (active), MiLoRA 'mi' and LoRA 'lora' on one llama, every tensor random."""
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(r=4, num_experts=3, lora_dropout=0.0), "mix")
    pm.add_adapter(MiLoraConfig(r=4, top_k=2, lora_dropout=0.0), "mi")
    pm.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "gate_proj"]), "lora")
    randomize_adapters(pm)
    return pm.eval()


@pytest.mark.parametrize("name", ["mix", "mi", "lora"])
def test_delete_removes_every_tensor_and_router_and_the_rest_still_runs(name):
    pm = _mixed_model()
    others = [n for n in ("mix", "mi", "lora") if n != name]
    before = {n: _logits_of(pm, n) for n in others}
    pm.delete_adapter(name)
    assert not [k for k, _ in pm.named_parameters() if f".adapters.{name}." in k]
    for layer in pm.model.model.layers:
        assert name not in layer.milora_routers.adapters
    assert name not in pm.routing.milora and name not in pm.peft_config
    for n in others:  # every remaining adapter, mixed batch included, gives what it gave before
        torch.testing.assert_close(_logits_of(pm, n), before[n], rtol=0, atol=0)
    with torch.no_grad():
        mixed = pm(IDS, adapter_names=others).logits
    torch.testing.assert_close(mixed[0], before[others[0]][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], before[others[1]][1], rtol=1e-5, atol=1e-5)


def _logits_of(pm: MoeLoraModel, name: str) -> torch.Tensor:
    pm.set_adapter(name)
    return _logits(pm)


@pytest.mark.parametrize("lora", LORAS)
def test_merge_and_unload_as_peft(lora, tmp_path):
    theirs, ours = _both(tmp_path, **lora)
    want = _logits(ours)
    merged_theirs = theirs.merge_and_unload()
    merged_ours = ours.merge_and_unload()
    assert not [m for m in merged_ours.modules() if isinstance(m, LoraLinear | MixLoraFFN | MiLoraRouters)]
    assert type(merged_ours) is type(merged_theirs)
    theirs_sd, ours_sd = merged_theirs.state_dict(), merged_ours.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd) == sorted(tiny_model("llama").state_dict())
    for key, value in theirs_sd.items():
        torch.testing.assert_close(ours_sd[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(merged_ours), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(merged_ours), _logits(merged_theirs), rtol=1e-5, atol=1e-5)
    assert ours.peft_config == {} and ours.active_adapters == []


def test_merge_and_unload_merges_the_adapters_named_and_drops_the_others(tmp_path):
    theirs, ours = _both(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    merged_theirs = theirs.merge_and_unload(adapter_names=["b"])
    merged_ours = ours.merge_and_unload(adapter_names=["b"])
    torch.testing.assert_close(_logits(merged_ours), _logits(merged_theirs), rtol=1e-5, atol=1e-5)


UNLOADS = [
    pytest.param(LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), id="lora"),
    pytest.param(MixLoraConfig(r=4, num_experts=3), id="mixlora"),
    pytest.param(MiLoraConfig(r=4, top_k=2), id="milora"),
]


@pytest.mark.parametrize("config", UNLOADS)
def test_unload_gives_back_the_base_model_and_weights(config):
    want_sd = tiny_model("llama").state_dict()
    pm = get_moelora_model(tiny_model("llama"), config)
    randomize_adapters(pm)
    base = pm.unload()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert not [m for m in base.modules() if isinstance(m, LoraLinear | MixLoraFFN | MiLoraRouters)]
    assert all(not hasattr(layer, "milora_routers") for layer in base.model.layers)
    sd = base.state_dict()
    assert sorted(sd) == sorted(want_sd)
    assert all(torch.equal(sd[k], v) for k, v in want_sd.items())
    assert torch.equal(_logits(base.eval()), _logits(tiny_model("llama")))
    assert not base._forward_pre_hooks and not base._forward_hooks  # moelora's routing hooks are gone


def test_unload_matches_peft_unload(tmp_path):
    theirs, ours = _both(tmp_path, r=4, lora_alpha=8, target_modules=ALL7)
    a, b = theirs.unload(), ours.unload()
    assert sorted(a.state_dict()) == sorted(b.state_dict())
    assert torch.equal(_logits(a), _logits(b))


def test_merge_mixlora_merges_attention_keeps_the_moe_ffn_and_warns():
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(r=4, num_experts=3, lora_dropout=0.0))
    randomize_adapters(pm)
    want = _logits(pm.eval())
    q_before = tiny_model("llama").model.layers[0].self_attn.q_proj.weight
    with pytest.warns(UserWarning, match="MoE FFN .* stays as a MixLoraFFN"):
        merged = pm.merge_and_unload()
    layer = merged.model.layers[0]
    assert type(layer.self_attn.q_proj) is nn.Linear and not torch.equal(layer.self_attn.q_proj.weight, q_before)
    assert isinstance(layer.mlp, MixLoraFFN) and list(layer.mlp.adapters) == ["default"]
    torch.testing.assert_close(_logits(merged), want, rtol=1e-4, atol=1e-5)


def test_merge_milora_raises_why_and_changes_nothing():
    pm = get_moelora_model(tiny_model("llama"), MiLoraConfig(r=4, top_k=2, lora_dropout=0.0))
    randomize_adapters(pm)
    want = _logits(pm.eval())
    with pytest.raises(ValueError, match=r"MiLoRA adapters \['default'\] cannot be merged: .* per prompt"):
        pm.merge_and_unload()
    assert pm.active_adapters == ["default"]
    assert torch.equal(_logits(pm), want)


def test_merge_refuses_two_mixlora_adapters_and_unknown_names():
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(r=4, num_experts=2), "x")
    pm.add_adapter(MixLoraConfig(r=4, num_experts=2), "y")
    with pytest.raises(ValueError, match=r"one MixLoRA adapter at most .* got \['x', 'y'\]"):
        pm.merge_and_unload(adapter_names=["x", "y"])
    with pytest.raises(ValueError, match=r"adapter_names must list loaded adapters \['x', 'y'\], got \['z'\]"):
        pm.merge_and_unload(adapter_names=["z"])


def test_safe_merge_refuses_a_non_finite_merge_and_leaves_the_weights():
    pm = get_moelora_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(pm)
    with torch.no_grad():
        pm.model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"safe_merge=True.*model\.layers\.1\.self_attn\.v_proj.*NaN or inf"):
        pm.merge_and_unload(safe_merge=True)
    want = tiny_model("llama").state_dict()
    got = {k.replace(".base_layer", ""): v for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(got[k], v) for k, v in want.items())
