"""moelora.reference and the MixLoRA modules against tests/oracle.py, a per-token float64 oracle.

Forward and every gradient (autograd on both sides, one random upstream gradient), seeded, float64 inputs.
moelora.reference computes the router and the rank-space work in fp32 whatever the input dtype, so the
tables compare at fp32 precision (REF_EPS); the float64 goal has its own tests at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import oracle
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_model
from oracle import Projection
from torch import Tensor
from transformers.activations import ACT2FN

from moelora import ExpertLoraConfig, MixLoraConfig, get_moelora_model, reference
from moelora.reference import ExpertLora, FFNSpec

F64 = torch.float64
# The precision moelora.reference computes in for float64 inputs (see test_*_float64 below).
REF_EPS = torch.finfo(F64).eps
# Adapter parameters are fp32 whatever the base dtype (MoE-PEFT's choice), so their gradients are fp32 too.
ADAPTER_EPS = torch.finfo(torch.float32).eps
F64_EPS = torch.finfo(F64).eps
# Allowed error in units of eps times (|expected| + the tensor's scale): dot products of a few dozen terms, a
# softmax, a renormalisation and their backward, chained; the worst case over this file is about 3.
ULPS = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: with two intra-op threads on a busy 2-core machine this file took 99 s
    (OpenMP threads waiting on each other), with one 7 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: Tensor, expected: Tensor, eps: float, what: str, scale: float | None = None) -> None:
    """|actual - expected| <= ULPS * eps * (|expected| + scale), element-wise; scale: max |expected| by default."""
    expected, actual = expected.detach().double(), actual.detach().double()
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    tol = ULPS * eps
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def grads(out: Tensor, inputs: list[Tensor], upstream: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True, materialize_grads=True)


def assert_grads_close(
    ref_out: Tensor, oracle_out: Tensor, inputs: dict[str, Tensor], upstream: Tensor, eps: float
) -> None:
    """Every gradient, with errors relative to the largest gradient of the backward pass: one that cancels to
    about 0 (the router's under top-1, where every weight is exactly 1) still sums rounding errors of that size."""
    names, leaves = list(inputs), list(inputs.values())
    expected = grads(oracle_out, leaves, upstream)
    scale = max(g.abs().max().item() for g in expected if g.numel())
    for name, g_ref, g_oracle in zip(names, grads(ref_out, leaves, upstream), expected, strict=True):
        assert_close(g_ref, g_oracle, eps, f"d/d {name}", scale)


def randn(g: torch.Generator, *shape: int, std: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * std


def leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def slots_of(weights: Tensor, indices: Tensor) -> list[oracle.Slots]:
    """Routing tensors [T, k] as oracle slots (unused slots, index -1, dropped)."""
    return [
        [(int(e), w) for e, w in zip(idx_t, w_t, strict=True) if e >= 0]
        for idx_t, w_t in zip(indices, weights, strict=True)
    ]


# -- route -----------------------------------------------------------------------------------------


def _routing_id(T: int, H: int, E: int, top_k: int | None, top_p: float | None) -> str:
    return f"T{T}-H{H}-E{E}-" + (f"k{top_k}" if top_k is not None else f"p{top_p:g}")


def route_case(T: int, H: int, E: int, top_k: int | None = None, top_p: float | None = None, *, std=0.3, tag=""):
    return pytest.param(T, H, E, top_k, top_p, std, id=_routing_id(T, H, E, top_k, top_p) + tag)


ROUTE_CASES = [
    route_case(1, 20, 8, top_k=1),
    route_case(7, 20, 4, top_k=2),
    route_case(33, 20, 8, top_k=2),
    route_case(7, 20, 4, top_k=4),
    route_case(33, 36, 8, top_k=8),
    route_case(7, 20, 1, top_k=1),
    route_case(33, 20, 8, top_p=0.8),
    route_case(7, 20, 4, top_p=0.5),
    route_case(7, 20, 1, top_p=0.8),
    route_case(33, 20, 8, top_p=1.0),
    route_case(33, 20, 4, top_p=0.5, std=2.0, tag="-peaked"),
]


def _check_route(T, H, E, top_k, top_p, std, eps):
    g = torch.Generator().manual_seed(T * 1000 + E)
    x, router = leaf(randn(g, T, H)), leaf(randn(g, E, H, std=std))
    ref = reference.route(x, router, top_k=top_k, top_p=top_p)
    slots, probs = oracle.route(x, router, top_k=top_k, top_p=top_p)

    assert_close(ref.probs, probs, eps, "probs")
    assert ref.weights.shape == ref.indices.shape == (T, top_k if top_k is not None else E)
    for t, (w_t, idx_t) in enumerate(zip(ref.weights, ref.indices, strict=True)):
        expected = {e: w for e, w in slots[t]}
        got = {int(e): w for e, w in zip(idx_t, w_t, strict=True) if e >= 0}
        assert len(got) == int((idx_t >= 0).sum()), f"token {t}: an expert in two slots: {idx_t.tolist()}"
        assert set(got) == set(expected), f"token {t}: experts {sorted(got)} != {sorted(expected)}"
        assert_close(torch.stack(list(got.values())), torch.stack([expected[e] for e in got]), eps, f"weights[{t}]")
        assert (w_t[idx_t < 0] == 0).all(), f"token {t}: unused slots must weigh 0"

    # One upstream gradient per (token, expert), so the slot order does not matter.
    g_w, g_p = randn(g, T, E), randn(g, T, E)
    ref_loss = (ref.weights * g_w.gather(1, ref.indices.clamp(min=0)) * (ref.indices >= 0)).sum()
    ref_loss = ref_loss + (ref.probs * g_p).sum()
    oracle_loss = sum(w * g_w[t, e] for t, s in enumerate(slots) for e, w in s) + (probs * g_p).sum()
    assert_grads_close(ref_loss, oracle_loss, {"x": x, "router": router}, torch.ones((), dtype=F64), eps)
    return ref


@pytest.mark.parametrize(("T", "H", "E", "top_k", "top_p", "std"), ROUTE_CASES)
def test_route(T, H, E, top_k, top_p, std):
    _check_route(T, H, E, top_k, top_p, std, REF_EPS)


def test_route_top_p_keeps_the_shortest_prefix_over_top_p():
    """probs (0.5, 0.3, 0.2): a prefix is kept up to the first slot that takes the cumulative sum over top_p."""
    router = torch.log(torch.tensor([[0.5], [0.3], [0.2]], dtype=F64))
    x = torch.ones(1, 1, dtype=F64)
    for top_p, kept in [(0.3, 1), (0.49, 1), (0.51, 2), (0.79, 2), (0.81, 3), (1.0, 3)]:
        ref = reference.route(x, router, top_p=top_p)
        slots, _ = oracle.route(x, router, top_p=top_p)
        assert len(slots[0]) == kept, f"top_p={top_p}"
        assert int((ref.indices >= 0).sum()) == kept, f"top_p={top_p}"


# -- moe_lora --------------------------------------------------------------------------------------


def moe_lora_case(T: int, H: int, out: int, E: int, k: int, r: int, scaling: float = 2.0, *, tag: str = ""):
    return pytest.param(T, H, out, E, k, r, scaling, tag, id=f"T{T}-H{H}-O{out}-E{E}-k{k}-r{r}-s{scaling:g}{tag}")


MOE_LORA_CASES = [
    moe_lora_case(1, 20, 36, 1, 1, 1),
    moe_lora_case(7, 20, 36, 4, 2, 4),
    moe_lora_case(33, 20, 36, 8, 2, 8),
    moe_lora_case(33, 36, 20, 8, 8, 4, 0.5),
    moe_lora_case(7, 20, 36, 4, 4, 1, 16 / math.sqrt(8)),
    moe_lora_case(33, 20, 36, 4, 2, 4, tag="-idle-expert"),
    moe_lora_case(33, 20, 36, 4, 1, 4, tag="-one-expert"),
    moe_lora_case(33, 20, 36, 8, 8, 4, tag="-unused-slots"),
]


def _routing_tensors(g: torch.Generator, T: int, E: int, k: int, tag: str, dtype: torch.dtype):
    """Random distinct experts per token; weights in `dtype` (route's output is fp32)."""
    pool = E - 1 if tag == "-idle-expert" else E
    indices = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(T)])
    if tag == "-one-expert":
        indices = torch.zeros(T, 1, dtype=torch.long)
    if tag == "-unused-slots":  # top-p's layout: slot 0 always used, later slots -1 at random
        unused = torch.rand(T, k, generator=g) < 0.4
        unused[:, 0] = False
        indices[unused] = -1
    weights = torch.rand(T, k, generator=g, dtype=F64).to(dtype) * (indices >= 0)
    return leaf(weights), indices


