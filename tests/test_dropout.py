"""Seeded LoRA dropout (moelora.dropout): the Philox mask, the reference FFN against a plain fp64 oracle, and the
C++ fused FFN (moelora.cpu_backend) against the reference, forward and every gradient, down to a whole model.

The C++ cases are skipped only where moelora._C is not built.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, randomize_adapters, tiny_model

import moelora
from moelora import MixLoraConfig, backend, get_moelora_model, reference
from moelora import dropout as seeded
from moelora.dropout import H_STREAM, X_STREAM, LoraDropout
from moelora.reference import ExpertLora, FFNSpec

try:
    from moelora import cpu_backend as cpu
except ImportError:
    cpu = None
needs_cpu = pytest.mark.skipif(cpu is None, reason="moelora._C is not built")

# Allowed error relative to the largest value of each compared tensor (as tests/test_cpu_backend.py).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def assert_close(got, want, dtype, what):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    scale = want.abs().max().double().clamp(min=1e-30)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


# --- the mask ----------------------------------------------------------------------------------------------

# Random123's kat_vectors for philox4x32-10: counter, key -> output.
PHILOX_KAT = [
    pytest.param((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8), id="zeros"),
    pytest.param((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD), id="all-ones"),
    pytest.param(
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        id="pi",
    ),
]


@pytest.mark.parametrize(("counter", "key", "want"), PHILOX_KAT)
def test_philox_known_answers(counter, key, want):
    words = seeded.philox4x32(tuple(torch.tensor([c]) for c in counter), key[0] | key[1] << 32)
    assert tuple(int(w) for w in words) == want


@needs_cpu
@pytest.mark.parametrize("element", range(8))
def test_cpp_mask_reads_the_zeros_known_answer(element):
    """Group 0 of seed 0, stream 0 is Philox of counter 0, key 0: u(e) is the known answer's 16-bit half e, so
    the C++ mask keeps element e at p = u(e) / 2^16 and drops it at p = (u(e) + 1) / 2^16."""
    words = (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    u = (words[element // 2] >> (16 * (element % 2))) & 0xFFFF
    assert cpu.dropout_mask(0, X_STREAM, 8, u / 65536)[element]
    assert not cpu.dropout_mask(0, X_STREAM, 8, (u + 1) / 65536)[element]


SEEDS = [
    pytest.param(0, id="seed0"),
    pytest.param(12345, id="seed12345"),
    pytest.param(2**32 - 1, id="seed2^32-1"),
    pytest.param(2**32, id="seed2^32"),
    pytest.param(2**40 + 77, id="seed2^40+77"),
    pytest.param(2**63 + 5, id="seed2^63+5"),
    pytest.param(2**64 - 1, id="seed2^64-1"),
]
P = [pytest.param(p, id=f"p{p}") for p in (0.05, 0.5, 0.9)]
# Odd sizes, the 512-element block of the C++ mask, and enough elements for several threads' blocks.
NUMELS = (0, 1, 7, 8, 9, 511, 513, 4099, 70001)


@needs_cpu
@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("stream", [X_STREAM, H_STREAM, 7], ids=lambda s: f"stream{s}")
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_mask_equals_the_python_mask(seed, stream, p):
    for numel in NUMELS:
        got, want = cpu.dropout_mask(seed, stream, numel, p), seeded.dropout_mask(seed, stream, numel, p)
        assert got.dtype == torch.bool and got.shape == (numel,)
        assert torch.equal(got, want), (
            f"numel {numel}: masks differ at {(got != want).nonzero().flatten()[:8].tolist()}"
        )


def _mask_impls():
    impls = [pytest.param(seeded.dropout_mask, id="python")]
    impls.append(pytest.param(cpu.dropout_mask if cpu else None, id="cpp", marks=needs_cpu))
    return impls


@pytest.mark.parametrize("p", [*P, pytest.param(0.001, id="p0.001")])
@pytest.mark.parametrize("mask", _mask_impls())
def test_keep_rate_is_within_4_sigma_of_1_minus_p(mask, p):
    n = 10**6
    keep = mask(2024, X_STREAM, n, p)
    q = 1 - seeded.drop_threshold(p) / 65536  # the keep probability the 16-bit threshold gives
    assert abs(q - (1 - p)) <= 2**-17
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(keep.sum().item() - n * (1 - p)) <= 4 * sigma


@pytest.mark.parametrize("p", P)
def test_kept_elements_are_scaled_by_exactly_1_over_1_minus_p(p):
    d = LoraDropout(p, 99)
    out = seeded.apply(torch.ones(10**5, dtype=torch.float64), d, H_STREAM)
    keep = seeded.dropout_mask(d.seed, H_STREAM, out.numel(), p)
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))
    assert out[keep].unique().tolist() == [1 / (1 - p)]  # every kept factor is 1/(1-p), so is their mean
    assert out[keep].mean().item() == pytest.approx(1 / (1 - p), rel=1e-15, abs=0)


@pytest.mark.parametrize("mask", _mask_impls())
def test_one_seed_repeats_and_two_seeds_differ(mask):
    a, b, c = mask(7, X_STREAM, 4096, 0.5), mask(7, X_STREAM, 4096, 0.5), mask(8, X_STREAM, 4096, 0.5)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.4  # independent masks at p = 0.5 disagree on about half the elements
    assert (a != mask(7, H_STREAM, 4096, 0.5)).float().mean() > 0.4  # and so do two streams of one seed


def test_draw_is_none_at_p0_and_seeded_by_torch():
    assert LoraDropout.draw(0.0) is None
    torch.manual_seed(3)
    first = LoraDropout.draw(0.05)
    torch.manual_seed(3)
    assert LoraDropout.draw(0.05) == first
    assert LoraDropout.draw(0.05) != first


# --- the FFN -----------------------------------------------------------------------------------------------

ACTS = {"silu": F.silu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}


def _problem(T, H, I, E, k, r, dtype, *, gated=True, top_p=None, seed=0):
    """Leaves of one FFN call: x, gate (None ungated), up, routing weights and indices, the three LoRAs."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    x = leaf(T, H)
    gate = leaf(T, I) if gated else None
    up = leaf(T, I)
    router = torch.randn(E, H, generator=g, dtype=torch.float64).to(dtype)
    routing = reference.route(x.detach(), router, top_k=None if top_p else k, top_p=top_p)
    w = routing.weights.detach().requires_grad_()
    loras = {
        "gate": ExpertLora(leaf(E, r, H, scale=0.4), leaf(E, I, r, scale=0.4)) if gated else None,
        "up": ExpertLora(leaf(E, r, H, scale=0.4), leaf(E, I, r, scale=0.4)),
        "down": ExpertLora(leaf(E, r, I, scale=0.4), leaf(E, H, r, scale=0.4)),
    }
    Wd = torch.randn(H, I, generator=g, dtype=torch.float64).to(dtype) * I**-0.5
    bias = torch.randn(H, generator=g, dtype=torch.float64).to(dtype)
    return x, gate, up, w, routing.indices, loras, Wd, bias


