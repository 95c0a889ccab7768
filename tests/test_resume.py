"""Nothing lost: an interrupted training run resumes from its checkpoint and ends bit for bit where an
uninterrupted run ends; a failed save into a directory that holds an adapter leaves that adapter intact.

Bitwise, not a tolerance: a resumed run repeats exactly the operations of the uninterrupted one on the
same values (adapter, router, AdamW moments and step count, scheduler, torch's RNG for dropout and
jitter noise, data order), on one process with a fixed thread count, so any difference at all means
some state was not saved or not restored.

Runs are interrupted by an exception raised inside the step after the checkpoint, as a crash would.
"""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from conftest import VOCAB, tiny_model
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import moelora
from moelora import MixLoraConfig, MoeLoraModel, formats, get_moelora_model

STEPS, CHECKPOINT_AT = 6, 3


def _cpu_built() -> bool:
    try:
        import moelora.cpu_backend  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_built(), reason="no moelora._C"))]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these ops are tiny, and on a shared 2-core machine OpenMP's waiting for a busy
    second core made them 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CrashError(Exception):
    pass


def _config() -> MixLoraConfig:
    # Dropout and jitter noise, so that the RNG state is part of what must be restored.
    return MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, lora_dropout=0.1, jitter_noise=0.05)


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, VOCAB, (4, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _loop(model: MoeLoraModel, optimizer, scheduler, start: int, stop: int, ckpt: str | None, crash_at: int | None):
    """Plain training loop over steps [start, stop); checkpoints after step CHECKPOINT_AT when ckpt is set."""
    model.train()
    for step in range(start, stop):
        if step == crash_at:
            raise CrashError(f"crash in step {step + 1}")
        optimizer.zero_grad()
        model(**_batch(step)).loss.backward()
        optimizer.step()
        scheduler.step()
        if ckpt is not None and step + 1 == CHECKPOINT_AT:
            model.save_pretrained(ckpt)
            torch.save(
                {
                    "step": step + 1,
                    "names": [n for n, _ in _trainable(model)],
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                },
                os.path.join(ckpt, "training_state.pt"),
            )


def _optimizer(model: torch.nn.Module):
    optimizer = torch.optim.AdamW([p for _, p in _trainable(model)], lr=1e-2, weight_decay=0.01)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (2 * STEPS))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_loop_resumes_bitwise(backend, tmp_path):
    with moelora.set_backend(backend):
        torch.manual_seed(0)
        model = get_moelora_model(tiny_model("llama", seed=0), _config())
        optimizer, scheduler = _optimizer(model)
        _loop(model, optimizer, scheduler, 0, STEPS, None, None)
        want = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}

        # The interrupted run: same start, a checkpoint after step 3, a crash in step 4.
        torch.manual_seed(0)
        model = get_moelora_model(tiny_model("llama", seed=0), _config())
        optimizer, scheduler = _optimizer(model)
        ckpt = str(tmp_path / "ckpt")
        with pytest.raises(CrashError):
            _loop(model, optimizer, scheduler, 0, STEPS, ckpt, crash_at=CHECKPOINT_AT)
        del model, optimizer, scheduler

        # A new process would do this: the base model, the adapter from disk, the training state.
        torch.manual_seed(12345)  # whatever the RNG holds now is overwritten below
        model = MoeLoraModel.from_pretrained(tiny_model("llama", seed=0), ckpt, is_trainable=True)
        state = torch.load(os.path.join(ckpt, "training_state.pt"), weights_only=True)
        assert state["names"] == [n for n, _ in _trainable(model)], "parameter order differs after loading"
        optimizer, scheduler = _optimizer(model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        _loop(model, optimizer, scheduler, state["step"], STEPS, None, None)
        got = model.adapter_state_dict()

    assert sorted(got) == sorted(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} adapter tensors differ after resuming, e.g. {differ[:3]}"
    assert any(k.endswith("router.weight") for k in want)  # the routers are part of what is compared


def test_plain_loop_resume_notices_a_lost_rng_state(tmp_path):
    """The check above can fail: resuming without restoring the RNG (dropout masks differ) is not bitwise."""
    torch.manual_seed(0)
    model = get_moelora_model(tiny_model("llama", seed=0), _config())
    optimizer, scheduler = _optimizer(model)
    _loop(model, optimizer, scheduler, 0, STEPS, str(tmp_path / "ckpt"), None)
    want = model.adapter_state_dict()
    model = MoeLoraModel.from_pretrained(tiny_model("llama", seed=0), str(tmp_path / "ckpt"), is_trainable=True)
    state = torch.load(tmp_path / "ckpt" / "training_state.pt", weights_only=True)
    optimizer, scheduler = _optimizer(model)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.manual_seed(999)
    _loop(model, optimizer, scheduler, state["step"], STEPS, None, None)
    assert any(not torch.equal(v, want[k]) for k, v in model.adapter_state_dict().items())


class Rows(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(3, VOCAB, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


class CrashAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise CrashError(f"crash in step {self.step + 1}")


def _trainer(out: str, callbacks=()) -> Trainer:
    torch.manual_seed(0)
    model = get_moelora_model(tiny_model("llama", seed=0), _config())
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=CHECKPOINT_AT,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=Rows(64), callbacks=list(callbacks))


@pytest.mark.parametrize(
    "backend", [pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_built(), reason="no moelora._C"))]
)
def test_trainer_resumes_from_checkpoint_bitwise(backend, tmp_path):
    """transformers.Trainer's own checkpoints (save_steps): the full state dict (it does not know our
    save_pretrained), optimizer, scheduler, RNG state and the data position. One backend: ~10 s a run."""
    with moelora.set_backend(backend):
        full = _trainer(str(tmp_path / "full"))
        full.train()
        want = full.model.adapter_state_dict()

        crashed = _trainer(str(tmp_path / "crashed"), [CrashAfter(CHECKPOINT_AT)])
        with pytest.raises(CrashError):
            crashed.train()
        checkpoint = tmp_path / "crashed" / f"checkpoint-{CHECKPOINT_AT}"
        saved = sorted(os.listdir(checkpoint))
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(saved), saved
        assert any(name.startswith("rng_state") for name in saved), saved

        resumed = _trainer(str(tmp_path / "crashed"))
        resumed.train(resume_from_checkpoint=str(checkpoint))
        got = resumed.model.adapter_state_dict()

    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (full, resumed)]
    assert losses[1] == losses[0][CHECKPOINT_AT:] or losses[1] == losses[0], losses
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} adapter tensors differ after resuming, e.g. {differ[:3]}"


