"""The `e2e` suite: whole Hugging Face llamas (random weights from a LlamaConfig, nothing downloaded), timed
as a user runs them: one training step, one greedy generation, the time to the first token.

Providers (each builds its own model from the same seed, so every one starts from the same base weights):
    base                       the llama alone
    peft-lora                  the real `peft` package: LoRA r=16, alpha=32, dropout 0.05 on all seven
                               projections (q, k, v, o, gate, up, down)
    mixlora-pkg                PyPI `mixlora` 0.2.3 (inject_adapter_in_model), when importable
    moelora-mixlora-<backend>  moelora.get_moelora_model(llama, MixLoraConfig()) (E=8, k=2, r=16, dropout 0.05),
                               every call under moelora.set_backend(<backend>)
    moelora-milora-<backend>   the same with MiLoraConfig() (r=32, top-3 of the 7 projections)
<backend> is `reference`, or the fused one of the device: `cpu` (the C++ extension) on CPU, `triton` on CUDA.

Mixed batches (MIXED, opt-in: they run only when --providers names them): n adapters (n in MIXED_SIZES = 8, 32)
loaded on one llama, sequence i runs adapter i, all n sequences in one generate(adapter_names=[...]). These
providers run n sequences whatever the row's B, and only generate and ttft (a mixed batch is for inference).
    peft-lora-mixed<n>               PEFT's own mixed batch: n LoRAs as peft-lora's (add_adapter)
    moelora-lora-mixed<n>-<backend>  n plain LoRAs through moelora (moelora.LoraConfig with peft-lora's r,
                                     alpha, dropout and projections)
    moelora-milora-mixed<n>-<backend>, moelora-mixlora-mixed<n>-<backend>  n MiLoRA / MixLoRA adapters
    moelora-mix-mixed<n>-<backend>   adapter i is MiLoRA, MixLoRA, LoRA for i % 3 = 0, 1, 2

mixlora-pkg and the moelora MixLoRA providers load the same adapter tensors (drawn here in MoE-PEFT's
layout, converted by moelora.formats), so they compute one function and route the same tokens alike.

Modes:
    train     one optimiser step on a [B, S] batch of random ids: forward with labels, backward, AdamW
              step, zero_grad; LoRA dropout on (the configs' 0.05). moelora's loss adds the router aux
              loss, mixlora-pkg has none (the package has no training loss). `base` has nothing to train:
              its step is forward + backward to the input embeddings, with no optimiser step.
    generate  model.generate greedy (do_sample=False), exactly N new tokens (min_new_tokens = max_new_tokens)
              after B prompts of P tokens, KV cache on, prefill included
    ttft      the same with one new token: the time to the first token (the prefill)

Parity (eval mode, fp32, on a model of at most PARITY_LAYERS layers and the first PARITY_TOKENS tokens of
the batch): every adapter with B = 0 gives the base's logits; with random non-zero adapters mixlora-pkg and
moelora-mixlora-<fused> give moelora-mixlora-reference's logits, and moelora-milora-<fused> gives
moelora-milora-reference's. A mixed provider is compared with itself (`alone`): its batch's logits on n
sequences against each sequence run alone with its adapter (set_adapter; moelora's on the reference backend),
and its batch with B = 0 against the llama alone on those n sequences.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

import moelora
from bench.fused import backend_name, fused_missing
from bench.model import ModelInputs, greedy_generate, make_inputs
from bench.providers import mixlora_pkg_missing
from moelora import formats
from moelora.config import LLAMA_PROJECTIONS

if TYPE_CHECKING:  # peft is optional: imported where a provider needs it
    import peft

FUSED = ("cpu", "triton")
BACKENDS = ("reference", *FUSED)
MOELORA = tuple(f"moelora-{kind}-{b}" for kind in ("mixlora", "milora") for b in BACKENDS)
PROVIDERS = ("base", "peft-lora", "mixlora-pkg", *MOELORA)  # the suite's default list
MIXED_SIZES = (8, 32)
MIXED_KINDS = ("milora", "mixlora", "lora", "mix")
MIXED = tuple(
    name
    for n in MIXED_SIZES
    for name in (f"peft-lora-mixed{n}", *(f"moelora-{k}-mixed{n}-{b}" for k in MIXED_KINDS for b in BACKENDS))
)
MIX_CYCLE = ("milora", "mixlora", "lora")  # moelora-mix-*: adapter i's kind
MILORA_OPS = ("prompt_route", "segmented_lora")  # what MiLoRA runs (moelora.ops); a backend may lack them
MODES = ("train", "generate", "ttft")
PEFT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
# Parity checks the function, not the scale: a few layers and tokens of the row's shape (at 7B, in fp32).
PARITY_LAYERS = 4
PARITY_TOKENS = 32


@dataclass(frozen=True)
class E2eShape:
    """Batch B; train sequence S; generate prompt P and N new tokens; llama H, I, L layers, attention heads
    and key/value heads, vocab V."""

    B: int
    S: int
    P: int
    N: int
    H: int
    I: int  # intermediate size
    L: int
    heads: int
    kv_heads: int
    V: int

    def __post_init__(self) -> None:
        if self.H % self.heads:
            raise ValueError(f"H={self.H} must be a multiple of the preset's heads={self.heads} (--H)")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        for name in ("B", "S", "P", "N", "L"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def label(self) -> str:
        return "-".join(f"{f}{getattr(self, f)}" for f in ("B", "S", "P", "N", "H", "I", "L", "V"))


def family(name: str) -> str | None:
    """The moelora family of a provider, "mixlora" or "milora"; None for the others."""
    return name.split("-")[1] if name.startswith("moelora-") else None


def mixed_size(name: str) -> int | None:
    """n, the adapters (and sequences) of a mixed-batch provider `...-mixed<n>[-<backend>]`; None for the others."""
    for part in name.split("-"):
        if part.startswith("mixed") and part[len("mixed") :].isdigit():
            return int(part[len("mixed") :])
    return None


def adapter_names(n: int) -> list[str]:
    """The n tenants' adapter names, in batch order: sequence i runs adapter i."""
    return [f"tenant{i}" for i in range(n)]