def _named_inputs(x, gate, up, w, loras):
    named = [("x", x), ("up", up), ("weights", w)] + ([("gate", gate)] if gate is not None else [])
    return named + [
        (f"{p}.{ab}", t) for p, lo in loras.items() if lo is not None for ab, t in zip("AB", lo[:2], strict=True)
    ]


def _run(ffn, x, gate, up, w, idx, loras, Wd, bias, act, dropout, upstream_seed=5):
    """ffn's output (a backend's mixlora_ffn) and the gradients of every input, for a fixed random upstream."""
    spec = FFNSpec(
        gate_lora=loras["gate"],
        up_lora=loras["up"],
        down_lora=loras["down"],
        down_proj=lambda h: F.linear(h, Wd, bias),
        act=act,
        scaling=1.3,
        down_bias=bias,
        dropout=dropout,
    )
    y = ffn(x, gate, up, w, idx, spec)
    named = _named_inputs(x, gate, up, w, loras)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    grads = torch.autograd.grad(y, [t for _, t in named], upstream.to(y.dtype), allow_unused=True)
    # An input y does not depend on (T = 0: the reference never runs the down LoRA) has a zero gradient.
    return y, {name: torch.zeros_like(t) if gr is None else gr for (name, t), gr in zip(named, grads, strict=True)}


