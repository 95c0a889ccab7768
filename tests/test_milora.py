"""MiLoRA end to end: the ops against a float64 oracle, prompt-cached routing in generate(), mixed-adapter
batches against separate runs, files, training and bad input."""

from __future__ import annotations

import copy
import inspect
import json

import oracle
import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from moelora import LoraConfig, MiLoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model, layers, reference
from moelora.milora_router import MiLoraRouter
from moelora.training import bilevel_step, milora_parameter_groups

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _close(actual, expected, what, ulps=64):
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    tol = ulps * EPS
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


# --- ops against the float64 oracle -------------------------------------------------------------------------

ROUTE_CASES = [
    pytest.param("attention", "rational", 3, "left", id="attention-rational-top3-leftpad"),
    pytest.param("attention", "rational", 7, "right", id="attention-rational-top7-rightpad"),
    pytest.param("mean", "rational", 1, "left", id="mean-rational-top1"),
    pytest.param("last", "rational", 3, "left", id="last-rational-leftpad"),
    pytest.param("last", "gelu", 3, "right", id="last-gelu-rightpad"),
    pytest.param("max", "rational", 2, "none", id="max-rational-nopad"),
    pytest.param("attention", "gelu", 3, "none", id="attention-gelu"),
]


def _mask(B: int, S: int, padding: str, g: torch.Generator) -> torch.Tensor:
    mask = torch.ones(B, S, dtype=torch.bool)
    if padding == "none":
        return mask
    for b in range(B):
        pad = int(torch.randint(0, S - 1, (1,), generator=g))
        if padding == "left":
            mask[b, :pad] = False
        else:
            mask[b, S - pad :] = False
    return mask


@pytest.mark.parametrize(("pooling", "activation", "top_k", "padding"), ROUTE_CASES)
def test_prompt_route_matches_the_oracle(pooling, activation, top_k, padding):
    g = torch.Generator().manual_seed(0)
    B, S, H, M = 3, 6, 5, 7
    hidden = (torch.randn(B, S, H, generator=g, dtype=F64) * 1.5).requires_grad_()
    router = (torch.randn(M, H, generator=g, dtype=F64) * 0.7).requires_grad_()
    num = torch.tensor(reference.RATIONAL_GELU_NUMERATOR, dtype=F64).requires_grad_()
    den = torch.tensor(reference.RATIONAL_GELU_DENOMINATOR, dtype=F64).requires_grad_()
    pool_w = (torch.randn(H, generator=g, dtype=F64) * 0.5).requires_grad_()
    if activation == "gelu":
        num = den = None
    mask = _mask(B, S, padding, g)
    routing = reference.prompt_route(
        hidden,
        mask,
        router,
        num,
        den,
        top_k=top_k,
        pooling=pooling,
        pool_weight=pool_w if pooling == "attention" else None,
    )
    per_seq = [
        oracle.prompt_route_sequence(hidden[b], mask[b].tolist(), router, num, den, top_k, pooling, pool_w)
        for b in range(B)
    ]
    gates = torch.stack([gts for gts, _ in per_seq])
    probs = torch.stack([p for _, p in per_seq])
    _close(routing.gates, gates, "gates")
    _close(routing.probs, probs, "probs")
    assert ((routing.gates > 0).sum(dim=1) == top_k).all()
    leaves = {"hidden": hidden, "router": router, "numerator": num, "denominator": den, "pool_weight": pool_w}
    leaves = {k: v for k, v in leaves.items() if v is not None and (k != "pool_weight" or pooling == "attention")}
    up = torch.randn(B, M, generator=g, dtype=F64)
    expected = torch.autograd.grad(gates, list(leaves.values()), up, allow_unused=True, materialize_grads=True)
    actual = torch.autograd.grad(routing.gates, list(leaves.values()), up, allow_unused=True, materialize_grads=True)
    for name, a, e in zip(leaves, actual, expected, strict=True):
        _close(a, e, f"d gates / d {name}", ulps=256)
    if pooling != "max":  # max's gradient goes to one position: padding positions must get none
        assert torch.equal(actual[0][~mask], torch.zeros_like(actual[0][~mask]))


