"""Peak memory of one case on the CPU, measured in a fresh subprocess: `python3 -m bench.memory CASE_JSON`.

The child builds the case (inputs, model, the provider's set-up), resets the kernel's peak-RSS mark
(VmHWM) to the current RSS, runs the step `calls` times and reports how far the mark rose: the memory
those calls add on top of the set-up (activations, outputs, gradients, optimiser state, allocator
caching), not counting the inputs.

Not ru_maxrss: a child started by subprocess inherits the parent's peak through exec (measured here: a
child of an 813 MiB process reports ru_maxrss = 813 MiB on its first line), which would hide any growth
smaller than the benchmark process itself. Linux only; elsewhere the probe reports that it cannot measure.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
CALLS = 3


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    """Set the peak-RSS mark to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def probe(suite: str, shape: Any, provider: str, mode: str, dtype: str, threads: int, calls: int = CALLS) -> float:
    """MiB of peak-RSS growth over `calls` calls of one case, in a subprocess; raises RuntimeError if it fails."""
    case = {"suite": suite, "shape": asdict(shape), "provider": provider, "mode": mode, "dtype": dtype}
    case |= {"threads": threads, "calls": calls}
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", json.dumps(case)], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])["growth_mib"]


def main(argv: list[str]) -> int:
    from bench.suites import SUITES

    case = json.loads(argv[0])
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
    after = _hwm_kib()
    print(json.dumps({"baseline_mib": before / 1024, "peak_mib": after / 1024, "growth_mib": (after - before) / 1024}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