def oracle_ffn(x, gate, up, w, idx, ffn: FFNSpec):
    """The MixLoRA FFN with dropout written plainly, per token and per slot, in fp64 (masks from dropout_mask).

    xd = drop_X(x[t]),  h_j = act(G[t] + s Bg Ag xd) * (U[t] + s Bu Au xd)   (ungated: act(U[t] + s Bu Au xd)),
    y[t] = Wd sum_j w_j h_j + sum_j w_j b + sum_j w_j s Bd Ad drop_H(h_j).
    """
    gate_lora, up_lora, down_lora = ffn.loras
    down_proj, act, scaling, down_bias, dropout = ffn.down_proj, ffn.act, ffn.scaling, ffn.down_bias, ffn.dropout
    T, H = x.shape
    k, I = idx.shape[1], up.shape[1]
    s, scale = scaling, 1 / (1 - dropout.p)
    keep_x = seeded.dropout_mask(dropout.seed, X_STREAM, T * H, dropout.p).reshape(T, H).double()
    keep_h = seeded.dropout_mask(dropout.seed, H_STREAM, T * k * I, dropout.p).reshape(T, k, I).double()

    def delta(lora, e, v):
        return s * lora.B[e].double() @ (lora.A[e].double() @ v)

    rows = []
    for t in range(T):
        xd = x[t].double() * keep_x[t] * scale
        hbar = torch.zeros(I, dtype=torch.float64)
        y_lora = torch.zeros(H, dtype=torch.float64)
        for j in range(k):
            e = int(idx[t, j])
            if e < 0:
                continue
            u = up[t].double() + delta(up_lora, e, xd)
            if gate is None:
                h = act(u)
            else:
                h = act(gate[t].double() + (delta(gate_lora, e, xd) if gate_lora is not None else 0.0)) * u
            hbar = hbar + w[t, j].double() * h
            y_lora = y_lora + w[t, j].double() * delta(down_lora, e, h * keep_h[t, j] * scale)
        base = down_proj(hbar.unsqueeze(0)).squeeze(0)  # Wd hbar + b
        rows.append(base + (w[t].double().sum() - 1) * down_bias.double() + y_lora)
    return torch.stack(rows) if rows else torch.zeros(0, H, dtype=torch.float64)


ORACLE_CASES = [
    pytest.param(5, 6, 7, 3, 2, 2, True, None, id="T5-H6-I7-E3-k2-gated"),
    pytest.param(5, 6, 7, 3, 2, 2, False, None, id="T5-H6-I7-E3-k2-ungated"),
    pytest.param(6, 5, 9, 4, None, 3, True, 0.6, id="T6-H5-I9-E4-top-p0.6"),
]


@pytest.mark.parametrize("p", [pytest.param(0.3, id="p0.3"), pytest.param(0.7, id="p0.7")])
@pytest.mark.parametrize(("T", "H", "I", "E", "k", "r", "gated", "top_p"), ORACLE_CASES)
def test_reference_with_dropout_equals_a_plain_fp64_oracle(T, H, I, E, k, r, gated, top_p, p):
    x, gate, up, w, idx, loras, Wd, bias = _problem(T, H, I, E, k, r, torch.float64, gated=gated, top_p=top_p)
    act = F.silu if gated else ACTS["gelu_tanh"]
    dropout = LoraDropout(p, 2**33 + T)
    y, grads = _run(reference.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, act, dropout)
    y_want, grads_want = _run(oracle_ffn, x, gate, up, w, idx, loras, Wd, bias, act, dropout)
    assert_close(y, y_want, torch.float64, "y")
    for name in grads_want:
        assert_close(grads[name], grads_want[name], torch.float64, f"grad {name}")
    # The dropout is on: without it the output differs.
    assert not torch.allclose(y, _run(reference.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, act, None)[0])


