"""Adapter configs: MixLoRA with MoE-PEFT's keys and defaults, validated before a model is touched."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from transformers.activations import ACT2FN

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROUTING_STRATEGIES = ("mixlora", "mixlora-dynamic")
PEFT_TYPES = ("MIXLORA", "MILORA")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ExpertLoraConfig:
    """Overrides of r / lora_alpha / lora_dropout for the FFN experts (MoE-PEFT's `expert_lora`)."""

    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None


@dataclass
class MixLoraConfig:
    """MixLoRA (arXiv 2404.15159): top-k router over LoRA experts on the frozen FFN, LoRA on attention.

    Field names and defaults are MoE-PEFT's (`adapter_config.json`), so its adapters load unchanged.
    """

    r: int = field(default=16, metadata={"help": "LoRA rank of the attention LoRAs (and experts)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator: s = alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on LoRA inputs in training."})
    num_experts: int = field(default=8, metadata={"help": "Experts per FFN."})
    top_k: int = field(default=2, metadata={"help": "Experts per token (routing_strategy='mixlora')."})
    routing_strategy: str = field(
        default="mixlora", metadata={"help": "'mixlora' (top-k, renormalised) or 'mixlora-dynamic' (top-p)."}
    )
    top_p: float = field(default=0.8, metadata={"help": "Cumulative probability for 'mixlora-dynamic'."})
    target_modules: list[str] = field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        metadata={"help": "Projections to adapt; FFN projections become experts, attention ones plain LoRA."},
    )
    router_aux_loss_coef: float = field(default=0.001, metadata={"help": "Weight of the load-balance loss."})
    router_init_range: float = field(default=0.02, metadata={"help": "Std of the router's normal init."})
    jitter_noise: float = field(default=0.0, metadata={"help": "Router input noise U(1-j, 1+j), training only."})
    use_rslora: bool = field(default=False, metadata={"help": "s = alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA magnitudes (MixDoRA: one per expert)."})
    lora_init: str = field(default="original", metadata={"help": "'original' (kaiming A) or 'gaussian'."})
    act_fn: str | None = field(default=None, metadata={"help": "FFN activation override; None keeps the model's."})
    expert_lora: ExpertLoraConfig | None = field(default=None, metadata={"help": "r/alpha/dropout for experts."})
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    peft_type: str = "MIXLORA"

    def __post_init__(self) -> None:
        if isinstance(self.expert_lora, dict):
            self.expert_lora = ExpertLoraConfig(**self.expert_lora)
        if isinstance(self.target_modules, dict):  # MoE-PEFT also writes {"q_proj": true, ...}
            self.target_modules = [name for name, on in self.target_modules.items() if on]
        self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        _check(self.peft_type == "MIXLORA", f"peft_type must be 'MIXLORA' for MixLoraConfig, got {self.peft_type!r}")
        _check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check(
            isinstance(self.num_experts, int) and self.num_experts >= 1,
            f"num_experts must be an int >= 1, got {self.num_experts!r}",
        )
        _check(
            self.routing_strategy in ROUTING_STRATEGIES,
            f"routing_strategy must be one of {ROUTING_STRATEGIES}, got {self.routing_strategy!r}",
        )
        if self.routing_strategy == "mixlora":
            _check(
                isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
                f"top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}",
            )
        _check(
            isinstance(self.top_p, float | int) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _check(len(self.target_modules) > 0, "target_modules must name at least one projection")
        _check(self.router_init_range >= 0, f"router_init_range must be >= 0, got {self.router_init_range!r}")
        _check(0.0 <= self.jitter_noise < 1.0, f"jitter_noise must be in [0, 1), got {self.jitter_noise!r}")
        _check(self.router_aux_loss_coef >= 0, f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        _check(
            self.lora_init in ("original", "gaussian"),
            f"lora_init must be 'original' or 'gaussian', got {self.lora_init!r}",
        )
        _check(self.act_fn is None or self.act_fn in ACT2FN, f"act_fn {self.act_fn!r} is not an activation name")
        if self.expert_lora is not None:
            e = self.expert_lora
            _check(e.r is None or (isinstance(e.r, int) and e.r > 0), f"expert_lora.r must be > 0, got {e.r!r}")
            _check(e.lora_alpha is None or e.lora_alpha > 0, f"expert_lora.lora_alpha must be > 0, got {e.lora_alpha}")
            _check(
                e.lora_dropout is None or 0.0 <= e.lora_dropout < 1.0,
                f"expert_lora.lora_dropout must be in [0, 1), got {e.lora_dropout!r}",
            )

    @property
    def slots(self) -> int:
        """Routing slots per token: top_k, or every expert for top-p (unused slots hold index -1)."""
        return self.top_k if self.routing_strategy == "mixlora" else self.num_experts

    def _scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scaling(self) -> float:
        return self._scaling(self.r, self.lora_alpha)

    @property
    def expert_r(self) -> int:
        return self.expert_lora.r if self.expert_lora and self.expert_lora.r else self.r

    @property
    def expert_alpha(self) -> float:
        return self.expert_lora.lora_alpha if self.expert_lora and self.expert_lora.lora_alpha else self.lora_alpha

    @property
    def expert_dropout(self) -> float:
        if self.expert_lora is not None and self.expert_lora.lora_dropout is not None:
            return self.expert_lora.lora_dropout
        return self.lora_dropout

    @property
    def expert_scaling(self) -> float:
        return self._scaling(self.expert_r, self.expert_alpha)

    def to_dict(self) -> dict[str, Any]:
        """Our adapter_config.json: every field, plus what MoE-PEFT readers expect."""
        d = dataclasses.asdict(self)
        d["bias"] = "none"
        if self.expert_lora is None:
            d.pop("expert_lora")
        else:
            d["expert_lora"] = {k: v for k, v in d["expert_lora"].items() if v is not None}
        return d

    def to_moe_peft_dict(self) -> dict[str, Any]:
        """MoE-PEFT's adapter_config.json (its reader ignores unknown keys; we write only its own)."""
        d: dict[str, Any] = {
            "bias": "none",
            "peft_type": "MIXLORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": list(self.target_modules),
            "routing_strategy": self.routing_strategy,
            "num_experts": self.num_experts,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_init_range": self.router_init_range,
            "jitter_noise": self.jitter_noise,
            "lora_init": self.lora_init,
        }
        if self.routing_strategy == "mixlora":
            d["top_k"] = self.top_k
        else:
            d["top_p"] = self.top_p
            d["temperature"] = 0.0
        if self.use_dora:
            d["use_dora"] = True
        if self.use_rslora:
            d["use_rslora"] = True
        if self.act_fn is not None:
            d["act_fn"] = self.act_fn
        if self.expert_lora is not None:
            d["expert_lora"] = {k: v for k, v in dataclasses.asdict(self.expert_lora).items() if v is not None}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MixLoraConfig:
        """Reads ours and MoE-PEFT's adapter_config.json; unknown keys are ignored, bad values raise."""
        peft_type = d.get("peft_type")
        _check(peft_type == "MIXLORA", f"adapter_config.json: peft_type must be 'MIXLORA', got {peft_type!r}")
        if d.get("routing_strategy", "mixlora") not in ROUTING_STRATEGIES:
            raise ValueError(
                f"adapter_config.json: routing_strategy {d.get('routing_strategy')!r} is not supported; "
                f"expected one of {ROUTING_STRATEGIES}"
            )
        if float(d.get("temperature", 0.0) or 0.0) != 0.0:
            raise ValueError("adapter_config.json: a routing temperature other than 0.0 is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for required in ("r", "lora_alpha", "num_experts", "target_modules"):
            _check(required in kwargs, f"adapter_config.json: missing required key {required!r}")
        if isinstance(kwargs.get("top_p"), int):
            kwargs["top_p"] = float(kwargs["top_p"])
        return cls(**kwargs)
