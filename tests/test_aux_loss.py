"""The load-balance loss: hand-computed values, HF Mixtral's function, and what the model adds to its loss."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moelora import MixLoraConfig, get_moelora_model
from moelora.layers import MixLoraFFN
from moelora.reference import load_balance_loss, route

PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])

# Worked by hand: F_e = (slots choosing e) / tokens, P_e = mean prob, aux = E * sum_e F_e P_e.
HAND = [
    # F = [2, 4, 2] / 4, P = [1.5, 1.3, 1.2] / 4: 3 * (0.5 * 0.375 + 1 * 0.325 + 0.5 * 0.3)
    pytest.param([[0, 1], [1, 2], [2, 1], [0, 1]], None, 1.9875, id="k2-no-mask"),
    # last token padded: F = [1, 3, 2] / 3, P = [0.8, 1.1, 1.1] / 3: 3 * 6.3 / 9
    pytest.param([[0, 1], [1, 2], [2, 1], [0, 1]], [1, 1, 1, 0], 2.1, id="k2-padding-masked"),
    # top-p style unused slots (-1) do not count: F = [0.5, 0.5, 0.5]: 3 * 0.5 * 1.0
    pytest.param([[0, -1], [1, 2], [2, -1], [0, 1]], None, 1.5, id="unused-slots"),
]


@pytest.mark.parametrize(("indices", "mask", "expected"), HAND)
def test_load_balance_loss_against_hand_computed_values(indices, mask, expected):
    mask_t = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    aux = load_balance_loss(PROBS, torch.tensor(indices), 3, mask_t)
    assert aux.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_load_balance_loss_equals_hf_mixtral(top_k):
    g = torch.Generator().manual_seed(top_k)
    layers, batch, seq, E = 3, 2, 5, 6
    logits = [torch.randn(batch * seq, E, generator=g) for _ in range(layers)]
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0
    expected = load_balancing_loss_func(tuple(logits), E, top_k, mask)
    probs = torch.softmax(torch.cat(logits), -1)
    indices = probs.topk(top_k, -1).indices
    ours = load_balance_loss(probs, indices, E, mask.reshape(-1).bool().repeat(layers))
    torch.testing.assert_close(ours, expected)


def _router_inputs(pm):
    captured = []
    for module in pm.modules():
        if isinstance(module, MixLoraFFN):
            module.register_forward_pre_hook(lambda m, args: captured.append((m, args[0].detach())))
    return captured


def test_model_loss_adds_the_coefficient_times_the_aux_loss_with_padding_masked():
    pm = get_moelora_model(
        tiny_model("llama"), MixLoraConfig(lora_dropout=0.0, num_experts=4, router_aux_loss_coef=0.5)
    )
    randomize_adapters(pm)
    pm.eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    captured = _router_inputs(pm)
    out = pm(ids, attention_mask=mask, labels=ids)
    ce = pm.model(input_ids=ids, attention_mask=mask, labels=ids).loss

    logits = tuple(x.reshape(-1, 32) @ m.adapters["default"].router.T for m, x in captured[:2])
    expected_aux = load_balancing_loss_func(logits, 4, 2, mask)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, ce + 0.5 * expected_aux)


def test_no_aux_loss_in_eval_without_labels_and_padding_changes_it():
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(lora_dropout=0.0))
    randomize_adapters(pm)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    assert "aux_loss" not in pm.eval()(ids)
    pm.train()
    full = pm(ids).aux_loss
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :4] = 0
    assert pm(ids, attention_mask=mask).aux_loss != full


def test_router_gets_gradient_from_the_aux_loss_alone():
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(lora_dropout=0.0))
    pm.train()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    pm(ids).aux_loss.backward()
    router = pm.model.model.layers[0].mlp.adapters["default"].router
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_route_top_k_weights_sum_to_one_and_top_p_keeps_the_prefix():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 16, generator=g), torch.randn(8, 16, generator=g)
    r = route(x, w, top_k=3)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(50))
    p = route(x, w, top_p=0.5)
    kept = p.indices >= 0
    mass_before = p.weights.cumsum(-1) - p.weights
    assert bool((mass_before[kept] <= 0.5).all())
    # the kept prefix is the shortest whose mass exceeds top_p, or everything
    assert bool(((p.weights.sum(-1) > 0.5) | kept.all(-1)).all())
