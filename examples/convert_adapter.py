"""Convert an adapter between moelora's format and MoE-PEFT / mixlora's, and use plain LoRA adapters with PEFT.

    python examples/convert_adapter.py --tiny        # round trips on a random tiny llama, CPU, seconds
    python examples/convert_adapter.py --model PATH SRC_DIR DST_DIR --to moe-peft
    python examples/convert_adapter.py --model PATH SRC_DIR DST_DIR --to moelora

Formats (docs/formats.md): moelora writes adapter_config.json + adapter_model.safetensors; MoE-PEFT and the
mixlora package read and write adapter_config.json + adapter_model.bin (MixLoRA adapters only). A plain LoRA
adapter (LoraConfig) is always written in PEFT's own format, so PEFT loads it and moelora loads PEFT's.
Loading reads either format (told apart by its files); converting is loading onto the base model and saving.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moelora import LoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model


def tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer llama (vocab 128): the same weights on every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config)


def convert(base: torch.nn.Module, src: str, dst: str, to: str) -> None:
    """Load the adapter in `src` (either format) onto `base`, save it to `dst` in format `to`."""
    MoeLoraModel.from_pretrained(base, src).save_pretrained(dst, format=to)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def tiny_demo(folder: Path) -> None:
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    # 1. MixLoRA: moelora -> MoE-PEFT -> moelora, the same logits at each step.
    model = get_moelora_model(tiny_llama(), MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2))
    for key, p in model.adapter_state_dict().items():  # a trained adapter's B is non-zero
        if "lora_B" in key:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    want = logits(model, ids)
    model.save_pretrained(folder / "ours")
    convert(tiny_llama(), folder / "ours", folder / "moe-peft", "moe-peft")
    convert(tiny_llama(), folder / "moe-peft", folder / "back", "moelora")
    for name in ("ours", "moe-peft", "back"):
        files = sorted(p.name for p in (folder / name).iterdir())
        err = (logits(MoeLoraModel.from_pretrained(tiny_llama(), folder / name), ids) - want).abs().max().item()
        print(f"MixLoRA {name:9s} {files}  max |logit diff| {err:.1e}")
        if err > 1e-5:
            raise SystemExit(f"{name}: the converted adapter changed the logits")

    # 2. Plain LoRA: written in PEFT's format; PEFT itself loads it (when installed).
    lora = get_moelora_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for key, p in lora.adapter_state_dict().items():
        if "lora_B" in key:
            torch.nn.init.normal_(p, std=0.5)
    lora.eval()
    lora.save_pretrained(folder / "lora")
    try:
        from peft import PeftModel
    except ImportError:
        print("peft is not installed: skipping the PEFT check (pip install peft)")
        return
    err = (logits(PeftModel.from_pretrained(tiny_llama(), folder / "lora"), ids) - logits(lora, ids)).abs().max()
    print(f"LoRA adapter loaded by PEFT: max |logit diff| {err.item():.1e}")
    if err > 1e-5:
        raise SystemExit("PEFT's logits differ from moelora's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the base model the adapter was trained on (local folder or hub name)")
    parser.add_argument("--tiny", action="store_true", help="round trips on a random tiny llama, no download")
    parser.add_argument("src", nargs="?", help="adapter folder to read (either format)")
    parser.add_argument("dst", nargs="?", help="adapter folder to write")
    parser.add_argument("--to", choices=["moelora", "moe-peft"], default="moelora")
    args = parser.parse_args()
    if args.tiny:
        tiny_demo(Path(tempfile.mkdtemp(prefix="moelora-example-")))
        return
    if not (args.model and args.src and args.dst):
        parser.error("give --tiny, or --model PATH SRC_DIR DST_DIR")
    convert(AutoModelForCausalLM.from_pretrained(args.model, dtype="auto"), args.src, args.dst, args.to)
    print(f"{args.src} -> {args.dst} ({args.to})")


if __name__ == "__main__":
    main()
