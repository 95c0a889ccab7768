"""pytest-benchmark suite of the MixLoRA FFN providers on a tiny shape, with parity as a real test.

CI runs the bench tests as `python3 -m pytest -q bench --benchmark-disable -p no:cacheprovider` (each
benchmark body runs once, nothing is timed); `python3 -m pytest bench` times them. Speed is never asserted.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import providers
from bench.conftest import TINY, skip_if_missing
from bench.fused import fused_missing
from bench.providers import ALL_PROVIDERS, Shape
from bench.suites import FFN, GRAPH_MAX_T
from bench.timing import MODES, Timing, check_parity, measure, measure_round_robin


@pytest.mark.parametrize("with_grads", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", FFN.checked)
def test_parity(provider, with_grads, tiny_inputs):
    skip_if_missing(FFN, provider)
    parity = check_parity(FFN, provider, tiny_inputs, with_grads)
    assert parity.ok, parity.summary()
    expected = {"y"} | ({f"d{n}" for n, _ in providers.grad_targets(provider, tiny_inputs)} if with_grads else set())
    assert set(parity.rel_err) == expected


def test_parity_catches_a_wrong_provider(tiny_inputs, monkeypatch):
    """The check must fail a provider that drops the down-projection LoRA (a plausible bug)."""

    def no_down_lora(inp):
        experts = dict(inp.experts)
        A, B = experts["down_proj"]
        experts["down_proj"] = (A, B * 0)
        return providers.reference_ffn(dataclasses.replace(inp, experts=experts))

    monkeypatch.setitem(providers.PROVIDERS, "loop", lambda inp: lambda: no_down_lora(inp))
    parity = check_parity(FFN, "loop", tiny_inputs, with_grads=False)
    assert not parity.ok
    assert "FAILED" in parity.summary()


def test_parity_reports_a_crashing_provider(tiny_inputs, monkeypatch):
    def crash(inp):
        raise RuntimeError("boom")

    monkeypatch.setitem(providers.PROVIDERS, "loop", crash)
    parity = check_parity(FFN, "loop", tiny_inputs, with_grads=True)
    assert not parity.ok and "boom" in parity.error


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ALL_PROVIDERS)
def test_latency(benchmark, provider, mode, tiny_inputs):
    skip_if_missing(FFN, provider)
    out = benchmark(FFN.step(provider, tiny_inputs, mode))
    y = out if mode == "fwd" else out[0]
    assert torch.isfinite(y).all()


def test_measure_reports_median_min_iqr():
    timing = measure(lambda: None, torch.device("cpu"), warmup=1, repeats=5)
    assert timing.repeats == 5 and timing.peak_mem_mib is None and not timing.cuda_graph
    assert 0 <= timing.min_ms <= timing.median_ms and timing.iqr_ms >= 0


def test_round_robin_runs_every_provider_once_per_round_and_drops_one_that_raises():
    calls: list[str] = []

    def provider(name: str, fails_at: int | None = None):
        def step() -> None:
            calls.append(name)
            if fails_at is not None and calls.count(name) == fails_at:
                raise RuntimeError("out of memory")

        return step

    got = measure_round_robin({"a": provider("a"), "b": provider("b", fails_at=3), "c": provider("c")}, 1, 3)
    assert calls == ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "c"]  # warm-up, then rounds; b out at its 3rd
    assert isinstance(got["a"], Timing) and got["a"].repeats == 3 and got["c"].repeats == 3
    assert got["b"] == "error: RuntimeError: out of memory"


def test_fused_missing_says_why():
    """Tensors the fused backend cannot take (here: on the meta device) give a skip note, not an exception."""
    why = fused_missing(torch.device("meta"))
    assert why is not None and why.startswith("fused skipped:")


def test_cuda_graphs_only_for_decode_sized_sync_free_forwards():
    cuda, small, big = torch.device("cuda"), dataclasses.replace(TINY, T=GRAPH_MAX_T), dataclasses.replace(TINY, T=65)
    assert FFN.cuda_graph("fused", small, "fwd", cuda) and FFN.cuda_graph("base", small, "fwd", cuda)
    assert not FFN.cuda_graph("fused", big, "fwd", cuda)
    assert not FFN.cuda_graph("fused", small, "fwd+bwd", cuda)
    assert not FFN.cuda_graph("reference", small, "fwd", cuda)  # its expert sizes are a host sync
    assert not FFN.cuda_graph("fused", small, "fwd", torch.device("cpu"))


def test_shape_label():
    assert Shape(T=1, H=2, I=3, E=4, k=5, r=6).label() == "T1-H2-I3-E4-k5-r6"
