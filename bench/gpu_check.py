"""Everything issue 3 asks of a GPU, in one call: `python -m bench.gpu_check` (about 2-5 minutes on an H200).

1. Parity of the Triton ops (route, moe_lora (dense-masked, and sorted at the last shape), moe_lora_sorted at
   every shape, mixlora_ffn and routed_mixlora_ffn (route_shrink + the FFN), each in the fused FFN's dense and
   sorted regimes, and MiLoRA's prompt_route and segmented_lora)
   against moelora.reference in bf16, fp16 and fp32,
   forward and every gradient, with the tests' rule: the kernel's error against an fp64 reference may be
   at most twice PyTorch's own error at that dtype plus 4 ulps (of the largest value).
2. Races: the forward (and the backward) of each op repeated, bitwise equal every time. `configs`: every
   GPU tile of the autotuned kernels (route_shrink, both fused-FFN regimes' three, moe_lora's shrink, expand
   and wgrad) forced in turn and checked as in 1 (parity sees only the pinned tiles; the timings whichever
   wins).
3. Timings (triton.testing.do_bench, medians, L2 flushed) of one MixLoRA FFN at the issue's goal shape
   (H=4096, I=11008, E=8, k=2, r=16; T=8192 and T=32; bf16), forward and forward+backward, for
   `triton` (routed_mixlora_ffn: route_shrink + the fused FFN, as MixLoraFFN runs it), `triton-apart` (route,
   then mixlora_ffn), `triton-dense` and `triton-sorted` (routed, the fused FFN's regime forced), `lora` (the
   frozen FFN with one dense LoRA on gate/up/down), `loop` (the per-expert loop of mixlora / MoE-PEFT) and
   `base` (the frozen FFN alone), with the ratios the issue's goals name;
   the bandwidth of the one-read-of-x kernels (route; the gate+up shrink; route_shrink) against a copy; and
   moe_lora's two regimes at T = 256, 2048, 8192, E = 8..64, r=16 (where the dense-masked one stops paying); and the
   fused FFN's two regimes at T = 256, 1024, 2048 (`crossover`: where ffn_regime should switch).
Writes bench/results/gpu-check-<device>-<date>.json and .md (the device named) and prints the markdown.
Sections: --only ffn,crossover,bandwidth,regimes,parity,races,configs (all by default); --dtypes for parity and races;
--tag names the files of a partial run, --merge joins runs into one report (bench/gpu_session.sh does this:
timings alone on the GPU, parity per dtype in parallel processes). The JSON is rewritten after every section
and, in the timings, after every provider; an op or provider that raises is recorded with its error.
MiLoRA's decode-step goals (issue 4) are the milora bench suite's:
`python -m bench --suite milora --preset llama2-7b --dtype bf16` (run it in the same GPU session).

The parity checks of 1 and 2 (`parity`, `races`, `config_parity`) live in bench/parity.py, which tests import.

`--dry-run` runs the same code on CPU tensors under TRITON_INTERPRET=1 with tiny shapes, fp32/fp16 and
wall-clock timing, so CI proves the script works before a GPU session spends its minutes on it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.parity import DTYPES, _describe, _ffn_regime, _log, _tb, config_parity, parity, races
from bench.providers import PROVIDERS, FfnInputs, Shape, grad_targets, make_inputs
from moelora import reference
from moelora.reference import ExpertLora, FFNSpec

GOAL = dict(H=4096, I=11008, E=8, k=2, r=16)
GOAL_T = (8192, 32)
BANDWIDTH_T = (4096, 8192)
REGIME_E = (8, 16, 32, 64)  # moe_lora at r=16: 128, 256, 512 and 1024 rank columns
# Token counts of the moe_lora regime timings: the first run (T=8192 only) had the sorted regime 1.5x faster
# at E=16, where the backend keeps the dense one; where it stops being faster decides the switch.
REGIME_T = (256, 2048, 8192)
# (T, H, I, E, k, r): odd sizes, edge cases of k, and one medium shape with several blocks on every axis
PARITY_SHAPES = [
    (1, 64, 176, 8, 2, 16),
    (63, 200, 344, 16, 16, 8),
    (1000, 512, 1376, 8, 2, 16),
    (517, 256, 704, 4, 1, 32),
    (777, 256, 704, 64, 2, 16),  # E*r = 1024: the backend's moe_lora takes the sorted regime
]
DRY_PARITY_SHAPES = [(7, 20, 40, 4, 2, 8), (9, 20, 40, 16, 3, 32)]  # the second: E*r = 512, moe_lora sorted
DRY_TIMING = dict(H=24, I=40, E=4, k=2, r=8)
CROSSOVER_T = (256, 1024, 2048)  # between GOAL_T's two: where the fused FFN's sorted regime starts to pay
SECTIONS = ("ffn", "crossover", "bandwidth", "regimes", "parity", "races", "configs")
CONFIGS_SHAPE = (1000, 512, 1376, 8, 2, 16)  # several blocks of every tile size on every axis


# --------------------------------------------------------------------------------------------- timings


def _triton_ffn(inp: FfnInputs, fused_router: bool = True) -> Callable[[], Tensor]:
    """The triton backend's MixLoRA FFN as MixLoraFFN runs it (gate and up from the base): routed_mixlora_ffn
    (the router fused into the gate/up shrink); with fused_router=False, route then mixlora_ffn."""
    tb = _tb()
    loras = {p: ExpertLora(*inp.experts[p]) for p in ("gate_proj", "up_proj", "down_proj")}
    ffn = FFNSpec(
        gate_lora=loras["gate_proj"],
        up_lora=loras["up_proj"],
        down_lora=loras["down_proj"],
        down_proj=inp.down_proj,
        act=F.silu,
        scaling=inp.scaling,
    )

    def run() -> Tensor:
        x = inp.x
        gate, up = inp.gate_proj(x), inp.up_proj(x)
        if fused_router:
            return tb.routed_mixlora_ffn(x, inp.router, gate, up, ffn, top_k=inp.top_k, top_p=None)[0]
        routing = tb.route(x, inp.router, top_k=inp.top_k)
        return tb.mixlora_ffn(x, gate, up, routing.weights, routing.indices, ffn)

    return run


def _bench(step: Callable[[], object], device: torch.device, dry: bool) -> float:
    """Median milliseconds: triton.testing.do_bench on a GPU (it flushes L2), wall clock under --dry-run."""
    if dry:
        step()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import triton.testing

    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def _ffn_providers() -> dict[str, Callable[[FfnInputs], Callable[[], Tensor]]]:
    """In the order they are timed: the two regimes and the goal's baselines first, so that a session cut
    short still has the numbers the issue's goals name."""
    return {
        "triton-sorted": _triton_ffn,
        "triton-dense": _triton_ffn,
        "lora": PROVIDERS["lora"],
        "base": PROVIDERS["base"],
        "triton": _triton_ffn,
        "loop": PROVIDERS["loop"],
        "triton-apart": lambda inp: _triton_ffn(inp, fused_router=False),
    }


