"""The e2e suite on its tiny preset (every provider, every mode, one repeat; the opt-in mixed batches too), its
parity check against perturbed providers, the GPU presets' construction on the meta device, and the bench-wide
busy-machine warnings and results folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import pytest
import torch

from bench import cli, e2e
from bench.conftest import skip_if_missing, tiny_shape
from bench.suites import E2E
from bench.timing import SPREAD_LIMIT, busy_warnings, check_parity

FAST = "--repeats 1 --warmup 0 --threads 1"
CPU = torch.device("cpu")


def _run(tmp_path, argv: str) -> dict:
    assert cli.main([*argv.split(), "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    return json.loads(json_path.read_text())


def _ran(providers: tuple[str, ...] = E2E.default_providers) -> list[str]:
    return [p for p in providers if E2E.missing(p, CPU) is None]


@pytest.fixture
def tiny_e2e_inputs() -> e2e.ModelInputs:
    return e2e.make_inputs(tiny_shape(E2E))


def test_every_provider_and_mode_end_to_end(tmp_path, capsys):
    report = _run(tmp_path, f"--suite e2e --preset tiny {FAST}")
    printed = capsys.readouterr().out
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.name == f"{report['device']}-e2e-tiny-{report['date']}.json"
    assert json_path.with_suffix(".md").read_text() in printed
    assert report["suites"] == ["e2e"] and report["warnings"] == report["e2e"]["warnings"]
    entry = report["e2e"]
    ran = _ran()
    assert {"base", "peft-lora", "moelora-mixlora-reference", "moelora-milora-reference"} <= set(ran)
    assert not set(ran) & set(e2e.MIXED)  # the mixed batches are opt-in
    assert entry["providers"] == ran and entry["modes"] == list(e2e.MODES) and entry["B"] == [2]
    assert len(entry["results"]) == len(ran) * len(e2e.MODES)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["repeats"] == 1 for r in entry["results"])
    shape = tiny_shape(E2E)
    for r in entry["results"]:
        want = {"train": shape.B * shape.S, "generate": shape.B * shape.N}.get(r["mode"])
        assert ("tokens_per_s" in r) == (want is not None)
        if want is not None:
            assert r["tokens_per_s"] == pytest.approx(want / (r["median_ms"] / 1e3))
    # Every provider but base is parity-checked, on the keys it has, and passes.
    assert [p["provider"] for p in entry["parity"]] == [p for p in ran if p != "base"]
    assert all(p["ok"] and set(p["rel_err"]) == set(e2e.parity_keys(p["provider"])) for p in entry["parity"])
    assert set(entry["load_average_1min"]) == {"before", "after"} and isinstance(entry["warnings"], list)
    # Ratios against PEFT's LoRA, one column per other provider, in the JSON and the table.
    ratios = [f"{p}/peft-lora" for p in ran if p != "peft-lora"]
    assert list(entry["ratio_meaning"]) == ratios
    assert all(row[r] > 0 for row in entry["ratios"] for r in ratios)
    header = "| B | mode | " + " | ".join(ran) + " | " + " | ".join(ratios) + " |"
    assert header in printed and "Throughput, tokens per second" in printed


def _parity(provider: str, inp: e2e.ModelInputs):
    """As the runner checks: the reference's outputs on the keys `provider` is compared on, and its own
    reference (a mixed batch's sequences run alone)."""
    keys = E2E.parity_keys(provider)
    want = {k: v for k, v in E2E.outputs("reference", inp, False).items() if k in keys} if keys else {}
    return check_parity(E2E, provider, inp, False, want | E2E.own_reference(provider, inp))


@pytest.mark.parametrize(
    ("provider", "zero_b", "key"),
    [
        ("peft-lora", True, "base"),  # a B that is not zero: no longer the base's logits
        ("mixlora-pkg", False, "mixlora"),
        ("moelora-mixlora-cpu", False, "mixlora"),
        ("moelora-milora-cpu", False, "milora"),
        ("peft-lora-mixed8", True, "base"),
        ("moelora-mix-mixed8-cpu", True, "base"),
    ],
    ids=[
        "peft-lora-nonzero-B",
        "mixlora-pkg-scaled-B",
        "moelora-mixlora-cpu-scaled-B",
        "moelora-milora-cpu-scaled-B",
        "peft-lora-mixed8-nonzero-B",
        "moelora-mix-mixed8-cpu-nonzero-B",
    ],
)
def test_parity_fails_for_a_perturbed_provider(monkeypatch, tiny_e2e_inputs, provider, zero_b, key):
    skip_if_missing(E2E, provider)
    assert _parity(provider, tiny_e2e_inputs).ok
    build, perturb_at = e2e.build, zero_b

    def perturbed(name, inp, zero_b=False, layers=None):
        model = build(name, inp, zero_b=zero_b, layers=layers)
        if name == provider and zero_b == perturb_at:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(p * 1.5 if p.any() else torch.full_like(p, 0.05))
        return model

    monkeypatch.setattr(e2e, "build", perturbed)
    parity = _parity(provider, tiny_e2e_inputs)
    assert not parity.ok and parity.rel_err[key] > parity.allowed[key], parity.summary()


def _mixed_run(tmp_path, n: int) -> dict:
    # PEFT's single LoRA for the ratios; every mode, so that train shows as not run for the mixed batches.
    return _run(tmp_path, f"--suite e2e --preset tiny --providers peft-lora,*-mixed{n},*-mixed{n}-* {FAST}")["e2e"]


@pytest.mark.parametrize("n", e2e.MIXED_SIZES, ids=[f"mixed{n}" for n in e2e.MIXED_SIZES])
def test_mixed_batches_end_to_end(tmp_path, capsys, n):
    entry = _mixed_run(tmp_path, n)
    mixed = _ran(tuple(p for p in e2e.MIXED if e2e.mixed_size(p) == n))
    assert f"peft-lora-mixed{n}" in mixed and f"moelora-mix-mixed{n}-reference" in mixed
    assert entry["providers"] == ["peft-lora", *mixed]
    rows = {(r["mode"], r["provider"]): r for r in entry["results"]}
    # A mixed batch runs generate and ttft, never train (adapter_names is for inference).
    assert set(rows) == {(m, "peft-lora") for m in e2e.MODES} | {(m, p) for m in ("generate", "ttft") for p in mixed}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows.values())
    shape = tiny_shape(E2E)
    for p in mixed:  # n sequences of N new tokens, whatever the row's B
        r = rows["generate", p]
        assert r["tokens_per_s"] == pytest.approx(n * shape.N / (r["median_ms"] / 1e3)) and n != shape.B
    # Parity first, on the batch's own oracle: B = 0 gives the base's logits, each row equals itself alone.
    assert [p["provider"] for p in entry["parity"]] == ["peft-lora", *mixed]
    assert all(p["ok"] for p in entry["parity"])
    assert all(set(p["rel_err"]) == {"base", "alone"} for p in entry["parity"][1:])
    # Ratios: every mixed batch against PEFT's one LoRA, moelora's also against PEFT's mixed batch.
    against_mixed = [f"{p}/peft-lora-mixed{n}" for p in mixed if p.startswith("moelora-")]
    assert list(entry["ratio_meaning"]) == [f"{p}/peft-lora" for p in mixed] + against_mixed
    for row in entry["ratios"]:
        values = [row[r] for r in entry["ratio_meaning"]]
        assert all(v is None for v in values) if row["mode"] == "train" else all(v > 0 for v in values)
    header = "| B | mode | peft-lora | " + " | ".join(mixed) + " | "
    assert header in capsys.readouterr().out


