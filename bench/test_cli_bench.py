"""The CLI end to end on tiny shapes: parity, timing, the tables, the saved JSON / markdown / PNG, --memory."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from bench import cli, memory, suites
from bench.plot import plot
from bench.providers import ALL_PROVIDERS, Shape
from bench.suites import FFN, SUITES
from bench.timing import MODES

FAST = "--repeats 1 --warmup 0 --threads 1"


def _run(tmp_path, argv: str) -> dict:
    assert cli.main([*argv.split(), "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    return json.loads(json_path.read_text())


def test_ffn_end_to_end(tmp_path, capsys):
    """A tiny custom FFN run: parity, timing, the table, and the saved JSON + markdown (+ PNG)."""
    report = _run(tmp_path, "--T 1,5 --H 24 --I 40 --E 4 --k 2 --r 4 --repeats 2 --warmup 0 --threads 1")
    printed = capsys.readouterr().out
    assert "| T | mode |" in printed and "loop/reference" in printed

    (json_path,) = tmp_path.glob("*.json")
    assert json_path.name.startswith("cpu-") and "-small-custom-" in json_path.name
    assert "-ffn-" not in json_path.name  # the ffn suite alone keeps the name it always had
    assert json_path.with_suffix(".md").read_text() in printed
    assert json_path.with_suffix(".png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert report["suites"] == ["ffn"] and report["threads"] == 1
    entry = report["ffn"]
    assert entry["T"] == [1, 5] and entry["label"] == "small-custom"
    ran = [p for p in ALL_PROVIDERS if FFN.missing(p, torch.device("cpu")) is None]
    assert entry["providers"] == ran
    assert len(entry["results"]) == 2 * len(MODES) * len(ran)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in entry["results"])
    assert all(p["ok"] for p in entry["parity"])
    assert {"T", "mode", "loop/reference", "reference/lora", "reference/base"} <= set(entry["ratios"][0])
    if "fused" in ran:
        assert {"fused/lora", "loop/fused"} <= set(entry["ratios"][0])


def test_every_suite_on_its_tiny_preset(tmp_path):
    report = _run(tmp_path, f"--suite all --preset tiny {FAST}")
    assert report["suites"] == list(SUITES) and report["label"] == "tiny"
    assert next(tmp_path.glob("*.json")).name.split("-all-tiny-")[0] == report["device"]
    for name in SUITES:
        entry = report[name]
        assert entry["results"] and all(r["status"] == "ok" for r in entry["results"]), name
        assert all(p["ok"] for p in entry["parity"]), name
    assert all("tokens_per_s" in r for r in report["model"]["results"] if r["mode"] == "generate")


def test_a_provider_that_fails_parity_is_never_timed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(suites.providers.PROVIDERS, "loop", lambda inp: lambda: suites.providers.base_ffn(inp))
    argv = f"--preset tiny --T 3 --providers loop,reference --no-save {FAST}"
    assert cli.main([*argv.split(), "--out", str(tmp_path)]) == 0
    assert "parity FAILED" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_a_wrong_fused_model_is_failed_and_never_timed(tmp_path, monkeypatch):
    """The model suite's parity (fused vs reference) runs first; here fused is faked, and wrong."""
    from bench import model

    def outputs(name, inp, with_grads):
        out = model.outputs("reference", inp, with_grads)
        return out | {"logits": out["logits"] * 1.01} if name == "fused" else out

    monkeypatch.setattr(suites, "fused_missing", lambda device: None)
    monkeypatch.setattr(suites.MODEL, "outputs", outputs, raising=False)
    report = _run(tmp_path, f"--suite model --preset tiny --batch 1 {FAST}")
    fused = [r for r in report["model"]["results"] if r["provider"] == "fused"]
    assert fused and all(r["status"] == "parity FAILED" and "median_ms" not in r for r in fused)
    assert not report["model"]["parity"][0]["ok"]


def test_a_missing_fused_backend_is_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suites, "fused_missing", lambda device: "fused skipped: not built here")
    report = _run(tmp_path, f"--suite ffn,route --preset tiny --T 2 {FAST}")
    assert "fused skipped: not built here" in capsys.readouterr().out
    for name in ("ffn", "route"):
        assert "fused" not in report[name]["providers"]
        assert not any("fused" in ratio for ratio in report[name]["ratio_meaning"])


def test_parity_runs_in_fp32_for_a_bf16_run(tmp_path):
    report = _run(tmp_path, f"--suite ffn,moe_lora --preset tiny --dtype bf16 --providers loop,reference {FAST}")
    assert report["dtype"] == "bfloat16" and report["label"] == "tiny-custom"
    assert all(p["ok"] for name in ("ffn", "moe_lora") for p in report[name]["parity"])


def test_top_p_routing(tmp_path):
    report = _run(tmp_path, f"--suite route --preset tiny --top-p 0.6 {FAST}")
    assert report["route"]["shape"]["top_p"] == 0.6 and report["route"]["label"] == "tiny-custom"
    assert all(p["ok"] for p in report["route"]["parity"])


def test_a_preset_no_selected_suite_has_is_an_error():
    with pytest.raises(SystemExit, match="no preset issue2"):
        cli.main(["--suite", "model", "--preset", "issue2", "--no-save"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_memory_probe(tmp_path):
    """--memory: one probe in a forked child; the number is the RSS rise over its set-up, so >= 0."""
    report = _run(tmp_path, f"--preset tiny --T 5 --providers reference --modes fwd+bwd --memory {FAST}")
    (row,) = report["ffn"]["results"]
    assert row["peak_mem_mib"] >= 0 and "VmHWM" in report["memory"]
    shape = Shape(T=5, H=48, I=80, E=4, k=2, r=6)
    with pytest.raises(RuntimeError, match="KeyError"):
        memory.probe("ffn", shape, "no-such-provider", "fwd", "float32", threads=1)


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "matplotlib is not installed" in plot({}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
