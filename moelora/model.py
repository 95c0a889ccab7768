"""MixLoRA on Hugging Face models: injection by swapping module instances, the wrapper model, adapters.

get_moelora_model(model, config) plans every swap first and checks it (family, target names, adapter
name), then swaps: a bad config raises before the model is touched. The HF model is modified in place
and stays reachable as `MoeLoraModel.model`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from moelora import formats
from moelora.config import LLAMA_PROJECTIONS, MixLoraConfig
from moelora.layers import FFN_KINDS, LoraAdapter, LoraLinear, MixLoraAdapter, MixLoraFFN, ffn_kind
from moelora.reference import load_balance_loss

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
    if list(target_modules) == LLAMA_PROJECTIONS:
        return family_targets(model_type)
    return list(target_modules)


@dataclass
class _Swap:
    parent: nn.Module
    attr: str
    path: str  # module path of the projection / MLP inside the HF model
    wrapper: LoraLinear | MixLoraFFN  # existing wrapper, or a new one to put in place
    adapter: LoraAdapter | MixLoraAdapter
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


def plan_injection(model: nn.Module, config: MixLoraConfig, adapter_name: str) -> tuple[list[_Swap], list[str]]:
    """Every module swap and new adapter module for `config`, checked; the model is not modified.

    Returns the swaps and the resolved target module names.
    """
    model_type = _model_type(model)
    attn_names, kind = FAMILIES[model_type]
    targets = resolve_target_modules(model_type, config.target_modules)
    known = set(attn_names) | set(FFN_KINDS[kind])
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"target_modules {unknown} do not exist in this {model_type} model; it has {sorted(known)}")
    prefix, layers = decoder_layers(model)
    ffn_targets = [t for t in targets if t in FFN_KINDS[kind]]
    act = ACT2FN[config.act_fn] if config.act_fn else None
    swaps: list[_Swap] = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in (t for t in targets if t in attn_names):
            module = getattr(attn, name)
            wrapper = module if isinstance(module, LoraLinear) else LoraLinear(module)
            if adapter_name in wrapper.adapters:
                raise ValueError(f"adapter_name {adapter_name!r} is already in use on this model")
            adapter = LoraAdapter(
                wrapper.base_layer, config.r, config.scaling, config.lora_dropout, config.use_dora, config.lora_init
            )
            swaps.append(_Swap(attn, name, f"{prefix}.{i}.self_attn.{name}", wrapper, adapter, wrapper is not module))
        if not ffn_targets:
            continue
        wrapper = mlp if isinstance(mlp, MixLoraFFN) else None
        base_mlp = wrapper.base_layer if wrapper is not None else mlp
        if ffn_kind(base_mlp) != kind:
            raise ValueError(
                f"layer {i}: {type(base_mlp).__name__} does not have the {kind} FFN layout {FFN_KINDS[kind]}"
            )
        if wrapper is not None and adapter_name in wrapper.adapters:
            raise ValueError(f"adapter_name {adapter_name!r} is already in use on this model")
        new_wrapper = wrapper is None
        if new_wrapper:
            wrapper = MixLoraFFN(mlp, act)
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


def apply_injection(swaps: list[_Swap], adapter_name: str, trainable: bool) -> None:
    """Put the planned wrappers and adapters in place (nothing here can fail half-way)."""
    for s in swaps:
        s.adapter.requires_grad_(trainable)
        s.wrapper.adapters[adapter_name] = s.adapter
        if s.is_new:
            setattr(s.parent, s.attr, s.wrapper)


def adapter_parameters(swaps: list[_Swap]) -> dict[str, Tensor]:
    """The adapter's tensors under our file keys (see moelora.formats)."""
    return {key: value for s in swaps for key, value in formats.adapter_tensors(s.path, s.adapter).items()}