@pytest.mark.parametrize(
    "provider",
    ["peft-lora-mixed8", "moelora-milora-mixed8-cpu", "moelora-mixlora-mixed8-reference", "moelora-mix-mixed8-cpu"],
)
def test_parity_fails_when_a_sequence_runs_its_neighbours_adapter(monkeypatch, tiny_e2e_inputs, provider):
    """The `alone` check catches a mixed batch that pairs sequences with the wrong adapters."""
    skip_if_missing(E2E, provider)
    assert _parity(provider, tiny_e2e_inputs).ok
    build = e2e.build

    def rolled(name, inp, zero_b=False, layers=None):
        model = build(name, inp, zero_b=zero_b, layers=layers)
        forward = model.forward

        def shifted(*args, adapter_names=None, **kwargs):
            if adapter_names is not None:  # only the mixed batch: the sequences run alone use set_adapter
                kwargs["adapter_names"] = adapter_names[1:] + adapter_names[:1]
            return forward(*args, **kwargs)

        model.forward = shifted
        return model

    monkeypatch.setattr(e2e, "build", rolled)
    parity = _parity(provider, tiny_e2e_inputs)
    assert not parity.ok and parity.rel_err["alone"] > parity.allowed["alone"], parity.summary()
    assert parity.rel_err["base"] <= parity.allowed["base"]  # with B = 0 every adapter is the base


