"""Injection: which modules of a Hugging Face model get which adapter, by swapping module instances.

plan_injection plans every swap for a config and checks it (family, target names, adapter name) without
touching the model; apply_injection then puts the planned wrappers and adapters in place, where nothing can
fail half-way. The original module stays reachable as the wrapper's `base_layer`; no class is patched.
FAMILIES lists the model families supported and their projection names. moelora.model's MoeLoraModel and
get_moelora_model call these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from moelora import formats
from moelora.config import LLAMA_PROJECTIONS, AdapterConfig, LoraConfig, MiLoraConfig, MixLoraConfig
from moelora.layers import (
    FFN_KINDS,
    LoraAdapter,
    LoraLinear,
    MixLoraAdapter,
    MixLoraFFN,
    ffn_kind,
)
from moelora.milora_router import MiLoraRouter, MiLoraRouters

ADAPTER_CONFIGS = (MixLoraConfig, MiLoraConfig, LoraConfig)

# model_type -> (attention projections, FFN layout). Every family the design names.
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "llama": (("q_proj", "k_proj", "v_proj", "o_proj"), "gated"),
    "mistral": (("q_proj", "k_proj", "v_proj", "o_proj"), "gated"),
    "qwen2": (("q_proj", "k_proj", "v_proj", "o_proj"), "gated"),
    "gemma": (("q_proj", "k_proj", "v_proj", "o_proj"), "gated"),
    "gemma2": (("q_proj", "k_proj", "v_proj", "o_proj"), "gated"),
    "phi3": (("qkv_proj", "o_proj"), "gated_fused"),
    "phi": (("q_proj", "k_proj", "v_proj", "dense"), "plain"),
}


def family_targets(model_type: str) -> list[str]:
    """The family's own names for the seven llama projections (all attention and FFN projections)."""
    attn, kind = FAMILIES[model_type]
    return list(attn) + list(FFN_KINDS[kind])


def resolve_target_modules(model_type: str, target_modules: list[str]) -> list[str]:
    """The default (the seven llama names) means every projection of the family; other lists are literal."""
    if sorted(target_modules) == sorted(LLAMA_PROJECTIONS):
        return family_targets(model_type)
    return list(target_modules)


@dataclass
class _Swap:
    parent: nn.Module
    attr: str
    path: str  # module path of the projection / MLP inside the HF model
    wrapper: LoraLinear | MixLoraFFN | MiLoraRouters  # existing wrapper, or a new one to put in place
    adapter: LoraAdapter | MixLoraAdapter | MiLoraRouter
    is_new: bool


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected decoder layers at .model.layers")
    return "model.layers", layers


def _model_type(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model family {model_type!r} ({type(model).__name__}); supported: {sorted(FAMILIES)}"
        )
    return model_type


