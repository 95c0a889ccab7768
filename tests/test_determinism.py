"""Determinism: the same input twice gives bitwise the same outputs, on every backend CI can run.

Forward, at the op level (route, moe_lora, mixlora_ffn, lora) and for a tiny MixLoRA llama (eval, and
training with dropout and jitter noise under the same seed); backward too, under
torch.use_deterministic_algorithms(True), where an op without a deterministic implementation would have
to raise a RuntimeError naming itself. Backends: reference and cpu here; Triton (route and moe_lora)
under TRITON_INTERPRET=1 in a child process (this file run as a script), so that an interpreter crash
fails the test instead of pytest.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the Triton child: before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import VOCAB, randomize_adapters, tiny_model
from test_properties import load_backend

import moelora
from moelora import MixLoraConfig, get_moelora_model
from moelora.reference import ExpertLora, FFNSpec


def _cpu_built() -> bool:
    try:
        load_backend("cpu")
    except ImportError:
        return False
    return True


BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not _cpu_built(), reason="moelora._C is not built")),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these ops are tiny, and on a shared 2-core machine OpenMP's waiting for a busy
    second core made them 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextmanager
def deterministic(on: bool) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _inputs(T: int = 300, H: int = 24, I: int = 40, E: int = 8, r: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(T, H, generator=g),
        router=torch.randn(E, H, generator=g),
        gate=torch.randn(T, I, generator=g),
        up=torch.randn(T, I, generator=g),
        A=torch.randn(E, r, H, generator=g) / H**0.5,
        B=torch.randn(E, I, r, generator=g),
        dA=torch.randn(E, r, I, generator=g) / I**0.5,
        dB=torch.randn(E, H, r, generator=g),
        Wd=torch.randn(H, I, generator=g) / I**0.5,
        A2=torch.randn(r, H, generator=g),
        B2=torch.randn(I, r, generator=g),
        upstream=torch.randn(T, I, generator=g),
        upstream_h=torch.randn(T, H, generator=g),
    )


def _op_runs(impl: object) -> dict[str, Callable[[dict], list[torch.Tensor]]]:
    """Each op's outputs and the gradients of every differentiable input, from fresh leaves."""

    def leaves(d: dict, *names: str) -> list[torch.Tensor]:
        return [d[n].clone().requires_grad_() for n in names]

    def route(d: dict) -> list[torch.Tensor]:
        x, w = leaves(d, "x", "router")
        r = impl.route(x, w, top_k=2)
        loss = (r.weights * torch.linspace(0.5, 1.5, 2)).sum() + r.probs.square().sum()
        return [r.weights, r.indices, r.probs, *torch.autograd.grad(loss, [x, w])]

    def route_top_p(d: dict) -> list[torch.Tensor]:
        x, w = leaves(d, "x", "router")
        r = impl.route(x, w, top_p=0.7)
        return [r.weights, r.indices, r.probs, *torch.autograd.grad(r.weights.sum() + r.probs[:, 0].sum(), [x, w])]

    def moe_lora(d: dict) -> list[torch.Tensor]:
        r = load_backend("reference").route(d["x"], d["router"], top_k=2)
        x, w, A, B = leaves({**d, "w": r.weights}, "x", "w", "A", "B")
        y = impl.moe_lora(x, w, r.indices, A, B, 2.0)
        return [y, *torch.autograd.grad(y, [x, w, A, B], d["upstream"])]

    def mixlora_ffn(d: dict) -> list[torch.Tensor]:
        r = load_backend("reference").route(d["x"], d["router"], top_k=2)
        x, gate, up, w, A, B, dA, dB = leaves({**d, "w": r.weights}, "x", "gate", "up", "w", "A", "B", "dA", "dB")
        ffn = FFNSpec(
            gate_lora=ExpertLora(A, B),
            up_lora=ExpertLora(A, B),
            down_lora=ExpertLora(dA, dB),
            down_proj=lambda h: F.linear(h, d["Wd"]),
            act=F.silu,
            scaling=2.0,
        )
        y = impl.mixlora_ffn(x, gate, up, w, r.indices, ffn)
        return [y, *torch.autograd.grad(y, [x, gate, up, w, A, B, dA, dB], d["upstream_h"])]

    def lora(d: dict) -> list[torch.Tensor]:
        x, A, B = leaves(d, "x", "A2", "B2")
        y = impl.lora(x, A, B, 2.0)
        return [y, *torch.autograd.grad(y, [x, A, B], d["upstream"])]

    runs = {"route": route, "route-top-p": route_top_p, "moe_lora": moe_lora, "lora": lora}
    if hasattr(impl, "mixlora_ffn"):
        runs["mixlora_ffn"] = mixlora_ffn
    return runs


