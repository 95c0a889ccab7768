"""Train a MiLoRA adapter (arXiv 2410.18035: one router per layer picks which LoRA modules fire, once per
prompt) on a plain text file, with the Hugging Face Trainer or the paper's alternating schedule.

    python examples/train_milora.py --tiny                       # random tiny llama, CPU, seconds
    python examples/train_milora.py --tiny --bilevel             # LoRAs and routers stepped in turn
    python examples/train_milora.py --model PATH --data train.txt --out my-milora

--tiny builds a small random llama from a config (nothing downloaded) and, without --data, writes a small
text file to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from moelora import MiLoraConfig, MoeLoraModel, get_moelora_model
from moelora.training import bilevel_step, milora_parameter_groups


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
    if len(rows) < 2:
        raise SystemExit(f"the text has {len(ids)} tokens: too few for two rows of --seq-len {length}")
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]


def batches(rows: list[dict[str, torch.Tensor]], size: int, steps: int, seed: int):
    """`steps` random batches of `size` rows, as forward keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(rows), (size,), generator=g).tolist()
        yield {key: torch.stack([rows[i][key] for i in pick]) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint folder (or hub name) of a causal LM")
    parser.add_argument("--tiny", action="store_true", help="a random tiny llama, no download")
    parser.add_argument("--data", help="a UTF-8 text file to train on")
    parser.add_argument("--out", help="where to save the adapter (default: milora-adapter, or a temp dir with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20 with --tiny, else 200)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--bilevel", action="store_true", help="alternate LoRA steps (train rows) and router steps")
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        parser.error("give exactly one of --tiny and --model PATH")

    tmp = Path(tempfile.mkdtemp(prefix="moelora-example-"))
    if args.data is None:
        if not args.tiny:
            parser.error("--data FILE is required with --model")
        args.data = tmp / "train.txt"
        args.data.write_text("pack my box with five dozen liquor jugs. " * 200, encoding="utf-8")
    out = args.out or str(tmp / "milora-adapter" if args.tiny else "milora-adapter")
    steps = args.steps or (20 if args.tiny else 200)

    if args.tiny:
        base, tokenizer, lr = tiny_llama(), None, 5e-3
    else:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        tokenizer, lr = AutoTokenizer.from_pretrained(args.model), args.lr

    # The paper's set-up: r=32 on all 7 projections of each layer, top-3 of them per prompt.
    config = MiLoraConfig(r=8, lora_alpha=16) if args.tiny else MiLoraConfig()
    model = get_moelora_model(base, config)
    model.print_trainable_parameters()
    rows = chunks(token_ids(Path(args.data).read_text(encoding="utf-8"), tokenizer), args.seq_len)

    if args.bilevel:  # first-order DARTS-style: LoRAs on one half of the rows, routers on the other
        split = len(rows) // 2
        lora, routers = milora_parameter_groups(model)
        lora_opt, router_opt = torch.optim.AdamW(lora, lr=lr), torch.optim.AdamW(routers, lr=5 * lr)
        model.train()
        pairs = zip(
            batches(rows[:split], args.batch, steps, 0), batches(rows[split:], args.batch, steps, 1), strict=True
        )
        for step, (train_batch, val_batch) in enumerate(pairs):
            train_loss, val_loss = bilevel_step(model, train_batch, val_batch, lora_opt, router_opt)
            if step % max(1, steps // 5) == 0 or step == steps - 1:
                print(f"step {step}: train loss {train_loss:.3f}, router-side loss {val_loss:.3f}")
    else:  # joint training of LoRAs, routers, pooling and rational activations: an unchanged Trainer
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
        trainer = Trainer(model=model, args=training, train_dataset=rows)  # loss = CE + 0.01 * balance loss
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        print(f"loss: first logged {losses[0]:.3f}, last {losses[-1]:.3f}")

    model.save_pretrained(out)
    print(f"adapter saved to {out}")

    if args.tiny:  # reload onto a fresh copy of the base, generate: routing runs once, at the prefill
        reloaded = MoeLoraModel.from_pretrained(tiny_llama(), out)
        prompt = rows[0]["input_ids"][None, :16]
        text = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
        print("generated:", bytes(text[0, 16:].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