def test_rational_initialisation_approximates_gelu():
    x = torch.linspace(-3, 3, 601, dtype=F64)
    num = torch.tensor(reference.RATIONAL_GELU_NUMERATOR, dtype=F64)
    den = torch.tensor(reference.RATIONAL_GELU_DENOMINATOR, dtype=F64)
    r = reference.rational(x, num, den)
    assert (r - torch.nn.functional.gelu(x)).abs().max() < 0.01
    _close(r, torch.stack([oracle.rational_scalar(v, num, den) for v in x]), "rational vs oracle")
    far = torch.tensor([-1e4, -50.0, 50.0, 1e4], dtype=F64)  # bounded by |x| far out: no pole, no blow-up
    assert (reference.rational(far, num, den).abs() <= far.abs()).all()


SEGMENT_CASES = [
    pytest.param(7, [0, 0, 1, 1, 1, 2, 2], [1, -1, 0], 2, id="one-seq-without-lora"),
    pytest.param(5, [0, 1, 2, 3, 4], [0, 1, 2, 0, 1], 3, id="decode-five-tenants"),
    pytest.param(6, [0, 0, 0, 0, 0, 0], [0], 1, id="one-sequence"),
]


@pytest.mark.parametrize(("T", "token_seq", "seq_lora", "n_lora"), SEGMENT_CASES)
@pytest.mark.parametrize("path", ["gather", "loop"])
def test_segmented_lora_matches_the_oracle(T, token_seq, seq_lora, n_lora, path, monkeypatch):
    monkeypatch.setattr(reference, "SEGMENTED_GATHER_TOKENS", 64 if path == "gather" else 0)
    g = torch.Generator().manual_seed(1)
    IN, OUT, R = 6, 5, 4
    x = torch.randn(T, IN, generator=g, dtype=F64).requires_grad_()
    A = torch.randn(n_lora, R, IN, generator=g, dtype=F64).requires_grad_()
    B = torch.randn(n_lora, OUT, R, generator=g, dtype=F64).requires_grad_()
    gate = torch.rand(len(seq_lora), generator=g, dtype=F64)
    gate[0] = 0.0  # an unselected module
    gate.requires_grad_()
    scaling = torch.tensor([2.0, 0.5, 1.0][:n_lora], dtype=F64)
    y = reference.segmented_lora(x, torch.tensor(token_seq), torch.tensor(seq_lora), gate, A, B, scaling)
    expected = oracle.segmented_lora(x, token_seq, seq_lora, gate, A, B, scaling)
    _close(y, expected, "y")
    up = torch.randn(T, OUT, generator=g, dtype=F64)
    leaves = [x, A, B, gate]
    for name, a, e in zip(
        ["x", "A", "B", "seq_gate"],
        torch.autograd.grad(y, leaves, up, allow_unused=True, materialize_grads=True),
        torch.autograd.grad(expected, leaves, up, allow_unused=True, materialize_grads=True),
        strict=True,
    ):
        _close(a, e, f"d/d {name}")


def test_prompt_balance_loss_by_hand():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], [[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]]], dtype=F64)
    # layer 0: argmax [0, 1] -> f = [.5, .5, 0], p = [.4, .4, .2] -> 3 * (.2 + .2) = 1.2
    # layer 1: argmax [2, 0] -> f = [.5, 0, .5], p = [.35, .225, .425] -> 3 * (.175 + .2125) = 1.1625
    _close(reference.prompt_balance_loss(probs), torch.tensor((1.2 + 1.1625) / 2, dtype=F64), "aux")


# --- the model ----------------------------------------------------------------------------------------------


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _milora(family: str = "llama", seed: int = 0, **overrides) -> MoeLoraModel:
    model = get_moelora_model(
        tiny_model(family, seed=seed), MiLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **overrides)
    )
    randomize_adapters(model, seed=seed + 1, std=0.3)
    return model.eval()


