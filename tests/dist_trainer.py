"""One rank of `accelerate launch --multi_gpu --num_processes 2 tests/dist_trainer.py OUT_DIR FIND_UNUSED`.

An unchanged transformers.Trainer trains the tiny MixLoRA llama of tests/dist_worker.py for a few steps on
2 CPU processes (accelerate's torchrun launcher; gloo DDP, as the Trainer sets up with use_cpu=True).
Each rank saves to OUT_DIR/rank{rank}.pt: the inputs of its first optimizer step, the gradients that
step applied (after DDP's averaging, before the update), the logged losses and its final adapter
tensors; rank 0 also writes the adapter with save_pretrained to OUT_DIR/adapter. FIND_UNUSED is
"default" (the Trainer's own choice) or "off" (ddp_find_unused_parameters=False). The backend is the
parent's MOELORA_BACKEND. tests/test_distributed.py also calls `train` in-process (gradient accumulation).
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_worker import build_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

STEPS = 3
BATCH_PER_RANK = 2
SEQ = 12


class Rows(Dataset):
    """Random token rows of one length, no padding: every micro-batch holds the same number of label tokens."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(3, 64, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class RecordingTrainer(Trainer):
    """Trainer that remembers the inputs of every training forward (its behaviour is unchanged)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen_inputs: list[dict[str, torch.Tensor]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.seen_inputs.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


class FirstStepGrads(TrainerCallback):
    """The gradients the optimizer is about to apply in step 1 (averaged over ranks by DDP already)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(out_dir: str, grad_accum: int = 1, find_unused: str = "default", steps: int = STEPS) -> dict:
    """Train build_model() with the Trainer; returns what one rank saves (see the module docstring)."""
    model = build_model()
    extra = {} if find_unused == "default" else {"ddp_find_unused_parameters": False}
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=BATCH_PER_RANK,
        gradient_accumulation_steps=grad_accum,
        max_steps=steps,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # no clipping: the step-1 gradients are compared unscaled
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
        **extra,
    )
    grads = FirstStepGrads()
    n_rows = steps * BATCH_PER_RANK * grad_accum * args.world_size
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Rows(n_rows), callbacks=[grads])
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(os.path.join(out_dir, "adapter"))
    return {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "inputs": trainer.seen_inputs[:grad_accum],
        "grads": grads.grads,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "adapter": {k: v.detach().clone() for k, v in model.adapter_state_dict().items()},
    }


def main(out_dir: str, find_unused: str) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    result = train(out_dir, find_unused=find_unused)
    torch.save(result, os.path.join(out_dir, f"rank{result['rank']}.pt"))


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Results are on disk: skip interpreter teardown, where a gloo thread still joinable at exit aborted a
    # rank with "terminate called without an active exception" (SIGABRT) in one CI dry run of 3.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