# (numerator, denominator) providers of the ratios the goals name, and the regimes against each other
FFN_RATIOS = (
    ("triton", "lora"),
    ("loop", "triton"),
    ("triton-apart", "triton"),
    ("triton-dense", "triton-sorted"),
    ("triton-sorted", "lora"),
    ("triton-dense", "lora"),
)


def _time_ffn(name: str, inp: FfnInputs, modes, device: torch.device, dry: bool) -> dict[str, float | str]:
    """Median ms of one provider per mode ("fwd", "fwd+bwd"); an error's text instead where it fails."""
    factory = _ffn_providers()[name]
    regime = name.removeprefix("triton-") if name in ("triton-dense", "triton-sorted") else None
    out: dict[str, float | str] = {}
    try:
        fn = factory(inp)
        targets = [t for _, t in grad_targets("fused" if name.startswith("triton") else name, inp)]
    except Exception as e:
        return {f"{name} {mode}": _describe(e) for mode in modes}
    for mode in modes:
        if mode == "fwd":

            def step(fn=fn):
                with torch.no_grad():
                    return fn()
        else:

            def step(fn=fn, targets=targets, grad_out=inp.grad_out):
                return torch.autograd.grad(fn(), targets, grad_out)

        try:
            with _ffn_regime(regime):
                out[f"{name} {mode}"] = _bench(step, device, dry)
        except Exception as e:
            out[f"{name} {mode}"] = _describe(e)
        _log(f"ffn T={inp.x.shape[0]} {name} {mode}: {out[f'{name} {mode}']}")
    return out


