"""`python3 -m bench`: latency of the MixLoRA FFN providers, parity-checked first, saved under bench/results/."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.providers import (
    ALL_PROVIDERS,
    MOE_PROVIDERS,
    PROVIDERS,
    Shape,
    grad_targets,
    make_inputs,
    mixlora_pkg_missing,
    mixlora_pkg_version,
)
from bench.timing import (
    MODES,
    ROUTER_GRAD_TOLERANCE,
    TOLERANCE,
    Parity,
    Timing,
    check_parity,
    make_step,
    measure,
    reference_outputs,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# (numerator, denominator, what a value above 1 means), shown when both providers ran.
RATIOS = (
    ("loop", "reference", "reference is that many times faster than the mixlora-style loop"),
    ("mixlora-pkg", "reference", "reference is that many times faster than the mixlora package"),
    ("reference", "lora", "what the MoE of LoRAs costs over one dense LoRA per projection"),
    ("reference", "base", "what the MoE of LoRAs costs over the frozen FFN alone"),
)


@dataclass(frozen=True)
class Preset:
    T: tuple[int, ...]
    H: int
    I: int  # intermediate size
    E: int = 8
    k: int = 2
    r: int = 16
    warmup: int = 2
    repeats: int = 10


PRESETS = {
    # Every provider and mode in about 35 s on one idle CPU core (2.5 min on two busy ones).
    "small": Preset(T=(1, 128, 512), H=512, I=1408, warmup=3, repeats=15),
    # The shape of the issue that asked for this comparison.
    "issue2": Preset(T=(2048,), H=1024, I=2816),
    "llama2-7b": Preset(T=(1, 32, 512, 2048), H=4096, I=11008),
    "llama3-8b": Preset(T=(1, 32, 512, 2048), H=4096, I=14336),
}


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _name_list(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m bench",
        description="Latency of one MixLoRA FFN: the mixlora-style expert loop vs moelora vs LoRA vs the base FFN.",
    )
    p.add_argument("--preset", choices=PRESETS, default="small", help="named shape set (default: small)")
    p.add_argument("--T", type=_int_list, help="token counts, comma separated (overrides the preset)")
    p.add_argument("--H", type=int, help="hidden size")
    p.add_argument("--I", type=int, help="intermediate size")
    p.add_argument("--E", type=int, help="number of experts")
    p.add_argument("--k", type=int, help="top-k")
    p.add_argument("--r", type=int, help="LoRA rank")
    p.add_argument("--dtype", choices=[*DTYPES, *DTYPE_ALIASES], default="float32", help="base weights and x")
    providers_help = f"comma list of {', '.join(ALL_PROVIDERS)} (default: all)"
    p.add_argument("--providers", type=_name_list(ALL_PROVIDERS), default=ALL_PROVIDERS, help=providers_help)
    p.add_argument("--modes", type=_name_list(MODES), default=MODES, help="comma list of fwd, fwd+bwd (default: both)")
    p.add_argument("--repeats", type=int, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, help="untimed runs before them")
    threads_help = "torch CPU threads (default: torch's current count)"
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help=threads_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:n]")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: bench/results)")
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
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=RESULTS_DIR.parent, capture_output=True, text=True, timeout=10
        )
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


def run(args: argparse.Namespace) -> dict:
    """Parity, then timing of every (T, mode, provider); returns the report that is printed and saved."""
    preset = PRESETS[args.preset]
    dims = {d: getattr(args, d) if getattr(args, d) is not None else getattr(preset, d) for d in "THIEkr"}
    dtype_name = DTYPE_ALIASES.get(args.dtype, args.dtype)
    dtype = DTYPES[dtype_name]
    warmup = args.warmup if args.warmup is not None else preset.warmup
    repeats = args.repeats if args.repeats is not None else preset.repeats
    if repeats < 1 or warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    custom = any(dims[d] != getattr(preset, d) for d in "THIEkr") or dtype != torch.float32

    notes = []
    providers = list(args.providers)
    if "mixlora-pkg" in providers and (why := mixlora_pkg_missing()) is not None:
        providers.remove("mixlora-pkg")
        notes.append(why)
    if {"lora", "base"} & set(providers):
        notes.append("lora and base compute different math (no router): timed, never parity-checked")
    if device.type != "cuda":
        notes.append("peak memory: n/a on CPU (no honest per-op allocator statistic)")
    notes.append(
        "fwd runs under torch.no_grad; fwd+bwd differentiates sum(y * grad_out) w.r.t. x, the router and "
        "the LoRA tensors (base: x only), never the frozen weights"
    )
    checked = [p for p in providers if p in MOE_PROVIDERS and p != "reference"]
    with_grads = "fwd+bwd" in args.modes

    report = {
        "preset": args.preset,
        "label": args.preset + ("-custom" if custom else ""),
        "date": datetime.date.today().isoformat(),
        "device": device_string(device, args.threads),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "mixlora": mixlora_pkg_version(),
        "git_commit": _git_commit(),
        "threads": args.threads,
        "dtype": dtype_name,
        "shape": {d: dims[d] for d in "HIEkr"},
        "T": list(dims["T"]),
        "modes": list(args.modes),
        "providers": providers,
        "warmup": warmup,
        "repeats": repeats,
        "notes": notes,
        "parity_tolerance": {"default": TOLERANCE, "drouter": ROUTER_GRAD_TOLERANCE},
        "parity": [],
        "results": [],
    }

    progress = _Progress(len(dims["T"]) * len(args.modes) * len(providers))
    for line in notes:
        progress.log(f"note: {line}")
    for T in dims["T"]:
        shape = Shape(T, dims["H"], dims["I"], dims["E"], dims["k"], dims["r"])
        inp = make_inputs(shape, dtype, device)
        failed = set()
        if checked:
            progress.start(f"parity {shape.label()}")
            want = reference_outputs(inp, with_grads)
            for name in checked:
                parity = check_parity(name, inp, with_grads, want)
                report["parity"].append({"T": T, "grads_checked": with_grads, **asdict(parity)})
                progress.log(f"parity {shape.label()} {parity.summary()}")
                if not parity.ok:
                    failed.add(name)
            del want
        for mode in args.modes:
            for name in providers:
                progress.start(f"{shape.label()} {mode} {name}")
                row = {"T": T, "mode": mode, "provider": name}
                if name in failed:
                    row["status"] = "parity FAILED"
                else:
                    try:
                        fn = PROVIDERS[name](inp)
                        step = make_step(fn, [t for _, t in grad_targets(name, inp)], inp.grad_out, mode)
                        timing: Timing = measure(step, device, warmup, repeats)
                    except Exception as exc:  # one broken case (say out of memory) must not lose the rest
                        row["status"] = f"error: {type(exc).__name__}: {exc}"
                        progress.log(f"{shape.label()} {mode} {name}: {row['status']}")
                    else:
                        row |= {"status": "ok"} | asdict(timing)
                report["results"].append(row)
                progress.advance()
        del inp
    progress.close()
    report["ratios"] = _ratios(report)
    return report


def _medians(report: dict) -> dict[tuple[int, str, str], float]:
    return {(r["T"], r["mode"], r["provider"]): r["median_ms"] for r in report["results"] if r["status"] == "ok"}


def _ratio_columns(report: dict) -> list[tuple[str, str, str]]:
    return [(a, b, why) for a, b, why in RATIOS if a in report["providers"] and b in report["providers"]]


def _ratios(report: dict) -> list[dict]:
    med = _medians(report)
    rows = []
    for T in report["T"]:
        for mode in report["modes"]:
            row = {"T": T, "mode": mode}
            for a, b, _ in _ratio_columns(report):
                if (T, mode, a) in med and (T, mode, b) in med:
                    row[f"{a}/{b}"] = med[T, mode, a] / med[T, mode, b]
                else:
                    row[f"{a}/{b}"] = None
            rows.append(row)
    return rows


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def markdown(report: dict) -> str:
    """The header, the table of medians (ms) and ratios, parity, notes: what is printed and saved as .md."""
    s = report["shape"]
    lines = [
        f"### MixLoRA FFN latency, median ms ({report['label']}: H={s['H']} I={s['I']} E={s['E']} k={s['k']} "
        f"r={s['r']}, {report['dtype']})",
        "",
        f"device `{report['device']}`, {report['threads']} thread(s), torch {report['torch']}, "
        f"commit {(report['git_commit'] or 'unknown')[:12]}, {report['date']}, "
        f"median of {report['repeats']} after {report['warmup']} warm-up",
        "",
    ]
    status = {(r["T"], r["mode"], r["provider"]): r for r in report["results"]}
    ratio_cols = _ratio_columns(report)
    header = ["T", "mode", *report["providers"], *(f"{a}/{b}" for a, b, _ in ratio_cols)]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    ratios = {(r["T"], r["mode"]): r for r in report["ratios"]}
    for T in report["T"]:
        for mode in report["modes"]:
            cells = [str(T), mode]
            for name in report["providers"]:
                r = status[T, mode, name]
                cells.append(_ms(r["median_ms"]) if r["status"] == "ok" else r["status"].split(":")[0])
            for a, b, _ in ratio_cols:
                v = ratios[T, mode][f"{a}/{b}"]
                cells.append("n/a" if v is None else f"{v:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- `{a}/{b}` above 1: {why}" for a, b, why in ratio_cols]
    if any(r.get("peak_mem_mib") is not None for r in report["results"]):
        lines += ["", "| T | mode | provider | peak MiB |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {r['T']} | {r['mode']} | {r['provider']} | {r['peak_mem_mib']:.0f} |"
            for r in report["results"]
            if r.get("peak_mem_mib") is not None
        ]
    if report["parity"]:
        lines += ["", "Parity against reference (max |got - want| / max |want|):"]
        lines += [f"- T={p['T']} {Parity(**_parity_fields(p)).summary()}" for p in report["parity"]]
    lines += ["", *(f"Note: {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


def _parity_fields(p: dict) -> dict:
    return {k: p[k] for k in ("provider", "ok", "rel_err", "error")}


def save(report: dict, text: str, out: Path) -> tuple[Path, Path]:
    """<device>-<preset>-<date>.json and .md; a custom shape adds -custom so it never replaces a preset's file."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['device']}-{report['label']}-{report['date']}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(text)
    return json_path, md_path


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