def _check_moe_lora(T, H, out, E, k, r, scaling, tag, eps, weights_dtype):
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    x = leaf(randn(g, T, H))
    A, B = leaf(randn(g, E, r, H, std=H**-0.5)), leaf(randn(g, E, out, r, std=0.5 * r**-0.5))
    weights, indices = _routing_tensors(g, T, E, k, tag, weights_dtype)

    y_ref = reference.moe_lora(x, weights, indices, A, B, scaling)
    y_oracle = oracle.moe_lora(x, slots_of(weights, indices), A, B, scaling)
    assert y_ref.dtype == F64
    assert_close(y_ref, y_oracle, eps, "y")
    upstream = randn(g, T, out)
    assert_grads_close(y_ref, y_oracle, {"x": x, "weights": weights, "A": A, "B": B}, upstream, eps)


@pytest.mark.parametrize(("T", "H", "out", "E", "k", "r", "scaling", "tag"), MOE_LORA_CASES)
def test_moe_lora(T, H, out, E, k, r, scaling, tag):
    _check_moe_lora(T, H, out, E, k, r, scaling, tag, REF_EPS, torch.float32)


# -- mixlora_ffn -----------------------------------------------------------------------------------

PROJS = ("gate", "up", "down")


@dataclass(frozen=True)
class Ffn:
    T: int
    E: int
    r: int
    top_k: int | None = None
    top_p: float | None = None
    H: int = 20
    I: int = 36
    scaling: float = 2.0
    gated: bool = True
    adapted: tuple[str, ...] = PROJS
    dora: tuple[str, ...] = ()
    bias: bool = False
    # Extra router logit per expert, through a constant input feature: -12 idles an expert, +12 takes all.
    offsets: tuple[float, ...] | None = None