def _ratio(ms: dict, num: str, den: str) -> float | None:
    a, b = ms.get(num), ms.get(den)
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def ffn_timings(
    Ts, dims: dict, dtype: torch.dtype, device: torch.device, dry: bool, rows: list, checkpoint: Callable[[], object]
) -> list[dict]:
    """Appends to `rows` and calls `checkpoint` after every provider (a cut-off session keeps what it measured)."""
    for T in Ts:
        inp = make_inputs(Shape(T=T, **dims), dtype, device)
        row: dict[str, Any] = dict(T=T, **dims, ms={}, ratios={})
        rows.append(row)
        for name in _ffn_providers():
            row["ms"].update(_time_ffn(name, inp, ("fwd", "fwd+bwd"), device, dry))
            for m in ("fwd", "fwd+bwd"):
                for num, den in FFN_RATIOS:
                    ratio = _ratio(row["ms"], f"{num} {m}", f"{den} {m}")
                    if ratio is not None:
                        row["ratios"][f"{num} / {den} {m}"] = ratio
            checkpoint()
        del inp
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def crossover(Ts, dims: dict, dtype: torch.dtype, device: torch.device, dry: bool) -> list[dict]:
    """The fused FFN's two regimes, forced, fwd+bwd, at token counts between the goal's two: where
    moelora.triton_backend.ffn_regime should switch from dense-masked to sorted."""
    rows = []
    for T in Ts:
        inp = make_inputs(Shape(T=T, **dims), dtype, device)
        ms: dict[str, float | str] = {}
        for name in ("triton-dense", "triton-sorted"):
            ms.update(_time_ffn(name, inp, ("fwd", "fwd+bwd"), device, dry))
        rows.append(
            dict(
                T=T,
                **dims,
                ms=ms,
                picked=_tb().ffn_regime(T, dims["E"], dims["k"]),
                dense_over_sorted={
                    m: _ratio(ms, f"triton-dense {m}", f"triton-sorted {m}") for m in ("fwd", "fwd+bwd")
                },
            )
        )
        del inp
    return rows


def regime_timings(
    Ts, dims: dict, Es, dtype: torch.dtype, device: torch.device, dry: bool, rows: list, checkpoint: Callable
) -> list[dict]:
    """moe_lora (the up projection's LoRA: in H, out I) in both regimes at T tokens, E experts of rank r, top-k:
    where the dense-masked regime (every token computes E*r rank columns) stops paying; the backend switches
    above E*r = 256 (moelora.triton_backend.DENSE_MAX_RANK_COLUMNS) whatever T. Appends to `rows` and calls
    `checkpoint` after every row, as ffn_timings."""
    from moelora import triton_backend

    H, I, k, r = dims["H"], dims["I"], dims["k"], dims["r"]
    for T, E in ((T, E) for T in Ts for E in Es):
        g = torch.Generator().manual_seed(E)
        x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
        routing = reference.route(x.detach(), (torch.randn(E, H, generator=g) * 0.02).to(device), top_k=k)
        w = routing.weights.detach().requires_grad_()
        A = (torch.randn(E, r, H, generator=g) * H**-0.5).to(device=device, dtype=dtype).requires_grad_()
        B = (torch.randn(E, I, r, generator=g) * 0.1).to(device=device, dtype=dtype).requires_grad_()
        dy = torch.randn(T, I, generator=g).to(device=device, dtype=dtype)
        row: dict[str, Any] = dict(T=T, H=H, I=I, E=E, k=k, r=r, ms={})
        args, leaves = (x, w, routing.indices, A, B, 2.0), (x, w, A, B)
        for name in ("dense", "sorted"):
            fn = functools.partial(triton_backend.moe_lora, regime=name)

            def fwd(fn=fn, args=args):
                with torch.no_grad():
                    return fn(*args)

            def fwd_bwd(fn=fn, args=args, leaves=leaves, dy=dy):
                return torch.autograd.grad(fn(*args), leaves, dy)

            row["ms"][f"{name} fwd"] = _bench(fwd, device, dry)
            row["ms"][f"{name} fwd+bwd"] = _bench(fwd_bwd, device, dry)
        row["dense / sorted"] = {m: row["ms"][f"dense {m}"] / row["ms"][f"sorted {m}"] for m in ("fwd", "fwd+bwd")}
        rows.append(row)
        checkpoint()
    return rows


