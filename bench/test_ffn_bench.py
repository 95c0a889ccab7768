"""pytest-benchmark suite of the MixLoRA FFN providers on a tiny shape, with parity as a real test.

CI runs it as `python3 -m pytest -q bench --benchmark-disable -p no:cacheprovider` (each benchmark body
runs once, nothing is timed); `python3 -m pytest bench` times it. Speed is never asserted.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench import cli
from bench.providers import (
    ALL_PROVIDERS,
    MOE_PROVIDERS,
    PROVIDERS,
    Shape,
    grad_targets,
    make_inputs,
    mixlora_pkg_missing,
)
from bench.timing import MODES, check_parity, make_step, measure

CHECKED = [p for p in MOE_PROVIDERS if p != "reference"]


def _skip_if_missing(provider: str) -> None:
    if provider == "mixlora-pkg" and (why := mixlora_pkg_missing()) is not None:
        pytest.skip(why)


@pytest.mark.parametrize("with_grads", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", CHECKED)
def test_parity(provider, with_grads, tiny_inputs):
    _skip_if_missing(provider)
    parity = check_parity(provider, tiny_inputs, with_grads)
    assert parity.ok, parity.summary()
    expected = {"y"} | ({f"d{n}" for n, _ in grad_targets(provider, tiny_inputs)} if with_grads else set())
    assert set(parity.rel_err) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_parity_of_16bit_inputs(dtype):
    inp = make_inputs(Shape(T=9, H=40, I=56, E=4, k=2, r=4), dtype)
    parity = check_parity("loop", inp, with_grads=True)
    assert parity.ok, parity.summary()


def test_parity_catches_a_wrong_provider(tiny_inputs, monkeypatch):
    """The check must fail a provider that drops the down-projection LoRA (a plausible bug)."""
    from bench import providers

    def no_down_lora(inp):
        experts = dict(inp.experts)
        A, B = experts["down_proj"]
        experts["down_proj"] = (A, B * 0)
        return providers.reference_ffn(dataclasses.replace(inp, experts=experts))

    monkeypatch.setitem(providers.PROVIDERS, "loop", lambda inp: lambda: no_down_lora(inp))
    parity = check_parity("loop", tiny_inputs, with_grads=False)
    assert not parity.ok
    assert "FAILED" in parity.summary()


def test_parity_reports_a_crashing_provider(tiny_inputs, monkeypatch):
    from bench import providers

    def crash(inp):
        raise RuntimeError("boom")

    monkeypatch.setitem(providers.PROVIDERS, "loop", crash)
    parity = check_parity("loop", tiny_inputs, with_grads=True)
    assert not parity.ok and "boom" in parity.error


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ALL_PROVIDERS)
def test_latency(benchmark, provider, mode, tiny_inputs):
    _skip_if_missing(provider)
    fn = PROVIDERS[provider](tiny_inputs)
    step = make_step(fn, [t for _, t in grad_targets(provider, tiny_inputs)], tiny_inputs.grad_out, mode)
    out = benchmark(step)
    y = out if mode == "fwd" else out[0]
    assert torch.isfinite(y).all()


def test_measure_reports_median_min_iqr():
    timing = measure(lambda: None, torch.device("cpu"), warmup=1, repeats=5)
    assert timing.repeats == 5 and timing.peak_mem_mib is None
    assert 0 <= timing.min_ms <= timing.median_ms and timing.iqr_ms >= 0


def test_cli_end_to_end(tmp_path, capsys):
    """A tiny custom run: parity, timing, the table, and the saved JSON + markdown."""
    argv = "--T 1,5 --H 24 --I 40 --E 4 --k 2 --r 4 --repeats 2 --warmup 0 --threads 1"
    assert cli.main([*argv.split(), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| T | mode |" in printed and "loop/reference" in printed

    (json_path,) = tmp_path.glob("*.json")
    assert json_path.name.startswith("cpu-") and "-small-custom-" in json_path.name
    assert json_path.with_suffix(".md").read_text() in printed
    report = json.loads(json_path.read_text())
    assert report["threads"] == 1 and report["T"] == [1, 5]
    ran = [p for p in ALL_PROVIDERS if p != "mixlora-pkg" or mixlora_pkg_missing() is None]
    assert report["providers"] == ran
    assert len(report["results"]) == 2 * len(MODES) * len(ran)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in report["results"])
    assert all(p["ok"] for p in report["parity"])
    assert {"T", "mode", "loop/reference", "reference/lora", "reference/base"} <= set(report["ratios"][0])


def test_cli_skips_a_provider_that_fails_parity(tmp_path, monkeypatch, capsys):
    from bench import providers

    monkeypatch.setitem(providers.PROVIDERS, "loop", lambda inp: lambda: providers.base_ffn(inp))
    argv = "--T 3 --H 24 --I 40 --E 4 --k 2 --r 4 --repeats 1 --warmup 0 --providers loop,reference --no-save"
    assert cli.main([*argv.split(), "--out", str(tmp_path)]) == 0
    assert "parity FAILED" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
