"""pytest-benchmark suite of the MiLoRA decoder layer (B sequences from B adapters), parity as a real test."""

from __future__ import annotations

import json

import pytest
import torch

from bench import cli, milora
from bench.conftest import tiny_shape
from bench.suites import MILORA
from bench.timing import check_parity

FAST = "--repeats 1 --warmup 0 --threads 1"


@pytest.fixture(scope="module")
def tiny() -> milora.MiloraInputs:
    return milora.make_inputs(tiny_shape(MILORA))


@pytest.fixture(scope="module")
def want(tiny) -> dict[str, torch.Tensor]:
    return MILORA.outputs("reference", tiny, False)


def _parity(name: str, inp: milora.MiloraInputs, want: dict[str, torch.Tensor]):
    keys = MILORA.parity_keys(name)
    return check_parity(MILORA, name, inp, False, {k: v for k, v in want.items() if k in keys})


@pytest.mark.parametrize("provider", MILORA.checked)
def test_parity(provider, tiny, want):
    parity = _parity(provider, tiny, want)
    assert parity.ok, parity.summary()
    assert set(parity.rel_err) == set(MILORA.parity_keys(provider))


def test_every_output_is_checked_by_someone():
    checked = {k for name in MILORA.checked for k in MILORA.parity_keys(name)}
    assert checked == {*(f"{m} {k}" for m in milora.MODES for k in milora.LAYER_KEYS), "prefill gates"} | {
        "prefill gates (one router)"
    }


def test_inputs_route_top_k_of_seven(tiny):
    s = tiny.shape
    assert tiny.gates.shape == (s.B, 7)
    assert ((tiny.gates > 0).sum(dim=1) == s.k).all()
    # Not every sequence picks the same modules (otherwise the batch would not mix anything).
    assert len({tuple((row > 0).tolist()) for row in tiny.gates}) > 1
    # The adapters' deltas are not negligible: the adapted layer differs from the frozen one.
    base = milora.layer(tiny, tiny.x, milora._no_delta)[0]
    adapted = MILORA.step("reference", tiny, "decode")()[0]
    assert (adapted - base).abs().max() > 1e-3 * base.abs().max()


def test_gates_are_fixed_not_recomputed(tiny, want):
    """milora reads its gates from the cache: other cached gates change its output (per-token routing does not)."""
    flipped = milora.MiloraInputs(**{**vars(tiny), "gates": tiny.gates.flip(0)})
    assert not torch.equal(MILORA.step("milora", flipped, "decode")()[0], want["decode y"])
    # Against its own output: on CPU it runs the cpu backend's segmented_lora, not bitwise the reference's.
    own = MILORA.step("mixlora-style", tiny, "decode")()[0]
    assert torch.equal(MILORA.step("mixlora-style", flipped, "decode")()[0], own)


@pytest.mark.parametrize(
    "provider, wrong",
    [
        ("milora", lambda inp: milora.MiloraInputs(**{**vars(inp), "scaling": inp.scaling * 1.01})),
        ("milora-loop", lambda inp: milora.MiloraInputs(**{**vars(inp), "gates": inp.gates.roll(1, dims=1)})),
        ("mixlora-style", lambda inp: milora.MiloraInputs(**{**vars(inp), "router": inp.router.flip(1)})),
        ("router", lambda inp: milora.MiloraInputs(**{**vars(inp), "pool_weight": -inp.pool_weight})),
    ],
)
def test_parity_catches_a_wrong_provider(provider, wrong, tiny, want, monkeypatch):
    """A provider fed wrong numbers (a real bug would do the same) fails parity."""
    factories = dict(milora.PROVIDERS[provider])
    monkeypatch.setitem(
        milora.PROVIDERS,
        provider,
        {mode: (None if f is None else (lambda inp, f=f: f(wrong(inp)))) for mode, f in factories.items()},
    )
    parity = _parity(provider, tiny, want)
    assert not parity.ok, parity.summary()


def test_a_provider_that_raises_fails_parity(tiny, want, monkeypatch):
    def broken(inp):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(milora.PROVIDERS, "milora", {"decode": broken, "prefill": broken})
    parity = _parity("milora", tiny, want)
    assert not parity.ok and "kernel exploded" in parity.error


def test_cli_reports_a_wrong_provider_failing_and_never_times_it(tmp_path, monkeypatch, capsys):
    def skewed(inp):
        return lambda: tuple(t * 1.01 for t in milora.base_decode(inp)())

    monkeypatch.setitem(milora.PROVIDERS, "mixlora-style", {"decode": skewed, "prefill": None})
    assert cli.main([*f"--suite milora --preset tiny --batch 3 {FAST}".split(), "--out", str(tmp_path)]) == 0
    assert "parity FAILED" in capsys.readouterr().out
    (path,) = tmp_path.glob("*.json")
    assert "-milora-tiny-" in path.name
    entry = json.loads(path.read_text())["milora"]
    rows = {(r["mode"], r["provider"]): r for r in entry["results"]}
    assert rows["decode", "mixlora-style"]["status"] == "parity FAILED"
    assert "median_ms" not in rows["decode", "mixlora-style"]
    assert rows["decode", "milora"]["status"] == "ok"
    assert ("prefill", "mixlora-style") not in rows and ("decode", "router") not in rows  # modes they lack
    (ratios,) = [r for r in entry["ratios"] if r["mode"] == "decode"]
    assert ratios["mixlora-style/milora"] is None and ratios["milora/base"] > 0


def test_cli_end_to_end(tmp_path, capsys):
    argv = f"--suite milora --preset tiny --batch 1,2 --KV 48 --seq 3 --lora-dtype model --dtype bf16 {FAST}"
    assert cli.main([*argv.split(), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| B | mode | base | reference | milora |" in printed and "mixlora-style/milora" in printed
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    entry = report["milora"]
    assert entry["label"] == "tiny-custom" and entry["B"] == [1, 2]
    assert entry["shape"] | {"KV": 48, "S": 3, "lora_dtype": "model"} == entry["shape"]
    assert all(p["ok"] for p in entry["parity"])  # parity in fp32 whatever --dtype
    assert all(r["status"] == "ok" for r in entry["results"])
    assert {(r["mode"], r["provider"]) for r in entry["results"] if r["B"] == 1} == {
        (m, p) for p in MILORA.providers for m in milora.MODES if MILORA.runs(p, m)
    }
    assert any("segmented_lora runs" in n for n in entry["notes"])


def test_cuda_graphs_only_for_decode_on_cuda():
    shape, cuda = tiny_shape(MILORA), torch.device("cuda")
    assert MILORA.cuda_graph("milora", shape, "decode", cuda)
    assert not MILORA.cuda_graph("milora", shape, "prefill", cuda)
    assert not MILORA.cuda_graph("milora-loop", shape, "decode", cuda)
    assert not MILORA.cuda_graph("milora", shape, "decode", torch.device("cpu"))


@pytest.mark.parametrize("mode", milora.MODES)
@pytest.mark.parametrize("provider", MILORA.providers)
def test_latency(benchmark, provider, mode, tiny):
    if not MILORA.runs(provider, mode):
        pytest.skip(f"{provider} has no {mode} mode")
    out = benchmark(MILORA.step(provider, tiny, mode))
    assert all(torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))
