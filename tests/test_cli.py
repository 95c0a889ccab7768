"""The command line, run as a user runs it (`python -m moelora`, a subprocess) on tiny saved adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model
from transformers import AutoModelForCausalLM

from moelora import LoraConfig, MiLoraConfig, MixLoraConfig, MoeLoraModel, get_moelora_model

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOELORA_BACKEND": "auto"}
    return subprocess.run(
        [sys.executable, "-m", "moelora", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """A saved tiny base (so adapters name a local base folder) and a MixLoRA, a MiLoRA and a LoRA adapter."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(str(root / "base"))
    for name, config in (
        ("mix", MixLoraConfig(r=4, num_experts=4, top_k=2)),
        ("mi", MiLoraConfig(r=4, top_k=2)),
        ("lora", LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    ):
        pm = get_moelora_model(AutoModelForCausalLM.from_pretrained(str(root / "base")), config)
        randomize_adapters(pm)
        pm.save_pretrained(str(root / name))
    return root


def _logits(root: Path, adapter: str) -> torch.Tensor:
    with torch.no_grad():
        return MoeLoraModel.from_pretrained(tiny_model("llama"), str(root / adapter))(IDS).logits


INSPECTS = [
    pytest.param(
        "mix", ["MIXLORA adapter, format moelora", "experts per layer: 4 (top-2)", "fused FFN (silu)"], id="mix"
    ),
    pytest.param("mi", ["MILORA adapter", "LoRA modules (experts) per layer: 7 (top-2, routed once"], id="milora"),
    pytest.param("lora", ["LORA adapter, format PEFT's LoRA", "no experts (plain LoRA on q_proj, v_proj)"], id="lora"),
]


@pytest.mark.parametrize(("name", "expected"), INSPECTS)
def test_inspect_prints_config_sizes_experts_and_backend(adapters, name, expected):
    proc = _cli("inspect", name, cwd=adapters)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for text in expected:
        assert text in out, out
    config = json.loads((adapters / name / "adapter_config.json").read_text())
    assert f"  r: {config['r']}\n" in out
    assert f"  base_model_name_or_path: {adapters / 'base'}\n" in out  # written from the base's name_or_path
    sizes = MoeLoraModel.from_pretrained(tiny_model("llama"), str(adapters / name)).adapter_state_dict()
    assert f"parameters: {sum(t.numel() for t in sizes.values()):,d} in {len(sizes)} tensors" in out
    assert "  cpu tensors: " in out and "  cuda tensors: " in out


def test_convert_round_trip_through_moe_peft_keeps_the_logits(adapters):
    for args in (("mix", "mix-moe-peft", "--format", "moe-peft"), ("mix-moe-peft", "mix-back", "--format", "moelora")):
        proc = _cli("convert", *args, cwd=adapters)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (adapters / "mix-moe-peft").iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    exported = json.loads((adapters / "mix-moe-peft" / "adapter_config.json").read_text())
    assert exported["act_fn"] == "silu"  # read from the local base folder the adapter names
    assert exported["base_model_name_or_path"] == str(adapters / "base")
    want = _logits(adapters, "mix")
    torch.testing.assert_close(_logits(adapters, "mix-moe-peft"), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(adapters, "mix-back"), want, rtol=0, atol=0)


def test_convert_lora_to_peft_with_the_base_loaded(adapters):
    proc = _cli("convert", "lora", "lora-peft", "--format", "peft", "--base", "base", cwd=adapters)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(_logits(adapters, "lora-peft"), _logits(adapters, "lora"), rtol=0, atol=0)


ERRORS = [
    pytest.param(("inspect", "missing"), "adapter folder 'missing' does not exist", id="inspect-missing-dir"),
    pytest.param(("convert", "missing", "out", "--format", "peft"), "adapter folder 'missing' does not", id="missing"),
    pytest.param(("convert", "mix", "out", "--format", "safetensors"), "--format must be one of", id="unknown-format"),
    pytest.param(("convert", "mi", "out", "--format", "moe-peft"), "holds MixLoRA adapters only", id="milora-moepeft"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS)
def test_bad_input_exits_2_with_one_line(adapters, args, message):
    proc = _cli(*args, cwd=adapters)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moelora: error: ") and message in lines[0], proc.stderr
    assert not (adapters / "out").exists()
