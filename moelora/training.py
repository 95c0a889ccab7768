"""MiLoRA's alternating (bi-level) training schedule, an option beside plain joint training.

The paper trains the router's rational activation by a DARTS-style bi-level schedule. We offer its
first-order form: one step of the LoRA weights on a training batch, then one step of the router side
(router weights, pooling vector, rational coefficients) on a held-out batch, each with its own optimizer.
Joint training (one optimizer over every parameter, e.g. the HF Trainer) stays the default.

    lora, router = milora_parameter_groups(model)
    lora_opt, router_opt = torch.optim.AdamW(lora, lr=2e-4), torch.optim.AdamW(router, lr=1e-3)
    for train_batch, val_batch in zip(train_loader, val_loader):
        bilevel_step(model, train_batch, val_batch, lora_opt, router_opt)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from moelora.config import MiLoraConfig
from moelora.milora_router import MiLoraRouters


def milora_parameter_groups(model: nn.Module, adapter_name: str | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """(LoRA parameters, router parameters) of one MiLoRA adapter of a MoeLoraModel (default: the active one).

    Router parameters: every layer's router weight, pooling vector and rational coefficients.
    """
    name = adapter_name or model.active_adapter
    if not isinstance(model.peft_config.get(name), MiLoraConfig):
        raise ValueError(f"milora_parameter_groups: {name!r} is not a MiLoRA adapter of this model")
    routers = [m.adapters[name] for m in model.model.modules() if isinstance(m, MiLoraRouters) and name in m.adapters]
    router_params = [p for r in routers for p in r.parameters()]
    router_ids = {id(p) for p in router_params}
    lora_params = [p for p in model.adapter_state_dict(name).values() if id(p) not in router_ids]
    return lora_params, router_params


def bilevel_step(
    model: nn.Module,
    train_batch: Mapping[str, Any],
    val_batch: Mapping[str, Any],
    lora_optimizer: Any,
    router_optimizer: Any,
) -> tuple[float, float]:
    """One alternating step: LoRA weights on `train_batch`, then the router side on `val_batch`.

    Batches are keyword arguments of the model's forward with `labels`. Returns (train loss, val loss)
    as floats (this reads them back: one host sync per step).
    """
    lora_optimizer.zero_grad(set_to_none=True)
    router_optimizer.zero_grad(set_to_none=True)
    train_loss = model(**train_batch).loss
    train_loss.backward()
    lora_optimizer.step()
    lora_optimizer.zero_grad(set_to_none=True)
    router_optimizer.zero_grad(set_to_none=True)
    val_loss = model(**val_batch).loss
    val_loss.backward()
    router_optimizer.step()
    router_optimizer.zero_grad(set_to_none=True)
    lora_optimizer.zero_grad(set_to_none=True)
    return float(train_loss.detach()), float(val_loss.detach())