def bandwidth(Ts, dims: dict, dtype: torch.dtype, device: torch.device, dry: bool) -> list[dict]:
    """GB/s of the kernels that read x once (route alone; the gate+up shrink alone; route_shrink, the two fused),
    as bytes of x over time, next to a device copy's (which reads and writes x)."""
    from moelora.kernels import mixlora_ffn_shrink_expand as shrink_expand_kernels
    from moelora.kernels import route as route_kernels

    rows = []
    H, E, r, k = dims["H"], dims["E"], dims["r"], dims["k"]
    for T in Ts:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
        router = (torch.randn(E, H, generator=g) * 0.02).to(device)
        A = (torch.randn(2 * E, r, H, generator=g) * H**-0.5).to(device=device, dtype=dtype)  # gate's and up's
        x_bytes = x.numel() * x.element_size()
        copy_gbs = 2 * x_bytes / _bench(x.clone, device, dry) / 1e6
        ms = {
            "route": _bench(lambda x=x, router=router: route_kernels.route_fwd(x, router, k, None), device, dry),
            "shrink": _bench(lambda x=x, A=A: shrink_expand_kernels.shrink_x(x, A), device, dry),
            "route_shrink": _bench(
                lambda x=x, router=router, A=A: route_kernels.route_shrink_fwd(x, router, A, k, None), device, dry
            ),
        }
        row: dict[str, Any] = dict(T=T, H=H, copy_GBps=copy_gbs)
        for name, t in ms.items():
            row[f"{name}_GBps"] = x_bytes / t / 1e6
            row[f"{name}_fraction_of_copy"] = x_bytes / t / 1e6 / copy_gbs
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    from bench.cli import _slug, device_string

    if device.type == "cuda":
        return device_string(device, 0)
    return _slug(f"cpu-interpreter-{torch.get_num_threads()}t")


def _ms(value: float | str | None) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a" if value is None else "error"