@pytest.mark.parametrize(
    ("name", "n", "kind", "backend"),
    [
        ("peft-lora-mixed8", 8, None, None),
        ("moelora-milora-mixed32-cpu", 32, "milora", "cpu"),
        ("moelora-mix-mixed8-triton", 8, "mix", "triton"),
        ("moelora-lora-mixed32-reference", 32, "lora", "reference"),
        ("moelora-mixlora-cpu", None, "mixlora", "cpu"),
        ("peft-lora", None, None, None),
    ],
    ids=["peft-mixed8", "milora-mixed32-cpu", "mix-mixed8-triton", "lora-mixed32-reference", "mixlora-cpu", "peft"],
)
def test_provider_names_parse(name, n, kind, backend):
    assert (e2e.mixed_size(name), e2e.family(name), e2e.backend_of(name)) == (n, kind, backend)
    assert name in E2E.providers and (name in e2e.MIXED) == (n is not None)
    shape = tiny_shape(E2E)
    want_b = n if n is not None else shape.B  # a mixed batch runs n sequences, the others the row's B
    assert e2e.run_shape(name, shape) == dataclasses.replace(shape, B=want_b)
    assert E2E.runs(name, "train") == (n is None) and E2E.runs(name, "generate") and E2E.runs(name, "ttft")


def test_every_mixed_name_is_one_kind_size_and_backend():
    want = {f"peft-lora-mixed{n}" for n in (8, 32)}
    want |= {
        f"moelora-{k}-mixed{n}-{b}" for k in ("milora", "mixlora", "lora", "mix") for n in (8, 32) for b in e2e.BACKENDS
    }
    assert set(e2e.MIXED) == want and len(e2e.MIXED) == len(want)
    assert E2E.providers == (*E2E.default_providers, *e2e.MIXED) and set(E2E.checked) == set(E2E.providers) - {"base"}


@pytest.mark.parametrize(
    ("ops", "named"),
    [((), None), (("no_such_op",), "no_such_op"), (("mixlora_ffn", "no_such_op"), "no_such_op")],
    ids=["none-asked", "one-lacking", "one-of-two-lacking"],
)
def test_the_cpu_note_names_the_milora_ops_the_backend_lacks(monkeypatch, ops, named):
    skip_if_missing(E2E, "moelora-milora-cpu")
    monkeypatch.setattr(e2e, "MILORA_OPS", ops)
    notes = E2E.device_notes(CPU)
    assert notes == [] if named is None else len(notes) == 1 and f"no {named} op" in notes[0]
    assert E2E.device_notes(torch.device("meta")) == []


def test_a_mixed_batch_has_no_train_mode(tiny_e2e_inputs):
    with pytest.raises(ValueError, match=r"provider 'peft-lora-mixed8' has no 'train' mode"):
        e2e.step("peft-lora-mixed8", tiny_e2e_inputs, "train")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("peft-lora", ("peft-lora",)),
        ("moelora-*-mixed8-cpu", tuple(f"moelora-{k}-mixed8-cpu" for k in ("milora", "mixlora", "lora", "mix"))),
        ("peft-lora*", ("peft-lora", "peft-lora-mixed8", "peft-lora-mixed32")),
        ("peft-lora-mixed8,peft-lora*", ("peft-lora-mixed8", "peft-lora", "peft-lora-mixed32")),
    ],
    ids=["a-name", "a-pattern", "a-prefix-pattern", "names-kept-once-in-order"],
)
def test_providers_take_shell_patterns(text, expected):
    assert cli.parse_args(["--providers", text]).providers == expected


