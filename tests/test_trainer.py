"""An unchanged transformers.Trainer trains a tiny MixLoRA llama on a synthetic multi-task set."""

from __future__ import annotations

import torch
from conftest import tiny_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from moelora import MixLoraConfig, get_moelora_model
from moelora.layers import MixLoraFFN

TASKS = {3: lambda xs: xs, 4: lambda xs: xs[::-1], 5: lambda xs: [x + 1 for x in xs]}  # copy, reverse, +1


class MultiTask(Dataset):
    """[task, x1..x5, SEP, f(x)1..f(x)5]: three tasks told apart by their first token."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            task = 3 + i % 3
            xs = torch.randint(10, 40, (5,), generator=g).tolist()
            self.rows.append(torch.tensor([task, *xs, 6, *TASKS[task](xs)]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.rows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_trainer_trains_loss_falls_and_no_expert_starves(tmp_path):
    torch.manual_seed(0)
    config = MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2, lora_dropout=0.0, router_aux_loss_coef=0.1)
    pm = get_moelora_model(
        tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16, initializer_range=0.3), config
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=40,
        learning_rate=1e-2,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    data = MultiTask(640)
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print("logged losses:", [round(v, 3) for v in losses])
    assert len(losses) == 8
    assert losses[-1] < 0.75 * losses[0]

    # Expert use after training, on held-out rows: no expert of any layer gets less than a fifth of its
    # uniform share of slots.
    pm.eval()
    held_out = torch.stack([MultiTask(96, seed=1)[i]["input_ids"] for i in range(96)])
    log = []
    ffns = [m for m in pm.modules() if isinstance(m, MixLoraFFN)]
    for m in ffns:
        m.router_log = log
    with torch.no_grad():
        pm.model(held_out)  # the HF model itself: the wrapper would install its own router log
    for m in ffns:
        m.router_log = None
    assert len(log) == 2
    for layer, (_, indices) in enumerate(log):
        share = torch.bincount(indices.reshape(-1), minlength=4).float() / indices.numel()
        print(f"layer {layer} expert share:", [round(v, 3) for v in share.tolist()])
        assert share.min() > 0.2 * (1 / 4), f"layer {layer}: an expert is starved: {share.tolist()}"