def ffn_case(tag: str = "", **kw):
    c = Ffn(**kw)
    routing = f"k{c.top_k}" if c.top_k is not None else f"p{c.top_p:g}"
    return pytest.param(c, id=f"T{c.T}-H{c.H}-I{c.I}-E{c.E}-{routing}-r{c.r}" + (f"-{tag}" if tag else ""))


FFN_CASES = [
    ffn_case(T=1, E=1, r=1, top_k=1),
    ffn_case(T=7, E=4, r=4, top_k=2),
    ffn_case(T=33, E=8, r=8, top_k=2),
    ffn_case(T=7, E=4, r=4, top_k=4),
    ffn_case(T=33, E=8, r=1, top_k=8),
    ffn_case(T=7, E=8, r=8, top_k=1),
    ffn_case(T=33, E=4, r=4, top_k=1),
    ffn_case("idle-expert", T=33, E=4, r=4, top_k=2, offsets=(0, 0, 0, -12)),
    ffn_case("one-expert", T=33, E=4, r=4, top_k=1, offsets=(12, 0, 0, 0)),
    ffn_case("one-expert", T=33, E=4, r=4, top_k=2, offsets=(12, 0, 0, 0)),
    ffn_case("top-p", T=33, E=8, r=4, top_p=0.8),
    ffn_case("top-p", T=7, E=1, r=4, top_p=0.8),
    ffn_case("top-p-down-bias", T=33, E=8, r=4, top_p=0.8, bias=True),
    ffn_case("bias", T=7, E=4, r=4, top_k=2, bias=True),
    ffn_case("rslora", T=7, E=4, r=8, top_k=2, scaling=16 / math.sqrt(8)),
    ffn_case("small-scaling", T=7, E=4, r=4, top_k=2, scaling=0.25),
    ffn_case("dora", T=7, E=4, r=4, top_k=2, dora=PROJS),
    ffn_case("dora", T=33, E=8, r=8, top_k=8, dora=PROJS, bias=True),
    ffn_case("dora-gate", T=7, E=4, r=4, top_k=2, dora=("gate",)),
    ffn_case("dora-down-top-p-bias", T=33, E=4, r=4, top_p=0.8, dora=("down",), bias=True),
    ffn_case("ungated", T=7, E=4, r=4, top_k=2, gated=False, bias=True),
    ffn_case("ungated-top-p-dora", T=33, E=4, r=4, top_p=0.8, gated=False, bias=True, dora=("up", "down")),
    ffn_case("no-down", T=7, E=4, r=4, top_k=2, adapted=("gate", "up")),
    ffn_case("dora-no-down", T=7, E=4, r=4, top_k=2, adapted=("gate", "up"), dora=("gate", "up")),
    ffn_case("down-only", T=7, E=4, r=4, top_k=2, adapted=("down",)),
    ffn_case("up-only-top-p", T=7, E=4, r=4, top_p=0.8, adapted=("up",), bias=True),
    ffn_case("ungated-fc2-only", T=7, E=4, r=4, top_k=2, gated=False, adapted=("down",), bias=True),
    ffn_case("no-lora", T=7, E=4, r=4, top_k=2, adapted=()),
]


