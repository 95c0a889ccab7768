"""Round-robin timing of e2e providers in one process: `python -m bench.interleaved --mode generate`.

The e2e suite times each provider's repeats back to back. On the 2-core VMs a whole run drifts by 10-20%
(the bare llama has timed slower than PEFT's LoRA in the same run), so a ratio between providers timed minutes
apart moves that much from run to run. Here every round runs each provider once, in the same order, so a drift
falls on all of them alike; the medians' ratios to the first provider are what the e2e goals compare.

Timing only: the models are the e2e suite's (the same weights and inputs), whose parity `python -m bench
--suite e2e` checks. Prints one line per provider: median ms, the ratio to the first provider, every round.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from bench import e2e
from bench.suites import E2E
from bench.timing import round_robin_times

DEFAULT_PROVIDERS = "peft-lora,moelora-mixlora-cpu,moelora-milora-cpu"


def time_round_robin(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """{provider: [seconds per call]}: one untimed call each, then `rounds` rounds of one call each, in order."""
    times, failed = round_robin_times(steps, warmup=1, repeats=rounds)
    if failed:
        raise RuntimeError("; ".join(f"{name}: {why}" for name, why in failed.items()))
    return {name: [ms / 1e3 for ms in t] for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=e2e.MODES, default="generate")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS, help="comma list; ratios are to the first")
    p.add_argument("--preset", choices=sorted(E2E.presets), default="small")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    device = torch.device("cpu")
    for name in names:
        if name not in E2E.providers:
            raise SystemExit(f"unknown provider {name!r}; the e2e suite has {', '.join(E2E.providers)}")
        if (why := e2e.missing(name, device)) is not None:
            raise SystemExit(f"provider {name!r} cannot run here: {why}")
        if not e2e.runs(name, args.mode):
            raise SystemExit(f"provider {name!r} has no {args.mode!r} mode")
    torch.set_num_threads(args.threads)
    preset = E2E.presets[args.preset]
    inp = e2e.make_inputs(E2E.shape(preset.cases[0], preset.dims))
    steps = {name: e2e.step(name, inp, args.mode) for name in names}
    times = time_round_robin(steps, args.rounds)
    first = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        rounds = ", ".join(f"{t * 1e3:.0f}" for t in times[name])
        print(f"{args.mode} {name}: {median * 1e3:.1f} ms, {median / first:.2f}x {names[0]}; rounds: {rounds}")
    return times


if __name__ == "__main__":
    main()
