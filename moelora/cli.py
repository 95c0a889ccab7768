"""The `moelora` command line (also `python -m moelora`):

    moelora convert SRC DST --format {moelora,moe-peft,peft} [--base MODEL]
    moelora inspect DIR

`convert` rewrites an adapter folder in another format (docs/formats.md). Without --base it maps the files
directly; with --base it loads the adapter onto that model and saves it, which also checks every shape
against the model and is needed to turn a MoE-PEFT DoRA adapter into ours (its magnitudes are recomputed
from the base weights). `inspect` prints an adapter's config, parameter counts, experts per layer and the
backend that would run it. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections import Counter
from typing import Any, NoReturn

import torch
from torch import Tensor

from moelora import backend, formats
from moelora.config import AdapterConfig, LoraConfig, MiLoraConfig, MixLoraConfig

CONVERT_FORMATS = ("moelora", "moe-peft", "peft")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class CliError(Exception):
    """Bad input: main() prints `moelora: error: <message>` and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints the usage too; one line is asked for
        raise CliError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moelora", description="Convert and inspect moelora, MoE-PEFT and PEFT adapter folders.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    convert = sub.add_parser("convert", help="rewrite an adapter folder in another format")
    convert.add_argument("src", help="adapter folder to read (moelora, MoE-PEFT / mixlora or PEFT LoRA)")
    convert.add_argument("dst", help="adapter folder to write")
    convert.add_argument("--format", required=True, help=f"format to write: {', '.join(CONVERT_FORMATS)}")
    convert.add_argument("--base", help="base model (folder or hub name): load the adapter onto it and save")
    inspect = sub.add_parser("inspect", help="print an adapter's config, sizes, experts and backend")
    inspect.add_argument("dir", help="adapter folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.command == "convert":
                convert(args.src, args.dst, args.format, args.base)
            else:
                print(inspect(args.dir))
        for w in caught:  # moelora's own warnings (DoRA dropped, lora_dropout=0) matter to the user
            if str(w.message).startswith(("save_pretrained", "moelora")):
                print(f"moelora: warning: {str(w.message).removeprefix('moelora: ')}", file=sys.stderr)
    except (CliError, ValueError) as e:
        print(f"moelora: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


# --- convert ---------------------------------------------------------------------------------------------


def convert(src: str, dst: str, fmt: str, base: str | None = None) -> None:
    """Write the adapter in `src` to `dst` in format `fmt` ('moelora', 'moe-peft' or 'peft')."""
    if fmt not in CONVERT_FORMATS:
        raise CliError(f"--format must be one of {', '.join(CONVERT_FORMATS)}, got {fmt!r}")
    if not os.path.isdir(src):
        raise CliError(f"adapter folder {src!r} does not exist")
    config, tensors, src_fmt = formats.load(src)
    if fmt == "peft" and not isinstance(config, LoraConfig):
        raise CliError(f"--format peft holds plain LoRA adapters only (PEFT has no {config.peft_type}); {src!r} is one")
    if fmt == "moe-peft" and not isinstance(config, MixLoraConfig):
        raise CliError(f"--format moe-peft holds MixLoRA adapters only; {src!r} is a {config.peft_type} adapter")
    save_fmt = "moelora" if fmt == "peft" else fmt  # our LoRA files are PEFT's
    if base is not None:
        from transformers import AutoModelForCausalLM

        from moelora.model import MoeLoraModel

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        MoeLoraModel.from_pretrained(model, src).save_pretrained(dst, format=save_fmt)
        return
    if src_fmt == "moe-peft":
        if config.use_dora and save_fmt == "moelora":
            raise CliError(
                f"{src!r} is a MoE-PEFT DoRA adapter: it stores no DoRA magnitudes, which are recomputed from the "
                "base weights; give --base MODEL"
            )
        tensors = formats.from_moe_peft(tensors, config)
    base_config = _local_base_config(config) if save_fmt == "moe-peft" else None
    if save_fmt == "moe-peft" and config.act_fn is None and base_config is None:
        warnings.warn(
            "moelora: the base model's activation is unknown (no --base, and base_model_name_or_path is not a "
            "local folder): act_fn is not written, and the mixlora package needs it; pass --base MODEL",
            stacklevel=2,
        )
    formats.save(dst, config, tensors, save_fmt, base_config=base_config)


def _local_base_config(config: AdapterConfig) -> Any:
    """The base model's HF config when the adapter names a local folder holding one, else None."""
    path = config.base_model_name_or_path
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


# --- inspect ---------------------------------------------------------------------------------------------


def inspect(directory: str) -> str:
    """A readable summary of the adapter folder `directory`."""
    if not os.path.isdir(directory):
        raise CliError(f"adapter folder {directory!r} does not exist")
    config, tensors, fmt = formats.load(directory)
    if fmt == "moe-peft":
        tensors = formats.from_moe_peft(tensors, config)
        fmt_name = f"moe-peft ({formats.CONFIG_FILE} + {formats.MOE_PEFT_WEIGHTS_FILE})"
    else:
        owner = "PEFT's LoRA" if isinstance(config, LoraConfig) else "moelora"
        fmt_name = f"{owner} ({formats.CONFIG_FILE} + {formats.WEIGHTS_FILE})"
    lines = [f"{directory}: {config.peft_type} adapter, format {fmt_name}", "config:"]
    lines += [f"  {key}: {value}" for key, value in sorted(config.to_dict().items())]
    kinds = Counter()
    for key, t in tensors.items():
        kinds[_kind(key, t)] += t.numel()
    total = sum(kinds.values())
    lines.append(f"parameters: {total:,d} in {len(tensors)} tensors")
    lines += [f"  {kind}: {n:,d}" for kind, n in sorted(kinds.items())]
    lines += _per_layer(config, tensors)
    lines += _backends(config)
    return "\n".join(lines)


def _kind(key: str, t: Tensor) -> str:
    if ".milora_router." in key:
        return "MiLoRA routers"
    if key.endswith(".mlp.router.weight"):
        return "MixLoRA routers"
    if key.endswith("lora_magnitude_vector"):
        return "DoRA magnitudes"
    return "FFN experts (LoRA)" if t.dim() == 3 else "LoRA"


def _rows_per_layer(tensors: dict[str, Tensor], suffix: str) -> dict[int, int]:
    """{layer: dim 0 of its tensor ending in `suffix`}: a router's experts or modules."""
    out = {}
    for key, t in tensors.items():
        m = _LAYER.match(key)
        if m and key.endswith(suffix):
            out[int(m[1])] = t.shape[0]
    return out


def _per_layer(config: AdapterConfig, tensors: dict[str, Tensor]) -> list[str]:
    layers = len({m[1] for key in tensors if (m := _LAYER.match(key))})
    if isinstance(config, MixLoraConfig):
        experts = _rows_per_layer(tensors, ".mlp.router.weight")
        routing = f"top-{config.top_k}" if config.routing_strategy == "mixlora" else f"top-p {config.top_p}"
        what = "experts per layer"
    elif isinstance(config, MiLoraConfig):
        experts = _rows_per_layer(tensors, ".milora_router.weight")
        routing = f"top-{config.top_k}, routed once per prompt"
        what = "LoRA modules (experts) per layer"
    else:
        return [f"layers: {layers}; no experts (plain LoRA on {', '.join(config.target_modules)})"]
    counts = sorted(set(experts.values()))
    if len(counts) == 1:
        return [f"layers: {layers}; {what}: {counts[0]} ({routing})"]
    per = ", ".join(f"{i}: {n}" for i, n in sorted(experts.items()))
    return [f"layers: {layers}; {what} ({routing}): {per}"]


def _backends(config: AdapterConfig) -> list[str]:
    """Which implementation the current backend choice runs for CPU and CUDA tensors, and what falls back."""
    lines = [f"backend (MOELORA_BACKEND / set_backend: {backend.get_backend()}):"]
    for device in ("cpu", "cuda"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto without a fused backend warns once; the line below says it
            try:
                name = backend.backend_name(backend.resolve(torch.device(device)))
            except RuntimeError as e:
                name = f"none: {e}"
        lines.append(f"  {device} tensors: {name}{_fallbacks(config, name)}")
    return lines


def _fallbacks(config: AdapterConfig, name: str) -> str:
    """What of this adapter the fused backend `name` hands to the reference (docs/kernels.md, Fallbacks)."""
    if name not in ("cpu", "triton"):
        return ""
    notes = []
    if isinstance(config, MixLoraConfig):
        act = _activation_name(config)
        if config.use_dora:
            notes.append("DoRA: the FFN runs the reference")
        elif act is None:
            notes.append("the FFN is fused for a SiLU, GELU or ReLU base; other activations run the reference")
        elif act is False:
            notes.append("its activation is not fused: the FFN runs the reference")
        else:
            notes.append(f"fused FFN ({act})")
    if isinstance(config, MiLoraConfig) and name == "cpu":
        notes.append("MiLoRA's prompt_route and segmented_lora run the reference (no C++ MiLoRA ops)")
    notes.append("LoRA deltas are two GEMMs on every backend")
    return " (" + "; ".join(notes) + ")"


def _activation_name(config: MixLoraConfig) -> str | bool | None:
    """The kernels' name of the FFN activation, False if it is not fused, None if unknown (the base decides)."""
    name = config.act_fn
    base = _local_base_config(config) if name is None else None
    if base is not None:  # gemma2's config names it hidden_activation, the other families hidden_act
        name = getattr(base, "hidden_act", None) or getattr(base, "hidden_activation", None)
    if name is None:
        return None
    from transformers.activations import ACT2FN

    from moelora.activations import activation_name

    return activation_name(ACT2FN[name]) or False