FFN_CASES = [
    pytest.param(1, 20, 36, 4, 2, 8, True, None, id="T1-H20-I36-k2-gated"),
    pytest.param(0, 20, 36, 4, 2, 8, True, None, id="T0-gated"),
    pytest.param(33, 21, 37, 4, 2, 8, True, None, id="T33-H21-I37-k2-gated"),
    pytest.param(33, 21, 37, 4, 2, 8, False, None, id="T33-H21-I37-k2-ungated-phi"),
    pytest.param(41, 19, 45, 6, None, 4, True, 0.7, id="T41-H19-I45-top-p0.7-gated"),
    pytest.param(41, 19, 45, 6, None, 4, False, 0.5, id="T41-H19-I45-top-p0.5-ungated"),
    pytest.param(300, 13, 600, 1, 1, 4, True, None, id="T300-I600-E1-two-chunks-two-blocks"),
]


@needs_cpu
@pytest.mark.parametrize("p", [pytest.param(0.05, id="p0.05"), pytest.param(0.6, id="p0.6")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("T", "H", "I", "E", "k", "r", "gated", "top_p"), FFN_CASES)
def test_cpp_ffn_with_dropout_equals_the_reference(T, H, I, E, k, r, gated, top_p, dtype, p):
    x, gate, up, w, idx, loras, Wd, bias = _problem(T, H, I, E, k, r, dtype, gated=gated, top_p=top_p, seed=T + I)
    act = F.silu if gated else ACTS["gelu_tanh"]
    dropout = LoraDropout(p, 2**35 + 3 * T + I)
    y, grads = _run(cpu.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, act, dropout)
    y_want, grads_want = _run(reference.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, act, dropout)
    assert_close(y, y_want, dtype, "y")
    assert grads.keys() == grads_want.keys()
    for name in grads_want:
        assert_close(grads[name], grads_want[name], dtype, f"grad {name}")


@needs_cpu
def test_cpp_ffn_applies_the_scale_when_p_rounds_to_keeping_everything():
    """p = 1e-6 keeps every element (threshold round(p * 2^16) = 0) but still scales by 1/(1-p), as the reference."""
    x, gate, up, w, idx, loras, Wd, bias = _problem(9, 12, 20, 3, 2, 4, torch.float64)
    dropout = LoraDropout(1e-6, 1)
    assert dropout.threshold == 0
    y, grads = _run(cpu.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, F.silu, dropout)
    y_want, grads_want = _run(reference.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, F.silu, dropout)
    assert_close(y, y_want, torch.float64, "y")
    for name in grads_want:
        assert_close(grads[name], grads_want[name], torch.float64, f"grad {name}")
    assert not torch.equal(y, _run(cpu.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, F.silu, None)[0])


def _backends_p0():
    return [pytest.param(reference, id="reference"), pytest.param(cpu, id="cpu", marks=needs_cpu)]


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("impl", _backends_p0())
def test_p0_equals_the_no_dropout_path_bitwise(impl, gated):
    assert LoraDropout.draw(0.0) is None
    x, gate, up, w, idx, loras, Wd, bias = _problem(40, 21, 37, 4, 2, 8, torch.float32, gated=gated)
    act = F.silu if gated else ACTS["gelu_tanh"]
    y, grads = _run(impl.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, act, None)
    y0, grads0 = _run(impl.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, act, LoraDropout(0.0, 2**40 + 1))
    assert torch.equal(y, y0)
    assert all(torch.equal(grads[n], grads0[n]) for n in grads)


@needs_cpu
def test_cpp_ops_at_p0_ignore_the_seed_bitwise():
    """The ops' dropout_p = 0 path is the one without dropout, whatever the seed."""
    x, gate, up, w, idx, loras, *_ = _problem(40, 21, 37, 4, 2, 8, torch.float32)
    flat = [t.detach() for lo in loras.values() for t in lo[:2]]
    args = (x.detach(), gate.detach(), up.detach(), w.detach(), idx, *flat, 4, 1.3, "silu")
    ops = torch.ops.moelora
    assert all(torch.equal(a, b) for a, b in zip(ops.mixlora_ffn(*args), ops.mixlora_ffn(*args, 0.0, 987), strict=True))
    g = torch.Generator().manual_seed(1)
    grad_h, grad_y = torch.randn(40, 37, generator=g), torch.randn(40, 21, generator=g)
    want = ops.mixlora_ffn_backward(grad_h, grad_y, *args)
    got = ops.mixlora_ffn_backward(grad_h, grad_y, *args, 0.0, 987)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@needs_cpu
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_cpp_thread_counts_1_and_2_give_the_same_results(gated):
    x, gate, up, w, idx, loras, Wd, bias = _problem(300, 32, 600, 8, 2, 8, torch.float32, gated=gated)
    act = F.silu if gated else ACTS["gelu_tanh"]
    dropout = LoraDropout(0.3, 2**50 + 9)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_run(cpu.mixlora_ffn, x, gate, up, w, idx, loras, Wd, bias, act, dropout))
    finally:
        torch.set_num_threads(before)
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)