class MoeLoraModel(nn.Module):
    """A Hugging Face causal LM with MixLoRA adapters; forwards like the model it wraps.

    With `labels`, `outputs.loss` includes router_aux_loss_coef * aux and `outputs.aux_loss` holds aux
    (the load-balance loss over every MixLoRA layer, padding masked out by `attention_mask`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, MixLoraConfig] = {}
        self.active_adapter: str | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def _wrappers(self) -> Iterator[LoraLinear | MixLoraFFN]:
        for module in self.model.modules():
            if isinstance(module, LoraLinear | MixLoraFFN):
                yield module

    def _swaps(self, adapter_name: str) -> list[_Swap]:
        swaps = []
        for path, module in self.model.named_modules():
            if isinstance(module, LoraLinear | MixLoraFFN) and adapter_name in module.adapters:
                swaps.append(_Swap(module, "", path, module, module.adapters[adapter_name], False))
        return swaps

    def add_adapter(self, config: MixLoraConfig, adapter_name: str, trainable: bool = True) -> None:
        """Inject a new, freshly initialised adapter (B = 0, so outputs are unchanged)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} is already in use on this model")
        swaps, targets = plan_injection(self.model, config, adapter_name)
        apply_injection(swaps, adapter_name, trainable)
        self.peft_config[adapter_name] = _resolved(config, targets)
        if self.active_adapter is None:
            self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter every wrapped module runs."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        for w in self._wrappers():
            w.active_adapter = adapter_name

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model inside this block."""
        for w in self._wrappers():
            w.active_adapter = None
        try:
            yield
        finally:
            if self.active_adapter is not None:
                self.set_adapter(self.active_adapter)

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The adapter's tensors (attention LoRAs, routers, experts, DoRA magnitudes) under our file keys."""
        name = adapter_name or self.active_adapter
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self.peft_config)}")
        return adapter_parameters(self._swaps(name))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        ffns = [w for w in self._wrappers() if isinstance(w, MixLoraFFN)]
        log: list[tuple[Tensor, Tensor]] = []
        for f in ffns:
            f.router_log = log
        try:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            for f in ffns:
                f.router_log = None
        if log and isinstance(outputs, dict) and (labels is not None or self.training):  # dict: a ModelOutput
            config = self.peft_config[self.active_adapter]
            aux = self._aux_loss(log, attention_mask, config.num_experts)
            outputs["aux_loss"] = aux
            if outputs.get("loss") is not None:
                outputs["loss"] = outputs["loss"] + config.router_aux_loss_coef * aux.to(outputs["loss"].dtype)
        return outputs

    @staticmethod
    def _aux_loss(log: list[tuple[Tensor, Tensor]], attention_mask: Tensor | None, num_experts: int) -> Tensor:
        probs = torch.cat([p for p, _ in log])
        indices = torch.cat([i for _, i in log])
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            tokens = log[0][0].shape[0]
            seq = tokens // attention_mask.shape[0]
            mask = attention_mask[:, -seq:].reshape(-1).bool().to(probs.device).repeat(len(log))
        return load_balance_loss(probs, indices, num_experts, mask)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def save_pretrained(
        self, save_directory: str, format: str = "moelora", adapter_name: str | None = None, **_: Any
    ) -> None:
        """Write the adapter (adapter and router weights only).

        format="moelora": adapter_config.json + adapter_model.safetensors (our keys, DoRA magnitudes kept).
        format="moe-peft": adapter_config.json + adapter_model.bin in MoE-PEFT / mixlora's layout.
        """
        name = adapter_name or self.active_adapter
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self.peft_config)}")
        formats.save(save_directory, self.peft_config[name], self.adapter_state_dict(name), format)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, directory: str, adapter_name: str = "default", is_trainable: bool = False
    ) -> MoeLoraModel:
        """Load an adapter saved by us or by MoE-PEFT / mixlora onto `base_model` (eval mode unless trainable)."""
        wrapped = cls(base_model)
        wrapped.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        for name, p in base_model.named_parameters():
            if ".adapters." not in f".{name}":
                p.requires_grad_(False)
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def load_adapter(self, directory: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter in `directory` as `adapter_name`; everything is checked before the model changes."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} is already in use on this model")
        config, tensors, fmt = formats.load(directory)
        swaps, targets = plan_injection(self.model, config, adapter_name)
        if fmt == "moe-peft":
            tensors = formats.from_moe_peft(tensors, config)
        params = adapter_parameters(swaps)
        if fmt == "moe-peft":  # it stores no DoRA magnitudes: they are recomputed below
            params = {k: v for k, v in params.items() if not k.endswith("lora_magnitude_vector")}
        formats.copy_into(params, tensors, directory)
        if fmt == "moe-peft" and config.use_dora:
            formats.recompute_dora_magnitudes(swaps)
        apply_injection(swaps, adapter_name, is_trainable)
        self.peft_config[adapter_name] = _resolved(config, targets)
        if self.active_adapter is None:
            self.set_adapter(adapter_name)


def _resolved(config: MixLoraConfig, targets: list[str]) -> MixLoraConfig:
    return dataclasses.replace(config, target_modules=list(targets))


def get_moelora_model(model: nn.Module, config: MixLoraConfig, adapter_name: str = "default") -> MoeLoraModel:
    """Add MixLoRA to `model` in place (the base frozen, every B zero) and wrap it.

    The outputs equal the base model's until training moves B. Raises ValueError, before any change,
    for an unsupported family, a target module the model lacks, or an adapter name already in use.
    """
    if not isinstance(config, MixLoraConfig):
        raise TypeError(f"config must be a MixLoraConfig, got {type(config).__name__}")
    if isinstance(model, MoeLoraModel):
        model.add_adapter(config, adapter_name)
        return model
    swaps, targets = plan_injection(model, config, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    apply_injection(swaps, adapter_name, trainable=True)
    wrapped = MoeLoraModel(model)
    wrapped.peft_config[adapter_name] = _resolved(config, targets)
    wrapped.set_adapter(adapter_name)
    return wrapped
