"""Train a MixLoRA adapter with an unchanged Hugging Face Trainer on a plain text file.

    python examples/train_mixlora.py --tiny                      # random tiny llama, CPU, seconds
    python examples/train_mixlora.py --model PATH --data train.txt --out my-mixlora

--tiny builds a small random llama from a config (nothing downloaded) and, without --data, writes a small
text file to a temporary folder. The adapter is saved in moelora's format (PEFT's file names); add
--moe-peft to save it in MoE-PEFT / mixlora's format instead.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from moelora import MixLoraConfig, MoeLoraModel, get_moelora_model


def tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer llama over bytes (vocab 256): the same weights on every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config)


def token_ids(text: str, tokenizer) -> list[int]:
    return list(text.encode("utf-8")) if tokenizer is None else tokenizer(text)["input_ids"]


def chunks(ids: list[int], length: int) -> list[dict[str, torch.Tensor]]:
    """The token stream cut into [length] rows, each its own label (the model shifts the labels)."""
    rows = [torch.tensor(ids[i : i + length]) for i in range(0, len(ids) - length + 1, length)]
    if not rows:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --seq-len {length}")
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint folder (or hub name) of a causal LM")
    parser.add_argument("--tiny", action="store_true", help="a random tiny llama, no download")
    parser.add_argument("--data", help="a UTF-8 text file to train on")
    parser.add_argument("--out", help="where to save the adapter (default: mixlora-adapter, or a temp dir with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20 with --tiny, else 200)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--moe-peft", action="store_true", help="save in MoE-PEFT / mixlora's format")
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("give exactly one of --tiny and --model PATH")

    tmp = Path(tempfile.mkdtemp(prefix="moelora-example-"))
    if args.data is None:
        if not args.tiny:
            parser.error("--data FILE is required with --model")
        args.data = tmp / "train.txt"
        args.data.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    out = args.out or str(tmp / "mixlora-adapter" if args.tiny else "mixlora-adapter")
    steps = args.steps or (20 if args.tiny else 200)

    if args.tiny:
        base, tokenizer, lr = tiny_llama(), None, 5e-3
    else:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        tokenizer, lr = AutoTokenizer.from_pretrained(args.model), args.lr

    # MoE-PEFT's defaults are E=8 experts, top-2, r=16; the tiny model takes smaller ones.
    config = MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2) if args.tiny else MixLoraConfig()
    model = get_moelora_model(base, config)  # in place: base frozen, adapters trainable, outputs unchanged (B = 0)
    model.print_trainable_parameters()

    data = chunks(token_ids(Path(args.data).read_text(encoding="utf-8"), tokenizer), args.seq_len)
    training = TrainingArguments(
        output_dir=str(tmp / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        learning_rate=lr,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=data)  # loss = CE + 0.001 * load-balance loss
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"loss: first logged {losses[0]:.3f}, last {losses[-1]:.3f}")

    model.save_pretrained(out, format="moe-peft" if args.moe_peft else "moelora")
    print(f"adapter saved to {out}")

    if args.tiny:  # reload onto a fresh copy of the base: the same logits
        reloaded = MoeLoraModel.from_pretrained(tiny_llama(), out)
        model.eval()
        x = data[0]["input_ids"][None]
        with torch.no_grad():
            same = torch.allclose(model(x).logits, reloaded(x).logits, atol=1e-5)
        print("reloaded adapter gives the same logits:", same)
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