@needs_cpu
def test_cpp_mask_is_the_same_with_1_and_2_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.dropout_mask(5, H_STREAM, 300_001, 0.2)
        torch.set_num_threads(2)
        two = cpu.dropout_mask(5, H_STREAM, 300_001, 0.2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_cpu
@pytest.mark.parametrize(
    ("op", "args"),
    [
        pytest.param("dropout_mask", (2**40 + 1, H_STREAM, 1001, 0.3), id="dropout_mask"),
        pytest.param("mixlora_ffn", None, id="ffn-dropout"),
        pytest.param("mixlora_ffn_backward", None, id="ffn-bwd-dropout"),
    ],
)
def test_fake_kernels_match_the_real_ops_with_dropout(op, args):
    if args is None:
        x, gate, up, w, idx, loras, *_ = _problem(9, 12, 20, 4, 2, 4, torch.float32)
        flat = [t.detach() for lo in loras.values() for t in lo[:2]]
        args = (x.detach(), gate.detach(), up.detach(), w.detach(), idx, *flat, 4, 2.0, "silu", 0.25, 2**40 + 3)
        if op == "mixlora_ffn_backward":
            g = torch.Generator().manual_seed(2)
            args = (torch.randn(9, 20, generator=g), torch.randn(9, 12, generator=g), *args)
    torch.library.opcheck(getattr(torch.ops.moelora, op).default, args, test_utils=("test_schema", "test_faketensor"))


# --- a whole model -----------------------------------------------------------------------------------------


def _train_two_steps(pm, state, seed, ids):
    """Reload `state`, seed torch, run two SGD steps: the losses and every step's gradients."""
    pm.load_state_dict(state)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(seed)
    losses, grads = [], []
    for _ in range(2):
        opt.zero_grad()
        loss = pm(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
        opt.step()
    return losses, grads


@needs_cpu
@pytest.mark.parametrize("family", ["llama", "phi"])
def test_whole_model_trains_with_fused_dropout_reproducibly(family, monkeypatch):
    """Default lora_dropout = 0.05 in train mode on the cpu backend: the fused FFN runs (the reference would
    raise), the same torch seed repeats the run bitwise and another seed changes it."""
    config = MixLoraConfig()
    assert config.lora_dropout == 0.05
    pm = get_moelora_model(tiny_model(family), config)
    randomize_adapters(pm)
    pm.train()
    state = {n: t.clone() for n, t in pm.state_dict().items()}
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))

    def no_reference(*args, **kwargs):
        raise AssertionError("reference.mixlora_ffn ran: the fused C++ FFN should have")

    monkeypatch.setattr(reference, "mixlora_ffn", no_reference)
    with moelora.set_backend("cpu"):
        first = _train_two_steps(pm, state, 0, ids)
        assert backend.ops_ran()["mixlora_ffn"] == {"cpu": 2}  # the second step's forward, both layers
        again = _train_two_steps(pm, state, 0, ids)
        other = _train_two_steps(pm, state, 1, ids)
    (loss1, grads1), (loss2, grads2), (loss3, grads3) = first, again, other
    assert all(torch.equal(a, b) for a, b in zip(loss1, loss2, strict=True))
    for step in range(2):
        assert grads1[step].keys() == grads2[step].keys() and len(grads1[step]) > 0
        assert all(torch.equal(grads1[step][n], grads2[step][n]) for n in grads1[step])
    assert not torch.equal(loss1[0], loss3[0])
    experts = [n for n in grads1[0] if ".mlp." in n and ".lora_" in n]
    assert len(experts) == 12 if family == "llama" else 8
    assert not any(torch.equal(grads1[0][n], grads3[0][n]) for n in experts)