def test_an_unknown_provider_pattern_names_it(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--providers", "peft-lora,moelora-*-mixed9-*"])
    assert "unknown ['moelora-*-mixed9-*']" in capsys.readouterr().err


def test_random_adapters_move_the_logits(tiny_e2e_inputs):
    """The mixlora / milora keys would pass trivially if the random adapters changed nothing."""
    want = e2e.outputs("reference", tiny_e2e_inputs)
    for key in ("mixlora", "milora"):
        assert (want[key] - want["base"]).abs().max() > 1e-3 * want["base"].abs().max(), key


def test_a_failing_provider_is_never_timed(tmp_path, monkeypatch):
    skip_if_missing(E2E, "mixlora-pkg")

    def outputs(name, inp, with_grads=False):
        out = e2e.outputs(name, inp, with_grads)
        return {k: v * 1.01 for k, v in out.items()} if name == "mixlora-pkg" else out

    monkeypatch.setattr(E2E, "outputs", outputs)
    report = _run(
        tmp_path, f"--suite e2e --preset tiny --layers 1 --modes ttft --providers peft-lora,mixlora-pkg {FAST}"
    )
    entry = report["e2e"]
    assert entry["shape"]["L"] == 1 and entry["label"] == "tiny-custom"
    rows = {r["provider"]: r for r in entry["results"]}
    assert rows["mixlora-pkg"]["status"] == "parity FAILED" and "median_ms" not in rows["mixlora-pkg"]
    assert rows["peft-lora"]["status"] == "ok"
    assert [p["ok"] for p in entry["parity"]] == [True, False]


@pytest.mark.parametrize("preset", ["llama2-7b", "llama3-8b"])
def test_gpu_presets_construct_on_meta(preset):
    """Every provider builds the whole model at the preset's shape (meta tensors: no memory, no numbers)."""
    shape = E2E.shape(E2E.presets[preset].cases[0], E2E.presets[preset].dims)
    built = dict(e2e.dry_run(shape))
    assert set(built) == {p for p in e2e.PROVIDERS if p not in ("peft-lora", "mixlora-pkg")} | {
        p for p in ("peft-lora", "mixlora-pkg") if E2E.missing(p, CPU) is None
    }
    trainable = {name: sum(p.numel() for p in e2e.trainable(m)) for name, m in built.items()}
    assert trainable["base"] == 0 and trainable["moelora-mixlora-reference"] > trainable["moelora-milora-reference"]
    if "mixlora-pkg" in built:  # the package and moelora hold the same MixLoRA adapter
        assert trainable["mixlora-pkg"] == trainable["moelora-mixlora-reference"]
    if "peft-lora" in built:  # r=16 on the seven projections of 32 layers: 40.0M (llama2-7b), 41.9M (llama3-8b)
        h, i, kv = shape.H, shape.I, shape.H // shape.heads * shape.kv_heads
        per_layer = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        assert trainable["peft-lora"] == shape.L * per_layer
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in built["base"].parameters())
    assert built["base"].config.num_hidden_layers == 32


def test_mixed_batches_construct_on_meta_at_a_gpu_shape():
    """llama3-8b's shape (GQA) cut to 2 layers: every tenant gets its own adapter of its kind, so the mixed
    models hold n single adapters' worth of tensors (a mix: 3 MiLoRA, 3 MixLoRA, 2 LoRA at n = 8)."""
    preset = E2E.presets["llama3-8b"]
    shape = dataclasses.replace(E2E.shape(preset.cases[0], preset.dims), L=2)
    names = ("base", "moelora-milora-reference", "moelora-mixlora-reference", "moelora-mix-mixed8-reference")
    names += ("moelora-lora-mixed8-cpu", "peft-lora", "peft-lora-mixed8")
    built = dict(e2e.dry_run(shape, names=names))
    base = sum(p.numel() for p in built["base"].parameters())
    adapter = {name: sum(p.numel() for p in m.parameters()) - base for name, m in built.items()}
    h, i, kv = shape.H, shape.I, shape.H // shape.heads * shape.kv_heads
    one_lora = shape.L * 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # r=16 on the seven projections
    assert adapter["moelora-lora-mixed8-cpu"] == 8 * one_lora
    milora, mixlora = adapter["moelora-milora-reference"], adapter["moelora-mixlora-reference"]
    assert adapter["moelora-mix-mixed8-reference"] == 3 * milora + 3 * mixlora + 2 * one_lora
    if "peft-lora" in built:
        assert adapter["peft-lora"] == one_lora and adapter["peft-lora-mixed8"] == 8 * one_lora
    assert all(p.device.type == "meta" for p in built["moelora-mix-mixed8-reference"].parameters())


