"""Quantised bases on CPU: a tiny llama loaded through bitsandbytes in 4-bit (nf4) and 8-bit (LLM.int8) with
MixLoRA, MiLoRA and plain LoRA adapters on the C++ backend. With B = 0 the logits are the quantised base's; a
few training steps lower the loss, reach every adapter behind a quantised layer and leave the quantised
storage bit-identical; the fused ops are the ones that ran. Saved adapters reload and serve a mixed batch, a
PEFT LoRA gives PEFT's logits, the HF Trainer trains, and DoRA is refused. docs/quantized.md says the same."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
cpu_backend = pytest.importorskip("moelora.cpu_backend", reason="moelora._C is not built", exc_type=ImportError)

from conftest import randomize_adapters, tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments  # noqa: E402

import moelora  # noqa: E402
from moelora import LoraConfig, MiLoraConfig, MixLoraConfig, MoeLoraModel, backend, get_moelora_model  # noqa: E402
from moelora.config import LLAMA_PROJECTIONS  # noqa: E402
from moelora.layers import keep_quantized_trainable  # noqa: E402

# bitsandbytes' 8-bit matmul says this on every fp32 input; the tests feed fp32 on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

# H and I are multiples of 64, bitsandbytes' 4-bit block, as in real models (its bf16 CPU inference kernel,
# which the bare base would run in eval, fails on narrower layers).
SHAPE = dict(hidden_size=64, intermediate_size=128, head_dim=16)
QUANT = {
    "nf4": (bnb.nn.Linear4bit, lambda **kw: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **kw)),
    "int8": (bnb.nn.Linear8bitLt, lambda **kw: BitsAndBytesConfig(load_in_8bit=True, **kw)),
}
# (config, the ops that may apply its adapter (MiLoRA: dense or segmented, by token count), whether every B
# gets a gradient: MiLoRA's unselected modules get none)
ADAPTERS = {
    "mixlora": (lambda: MixLoraConfig(r=4, num_experts=4, top_k=2), {"mixlora_ffn"}, True),
    "milora": (lambda: MiLoraConfig(r=4), {"lora", "segmented_lora"}, False),
    "lora": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_PROJECTIONS)), {"lora"}, True),
}
CASES = [(q, a) for q in QUANT for a in ADAPTERS]
CASE_IDS = [f"{q}-{a}" for q, a in CASES]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: at these tiny shapes a second only adds synchronisation, which costs seconds per
    step when other processes share the 2 cores (the C++ backend's threading is tested in test_cpu_backend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random llama saved once: from_pretrained is where bitsandbytes quantises."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", **SHAPE).save_pretrained(folder)
    return str(folder)


def load_quantized(checkpoint: str, quant: str, **options) -> torch.nn.Module:
    """The checkpoint quantised on load (`options`: more BitsAndBytesConfig fields), in eval mode."""
    layer_type, make_config = QUANT[quant]
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=make_config(**options), device_map={"": "cpu"}, dtype=torch.float32
    ).eval()
    quantized = [n for n, m in model.named_modules() if isinstance(m, layer_type)]
    assert len(quantized) == 7 * 2, f"expected every projection of both layers quantised, got {quantized}"
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    return ids, mask


def base_storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every frozen tensor: parameters, buffers, and each quantised layer's quantisation state
    (4-bit absmax/code and nested state, 8-bit row scales), which live outside the parameters."""
    out = {n: t.detach().clone() for n, t in model.named_parameters() if not t.requires_grad}
    out.update({n: t.clone() for n, t in model.named_buffers()})
    layer_types = tuple(layer_type for layer_type, _ in QUANT.values())
    for name, module in model.named_modules():
        if not isinstance(module, layer_types):
            continue
        states = [("quant_state", getattr(module.weight, "quant_state", None))]
        while states:
            key, state = states.pop()
            if state is not None:
                out.update({f"{name}.{key}.{f}": v.clone() for f, v in vars(state).items() if torch.is_tensor(v)})
                states.append((f"{key}.state2", getattr(state, "state2", None)))
        # 8-bit: the first forward moves the row scales from the weight to the layer's matmul state.
        scales = getattr(getattr(module, "state", None), "SCB", None)
        scales = scales if scales is not None else getattr(module.weight, "SCB", None)
        if scales is not None:
            out[f"{name}.SCB"] = scales.clone()
    return out


