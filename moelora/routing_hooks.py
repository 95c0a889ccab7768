"""Routing hooks: what each forward call of the Hugging Face model is, for mixed batches and MiLoRA.

A forward pre-hook on the HF model (every model) binds a mixed batch's plan to the call's rows and, for MiLoRA,
records whether the call is a prefill (no cached keys), an extend (more prompt tokens on a KV cache: chunked
prefill, a new turn) or a decoding step, and the prompt mask; a pre-hook on each decoder layer runs that
layer's MiLoRA routers on the hidden states entering it at a prefill, pools the new tokens into the kept
running pool and routes again at an extend. Decoding steps reuse the kept routing (no router call, no host
sync) and pool their token in. A post-hook records the KV cache the pools belong to. The state lives on the
HF model (routing_state); install_routing_hooks puts the hooks in place once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moelora.injection import decoder_layers
from moelora.layers import BatchPlan
from moelora.milora_router import MiLoraRouter, MiLoraRouters


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
            # The layer holds the state (a plain attribute), not the hook: copy.deepcopy of the model copies
            # the attribute along with the model's own, while a hook closing over the state would go on
            # updating the original model's.
            layer.__dict__["_moelora_state"] = state
            state.hooks.append(layer.register_forward_pre_hook(_layer_hook, with_kwargs=True))
            layer.__dict__["_moelora_hooked"] = True


def _layer_hook(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    _before_layer(layer.__dict__["_moelora_state"], layer, args, kwargs)