def _router_calls(model: MoeLoraModel) -> list[int]:
    return [r.calls for r in model.milora_routers()]


@pytest.mark.parametrize("family", ["llama", "phi3", "phi"])
def test_init_equals_base_and_modules_follow_the_family(family):
    base = tiny_model(family)
    ids = _ids(2, 7)
    expected = base(ids).logits
    model = get_moelora_model(base, MiLoraConfig(r=4, lora_dropout=0.0))
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    routers = list(model.milora_routers())
    assert len(routers) == 2
    assert len(routers[0].module_names) == {"llama": 7, "phi3": 4, "phi": 6}[family]


GENERATE_CASES = [
    pytest.param(dict(do_sample=False), id="greedy"),
    pytest.param(dict(do_sample=True, top_k=5), id="sampling"),
    pytest.param(dict(do_sample=False, num_beams=3), id="beam-search"),
    pytest.param(dict(do_sample=False, use_cache=False), id="greedy-no-kv-cache"),
    pytest.param(dict(do_sample=True, num_return_sequences=2), id="sampling-2-per-prompt"),
]


@pytest.mark.parametrize("kwargs", GENERATE_CASES)
def test_router_runs_once_per_layer_per_generate(kwargs):
    model = _milora()
    ids = _ids(2, 5)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, pad_token_id=0, **kwargs)
    assert out.shape[1] == 11
    assert _router_calls(model) == [1, 1]
    assert all(r.routing is None for r in model.milora_routers())  # the kept routing is freed at the end


def test_a_deep_copy_routes_on_its_own():
    """copy.deepcopy of a MiLoRA model: the copy's layers route into the copy's state, never the original's."""
    model = _milora()
    twin = copy.deepcopy(model)
    ids, other = _ids(2, 5), _ids(3, 4, seed=1)
    with torch.no_grad():
        want = model(ids).logits
        twin(other)  # routes 3 prompts in the copy only
        assert _router_calls(model) == [1, 1] and _router_calls(twin) == [1, 1]
        assert all(r.routing.gates.shape[0] == 2 for r in model.milora_routers())
        assert all(r.routing.gates.shape[0] == 3 for r in twin.milora_routers())
        torch.testing.assert_close(twin(ids).logits, want, rtol=0, atol=0)
    out = twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    want_out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out, want_out)


def _pinned_logits(model: MoeLoraModel, sequence: torch.Tensor, prompt_len: int, mask: torch.Tensor) -> torch.Tensor:
    """Logits of a full recompute whose routing pools only the prompt tokens (prompt_mask)."""
    prompt_mask = torch.zeros_like(sequence, dtype=torch.bool)
    prompt_mask[:, :prompt_len] = True
    full_mask = torch.cat([mask, torch.ones(sequence.shape[0], sequence.shape[1] - prompt_len, dtype=mask.dtype)], 1)
    return model(sequence, attention_mask=full_mask, prompt_mask=prompt_mask).logits


@pytest.mark.parametrize("pooling", ["attention", "mean", "last", "max"])
def test_cached_routing_decoding_equals_a_pinned_full_recompute(pooling):
    model = _milora(pooling=pooling)
    ids = _ids(2, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    recompute = _pinned_logits(model, out.sequences, 6, mask)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, recompute[:, 6 + step - 1], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, 6:], recompute[:, 5:-1].argmax(-1))
    # Without pinning, routing would pool the generated tokens too and change the gates: the pin matters.
    unpinned = model(out.sequences, attention_mask=torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)).logits
    assert not torch.allclose(unpinned[:, 5:-1], recompute[:, 5:-1], atol=1e-4)


