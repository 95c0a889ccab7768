"""PEFT-style contracts for every family: init equals base, only adapters train, files round-trip."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, VOCAB, randomize_adapters, tiny_model

from moelora import MixLoraConfig, MoeLoraModel, get_moelora_model
from moelora.layers import LoraLinear, MixLoraFFN

CONFIGS = [
    pytest.param(dict(), id="topk2"),
    pytest.param(dict(top_k=1, num_experts=3), id="top1-E3"),
    pytest.param(dict(use_dora=True, use_rslora=True), id="dora-rslora"),
]


def _ids(seed: int = 0, batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("overrides", CONFIGS)
def test_init_equals_base_and_disable_restores_it(family, overrides):
    model = tiny_model(family)
    ids = _ids()
    base_logits = model(ids).logits
    pm = get_moelora_model(model, MixLoraConfig(lora_dropout=0.0, **overrides))
    # B = 0: every delta is zero; the MoE FFN re-sums sum_j w_j h, so equality holds to fp32 rounding.
    torch.testing.assert_close(pm(ids).logits, base_logits, rtol=0, atol=2e-6)
    randomize_adapters(pm)
    assert not torch.allclose(pm(ids).logits, base_logits, atol=1e-3)
    with pm.disable_adapter():
        assert torch.equal(pm(ids).logits, base_logits)
    assert not torch.allclose(pm(ids).logits, base_logits, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "phi3", "phi"])
def test_top_p_at_init_scales_the_base_ffn_by_the_kept_mass(family):
    """MoE-PEFT's mixlora-dynamic does not renormalise: with B = 0 the FFN gives (sum_j w_j) * FFN(x)."""
    model = tiny_model(family)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # HF zeroes biases at init; make phi's non-zero so the bias count matters
        for module in mlp.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    base = mlp(x)
    pm = get_moelora_model(model, MixLoraConfig(lora_dropout=0.0, routing_strategy="mixlora-dynamic", top_p=0.6))
    ffn = pm.model.model.layers[0].mlp
    weights = torch.softmax(x.reshape(-1, 32) @ ffn.adapters["default"].router.T, -1).sort(-1, descending=True)[0]
    kept = (weights.cumsum(-1) - weights) <= 0.6
    mass = (weights * kept).sum(-1).reshape(2, 9, 1)
    assert (mass < 1).any()
    torch.testing.assert_close(ffn(x), mass * base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapter_and_router_parameters_get_gradients(family):
    pm = get_moelora_model(tiny_model(family), MixLoraConfig(lora_dropout=0.0))
    randomize_adapters(pm)
    pm.train()
    ids = _ids()
    out = pm(ids, labels=ids)
    out.loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in pm.named_parameters() if ".adapters.default." in n}
    assert with_grad == trainable == adapter
    assert any(".router" in n for n in with_grad)
    assert all(pm.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if "lora_" in n or "router" in n)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["moelora", "moe-peft"])
def test_save_load_round_trip_is_bit_exact(family, fmt, tmp_path):
    pm = get_moelora_model(tiny_model(family), MixLoraConfig(lora_dropout=0.0))
    randomize_adapters(pm)
    pm.eval()
    ids = _ids()
    logits = pm(ids).logits
    pm.save_pretrained(str(tmp_path), format=fmt)
    expected_files = {"adapter_config.json", "adapter_model.safetensors" if fmt == "moelora" else "adapter_model.bin"}
    assert set(p.name for p in tmp_path.iterdir()) == expected_files

    loaded = MoeLoraModel.from_pretrained(tiny_model(family), str(tmp_path))
    assert not loaded.training
    saved, restored = pm.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert torch.equal(loaded(ids).logits, logits)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_dora_magnitudes_round_trip_in_our_format(tmp_path):
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(lora_dropout=0.0, use_dora=True))
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path))
    loaded = MoeLoraModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    key = "model.layers.0.mlp.down_proj.lora_magnitude_vector"
    assert torch.equal(loaded.adapter_state_dict()[key], pm.adapter_state_dict()[key])
    ids = _ids()
    assert torch.equal(loaded(ids).logits, pm.eval()(ids).logits)