def plan_injection(model: nn.Module, config: AdapterConfig, adapter_name: str) -> tuple[list[_Swap], list[str]]:
    """Every module swap and new adapter module for `config`, checked; the model is not modified.

    Returns the swaps and the resolved target module names.
    """
    if not isinstance(config, ADAPTER_CONFIGS):
        raise TypeError(f"config must be a MixLoraConfig, MiLoraConfig or LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    model_type = _model_type(model)
    attn_names, kind = FAMILIES[model_type]
    targets = resolve_target_modules(model_type, config.target_modules)
    known = set(attn_names) | set(FFN_KINDS[kind])
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"target_modules {unknown} do not exist in this {model_type} model; it has {sorted(known)}")
    if isinstance(config, MiLoraConfig) and config.top_k > len(targets):
        raise ValueError(
            f"top_k={config.top_k} but this {model_type} model has only {len(targets)} target modules {targets}; "
            f"top_k must be in [1, {len(targets)}]"
        )
    prefix, layers = decoder_layers(model)
    swaps: list[_Swap] = []
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        base_mlp = mlp.base_layer if isinstance(mlp, MixLoraFFN) else mlp
        if ffn_kind(base_mlp) != kind:
            raise ValueError(
                f"layer {i}: {type(base_mlp).__name__} does not have the {kind} FFN layout {FFN_KINDS[kind]}"
            )
        # MixLoRA: LoRA on attention only (its FFN projections are experts); MiLoRA and LoRA: every target.
        lora_targets = [t for t in targets if t in attn_names or not isinstance(config, MixLoraConfig)]
        router = None
        if isinstance(config, MiLoraConfig):
            routers = getattr(layer, "milora_routers", None)
            new_routers = routers is None
            routers = routers if routers is not None else MiLoraRouters()
            if adapter_name in routers.adapters:
                raise ValueError(f"adapter_name {adapter_name!r} is already in use on this model")
            hidden = int(model.config.hidden_size)
            router = MiLoraRouter(
                hidden,
                lora_targets,
                top_k=config.top_k,
                pooling=config.pooling,
                activation=config.activation,
                router_init_range=config.router_init_range,
                device=_device_of(layer),
            )
            swaps.append(_Swap(layer, "milora_routers", f"{prefix}.{i}.milora_router", routers, router, new_routers))
        for column, name in enumerate(lora_targets):
            parent = layer.self_attn if name in attn_names else base_mlp
            where = "self_attn" if name in attn_names else "mlp"
            module = getattr(parent, name)
            wrapper = module if isinstance(module, LoraLinear) else LoraLinear(module)
            if adapter_name in wrapper.adapters:
                raise ValueError(f"adapter_name {adapter_name!r} is already in use on this model")
            use_dora = getattr(config, "use_dora", False)
            adapter = LoraAdapter(
                wrapper.base_layer, config.r, config.scaling, config.lora_dropout, use_dora, config.lora_init
            )
            if router is not None:
                adapter.milora = (router, column)
            swaps.append(_Swap(parent, name, f"{prefix}.{i}.{where}.{name}", wrapper, adapter, wrapper is not module))
        if not isinstance(config, MixLoraConfig):
            continue
        ffn_targets = [t for t in targets if t in FFN_KINDS[kind]]
        if not ffn_targets:
            continue
        wrapper = mlp if isinstance(mlp, MixLoraFFN) else None
        if wrapper is not None and adapter_name in wrapper.adapters:
            raise ValueError(f"adapter_name {adapter_name!r} is already in use on this model")
        new_wrapper = wrapper is None
        if new_wrapper:
            wrapper = MixLoraFFN(mlp, ACT2FN[config.act_fn] if config.act_fn else None)
        adapter = MixLoraAdapter(
            base_mlp,
            ffn_targets,
            num_experts=config.num_experts,
            top_k=config.top_k if config.routing_strategy == "mixlora" else None,
            top_p=float(config.top_p) if config.routing_strategy == "mixlora-dynamic" else None,
            r=config.expert_r,
            scaling=config.expert_scaling,
            dropout=config.expert_dropout,
            jitter_noise=config.jitter_noise,
            router_init_range=config.router_init_range,
            use_dora=config.use_dora,
            init=config.lora_init,
        )
        swaps.append(_Swap(layer, "mlp", f"{prefix}.{i}.mlp", wrapper, adapter, new_wrapper))
    return swaps, targets


def _device_of(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return None if p is None else p.device


def apply_injection(swaps: list[_Swap], adapter_name: str, trainable: bool) -> None:
    """Put the planned wrappers and adapters in place (nothing here can fail half-way)."""
    for s in swaps:
        s.adapter.requires_grad_(trainable)
        # New modules take the mode of the module they join: an adapter loaded into an eval model has no dropout.
        s.adapter.train(s.parent.training)
        s.wrapper.adapters[adapter_name] = s.adapter
        if s.is_new:
            s.wrapper.train(s.parent.training)
            setattr(s.parent, s.attr, s.wrapper)


def adapter_parameters(swaps: list[_Swap]) -> dict[str, Tensor]:
    """The adapter's tensors under our file keys (see moelora.formats)."""
    return {key: value for s in swaps for key, value in formats.adapter_tensors(s.path, s.adapter).items()}