def assert_fused_ops_ran(adapter_ops: set[str]) -> None:
    """The last forward applied the adapter with one of `adapter_ops`, and every op ran on the C++ backend
    (one that backend does not have, on the reference, as on any base)."""
    ran = backend.ops_ran()
    assert adapter_ops & ran.keys(), f"none of {adapter_ops} ran: {ran}"
    for op, where in ran.items():
        expected = {"cpu"} if hasattr(cpu_backend, op) else {"reference"}
        assert set(where) == expected, f"{op} ran on {where}, expected {expected}: {ran}"


@pytest.mark.parametrize(("quant", "adapter"), CASES, ids=CASE_IDS)
def test_zero_B_gives_the_quantized_base_logits(checkpoint, quant, adapter):
    ids, mask = batch()
    base = load_quantized(checkpoint, quant)
    keep_quantized_trainable(base)  # the reference runs bitsandbytes' dequantising path, as moelora will
    with torch.no_grad():
        want = base(ids, attention_mask=mask).logits
        fp32 = tiny_model("llama", **SHAPE)(ids, attention_mask=mask).logits
    make_config, adapter_ops, _ = ADAPTERS[adapter]
    model = get_moelora_model(base, make_config()).eval()
    with moelora.set_backend("cpu"), torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        assert_fused_ops_ran(adapter_ops)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The comparison can tell: quantisation moves the logits far more than the tolerance.
    assert (want - fp32).abs().max() > 1e-3


