"""Adapter files: ours (PEFT file names, safetensors), MoE-PEFT / mixlora's (adapter_model.bin), PEFT's LoRA.

Our keys, per adapted module path P inside the HF model (e.g. P = model.layers.0.self_attn.q_proj):
    P.lora_A.weight [r, in]      P.lora_B.weight [out, r]      P.lora_magnitude_vector [out]  (DoRA)
per MixLoRA FFN M (e.g. model.layers.0.mlp), experts stacked on dim 0:
    M.router.weight [E, H]       M.<proj>.lora_A.weight [E, r, in]   M.<proj>.lora_B.weight [E, out, r]
    M.<proj>.lora_magnitude_vector [E, out]  (DoRA)
and per MiLoRA router R (R = model.layers.{i}.milora_router):
    R.weight [M, H]   R.pool_weight [H] (attention pooling)   R.rational_numerator [7]   R.rational_denominator [5]
MoE-PEFT's keys: mixlora.layers.{i}.self_attn.<proj>.lora_{A,B}.weight, mixlora.layers.{i}.mlp.moe_gate.weight,
mixlora.layers.{i}.mlp.<proj>.experts.{e}.lora_{A,B}.weight; it stores no DoRA magnitudes (it recomputes
them as ||W + s B A|| on load, and so do we for its files). A plain LoRA adapter is written as PEFT writes
it: our keys with the prefix `base_model.model.` (so PEFT loads it, and we load PEFT's).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moelora.config import AdapterConfig, LoraConfig, MixLoraConfig, config_from_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MOE_PEFT_WEIGHTS_FILE = "adapter_model.bin"
FORMATS = ("moelora", "moe-peft")
PEFT_PREFIX = "base_model.model."


def adapter_tensors(path: str, adapter: nn.Module) -> dict[str, Tensor]:
    """The adapter module's parameters under our keys (the Parameters themselves, not copies)."""
    if hasattr(adapter, "module_names"):  # a MiLoraRouter
        return {f"{path}.{name}": p for name, p in adapter.named_parameters()}
    if hasattr(adapter, "router"):
        out = {f"{path}.router.weight": adapter.router}
        for proj in adapter.lora_A:
            out[f"{path}.{proj}.lora_A.weight"] = adapter.lora_A[proj]
            out[f"{path}.{proj}.lora_B.weight"] = adapter.lora_B[proj]
            if proj in adapter.lora_magnitude:
                out[f"{path}.{proj}.lora_magnitude_vector"] = adapter.lora_magnitude[proj]
        return out
    out = {f"{path}.lora_A.weight": adapter.lora_A, f"{path}.lora_B.weight": adapter.lora_B}
    if adapter.lora_magnitude is not None:
        out[f"{path}.lora_magnitude_vector"] = adapter.lora_magnitude
    return out


