"""Peak memory of one case on the CPU, measured in a process of its own.

The child builds the case (inputs, model, the provider's set-up), resets the kernel's peak-RSS mark
(VmHWM) to its current RSS, runs the step `calls` times and reports how far the mark rose: the memory
those calls add on top of the set-up (activations, outputs, gradients, optimiser state, allocator
caching), inputs and weights not counted.

Children are forked from a forkserver that has imported bench.suites once: importing moelora (and so
transformers) takes about 7 s here, a fork a few ms. The server only imports, it runs no torch op, so
its children start with no thread pool to inherit.

Not ru_maxrss: a child inherits its parent's peak through exec (measured here: a child of an 813 MiB
process reports ru_maxrss = 813 MiB on its first line), which hides any growth smaller than the parent.
Linux only (/proc/self/status, /proc/self/clear_refs); elsewhere every probe fails with the reason.
"""

from __future__ import annotations

import gc
import multiprocessing
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

CALLS = 3
_context: Any = None


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    """Set the peak-RSS mark to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(case: dict) -> float:
    """In this process: build `case`, reset the mark, run its step `calls` times; MiB the mark rose."""
    from bench.suites import SUITES

    torch.set_num_threads(case["threads"])
    suite = SUITES[case["suite"]]
    dims = dict(case["shape"])
    shape = suite.shape(dims.pop(suite.case), dims)
    inp = suite.make_inputs(shape, getattr(torch, case["dtype"]), torch.device("cpu"))
    step = suite.step(case["provider"], inp, case["mode"])
    gc.collect()
    _reset_hwm()
    before = _hwm_kib()
    for _ in range(case["calls"]):
        step()
    return (_hwm_kib() - before) / 1024


def _child(case: dict, conn: Connection) -> None:
    try:
        conn.send(("ok", measure(case)))
    except Exception as exc:  # reported by the parent as this case's memory error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def probe(suite: str, shape: Any, provider: str, mode: str, dtype: str, threads: int, calls: int = CALLS) -> float:
    """MiB of peak-RSS growth over `calls` calls of one case, in a fresh child; RuntimeError if it fails."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["bench.suites", "bench.memory"])
    case = {"suite": suite, "shape": asdict(shape), "provider": provider, "mode": mode, "dtype": dtype}
    case |= {"threads": threads, "calls": calls}
    receive, send = _context.Pipe(duplex=False)
    child = _context.Process(target=_child, args=(case, send), daemon=True)
    child.start()
    send.close()
    try:
        status, value = receive.recv()
    except EOFError:
        status, value = "error", "the child died before reporting"
    finally:
        child.join()
    if status != "ok":
        raise RuntimeError(f"memory probe failed: {value} (exit code {child.exitcode})")
    return value
