"""Parity against the reference, and the timer: median of N repeats after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from bench.suites import Suite

MODES = ("fwd", "fwd+bwd")  # of the op suites; the model suite has its own
# Allowed max |got - want| / max |want|, in fp32. Summing in another order (Wd per expert or once) moves
# y and the x / LoRA gradients by ~1e-6 (at most 1.9e-6 over 200 seeds at T=1). The router gradient of a
# whole FFN is a difference of the chosen experts' contributions and loses digits when they nearly cancel:
# median 1.2e-6, p99 5.7e-5, max 1.8e-3 over the same 200 seeds. A wrong formula moves either by far more.
TOLERANCE = 1e-4
ROUTER_GRAD_TOLERANCE = 1e-2

# A case whose interquartile range exceeds this fraction of its median was timed on a busy machine (or is
# too short to time): the run warns.
SPREAD_LIMIT = 0.10

# Bytes written between timed CUDA runs so that no run finds its inputs in L2 (50 MiB on an H100, 60 on
# an H200), as triton.testing.do_bench does.
L2_FLUSH_BYTES = 256 * 2**20


def primary(out: Any) -> Tensor:
    """The output a backward starts from: y itself, or the first field (weights) of a Routing."""
    return out if isinstance(out, Tensor) else out[0]


def make_step(fn: Callable[[], Any], targets: list[Tensor], grad_out: Tensor, mode: str) -> Callable[[], object]:
    """One timed unit. fwd: inference, under no_grad. fwd+bwd: forward, then the gradients of
    sum(out * grad_out) with respect to `targets` (autograd.grad, so nothing accumulates between repeats)."""
    if mode == "fwd":

        def step() -> object:
            with torch.no_grad():
                return fn()

        return step
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(primary(fn()), targets, grad_out)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass
class Parity:
    provider: str
    ok: bool
    rel_err: dict[str, float]  # output name ("y", "d<input>") -> max |got - want| / max |want|
    allowed: dict[str, float]  # output name -> its bound
    error: str | None = None  # what the provider raised, if it did

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.provider}: FAILED ({self.error})"
        key = max(self.rel_err, key=lambda k: self.rel_err[k] / self.allowed[k])
        verdict = "ok" if self.ok else "FAILED"
        err, tol = self.rel_err[key], self.allowed[key]
        return f"{self.provider}: {verdict} (nearest its bound: {key} rel err {err:.1e}, allowed {tol:.0e})"


def check_parity(suite: Suite, name: str, inp: Any, with_grads: bool, want: dict[str, Tensor] | None = None) -> Parity:
    """Compare provider `name` of `suite` with its `reference` on `inp`: every output and, with_grads, gradient.

    `inp` should be fp32 (the runner builds fp32 inputs for parity whatever --dtype): the providers round in
    different places by design (the loop rounds every expert's Wd output), which in bf16 moves the router
    gradient by tens of percent at T=1; parity checks the function, not the rounding.
    `want` (suite.outputs("reference", ...)) may be passed in to compute it once for several providers.
    A provider that raises fails parity, with the error kept.
    """
    want = want if want is not None else suite.outputs("reference", inp, with_grads)
    allowed = {key: suite.tolerance(key) for key in want}
    try:
        got = suite.outputs(name, inp, with_grads)
        rel_err = {}
        for key, w in want.items():
            if got[key].shape != w.shape:
                raise ValueError(f"{key} has shape {tuple(got[key].shape)}, the reference {tuple(w.shape)}")
            scale = w.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
            rel_err[key] = ((got[key].to(w.dtype) - w).abs().max() / scale).item()
    except Exception as exc:  # a provider that crashes is reported, not allowed to end the whole run
        return Parity(name, False, {}, allowed, error=f"{type(exc).__name__}: {exc}")
    ok = all(err <= allowed[key] for key, err in rel_err.items())  # NaN compares False: a NaN fails
    return Parity(name, ok, rel_err, allowed)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    iqr_ms: float
    repeats: int
    peak_mem_mib: float | None  # CUDA: max_memory_allocated over the repeats, inputs included; CPU: None here
    cuda_graph: bool = False  # timed as a CUDA graph replay
    graph_error: str | None = None  # why the capture failed, when one was asked for


def cuda_graph_replay(step: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`step` captured once into a CUDA graph; returns its replay. Warm-up on a side stream first, as
    torch.cuda.graphs asks. Only for steps without host syncs (the reference's expert sizes are one)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def measure(
    step: Callable[[], object], device: torch.device, warmup: int, repeats: int, cuda_graph: bool = False
) -> Timing:
    """Warm-up runs, then `repeats` timed runs: wall clock on CPU; on CUDA a pair of events around each run,
    synchronised, with L2 flushed before it, and (cuda_graph) the run replayed from a captured graph."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    peak, graphed, graph_error = None, False, None
    if device.type == "cuda":
        if cuda_graph:
            try:
                step = cuda_graph_replay(step, device)
                graphed = True
            except Exception as exc:  # a step that syncs cannot be captured: time it eagerly instead
                torch.cuda.synchronize(device)
                graph_error = f"{type(exc).__name__}: {exc}"
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated(device) - L2_FLUSH_BYTES) / 2**20
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return _timing(times, peak, graphed, graph_error)


