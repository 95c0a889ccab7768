"""The C++ CPU backend against the reference: every op, forward and every gradient, fp64/fp32/bf16."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, randomize_adapters, tiny_model
from transformers.activations import ACT2FN

import moelora
from moelora import MixLoraConfig, backend, get_moelora_model, reference
from moelora.reference import ExpertLora, FFNSpec

try:
    from moelora import cpu_backend as cpu
except ImportError as e:  # a machine with a compiler must have built it: skipping would hide a broken build
    if shutil.which(os.environ.get("CXX", "c++")):
        raise ImportError(f"moelora._C is not built although a C++ compiler exists: {e}") from e
    pytest.skip(f"moelora._C is not built and there is no C++ compiler: {e}", allow_module_level=True)

# Allowed error relative to the largest value of each compared tensor: fp64 and fp32 tight (a few ulps of
# the sums involved), bf16 tied to bf16's 8-bit mantissa (inputs rounded to bf16 before both paths).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def assert_close(got, want, dtype, what):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().float().clamp(min=1e-30)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def _grads(out, inputs, seed=7):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True)


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


ROUTE_CASES = [
    pytest.param(1, 16, 4, 1, None, id="T1-E4-k1"),
    pytest.param(7, 20, 4, 2, None, id="T7-E4-k2"),
    pytest.param(63, 24, 8, 2, None, id="T63-E8-k2"),
    pytest.param(63, 24, 8, 8, None, id="T63-E8-kE"),
    pytest.param(33, 20, 1, 1, None, id="T33-E1-k1"),
    pytest.param(63, 24, 8, None, 0.6, id="T63-E8-p0.6"),
    pytest.param(63, 24, 16, None, 1.0, id="T63-E16-p1.0"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("T", "H", "E", "top_k", "top_p"), ROUTE_CASES)
def test_route(T, H, E, top_k, top_p, dtype):
    g = torch.Generator().manual_seed(T * 100 + E)
    x = _leaf(torch.randn(T, H, generator=g, dtype=torch.float64), dtype)
    W = _leaf(
        torch.randn(E, H, generator=g, dtype=torch.float64) * 0.5, torch.float32 if dtype != torch.float64 else None
    )
    got, want = cpu.route(x, W, top_k=top_k, top_p=top_p), reference.route(x, W, top_k=top_k, top_p=top_p)
    assert torch.equal(got.indices, want.indices)
    assert_close(got.weights, want.weights, dtype, "weights")
    assert_close(got.probs, want.probs, dtype, "probs")

    def loss(r):
        return (r.weights * torch.linspace(0.5, 1.5, r.weights.shape[1], dtype=r.weights.dtype)).sum() + (
            r.probs.square()
        ).sum()

    for name, a, b in zip(
        ("x", "router"), torch.autograd.grad(loss(got), [x, W]), torch.autograd.grad(loss(want), [x, W]), strict=False
    ):
        assert_close(a, b, dtype, f"grad {name}")


def _routing(T, H, E, k, g, mode):
    """weights [T, k] fp32-or-fp64 and indices [T, k], with edge cases: an idle expert, one expert for all."""
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    if mode == "idle-expert" and E > 1:
        logits[:, 0] = -1e9
    if mode == "one-expert":
        logits[:, E - 1] = 1e9
    probs = torch.softmax(logits, -1)
    w, idx = probs.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    if mode == "unused-slots" and k > 1:
        idx[::2, -1] = -1
        w[::2, -1] = 0.0
    return w, idx


MOE_CASES = [
    pytest.param(1, 20, 17, 1, 1, 4, "plain", id="T1-E1-k1-r4"),
    pytest.param(7, 20, 17, 4, 2, 8, "plain", id="T7-E4-k2-r8"),
    pytest.param(63, 24, 33, 8, 2, 16, "idle-expert", id="T63-E8-k2-r16-idle"),
    pytest.param(63, 24, 33, 4, 4, 4, "plain", id="T63-E4-kE-r4"),
    pytest.param(63, 24, 33, 16, 2, 32, "one-expert", id="T63-E16-k2-r32-one"),
    pytest.param(33, 20, 17, 4, 3, 8, "unused-slots", id="T33-E4-k3-unused"),
    pytest.param(500, 24, 33, 8, 2, 16, "plain", id="T500-E8-k2-r16"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("T", "H", "O", "E", "k", "r", "mode"), MOE_CASES)
def test_moe_lora(T, H, O, E, k, r, mode, dtype):
    g = torch.Generator().manual_seed(T + E + r)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, idx = _routing(T, H, E, k, g, mode)
    x = _leaf(torch.randn(T, H, generator=g, dtype=torch.float64), dtype)
    w = _leaf(w, wdt)
    A = _leaf(torch.randn(E, r, H, generator=g, dtype=torch.float64) * 0.3, wdt)
    B = _leaf(torch.randn(E, O, r, generator=g, dtype=torch.float64) * 0.3, wdt)
    got, want = cpu.moe_lora(x, w, idx, A, B, 1.7), reference.moe_lora(x, w, idx, A, B, 1.7)
    assert_close(got, want, dtype, "y")
    for name, a, b in zip("xwAB", _grads(got, [x, w, A, B]), _grads(want, [x, w, A, B]), strict=False):
        assert_close(a, b, dtype, f"grad {name}")


FFN_CASES = [
    pytest.param(1, 20, 36, 1, 1, 4, "plain", "silu", ("gate", "up", "down"), id="T1-E1-k1-r4-silu"),
    pytest.param(7, 20, 36, 4, 2, 8, "plain", "silu", ("gate", "up", "down"), id="T7-E4-k2-r8-silu"),
    pytest.param(63, 24, 40, 8, 2, 16, "idle-expert", "silu", ("gate", "up", "down"), id="T63-E8-k2-r16-idle"),
    pytest.param(63, 24, 40, 4, 4, 8, "plain", "gelu_pytorch_tanh", ("gate", "up", "down"), id="T63-E4-kE-gelutanh"),
    pytest.param(63, 24, 40, 16, 2, 32, "one-expert", "silu", ("gate", "up", "down"), id="T63-E16-k2-r32-one"),
    pytest.param(33, 20, 36, 4, 3, 8, "unused-slots", "gelu", ("gate", "up", "down"), id="T33-E4-k3-unused-gelu"),
    pytest.param(33, 20, 36, 4, 2, 8, "plain", "silu", ("up", "down"), id="T33-no-gate-lora"),
    pytest.param(33, 20, 36, 4, 2, 8, "plain", "silu", ("gate", "up"), id="T33-no-down-lora"),
    pytest.param(33, 20, 36, 4, 2, 8, "plain", "gelu_new", ("up", "down"), id="T33-ungated-phi"),
    pytest.param(33, 20, 36, 4, 2, 8, "plain", "relu", ("gate", "down"), id="T33-relu-no-up-lora"),
    pytest.param(500, 24, 300, 8, 2, 16, "one-expert", "silu", ("gate", "up", "down"), id="T500-one-expert-2-chunks"),
    # Experts with a block's worth of rows or more take the rank kernels with transposed weights (rank_gemm.h).
    pytest.param(200, 24, 40, 4, 2, 64, "plain", "silu", ("gate", "up", "down"), id="T200-E4-k2-r64"),
    pytest.param(200, 20, 36, 2, 2, 8, "plain", "gelu", ("gate", "up", "down"), id="T200-E2-k2-r8-gelu"),
    pytest.param(33, 20, 36, 4, 2, 8, "plain", "quick_gelu", ("gate", "up", "down"), id="T33-quick-gelu-reference"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("T", "H", "I", "E", "k", "r", "mode", "act", "adapted"), FFN_CASES)
def test_mixlora_ffn(T, H, I, E, k, r, mode, act, adapted, dtype):
    g = torch.Generator().manual_seed(T + E + r + I)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, idx = _routing(T, H, E, k, g, mode)
    ungated = act == "gelu_new"
    x = _leaf(torch.randn(T, H, generator=g, dtype=torch.float64), dtype)
    gate = None if ungated else _leaf(torch.randn(T, I, generator=g, dtype=torch.float64), dtype)
    up = _leaf(torch.randn(T, I, generator=g, dtype=torch.float64), dtype)
    w = _leaf(w, wdt)
    Wd = torch.randn(H, I, generator=g, dtype=torch.float64).to(dtype) * I**-0.5
    bias = torch.randn(H, generator=g, dtype=torch.float64).to(dtype)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    loras = {
        p: ExpertLora(
            _leaf(torch.randn(E, r, dims[p][0], generator=g, dtype=torch.float64) * 0.3, wdt),
            _leaf(torch.randn(E, dims[p][1], r, generator=g, dtype=torch.float64) * 0.3, wdt),
        )
        for p in adapted
    }
    ffn = FFNSpec(
        gate_lora=loras.get("gate"),
        up_lora=loras.get("up"),
        down_lora=loras.get("down"),
        down_proj=lambda h: F.linear(h, Wd, bias),
        act=ACT2FN[act],
        scaling=1.3,
        down_bias=bias,
    )
    got = cpu.mixlora_ffn(x, gate, up, w, idx, ffn)
    want = reference.mixlora_ffn(x, gate, up, w, idx, ffn)
    assert_close(got, want, dtype, "y")
    inputs = [("x", x), ("up", up), ("weights", w)] + ([("gate", gate)] if gate is not None else [])
    inputs += [(f"{p}.{ab}", t) for p, lo in loras.items() for ab, t in zip("AB", lo, strict=False)]
    tensors = [t for _, t in inputs]
    for (name, _), a, b in zip(inputs, _grads(got, tensors), _grads(want, tensors), strict=True):
        assert_close(a, b, dtype, f"grad {name}")


# The rank kernels (csrc/rank_gemm.h) run with the widest instruction set the CPU has; MOELORA_RANK_KERNELS lowers
# it, read once per process. A child pytest runs the fp32 and bf16 FFN cases on each lower path, so an AVX-512
# machine checks the AVX2 build and the ATen one too.
@pytest.mark.parametrize("kernels", ["avx2", "off"])
def test_mixlora_ffn_on_each_rank_kernel_path(kernels):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cpu_backend.py"]
    cmd += ["-k", "test_mixlora_ffn and (float32 or bfloat16) and not rank_kernel"]
    env = dict(os.environ, MOELORA_RANK_KERNELS=kernels)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 2 * len(FFN_CASES), proc.stdout[-2000:]


def test_a_bad_rank_kernel_setting_names_the_variable():
    code = "import torch, moelora.cpu_backend; torch.ops.moelora.mixlora_ffn"
    code += "(*[torch.zeros(64, 8)] * 3, torch.ones(64, 1), torch.zeros(64, 1, dtype=torch.long), *[None] * 4,"
    code += " torch.zeros(1, 16, 8), torch.zeros(1, 8, 16), 1, 1.0, 'silu', 0.0, 0)"
    env = dict(os.environ, MOELORA_RANK_KERNELS="sse")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode != 0
    assert "MOELORA_RANK_KERNELS must be avx512, avx2 or off, got 'sse'" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama", "phi3", "phi", "gemma"])
@pytest.mark.parametrize(
    "overrides",
    [pytest.param(dict(), id="topk2"), pytest.param(dict(routing_strategy="mixlora-dynamic", top_p=0.7), id="topp")],
)
def test_whole_model_cpu_backend_equals_reference(family, overrides):
    pm = get_moelora_model(tiny_model(family, dtype=torch.float64), MixLoraConfig(lora_dropout=0.0, **overrides))
    randomize_adapters(pm)
    pm.train()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("reference", "cpu"):
        pm.zero_grad()
        with moelora.set_backend(name):
            out = pm(ids, labels=ids)
            out.loss.backward()
        results[name] = (
            out.logits.detach(),
            out.aux_loss.detach(),
            {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None},
        )
    (lr, ar, gr), (lc, ac, gc) = results["reference"], results["cpu"]
    # Adapters are fp32 in an fp64 model, so agreement is at fp32 precision.
    assert_close(lc, lr, torch.float32, "logits")
    assert_close(ac, ar, torch.float32, "aux loss")
    assert gr.keys() == gc.keys() and len(gr) > 0
    for n in gr:
        assert_close(gc[n], gr[n], torch.float32, f"grad {n}")


# 300 tokens: blocks of rows spread over the threads; 8 and 100: at most 256 (token, slot) pairs, the forward's
# two expert groups side by side (decoding sizes).
@pytest.mark.parametrize("T", [300, 100, 8])
def test_thread_counts_1_and_2_give_the_same_results(T):
    """Forward and backward of route + mixlora_ffn are bitwise equal with 1 and with 2 threads."""
    g = torch.Generator().manual_seed(0)
    H, I, E, k, r = 32, 72, 8, 2, 8
    x, up, gate = (torch.randn(T, n, generator=g) for n in (H, I, I))
    router = torch.randn(E, H, generator=g)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    loras = {
        p: ExpertLora(torch.randn(E, r, i, generator=g), torch.randn(E, o, r, generator=g))
        for p, (i, o) in dims.items()
    }
    Wd = torch.randn(H, I, generator=g)
    upstream = torch.randn(T, H, generator=g)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [
                t.detach().requires_grad_()
                for t in (x, up, gate, router, *[t for lo in loras.values() for t in lo[:2]])
            ]
            xl, ul, gl, rl, *flat = leaves
            lo = {p: ExpertLora(flat[2 * i], flat[2 * i + 1]) for i, p in enumerate(dims)}
            routing = cpu.route(xl, rl, top_k=k)
            ffn = FFNSpec(lo["gate"], lo["up"], lo["down"], down_proj=lambda h: h @ Wd.T, act=F.silu, scaling=2.0)
            y = cpu.mixlora_ffn(xl, gl, ul, routing.weights, routing.indices, ffn)
            runs.append([y, *torch.autograd.grad(y, leaves, upstream)])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# The row loops flush denormals to zero on their threads (csrc/common.h, FlushDenormals); the calling thread
# must get its mode back, or every later op in the process would flush them too.
@pytest.mark.parametrize("threads", [1, 2])
def test_the_ffn_gives_the_calling_thread_its_float_mode_back(threads):
    denormals = torch.tensor([1e-39, -3e-40, 5e-45])
    g = torch.Generator().manual_seed(1)
    T, H, I, E, k, r = 40, 16, 24, 4, 2, 4
    x, up, gate = (torch.randn(T, n, generator=g).requires_grad_() for n in (H, I, I))
    loras = {
        p: ExpertLora(torch.randn(E, r, i, generator=g), torch.randn(E, o, r, generator=g))
        for p, (i, o) in {"gate": (H, I), "up": (H, I), "down": (I, H)}.items()
    }
    w, idx = _routing(T, H, E, k, g, "plain")
    ffn = FFNSpec(loras["gate"], loras["up"], loras["down"], down_proj=lambda h: h[:, :H], act=F.silu, scaling=2.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = cpu.mixlora_ffn(x, gate, up, w, idx, ffn)
        torch.autograd.grad(y.sum(), [x, up, gate])
    finally:
        torch.set_num_threads(before)
    # Compared as bits: a float comparison would itself read the denormals as 0 under DAZ.
    bits = denormals.view(torch.int32)
    assert torch.equal((denormals * 1.0).view(torch.int32), bits), "denormals flushed after the op: FTZ/DAZ left on"


def test_without_the_extension_auto_warns_and_cpu_raises(monkeypatch):
    """A machine where moelora._C could not be built: the package works, on the reference."""
    import builtins

    real_import = builtins.__import__

    def no_extension(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "moelora" and fromlist and "cpu_backend" in fromlist:
            raise ImportError("moelora._C is not built (simulated)")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_extension)
    monkeypatch.setattr(backend, "_registered", {"reference": reference})
    monkeypatch.setattr(backend, "_cpu_tried", False)
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_why_missing", dict(backend._why_missing))
    with moelora.set_backend("auto"), pytest.warns(RuntimeWarning, match="moelora._C is not built"):
        assert backend.resolve(torch.device("cpu")) is reference
    with moelora.set_backend("cpu"), pytest.raises(RuntimeError, match="backend 'cpu' was requested but"):
        backend.resolve(torch.device("cpu"))


def test_auto_picks_the_cpu_backend_and_cpu_backend_rejects_other_devices():
    with moelora.set_backend("auto"):
        assert backend.resolve(torch.device("cpu")) is cpu
    with moelora.set_backend("cpu"), pytest.raises(RuntimeError, match="needs CPU tensors"):
        backend.resolve(torch.device("meta"))


BAD = [
    pytest.param(
        lambda: cpu.moe_lora(
            torch.randn(4, 8),
            torch.ones(4, 2),
            torch.zeros(4, 2, dtype=torch.long),
            torch.randn(3, 2, 9),
            torch.randn(3, 5, 2),
            1.0,
        ),
        "lora_A must be",
        id="A-in",
    ),
    pytest.param(
        lambda: cpu.moe_lora(
            torch.randn(4, 8), torch.ones(4, 2), torch.full((4, 2), 5), torch.randn(3, 2, 8), torch.randn(3, 5, 2), 1.0
        ),
        "expert index 5",
        id="idx",
    ),
    pytest.param(
        lambda: cpu.moe_lora(
            torch.randn(4, 8), torch.ones(4, 2), torch.zeros(4, 2), torch.randn(3, 2, 8), torch.randn(3, 5, 2), 1.0
        ),
        r"indices must be an integer tensor .* got Float",
        id="float-indices",
    ),
    pytest.param(
        lambda: torch.ops.moelora.mixlora_ffn(
            torch.randn(4, 8),
            None,
            torch.randn(4, 6),
            torch.ones(4, 1),
            torch.zeros(4, 1, dtype=torch.long),
            None,
            None,
            None,
            None,
            torch.randn(2, 3, 6),
            torch.randn(2, 8, 2),
            2,
            1.0,
            "silu",
            0.0,
            0,
        ),
        r"down LoRA must be A \[E=2, r, 6\] and B \[E, out, r\], got \[2, 3, 6\] and \[2, 8, 2\]",
        id="ffn-down-rank",
    ),
    pytest.param(
        lambda: cpu.route(torch.randn(4, 8), torch.randn(3, 8), top_k=0),
        r"top_k=0 selects top-p routing, which needs top_p in \(0, 1\], got top_p=0",
        id="route-k0",
    ),
    pytest.param(lambda: cpu.route(torch.randn(4, 8), torch.randn(3, 7), top_k=1), "8 features", id="route-H"),
    pytest.param(lambda: cpu.route(torch.randn(4, 8), torch.randn(3, 8), top_k=4), "exceeds 3", id="route-k"),
    pytest.param(
        lambda: cpu.route(torch.ones(4, 8, dtype=torch.long), torch.randn(3, 8), top_k=1), "floating", id="route-int"
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