@pytest.mark.parametrize(("quant", "adapter"), CASES, ids=CASE_IDS)
def test_training_lowers_the_loss_and_leaves_the_base_untouched(checkpoint, quant, adapter):
    ids, mask = batch()
    make_config, adapter_ops, every_b_learns = ADAPTERS[adapter]
    model = get_moelora_model(load_quantized(checkpoint, quant), make_config())
    before = base_storage(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    with moelora.set_backend("cpu"):
        with torch.no_grad():  # an evaluation first, as a Trainer with an eval set does
            model.eval()(ids, attention_mask=mask)
        model.train()
        for _ in range(4):
            loss = model(ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert_fused_ops_ran(adapter_ops)  # the last step's forward
    assert losses[-1] < losses[0] - 0.1, losses
    after = base_storage(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"training changed the quantised base: {changed}"
    if every_b_learns:
        still_zero = [n for n, p in params.items() if "lora_B" in n and not p.detach().any()]
        assert not still_zero, f"these B never got a gradient: {still_zero}"


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("evaluated", ["before-wrapping", "after-wrapping"])
def test_gradient_reaches_a_lora_behind_quantized_layers_after_an_eval_forward(checkpoint, quant, evaluated):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer at its first eval forward without grad for a
    kernel with no autograd; moelora turns that off and undoes it (moelora.layers.keep_quantized_trainable)."""
    ids, mask = batch()
    base = load_quantized(checkpoint, quant)
    if evaluated == "before-wrapping":
        with torch.no_grad():
            base(ids, attention_mask=mask)
    # q_proj's LoRA reaches the loss only through the quantised o_proj, FFN and the next layer.
    model = get_moelora_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    if evaluated == "after-wrapping":
        with torch.no_grad():
            model.eval()(ids, attention_mask=mask)
    packed = [
        n
        for n, m in model.named_modules()
        if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]
    assert not packed, f"still packed for bitsandbytes' CPU inference kernel: {packed}"
    model.train()
    with moelora.set_backend("cpu"):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == 2
    dead = [n for n, g in grads.items() if g is None or not g.any()]
    assert not dead, f"no gradient reached {dead}"


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize(
    "config",
    [MixLoraConfig(r=4, num_experts=4, use_dora=True), LoraConfig(r=4, use_dora=True)],
    ids=["mixlora-dora", "lora-dora"],
)
def test_dora_on_a_quantized_base_raises_before_changing_the_model(checkpoint, quant, config):
    """DoRA's magnitude is the norm of W, and a quantised layer holds codes: refused, not computed wrongly."""
    base = load_quantized(checkpoint, quant)
    modules = [type(m) for m in base.modules()]
    with pytest.raises(ValueError, match=r"use_dora=True needs the base projection's weight in floating point"):
        get_moelora_model(base, config)
    assert [type(m) for m in base.modules()] == modules


@pytest.mark.parametrize("quant", list(QUANT))
def test_saved_adapters_reload_and_serve_a_mixed_batch(checkpoint, quant, tmp_path):
    """Adapters trained on a quantised base, saved, loaded onto a fresh copy of it: one mixed batch (a MixLoRA
    row, a MiLoRA row) gives each row the logits of its adapter alone, and generate() runs on it."""
    ids, mask = batch()
    # LLM.int8 runs in fp16 every column in which any row of the batch has an outlier (|x| > 6), so a row's
    # output depends on the other rows; with the threshold at 0 every column is int8 and rows are independent.
    options = {"llm_int8_threshold": 0.0} if quant == "int8" else {}
    trained = get_moelora_model(load_quantized(checkpoint, quant, **options), MixLoraConfig(r=4, num_experts=4), "mix")
    trained.add_adapter(MiLoraConfig(r=4), "mi")
    randomize_adapters(trained)  # every B non-zero, as after training
    trained.eval()
    alone = {}
    with moelora.set_backend("cpu"), torch.no_grad():
        for name in ("mix", "mi"):
            trained.set_adapter(name)
            alone[name] = trained(ids, attention_mask=mask).logits
            trained.save_pretrained(str(tmp_path / name), adapter_name=name)
    assert (alone["mix"] - alone["mi"]).abs().max() > 1e-2  # the rows below can tell the adapters apart

    served = MoeLoraModel.from_pretrained(
        load_quantized(checkpoint, quant, **options), str(tmp_path / "mix"), adapter_name="mix"
    )
    served.load_adapter(str(tmp_path / "mi"), "mi")
    with moelora.set_backend("cpu"), torch.no_grad():
        for name in ("mix", "mi"):
            served.set_adapter(name)
            torch.testing.assert_close(served(ids, attention_mask=mask).logits, alone[name], rtol=1e-5, atol=1e-5)
        mixed = served(ids, attention_mask=mask, adapter_names=["mix", "mi"]).logits
        out = served.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, adapter_names=["mix", "mi"])
    torch.testing.assert_close(mixed[0], alone["mix"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1, 3:], alone["mi"][1, 3:], rtol=1e-4, atol=1e-4)  # row 1: 3 pad tokens
    assert out.shape == (2, ids.shape[1] + 4)


@pytest.mark.parametrize("quant", list(QUANT))
def test_a_peft_lora_trained_on_a_quantized_base_gives_peft_logits_in_moelora(checkpoint, quant, tmp_path):
    peft = pytest.importorskip("peft")
    ids, mask = batch()
    base = load_quantized(checkpoint, quant)
    keep_quantized_trainable(base)  # both sides run the quantised layers the same way (see above)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_PROJECTIONS)))
    randomize_adapters(theirs, std=0.3)
    theirs.eval().save_pretrained(str(tmp_path))
    ours = MoeLoraModel.from_pretrained(load_quantized(checkpoint, quant), str(tmp_path))
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        with theirs.disable_adapter():
            bare = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - bare).abs().max() > 1e-2  # the adapter moves the logits: the comparison can fail


@pytest.mark.parametrize("quant", list(QUANT))
def test_the_hf_trainer_trains_on_a_quantized_base_with_evaluations_between_steps(checkpoint, quant, tmp_path):
    """transformers' Trainer refuses a quantised model without adapters it recognises; an evaluation between
    steps is what would repack 4-bit layers on an AVX512-BF16 CPU (see above)."""
    model = get_moelora_model(load_quantized(checkpoint, quant), MixLoraConfig(r=4, num_experts=4, top_k=2))
    g = torch.Generator().manual_seed(3)
    data = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
        for x in torch.randint(3, 64, (16, 12), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
    with moelora.set_backend("cpu"):
        trainer.train()
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 3
    assert evals[0] > evals[1] > evals[2], evals