def _ffn_inputs(c: Ffn, g: torch.Generator) -> tuple[Tensor, Tensor, dict[str, Projection]]:
    """x [T, H], router [E, H] and the three projections (gate None when ungated), all leaves."""
    x = randn(g, c.T, c.H)
    router = randn(g, c.E, c.H, std=0.3)
    if c.offsets is not None:
        x[:, 0] = 1.0
        router[:, 0] = torch.tensor(c.offsets, dtype=F64)
    projs = {}
    for name, (out_f, in_f) in {"gate": (c.I, c.H), "up": (c.I, c.H), "down": (c.H, c.I)}.items():
        if name == "gate" and not c.gated:
            continue
        weight = randn(g, out_f, in_f, std=in_f**-0.5)
        bias = randn(g, out_f, std=0.1) if c.bias else None
        A = B = m = None
        if name in c.adapted:
            A, B = leaf(randn(g, c.E, c.r, in_f, std=in_f**-0.5)), leaf(randn(g, c.E, out_f, c.r, std=0.5 / c.r**0.5))
            if name in c.dora:
                m = leaf(torch.linalg.norm(weight, dim=1) * (1 + 0.2 * torch.rand(c.E, out_f, generator=g, dtype=F64)))
        projs[name] = Projection(weight, bias, A, B, m)
    return leaf(x), leaf(router), projs


def _expert_lora(p: Projection | None) -> ExpertLora | None:
    return None if p is None or p.A is None else ExpertLora(p.A, p.B, p.magnitude)


def _reference_ffn(c: Ffn, x: Tensor, router: Tensor, projs: dict[str, Projection], act) -> tuple[Tensor, Tensor]:
    routing = reference.route(x, router, top_k=c.top_k, top_p=c.top_p)
    gate, up, down = projs.get("gate"), projs["up"], projs["down"]
    ffn = FFNSpec(
        gate_lora=_expert_lora(gate),
        up_lora=_expert_lora(up),
        down_lora=_expert_lora(down),
        down_proj=lambda h: F.linear(h, down.weight, down.bias),
        act=act,
        scaling=c.scaling,
        gate_weight=gate.weight if gate is not None else None,
        up_weight=up.weight,
        down_weight=down.weight,
        down_bias=down.bias,
    )
    gate_base = F.linear(x, gate.weight, gate.bias) if gate is not None else None
    y = reference.mixlora_ffn(x, gate_base, F.linear(x, up.weight, up.bias), routing.weights, routing.indices, ffn)
    return y, routing.indices


def _check_ffn(c: Ffn, eps: float) -> None:
    g = torch.Generator().manual_seed(c.T * 1000 + c.E * 10 + c.r)
    x, router, projs = _ffn_inputs(c, g)
    act = F.silu if c.gated else ACT2FN["gelu_new"]

    y_ref, indices = _reference_ffn(c, x, router, projs, act)
    slots, _ = oracle.route(x, router, top_k=c.top_k, top_p=c.top_p)
    y_oracle = oracle.mixlora_ffn(
        x, slots, gate=projs.get("gate"), up=projs["up"], down=projs["down"], act=act, scaling=c.scaling
    )

    # The edge case each table row names really happens.
    chosen = [{e for e, _ in s} for s in slots]
    if c.offsets is not None and min(c.offsets) < 0:
        assert not (indices == c.E - 1).any() and all(c.E - 1 not in s for s in chosen)
    if c.offsets is not None and max(c.offsets) > 0:
        assert (indices[:, 0] == 0).all()
    if c.top_p is not None and c.bias and c.E > 1:
        assert min(float(sum(w.detach() for _, w in s)) for s in slots) < 0.95, "top-p must leave some weight sums < 1"

    assert y_ref.dtype == F64
    assert_close(y_ref, y_oracle, eps, "y")
    inputs = {"x": x, "router": router}
    for name, p in projs.items():
        for field in ("A", "B", "magnitude"):
            if getattr(p, field) is not None:
                inputs[f"{name}.{field}"] = getattr(p, field)
    assert_grads_close(y_ref, y_oracle, inputs, randn(g, c.T, c.H), eps)


