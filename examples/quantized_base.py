"""MixLoRA on a quantised base model (QLoRA-style) through bitsandbytes: the frozen projections stay 4-bit (nf4)
or 8-bit and run as the quantised layers' own forward; the adapters and routers are fp32 and the only
trainable tensors.

    python examples/quantized_base.py --tiny              # a random tiny llama, quantised on load, CPU, seconds
    python examples/quantized_base.py --tiny --bits 8     # the same on an 8-bit (LLM.int8) base
    python examples/quantized_base.py --model PATH        # a local checkpoint: on the GPU if one is visible

Needs `pip install bitsandbytes` (0.50 runs its 4-bit and 8-bit layers on CPU as well as CUDA); with --tiny
and without it, it prints why it skips and exits 0. What is tested on such bases: docs/quantized.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from moelora import MixLoraConfig, backend, get_moelora_model


def tiny_llama_checkpoint() -> str:
    """A random 2-layer llama saved to a temporary folder (from_pretrained is what quantises). Its widths are
    multiples of 64, bitsandbytes' 4-bit block, as in real models."""
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


def quantization(bits: int, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint folder (or hub name) of a causal LM")
    parser.add_argument("--tiny", action="store_true", help="a random tiny llama, no download")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="4 (nf4, default) or 8 (LLM.int8)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("give exactly one of --tiny and --model PATH")
    if importlib.util.find_spec("bitsandbytes") is None:
        print("skipping the quantised-base example: bitsandbytes is not installed (pip install bitsandbytes)")
        sys.exit(0 if args.tiny else 1)

    # On the GPU the quantised layers compute in bf16; on CPU in fp32, which bitsandbytes' CPU path handles best.
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    path = tiny_llama_checkpoint() if args.tiny else args.model
    base = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization(args.bits, dtype), device_map={"": device}, dtype=dtype
    )
    quantized = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in base.modules())
    print(f"{quantized} projections quantised to {args.bits} bits, on {device}")
    model = get_moelora_model(base, MixLoraConfig(lora_dropout=0.0))
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, base.config.vocab_size, (2, 32), device=device)
    model.train()
    for step in range(args.steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.3f}")
    print("ops of the last forward, by backend:", backend.ops_ran())  # the fused one: 'cpu' (C++) or 'triton'
    model.eval()
    out = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    print("generated ids:", out[0, 8:].tolist())


if __name__ == "__main__":
    main()