def _write_all(directory: str, files: dict[str, Any]) -> None:
    """Write every file through a temporary file in `directory`, then rename them all into place.

    A failure while writing (disk full, a bad tensor, an interrupt) leaves every existing file untouched
    and no temporary file behind; only the final renames, each atomic, remain.
    """
    written: list[tuple[str, str]] = []
    try:
        for name, write in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
            os.close(fd)
            written.append((tmp, name))
            write(tmp)
        for tmp, name in written:
            os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def save(
    directory: str,
    config: AdapterConfig,
    tensors: dict[str, Tensor],
    format: str = "moelora",
    base_config: Any = None,
) -> None:
    """Write an adapter; `base_config` (the base model's HF config) fills what MoE-PEFT's readers need."""
    if format not in FORMATS:
        raise ValueError(f"save_pretrained: format must be one of {FORMATS}, got {format!r}")
    if format == "moe-peft" and not isinstance(config, MixLoraConfig):
        raise ValueError(f"save_pretrained: format='moe-peft' holds MixLoRA adapters only, not {config.peft_type}")
    os.makedirs(directory, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if isinstance(config, LoraConfig):
        data = {PEFT_PREFIX + k: v for k, v in data.items()}
    if format == "moelora":
        conf = config.to_dict()
        if conf["base_model_name_or_path"] is None and base_config is not None:  # as PEFT writes it
            conf["base_model_name_or_path"] = getattr(base_config, "name_or_path", None) or None
        stale = os.path.join(directory, MOE_PEFT_WEIGHTS_FILE)
        files = {WEIGHTS_FILE: lambda p: save_file(data, p, metadata={"format": "pt"})}
    else:
        conf = moe_peft_config(config, base_config)
        if config.use_dora:
            warnings.warn(
                "save_pretrained(format='moe-peft'): MoE-PEFT stores no DoRA magnitudes; they are dropped "
                "(MoE-PEFT recomputes them on load as ||W + s B A||).",
                stacklevel=3,
            )
        stale = os.path.join(directory, WEIGHTS_FILE)
        files = {MOE_PEFT_WEIGHTS_FILE: lambda p: torch.save(to_moe_peft(data), p)}
    files[CONFIG_FILE] = lambda p: _write_json(p, conf)
    _write_all(directory, files)
    if os.path.exists(stale):  # a weights file of the other format would make the directory ambiguous
        os.remove(stale)


def moe_peft_config(config: MixLoraConfig, base_config: Any = None) -> dict[str, Any]:
    """MoE-PEFT's adapter_config.json, completed from the base config: the mixlora package needs the base's
    name/path and act_fn (it calls ACT2FN[act_fn] and fails on None), MoE-PEFT refuses a float lora_alpha,
    and the package asserts that the dropout and router fields are floats (0, not 0.0, fails)."""
    conf = config.to_moe_peft_dict()
    if base_config is not None:
        if conf.get("base_model_name_or_path") is None:
            conf["base_model_name_or_path"] = getattr(base_config, "name_or_path", None) or None
        # gemma2's config names it hidden_activation, the other families hidden_act
        act = getattr(base_config, "hidden_act", None) or getattr(base_config, "hidden_activation", None)
        if conf.get("act_fn") is None and act:
            conf["act_fn"] = act
    if float(conf["lora_alpha"]).is_integer():
        conf["lora_alpha"] = int(conf["lora_alpha"])
    for key in ("lora_dropout", "router_aux_loss_coef", "router_init_range", "jitter_noise"):
        conf[key] = float(conf[key])
    if config.lora_dropout == 0:
        warnings.warn(
            "save_pretrained(format='moe-peft'): lora_dropout=0 is refused by MoE-PEFT and the mixlora package "
            "(they assert lora_dropout > 0); set lora_dropout in the saved adapter_config.json to a small value "
            "such as 0.05 (it only affects their training, not inference).",
            stacklevel=3,
        )
    return conf


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def load(directory: str) -> tuple[AdapterConfig, dict[str, Tensor], str]:
    """(config, tensors, format) from an adapter directory; a missing or corrupt file raises ValueError."""
    if not os.path.isdir(directory):
        raise ValueError(f"adapter directory {directory!r} does not exist")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"adapter directory {directory!r} has no {CONFIG_FILE}")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    try:
        config = config_from_dict(raw)
    except TypeError as e:
        raise ValueError(f"{config_path}: {e}") from e
    ours, theirs = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, MOE_PEFT_WEIGHTS_FILE)
    if os.path.isfile(ours):
        try:
            tensors = load_file(ours)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{ours} is not a readable safetensors file: {e}") from e
        if isinstance(config, LoraConfig):  # PEFT's keys: ours behind base_model.model.
            tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
        return config, tensors, "moelora"
    if os.path.isfile(theirs) and not isinstance(config, MixLoraConfig):
        raise ValueError(f"{theirs}: adapter_model.bin is read for MixLoRA adapters only, this is {config.peft_type}")
    if os.path.isfile(theirs):
        try:
            tensors = torch.load(theirs, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types on a damaged pickle/zip
            raise ValueError(f"{theirs} is not a readable torch file: {e}") from e
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise ValueError(f"{theirs} must hold a dict of tensors")
        return config, tensors, "moe-peft"
    raise ValueError(f"adapter directory {directory!r} has neither {WEIGHTS_FILE} nor {MOE_PEFT_WEIGHTS_FILE}")


_OURS_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.(\w+)\.lora_([AB])\.weight$")
_OURS_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.router\.weight$")
_OURS_ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight$")
_THEIRS_EXPERT = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.(\w+)\.experts\.(\d+)\.lora_([AB])\.weight$")
_THEIRS_ROUTER = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight$")
_THEIRS_ATTN = re.compile(r"^mixlora\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight$")


def to_moe_peft(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys -> MoE-PEFT's (experts unstacked; DoRA magnitudes dropped)."""
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if m := _OURS_ROUTER.match(key):
            out[f"mixlora.layers.{m[1]}.mlp.moe_gate.weight"] = t
        elif m := _OURS_EXPERT.match(key):
            for e in range(t.shape[0]):
                out[f"mixlora.layers.{m[1]}.mlp.{m[2]}.experts.{e}.lora_{m[3]}.weight"] = t[e].clone()
        elif m := _OURS_ATTN.match(key):
            out[f"mixlora.layers.{m[1]}.self_attn.{m[2]}.lora_{m[3]}.weight"] = t
        elif not key.endswith("lora_magnitude_vector"):
            raise ValueError(f"to_moe_peft: no MoE-PEFT key for {key!r}")
    return out


def from_moe_peft(tensors: dict[str, Tensor], config: MixLoraConfig) -> dict[str, Tensor]:
    """MoE-PEFT's keys -> ours (experts stacked). Unknown keys and missing experts raise ValueError."""
    out: dict[str, Tensor] = {}
    experts: dict[str, dict[int, Tensor]] = {}
    for key, t in tensors.items():
        if m := _THEIRS_ROUTER.match(key):
            out[f"model.layers.{m[1]}.mlp.router.weight"] = t
        elif m := _THEIRS_EXPERT.match(key):
            experts.setdefault(f"model.layers.{m[1]}.mlp.{m[2]}.lora_{m[4]}.weight", {})[int(m[3])] = t
        elif m := _THEIRS_ATTN.match(key):
            out[f"model.layers.{m[1]}.self_attn.{m[2]}.lora_{m[3]}.weight"] = t
        else:
            raise ValueError(f"adapter_model.bin: unexpected key {key!r} for a MixLoRA adapter")
    for key, by_expert in experts.items():
        missing = [e for e in range(config.num_experts) if e not in by_expert]
        extra = [e for e in by_expert if e >= config.num_experts]
        if missing or extra:
            raise ValueError(
                f"adapter_model.bin: {key} has experts {sorted(by_expert)}, expected 0..{config.num_experts - 1}"
            )
        shapes = {tuple(t.shape) for t in by_expert.values()}
        if len(shapes) != 1:
            raise ValueError(f"adapter_model.bin: the experts of {key} have different shapes {sorted(shapes)}")
        out[key] = torch.stack([by_expert[e] for e in range(config.num_experts)])
    return out


def copy_into(params: dict[str, Tensor], tensors: dict[str, Tensor], directory: str) -> None:
    """Check names and shapes of every tensor against the planned adapter, then copy them in."""
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter in {directory!r} does not match this model: "
            f"{len(missing)} missing tensors {missing[:4]}, {len(unexpected)} unexpected tensors {unexpected[:4]}"
        )
    for key, p in params.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(
                f"adapter in {directory!r} does not match this model: {key} has shape "
                f"{tuple(tensors[key].shape)}, the model needs {tuple(p.shape)}"
            )
        if not tensors[key].is_floating_point():
            raise ValueError(f"adapter in {directory!r}: {key} has dtype {tensors[key].dtype}, expected floating point")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])


def recompute_dora_magnitudes(swaps: list) -> None:
    """MoE-PEFT's DoRA on load: m = ||W + s B A|| per output row (so the loaded DoRA scale starts at 1)."""
    with torch.no_grad():
        for s in swaps:
            a = s.adapter
            if hasattr(a, "router"):
                base = s.wrapper.base_layer
                for proj in a.lora_magnitude:
                    W = getattr(base, proj).weight.float()
                    delta = torch.einsum("eor,eri->eoi", a.lora_B[proj].float(), a.lora_A[proj].float())
                    a.lora_magnitude[proj].copy_(torch.linalg.norm(W + a.scaling * delta, dim=-1))
            elif a.lora_magnitude is not None:
                W = s.wrapper.base_layer.weight.float()
                a.lora_magnitude.copy_(torch.linalg.norm(W + a.scaling * (a.lora_B.float() @ a.lora_A.float()), dim=1))