def test_left_padding_and_prompt_length_do_not_change_a_sequence():
    model = _milora()
    short = _ids(1, 4, seed=5)
    long = _ids(1, 7, seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=short.dtype), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(
        short, attention_mask=torch.ones_like(short), max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    assert torch.equal(together[0, 3:], alone[0])
    alone_long = model.generate(
        long, attention_mask=torch.ones_like(long), max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    assert torch.equal(together[1], alone_long[0])


def _tenants() -> MoeLoraModel:
    """One base, four tenants: two MiLoRA (different pooling), one MixLoRA, one plain LoRA."""
    model = get_moelora_model(tiny_model("llama"), MiLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), "mi1")
    model.add_adapter(MiLoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, pooling="last", top_k=2), "mi2")
    model.add_adapter(MixLoraConfig(r=4, num_experts=4, lora_dropout=0.0), "mix")
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]), "lora")
    randomize_adapters(model, seed=7, std=0.3)
    return model.eval()


def _padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.shape[1] for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - s.shape[1] :] = s[0]
        mask[i, width - s.shape[1] :] = 1
    return ids, mask


MIXED = [
    pytest.param(["mi1", "mix", "lora", "mi2", "mi1"], id="four-kinds"),
    pytest.param(["mix", "mix"], id="mixlora-only"),
    pytest.param(["lora", "mi2", "mi2"], id="lora-and-milora"),
]


@pytest.mark.parametrize("names", MIXED)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_mixed_batch_forward_equals_separate_runs(names, grad):
    model = _tenants()
    seqs = [_ids(1, 3 + i, seed=10 + i) for i in range(len(names))]
    ids, mask = _padded(seqs)
    with torch.set_grad_enabled(grad):
        mixed = model(ids, attention_mask=mask, adapter_names=names).logits
        for i, (name, s) in enumerate(zip(names, seqs, strict=True)):
            model.set_adapter(name)
            alone = model(s, attention_mask=torch.ones_like(s)).logits
            torch.testing.assert_close(mixed[i, -s.shape[1] :], alone[0], rtol=1e-5, atol=1e-5)


def test_mixed_batch_generate_equals_separate_runs():
    model = _tenants()
    names = ["mi1", "mix", "lora", "mi2"]
    seqs = [_ids(1, 3 + 2 * i, seed=20 + i) for i in range(len(names))]
    ids, mask = _padded(seqs)
    for r in model.milora_routers():
        r.calls = 0
    together = model.generate(
        ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    assert _router_calls(model) == [1, 1, 1, 1]  # mi1 and mi2, one router per layer, once each
    for i, (name, s) in enumerate(zip(names, seqs, strict=True)):
        model.set_adapter(name)
        alone = model.generate(s, attention_mask=torch.ones_like(s), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(together[i, -alone.shape[1] :], alone[0]), name
    beams = model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=3, num_beams=2, pad_token_id=0)
    assert beams.shape[0] == len(names)


def test_mixed_batch_uses_one_segmented_call_per_projection(monkeypatch):
    from moelora import ops

    calls = []
    real = ops.segmented_lora

    def counting(*args):
        calls.append(args[5].shape[0])
        return real(*args)

    monkeypatch.setattr(ops, "segmented_lora", counting)
    model = _tenants()
    ids, mask = _padded([_ids(1, 4, seed=1), _ids(1, 4, seed=2), _ids(1, 4, seed=3)])
    with torch.no_grad():
        model(ids, attention_mask=mask, adapter_names=["mi1", "mi2", "lora"])
    # 2 layers x 7 projections, each with every adapter it holds stacked (q_proj holds mi1, mi2, mix, lora).
    assert len(calls) == 14 and max(calls) == 4


def test_save_and_load_round_trip(tmp_path):
    model = _tenants()
    ids, mask = _padded([_ids(1, 5, seed=1), _ids(1, 3, seed=2), _ids(1, 4, seed=3), _ids(1, 6, seed=4)])
    names = ["mi1", "mi2", "mix", "lora"]
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, adapter_names=names).logits
    for name in names:
        model.save_pretrained(str(tmp_path / name), adapter_name=name)
    config = json.loads((tmp_path / "mi1" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MILORA" and config["top_k"] == 3 and config["pooling"] == "attention"
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = MoeLoraModel.from_pretrained(tiny_model("llama"), str(tmp_path / "mi1"), adapter_name="mi1")
    for name in names[1:]:
        loaded.load_adapter(str(tmp_path / name), name)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask, adapter_names=names).logits, expected)
    for name in names:
        saved, again = model.adapter_state_dict(name), loaded.adapter_state_dict(name)
        assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_lora_files_use_peft_keys(tmp_path):
    from safetensors.torch import load_file

    model = get_moelora_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(tmp_path))
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(keys) == 2 * 2 * 2