@pytest.mark.parametrize("c", FFN_CASES)
def test_mixlora_ffn(c):
    _check_ffn(c, REF_EPS)


# -- modules of a tiny model -----------------------------------------------------------------------

MODULE_CASES = [
    pytest.param("llama", dict(), id="llama"),
    pytest.param("llama", dict(use_dora=True), id="llama-dora"),
    pytest.param("llama", dict(use_rslora=True, r=8, lora_alpha=16), id="llama-rslora"),
    pytest.param("llama", dict(routing_strategy="mixlora-dynamic"), id="llama-dynamic"),
    pytest.param("llama", dict(num_experts=3, top_k=3, use_dora=True, use_rslora=True), id="llama-k=E-dora-rslora"),
    pytest.param("llama", dict(target_modules=["q_proj", "gate_proj", "up_proj"]), id="llama-no-down"),
    pytest.param("llama", dict(expert_lora=ExpertLoraConfig(r=2, lora_alpha=6)), id="llama-expert-lora"),
    pytest.param("phi3", dict(), id="phi3"),
    pytest.param("phi3", dict(use_dora=True), id="phi3-dora"),
    pytest.param("phi3", dict(use_rslora=True), id="phi3-rslora"),
    pytest.param("phi3", dict(routing_strategy="mixlora-dynamic", use_dora=True), id="phi3-dynamic-dora"),
    pytest.param("phi", dict(), id="phi"),
    pytest.param("phi", dict(use_dora=True), id="phi-dora"),
    pytest.param("phi", dict(use_rslora=True), id="phi-rslora"),
    pytest.param("phi", dict(routing_strategy="mixlora-dynamic"), id="phi-dynamic"),  # fc2 bias counted sum_j w_j times
    pytest.param("phi", dict(routing_strategy="mixlora-dynamic", use_dora=True), id="phi-dynamic-dora"),
    pytest.param("mistral", dict(), id="mistral"),
    pytest.param("qwen2", dict(), id="qwen2"),
    pytest.param("gemma", dict(use_dora=True), id="gemma-dora"),
    pytest.param("gemma2", dict(routing_strategy="mixlora-dynamic"), id="gemma2-dynamic"),
]


def _scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _adapted_model(family: str, overrides: dict, adapters_f64: bool):
    model = tiny_model(family, dtype=F64)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # HF initialises biases to 0, which would hide how often a bias is counted
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(randn(g, *p.shape, std=0.1))
    config = MixLoraConfig(lora_dropout=0.0, num_experts=overrides.pop("num_experts", 4), **overrides)
    get_moelora_model(model, config)
    randomize_adapters(model)
    if adapters_f64:  # they are built fp32 whatever the base dtype (MoE-PEFT's choice); make them float64 too
        model.to(F64)
    return model, config


def _input_and_upstream(model, out_features: int) -> tuple[Tensor, Tensor]:
    """Hidden states [2, 5, H] (a leaf) and an upstream gradient [2, 5, out_features]."""
    g = torch.Generator().manual_seed(3)
    return leaf(randn(g, 2, 5, model.config.hidden_size)), randn(g, 2, 5, out_features)


def _check_ffn_module(family: str, overrides: dict, eps: float, adapters_f64: bool = False) -> None:
    model, config = _adapted_model(family, dict(overrides), adapters_f64)
    ffn = model.model.layers[0].mlp
    adapter, base = ffn.adapters["default"], ffn.base_layer
    cfg = model.config
    act = ACT2FN[getattr(cfg, "hidden_activation", None) or cfg.hidden_act]
    e = config.expert_lora
    r, alpha = (e.r, e.lora_alpha) if e is not None else (config.r, config.lora_alpha)
    scaling = _scaling(r, alpha, config.use_rslora)
    assert all(A.shape[1] == r for A in adapter.lora_A.values())

    def proj(name: str) -> Projection:
        layer = getattr(base, name)
        if name not in adapter.lora_A:
            return Projection(layer.weight, layer.bias)
        m = adapter.lora_magnitude.get(name)
        return Projection(layer.weight, layer.bias, adapter.lora_A[name], adapter.lora_B[name], m)

    if family == "phi3":
        projs = dict(gate_up=proj("gate_up_proj"), down=proj("down_proj"))
    elif family == "phi":
        projs = dict(up=proj("fc1"), down=proj("fc2"))
    else:
        projs = dict(gate=proj("gate_proj"), up=proj("up_proj"), down=proj("down_proj"))

    x, upstream = _input_and_upstream(model, model.config.hidden_size)
    y = ffn(x)
    tokens = x.reshape(-1, x.shape[-1])
    routing = dict(top_k=config.top_k) if config.routing_strategy == "mixlora" else dict(top_p=config.top_p)
    slots, _ = oracle.route(tokens, adapter.router, **routing)
    y_oracle = oracle.mixlora_ffn(tokens, slots, act=act, scaling=scaling, **projs).view_as(y)

    assert y.dtype == F64
    assert_close(y, y_oracle, eps, "y")
    inputs = {"x": x, "router": adapter.router}
    inputs |= {f"lora_A.{n}": p for n, p in adapter.lora_A.items()}
    inputs |= {f"lora_B.{n}": p for n, p in adapter.lora_B.items()}
    inputs |= {f"lora_magnitude.{n}": p for n, p in adapter.lora_magnitude.items()}
    assert_grads_close(y, y_oracle, inputs, upstream, eps)