def run_shape(name: str, shape: E2eShape) -> E2eShape:
    """The shape provider `name` runs: a mixed batch of n adapters has B = n sequences whatever the row's B."""
    n = mixed_size(name)
    return shape if n is None else replace(shape, B=n)


def run_inputs(name: str, inp: ModelInputs) -> ModelInputs:
    """The inputs of provider `name`: the row's, or for a mixed batch n sequences drawn from the same seed."""
    shape = run_shape(name, inp.shape)
    return inp if shape == inp.shape else make_inputs(shape, inp.dtype, inp.device, inp.seed)


def backend_of(name: str) -> str | None:
    """The moelora backend a provider runs under (the last part of its name), None for the others."""
    return name.rsplit("-", 1)[1] if name.startswith("moelora-") else None


def missing(name: str, device: torch.device) -> str | None:
    """Why provider `name` cannot run on `device` here, or None."""
    if name.startswith("peft-lora") and importlib.util.find_spec("peft") is None:
        return f"{name} skipped: `import peft` fails (pip install -e '.[bench]')"
    if name == "mixlora-pkg":
        return mixlora_pkg_missing()
    chosen = backend_of(name)
    if chosen in FUSED:
        if chosen != backend_name(device):
            return f"{name} skipped: backend {chosen} is not the fused backend of {device.type} tensors"
        if (why := fused_missing(device)) is not None:
            return f"{name} {why}"
    return None


def runs(name: str, mode: str) -> bool:
    """Mixed batches run generate and ttft only: adapter_names is for inference (PEFT and moelora refuse it in
    training)."""
    return mode != "train" or mixed_size(name) is None


def tokens_per_call(shape: E2eShape, mode: str) -> int | None:
    """train: the B x S tokens of the step; generate: the B x N new tokens (prefill included in the time)."""
    return {"train": shape.B * shape.S, "generate": shape.B * shape.N}.get(mode)


