"""Mixed-adapter batches (`adapter_names=[...]`, one adapter per sequence) for every mix of adapter kinds.

Each row of a left-padded batch of different prompt lengths must equal that sequence run alone through its
adapter: forward logits and greedy generate() tokens. The adapters are random (B included), so a sequence
run through another row's adapter, or through none, would show. No MiLoRA adapter need be loaded: the model
hook that binds the batch plan is there for every kind (a mix without MiLoRA used to raise "used before bind").
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model

from moelora import LoraConfig, MiLoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model


def _config(kind: str, index: int):
    """The index-th adapter of `kind` (the second differs from the first: other rank, pooling, targets)."""
    if kind == "milora":
        return MiLoraConfig(r=4 + 4 * index, lora_alpha=8, lora_dropout=0.0, pooling=("attention", "last")[index])
    if kind == "mixlora":
        return MixLoraConfig(r=4, num_experts=4 - index, lora_dropout=0.0)
    targets = [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
    targets.append(["q_proj", "v_proj", "down_proj"])
    return LoraConfig(r=2 + 2 * index, lora_alpha=4, lora_dropout=0.0, target_modules=targets[index])


def _build(kinds: list[str], tmp_path) -> tuple[MoeLoraModel, list[str]]:
    """A base with one adapter per entry of `kinds`, loaded in that order; plain LoRAs come from PEFT files."""
    model: MoeLoraModel | None = None
    names = []
    for kind in kinds:
        index = sum(k == kind for k in kinds[: len(names)])
        name = f"{kind}{index}"
        names.append(name)
        if kind == "lora":
            source = get_moelora_model(tiny_model("llama"), _config(kind, index))
            randomize_adapters(source, seed=30 + index, std=0.3)
            directory = tmp_path / name
            source.save_pretrained(str(directory))  # PEFT's adapter_config.json and keys for a LoRA
            if model is None:
                model = MoeLoraModel.from_pretrained(tiny_model("llama"), str(directory), name)
            else:
                model.load_adapter(str(directory), name)
        elif model is None:
            model = get_moelora_model(tiny_model("llama"), _config(kind, index), name)
        else:
            model.add_adapter(_config(kind, index), name)
    randomize_adapters(model, seed=7, std=0.3)  # the trainable ones: MiLoRA and MixLoRA (the loaded LoRAs are frozen)
    return model.eval(), names


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _left_padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.shape[1] for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - s.shape[1] :] = s[0]
        mask[i, width - s.shape[1] :] = 1
    return ids, mask


# Adapter kinds, in the order they are loaded onto the base.
MIXES = [
    pytest.param(["milora", "mixlora"], id="milora-then-mixlora"),
    pytest.param(["mixlora", "milora"], id="mixlora-then-milora"),
    pytest.param(["milora", "lora"], id="milora-then-lora"),
    pytest.param(["lora", "milora"], id="lora-then-milora"),
    pytest.param(["mixlora", "lora"], id="mixlora-then-lora"),
    pytest.param(["lora", "mixlora"], id="lora-then-mixlora"),
    pytest.param(["milora", "milora"], id="milora-and-milora"),
    pytest.param(["mixlora", "mixlora"], id="mixlora-and-mixlora"),
    pytest.param(["lora", "lora"], id="lora-and-lora"),
    pytest.param(["milora", "mixlora", "lora"], id="milora-mixlora-lora"),
    pytest.param(["lora", "mixlora", "milora"], id="lora-mixlora-milora"),
]


def _batch(names: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    """Rows: every adapter, then the first again (an adapter on two rows), prompts of lengths 3, 5, 7, ..."""
    rows = names + names[:1]
    return rows, [_ids(3 + 2 * i, seed=40 + i) for i in range(len(rows))]


@pytest.mark.parametrize("kinds", MIXES)
def test_mixed_forward_equals_each_sequence_alone(kinds, tmp_path):
    model, names = _build(kinds, tmp_path)
    rows, seqs = _batch(names)
    ids, mask = _left_padded(seqs)
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, adapter_names=rows).logits
        for i, (name, s) in enumerate(zip(rows, seqs, strict=True)):
            model.set_adapter(name)
            alone = model(s, attention_mask=torch.ones_like(s)).logits
            torch.testing.assert_close(mixed[i, -s.shape[1] :], alone[0], rtol=1e-5, atol=1e-5, msg=f"row {i} {name}")
            with model.disable_adapter():  # the adapter changes this row: a wrong adapter would not pass
                base = model(s, attention_mask=torch.ones_like(s)).logits
            assert not torch.allclose(alone, base, atol=1e-3), name


@pytest.mark.parametrize("kinds", MIXES)
def test_mixed_generate_equals_each_sequence_alone(kinds, tmp_path):
    model, names = _build(kinds, tmp_path)
    rows, seqs = _batch(names)
    ids, mask = _left_padded(seqs)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    together = model.generate(ids, attention_mask=mask, adapter_names=rows, **greedy)
    assert together.shape == (len(rows), ids.shape[1] + 5)
    for i, (name, s) in enumerate(zip(rows, seqs, strict=True)):
        model.set_adapter(name)
        alone = model.generate(s, attention_mask=torch.ones_like(s), **greedy)
        assert torch.equal(together[i, -alone.shape[1] :], alone[0]), f"row {i} {name}"