def _check_lora_linear_module(family: str, overrides: dict, eps: float, adapters_f64: bool = False) -> None:
    model, config = _adapted_model(family, dict(overrides), adapters_f64)
    layer = getattr(model.model.layers[0].self_attn, "qkv_proj" if family == "phi3" else "q_proj")
    adapter, base = layer.adapters["default"], layer.base_layer
    scaling = _scaling(config.r, config.lora_alpha, config.use_rslora)
    proj = Projection(base.weight, base.bias, adapter.lora_A, adapter.lora_B, adapter.lora_magnitude)

    x, upstream = _input_and_upstream(model, base.weight.shape[0])
    y = layer(x)
    y_oracle = oracle.lora(x.reshape(-1, x.shape[-1]), proj, scaling).view_as(y)

    assert y.dtype == F64
    assert_close(y, y_oracle, eps, "y")
    inputs = {"x": x, "lora_A": adapter.lora_A, "lora_B": adapter.lora_B}
    if adapter.lora_magnitude is not None:
        inputs["lora_magnitude"] = adapter.lora_magnitude
    assert_grads_close(y, y_oracle, inputs, upstream, eps)


@pytest.mark.parametrize(("family", "overrides"), MODULE_CASES)
def test_mixlora_ffn_module(family, overrides):
    _check_ffn_module(family, overrides, ADAPTER_EPS)


@pytest.mark.parametrize(("family", "overrides"), MODULE_CASES)
def test_lora_linear_module(family, overrides):
    _check_lora_linear_module(family, overrides, ADAPTER_EPS)


# -- float64 end to end: the reference computes in promote_types(input dtype, float32) ------------------


def pick(cases: list, *ids: str) -> list:
    return [c for c in cases if c.id in ids]


F64_MODULE_CASES = pick(MODULE_CASES, "llama-dora", "phi3-dynamic-dora", "phi-dynamic-dora")


@pytest.mark.parametrize(
    ("T", "H", "E", "top_k", "top_p", "std"), pick(ROUTE_CASES, "T33-H20-E8-k2", "T33-H20-E8-p0.8")
)
def test_route_float64(T, H, E, top_k, top_p, std):
    ref = _check_route(T, H, E, top_k, top_p, std, F64_EPS)
    assert ref.weights.dtype == ref.probs.dtype == F64


@pytest.mark.parametrize(
    ("T", "H", "out", "E", "k", "r", "scaling", "tag"), pick(MOE_LORA_CASES, "T33-H20-O36-E8-k2-r8-s2")
)
def test_moe_lora_float64(T, H, out, E, k, r, scaling, tag):
    _check_moe_lora(T, H, out, E, k, r, scaling, tag, F64_EPS, F64)


@pytest.mark.parametrize(
    "c", pick(FFN_CASES, "T33-H20-I36-E8-k2-r8", "T33-H20-I36-E8-p0.8-r4-top-p-down-bias", "T33-H20-I36-E8-k8-r8-dora")
)
def test_mixlora_ffn_float64(c):
    _check_ffn(c, F64_EPS)


@pytest.mark.parametrize(("family", "overrides"), F64_MODULE_CASES)
def test_mixlora_ffn_module_float64(family, overrides):
    _check_ffn_module(family, overrides, F64_EPS, adapters_f64=True)


@pytest.mark.parametrize(("family", "overrides"), F64_MODULE_CASES)
def test_lora_linear_module_float64(family, overrides):
    _check_lora_linear_module(family, overrides, F64_EPS, adapters_f64=True)
