"""Adapter files: a hand-written MoE-PEFT directory loads and matches an independent implementation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, randomize_adapters, tiny_model
from torch import nn

from moelora import MixLoraConfig, MoeLoraModel, get_moelora_model


class _LoopLora(nn.Module):
    """LoRA as mixlora 0.2.3 computes it at inference (dropout off): base(x) + s B A x."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, s: float) -> None:
        super().__init__()
        self.base, self.A, self.B, self.s = base, A, B, s

    def forward(self, x):
        return self.base(x) + (x.float() @ self.A.T @ self.B.T * self.s).to(x.dtype)


class _LoopMoe(nn.Module):
    """The per-expert loop of mixlora 0.2.3 / MoE-PEFT, down projection run per expert; top-k or top-p."""

    def __init__(self, mlp, gate, experts, s, top_k=None, top_p=None) -> None:
        super().__init__()
        self.mlp, self.gate, self.experts, self.s, self.top_k, self.top_p = mlp, gate, experts, s, top_k, top_p

    def _lora(self, proj, e, x):
        A, B = self.experts[proj][e]
        return x @ A.T @ B.T * self.s

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1]).float()
        probs = F.softmax(x @ self.gate.T, dim=-1)
        if self.top_k is not None:
            w, sel = torch.topk(probs, self.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
        else:
            w, sel = torch.sort(probs, dim=-1, descending=True)
            beyond = w.cumsum(-1) > self.top_p
            first = beyond.long().argmax(-1)
            drop = beyond & ~F.one_hot(first, w.shape[-1]).bool()
            w, sel = w.masked_fill(drop, 0.0), sel.masked_fill(drop, -1)
        G, U = self.mlp.gate_proj(x), self.mlp.up_proj(x)
        out = torch.zeros_like(x)
        for e in range(self.gate.shape[0]):
            tok, slot = torch.where(sel == e)
            if tok.numel() == 0:
                continue
            xe = x[tok]
            h = self.mlp.act_fn(G[tok] + self._lora("gate_proj", e, xe)) * (U[tok] + self._lora("up_proj", e, xe))
            y = self.mlp.down_proj(h) + self._lora("down_proj", e, h)
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out.reshape(shape)


def _write_moe_peft_dir(path, config: dict, layers: int, H: int, I: int, kv: int, seed: int = 0):
    """MoE-PEFT's files by hand: adapter_config.json and adapter_model.bin with its key names."""
    g = torch.Generator().manual_seed(seed)
    r, E = config["r"], config["num_experts"]
    weights = {}
    for i in range(layers):
        for proj, out_f in (("q_proj", H), ("k_proj", kv), ("v_proj", kv), ("o_proj", H)):
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_A.weight"] = torch.randn(r, H, generator=g) * 0.2
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.2
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(E, H, generator=g)
        for proj, (in_f, out_f) in (("gate_proj", (H, I)), ("up_proj", (H, I)), ("down_proj", (I, H))):
            for e in range(E):
                key = f"mixlora.layers.{i}.mlp.{proj}.experts.{e}"
                weights[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.2
                weights[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.2
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    torch.save(weights, path / "adapter_model.bin")
    return weights


def _independent_model(base, weights, config):
    """A deep copy of `base` with test-local loop modules in place of attention projections and MLPs."""
    model = copy.deepcopy(base)
    s = config["lora_alpha"] / config["r"]
    E = config["num_experts"]
    for i, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"mixlora.layers.{i}.self_attn.{proj}"
            A, B = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
            setattr(layer.self_attn, proj, _LoopLora(getattr(layer.self_attn, proj), A, B, s))
        experts = {
            proj: [
                (
                    weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A.weight"],
                    weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_B.weight"],
                )
                for e in range(E)
            ]
            for proj in ("gate_proj", "up_proj", "down_proj")
        }
        gate = weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"]
        layer.mlp = _LoopMoe(layer.mlp, gate, experts, s, top_k=config.get("top_k"), top_p=config.get("top_p"))
    return model


MOE_PEFT_CONFIGS = [
    pytest.param(dict(routing_strategy="mixlora", top_k=2, num_experts=4), id="topk2-E4"),
    pytest.param(dict(routing_strategy="mixlora", top_k=1, num_experts=3), id="topk1-E3"),
    pytest.param(dict(routing_strategy="mixlora-dynamic", top_p=0.5, temperature=0.0, num_experts=4), id="topp0.5"),
]


@pytest.mark.parametrize("routing", MOE_PEFT_CONFIGS)
def test_hand_written_moe_peft_directory_matches_an_independent_implementation(routing, tmp_path):
    config = {
        "peft_type": "MIXLORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "router_aux_loss_coef": 0.01,
        "router_init_range": 0.02,
        "jitter_noise": 0.0,
        "act_fn": "silu",
        **routing,
    }
    weights = _write_moe_peft_dir(tmp_path, config, layers=2, H=32, I=40, kv=16)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = _independent_model(tiny_model("llama"), weights, config)(ids).logits

    loaded = MoeLoraModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert loaded.peft_config["default"].router_aux_loss_coef == 0.01


def test_moe_peft_dora_magnitudes_are_recomputed_on_load(tmp_path):
    """MoE-PEFT stores no magnitudes and recomputes m = ||W + s B A||: the DoRA scale starts at 1."""
    config = {
        "peft_type": "MIXLORA",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "num_experts": 2,
        "top_k": 1,
        "routing_strategy": "mixlora",
        "use_dora": True,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    weights = _write_moe_peft_dir(tmp_path / "dora", config, layers=2, H=32, I=40, kv=16)
    plain = dict(config, use_dora=False)
    _write_moe_peft_dir(tmp_path / "plain", plain, layers=2, H=32, I=40, kv=16)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    with_dora = MoeLoraModel.from_pretrained(tiny_model("llama"), str(tmp_path / "dora"))
    without = MoeLoraModel.from_pretrained(tiny_model("llama"), str(tmp_path / "plain"))
    torch.testing.assert_close(with_dora(ids).logits, without(ids).logits, rtol=1e-4, atol=1e-5)
    mag = with_dora.adapter_state_dict()["model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    W = tiny_model("llama").model.layers[0].self_attn.q_proj.weight
    A = weights["mixlora.layers.0.self_attn.q_proj.lora_A.weight"]
    B = weights["mixlora.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(mag, torch.linalg.norm(W + 2.0 * B @ A, dim=1))


def test_our_moe_peft_export_has_moe_peft_keys(tmp_path):
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(num_experts=3, r=4))
    pm.save_pretrained(str(tmp_path), format="moe-peft")
    weights = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    assert weights["mixlora.layers.1.mlp.moe_gate.weight"].shape == (3, 32)
    assert weights["mixlora.layers.1.mlp.down_proj.experts.2.lora_A.weight"].shape == (4, 40)
    assert weights["mixlora.layers.0.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
    assert len(weights) == 2 * (8 + 1 + 3 * 3 * 2)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MIXLORA" and config["top_k"] == 2 and config["num_experts"] == 3


def test_moe_peft_export_config_is_completed_from_the_base(tmp_path):
    base = tiny_model("llama")
    base.config.name_or_path = "some/base-dir"
    pm = get_moelora_model(base, MixLoraConfig(num_experts=2, r=4, lora_alpha=16.0, lora_dropout=0.0))
    with pytest.warns(UserWarning, match="lora_dropout=0"):
        pm.save_pretrained(str(tmp_path), format="moe-peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "some/base-dir"
    assert config["act_fn"] == base.config.hidden_act
    assert config["lora_alpha"] == 16 and isinstance(config["lora_alpha"], int)


def test_expert_lora_overrides_rank_and_alpha(tmp_path):
    config = MixLoraConfig(r=8, lora_alpha=16, expert_lora={"r": 4, "lora_alpha": 4}, lora_dropout=0.0)
    pm = get_moelora_model(tiny_model("llama"), config)
    sd = pm.adapter_state_dict()
    assert sd["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 32)
    assert sd["model.layers.0.mlp.up_proj.lora_A.weight"].shape == (8, 4, 32)
    assert pm.model.model.layers[0].mlp.adapters["default"].scaling == 1.0
    randomize_adapters(pm)
    pm.save_pretrained(str(tmp_path))
    loaded = MoeLoraModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    assert loaded.peft_config["default"].expert_lora.r == 4
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids).logits, pm.eval()(ids).logits)


def test_saving_in_one_format_removes_the_other_formats_weights(tmp_path):
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig())
    pm.save_pretrained(str(tmp_path), format="moe-peft")
    pm.save_pretrained(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
