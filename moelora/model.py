"""MixLoRA, MiLoRA and LoRA on Hugging Face models: injection by swapping module instances, the wrapper.

get_moelora_model(model, config) plans every swap first and checks it (family, target names, adapter
name), then swaps: a bad config raises before the model is touched. The HF model is modified in place
and stays reachable as `MoeLoraModel.model`.

Routing hooks: a forward pre-hook on the HF model (every model) binds a mixed batch's plan to the call's
rows and, for MiLoRA, records whether the call is a prefill (no cached keys), an extend (more prompt tokens on
a KV cache: chunked prefill, a new turn) or a decoding step, and the prompt mask; a pre-hook on each decoder
layer runs that layer's MiLoRA routers on the hidden states entering it at a prefill, pools the new tokens
into the kept running pool and routes again at an extend. Decoding steps reuse the kept routing (no router
call, no host sync) and pool their token in. A post-hook records the KV cache the pools belong to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from moelora import backend, formats
from moelora.config import LLAMA_PROJECTIONS, AdapterConfig, LoraConfig, MiLoraConfig, MixLoraConfig
from moelora.layers import (
    FFN_KINDS,
    BatchPlan,
    LoraAdapter,
    LoraLinear,
    MiLoraRouter,
    MiLoraRouters,
    MixLoraAdapter,
    MixLoraFFN,
    ffn_kind,
    keep_quantized_trainable,
)
from moelora.reference import load_balance_loss, prompt_balance_loss

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


# --- Routing hooks: binding the batch plan (every adapter kind), MiLoRA prefill / extend / decode -----------


@dataclass
class RoutingState:
    """Per HF model: what the current forward call is, for the batch plan and the MiLoRA routers of every layer.

    A MiLoRA call is one of: "prefill" (no cached tokens: route afresh), "extend" (more than one new token on
    a KV cache: chunked prefill, a new turn; pool them in and route again on every token so far; see
    moelora.layers for how close that is to one prefill) or "decode" (one new token on a cache, or a generate()
    step: reuse the gates, pool the token in).
    The kept pools belong to one KV cache (`cache`, a weak reference, at `cache_len` tokens) and one batch
    (`owner`: each row's adapter); a call on any other cache or batch raises instead of reusing them.
    """

    active: str | None = None  # the adapter when no BatchPlan is set
    plan: BatchPlan | None = None
    milora: set[str] = field(default_factory=set)  # the MiLoRA adapters loaded
    uses_milora: bool = False  # this call runs a MiLoRA adapter
    mode: str = "prefill"  # this call: "prefill", "extend" or "decode"
    pool_tokens: bool = False  # decode: pool this call's tokens into the kept pools
    keep_pool: bool = False  # prefill: keep the pools (not in a compiled or a training step)
    generating: bool = False  # inside MoeLoraModel.generate
    routed: bool = False  # generate(): its first model call has run
    prefill_left: int = 0  # generate(): prompt tokens not run yet (chunked prefill: the rest are not decoding)
    cache: weakref.ref | None = None  # the KV cache the kept pools belong to, or None: no call may continue
    cache_len: int = 0  # its length once the pools were last extended (counted, not read back)
    owner: tuple[str | None, ...] = ()  # the adapter names (one, or one per row) the pools belong to
    rows: int = 0  # and the batch size
    pool_mask: Tensor | None = None  # [B, S] prompt tokens of this call (padding and non-prompt tokens 0)
    prompt_mask: Tensor | None = None  # MoeLoraModel.forward(prompt_mask=...), for training on prompt + answer
    log: list[Tensor] | None = None  # each routed layer's probs [B, M], for the load-balance loss
    hooks: list[Any] = field(default_factory=list)


def routing_state(model: nn.Module) -> RoutingState:
    state = model.__dict__.get("_moelora_routing")
    if state is None:
        state = RoutingState()
        model.__dict__["_moelora_routing"] = state  # a plain attribute: not a module, not in the state_dict
    return state


def _cache_arg(kwargs: dict) -> Any:
    # transformers >= 5.25 calls it `cache` (`past_key_values` deprecated until 5.40)
    past = kwargs.get("cache")
    return past if past is not None else kwargs.get("past_key_values")


def _cache_len(past: Any) -> int:
    return past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0


def _before_model(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """HF model pre-hook: bind the batch plan to this call's rows; for MiLoRA, the call's mode and prompt tokens."""
    state = routing_state(model)
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        return
    rows, seq = x.shape[0], x.shape[1]
    if state.plan is not None:
        state.plan.bind(rows)  # every mixed batch needs it, whichever adapter kinds it mixes
    names = tuple(state.plan.names()) if state.plan is not None else (state.active,)
    state.uses_milora = any(n in state.milora for n in names)
    if not state.uses_milora:
        return
    past = _cache_arg(kwargs)
    compiling = torch.compiler.is_compiling()
    if state.generating and state.routed and state.prefill_left <= 0:
        # A generate() decoding step on generate's own cache: no cache length read (a static cache's syncs).
        state.mode = "decode"
        state.pool_tokens = past is not None and seq == 1 and state.cache is not None and not compiling
        if not compiling:  # compiled steps keep no pools; reading the count would recompile every step
            state.cache_len += seq
    else:
        past_len = _cache_len(past)
        if state.generating:  # its first call, or the next chunk of its prompt (prefill_chunk_size)
            state.routed = True
            state.prefill_left -= seq
            state.mode = "extend" if past_len > 0 else "prefill"
        else:
            state.mode = "prefill" if past_len == 0 else "decode" if seq == 1 else "extend"
        # A decode step pools its token for a later extend; not a full recompute without a cache.
        state.pool_tokens = state.mode == "decode" and past is not None and not compiling
        if state.mode == "extend" or state.pool_tokens:
            _check_continuation(state, past, past_len, names, rows)
        state.cache_len = past_len + seq
    training_step = model.training and torch.is_grad_enabled()  # no later call continues it: save the pass
    state.keep_pool = state.mode == "prefill" and not training_step and not compiling
    if state.mode == "prefill":
        state.owner, state.rows = names, rows
    if state.mode == "prefill" or (state.mode == "decode" and not state.pool_tokens):
        # The pools follow no cache now (until _after_model records the prefill's); a multi-token decoding
        # step (assisted generation: its rejected tokens leave the cache again) loses them too.
        state.cache = None
    if state.mode == "prefill" and seq == 0:
        raise ValueError("MiLoRA: the prompt is empty (sequence length 0); routing needs at least one prompt token")
    pool_mask = None
    if state.mode != "decode" or state.pool_tokens:  # a compiled step reads no cache length: it needs no mask
        pool_mask = _prompt_tokens(kwargs.get("attention_mask"), seq, state.cache_len - seq)
    if state.prompt_mask is not None:
        pm = state.prompt_mask.bool().to(x.device)
        if tuple(pm.shape) != (rows, seq):
            raise ValueError(f"prompt_mask must have shape {(rows, seq)} (batch, sequence), got {tuple(pm.shape)}")
        pool_mask = pm if pool_mask is None else pool_mask & pm
    if state.mode == "prefill" and pool_mask is not None and not compiling:
        empty = (~pool_mask.any(dim=1)).nonzero().flatten().tolist()  # one host sync per prefill, none per step
        if empty:
            raise ValueError(f"MiLoRA: sequences {empty} have an empty prompt (no token with attention_mask = 1)")
    state.pool_mask = pool_mask


def _prompt_tokens(mask: Any, seq: int, start: int) -> Tensor | None:
    """[B, seq] bool: this call's non-padding tokens, from a 2D attention mask [B, start + seq] or from the 4D mask
    [B, 1, seq, kv] (bool, or additive with 0 = attended) that generate() builds for a static cache, whose
    diagonal at cache positions start.. says it: a token attends to itself unless it is padding."""
    if not isinstance(mask, Tensor):
        return None
    if mask.dim() == 2:
        return mask[:, -seq:].bool()
    if mask.dim() == 4:
        keep = mask if mask.dtype == torch.bool else mask == 0
        return keep[:, 0].diagonal(offset=start, dim1=1, dim2=2)
    return None


def _after_model(model: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> None:
    """HF model post-hook: after a MiLoRA call that keeps its pools, record the KV cache they now match."""
    state = routing_state(model)
    if not state.uses_milora or torch.compiler.is_compiling():
        return
    if not (state.keep_pool or state.mode == "extend" or state.pool_tokens):
        return
    cache = outputs.get("cache", outputs.get("past_key_values")) if isinstance(outputs, dict) else None
    if cache is None or not hasattr(cache, "get_seq_length"):
        state.cache = None  # no cache to continue (use_cache=False, return_dict=False)
        return
    state.cache = weakref.ref(cache)  # its length, state.cache_len, was counted in _before_model


def _check_continuation(state: RoutingState, past: Any, past_len: int, names: tuple, rows: int) -> None:
    """Raise unless the kept pools belong to exactly this cache, at this length, and this batch."""
    tracked = state.cache() if state.cache is not None else None
    if tracked is None or tracked is not past:
        raise RuntimeError(
            f"MiLoRA: no routing for this batch yet: this call continues a KV cache ({past_len} tokens) whose prompt "
            "routing this model does not hold (a cache it did not build, one built in training or compiled, or "
            "routing cleared since); run the whole text through the model without a cache (a prefill) first"
        )
    if past_len != state.cache_len:
        raise RuntimeError(
            f"MiLoRA: the KV cache holds {past_len} tokens but the routing state pooled {state.cache_len}: the cache "
            "was cropped or extended outside the MiLoRA adapter; run the whole text through the model (a prefill)"
        )
    if rows != state.rows:
        raise RuntimeError(
            f"MiLoRA: the routing was computed for {state.rows} prompts but this call has {rows} sequences; "
            "run the prompts of this batch through the model (prefill) first"
        )
    if names != state.owner:
        raise RuntimeError(
            f"MiLoRA: this call runs adapters {list(names)} but the KV cache was routed for {list(state.owner)}; "
            "continue a cache with the adapters it was built with (set_adapter / adapter_names), or run a prefill"
        )


def _before_layer(state: RoutingState, layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Decoder-layer pre-hook: run this layer's MiLoRA routers on the states entering it (prefill, extend),
    or pool a decoding step's token into them."""
    if not state.uses_milora or (state.mode == "decode" and not state.pool_tokens):
        return
    routers: MiLoraRouters = layer.milora_routers
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = state.pool_mask
    if state.plan is None:
        groups = [(state.active, None)] if state.active is not None else []
    else:
        groups = state.plan.groups(hidden.shape[0], hidden.device)
    for name, rows in groups:
        if name not in routers.adapters:
            continue
        router: MiLoraRouter = routers.adapters[name]
        h = hidden if rows is None else hidden[rows]
        m = mask if rows is None or mask is None else mask[rows]
        if state.mode == "prefill":
            routing = router(h, m, keep_pool=state.keep_pool)
        else:
            routing = router.extend(h, m, reroute=state.mode == "extend")
        if routing is not None and state.log is not None:
            state.log.append(routing.probs)


def install_routing_hooks(model: nn.Module) -> None:
    """Hook the HF model (once; every model: mixed batches bind their plan there) and every decoder layer
    holding MiLoRA routers (once each)."""
    state = routing_state(model)
    if not state.hooks:
        state.hooks.append(model.register_forward_pre_hook(_before_model, with_kwargs=True))
        state.hooks.append(model.register_forward_hook(_after_model, with_kwargs=True))
    _, layers = decoder_layers(model)
    for layer in layers:
        if hasattr(layer, "milora_routers") and not layer.__dict__.get("_moelora_hooked", False):

            def hook(module: nn.Module, args: tuple, kwargs: dict, state: RoutingState = state) -> None:
                _before_layer(state, module, args, kwargs)

            state.hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            layer.__dict__["_moelora_hooked"] = True


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