def twice(fn: Callable[[], list[torch.Tensor]]) -> list[str]:
    """Run fn twice under deterministic algorithms; the outputs that are not bitwise equal (empty = pass).

    A RuntimeError about determinism must name the op: it is returned as the one failure, with its text.
    """
    with deterministic(True):
        try:
            first, second = fn(), fn()
        except RuntimeError as e:
            if "deterministic" not in str(e):
                raise
            return [f"not deterministic: {e}"]
    return [f"output {i}" for i, (a, b) in enumerate(zip(first, second, strict=True)) if not torch.equal(a, b)]


def test_the_check_sees_a_one_ulp_difference():
    calls = iter([torch.ones(3), torch.ones(3).nextafter(torch.full((3,), 2.0))])
    assert twice(lambda: [next(calls)]) == ["output 0"]


OPS = ["route", "route-top-p", "moe_lora", "mixlora_ffn", "lora"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op_forward_and_backward_are_bitwise_repeatable(backend, op):
    d = _inputs()
    fn = _op_runs(load_backend(backend))[op]
    failures = twice(lambda: fn(d))
    assert not failures, f"{op} on {backend}: {failures}"


def _model(train: bool):
    config = MixLoraConfig(
        r=4, lora_alpha=8, num_experts=4, top_k=2, lora_dropout=0.1 if train else 0.0, jitter_noise=0.05
    )
    model = get_moelora_model(tiny_model("llama", seed=0), config)
    randomize_adapters(model, seed=1)
    return model.train(train)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train-dropout-jitter"])
def test_model_forward_and_backward_are_bitwise_repeatable(backend, mode):
    """Eval: no randomness at all. Training: dropout and jitter noise draw from torch's RNG, seeded the same."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0

    def run() -> list[torch.Tensor]:
        model = _model(train=mode != "eval")
        torch.manual_seed(1234)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        params = [p for p in model.parameters() if p.requires_grad]
        return [out.logits, out.loss, out.aux_loss, *torch.autograd.grad(out.loss, params)]

    with moelora.set_backend(backend):
        failures = twice(run)
    assert not failures, f"{mode} on {backend}: not bitwise repeatable: {failures}"


# ----------------------------------------------------------------------------- Triton, in a child process

TRITON_OPS = ["route", "route-top-p", "moe_lora"]


def triton_worker(out_path: str) -> None:
    d = _inputs(T=70)  # three 32-token blocks, the last one partial
    runs = _op_runs(load_backend("triton"))
    Path(out_path).write_text(json.dumps({op: twice(lambda fn=runs[op]: fn(d)) for op in TRITON_OPS}))


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory) -> dict[str, list[str]]:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton-determinism") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = str(Path(moelora.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the Triton interpreter child did not finish in 600 s", pytrace=False)
    if proc.returncode != 0 or not out.exists():
        rc = proc.returncode
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        pytest.fail(f"the Triton interpreter child died ({how}):\n{proc.stderr[-4000:]}", pytrace=False)
    return json.loads(out.read_text())


@pytest.mark.parametrize("op", TRITON_OPS)
def test_triton_interpreted_forward_and_backward_are_bitwise_repeatable(triton_results, op):
    assert not triton_results[op], f"{op} on triton (interpreted): {triton_results[op]}"


if __name__ == "__main__":
    triton_worker(sys.argv[1])
