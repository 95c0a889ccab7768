"""The `model` suite: a tiny random llama with MixLoRA (and MiLoRA), built locally (nothing downloaded).

    base          the llama without adapters
    reference     moelora.get_moelora_model(llama, MixLoraConfig(lora_dropout=0.0)) under backend "reference"
    fused         the same adapted model under the fused backend, when available
    milora        the llama with one MiLoRA adapter (MiLoraConfig(r, lora_alpha=2r, lora_dropout=0.0), the
                  paper's top-3 of the 7 projections, rational activation, attention pooling) on every sequence
    milora-mixed  generate only: B MiLoRA adapters loaded at once, sequence b runs adapter b in one batched
                  generate(adapter_names=[...]) (PEFT's mixed batch; at B=1 the same work as milora)

Modes:
    train     one optimiser step on a [B, S] batch: forward with labels (loss + router aux loss), backward,
              AdamW step. `base` has nothing to train: its step is forward + backward to the input
              embeddings, the part of the work every adapter pays too.
    generate  greedy generation of exactly N new tokens after a P-token prompt, batch B, KV cache on;
              the prefill is part of it.

Every model is built afresh from the seed, so each provider starts from the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

import moelora
from bench.fused import fused_backend, fused_missing

PROVIDERS = ("base", "reference", "fused", "milora", "milora-mixed")
MODES = ("train", "generate")
MILORA_TOP_K = 3  # the paper's (MiLoraConfig's default); the shape's k is MixLoRA's


@dataclass(frozen=True)
class ModelShape:
    """Batch B; train sequence S; generate prompt P and N new tokens; llama H, I, L layers, vocab V; E, k, r."""

    B: int
    S: int
    P: int
    N: int
    H: int
    I: int  # intermediate size
    L: int
    V: int
    E: int
    k: int
    r: int

    def label(self) -> str:
        return "-".join(f"{f}{getattr(self, f)}" for f in ("B", "S", "P", "N", "H", "I", "L", "V", "E", "k", "r"))


@dataclass
class ModelInputs:
    shape: Any  # ModelShape, or the e2e suite's E2eShape: anything with B, S, P and V
    dtype: torch.dtype
    device: torch.device
    seed: int
    ids: Tensor  # [B, S] training batch; labels = ids
    prompt: Tensor  # [B, P]


def make_inputs(
    shape: Any, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> ModelInputs:
    g = torch.Generator().manual_seed(seed)
    # Token ids from 3 up: 0, 1, 2 are pad, bos and eos.
    ids = torch.randint(3, shape.V, (shape.B, shape.S), generator=g).to(device)
    prompt = torch.randint(3, shape.V, (shape.B, shape.P), generator=g).to(device)
    return ModelInputs(shape, dtype, torch.device(device), seed, ids, prompt)


def build(inp: ModelInputs, adapters: bool) -> nn.Module:
    """The llama (the same weights for the same seed), frozen; with `adapters`, MixLoRA with random non-zero B."""
    model = _llama(inp)
    if not adapters:
        return model.eval()
    s = inp.shape
    cfg = moelora.MixLoraConfig(r=s.r, lora_alpha=2 * s.r, lora_dropout=0.0, num_experts=s.E, top_k=s.k)
    return _redraw_lora_B(moelora.get_moelora_model(model, cfg), inp.seed + 1).eval()


def build_milora(inp: ModelInputs, adapters: int = 1) -> nn.Module:
    """The same llama with `adapters` MiLoRA adapters ("default", then "a1", "a2", ...), each with its own
    random non-zero B (the routers keep their random init: normal(0.02) weights, zero pooling vector)."""
    s = inp.shape
    cfg = moelora.MiLoraConfig(r=s.r, lora_alpha=2 * s.r, lora_dropout=0.0, top_k=MILORA_TOP_K)
    torch.manual_seed(inp.seed + 2)  # the routers' init
    model = moelora.get_moelora_model(_llama(inp), cfg)
    for i in range(1, adapters):
        model.add_adapter(cfg, milora_names(adapters)[i])
    return _redraw_lora_B(model, inp.seed + 1).eval()


def milora_names(n: int) -> list[str]:
    return ["default", *(f"a{i}" for i in range(1, n))]


def _redraw_lora_B(model: nn.Module, seed: int) -> nn.Module:
    """A fresh adapter has B = 0, which would make every LoRA term an exact zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _llama(inp: ModelInputs) -> nn.Module:
    s = inp.shape
    config = LlamaConfig(
        vocab_size=s.V,
        hidden_size=s.H,
        intermediate_size=s.I,
        num_hidden_layers=s.L,
        num_attention_heads=max(1, s.H // 64),
        num_key_value_heads=max(1, s.H // 64),
        head_dim=min(64, s.H),
        max_position_embeddings=max(s.S, s.P + s.N),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(inp.seed)
    return LlamaForCausalLM(config).to(device=inp.device, dtype=inp.dtype).requires_grad_(False)


def backend_for(name: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """What each call of provider `name` enters. Resolved now, in the untimed set-up, so that a lazily
    loaded fused extension does not load inside the first timed call."""
    if name == "base":
        return contextlib.nullcontext
    if name.startswith("milora"):  # the fused backend when there is one, else the reference
        chosen = "reference" if fused_missing(device) is not None else fused_backend(device)
        return lambda: moelora.set_backend(chosen)
    chosen = "reference" if name == "reference" else fused_backend(device)
    return lambda: moelora.set_backend(chosen)


def greedy_generate(
    model: nn.Module, prompt: Tensor, n: int, enter: Callable[[], contextlib.AbstractContextManager], **kwargs: Any
) -> Callable[[], Tensor]:
    """A timed unit: `model.generate` greedy, exactly n new tokens after `prompt` [B, P] (no padding), KV cache
    on, inside `enter()`; kwargs go to generate (adapter_names)."""
    mask = torch.ones_like(prompt)

    def generate() -> Tensor:
        with torch.no_grad(), enter():
            return model.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )

    return generate


def step(name: str, inp: ModelInputs, mode: str) -> Callable[[], object]:
    """One timed unit of provider `name` in `mode`; the model (and optimiser) is built here, untimed."""
    if not runs(name, mode):
        raise ValueError(f"model: provider {name} has no {mode} mode")
    if name == "milora-mixed":
        model = build_milora(inp, adapters=inp.shape.B)
        mixed = {"adapter_names": milora_names(inp.shape.B)}
    else:
        model = build_milora(inp) if name == "milora" else build(inp, adapters=name != "base")
        mixed = {}
    enter = backend_for(name, inp.device)
    if mode == "generate":
        return greedy_generate(model, inp.prompt, inp.shape.N, enter, **mixed)
    if mode != "train":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if name == "base":
        embeds = model.get_input_embeddings()(inp.ids).detach().requires_grad_()

        def base_step() -> tuple[Tensor, ...]:
            return torch.autograd.grad(model(inputs_embeds=embeds, labels=inp.ids).loss, embeds)

        return base_step
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> Tensor:
        with enter():
            loss = model(input_ids=inp.ids, labels=inp.ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return train_step


def outputs(name: str, inp: ModelInputs, with_grads: bool) -> dict[str, Tensor]:
    """What parity compares: the logits and, with_grads, the loss and every adapter parameter's gradient."""
    model = build(inp, adapters=True)
    with backend_for(name, inp.device)():
        if not with_grads:
            with torch.no_grad():
                return {"logits": model(input_ids=inp.ids).logits}
        out = model(input_ids=inp.ids, labels=inp.ids)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.loss, [p for _, p in named])
    short = [n.removeprefix("model.model.").replace(".adapters.default", "") for n, _ in named]
    return {"logits": out.logits.detach(), "loss": out.loss.detach()} | {
        f"d{n}": g for n, g in zip(short, grads, strict=True)
    }


def runs(name: str, mode: str) -> bool:
    """milora-mixed is generate only: a mixed-adapter batch is for inference (MoeLoraModel refuses training)."""
    return not (name == "milora-mixed" and mode == "train")


def tokens_per_call(shape: ModelShape, mode: str) -> int | None:
    return shape.B * shape.N if mode == "generate" else None
