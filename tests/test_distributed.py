"""Scale-out on existing engines: torch.distributed DDP and FSDP2, and accelerate + transformers.Trainer,
on 2 CPU processes with the gloo backend.

What a 2-rank step computes: each rank backpropagates its own loss (cross-entropy over its half of the
batch + router_aux_loss_coef * aux over its half) and DDP / FSDP average the gradients, so the gradient is
that of the MEAN OF THE TWO PER-HALF LOSSES. It is not the gradient of the whole-batch loss in one process:
the aux loss E * sum_e F_e P_e multiplies two token means, so it is not linear in the batch (and a CE
averaged per half differs from the whole-batch CE when the halves hold different numbers of label
tokens). The tests compare with exactly that mean, computed in this process from the same model, and
show that the whole-batch gradient differs by far more than the tolerance.

Tolerance: gradients may differ from the single-process ones by 1e-6 of each tensor's largest value (fp32:
the ranks run the same kernels on the same rows; the only extra arithmetic is the all-reduce of two
values and a division by 2, both exact, so the measured difference is 0 on this machine). The Trainer's
loss divides a summed CE by the global token count and multiplies by the world size, which rounds
differently from a per-half mean: 1e-5 there.

Ranks are separate processes started here (a file:// rendezvous in the test's tmp dir: no port to
collide on) or by `accelerate launch` (a free port); each has a timeout, and a rank that fails or dies
(a signal included) fails the test with the tail of every rank's output.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moelora
from moelora import MoeLoraModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dist_trainer  # noqa: E402
from dist_worker import ENGINES, adapter_grads, build_model, global_batch, shard  # noqa: E402

TIMEOUT_S = 300
GRAD_RTOL = 1e-6
TRAINER_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for the in-process parts (the ranks set their own): on a shared 2-core machine
    OpenMP's waiting for a busy second core made these tiny models 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cpu_backend_built() -> bool:
    try:
        import moelora.cpu_backend  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = [
    pytest.param(("reference", "mixlora"), id="reference"),
    pytest.param(
        ("cpu", "mixlora"),
        id="cpu",
        marks=pytest.mark.skipif(not _cpu_backend_built(), reason="moelora._C is not built"),
    ),
    pytest.param(("reference", "milora"), id="milora-reference"),
]


def child_env(**extra: str) -> dict[str, str]:
    """The children import the moelora this process imported, one thread each (2 ranks share the cores)."""
    root = str(Path(moelora.__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([root, str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(rc: int | None) -> str:
    if rc is None:
        return f"still running after {TIMEOUT_S} s (killed)"
    if rc < 0:
        return f"killed by signal {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def run_processes(cmds: list[list[str]], envs: list[dict[str, str]], log_dir: Path, what: str) -> None:
    """Run the commands at once; fail the test (with every process's output) if any fails, dies or hangs."""
    logs = [log_dir / f"{what}-{i}.log" for i in range(len(cmds))]
    procs = []
    for cmd, env, log in zip(cmds, envs, logs, strict=True):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):  # one failed: the others would wait on it
            time.sleep(2)
            break
        time.sleep(0.2)
    codes = [p.poll() for p in procs]
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if any(c != 0 for c in codes):
        report = []
        for i, (c, log) in enumerate(zip(codes, logs, strict=True)):
            text = log.read_text()
            # The exceptions first (a launcher's own summary can push them out of the tail).
            raised = dict.fromkeys(m for m in re.findall(r"^\S*(?:Error|Exception)\b.*$", text, re.M))
            report.append(f"{what}: process {i} {_describe(c)}; raised: {list(raised)[:5]}\n{text[-3000:]}")
        pytest.fail("\n\n".join(report), pytrace=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert sorted(got) == sorted(want), f"parameter names differ: {sorted(set(got) ^ set(want))}"
    return max((rel_err(got[k], want[k]), k) for k in want)


def single_process(
    batches: list[dict[str, torch.Tensor]], aux_coef: float | None = None, method: str = "mixlora"
) -> dict:
    """Per-batch losses and gradients of a fresh build_model() in this process, and their means."""
    kwargs = {"method": method} if aux_coef is None else {"aux_coef": aux_coef, "method": method}
    losses, grads, aux_grads = [], [], []
    for batch in batches:
        model = build_model(**kwargs)
        out = model(**batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(adapter_grads(model))
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
        aux = model.peft_config["default"].router_aux_loss_coef * model(**batch).aux_loss
        aux_grad = torch.autograd.grad(aux, params, allow_unused=True)  # the last layer's experts get none
        aux_grads.append(
            {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, aux_grad, strict=True)}
        )
    mean = {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}
    aux_mean = {k: sum(g[k] for g in aux_grads) / len(aux_grads) for k in aux_grads[0]}
    return {"losses": losses, "grads": grads, "mean": mean, "aux_mean": aux_mean}


@pytest.fixture(scope="module", params=BACKENDS)
def engine_runs(request, tmp_path_factory) -> tuple[str, dict[str, list[dict]], dict]:
    """Two ranks of tests/dist_worker.py for one backend: {engine: [rank0, rank1]}, and the single-process oracle."""
    backend, method = request.param
    out = tmp_path_factory.mktemp(f"dist-{backend}-{method}")
    env = [
        child_env(RANK=str(r), WORLD_SIZE="2", INIT_METHOD=f"file://{out / 'rendezvous'}", DIST_METHOD=method)
        for r in range(2)
    ]
    cmd = [sys.executable, str(HERE / "dist_worker.py"), backend, str(out)]
    t0 = time.perf_counter()
    run_processes([cmd, cmd], env, out, f"dist_worker-{backend}")
    print(f"\n2-rank job ({backend}): {time.perf_counter() - t0:.1f} s for {len(ENGINES)} engines")
    results = {e: [torch.load(out / f"{e}-rank{r}.pt", weights_only=False) for r in range(2)] for e in ENGINES}
    with moelora.set_backend(backend):
        oracle = single_process([shard(global_batch(), r) for r in range(2)], method=method)
    return f"{backend}/{method}", results, oracle


@pytest.mark.parametrize("engine", ENGINES)
def test_two_rank_gradient_is_the_mean_of_the_per_rank_losses_gradient(engine_runs, engine):
    backend, results, oracle = engine_runs
    ranks = results[engine]
    errors = [r["error"] for r in ranks if "error" in r]
    assert not errors, f"{engine} on {backend} failed in a rank:\n{errors[0]}"
    for r, res in enumerate(ranks):
        # Each rank's loss is the single-process loss of its half (its own CE + its own aux).
        assert rel_err(res["loss"], oracle["losses"][r]) <= GRAD_RTOL, (res["loss"], oracle["losses"][r])
        err, name = max_rel_err(res["grads"], oracle["mean"])
        print(f"{engine}/{backend} rank {r}: max relative gradient error {err:.3g} ({name})")
        assert err <= GRAD_RTOL, f"rank {r}: {name} differs from the mean of the per-half gradients by {err:.3g}"
    for k in ranks[0]["grads"]:  # replicas apply the same averaged gradient
        assert torch.equal(ranks[0]["grads"][k], ranks[1]["grads"][k]), f"{k}: rank gradients differ"


@pytest.mark.parametrize(
    ("aux_coef", "padded", "equal"),
    [
        pytest.param(0.0, False, True, id="no-aux-no-padding-equal"),
        pytest.param(0.5, False, False, id="aux-differs"),
        pytest.param(0.0, True, False, id="unequal-token-counts-differ"),
    ],
)
def test_whole_batch_gradient_equals_the_mean_only_without_aux_and_with_equal_halves(aux_coef, padded, equal):
    """Why the 2-rank gradient is compared with the mean of the per-half gradients, not the whole batch's."""
    batch = global_batch(padded=padded)
    halves = single_process([shard(batch, r) for r in range(2)], aux_coef)
    whole = single_process([batch], aux_coef)
    err, name = max_rel_err(whole["mean"], halves["mean"])
    print(f"aux_coef={aux_coef} padded={padded}: whole batch vs mean of halves {err:.3g} ({name})")
    if equal:
        assert err <= 1e-5, f"{name}: {err:.3g}"
    else:
        assert err > 1e-3, f"{name}: the whole-batch gradient should differ, but only by {err:.3g}"


TRAINER_RUNS = [
    pytest.param(("cpu", "default"), id="cpu-trainer-defaults"),
    pytest.param(("reference", "off"), id="reference-find-unused-off"),
]


@pytest.fixture(scope="module", params=TRAINER_RUNS)
def trainer_run(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    """`accelerate launch` of tests/dist_trainer.py on 2 CPU processes.

    accelerate's `--cpu` starts ONE process unless MPI is set up (its multi-CPU path is mpirun);
    `--multi_gpu --num_processes 2` is its torchrun launcher, which starts 2 processes on a machine
    without GPUs too, and the Trainer (use_cpu=True) then uses gloo.
    """
    backend, find_unused = request.param
    if backend == "cpu" and not _cpu_backend_built():
        pytest.skip("moelora._C is not built")
    out = tmp_path_factory.mktemp(f"accelerate-{backend}-{find_unused}")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(HERE / "dist_trainer.py"), str(out), find_unused,
    ]  # fmt: skip
    t0 = time.perf_counter()
    run_processes([cmd], [child_env(MOELORA_BACKEND=backend)], out, "accelerate")
    print(f"\naccelerate launch ({backend}, find_unused={find_unused}): {time.perf_counter() - t0:.1f} s")
    return backend, out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_accelerate_trainer_trains_on_two_processes(trainer_run):
    _, out, ranks = trainer_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Two different shards: the processes did split the data.
    assert not torch.equal(ranks[0]["inputs"][0]["input_ids"], ranks[1]["inputs"][0]["input_ids"])
    losses = ranks[0]["losses"]
    assert len(losses) == dist_trainer.STEPS and all(math.isfinite(v) for v in losses), losses
    # DDP keeps the replicas in sync: both ranks end with the same adapter, bit for bit.
    for k, v in ranks[0]["adapter"].items():
        assert torch.equal(v, ranks[1]["adapter"][k]), f"{k}: the ranks' adapters differ after training"
    # The adapter rank 0 saved is the trained one and loads back onto a fresh base.
    loaded = MoeLoraModel.from_pretrained(build_model().model, str(out / "adapter"), adapter_name="loaded")
    for k, v in loaded.adapter_state_dict("loaded").items():
        assert torch.equal(v, ranks[0]["adapter"][k]), f"{k}: the saved adapter differs from the trained one"
    fresh = build_model().adapter_state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in ranks[0]["adapter"].items()), "training changed nothing"


