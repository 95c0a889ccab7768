"""MixLoRA on a 4-bit base model (QLoRA-style) through bitsandbytes: the frozen projections run as the
quantised layers' own forward, the adapters and routers stay fp32.

    python examples/quantized_base.py --tiny      # a random tiny llama, quantised on load (CUDA + bitsandbytes)
    python examples/quantized_base.py --model PATH

Needs `pip install bitsandbytes` and a CUDA GPU. With --tiny on a machine without them it prints why it
skips and exits 0. Not covered by moelora's tests (no GPU in CI): report what breaks.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from moelora import MixLoraConfig, get_moelora_model


def tiny_llama_checkpoint() -> str:
    """A random 2-layer llama saved to a temporary folder (from_pretrained is what quantises)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    folder = tempfile.mkdtemp(prefix="moelora-example-")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint folder (or hub name) of a causal LM")
    parser.add_argument("--tiny", action="store_true", help="a random tiny llama, no download")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("give exactly one of --tiny and --model PATH")

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        print(f"skipping the 4-bit example: {'; '.join(missing)}")
        sys.exit(0 if args.tiny else 1)

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    path = tiny_llama_checkpoint() if args.tiny else args.model
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": 0})
    model = get_moelora_model(base, MixLoraConfig(lora_dropout=0.0))
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, 128, (2, 32), device="cuda")
    model.train()
    for step in range(args.steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    out = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    print("generated ids:", out[0, 8:].tolist())


if __name__ == "__main__":
    main()
