"""Serve several adapters (MixLoRA, MiLoRA, plain PEFT LoRA) on one base model, one adapter per sequence,
in ONE batched generate() call: `model.generate(..., adapter_names=[...])`.

    python examples/serve_many.py --tiny      # random tiny llama and three random adapters, CPU, seconds
    python examples/serve_many.py --model PATH --adapter a=DIR_A --adapter b=DIR_B \\
        --prompt a="Translate to French: cheese" --prompt b="Write a haiku about rain"

Each sequence's tokens equal those of running it alone with its adapter; --tiny checks that.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from moelora import LoraConfig, MiLoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model


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


def make_tiny_adapters(folder: Path) -> dict[str, str]:
    """Three adapters with random non-zero B (a fresh adapter has B = 0 and equals the base), saved."""
    configs = {
        "mixlora": MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2),
        "milora": MiLoraConfig(r=8, lora_alpha=16, top_k=3),
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),  # PEFT's files
    }
    dirs = {}
    for seed, (name, config) in enumerate(configs.items()):
        model = get_moelora_model(tiny_llama(), config)
        torch.manual_seed(seed)
        for key, p in model.adapter_state_dict().items():
            if "lora_B" in key:
                torch.nn.init.normal_(p, std=0.5)
        dirs[name] = str(folder / name)
        model.save_pretrained(dirs[name])
    return dirs


def pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep:
            raise SystemExit(f"{flag} takes NAME=VALUE, got {v!r}")
        out[name] = rest
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint folder (or hub name) of a causal LM")
    parser.add_argument("--tiny", action="store_true", help="a random tiny llama and random adapters, no download")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR, repeatable")
    parser.add_argument("--prompt", action="append", default=[], help="ADAPTER_NAME=TEXT, repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("give exactly one of --tiny and --model PATH")

    if args.tiny:
        adapters = make_tiny_adapters(Path(tempfile.mkdtemp(prefix="moelora-example-")))
        base, tokenizer = tiny_llama(), None
        names = list(adapters) * 2  # six sequences, two per adapter
        torch.manual_seed(1)
        input_ids = torch.randint(3, 128, (len(names), 10))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :4] = 0  # left padding: a shorter prompt
    else:
        adapters, prompts = pairs(args.adapter, "--adapter"), pairs(args.prompt, "--prompt")
        if not adapters or not prompts:
            parser.error("give at least one --adapter NAME=DIR and one --prompt NAME=TEXT")
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto", device_map="auto")
        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        names = list(prompts)
        batch = tokenizer(list(prompts.values()), return_tensors="pt", padding=True).to(base.device)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]

    first, *rest = adapters
    model = MoeLoraModel.from_pretrained(base, adapters[first], adapter_name=first)  # eval mode
    for name in rest:
        model.load_adapter(adapters[name], name)

    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, adapter_names=names, **gen)
    new = out[:, input_ids.shape[1] :]
    for i, name in enumerate(names):
        text = new[i].tolist() if tokenizer is None else tokenizer.decode(new[i], skip_special_tokens=True)
        print(f"[{name}] {text}")

    if args.tiny:  # each row against the same prompt run alone with its adapter
        for i, name in enumerate(names):
            model.set_adapter(name)
            keep = attention_mask[i].bool()
            with torch.no_grad():
                alone = model.generate(input_ids[i : i + 1, keep], **gen)[:, keep.sum() :]
            if not torch.equal(alone[0], new[i]):
                raise SystemExit(f"row {i} ({name}) differs from running it alone")
        print(f"all {len(names)} rows equal their adapter run alone")


if __name__ == "__main__":
    main()