def _check_trainer_gradient(grads: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]], what: str) -> None:
    """The Trainer's step-1 gradient is that of the mean of the micro-batch losses (CE + coef * aux each).

    Every micro-batch holds the same number of label tokens, so the Trainer's token-weighted CE (sum over
    every micro-batch's tokens / all of their tokens) equals the mean of the per-micro-batch CE means, and
    an aux term averaged over micro-batches (equal or token weights alike) gives the same mean.
    """
    oracle = single_process(batches)
    err, name = max_rel_err(grads, oracle["mean"])
    # Diagnosis for a failure: the gradient if each micro-batch's aux were summed instead of averaged.
    summed = {k: oracle["mean"][k] + (len(batches) - 1) * oracle["aux_mean"][k] for k in grads}
    err_sum, _ = max_rel_err(grads, summed)
    print(f"{what}: max relative error vs mean of losses {err:.3g} ({name}); vs summed aux {err_sum:.3g}")
    assert err <= TRAINER_RTOL, (
        f"{what}: the step-1 gradient is not that of the mean of the micro-batch losses ({name}: {err:.3g}); "
        f"against CE + coef * SUM of the {len(batches)} micro-batches' aux losses it errs by {err_sum:.3g}"
    )


def test_accelerate_trainer_gradient_is_the_mean_of_the_per_rank_losses(trainer_run):
    backend, _, ranks = trainer_run
    for k, g in ranks[0]["grads"].items():
        assert torch.equal(g, ranks[1]["grads"][k]), f"{k}: the ranks applied different gradients"
    with moelora.set_backend(backend):
        _check_trainer_gradient(ranks[0]["grads"], [r["inputs"][0] for r in ranks], f"accelerate/{backend}")


def test_trainer_gradient_accumulation_averages_the_micro_batch_losses(tmp_path):
    """One process, 2 accumulated micro-batches: the same averaging as 2 ranks, without a launch."""
    result = dist_trainer.train(str(tmp_path), grad_accum=2, steps=1)
    assert len(result["inputs"]) == 2
    _check_trainer_gradient(result["grads"], result["inputs"], "gradient accumulation (reference)")
