"""Parity against the reference, and the timer: median of N repeats after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.providers import PROVIDERS, FfnInputs, grad_targets, with_dtype

MODES = ("fwd", "fwd+bwd")


# Allowed max |got - want| / max |want|, in fp32. Summing in another order (Wd per expert or once) moves
# y and the x / LoRA gradients by ~1e-6 (at most 1.9e-6 over 200 seeds at T=1). The router gradient is a
# difference of the chosen experts' contributions and loses digits when they nearly cancel: median 1.2e-6,
# p99 5.7e-5, max 1.8e-3 over the same 200 seeds. A wrong formula moves either by far more than its bound.
TOLERANCE = 1e-4
ROUTER_GRAD_TOLERANCE = 1e-2


def tolerance(key: str) -> float:
    return ROUTER_GRAD_TOLERANCE if key == "drouter" else TOLERANCE


def make_step(fn: Callable[[], Tensor], targets: list[Tensor], grad_out: Tensor, mode: str) -> Callable[[], object]:
    """One timed unit. fwd: inference, under no_grad. fwd+bwd: forward, then the gradients of
    sum(y * grad_out) with respect to `targets` (autograd.grad, so nothing accumulates between repeats)."""
    if mode == "fwd":

        def step() -> object:
            with torch.no_grad():
                return fn()

        return step
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(), targets, grad_out)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass
class Parity:
    provider: str
    ok: bool
    rel_err: dict[str, float]  # output name ("y", "d<input>") -> max |got - want| / max |want|
    error: str | None = None  # what the provider raised, if it did

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.provider}: FAILED ({self.error})"
        key = max(self.rel_err, key=lambda k: self.rel_err[k] / tolerance(k))
        verdict = "ok" if self.ok else "FAILED"
        err, tol = self.rel_err[key], tolerance(key)
        return f"{self.provider}: {verdict} (nearest its bound: {key} rel err {err:.1e}, allowed {tol:.0e})"


def _outputs(name: str, inp: FfnInputs, with_grads: bool) -> dict[str, Tensor]:
    fn = PROVIDERS[name](inp)
    if not with_grads:
        with torch.no_grad():
            return {"y": fn()}
    named = grad_targets(name, inp)
    y = fn()
    grads = torch.autograd.grad(y, [t for _, t in named], inp.grad_out)
    return {"y": y.detach()} | {f"d{n}": g for (n, _), g in zip(named, grads, strict=True)}


def check_parity(name: str, inp: FfnInputs, with_grads: bool, want: dict[str, Tensor] | None = None) -> Parity:
    """Compare provider `name` with `reference` on `inp`: y and, with_grads, every gradient.

    Runs in fp32 whatever the dtype of `inp` (16-bit inputs are upcast): the providers round in different
    places by design (the loop rounds every expert's Wd output), which in bf16 moves the router gradient
    by tens of percent at T=1; parity checks the function, not the rounding.
    `want` (reference_outputs of the same inputs) may be passed in to compute it once for several providers.
    A provider that raises fails parity, with the error kept.
    """
    inp = with_dtype(inp, torch.float32)
    want = want if want is not None else reference_outputs(inp, with_grads)
    try:
        got = _outputs(name, inp, with_grads)
    except Exception as exc:  # a provider that crashes is reported, not allowed to end the whole run
        return Parity(name, False, {}, error=f"{type(exc).__name__}: {exc}")
    rel_err = {}
    for key, w in want.items():
        scale = w.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
        rel_err[key] = ((got[key] - w).abs().max() / scale).item()
    ok = all(err <= tolerance(key) for key, err in rel_err.items())  # NaN compares False: a NaN fails
    return Parity(name, ok, rel_err)


def reference_outputs(inp: FfnInputs, with_grads: bool) -> dict[str, Tensor]:
    """What check_parity compares against: the reference's y (and gradients), in fp32."""
    return _outputs("reference", with_dtype(inp, torch.float32), with_grads)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    iqr_ms: float
    repeats: int
    peak_mem_mib: float | None  # CUDA max_memory_allocated over the repeats, inputs included; None on CPU


def measure(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Warm-up runs, then `repeats` timed runs, each synchronised on CUDA (events), wall clock on CPU."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return Timing(statistics.median(times), min(times), q3 - q1, len(times), peak)
