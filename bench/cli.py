"""`python3 -m bench`: latency of the MixLoRA suites' providers, parity-checked first, saved under bench/out/
(gitignored; `--out bench/results` for the committed results)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import memory
from bench.plot import plot
from bench.providers import mixlora_pkg_version
from bench.suites import SUITES, Preset, Suite
from bench.timing import (
    MODES,
    SPREAD_LIMIT,
    Timing,
    busy_warnings,
    check_parity,
    measure,
    measure_round_robin,
    spread,
)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"  # committed results: written only when --out names it
OUT_DIR = BENCH_DIR / "out"  # the default: gitignored, so a run never dirties the checkout
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ALL_PROVIDERS = tuple(dict.fromkeys(p for s in SUITES.values() for p in s.providers))
ALL_MODES = tuple(dict.fromkeys(m for s in SUITES.values() for m in s.modes))
PRESET_NAMES = tuple(dict.fromkeys(p for s in SUITES.values() for p in s.presets))
# argparse destination -> the preset dimension it overrides (in every suite that has that dimension).
DIM_FLAGS = {
    "H": "H",
    "I": "I",
    "KV": "KV",
    "E": "E",
    "k": "k",
    "r": "r",
    "top_p": "top_p",
    "seq": "S",
    "new_tokens": "N",
    "lora_dtype": "lora_dtype",
    "layers": "L",
}
# a suite's row dimension -> the argparse destination that replaces its rows.
CASE_FLAGS = {"T": "T", "B": "batch"}


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _name_list(allowed: tuple[str, ...], everything: str | None = None):
    """A comma list of names or shell patterns ('moelora-*-mixed8-cpu'), each pattern in `allowed`'s order."""

    def parse(text: str) -> tuple[str, ...]:
        if everything is not None and text.strip() == everything:
            return allowed
        names, bad = [], []
        for item in (v.strip() for v in text.split(",") if v.strip()):
            matched = [n for n in allowed if fnmatch.fnmatchcase(n, item)]
            names += matched
            if not matched:
                bad.append(item)
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return tuple(dict.fromkeys(names))

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m bench",
        description="Latency of MixLoRA: the FFN, the router, the expert LoRAs and a tiny model, provider by provider.",
    )
    suites = ", ".join(SUITES)
    p.add_argument(
        "--suite", type=_name_list(tuple(SUITES), "all"), default=("ffn",), help=f"{suites}, a comma list or all"
    )
    p.add_argument("--preset", choices=PRESET_NAMES, default="small", help="named shape set (default: small)")
    p.add_argument("--T", type=_int_list, help="token counts, comma separated (op suites' rows)")
    rows_help = "batch sizes, comma separated (model suite's rows; milora: sequences, each with its own adapter)"
    p.add_argument("--batch", type=_int_list, help=rows_help)
    p.add_argument("--H", type=int, help="hidden size")
    p.add_argument("--I", type=int, help="intermediate size (moe_lora: output size)")
    p.add_argument("--KV", type=int, help="milora suite: k/v projection width (GQA; default H)")
    p.add_argument("--E", type=int, help="number of experts")
    p.add_argument("--k", type=int, help="top-k")
    p.add_argument("--r", type=int, help="LoRA rank")
    p.add_argument("--top-p", type=float, help="route suite: top-p routing (mixlora-dynamic) instead of top-k")
    p.add_argument("--seq", type=int, help="model suite: train sequence length; milora suite: prefill prompt length")
    p.add_argument("--new-tokens", type=int, help="model and e2e suites: tokens generated per call")
    p.add_argument("--layers", type=int, help="model and e2e suites: decoder layers of the llama")
    p.add_argument("--dtype", choices=[*DTYPES, *DTYPE_ALIASES], default="float32", help="base weights and x")
    lora_help = "milora suite: adapter tensors in fp32 (the library's default) or in --dtype (model)"
    p.add_argument("--lora-dtype", choices=("fp32", "model"), help=lora_help)
    providers_help = f"comma list of names or shell patterns ('moelora-*-mixed8-cpu') of {', '.join(ALL_PROVIDERS)}"
    p.add_argument("--providers", type=_name_list(ALL_PROVIDERS), help=providers_help)
    p.add_argument("--modes", type=_name_list(ALL_MODES), help=f"comma list of {', '.join(ALL_MODES)}")
    p.add_argument("--repeats", type=int, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, help="untimed runs before them")
    threads_help = "torch CPU threads (default: torch's current count)"
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help=threads_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:n]")
    memory_help = f"CPU: peak RSS growth of every case over {memory.CALLS} calls, each case in a process of its own"
    p.add_argument("--memory", action="store_true", help=memory_help)
    sequential_help = (
        "CPU: time each provider's repeats back to back, one provider built at a time (default: the providers of "
        "a case in rounds, all built at once, so that the machine's drift falls on all of them alike)"
    )
    p.add_argument("--sequential", action="store_true", help=sequential_help)
    out_help = "results folder (default: bench/out, gitignored; bench/results holds the committed results)"
    p.add_argument("--out", type=Path, default=OUT_DIR, help=out_help)
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    return p.parse_args(argv)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_string(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return _slug(f"cuda-{torch.cuda.get_device_name(device)}")
    return _slug(f"cpu-{_cpu_name()}-{threads}t")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


class _Progress:
    """tqdm when installed, else one plain line per case."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="case", dynamic_ncols=True)
        self.total, self.done = total, 0

    def start(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(what)
        else:
            print(f"[{self.done + 1}/{self.total}] {what}", flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()

    def log(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Plan:
    """One suite's run: the preset with the CLI's overrides, its rows, and what runs."""

    suite: Suite
    preset: Preset
    custom: bool
    shapes: list[Any]
    providers: list[str]
    modes: list[str]
    notes: list[str]

    @property
    def cases(self) -> int:
        return len(self.shapes) * sum(runs(self.suite, n, m) for m in self.modes for n in self.providers)


def runs(suite: Suite, name: str, mode: str) -> bool:
    """Whether provider `name` has mode `mode` (the milora suite's router runs at prefill only, say)."""
    has = getattr(suite, "runs", None)
    return has is None or has(name, mode)


def plan(suite: Suite, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Plan | str:
    """The plan of `suite` under `args`, or why it does not run."""
    if args.preset not in suite.presets:
        return f"suite {suite.name} skipped: it has no preset {args.preset} (it has {', '.join(suite.presets)})"
    preset = suite.presets[args.preset]
    cases = getattr(args, CASE_FLAGS[suite.case])
    dims = dict(preset.dims)
    for flag, dim in DIM_FLAGS.items():
        if dim in dims and getattr(args, flag) is not None:
            dims[dim] = getattr(args, flag)
    warmup = args.warmup if args.warmup is not None else preset.warmup
    repeats = args.repeats if args.repeats is not None else preset.repeats
    if repeats < 1 or warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    resolved = dataclasses.replace(preset, cases=cases or preset.cases, dims=dims, warmup=warmup, repeats=repeats)
    custom = resolved.cases != preset.cases or dims != preset.dims or dtype != torch.float32

    notes = list(suite.notes)
    if (device_notes := getattr(suite, "device_notes", None)) is not None:
        notes += device_notes(device)
    # A suite may leave some providers out unless named (e2e's mixed batches).
    wanted = args.providers if args.providers is not None else getattr(suite, "default_providers", suite.providers)
    providers = []
    for name in (p for p in suite.providers if p in wanted):
        if (why := suite.missing(name, device)) is not None:
            notes.append(why)
        else:
            providers.append(name)
    modes = [m for m in suite.modes if args.modes is None or m in args.modes]
    if not providers or not modes:
        return f"suite {suite.name} skipped: none of its providers or modes selected" + (
            f" ({'; '.join(notes)})" if notes else ""
        )
    shapes = [suite.shape(case, dims) for case in resolved.cases]
    return Plan(suite, resolved, custom, shapes, providers, modes, notes)


def _load_average() -> float | None:
    """The 1-minute load average, None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_suite(p: Plan, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, progress: _Progress) -> dict:
    """Parity, then timing of every (row, mode, provider) of one suite; returns its entry of the report."""
    suite, key = p.suite, p.suite.case
    load_before = _load_average()
    checked = [name for name in p.providers if name in suite.checked]
    with_grads = suite.grad_mode in p.modes
    entry = {
        "title": suite.title,
        "preset": args.preset,
        "label": args.preset + ("-custom" if p.custom else ""),
        "case": key,
        key: list(p.preset.cases),
        "shape": p.preset.dims,
        "modes": p.modes,
        "providers": p.providers,
        "warmup": p.preset.warmup,
        "repeats": p.preset.repeats,
        "notes": p.notes,
        "parity": [],
        "results": [],
        "ratio_meaning": {f"{a}/{b}": why for a, b, why in suite.ratios if {a, b} <= set(p.providers)},
    }
    for line in p.notes:
        progress.log(f"note: {suite.name}: {line}")
    for shape in p.shapes:
        case, inp, failed = getattr(shape, key), None, set()
        if checked:
            # Parity runs in fp32 whatever --dtype: the same seeded numbers, before any rounding to 16 bits.
            progress.start(f"{suite.name} parity {shape.label()}")
            inp = suite.make_inputs(shape, torch.float32, device)
            want = suite.outputs("reference", inp, with_grads)
            keys = getattr(suite, "parity_keys", None)
            for name in checked:
                # A provider compares the outputs it has (the milora suite's router has no decode output).
                mine = want if keys is None else {k: v for k, v in want.items() if k in keys(name)}
                if (own := getattr(suite, "own_reference", None)) is not None:  # e2e's mixed batch: rows alone
                    mine = mine | own(name, inp)
                parity = check_parity(suite, name, inp, with_grads, mine)
                summary = parity.summary()
                entry["parity"].append({key: case, "grads_checked": with_grads, **asdict(parity), "summary": summary})
                progress.log(f"{suite.name} parity {shape.label()} {summary}")
                if not parity.ok:
                    failed.add(name)
            del want
        if inp is None or dtype != torch.float32:
            inp = suite.make_inputs(shape, dtype, device)
        for mode in p.modes:
            names = [n for n in p.providers if runs(suite, n, mode)]
            rows = {name: {key: case, "mode": mode, "provider": name} for name in names}
            for name in failed & set(names):
                rows[name]["status"] = "parity FAILED"
            timed = [name for name in names if name not in failed]
            if device.type == "cpu" and not args.sequential:
                for name, row in _time_round_robin(suite, shape, timed, mode, inp, args, p.preset, progress).items():
                    rows[name] |= row
            else:
                for name in timed:
                    progress.start(f"{suite.name} {shape.label()} {mode} {name}")
                    rows[name] |= _time_case(suite, shape, name, mode, inp, args, device, p.preset, progress)
                    progress.advance()
            for _ in failed & set(names):
                progress.advance()
            entry["results"].extend(rows.values())
        del inp
    entry["ratios"] = _ratios(entry)
    load_after = _load_average()
    entry["load_average_1min"] = {"before": load_before, "after": load_after}
    entry["warnings"] = busy_warnings(suite.name, key, entry["results"], args.threads, load_before, load_after)
    for line in entry["warnings"]:
        progress.log(f"WARNING: {line}")
    return entry


def _time_case(
    suite: Suite,
    shape: Any,
    name: str,
    mode: str,
    inp: Any,
    args: argparse.Namespace,
    device: torch.device,
    preset: Preset,
    progress: _Progress,
) -> dict:
    what = f"{suite.name} {shape.label()} {mode} {name}"
    try:
        step = suite.step(name, inp, mode)
        graph = suite.cuda_graph(name, shape, mode, device)
        timing: Timing = measure(step, device, preset.warmup, preset.repeats, cuda_graph=graph)
    except Exception as exc:  # one broken case (say out of memory) must not lose the rest
        row = {"status": f"error: {type(exc).__name__}: {exc}"}
        progress.log(f"{what}: {row['status']}")
        return row
    if timing.graph_error is not None:
        progress.log(f"{what}: CUDA graph capture failed, timed eagerly ({timing.graph_error})")
    return _timed_row(suite, shape, name, mode, timing, args, device, progress)


def _time_round_robin(
    suite: Suite,
    shape: Any,
    names: list[str],
    mode: str,
    inp: Any,
    args: argparse.Namespace,
    preset: Preset,
    progress: _Progress,
) -> dict[str, dict]:
    """CPU: the providers of one (case, mode) timed in rounds (bench.timing.measure_round_robin), every step
    built first, so that all of them are alive at once; `--sequential` times them one after another instead."""
    what = f"{suite.name} {shape.label()} {mode}"
    progress.start(f"{what}: {len(names)} providers round-robin")
    rows: dict[str, dict] = {}
    steps = {}
    for name in names:
        try:
            steps[name] = suite.step(name, inp, mode)
        except Exception as exc:  # one broken provider must not lose the rest
            rows[name] = {"status": f"error: {type(exc).__name__}: {exc}"}
            progress.log(f"{what} {name}: {rows[name]['status']}")
    for name, timing in measure_round_robin(steps, preset.warmup, preset.repeats).items():
        if isinstance(timing, str):
            rows[name] = {"status": timing}
            progress.log(f"{what} {name}: {timing}")
        else:
            rows[name] = _timed_row(suite, shape, name, mode, timing, args, torch.device("cpu"), progress)
    for _ in names:
        progress.advance()
    return {name: rows[name] for name in names}


def _timed_row(
    suite: Suite,
    shape: Any,
    name: str,
    mode: str,
    timing: Timing,
    args: argparse.Namespace,
    device: torch.device,
    progress: _Progress,
) -> dict:
    """A timed case's row: the timing, tokens/s where the suite counts tokens, and CPU memory with --memory."""
    what = f"{suite.name} {shape.label()} {mode} {name}"
    row = {"status": "ok"} | asdict(timing)
    ran = getattr(suite, "run_shape", lambda _, s: s)(name, shape)  # e2e's mixed batch: n sequences, not B
    if (tokens := suite.tokens_per_call(ran, mode)) is not None:
        row["tokens_per_s"] = tokens / (timing.median_ms / 1e3)
    if args.memory and device.type == "cpu":
        try:
            row["peak_mem_mib"] = memory.probe(suite.name, shape, name, mode, _dtype_name(args), args.threads)
        except (RuntimeError, OSError) as exc:
            row["memory_error"] = str(exc)
            progress.log(f"{what}: {exc}")
    return row


def _dtype_name(args: argparse.Namespace) -> str:
    return DTYPE_ALIASES.get(args.dtype, args.dtype)


def _memory_meaning(args: argparse.Namespace, device: torch.device) -> str | None:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the timed repeats, inputs included (the L2 flush buffer not)"
    if args.memory:
        return (
            f"CPU: rise of the peak RSS (VmHWM) over {memory.CALLS} calls, each case in a fresh process, above that "
            "process's RSS after set-up: what the calls add (activations, outputs, gradients, optimiser state, "
            "allocator caching, code paged in by a first call), inputs and weights not included"
        )
    return None


def run(args: argparse.Namespace) -> dict:
    """Every selected suite: parity, then timing; returns the report that is printed and saved."""
    dtype = DTYPES[_dtype_name(args)]
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    notes, plans = [], []
    for name in args.suite:
        planned = plan(SUITES[name], args, device, dtype)
        if isinstance(planned, str):
            notes.append(planned)
        else:
            plans.append(planned)
    if not plans:
        raise SystemExit("nothing to run: " + "; ".join(notes))
    meaning = _memory_meaning(args, device)
    if meaning is None:
        notes.append("peak memory: not measured on CPU unless --memory (a process per case)")
    elif args.memory and device.type != "cpu":
        notes.append("--memory is for CPU runs; on CUDA the allocator's peak is always reported")
    if args.memory and device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        notes.append("--memory needs Linux's /proc/self/clear_refs and VmHWM: every probe will fail here")
    if any(set(pl.modes) & set(MODES) for pl in plans):
        notes.append(
            "fwd runs under torch.no_grad; fwd+bwd differentiates sum(out * grad_out) w.r.t. the inputs and the "
            "adapter tensors, never the frozen weights"
        )
    suites = [pl.suite.name for pl in plans]
    report = {
        "label": args.preset + ("-custom" if any(pl.custom for pl in plans) else ""),
        "date": datetime.date.today().isoformat(),
        "device": device_string(device, args.threads),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "mixlora": mixlora_pkg_version(),
        "git_commit": _git_commit(),
        "threads": args.threads,
        "dtype": _dtype_name(args),
        "memory": meaning,
        "notes": notes,
        "suites": suites,
    }
    progress = _Progress(sum(pl.cases for pl in plans))
    for line in notes:
        progress.log(f"note: {line}")
    for pl in plans:
        report[pl.suite.name] = run_suite(pl, args, device, dtype, progress)
    progress.close()
    report["warnings"] = [w for pl in plans for w in report[pl.suite.name]["warnings"]]
    return report


def _ratios(entry: dict) -> list[dict]:
    key = entry["case"]
    med = {(r[key], r["mode"], r["provider"]): r["median_ms"] for r in entry["results"] if r["status"] == "ok"}
    rows = []
    for case in entry[key]:
        for mode in entry["modes"]:
            row: dict[str, Any] = {key: case, "mode": mode}
            for ratio in entry["ratio_meaning"]:
                a, b = ratio.split("/")
                both = (case, mode, a) in med and (case, mode, b) in med
                row[ratio] = med[case, mode, a] / med[case, mode, b] if both else None
            rows.append(row)
    return rows


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _table(
    entry: dict,
    cell: Callable[[dict], str],
    extra_header: tuple[str, ...] = (),
    extra: Callable[[int, str], list[str]] = lambda case, mode: [],
) -> list[str]:
    """A markdown table: one line per (row size, mode), one column per provider, then the extra columns."""
    key = entry["case"]
    results = {(r[key], r["mode"], r["provider"]): r for r in entry["results"]}
    header = [key, "mode", *entry["providers"], *extra_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    for case in entry[key]:
        for mode in entry["modes"]:
            # "-": the provider has no such mode (the milora suite's router runs at prefill only).
            cells = [cell(results[c]) if (c := (case, mode, name)) in results else "-" for name in entry["providers"]]
            lines.append("| " + " | ".join([str(case), mode, *cells, *extra(case, mode)]) + " |")
    return lines


def _latency_cell(r: dict) -> str:
    """The median, then its spread: [the IQR as a percentage of the median] (none for a single repeat)."""
    if r["status"] != "ok":
        return r["status"].split(":")[0]
    frac = spread(r)
    return _ms(r["median_ms"]) + ("" if frac is None else f" [{frac:.0%}]") + (" (g)" if r.get("cuda_graph") else "")


def _suite_markdown(name: str, entry: dict, report: dict) -> list[str]:
    dims = " ".join(f"{k}={v}" for k, v in entry["shape"].items() if v is not None)
    lines = [
        f"### {entry['title']} latency, median ms ({name} suite, {entry['label']}: {dims}, {report['dtype']})",
        "",
        f"median of {entry['repeats']} after {entry['warmup']} warm-up; [n%]: the spread, the interquartile range "
        f"(q3 - q1) of the repeats as a percentage of the median (over {SPREAD_LIMIT:.0%}: a warning)",
        "",
        *(f"WARNING: {w}" for w in entry.get("warnings", ())),
        *([""] if entry.get("warnings") else []),
    ]
    ratios = {(r[entry["case"]], r["mode"]): r for r in entry["ratios"]}
    ratio_names = tuple(entry["ratio_meaning"])

    def ratio_cells(case: int, mode: str) -> list[str]:
        values = [ratios[case, mode][n] for n in ratio_names]
        return ["n/a" if v is None else f"{v:.2f}x" for v in values]

    lines += _table(entry, _latency_cell, ratio_names, ratio_cells)
    lines.append("")
    lines += [f"- `{ratio}` above 1: {why}" for ratio, why in entry["ratio_meaning"].items()]
    if any(r.get("cuda_graph") for r in entry["results"]):
        lines.append("- `(g)`: timed as a CUDA graph replay (decode-sized T, providers without host syncs)")
    if counted := [m for m in entry["modes"] if any(r["mode"] == m and "tokens_per_s" in r for r in entry["results"])]:
        what = "train: the B x S tokens of a step; generate: the B x N new tokens, prefill included"
        lines += ["", f"Throughput, tokens per second ({what}):", ""]
        lines += _table(
            {**entry, "modes": counted},
            lambda r: f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else r["status"].split(":")[0],
        )
    if any(r.get("peak_mem_mib") is not None for r in entry["results"]):
        lines += ["", f"Peak memory, MiB ({report['memory']}):", ""]
        lines += _table(entry, lambda r: f"{r['peak_mem_mib']:.1f}" if r.get("peak_mem_mib") is not None else "n/a")
    if entry["parity"]:
        lines += ["", "Parity against reference (max |got - want| / max |want|):"]
        lines += [f"- {entry['case']}={p[entry['case']]} {p['summary']}" for p in entry["parity"]]
    lines += ["", *(f"Note: {n}" for n in entry["notes"])]
    return [*lines, ""]


def markdown(report: dict) -> str:
    """Device line, then per suite the table of medians (ms) and ratios, parity, notes: printed and saved as .md."""
    lines = [
        f"device `{report['device']}` ({report['device_name']}), {report['threads']} thread(s), "
        f"torch {report['torch']}, commit {(report['git_commit'] or 'unknown')[:12]}, {report['date']}",
        "",
    ]
    for name in report["suites"]:
        lines += _suite_markdown(name, report[name], report)
    lines += [f"Note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def stem(report: dict) -> str:
    """<device>-[<suites>-]<preset>[-custom]-<date>; the ffn suite alone keeps the name it always had."""
    suites = report["suites"]
    which = "" if suites == ["ffn"] else ("all-" if len(suites) == len(SUITES) else "-".join(suites) + "-")
    return f"{report['device']}-{which}{report['label']}-{report['date']}"


def save(report: dict, text: str, out: Path) -> list[Path]:
    """<stem>.json, .md and (matplotlib installed) .png; a custom shape adds -custom so it never replaces a preset's."""
    out.mkdir(parents=True, exist_ok=True)
    name = stem(report)
    json_path, md_path, png_path = out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(text)
    why = plot(report, png_path)
    if why is not None:
        print(f"note: {why}")
        return [json_path, md_path]
    return [json_path, md_path, png_path]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = markdown(report)
    print()
    print(text, end="")
    if not args.no_save:
        for path in save(report, text, args.out):
            print(f"wrote {path}")
    return 0