# --- training -----------------------------------------------------------------------------------------------


def test_training_adds_the_prompt_balance_loss_and_reaches_every_router_parameter():
    model = _milora()
    model.train()
    ids = _ids(3, 6)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    log = []
    for router in model.milora_routers():
        real = router.forward

        def spy(h, m, real=real, **kwargs):
            out = real(h, m, **kwargs)
            log.append(out.probs)
            return out

        router.forward = spy
    out = model(ids, attention_mask=mask, labels=ids)
    aux = reference.prompt_balance_loss(torch.stack(log))
    torch.testing.assert_close(out.aux_loss, aux)
    with model.disable_adapter():
        ce = model(ids, attention_mask=mask, labels=ids).loss
    assert out.loss.item() != ce.item()
    out.loss.backward()
    for router in model.milora_routers():
        for name, p in router.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_training_on_the_picked_sequences_only_equals_every_row(family, monkeypatch):
    """On CPU a training step runs each module's LoRA on the sequences that picked it: the loss and every
    gradient (LoRA, router, rational activation) equal those of running every row with its gate."""
    model = _milora(family, top_k=2)
    model.train()
    ids = _ids(5, 7)

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.loss.detach(), grads

    subsets: list[int] = []
    real = layers._picked_sequences

    def spy(gates, x):
        picked = real(gates, x)
        subsets.append(gates.numel() if picked is None else picked.numel())
        return picked

    monkeypatch.setattr(layers, "_picked_sequences", spy)
    loss, grads = loss_and_grads()
    assert any(0 < n < 5 for n in subsets), f"no module was picked by only some sequences: {subsets}"
    monkeypatch.setattr(layers, "_picked_sequences", lambda gates, x: None)
    want_loss, want = loss_and_grads()
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert grads.keys() == want.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_bilevel_schedule_trains_lora_on_train_and_router_on_validation():
    model = _milora()
    model.train()
    lora, router = milora_parameter_groups(model)
    assert {id(p) for p in lora}.isdisjoint(id(p) for p in router)
    assert len(router) == 2 * 4  # per layer: router weight, pooling vector, rational numerator, denominator
    lora_opt, router_opt = torch.optim.AdamW(lora, lr=1e-2), torch.optim.AdamW(router, lr=1e-2)
    train = {"input_ids": _ids(4, 8, seed=1), "labels": _ids(4, 8, seed=1)}
    val = {"input_ids": _ids(4, 8, seed=2), "labels": _ids(4, 8, seed=2)}
    before = [p.detach().clone() for p in lora + router]
    losses = [bilevel_step(model, train, val, lora_opt, router_opt) for _ in range(15)]
    assert losses[-1][0] < losses[0][0]
    assert all(not torch.equal(a, p) for a, p in zip(before, lora + router, strict=True))


# --- bad input ----------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    pytest.param(dict(top_k=0), "top_k must be an int in \\[1, 7\\]", id="top_k-0"),
    pytest.param(dict(top_k=8), "top_k must be an int in \\[1, 7\\]", id="top_k-8"),
    pytest.param(dict(pooling="sum"), "pooling must be one of", id="pooling"),
    pytest.param(dict(activation="relu"), "activation must be one of", id="activation"),
    pytest.param(dict(r=0), "r must be a positive int", id="r-0"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        MiLoraConfig(**overrides)


def test_top_k_above_the_family_modules_raises_before_the_model_changes():
    model = tiny_model("phi3")  # 4 modules: qkv_proj, o_proj, gate_up_proj, down_proj
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="top_k=5 but this phi3 model has only 4 target modules"):
        get_moelora_model(model, MiLoraConfig(top_k=5))
    assert model.state_dict().keys() == before.keys()