def round_robin_times(
    steps: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """`warmup` runs of each step, then `repeats` rounds in which every step runs once, in order; wall clock.
    Returns ({name: [ms per timed run]}, {name: error message of a step that raised; it left the later rounds}).
    """
    failed: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            if name in failed:
                continue
            t0 = time.perf_counter()
            try:
                step()
            except Exception as exc:  # one broken provider (say out of memory) must not lose the others
                failed[name] = f"error: {type(exc).__name__}: {exc}"
                continue
            if round_ >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times, failed


def measure_round_robin(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, Timing | str]:
    """CPU: the steps timed in rounds (round_robin_times); {name: Timing, or the error of a step that raised}.

    The 2-core VMs drift over the seconds of a case (their speed moves 10-50% with their neighbours, and a process
    pays page faults or not depending on what it allocated before), so providers timed back to back can differ
    by that much. Timed in rounds, a drift falls on every provider alike.
    """
    times, failed = round_robin_times(steps, warmup, repeats)
    return {name: failed[name] if name in failed else _timing(times[name]) for name in steps}


def _timing(
    times: list[float], peak: float | None = None, graphed: bool = False, graph_error: str | None = None
) -> Timing:
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return Timing(statistics.median(times), min(times), q3 - q1, len(times), peak, graphed, graph_error)


def spread(row: dict) -> float | None:
    """A timed row's IQR as a fraction of its median; None when it has no spread to speak of (one repeat)."""
    if row.get("status") != "ok" or row.get("repeats", 0) < 2 or not row.get("median_ms"):
        return None
    return row["iqr_ms"] / row["median_ms"]


def busy_warnings(
    suite: str, case: str, rows: list[dict], threads: int, load_before: float | None, load_after: float | None
) -> list[str]:
    """Why `suite`'s timings may not be the machine's own: the 1-minute load average above the thread count
    before or after the suite (other work shared the cores), or cases whose IQR is over SPREAD_LIMIT of the
    median. `rows` are the suite's result rows (`case` names their row key: T or B)."""
    warnings = []
    loads = {"before": load_before, "after": load_after}
    high = {when: load for when, load in loads.items() if load is not None and load > threads}
    if high:
        seen = ", ".join(f"{load:.2f} {when}" for when, load in high.items())
        warnings.append(
            f"{suite}: the machine was busy: 1-minute load average {seen} the suite, above its {threads} thread(s)"
        )
    wide = [(r, frac) for r in rows if (frac := spread(r)) is not None and frac > SPREAD_LIMIT]
    if wide:
        cases = ", ".join(f"{case}={r[case]} {r['mode']} {r['provider']} {frac:.0%}" for r, frac in wide)
        warnings.append(
            f"{suite}: IQR over {SPREAD_LIMIT:.0%} of the median in {len(wide)} of {len(rows)} cases ({cases})"
        )
    return warnings
