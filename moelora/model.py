"""MixLoRA, MiLoRA and LoRA on Hugging Face models: injection by swapping module instances, the wrapper.

get_moelora_model(model, config) plans every swap first and checks it (family, target names, adapter
name), then swaps: a bad config raises before the model is touched. The HF model is modified in place
and stays reachable as `MoeLoraModel.model`.

The planning and swapping are moelora.injection's; the hooks that tell each call's mode and bind a mixed
batch's plan (MiLoRA prefill / extend / decode) are moelora.routing_hooks'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from moelora import backend, formats
from moelora.config import AdapterConfig, MiLoraConfig, MixLoraConfig
from moelora.injection import (
    ADAPTER_CONFIGS,
    _Swap,
    adapter_parameters,
    apply_injection,
    decoder_layers,
    plan_injection,
)
from moelora.layers import (
    BatchPlan,
    LoraAdapter,
    LoraLinear,
    MixLoraFFN,
    keep_quantized_trainable,
)
from moelora.milora_router import MiLoraRouter, MiLoraRouters
from moelora.reference import load_balance_loss, prompt_balance_loss
from moelora.routing_hooks import RoutingState, _cache_arg, _cache_len, install_routing_hooks, routing_state


@functools.cache
def _with_aux_loss(output_type: type) -> type:
    """`output_type` (an HF ModelOutput dataclass) with an `aux_loss` field: torch's pytree (DDP with
    find_unused_parameters, FSDP) rebuilds a ModelOutput from its fields and would drop or reject the key."""
    if "aux_loss" in {f.name for f in dataclasses.fields(output_type)}:
        return output_type
    return dataclasses.make_dataclass(
        f"{output_type.__name__}WithAux", [("aux_loss", Tensor | None, None)], bases=(output_type,)
    )


class MoeLoraModel(nn.Module):
    """A Hugging Face causal LM with MixLoRA / MiLoRA / LoRA adapters; forwards like the model it wraps.

    With `labels` (or in training), `outputs.loss` includes router_aux_loss_coef * aux and
    `outputs.aux_loss` holds aux: for MixLoRA the load-balance loss over every MixLoRA layer (padding
    masked out by `attention_mask`), for MiLoRA the per-prompt load-balance loss averaged over layers.
    `adapter_names=[...]` (one per sequence, inference only) runs a mixed batch of adapters in one forward.
    """

    # transformers' Trainer refuses a quantised model (is_quantized, read through to the HF model) unless this
    # flag of its own PEFT integration says that trainable adapters are attached.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        routing_state(model)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    @property
    def routing(self) -> RoutingState:
        return routing_state(self.model)

    def _wrappers(self) -> Iterator[LoraLinear | MixLoraFFN]:
        for module in self.model.modules():
            if isinstance(module, LoraLinear | MixLoraFFN):
                yield module

    def milora_routers(self) -> Iterator[MiLoraRouter]:
        for module in self.model.modules():
            if isinstance(module, MiLoraRouter):
                yield module

    def _swaps(self, adapter_name: str) -> list[_Swap]:
        swaps = []
        for path, module in self.model.named_modules():
            if isinstance(module, LoraLinear | MixLoraFFN | MiLoraRouters) and adapter_name in module.adapters:
                path = path.replace(".base_layer.", ".")  # a LoRA inside a MixLoraFFN keeps its HF path
                if isinstance(module, MiLoraRouters):
                    path = path.removesuffix("s")  # model.layers.{i}.milora_router
                swaps.append(_Swap(module, "", path, module, module.adapters[adapter_name], False))
        return swaps

    def _inject(
        self, config: AdapterConfig, adapter_name: str, swaps: list[_Swap], targets: list[str], trainable: bool
    ) -> None:
        keep_quantized_trainable(self.model)  # bitsandbytes 4-bit on CPU: see there
        apply_injection(swaps, adapter_name, trainable)
        self.peft_config[adapter_name] = _resolved(config, targets)
        if isinstance(config, MiLoraConfig):
            self.routing.milora.add(adapter_name)
        install_routing_hooks(self.model)  # every kind: a mixed batch binds its plan in the model hook
        if self.active_adapter is None:
            self.set_adapter(adapter_name)

    def add_adapter(self, config: AdapterConfig, adapter_name: str, trainable: bool = True) -> None:
        """Inject a new, freshly initialised adapter (B = 0, so outputs are unchanged)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} is already in use on this model")
        swaps, targets = plan_injection(self.model, config, adapter_name)
        self._inject(config, adapter_name, swaps, targets, trainable)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter every wrapped module runs (when no adapter_names are given)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        self.routing.active = adapter_name
        for w in self._wrappers():
            w.active_adapter = adapter_name

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model inside this block."""
        for w in self._wrappers():
            w.active_adapter = None
        self.routing.active = None
        try:
            yield
        finally:
            if self.active_adapter is not None:
                self.set_adapter(self.active_adapter)

    # --- PEFT's adapter management: active_adapters, delete_adapter, unload, merge_and_unload ----------------

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's name: the active adapter as a list; [] when none is (after deleting the last adapter)."""
        return [] if self.active_adapter is None else [self.active_adapter]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name`: its config, LoRAs, experts, MixLoRA routers and the MiLoRA router in each
        layer's `milora_routers`.

        As PEFT: deleting the active adapter activates the first remaining one by sorted name (with a warning);
        deleting the last leaves none active, so the base model runs. Wrappers left with no adapter stay in
        place and pass the base output through; unload() removes them.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"delete_adapter: adapter_name must be one of the loaded adapters {sorted(self.peft_config)}, "
                f"got {adapter_name!r}"
            )
        holders = [
            m
            for m in self.model.modules()
            if isinstance(m, LoraLinear | MixLoraFFN | MiLoraRouters) and adapter_name in m.adapters
        ]
        for module in holders:
            del module.adapters[adapter_name]
            if isinstance(module, LoraLinear):
                module._stacks = None  # the mixed-batch stack still holds the deleted tensors
        del self.peft_config[adapter_name]
        self.routing.milora.discard(adapter_name)
        self.clear_routing_cache()  # kept MiLoRA pools may belong to the deleted adapter
        if adapter_name != self.active_adapter:
            return
        remaining = sorted(self.peft_config)
        if remaining:
            warnings.warn(
                f"delete_adapter: {adapter_name!r} was the active adapter; {remaining[0]!r} is active now",
                stacklevel=2,
            )
            self.set_adapter(remaining[0])
            return
        self.active_adapter = None
        self.routing.active = None
        for w in self._wrappers():
            w.active_adapter = None

    def unload(self) -> nn.Module:
        """PEFT's unload(): every adapter removed and the base model's own modules put back, unmerged.

        Returns the Hugging Face model (the same object, modified in place; its parameters stay frozen). This
        wrapper holds no adapter afterwards.
        """
        return self._unload(keep=None)

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """PEFT's merge_and_unload(): merge `adapter_names` (default: the active adapter) into the base weights,
        drop every other adapter and return the Hugging Face model (modified in place).

        - LoRA: W += s B A (DoRA: W = m / ||W + s B A|| * (W + s B A), the bias scaled alike); the returned model
          is the plain base architecture.
        - MixLoRA: only its attention LoRAs merge. Its MoE FFN (router and LoRA experts) is input-dependent and
          cannot become a weight: it stays as a MixLoraFFN module in the returned model, which therefore still
          needs moelora to run; a UserWarning says so. At most one MixLoRA adapter can be given.
        - MiLoRA: raises ValueError. Its router gates each module's LoRA per prompt (a weight of 0 for modules
          not picked), so no single weight update equals it.
        Quantised base layers (bitsandbytes) cannot be merged: ValueError; use unload(). safe_merge: check
        every merged weight for NaN/inf before changing any, at the cost of a copy of the merged weights.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if isinstance(adapter_names, str) or unknown:
            raise ValueError(
                f"merge_and_unload: adapter_names must list loaded adapters {sorted(self.peft_config)}, "
                f"got {adapter_names!r}"
            )
        milora = [n for n in names if isinstance(self.peft_config[n], MiLoraConfig)]
        if milora:
            raise ValueError(
                f"merge_and_unload: MiLoRA adapters {milora} cannot be merged: their router weighs each module's "
                "LoRA per prompt (0 for the modules it does not pick), so no fixed weight update equals them; "
                "keep the model wrapped, or call unload() for the bare base"
            )
        mix = [n for n in names if isinstance(self.peft_config[n], MixLoraConfig)]
        if len(mix) > 1:
            raise ValueError(
                f"merge_and_unload: one MixLoRA adapter at most (its MoE FFN stays in the model), got {mix}"
            )
        merges = []  # (path, LoraLinear, its adapters to merge in the order given)
        for path, w in self.model.named_modules():
            if not isinstance(w, LoraLinear):
                continue
            adapters = [w.adapters[n] for n in names if n in w.adapters]
            if not adapters:
                continue
            base = w.base_layer
            weight = getattr(base, "weight", None)
            if not isinstance(base, nn.Linear) or type(weight) is not nn.Parameter or not weight.is_floating_point():
                raise ValueError(
                    f"merge_and_unload: {path} has a {type(base).__name__} base layer with "
                    f"{type(weight).__name__} weights; only a plain floating-point nn.Linear (not quantised) can "
                    "take a merge; use unload() instead"
                )
            merges.append((path, w, adapters))
        if mix:
            warnings.warn(
                f"merge_and_unload: MixLoRA adapter {mix[0]!r}: its attention LoRAs are merged into the base "
                "weights; its MoE FFN (router and LoRA experts) cannot merge and stays as a MixLoraFFN module, so "
                "the returned model still needs moelora to run",
                UserWarning,
                stacklevel=2,
            )
        if safe_merge:  # every merged weight first, checked, so that a bad one leaves the model unchanged
            merged = [(p, w, *_merged_linear(w.base_layer, adapters)) for p, w, adapters in merges]
            for path, _, weight, bias in merged:
                if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
                    raise ValueError(f"merge_and_unload(safe_merge=True): merging into {path} gives NaN or inf weights")
        else:  # one module at a time: no copy of every merged weight at once
            merged = ((p, w, *_merged_linear(w.base_layer, adapters)) for p, w, adapters in merges)
        with torch.no_grad():
            for _, w, weight, bias in merged:
                w.base_layer.weight.copy_(weight)
                if bias is not None:
                    w.base_layer.bias.copy_(bias)
        return self._unload(keep=mix[0] if mix else None)

    def _unload(self, keep: str | None) -> nn.Module:
        """Put every wrapped module's base back and drop every adapter, MiLoRA routers and routing hooks; the
        MixLoraFFN modules holding adapter `keep` stay, with that adapter only."""
        replace = []
        for path, module in self.model.named_modules():
            if isinstance(module, LoraLinear) or (isinstance(module, MixLoraFFN) and keep not in module.adapters):
                parent_path, _, attr = path.rpartition(".")
                replace.append((self.model.get_submodule(parent_path), attr, module.base_layer))
            elif isinstance(module, MixLoraFFN):
                for name in [n for n in module.adapters if n != keep]:
                    del module.adapters[name]
                module.active_adapter = keep
        for parent, attr, base in replace:
            setattr(parent, attr, base)
        _, layers = decoder_layers(self.model)
        for layer in layers:
            if hasattr(layer, "milora_routers"):
                del layer.milora_routers
            layer.__dict__.pop("_moelora_hooked", None)
            layer.__dict__.pop("_moelora_state", None)
        for hook in self.routing.hooks:
            hook.remove()
        self.model.__dict__.pop("_moelora_routing", None)
        self.peft_config.clear()
        self.active_adapter = None
        return self.model

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The adapter's tensors (LoRAs, routers, experts, DoRA magnitudes, rational activations) under our keys."""
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

    def clear_routing_cache(self) -> None:
        """Forget every MiLoRA routing and prompt pool kept from the last prefill (generate() does this when it
        ends, unless it returns the KV cache); a later call on an older cache then raises."""
        self.routing.cache = None
        for router in self.milora_routers():
            router.clear()

    def _batch_plan(self, adapter_names: Any, rows: int | None) -> BatchPlan | None:
        if adapter_names is None:
            return None
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(
                f"adapter_names must be a list of adapter names (str), one per sequence, got {adapter_names!r}"
            )
        names = list(adapter_names)
        if rows is not None and len(names) != rows:
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {rows} sequences")
        unknown = sorted({n for n in names if n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapters {unknown}; loaded: {sorted(self.peft_config)}")
        if self.training:
            raise ValueError("adapter_names (a mixed-adapter batch) is for inference only; call model.eval() first")
        return BatchPlan(names)

    @contextlib.contextmanager
    def _plan(self, plan: BatchPlan | None) -> Iterator[None]:
        wrappers = list(self._wrappers()) if plan is not None else []
        for w in wrappers:
            w.batch_plan = plan
        self.routing.plan = plan
        try:
            yield
        finally:
            for w in wrappers:
                w.batch_plan = None
            self.routing.plan = None

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        adapter_names: list[str] | None = None,
        prompt_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The wrapped model's forward. adapter_names: one adapter per sequence (mixed batch, inference only);
        prompt_mask [B, S]: the tokens MiLoRA routers pool (default: every non-padding token)."""
        backend.reset_ops_ran()  # moelora.backend.ops_ran() then describes this forward
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        plan = self._batch_plan(adapter_names, None if x is None else x.shape[0])
        config = self.peft_config.get(self.active_adapter) if plan is None else None
        want_aux = labels is not None or self.training
        ffns = [w for w in self._wrappers() if isinstance(w, MixLoraFFN)] if isinstance(config, MixLoraConfig) else []
        log: list[tuple[Tensor, Tensor]] = []
        for f in ffns:
            f.router_log = log
        state = self.routing
        state.prompt_mask = prompt_mask
        milora_log: list[Tensor] = []
        state.log = milora_log if isinstance(config, MiLoraConfig) and want_aux else None
        try:
            with self._plan(plan):
                outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            for f in ffns:
                f.router_log = None
            state.prompt_mask = None
            state.log = None
        aux = None
        if log and want_aux:
            aux = self._aux_loss(log, attention_mask, config.num_experts)
        elif milora_log and want_aux:
            aux = prompt_balance_loss(torch.stack(milora_log))
        if aux is not None and isinstance(outputs, dict):  # dict: a ModelOutput
            if torch.compiler.is_compiling():  # dynamo cannot build the dataclass; a compiled model is not DDP's
                outputs["aux_loss"] = aux
            else:
                outputs = _with_aux_loss(type(outputs))(**outputs, aux_loss=aux)
            if outputs.get("loss") is not None:
                coef = config.router_aux_loss_coef
                num_items = kwargs.get("num_items_in_batch")
                if num_items is not None and labels is not None:
                    # transformers.Trainer divided the summed CE by the label tokens of every rank and
                    # micro-batch (num_items_in_batch) and then sums the per-rank, per-micro-batch losses:
                    # weight this batch's aux by its share of those tokens, so the aux term stays a mean.
                    coef = coef * (labels[..., 1:] != -100).sum() / num_items
                outputs["loss"] = outputs["loss"] + coef * aux.to(outputs["loss"].dtype)
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

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's generate(). MiLoRA routes at the prefill; every decoding step (and every beam of
        a prompt) reuses that routing. Each chunk of a chunked prefill (prefill_chunk_size), and the new tokens
        on a KV cache from an earlier call (cache= / past_key_values=), are pooled into the routing state kept
        with that cache and routed again on the whole text (see moelora.layers). The routing is freed
        at the end unless the output returns the cache (return_dict_in_generate=True) for a later call to
        continue; a beam search, which reorders the cache's rows, always frees it.
        adapter_names: one adapter per input sequence (a mixed batch)."""
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        plan = self._batch_plan(adapter_names, None if x is None else x.shape[0])
        state = self.routing
        state.generating, state.routed = True, False
        # The prompt tokens not cached yet: the attention mask spans the whole text, input_ids all or only new ones.
        past_len = _cache_len(_cache_arg(kwargs))
        mask = kwargs.get("attention_mask")
        total = mask.shape[1] if mask is not None and mask.dim() == 2 else 0 if x is None else x.shape[1]
        state.prefill_left = total - past_len if total > past_len else 0 if x is None else x.shape[1]
        out = None
        try:
            with self._plan(plan):
                out = self.model.generate(*args, **kwargs)
            return out
        finally:
            state.generating = state.routed = False
            state.prefill_left = 0
            state.pool_mask = None
            returned = out.get("cache", out.get("past_key_values")) if isinstance(out, dict) else None
            if returned is None or self._num_beams(kwargs) > 1:
                self.clear_routing_cache()

    def _num_beams(self, kwargs: dict) -> int:
        if kwargs.get("num_beams") is not None:
            return int(kwargs["num_beams"])
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        return int(getattr(config, "num_beams", 1) or 1)

    def save_pretrained(
        self, save_directory: str, format: str = "moelora", adapter_name: str | None = None, **_: Any
    ) -> None:
        """Write the adapter (adapter and router weights only).

        format="moelora": adapter_config.json + adapter_model.safetensors (our keys; a LoRA adapter in PEFT's).
        format="moe-peft": adapter_config.json + adapter_model.bin in MoE-PEFT / mixlora's layout (MixLoRA only).
        """
        name = adapter_name or self.active_adapter
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self.peft_config)}")
        formats.save(
            save_directory,
            self.peft_config[name],
            self.adapter_state_dict(name),
            format,
            base_config=getattr(self.model, "config", None),
        )

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, directory: str, adapter_name: str = "default", is_trainable: bool = False
    ) -> MoeLoraModel:
        """Load an adapter (ours, MoE-PEFT / mixlora's, or PEFT's LoRA) onto `base_model` (eval unless trainable)."""
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
        self._inject(config, adapter_name, swaps, targets, is_trainable)


def _merged_linear(base: nn.Linear, adapters: list[LoraAdapter]) -> tuple[Tensor, Tensor | None]:
    """The base's weight and bias with each LoRA (DoRA) adapter merged in turn, as LoraLinear computes them:
    W + s B A, or m / ||W + s B A|| * (W + s B A) with the bias scaled alike (DoRA scales base(x) + delta)."""
    weight = base.weight.detach().float()
    bias = base.bias.detach().float() if base.bias is not None else None
    for a in adapters:
        weight = weight + a.scaling * (a.lora_B.detach().float() @ a.lora_A.detach().float())
        if a.lora_magnitude is not None:
            scale = a.lora_magnitude.detach().float() / torch.linalg.norm(weight, dim=1)
            weight = weight * scale[:, None]
            bias = bias * scale if bias is not None else None
    return weight.to(base.weight.dtype), None if bias is None else bias.to(base.bias.dtype)


def _resolved(config: AdapterConfig, targets: list[str]) -> AdapterConfig:
    return dataclasses.replace(config, target_modules=list(targets))


def get_moelora_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> MoeLoraModel:
    """Add a MixLoRA, MiLoRA or LoRA adapter to `model` in place (the base frozen, every B zero) and wrap it.

    The outputs equal the base model's until training moves B (MiLoRA included: its B = 0 too). Raises
    ValueError, before any change, for an unsupported family, a target module the model lacks, or an
    adapter name already in use.
    """
    if not isinstance(config, ADAPTER_CONFIGS):
        raise TypeError(f"config must be a MixLoraConfig, MiLoraConfig or LoraConfig, got {type(config).__name__}")
    if isinstance(model, MoeLoraModel):
        model.add_adapter(config, adapter_name)
        return model
    swaps, targets = plan_injection(model, config, adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = MoeLoraModel(model)
    wrapped._inject(config, adapter_name, swaps, targets, trainable=True)
    return wrapped
