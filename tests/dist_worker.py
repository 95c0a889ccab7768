"""One rank of the 2-process gloo jobs of tests/test_distributed.py, and the model and data both sides share.

Run as `python tests/dist_worker.py BACKEND OUT_DIR` with RANK, WORLD_SIZE and INIT_METHOD in the
environment (tests/test_distributed.py starts two of them). Each rank takes its half of the global batch
and runs one forward + backward of a fresh model under each engine (DDP, DDP with find_unused_parameters,
FSDP2 `fully_shard`), and saves its loss and the full (unsharded) gradient of every adapter parameter, or
the traceback of the engine's failure, to OUT_DIR/{engine}-rank{rank}.pt. The parent compares them with
single-process gradients of the same model.

Each rank backpropagates the model's own `outputs.loss` on its half: cross-entropy (mean over the half's
label tokens) + router_aux_loss_coef * aux (over the half's tokens), as a plain training loop or
accelerate does. DDP and FSDP average the gradients over ranks, so a step's gradient is the gradient of
the MEAN OF THE PER-RANK LOSSES. That is not the gradient of the loss of the whole batch in one process:
the aux loss (a product of two means over tokens) is not linear in the batch, and neither is a CE
averaged per half when the halves hold different numbers of label tokens.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import VOCAB, randomize_adapters, tiny_model

import moelora
from moelora import MiLoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model

WORLD_SIZE = 2
ENGINES = ("ddp", "ddp-find-unused", "fsdp2")
# A large coefficient so that the aux loss's share of the gradient is far above the comparison tolerance.
AUX_COEF = 0.5


def build_model(seed: int = 0, aux_coef: float = AUX_COEF, method: str | None = None) -> MoeLoraModel:
    """Tiny MixLoRA llama (E=4, k=2, r=4, no dropout), or MiLoRA (r=4, top-3 of 7; method="milora", or
    DIST_METHOD=milora in the environment), with random non-zero adapters, in train mode."""
    method = method or os.environ.get("DIST_METHOD", "mixlora")
    if method == "milora":
        config = MiLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, router_aux_loss_coef=aux_coef)
    else:
        config = MixLoraConfig(
            r=4, lora_alpha=8, num_experts=4, top_k=2, lora_dropout=0.0, router_aux_loss_coef=aux_coef
        )
    model = get_moelora_model(tiny_model("llama", seed=seed), config)
    randomize_adapters(model, seed=seed + 1)
    return model.train()


def global_batch(padded: bool = True) -> dict[str, torch.Tensor]:
    """4 sequences of 12 tokens; if `padded`, rows 1 and 2 are left-padded: the halves hold different token counts."""
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, :5] = 0
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shard(batch: dict[str, torch.Tensor], rank: int, world_size: int = WORLD_SIZE) -> dict[str, torch.Tensor]:
    """Rank `rank`'s contiguous slice of the global batch (what a DistributedSampler without shuffling gives)."""
    n = batch["input_ids"].shape[0] // world_size
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def adapter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full gradients of the trainable parameters by name (FSDP2's sharded DTensor grads gathered)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{name} has no gradient"
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1)] = g.detach().clone()
    return out


def _run_ddp(batch: dict[str, torch.Tensor], find_unused_parameters: bool = False) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = build_model()
    # find_unused_parameters=True is what transformers.Trainer asks for on a model that is not a PreTrainedModel;
    # DDP then flattens and rebuilds the output through pytree.
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
    out = ddp(**batch)
    out.loss.backward()
    return {"loss": out.loss.detach(), "aux": out.aux_loss.detach(), "grads": adapter_grads(model)}


def _run_fsdp2(batch: dict[str, torch.Tensor]) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for layer in model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out = model(**batch)
    out.loss.backward()
    return {"loss": out.loss.detach(), "aux": out.aux_loss.detach(), "grads": adapter_grads(model)}


RUNNERS = {
    "ddp": _run_ddp,
    "ddp-find-unused": lambda batch: _run_ddp(batch, find_unused_parameters=True),
    "fsdp2": _run_fsdp2,
}


def main(backend: str, out_dir: str) -> None:
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=os.environ["INIT_METHOD"], rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        moelora.set_backend(backend)
        batch = shard(global_batch(), rank, world_size)
        for engine in ENGINES:
            try:
                result = RUNNERS[engine](batch)
            except Exception:  # reported per engine by the parent; the next engine still runs
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{engine}-rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # not sys.exit: a hung gloo thread must not keep the process alive
    # Results are on disk: skip interpreter teardown, where a gloo thread still joinable at exit aborted a
    # rank with "terminate called without an active exception" (SIGABRT) in one CI dry run of 3.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
