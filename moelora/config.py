"""Adapter configs, validated before a model is touched: MixLoRA (MoE-PEFT's keys and defaults), MiLoRA,
and plain LoRA (PEFT's keys, so PEFT LoRA adapters load as tenants beside the others)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from transformers.activations import ACT2FN

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROUTING_STRATEGIES = ("mixlora", "mixlora-dynamic")
PEFT_TYPES = ("MIXLORA", "MILORA", "LORA")
POOLINGS = ("attention", "mean", "last", "max")
MILORA_ACTIVATIONS = ("rational", "gelu")


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


@dataclass
class MiLoraConfig:
    """MiLoRA (arXiv 2410.18035): each layer's LoRA modules are the experts, routed once per prompt.

    A router per layer pools the prompt's hidden states entering the layer, applies a rational (Pade)
    activation, a softmax over the layer's adapted modules and a top-k; module m adds p_m * s * B_m A_m x
    when selected. The routing is computed at prefill and reused by every decoding step.
    """

    r: int = field(default=32, metadata={"help": "LoRA rank of every module."})
    lora_alpha: float = field(default=64, metadata={"help": "LoRA scaling numerator: s = alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on LoRA inputs in training."})
    top_k: int = field(default=3, metadata={"help": "Modules that fire per layer and prompt."})
    pooling: str = field(default="attention", metadata={"help": "Prompt pooling: attention, mean, last or max."})
    activation: str = field(default="rational", metadata={"help": "Router activation: 'rational' (PAU) or 'gelu'."})
    target_modules: list[str] = field(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        metadata={"help": "The LoRA modules (experts) of each layer; the default means all of the family's."},
    )
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balance loss."})
    router_init_range: float = field(default=0.02, metadata={"help": "Std of the router's normal init."})
    use_rslora: bool = field(default=False, metadata={"help": "s = alpha / sqrt(r)."})
    lora_init: str = field(default="original", metadata={"help": "'original' (kaiming A) or 'gaussian'."})
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    peft_type: str = "MILORA"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, dict):
            self.target_modules = [name for name, on in self.target_modules.items() if on]
        self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        _check(self.peft_type == "MILORA", f"peft_type must be 'MILORA' for MiLoraConfig, got {self.peft_type!r}")
        _check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check(len(self.target_modules) > 0, "target_modules must name at least one projection")
        _check(
            len(set(self.target_modules)) == len(self.target_modules),
            f"target_modules must not repeat a name, got {self.target_modules}",
        )
        n = len(self.target_modules)
        _check(
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and 1 <= self.top_k <= n,
            f"top_k must be an int in [1, {n}] (the number of target modules), got {self.top_k!r}",
        )
        _check(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        _check(
            self.activation in MILORA_ACTIVATIONS,
            f"activation must be one of {MILORA_ACTIVATIONS}, got {self.activation!r}",
        )
        _check(self.router_init_range >= 0, f"router_init_range must be >= 0, got {self.router_init_range!r}")
        _check(self.router_aux_loss_coef >= 0, f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        _check(
            self.lora_init in ("original", "gaussian"),
            f"lora_init must be 'original' or 'gaussian', got {self.lora_init!r}",
        )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bias"] = "none"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiLoraConfig:
        _check(
            d.get("peft_type") == "MILORA",
            f"adapter_config.json: peft_type must be 'MILORA', got {d.get('peft_type')!r}",
        )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class LoraConfig:
    """Plain LoRA with PEFT's keys: read and written in PEFT's format, served beside MixLoRA/MiLoRA tenants."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    use_dora: bool = False
    lora_init: str = "original"
    base_model_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            raise ValueError(f"target_modules must be a list of module names, got the string {self.target_modules!r}")
        self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        _check(self.peft_type == "LORA", f"peft_type must be 'LORA' for LoraConfig, got {self.peft_type!r}")
        _check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got {self.r!r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check(len(self.target_modules) > 0, "target_modules must name at least one projection")
        _check(
            self.lora_init in ("original", "gaussian"),
            f"lora_init must be 'original' or 'gaussian', got {self.lora_init!r}",
        )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("lora_init")
        d["bias"] = "none"
        d["init_lora_weights"] = True if self.lora_init == "original" else "gaussian"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        _check(
            d.get("peft_type") == "LORA", f"adapter_config.json: peft_type must be 'LORA', got {d.get('peft_type')!r}"
        )
        if d.get("bias", "none") != "none":
            raise ValueError(f"adapter_config.json: LoRA bias={d.get('bias')!r} is not supported (only 'none')")
        unsupported = [
            k for k in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern") if d.get(k)
        ]
        if unsupported:
            raise ValueError(f"adapter_config.json: PEFT LoRA options {unsupported} are not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"lora_init"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if isinstance(kwargs.get("target_modules"), str):
            raise ValueError("adapter_config.json: target_modules as a regular expression is not supported")
        kwargs["lora_init"] = "gaussian" if d.get("init_lora_weights") == "gaussian" else "original"
        return cls(**kwargs)


AdapterConfig = MixLoraConfig | MiLoraConfig | LoraConfig


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """The config class named by `peft_type` (MIXLORA, MILORA or LORA), read from an adapter_config.json dict."""
    peft_type = d.get("peft_type")
    classes = {"MIXLORA": MixLoraConfig, "MILORA": MiLoraConfig, "LORA": LoraConfig}
    if peft_type not in classes:
        raise ValueError(f"adapter_config.json: peft_type must be one of {sorted(classes)}, got {peft_type!r}")
    return classes[peft_type].from_dict(d)
