"""The suites: what each one times, on which shapes, with which providers, and how parity is judged.

    ffn       one MixLoRA FFN (bench.providers)
    route     router logits + softmax + top-k / top-p alone (bench.route)
    moe_lora  the gathered per-expert LoRA alone (bench.moe_lora)
    model     a tiny random llama with MixLoRA (and MiLoRA): train step and greedy generation (bench.model)
    milora    one decoder layer's seven projections, B sequences from B MiLoRA adapters: decode step and
              prefill (bench.milora)
    e2e       whole llamas with PEFT LoRA, the mixlora package and moelora: train step, generation, time to
              first token (bench.e2e)

The runner (bench.cli) and the memory probe (bench.memory) see every suite through the same few
attributes: presets, providers (in table order), checked (parity-checked against "reference"), modes,
ratios, and shape / make_inputs / missing / step / outputs / tolerance / cuda_graph / tokens_per_call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import moelora
from bench import e2e, milora, model, moe_lora, providers, route
from bench.fused import fused_missing
from bench.timing import MODES, ROUTER_GRAD_TOLERANCE, TOLERANCE, make_step, primary

Ratio = tuple[str, str, str]  # numerator, denominator, what a value above 1 means

# CUDA graphs replay only decode-sized calls: there, launch overhead is what a graph removes.
GRAPH_MAX_T = 64


@dataclass(frozen=True)
class Preset:
    cases: tuple[int, ...]  # the table's rows: T for the op suites, batch B for the model suite
    dims: dict[str, Any]  # every other dimension; the CLI flags override the ones named here
    warmup: int = 2
    repeats: int = 10


def provider_missing(name: str, device: torch.device) -> str | None:
    """Why provider `name` cannot run on `device` in this environment, or None."""
    if name == "fused":
        return fused_missing(device)
    if name == "mixlora-pkg":
        return providers.mixlora_pkg_missing()
    return None


def _as_y(out: Tensor) -> dict[str, Tensor]:
    return {"y": out}


@dataclass(frozen=True)
class OpSuite:
    """One op timed as fwd and fwd+bwd: `factories[provider](inputs)` gives the callable that is timed."""

    name: str
    title: str
    presets: dict[str, Preset]
    factories: dict[str, Callable[[Any], Callable[[], Any]]]
    checked: tuple[str, ...]
    ratios: tuple[Ratio, ...]
    shape_type: type
    make_inputs: Callable[..., Any]  # (shape, dtype, device, seed=0) -> inputs with a grad_out
    grad_targets: Callable[[str, Any], list[tuple[str, Tensor]]]
    compared: Callable[[Any], dict[str, Tensor]] = _as_y  # provider output -> what parity compares
    loose_keys: tuple[str, ...] = ()  # outputs allowed ROUTER_GRAD_TOLERANCE
    graph_safe: tuple[str, ...] = ()  # providers without host syncs, so CUDA-graph capturable
    notes: tuple[str, ...] = ()  # printed under the suite's table
    case: str = "T"
    modes: tuple[str, ...] = MODES
    grad_mode: str = "fwd+bwd"

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self.factories)

    def shape(self, case: int, dims: dict[str, Any]) -> Any:
        return self.shape_type(**{self.case: case}, **dims)

    def missing(self, name: str, device: torch.device) -> str | None:
        return provider_missing(name, device)

    def step(self, name: str, inp: Any, mode: str) -> Callable[[], object]:
        fn = self.factories[name](inp)
        return make_step(fn, [t for _, t in self.grad_targets(name, inp)], inp.grad_out, mode)

    def outputs(self, name: str, inp: Any, with_grads: bool) -> dict[str, Tensor]:
        """What parity compares for provider `name`: its outputs and, with_grads, every gradient."""
        fn = self.factories[name](inp)
        if not with_grads:
            with torch.no_grad():
                return self.compared(fn())
        named = self.grad_targets(name, inp)
        out = fn()
        grads = torch.autograd.grad(primary(out), [t for _, t in named], inp.grad_out)
        values = {k: v.detach() for k, v in self.compared(out).items()}
        return values | {f"d{n}": g for (n, _), g in zip(named, grads, strict=True)}

    def tolerance(self, key: str) -> float:
        return ROUTER_GRAD_TOLERANCE if key in self.loose_keys else TOLERANCE

    def cuda_graph(self, name: str, shape: Any, mode: str, device: torch.device) -> bool:
        return device.type == "cuda" and mode == "fwd" and name in self.graph_safe and shape.T <= GRAPH_MAX_T

    def tokens_per_call(self, shape: Any, mode: str) -> int | None:
        return None


class ModelSuite:
    """The tiny llama: train step and generation (bench.model); `fused` is checked against `reference`."""

    name = "model"
    title = "MixLoRA / MiLoRA tiny llama"
    providers = model.PROVIDERS
    checked = ("fused",)
    modes = model.MODES
    grad_mode = "train"
    case = "B"
    notes = (
        "base: the llama without adapters, never parity-checked; its train step is forward + backward to the "
        "input embeddings (nothing to train, no optimiser step)",
        "train: forward with labels (loss + router aux loss), backward, AdamW step over the adapter parameters",
        "generate: greedy, exactly N new tokens after a P-token prompt, KV cache on, prefill included",
        "milora, milora-mixed: MiLoRA (r, top-3 of the 7 projections), other math than reference (MixLoRA): timed, "
        "never parity-checked here (tests/ checks a mixed batch against separate runs); milora-mixed: B adapters, "
        "sequence b runs adapter b, generate only",
    )
    ratios: tuple[Ratio, ...] = (
        ("reference", "base", "what MixLoRA (reference backend) costs over the llama alone"),
        ("fused", "base", "what MixLoRA (fused backend) costs over the llama alone"),
        ("reference", "fused", "fused is that many times faster than the reference backend"),
        ("milora", "base", "what one MiLoRA adapter costs over the llama alone"),
        ("milora-mixed", "milora", "what B different MiLoRA adapters in one batch cost over one adapter for all"),
    )

    def __init__(self, presets: dict[str, Preset]) -> None:
        self.presets = presets

    def shape(self, case: int, dims: dict[str, Any]) -> model.ModelShape:
        return model.ModelShape(B=case, **dims)

    runs = staticmethod(model.runs)
    make_inputs = staticmethod(model.make_inputs)
    step = staticmethod(model.step)
    outputs = staticmethod(model.outputs)
    tokens_per_call = staticmethod(model.tokens_per_call)

    def missing(self, name: str, device: torch.device) -> str | None:
        return provider_missing(name, device)

    def tolerance(self, key: str) -> float:
        # The router gradient loses digits as in the FFN (see bench.timing); so does the loss's aux term.
        return ROUTER_GRAD_TOLERANCE if "router" in key else TOLERANCE

    def cuda_graph(self, name: str, shape: Any, mode: str, device: torch.device) -> bool:
        return False


def _op_dims(H: int, I: int, E: int = 8, k: int = 2, r: int = 16) -> dict[str, int]:
    return {"H": H, "I": I, "E": E, "k": k, "r": r}


def _route_dims(H: int, E: int = 8, k: int = 2) -> dict[str, Any]:
    return {"H": H, "E": E, "k": k, "top_p": None}


TINY = _op_dims(H=48, I=80, E=4, k=2, r=6)  # odd sizes on purpose; E=4, k=2 over 37 tokens uses every expert
LLAMA_T = (1, 32, 512, 2048)

FFN = OpSuite(
    name="ffn",
    title="MixLoRA FFN",
    presets={
        "tiny": Preset((1, 37), TINY, warmup=1, repeats=3),
        # Every provider and mode in about 35 s on one idle CPU core (2.5 min on two busy ones).
        "small": Preset((1, 128, 512), _op_dims(H=512, I=1408), warmup=3, repeats=15),
        # The shape of the issue that asked for this comparison.
        "issue2": Preset((2048,), _op_dims(H=1024, I=2816)),
        "llama2-7b": Preset(LLAMA_T, _op_dims(H=4096, I=11008)),
        "llama3-8b": Preset(LLAMA_T, _op_dims(H=4096, I=14336)),
    },
    factories=providers.PROVIDERS,
    checked=("loop", "mixlora-pkg", "fused"),
    ratios=(
        ("loop", "reference", "reference is that many times faster than the mixlora-style loop"),
        ("mixlora-pkg", "reference", "reference is that many times faster than the mixlora package"),
        ("loop", "fused", "fused is that many times faster than the mixlora-style loop"),
        ("mixlora-pkg", "fused", "fused is that many times faster than the mixlora package"),
        ("reference", "lora", "what the MoE of LoRAs costs over one dense LoRA per projection"),
        ("fused", "lora", "what the fused MoE of LoRAs costs over one dense LoRA per projection (1.00x: LoRA's price)"),
        ("reference", "base", "what the MoE of LoRAs costs over the frozen FFN alone"),
    ),
    shape_type=providers.Shape,
    make_inputs=providers.make_inputs,
    grad_targets=providers.grad_targets,
    loose_keys=("drouter",),
    graph_safe=("fused", "lora", "base"),
    notes=("lora and base compute different math (no router): timed, never parity-checked",),
)

ROUTE = OpSuite(
    name="route",
    title="Router: softmax + top-k / top-p",
    presets={
        "tiny": Preset((1, 37), _route_dims(H=48, E=4), warmup=1, repeats=3),
        "small": Preset((1, 128, 512, 2048), _route_dims(H=512), warmup=5, repeats=30),
        "issue2": Preset((2048,), _route_dims(H=1024), warmup=5, repeats=30),
        "llama2-7b": Preset(LLAMA_T, _route_dims(H=4096), warmup=5, repeats=30),
        "llama3-8b": Preset(LLAMA_T, _route_dims(H=4096), warmup=5, repeats=30),
    },
    factories=route.PROVIDERS,
    checked=("fused", "torch-naive"),
    ratios=(
        ("reference", "torch-naive", "what the reference costs over the plain torch code (about 1: the same ops)"),
        ("torch-naive", "fused", "fused is that many times faster than the plain torch code"),
        ("reference", "fused", "fused is that many times faster than the reference"),
    ),
    shape_type=route.RouteShape,
    make_inputs=route.make_inputs,
    grad_targets=route.grad_targets,
    compared=route.compared,
    notes=("parity compares the weights scattered to [T, E] (slot order free) and the softmax probabilities",),
)

MOE_LORA = OpSuite(
    name="moe_lora",
    title="Gathered per-expert LoRA (in H, out I)",
    presets={
        "tiny": Preset((1, 37), TINY, warmup=1, repeats=3),
        "small": Preset((1, 128, 512, 2048), _op_dims(H=512, I=1408), warmup=3, repeats=20),
        "issue2": Preset((2048,), _op_dims(H=1024, I=2816)),
        "llama2-7b": Preset(LLAMA_T, _op_dims(H=4096, I=11008)),
        "llama3-8b": Preset(LLAMA_T, _op_dims(H=4096, I=14336)),
    },
    factories=moe_lora.PROVIDERS,
    checked=("loop", "fused"),
    ratios=(
        ("loop", "reference", "reference is that many times faster than the mixlora-style loop"),
        ("loop", "fused", "fused is that many times faster than the mixlora-style loop"),
        ("reference", "fused", "fused is that many times faster than the reference"),
        ("reference", "lora", "what k gathered expert LoRAs cost over one dense LoRA of the same rank"),
        ("fused", "lora", "the same for fused"),
    ),
    shape_type=providers.Shape,
    make_inputs=moe_lora.make_inputs,
    grad_targets=moe_lora.grad_targets,
    notes=("lora: one dense LoRA on every token, different math: timed, never parity-checked",),
)

MODEL = ModelSuite(
    presets={
        "tiny": Preset(
            (1, 2),
            {"S": 16, "P": 8, "N": 4, "H": 64, "I": 96, "L": 2, "V": 128, "E": 4, "k": 2, "r": 4},
            warmup=0,
            repeats=2,
        ),
        # hidden 256, intermediate 688, 2 layers, vocab 1000: train batch 4 x 128, 32 new tokens.
        "small": Preset(
            (1, 4),
            {"S": 128, "P": 32, "N": 32, "H": 256, "I": 688, "L": 2, "V": 1000, "E": 8, "k": 2, "r": 16},
            warmup=1,
            repeats=10,
        ),
    }
)


class MiloraSuite:
    """One llama decoder layer with B sequences from B MiLoRA adapters (bench.milora): decode and prefill."""

    name = "milora"
    title = "MiLoRA decoder layer, B sequences from B adapters"
    providers = milora.PROVIDERS_ORDER
    checked = ("milora", "milora-loop", "mixlora-style", "router", "router-per-adapter")
    modes = milora.MODES
    grad_mode = None  # inference only: no gradient mode, parity compares outputs
    case = "B"
    graph_safe = ("base", "milora", "mixlora-style")  # no host sync when segmented_lora is the Triton kernel
    notes = (
        "the layer: q/k/v/o/gate/up/down, two RMSNorms, SiLU; attention replaced by its single-key case (o runs "
        "on v), so no KV cache; q and k are outputs of the step",
        "sequence b runs adapter b (r, top-k of the 7 modules, s = 2); decode gates cached as if from prefill",
        "base: the frozen layer alone, never parity-checked; '-': the provider has no such mode",
    )
    ratios: tuple[Ratio, ...] = (
        ("milora", "base", "what B MiLoRA adapters cost over the frozen layer (issue 4's goal: <= 1.10 at B=32)"),
        ("mixlora-style", "milora", "milora is that many times faster than per-token routing (goal: >= 1.5)"),
        ("milora-loop", "milora", "milora is that many times faster than the per-adapter loop"),
        ("router", "base", "the prefill router (one call, all prompts) costs more than the layer (goal: <= 0.03)"),
        ("router-per-adapter", "base", "the same with one router call per adapter, as B adapters need today"),
    )

    def __init__(self, presets: dict[str, Preset]) -> None:
        self.presets = presets

    def shape(self, case: int, dims: dict[str, Any]) -> milora.MiloraShape:
        return milora.MiloraShape(B=case, **dims)

    make_inputs = staticmethod(milora.make_inputs)
    step = staticmethod(milora.step)
    outputs = staticmethod(milora.outputs)
    parity_keys = staticmethod(milora.parity_keys)
    runs = staticmethod(milora.runs)
    device_notes = staticmethod(milora.op_notes)

    def missing(self, name: str, device: torch.device) -> str | None:
        return None

    def tolerance(self, key: str) -> float:
        return TOLERANCE

    def cuda_graph(self, name: str, shape: Any, mode: str, device: torch.device) -> bool:
        return device.type == "cuda" and mode == "decode" and name in self.graph_safe

    def tokens_per_call(self, shape: Any, mode: str) -> int | None:
        return None


def _milora_dims(H: int, I: int, r: int, S: int, KV: int | None = None, k: int = 3) -> dict[str, Any]:
    return {"H": H, "I": I, "KV": KV or H, "r": r, "k": k, "S": S, "lora_dtype": "fp32"}


MILORA_B = (1, 8, 32)
MILORA = MiloraSuite(
    presets={
        "tiny": Preset((1, 3), _milora_dims(H=48, I=80, r=4, S=5, KV=24), warmup=1, repeats=3),
        # r/H = 1/128 as Llama-2-7B with the paper's r=32, so the adapters weigh what they weigh there.
        # About 4 min on two busy cores, most of it the reference's prefill at B=32.
        "small": Preset(MILORA_B, _milora_dims(H=1024, I=2816, r=8, S=32), warmup=2, repeats=15),
        "llama2-7b": Preset(MILORA_B, _milora_dims(H=4096, I=11008, r=32, S=512), warmup=5, repeats=30),
        "llama3-8b": Preset(MILORA_B, _milora_dims(H=4096, I=14336, r=32, S=512, KV=1024), warmup=5, repeats=30),
    }
)


_BASE_VS_PEFT = "not expected; below 1, the llama alone takes that fraction of PEFT's time (LoRA adds the rest)"
_VS_PEFT = "slower than PEFT's LoRA by that factor (below 1: faster)"
# A mixed provider runs n sequences, peft-lora the row's B: like for like where B = n (the small preset's B = 8).
_MIXED_VS_PEFT = "n sequences from n adapters against PEFT's one LoRA on the row's B sequences: slower by that factor"
_MIXED_VS_PEFT_MIXED = "slower than PEFT's own mixed batch of the same n LoRAs by that factor (below 1: faster)"


def _e2e_ratios() -> tuple[Ratio, ...]:
    """Every provider against peft-lora; every moelora mixed batch also against peft-lora-mixed<n>."""
    to_peft = tuple(
        (p, "peft-lora", _BASE_VS_PEFT if p == "base" else _MIXED_VS_PEFT if e2e.mixed_size(p) else _VS_PEFT)
        for p in (*e2e.PROVIDERS, *e2e.MIXED)
        if p != "peft-lora"
    )
    to_mixed = tuple(
        (p, f"peft-lora-mixed{e2e.mixed_size(p)}", _MIXED_VS_PEFT_MIXED) for p in e2e.MIXED if p.startswith("moelora-")
    )
    return to_peft + to_mixed


class E2eSuite:
    """Whole llamas (bench.e2e): every provider against PEFT's LoRA; parity before timing, eval mode. The mixed
    batches (e2e.MIXED) are opt-in: not in default_providers, they run when --providers names them."""

    name = "e2e"
    title = "Whole llama end to end"
    providers = (*e2e.PROVIDERS, *e2e.MIXED)
    default_providers = e2e.PROVIDERS
    checked = tuple(p for p in providers if p != "base")
    modes = e2e.MODES
    grad_mode = None  # parity compares eval-mode logits (training runs dropout, which no two providers share)
    case = "B"
    notes = (
        "base: the llama alone; its train step is forward + backward to the input embeddings (nothing to "
        "train, no optimiser step)",
        "train: forward with labels, backward, AdamW step, zero_grad, LoRA dropout 0.05 on; moelora's loss adds "
        "the router aux loss, mixlora-pkg has none",
        "generate: greedy, exactly N new tokens after B prompts of P tokens, KV cache on, prefill included; ttft: "
        "the same with 1 new token",
        f"parity (eval, fp32, at most {e2e.PARITY_LAYERS} layers and {e2e.PARITY_TOKENS} tokens per sequence): "
        "base = every adapter with B = 0 against the llama alone; mixlora / milora = random adapters against "
        "moelora-mixlora-reference / moelora-milora-reference (mixlora-pkg loads the same tensors)",
        "*-mixed<n> (when named in --providers): n adapters loaded, sequence i runs adapter i in one generate, so "
        "they run n sequences whatever the row's B (their tokens per second count n x N), generate and ttft only; "
        "parity: base = the batch with B = 0 against the llama alone, alone = the batch against each sequence run "
        "alone with its adapter",
    )
    ratios: tuple[Ratio, ...] = _e2e_ratios()

    def __init__(self, presets: dict[str, Preset]) -> None:
        self.presets = presets

    def shape(self, case: int, dims: dict[str, Any]) -> e2e.E2eShape:
        return e2e.E2eShape(B=case, **dims)

    make_inputs = staticmethod(e2e.make_inputs)
    step = staticmethod(e2e.step)
    outputs = staticmethod(e2e.outputs)
    parity_keys = staticmethod(e2e.parity_keys)
    runs = staticmethod(e2e.runs)
    missing = staticmethod(e2e.missing)
    tokens_per_call = staticmethod(e2e.tokens_per_call)
    run_shape = staticmethod(e2e.run_shape)  # a mixed batch's B is its n: its throughput counts n sequences
    own_reference = staticmethod(e2e.alone)  # a mixed batch's oracle: its sequences run alone

    def device_notes(self, device: torch.device) -> list[str]:
        if device.type != "cpu" or fused_missing(device) is not None:
            return []
        with moelora.set_backend("cpu"):
            impl = moelora.backend.resolve(device)
        lacking = [op for op in e2e.MILORA_OPS if getattr(impl, op, None) is None]
        if not lacking:
            return []
        return [
            f"moelora-milora-cpu and the MiLoRA tenants of moelora-*-mixed<n>-cpu: the cpu backend has no "
            f"{' / '.join(lacking)} op, so those run the reference's (moelora warns)"
        ]

    def tolerance(self, key: str) -> float:
        return TOLERANCE

    def cuda_graph(self, name: str, shape: Any, mode: str, device: torch.device) -> bool:
        return False


def _e2e_dims(H: int, I: int, L: int, heads: int, V: int, kv_heads: int | None = None) -> dict[str, int]:
    return {"S": 256, "P": 64, "N": 32, "H": H, "I": I, "L": L, "heads": heads, "kv_heads": kv_heads or heads, "V": V}


E2E = E2eSuite(
    presets={
        # Every provider and mode in seconds: CI's.
        "tiny": Preset((2,), {**_e2e_dims(H=64, I=96, L=2, heads=1, V=128), "S": 16, "P": 8, "N": 4}, 0, 1),
        # Train batch 8 x 256 tokens; 8 prompts of 64 tokens + 32 new ones.
        "small": Preset((8,), _e2e_dims(H=512, I=1408, L=4, heads=8, V=32000), warmup=1, repeats=5),
        # The whole models (--layers to shorten them); meant for a GPU in bf16 (--dtype bf16).
        "llama2-7b": Preset((8,), _e2e_dims(H=4096, I=11008, L=32, heads=32, V=32000), warmup=1, repeats=5),
        "llama3-8b": Preset((8,), _e2e_dims(H=4096, I=14336, L=32, heads=32, kv_heads=8, V=128256), 1, 5),
    }
)

Suite = OpSuite | ModelSuite | MiloraSuite | E2eSuite
SUITES: dict[str, Suite] = {s.name: s for s in (FFN, ROUTE, MOE_LORA, MODEL, MILORA, E2E)}