def test_a_shape_the_heads_do_not_divide_names_the_flag():
    with pytest.raises(ValueError, match=r"H=100 must be a multiple .*heads=8 \(--H\)"):
        e2e.E2eShape(B=1, S=4, P=4, N=1, H=100, I=64, L=1, heads=8, kv_heads=8, V=32)


def _row(provider: str, median: float, iqr: float, repeats: int = 5) -> dict:
    return {"B": 8, "mode": "train", "provider": provider, "status": "ok", "median_ms": median, "iqr_ms": iqr} | {
        "repeats": repeats
    }


@pytest.mark.parametrize(
    ("load_before", "load_after", "rows", "expected"),
    [
        (0.5, 1.9, [_row("a", 100.0, 9.0)], []),
        (2.5, 1.0, [_row("a", 100.0, 1.0)], ["load average 2.50 before"]),
        (0.1, 3.0, [_row("a", 100.0, 1.0)], ["load average 3.00 after"]),
        (None, None, [_row("a", 100.0, 11.0), _row("b", 10.0, 0.5)], ["IQR over 10% of the median in 1 of 2 cases"]),
        (0.0, 0.0, [_row("a", 100.0, 50.0, repeats=1), {"status": "parity FAILED", "provider": "b"}], []),
        (4.0, 4.0, [_row("a", 100.0, 20.0)], ["load average 4.00 before, 4.00 after", "B=8 train a 20%"]),
    ],
    ids=["quiet", "busy-before", "busy-after", "wide-spread", "one-repeat-or-untimed", "busy-and-wide"],
)
def test_busy_warnings(load_before, load_after, rows, expected):
    warnings = busy_warnings("e2e", "B", rows, 2, load_before, load_after)
    assert len(warnings) == len(expected)
    for line, part in zip(warnings, expected, strict=True):
        assert part in line and line.startswith("e2e: ")
    assert SPREAD_LIMIT == 0.10


def test_a_busy_machine_is_warned_and_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_average", lambda: 64.0)
    report = _run(tmp_path, "--preset tiny --T 2 --providers reference --modes fwd --repeats 2 --warmup 0 --threads 1")
    # (a spread warning may come too: two repeats of a tiny op on a shared machine)
    (warning,) = [w for w in report["ffn"]["warnings"] if "load average" in w]
    assert "64.00 before, 64.00 after" in warning and warning in report["warnings"]
    assert report["ffn"]["load_average_1min"] == {"before": 64.0, "after": 64.0}
    printed = capsys.readouterr().out
    assert f"WARNING: {warning}" in printed
    assert "interquartile range" in printed and "%]" in printed  # the spread beside the median


def test_results_go_to_the_gitignored_folder_by_default(tmp_path, monkeypatch):
    assert cli.parse_args([]).out == cli.OUT_DIR == cli.BENCH_DIR / "out" != cli.RESULTS_DIR
    monkeypatch.setattr(cli, "OUT_DIR", tmp_path / "out")
    argv = "--preset tiny --T 2 --providers reference --modes fwd --repeats 1 --threads 1"
    assert cli.main(argv.split()) == 0  # no --out
    assert len(list((tmp_path / "out").glob("*.json"))) == 1
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the .gitignore rule is not checked")
    done = subprocess.run(
        ["git", "check-ignore", "-q", "out/any.json"], cwd=cli.BENCH_DIR, capture_output=True, timeout=30
    )
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 0, "bench/out/ must be gitignored"