def markdown(report: dict) -> str:
    """The report as markdown; sections the run skipped (--only) or did not reach are left out."""
    lines = [f"# gpu_check on {report['device']} ({report['date']})", ""]
    lines += [f"torch {report['versions']['torch']}, triton {report['versions']['triton']}"]
    if report["dry_run"]:
        lines += ["", "**Dry run** (CPU, Triton interpreter, tiny shapes): proves the script, measures nothing."]
    if report.get("pinned_config"):
        lines += ["", "Parity and repeat runs with MOELORA_TRITON_PIN_CONFIG=1 (one tile config per kernel)."]
    if "parity" in report:
        bad = [r for r in report["parity"] if not r["ok"]]
        lines += [
            "",
            f"## Parity: {len(report['parity']) - len(bad)}/{len(report['parity'])} op x shape x dtype cases pass",
        ]
        for r in bad:
            worst = {n: e for n, e in r["errors"].items() if not e["ok"]}
            lines.append(f"- FAIL {r['op']} {r['shape']} {r['dtype']}: {r.get('error') or worst}")
    if "races" in report:
        racy = [r for r in report["races"] if not (r["forward_bitwise"] and r["backward_bitwise"])]
        lines += [
            "",
            f"## Repeat runs: {len(report['races']) - len(racy)}/{len(report['races'])} bitwise equal (fwd + bwd)",
        ]
        for r in racy:
            lines.append(
                f"- {r['op']} {r['shape']} {r['dtype']}: {r.get('error') or 'differing ' + str(r['differing'])}"
            )
    if "configs" in report:
        bad = [r for r in report["configs"] if not r["ok"]]
        n = len(report["configs"])
        lines += ["", f"## Every autotune tile: {n - len(bad)}/{n} kernel x tile x op x dtype cases pass", ""]
        lines += ["Each autotuned kernel's GPU tiles forced in turn, against the reference (the rule above)."]
        for r in bad:
            worst = {k: e for k, e in r["errors"].items() if not e["ok"]}
            lines.append(f"- FAIL {r['kernel']} {r['config']} via {r['op']} {r['dtype']}: {r.get('error') or worst}")
        for r in (r for r in report["configs"] if "skipped" in r):
            lines.append(f"- skipped {r['kernel']} {r['config']} via {r['op']} {r['dtype']}: {r['skipped']}")
    if "ffn" in report:
        lines += ["", f"## MixLoRA FFN timings ({report['timing_dtype']}, median ms)", ""]
        for row in report["ffn"]:
            dims = ", ".join(f"{n}={row[n]}" for n in ("T", "H", "I", "E", "k", "r"))
            lines += [f"### {dims}", "", "| provider | fwd | fwd+bwd |", "|---|---|---|"]
            for p in ("triton", "triton-apart", "triton-dense", "triton-sorted", "lora", "loop", "base"):
                lines.append(f"| {p} | {_ms(row['ms'].get(f'{p} fwd'))} | {_ms(row['ms'].get(f'{p} fwd+bwd'))} |")
            errors = {k: v for k, v in row["ms"].items() if isinstance(v, str)}
            lines += [""] + [f"- {k}: {v:.2f}x" for k, v in row["ratios"].items()]
            lines += [f"- error in {k}: {v}" for k, v in errors.items()] + [""]
        lines += ["Goals: triton / lora fwd+bwd <= 1.10 at T=8192; loop / triton >= 3 (fwd, fwd+bwd), >= 5 at T=32."]
        lines += [
            "",
            "`triton` reads x once for the router and the gate/up shrink (route_shrink); `triton-apart` routes first.",
            "`triton-dense` / `triton-sorted` force the fused FFN's regime (`triton` lets the backend pick by shape).",
        ]
    if "crossover" in report:
        lines += ["", f"## Fused FFN regimes by token count ({report['timing_dtype']}, median ms)", ""]
        lines += ["| T | dense fwd | sorted fwd | dense fwd+bwd | sorted fwd+bwd | backend picks |"]
        lines += ["|---|---|---|---|---|---|"]
        for row in report["crossover"]:
            ms = " | ".join(
                _ms(row["ms"].get(f"triton-{p} {m}")) for m in ("fwd", "fwd+bwd") for p in ("dense", "sorted")
            )
            lines.append(f"| {row['T']} | {ms} | {row['picked']} |")
    if "regimes" in report:
        lines += ["", f"## moe_lora regimes ({report['timing_dtype']}, median ms)", ""]
        lines += ["| T | H | I | E | k | r | dense fwd | sorted fwd | dense fwd+bwd | sorted fwd+bwd |"]
        lines += ["|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["regimes"]:
            dims = " | ".join(str(row[n]) for n in ("T", "H", "I", "E", "k", "r"))
            ms = " | ".join(_ms(row["ms"].get(f"{p} {m}")) for m in ("fwd", "fwd+bwd") for p in ("dense", "sorted"))
            lines.append(f"| {dims} | {ms} |")
        lines += ["", "The backend takes the sorted regime above E*r = 256 rank columns."]
    if "bandwidth" in report:
        lines += ["", "## One read of x: bandwidth (GB/s of x read, fraction of a copy's)", ""]
        lines += ["| T | copy | route | shrink | route_shrink |", "|---|---|---|---|---|"]
        for b in report["bandwidth"]:
            cells = [
                f"{b[f'{n}_GBps']:.0f} ({b[f'{n}_fraction_of_copy']:.2f})" for n in ("route", "shrink", "route_shrink")
            ]
            lines.append(f"| {b['T']} | {b['copy_GBps']:.0f} | " + " | ".join(cells) + " |")
        lines += ["", "Goal: route_shrink at >= 0.75 of copy bandwidth for T >= 4096."]
    return "\n".join(lines) + "\n"


def _write(report: dict, out: Path, tag: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-check-{report['device']}-{report['date']}{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    return stem


def _passed(report: dict) -> bool:
    return all(r["ok"] for r in report.get("parity", []) + report.get("configs", [])) and all(
        r["forward_bitwise"] and r["backward_bitwise"] for r in report.get("races", [])
    )


def merge(paths: list[Path], out: Path) -> int:
    """One report from several runs' JSON (a GPU session runs the timings alone, then parity per dtype in
    parallel processes): lists concatenated, the first run's header kept."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = dict(reports[0])
    for r in reports[1:]:
        for key, value in r.items():
            if key in SECTIONS:
                merged[key] = merged.get(key, []) + value
            elif key == "pinned_config":
                merged[key] = merged.get(key) or value
    stem = _write(merged, out, "")
    print(markdown(merged))
    _log(f"merged {len(paths)} reports into {stem.name}.json/.md")
    return 0 if _passed(merged) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, wall clock")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where the files go")
    ap.add_argument("--repeats", type=int, default=10, help="runs per op for the bitwise race check")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections, of {','.join(SECTIONS)}")
    ap.add_argument("--dtypes", default=None, help="parity/race dtypes (default bf16,fp16,fp32; fp32,fp16 dry)")
    ap.add_argument("--tag", default="", help="appended to the output files' names (parallel runs, then --merge)")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge these runs' JSON reports into one (in --out)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"--only: unknown sections {unknown}; expected some of {list(SECTIONS)}")
    dry = args.dry_run
    if dry:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    else:
        print("gpu_check: no CUDA device; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    import triton

    dtypes = (args.dtypes or ("fp32,fp16" if dry else "bf16,fp16,fp32")).split(",")
    bad_dtypes = sorted(set(dtypes) - set(DTYPES))
    if bad_dtypes:
        ap.error(f"--dtypes: unknown {bad_dtypes}; expected some of {list(DTYPES)}")
    shapes = DRY_PARITY_SHAPES if dry else PARITY_SHAPES
    timing_dtype = torch.float32 if dry else torch.bfloat16
    dims = DRY_TIMING if dry else GOAL
    report: dict[str, Any] = dict(
        device=device_name(device),
        date=datetime.date.today().isoformat(),
        dry_run=dry,
        versions=dict(torch=torch.__version__, triton=triton.__version__),
        pinned_config=os.environ.get("MOELORA_TRITON_PIN_CONFIG") == "1",
        timing_dtype=str(timing_dtype).removeprefix("torch."),
    )
    runs: dict[str, Callable[[], list]] = {
        "parity": lambda: parity(shapes, dtypes, device),
        "races": lambda: races(shapes[:1] if dry else shapes[1:3], dtypes, device, 2 if dry else args.repeats),
        "ffn": lambda: ffn_timings(
            (7, 3) if dry else GOAL_T, dims, timing_dtype, device, dry, report["ffn"], lambda: _write(report, out, tag)
        ),
        "crossover": lambda: crossover((5,) if dry else CROSSOVER_T, dims, timing_dtype, device, dry),
        "configs": lambda: config_parity(shapes[0] if dry else CONFIGS_SHAPE, dtypes, device),
        "bandwidth": lambda: bandwidth((5,) if dry else BANDWIDTH_T, dims, timing_dtype, device, dry),
        "regimes": lambda: regime_timings(
            (7,) if dry else REGIME_T,
            dims,
            (4, 16) if dry else REGIME_E,
            timing_dtype,
            device,
            dry,
            report["regimes"],
            lambda: _write(report, out, tag),
        ),
    }
    out, tag = args.out, f"-{args.tag}" if args.tag else ""
    for section in (s for s in SECTIONS if s in sections):
        _log(f"{section} ...")
        report[section] = []
        try:
            report[section] = runs[section]()
        finally:  # written after every section, also when one fails: a cut-off GPU session keeps the rest
            _write(report, out, tag)
    print(markdown(report))
    return 0 if _passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