BAD_CALLS = [
    pytest.param(dict(adapter_names=["mi1", "nope"]), "unknown adapters \\['nope'\\]", id="unknown-adapter"),
    pytest.param(dict(adapter_names=["mi1"]), "adapter_names has 1 entries but the batch has 2", id="length"),
    pytest.param(dict(adapter_names="mi1"), "adapter_names must be a list", id="a-string"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CALLS)
@pytest.mark.parametrize("method", ["forward", "generate"])
def test_bad_adapter_names_raise(kwargs, message, method):
    model = _tenants()
    ids = _ids(2, 4)
    with pytest.raises(ValueError, match=message):
        if method == "forward":
            model(ids, **kwargs)
        else:
            model.generate(ids, max_new_tokens=2, pad_token_id=0, **kwargs)


def test_adapter_names_in_training_raise():
    model = _tenants().train()
    with pytest.raises(ValueError, match="inference only"):
        model(_ids(2, 4), adapter_names=["mi1", "mix"])


def test_empty_prompts_raise():
    model = _milora()
    with pytest.raises(ValueError, match="the prompt is empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    ids = _ids(2, 4)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"sequences \[1\] have an empty prompt"):
        model(ids, attention_mask=mask)


# transformers 5.25 renamed the cache argument of the models' forward to `cache` (past_key_values still works,
# deprecated until 5.40); a decode step must be recognised under either name.
CACHE_KWARGS = [
    pytest.param("past_key_values", id="past_key_values"),
    pytest.param(
        "cache",
        id="cache",
        marks=pytest.mark.skipif(
            "cache" not in inspect.signature(LlamaForCausalLM.forward).parameters,
            reason="this transformers names the argument past_key_values only",
        ),
    ),
]


@pytest.mark.parametrize("cache_kwarg", CACHE_KWARGS)
def test_decoding_without_a_prefill_raises(cache_kwarg):
    model = _milora()
    ids = _ids(2, 4)
    out = model(ids, use_cache=True)
    model.clear_routing_cache()
    with pytest.raises(RuntimeError, match="no routing for this batch yet"):
        model(ids[:, -1:], **{cache_kwarg: out.past_key_values})
    out = model(ids, use_cache=True)
    with pytest.raises(RuntimeError, match="computed for 2 prompts but this call has 1"):
        model(ids[:1, -1:], **{cache_kwarg: out.past_key_values})


@pytest.mark.parametrize("cache_kwarg", CACHE_KWARGS)
def test_router_is_not_called_while_decoding_step_by_step(cache_kwarg):
    model = _milora()
    ids = _ids(2, 4)
    out = model(ids, use_cache=True)
    assert _router_calls(model) == [1, 1]
    seq = ids
    for _ in range(3):
        nxt = out.logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, nxt], 1)
        out = model(nxt, use_cache=True, **{cache_kwarg: out.past_key_values})
    assert _router_calls(model) == [1, 1]
    assert isinstance(next(model.milora_routers()), MiLoraRouter)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    grads = []
    for checkpointing in (False, True):
        model = _milora().train()
        if checkpointing:
            hf, kwargs = model.model, {"use_reentrant": False}
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 (the old names are deprecated)
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                assert hf.is_activation_checkpointing
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                assert hf.is_gradient_checkpointing
        model(ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * (14 + 4)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_forward_and_backward_are_bitwise_repeatable(backend):
    import moelora

    if backend == "cpu":
        pytest.importorskip("moelora.cpu_backend", reason="moelora._C is not built", exc_type=ImportError)
    ids = _ids(3, 7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        with moelora.set_backend(backend):
            for _ in range(2):
                model = _milora().train()
                out = model(ids, attention_mask=mask, labels=ids)
                out.loss.backward()
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                model.eval()
                with torch.no_grad():
                    mixed = _tenants()(ids, attention_mask=mask, adapter_names=["mi1", "mix", "mi2"]).logits
                runs.append((out.logits, grads, mixed))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][2], runs[1][2])
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