def test_state_dict_keys_are_stable():
    pm = get_moelora_model(tiny_model("llama", num_hidden_layers=1), MixLoraConfig(num_experts=3, r=4))
    shapes = {k: tuple(v.shape) for k, v in pm.adapter_state_dict().items()}
    assert shapes == {
        "model.layers.0.self_attn.q_proj.lora_A.weight": (4, 32),
        "model.layers.0.self_attn.q_proj.lora_B.weight": (32, 4),
        "model.layers.0.self_attn.k_proj.lora_A.weight": (4, 32),
        "model.layers.0.self_attn.k_proj.lora_B.weight": (16, 4),
        "model.layers.0.self_attn.v_proj.lora_A.weight": (4, 32),
        "model.layers.0.self_attn.v_proj.lora_B.weight": (16, 4),
        "model.layers.0.self_attn.o_proj.lora_A.weight": (4, 32),
        "model.layers.0.self_attn.o_proj.lora_B.weight": (32, 4),
        "model.layers.0.mlp.router.weight": (3, 32),
        "model.layers.0.mlp.gate_proj.lora_A.weight": (3, 4, 32),
        "model.layers.0.mlp.gate_proj.lora_B.weight": (3, 40, 4),
        "model.layers.0.mlp.up_proj.lora_A.weight": (3, 4, 32),
        "model.layers.0.mlp.up_proj.lora_B.weight": (3, 40, 4),
        "model.layers.0.mlp.down_proj.lora_A.weight": (3, 4, 40),
        "model.layers.0.mlp.down_proj.lora_B.weight": (3, 32, 4),
    }
    names = {n for n, _ in pm.named_parameters() if n.startswith("model.model.layers.0.mlp.adapters")}
    assert "model.model.layers.0.mlp.adapters.default.router" in names


def test_eval_has_no_dropout_and_training_has_it():
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(lora_dropout=0.5))
    randomize_adapters(pm)
    ids = _ids()
    pm.eval()
    assert torch.equal(pm(ids).logits, pm(ids).logits)
    pm.train()
    assert not torch.equal(pm(ids).logits, pm(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_modules_are_swapped_in_place_and_keep_base_layer(family):
    model = tiny_model(family)
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    first_attn_name = next(n for n, m in attn.named_children() if isinstance(m, torch.nn.Linear))
    original = getattr(attn, first_attn_name)
    pm = get_moelora_model(model, MixLoraConfig())
    assert pm.model is model
    assert isinstance(model.model.layers[0].mlp, MixLoraFFN) and model.model.layers[0].mlp.base_layer is mlp
    wrapped = getattr(model.model.layers[0].self_attn, first_attn_name)
    assert isinstance(wrapped, LoraLinear) and wrapped.base_layer is original
    assert type(model.model.layers[0]).__name__.lower().startswith(family.replace("2", "").replace("3", ""))


def test_generate_and_cache_work():
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(lora_dropout=0.0))
    randomize_adapters(pm)
    pm.eval()
    ids = _ids(batch=1, seq=5)
    out = pm(ids, use_cache=True)
    assert out.past_key_values is not None
    generated = pm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 11)
    # Greedy decoding with the cache equals greedy decoding by full recompute.
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, pm(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_print_trainable_parameters(capsys):
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig())
    pm.print_trainable_parameters()
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == sum(v.numel() for v in pm.adapter_state_dict().values())
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out


def test_second_adapter_and_set_adapter(tmp_path):
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(lora_dropout=0.0))
    randomize_adapters(pm, seed=1)
    pm.eval()
    ids = _ids()
    first = pm(ids).logits
    pm.save_pretrained(str(tmp_path / "a"))
    get_moelora_model(pm, MixLoraConfig(lora_dropout=0.0, num_experts=4, top_k=1), adapter_name="other")
    assert pm.active_adapter == "default"
    assert torch.equal(pm(ids).logits, first)
    pm.set_adapter("other")
    base = tiny_model("llama")(ids).logits
    torch.testing.assert_close(pm(ids).logits, base, rtol=0, atol=2e-6)  # "other" is fresh: B = 0
    pm.load_adapter(str(tmp_path / "a"), "copy")
    pm.set_adapter("copy")
    assert torch.equal(pm(ids).logits, first)