def llama_config(shape: E2eShape, layers: int | None = None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=shape.V,
        hidden_size=shape.H,
        intermediate_size=shape.I,
        num_hidden_layers=layers or shape.L,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.H // shape.heads,
        max_position_embeddings=max(shape.S, shape.P + shape.N),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_llama(inp: ModelInputs, layers: int | None = None) -> LlamaForCausalLM:
    """The seeded llama on inp.device in inp.dtype (initialised there: no fp32 copy of a 7B model on the
    host), frozen, in eval mode."""
    torch.manual_seed(inp.seed)
    with torch.device(inp.device):
        model = LlamaForCausalLM._from_config(llama_config(inp.shape, layers), dtype=inp.dtype)
    return model.requires_grad_(False).eval()


def _randn(shape: tuple[int, ...], std: float, g: torch.Generator | None, device: torch.device) -> Tensor:
    if device.type == "meta":  # a dry run: shapes only
        return torch.empty(shape, device=device)
    return torch.randn(shape, generator=g, device=device) * std


def pkg_weights(shape: E2eShape, layers: int, device: torch.device, seed: int, zero_b: bool) -> dict[str, Tensor]:
    """MixLoraConfig()'s adapter in MoE-PEFT's layout (the mixlora package's), fp32: A of the kaiming scale,
    routers normal(0.02) as at init, B normal(0.02) or, with zero_b, zero as in a fresh adapter."""
    cfg = moelora.MixLoraConfig()
    g = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    q, kv = shape.H, shape.H // shape.heads * shape.kv_heads
    dims = {"q_proj": (q, shape.H), "k_proj": (kv, shape.H), "v_proj": (kv, shape.H), "o_proj": (shape.H, q)}
    dims |= {"gate_proj": (shape.I, shape.H), "up_proj": (shape.I, shape.H), "down_proj": (shape.H, shape.I)}

    def pair(out_in: tuple[int, int]) -> tuple[Tensor, Tensor]:
        out, fan_in = out_in
        b = _randn((out, cfg.r), 0.02, g, device)
        return _randn((cfg.r, fan_in), fan_in**-0.5, g, device), b.zero_() if zero_b else b

    weights = {}
    for i in range(layers):
        for proj in ATTENTION:
            A, B = pair(dims[proj])
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_A.weight"] = A
            weights[f"mixlora.layers.{i}.self_attn.{proj}.lora_B.weight"] = B
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = _randn((cfg.num_experts, shape.H), 0.02, g, device)
        for proj in FFN:
            for e in range(cfg.num_experts):
                A, B = pair(dims[proj])
                weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A.weight"] = A
                weights[f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_B.weight"] = B
    return weights


class PkgModel(nn.Module):
    """The llama with the mixlora package's adapter: the package keeps its experts in plain dicts and its
    routers as plain tensors, so model.train(), .eval() and .parameters() would miss them; here they are
    registered (routers as Parameters) so the optimiser and the dropout switch reach them."""

    def __init__(self, llama: LlamaForCausalLM) -> None:
        super().__init__()
        self.llama = llama
        moes = [layer.mlp.mixlora_moes["default"] for layer in llama.model.layers]
        for moe in moes:
            moe.gate_ = nn.Parameter(moe.gate_.detach().clone())
        self.moes = nn.ModuleList(moes)
        self.experts = nn.ModuleList(lin for moe in moes for lin in moe.experts_.values())

    def forward(self, **kwargs) -> object:
        return self.llama(**kwargs)

    def generate(self, **kwargs) -> Tensor:
        return self.llama.generate(**kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.llama.get_input_embeddings()


def _build_pkg(inp: ModelInputs, layers: int, zero_b: bool) -> PkgModel:
    import mixlora

    cfg = mixlora.MixLoraConfig.from_config(
        moelora.MixLoraConfig(base_model_name_or_path="random-llama").to_moe_peft_dict()
    )
    llama = build_llama(inp, layers)
    cfg.adapter_name_, cfg.dtype_ = "default", torch.float32  # adapters in fp32, as moelora keeps them
    cfg.act_fn_ = llama.config.hidden_act  # the package leaves None ("the model's") unresolved and fails
    cfg.check()
    mixlora.inject_adapter_in_model(llama, cfg, pkg_weights(inp.shape, layers, inp.device, inp.seed + 1, zero_b))
    return PkgModel(llama).eval()


def _redraw_lora_b(model: nn.Module, seed: int) -> None:
    """A fresh adapter has B = 0, which makes every LoRA term an exact zero."""
    p0 = next(model.parameters())
    if p0.device.type == "meta":
        return
    g = torch.Generator(device=p0.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.02)


def _peft_lora_config() -> peft.LoraConfig:
    import peft

    return peft.LoraConfig(**PEFT_LORA, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM")


def _moelora_config(kind: str) -> moelora.MixLoraConfig | moelora.MiLoraConfig | moelora.LoraConfig:
    if kind == "lora":  # peft-lora's adapter, through moelora
        return moelora.LoraConfig(**PEFT_LORA, target_modules=list(LLAMA_PROJECTIONS))
    return moelora.MixLoraConfig() if kind == "mixlora" else moelora.MiLoraConfig()


def _build_mixed(name: str, inp: ModelInputs, zero_b: bool, layers: int) -> nn.Module:
    """n adapters on one llama, each with its own tensors (fresh: B = 0; else random B)."""
    n, kind = mixed_size(name), family(name)
    names = adapter_names(n)
    llama = build_llama(inp, layers)
    torch.manual_seed(inp.seed + 2)  # the adapters' init (A, routers): the same for every backend
    if kind is None:  # peft-lora-mixed<n>
        import peft

        model = peft.get_peft_model(llama, _peft_lora_config(), adapter_name=names[0])
        for adapter in names[1:]:
            model.add_adapter(adapter, _peft_lora_config())
    else:
        kinds = [MIX_CYCLE[i % len(MIX_CYCLE)] if kind == "mix" else kind for i in range(n)]
        model = moelora.get_moelora_model(llama, _moelora_config(kinds[0]), names[0])
        for adapter, k in zip(names[1:], kinds[1:], strict=True):
            model.add_adapter(_moelora_config(k), adapter, trainable=False)
    if not zero_b:
        _redraw_lora_b(model, inp.seed + 1)
    return model.eval()


def build(name: str, inp: ModelInputs, zero_b: bool = False, layers: int | None = None) -> nn.Module:
    """Provider `name`'s model in eval mode: fresh adapters (zero_b: B = 0, the base's outputs) or random
    non-zero ones; mixlora-pkg and the moelora MixLoRA providers get the same tensors. A mixed provider's
    model holds its n adapters (run it on run_inputs(name, inp))."""
    layers = layers or inp.shape.L
    if mixed_size(name) is not None:
        return _build_mixed(name, inp, zero_b, layers)
    if name == "base":
        return build_llama(inp, layers)
    if name == "peft-lora":
        import peft

        model = peft.get_peft_model(build_llama(inp, layers), _peft_lora_config())
    elif name == "mixlora-pkg":
        return _build_pkg(inp, layers, zero_b)
    elif family(name) == "mixlora":
        model = moelora.get_moelora_model(build_llama(inp, layers), moelora.MixLoraConfig())
        theirs = pkg_weights(inp.shape, layers, inp.device, inp.seed + 1, zero_b)
        formats.copy_into(model.adapter_state_dict(), formats.from_moe_peft(theirs, moelora.MixLoraConfig()), name)
        return model.eval()
    elif family(name) == "milora":
        llama = build_llama(inp, layers)
        torch.manual_seed(inp.seed + 2)  # the routers' init, the same for every backend
        model = moelora.get_moelora_model(llama, moelora.MiLoraConfig())
    else:
        raise ValueError(f"e2e: unknown provider {name!r}; choose from {', '.join(PROVIDERS + MIXED)}")
    if not zero_b:
        _redraw_lora_b(model, inp.seed + 1)
    return model.eval()


def backend_for(name: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """What each call of provider `name` enters: its moelora backend (resolved now, in the untimed set-up, so
    that a lazily loaded extension does not load inside a timed call), nothing for the others."""
    chosen = backend_of(name)
    if chosen is None:
        return contextlib.nullcontext
    with moelora.set_backend(chosen):
        moelora.backend.resolve(device)
    return lambda: moelora.set_backend(chosen)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def free_memory() -> None:
    """The previous provider's model is garbage by now; collect it before the next one is built (at 7B two
    models at once may not fit)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step(name: str, inp: ModelInputs, mode: str) -> Callable[[], object]:
    """One timed unit of provider `name` in `mode`; the model (and optimiser) is built here, untimed."""
    if mode not in MODES:
        raise ValueError(f"e2e: mode must be one of {MODES}, got {mode!r}")
    if not runs(name, mode):
        raise ValueError(f"e2e: provider {name!r} has no {mode!r} mode (a mixed batch runs generate and ttft)")
    free_memory()
    inp = run_inputs(name, inp)
    model = build(name, inp)
    enter = backend_for(name, inp.device)
    if mode in ("generate", "ttft"):
        n = inp.shape.N if mode == "generate" else 1
        # One adapter per sequence in a mixed batch; the others run their one adapter.
        mixed = {} if mixed_size(name) is None else {"adapter_names": adapter_names(inp.shape.B)}
        return greedy_generate(model, inp.prompt, n, enter, **mixed)
    if name == "base":
        embeds = model.get_input_embeddings()(inp.ids).detach().requires_grad_()

        def base_step() -> tuple[Tensor, ...]:
            return torch.autograd.grad(model(inputs_embeds=embeds, labels=inp.ids).loss, embeds)

        return base_step
    model.train()  # LoRA dropout on, as in training
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)

    def train_step() -> Tensor:
        with enter():
            loss = model(input_ids=inp.ids, labels=inp.ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return train_step


def parity_keys(name: str) -> tuple[str, ...]:
    """What provider `name` is compared on: "base" (its logits with B = 0 against the llama alone) and, for
    the providers that compute the reference's function, "mixlora" / "milora" (random adapters). A mixed
    provider has none of these: it is compared with itself (alone)."""
    if mixed_size(name) is not None:
        return ()
    if name == "mixlora-pkg" or (family(name) == "mixlora" and backend_of(name) != "reference"):
        return ("base", "mixlora")
    if family(name) == "milora" and backend_of(name) != "reference":
        return ("base", "milora")
    return ("base",)


def _logits(name: str, inp: ModelInputs, ids: Tensor, zero_b: bool) -> Tensor:
    model = build(name, inp, zero_b=zero_b, layers=min(inp.shape.L, PARITY_LAYERS))
    with torch.no_grad(), backend_for(name, inp.device)():
        return model(input_ids=ids).logits.float()


def outputs(name: str, inp: ModelInputs, with_grads: bool = False) -> dict[str, Tensor]:
    """Parity's outputs, eval mode: "reference" gives the oracle of every key (the llama alone, and
    moelora-mixlora-reference / moelora-milora-reference with random adapters); a mixed provider gives its
    batch's logits with B = 0 ("base") and random B ("alone"), compared with alone(name, inp)."""
    if with_grads:
        raise ValueError("e2e: parity compares logits only (with_grads=False)")
    free_memory()
    ids = inp.ids[:, :PARITY_TOKENS]
    if mixed_size(name) is not None:
        return {"base": _mixed_logits(name, inp, zero_b=True), "alone": _mixed_logits(name, inp, zero_b=False)}
    if name == "reference":
        return {
            "base": _logits("base", inp, ids, zero_b=True),
            "mixlora": _logits("moelora-mixlora-reference", inp, ids, zero_b=False),
            "milora": _logits("moelora-milora-reference", inp, ids, zero_b=False),
        }
    return {key: _logits(name, inp, ids, zero_b=key == "base") for key in parity_keys(name)}


def _mixed_logits(name: str, inp: ModelInputs, zero_b: bool) -> Tensor:
    """The mixed batch's logits: sequence i of run_inputs(name, inp) with adapter i, all in one forward."""
    inp = run_inputs(name, inp)
    model = build(name, inp, zero_b=zero_b, layers=min(inp.shape.L, PARITY_LAYERS))
    with torch.no_grad(), backend_for(name, inp.device)():
        return model(input_ids=inp.ids[:, :PARITY_TOKENS], adapter_names=adapter_names(inp.shape.B)).logits.float()


def alone(name: str, inp: ModelInputs) -> dict[str, Tensor]:
    """What mixed provider `name` is compared with (empty for the others): "alone", each of its n sequences
    run by itself with its adapter (set_adapter; moelora's on the reference backend), and "base", the llama
    alone on those n sequences (its batch with every B = 0 must give them)."""
    if mixed_size(name) is None:
        return {}
    free_memory()
    inp = run_inputs(name, inp)
    ids = inp.ids[:, :PARITY_TOKENS]
    model = build(name, inp, layers=min(inp.shape.L, PARITY_LAYERS))
    rows = []
    with torch.no_grad(), moelora.set_backend("reference"):  # PEFT's model runs no moelora op
        for i, adapter in enumerate(adapter_names(inp.shape.B)):
            model.set_adapter(adapter)
            rows.append(model(input_ids=ids[i : i + 1]).logits.float())
    return {"base": _logits("base", inp, ids, zero_b=True), "alone": torch.cat(rows)}


def dry_run(
    shape: E2eShape, dtype: torch.dtype = torch.bfloat16, names: tuple[str, ...] = PROVIDERS
) -> Iterator[tuple[str, nn.Module]]:
    """Every provider's model at `shape` on the meta device (no memory, no numbers): that the GPU presets
    construct, checked on a machine without their memory. Skips the packages that are not installed."""
    inp = make_inputs(replace(shape, S=1, P=1), dtype, device="meta")
    for name in names:
        if (name == "mixlora-pkg" or name.startswith("peft-lora")) and missing(name, inp.device) is not None:
            continue
        yield name, build(name, inp)