# --- properties (hypothesis) --------------------------------------------------------------------------------


@st.composite
def _prompt_cases(draw):
    B, S, H = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 9))
    M = draw(st.integers(1, 8))
    return dict(
        B=B,
        S=S,
        H=H,
        M=M,
        top_k=draw(st.integers(1, M)),
        pooling=draw(st.sampled_from(reference.POOLINGS)),
        gelu=draw(st.booleans()),
        pad=[draw(st.integers(0, S - 1)) for _ in range(B)],
        left=draw(st.booleans()),
        ties=draw(st.booleans()),
        nan_seq=draw(st.one_of(st.none(), st.integers(0, B - 1))),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(c=_prompt_cases())
def test_prompt_route_property_against_the_oracle(c):
    """Random shapes, paddings, poolings and router ties: the reference equals the oracle (fp64); a NaN in one
    sequence's prompt stays in that sequence; exactly top_k gates are set per clean sequence."""
    g = torch.Generator().manual_seed(c["seed"])
    B, S, H, M = c["B"], c["S"], c["H"], c["M"]
    hidden = torch.randn(B, S, H, generator=g, dtype=F64)
    router = torch.randn(M, H, generator=g, dtype=F64)
    if c["ties"]:
        router[:] = router[0]  # every module the same logit: top-k by index, as torch.topk (stable) picks
    mask = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(c["pad"]):  # p < S padding tokens, on the left or the right
        if p and c["left"]:
            mask[b, :p] = False
        elif p:
            mask[b, S - p :] = False
    if c["nan_seq"] is not None:
        hidden[c["nan_seq"], mask[c["nan_seq"]].nonzero()[0, 0]] = float("nan")
    num = den = None
    if not c["gelu"]:
        num = torch.tensor(reference.RATIONAL_GELU_NUMERATOR, dtype=F64)
        den = torch.tensor(reference.RATIONAL_GELU_DENOMINATOR, dtype=F64)
    pool_w = torch.randn(H, generator=g, dtype=F64)
    r = reference.prompt_route(
        hidden, mask, router, num, den, top_k=c["top_k"], pooling=c["pooling"], pool_weight=pool_w
    )
    for b in range(B):
        gates, probs = oracle.prompt_route_sequence(
            hidden[b], mask[b].tolist(), router, num, den, c["top_k"], c["pooling"], pool_w
        )
        if b == c["nan_seq"]:
            assert torch.isnan(r.probs[b]).all() or c["pooling"] in ("max", "last"), "NaN vanished"
            continue
        assert torch.isfinite(r.probs[b]).all(), "a NaN leaked into another sequence"
        _close(r.probs[b], probs, f"probs of sequence {b}")
        if not c["ties"]:
            _close(r.gates[b], gates, f"gates of sequence {b}")
        assert int((r.gates[b] > 0).sum()) == c["top_k"]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    T=st.integers(0, 70),
    n_seq=st.integers(1, 5),
    n_lora=st.integers(1, 4),
    r=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_segmented_lora_property_against_the_oracle(T, n_seq, n_lora, r, seed):
    """Random token maps over both paths (T <= 64 gathers, above loops): the reference equals the oracle."""
    g = torch.Generator().manual_seed(seed)
    token_seq = torch.randint(0, n_seq, (T,), generator=g)
    seq_lora = torch.randint(-1, n_lora, (n_seq,), generator=g)
    x = torch.randn(T, 5, generator=g, dtype=F64)
    A, B = torch.randn(n_lora, r, 5, generator=g, dtype=F64), torch.randn(n_lora, 3, r, generator=g, dtype=F64)
    gate, scaling = torch.rand(n_seq, generator=g, dtype=F64), torch.rand(n_lora, generator=g, dtype=F64) + 0.5
    y = reference.segmented_lora(x, token_seq, seq_lora, gate, A, B, scaling)
    assert y.shape == (T, 3)
    if T:
        expected = oracle.segmented_lora(x, token_seq.tolist(), seq_lora.tolist(), gate, A, B, scaling)
        _close(y, expected, "y")