# --------------------------------------------------------------------------------------- atomic saves


def _partial(real_bytes: bytes, path: str) -> None:
    with open(path, "wb") as f:
        f.write(real_bytes[: len(real_bytes) // 2])
    raise OSError(28, "No space left on device (simulated)")


def _fail_safetensors(data, path, metadata=None):
    _partial(safetensors_bytes(data, metadata=metadata), path)


def _fail_torch_save(obj, path, *args, **kwargs):
    buf = io.BytesIO()
    torch.serialization.save(obj, buf)
    _partial(buf.getvalue(), path)


def _fail_json(path, obj):
    _partial(json.dumps(obj, indent=2, sort_keys=True).encode(), path)


FAILURES = {
    ("moelora", "weights"): (formats, "save_file", _fail_safetensors),
    ("moe-peft", "weights"): (formats.torch, "save", _fail_torch_save),
    ("moelora", "config"): (formats, "_write_json", _fail_json),
    ("moe-peft", "config"): (formats, "_write_json", _fail_json),
}


def _snapshot(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize(("fmt", "failing"), [pytest.param(*k, id=f"{k[0]}-{k[1]}-write-fails") for k in FAILURES])
def test_failed_save_leaves_the_old_adapter_intact(fmt, failing, tmp_path, monkeypatch):
    """A save that fails half-way through writing a file (disk full) over an existing adapter: the old files
    are byte-for-byte intact, they still load, and no temporary file is left behind."""
    torch.manual_seed(0)
    model = get_moelora_model(tiny_model("llama", seed=0), _config())
    directory = tmp_path / "adapter"
    model.save_pretrained(str(directory), format=fmt)
    before = _snapshot(directory)
    old = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}

    with torch.no_grad():  # a different adapter, with a different config, is saved over it
        for _, p in _trainable(model):
            p.add_(1.0)
    model.peft_config["default"].router_aux_loss_coef = 0.5
    target, name, failing_write = FAILURES[(fmt, failing)]
    monkeypatch.setattr(target, name, failing_write)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(str(directory), format=fmt)
    monkeypatch.undo()

    after = _snapshot(directory)
    assert sorted(after) == sorted(before), f"files now {sorted(after)}, before {sorted(before)} (a temporary left?)"
    changed = [n for n in before if after[n] != before[n]]
    assert not changed, f"the failed save changed {changed}: the directory no longer holds the old adapter"
    loaded = MoeLoraModel.from_pretrained(tiny_model("llama", seed=0), str(directory))
    assert all(torch.equal(v, old[k]) for k, v in loaded.adapter_state_dict().items())
    assert loaded.peft_config["default"].router_aux_loss_coef == _config().router_aux_loss_coef


def test_failed_save_into_a_new_directory_leaves_no_file(tmp_path, monkeypatch):
    model = get_moelora_model(tiny_model("llama", seed=0), _config())
    monkeypatch.setattr(formats, "save_file", _fail_safetensors)
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(str(tmp_path / "new"))
    assert os.listdir(tmp_path / "new") == []
