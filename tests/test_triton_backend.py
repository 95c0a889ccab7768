"""The `triton` backend (moelora.triton_backend) against the reference, under the Triton interpreter.

In one worker process with TRITON_INTERPRET=1 (this file run as a script): whole tiny models of the
llama, phi3 (fused gate_up) and phi (fc1/fc2, ungated) families with MOELORA_BACKEND=triton against
`reference`, forward and backward; the backend's mixlora_ffn with a down bias and HF activation modules,
and its reference fallbacks; the torch.library ops' fake kernels (opcheck) and torch.compile(fullgraph)
of route + mixlora_ffn + routed_mixlora_ffn + moe_lora (both regimes) equal to eager; a MiLoRA model (prompt_route,
segmented_lora) training and serving a mixed batch. In this process: backend dispatch and its errors, and
bench/gpu_check.py --dry-run.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the worker, before triton is imported; the pytest process stays uninterpreted
    os.environ["TRITON_INTERPRET"] = "1"

import json
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _triton_worker import serve
from conftest import VOCAB, randomize_adapters, tiny_model

import moelora
from moelora import MixLoraConfig, backend, get_moelora_model, reference
from moelora.dropout import LoraDropout
from moelora.reference import ExpertLora, FFNSpec

pytest.importorskip("triton")

WORKER_TIMEOUT = 900  # seconds: the interpreter worker (tests/_triton_worker.py)

ROOT = Path(__file__).resolve().parents[1]
# One BLAS / OpenMP thread: the interpreter runs one program at a time anyway, and idle numpy / torch
# threads spin against each other on a small shared machine (24 ms -> 0.1 ms for one of the interpreter's
# 32x512x32 dots here; the reference's backward 5x faster).
WORKER_ENV = {**os.environ, "TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
TOL = 2e-5  # fp32: max |triton - reference| / max |reference|, as the cpu backend's tests


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)).item()


def _compare(got: dict, want: dict, tol: float = TOL) -> list[str]:
    failures = [f"keys differ: {sorted(got.keys() ^ want.keys())}"] if got.keys() != want.keys() else []
    for name in want.keys() & got.keys():
        g, w = got[name], want[name]
        if g.dtype != w.dtype or g.shape != w.shape:
            failures.append(f"{name}: {g.dtype}{tuple(g.shape)} != {w.dtype}{tuple(w.shape)}")
        elif not torch.isfinite(g).all():
            failures.append(f"{name}: non-finite")
        elif _rel(g, w) > tol:
            failures.append(f"{name}: relative error {_rel(g, w):.3g} > {tol}")
    return failures


@contextmanager
def _ffn_regime(regime: str | None):
    """Force the triton backend's fused-FFN regime (None: leave the backend's choice by shape)."""
    from moelora.triton_backend import FFN_REGIME_ENV

    old = os.environ.get(FFN_REGIME_ENV)
    if regime is not None:
        os.environ[FFN_REGIME_ENV] = regime
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FFN_REGIME_ENV, None)
        else:
            os.environ[FFN_REGIME_ENV] = old


def check_model(family: str, overrides: dict, regime: str | None = None) -> list[str]:
    """A tiny MixLoRA model, training forward + backward, triton against reference; regime forces the fused
    FFN's kernels (a spy counts the sorted ones: once per layer forward and backward, or never)."""
    from moelora.kernels import mixlora_ffn_sorted, mixlora_ffn_sorted_bwd

    sorted_fwd, sorted_bwd, sorted_calls = (
        mixlora_ffn_sorted.mixlora_ffn_sorted_core_fwd,
        mixlora_ffn_sorted_bwd.mixlora_ffn_sorted_core_bwd,
        [],
    )

    def spy_fwd(*args):
        sorted_calls.append("fwd")
        return sorted_fwd(*args)

    def spy_bwd(*args):
        sorted_calls.append("bwd")
        return sorted_bwd(*args)

    mixlora_ffn_sorted.mixlora_ffn_sorted_core_fwd = spy_fwd
    mixlora_ffn_sorted_bwd.mixlora_ffn_sorted_core_bwd = spy_bwd
    try:
        with _ffn_regime(regime):
            failures = _check_model(family, overrides)
    finally:
        mixlora_ffn_sorted.mixlora_ffn_sorted_core_fwd = sorted_fwd
        mixlora_ffn_sorted_bwd.mixlora_ffn_sorted_core_bwd = sorted_bwd
    layers = 2 * tiny_model(family).config.num_hidden_layers if regime == "sorted" else 0
    if len(sorted_calls) != layers:
        failures.append(f"the sorted FFN kernels ran {len(sorted_calls)} times, expected {layers}")
    return failures


def _check_model(family: str, overrides: dict) -> list[str]:
    pm = get_moelora_model(tiny_model(family), MixLoraConfig(lora_dropout=0.0, **overrides))
    randomize_adapters(pm)
    pm.train()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    from moelora.kernels import route as route_kernels

    route_shrink_fwd, fused_calls = route_kernels.route_shrink_fwd, []

    def spy(*args):
        fused_calls.append(1)
        return route_shrink_fwd(*args)

    for name in ("reference", "triton"):
        pm.zero_grad()
        route_kernels.route_shrink_fwd = spy
        try:
            with moelora.set_backend(name):
                if name == "triton":
                    assert backend.resolve(ids.device).__name__ == "moelora.triton_backend"
                out = pm(ids, labels=ids)
                out.loss.backward()
        finally:
            route_kernels.route_shrink_fwd = route_shrink_fwd
        grads = {f"grad {n}": p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        results[name] = {"logits": out.logits.detach(), "aux loss": out.aux_loss.detach(), **grads}
    n_grads = sum(k.startswith("grad ") for k in results["reference"])
    failures = [] if n_grads > 0 else ["no adapter gradients"]
    layers = pm.config.num_hidden_layers
    if len(fused_calls) != layers:  # lora_dropout = 0: every MixLoRA FFN reads x once for router and shrink
        failures.append(f"route_shrink ran {len(fused_calls)} times, expected once per layer ({layers})")
    return failures + _compare(results["triton"], results["reference"])


def _ffn_inputs(gated: bool, g: torch.Generator, T=9, H=20, I=36, E=4, k=2, r=8):
    w, idx = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, -1)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    return dict(
        x=torch.randn(T, H, generator=g),
        gate=torch.randn(T, I, generator=g) if gated else None,
        up=torch.randn(T, I, generator=g),
        weights=w / w.sum(-1, keepdim=True),
        indices=idx,
        loras={
            p: ExpertLora(torch.randn(E, r, i, generator=g) * i**-0.5, torch.randn(E, o, r, generator=g) * 0.3)
            for p, (i, o) in dims.items()
            if gated or p != "gate"
        },
        Wd=torch.randn(H, I, generator=g) * I**-0.5,
        bias=torch.randn(H, generator=g),
        upstream=torch.randn(T, H, generator=g),
    )


def _ffn(impl, d: dict, act, **extra) -> dict:
    leaves = {n: d[n].clone().requires_grad_() for n in ("x", "gate", "up", "weights") if d[n] is not None}
    lo = {p: ExpertLora(*(t.clone().requires_grad_() for t in lora[:2]), *lora[2:]) for p, lora in d["loras"].items()}
    ffn = FFNSpec(
        gate_lora=lo.get("gate"),
        up_lora=lo.get("up"),
        down_lora=lo.get("down"),
        down_proj=lambda h: F.linear(h, d["Wd"], d["bias"]),
        act=act,
        scaling=1.5,
        down_bias=d["bias"],
        **extra,
    )
    y = impl.mixlora_ffn(leaves["x"], leaves.get("gate"), leaves["up"], leaves["weights"], d["indices"], ffn)
    inputs = {**leaves, **{f"{p}.{ab}": t for p, lora in lo.items() for ab, t in zip("AB", lora[:2], strict=True)}}
    grads = torch.autograd.grad(y, list(inputs.values()), d["upstream"])
    return {"y": y, **{f"grad {n}": gr for n, gr in zip(inputs, grads, strict=True)}}


def check_backend_ffn() -> dict[str, list[str]]:
    """The backend's mixlora_ffn: down bias counted sum_j w_j times, HF activation modules, LoRA dropout (inside
    the kernels), fallbacks."""
    from transformers.activations import ACT2FN

    from moelora import triton_backend

    out = {}
    g = torch.Generator().manual_seed(0)
    for act_name, gated in (("silu", True), ("gelu", True), ("gelu_pytorch_tanh", False), ("relu", True)):
        d = _ffn_inputs(gated, g)
        act = ACT2FN[act_name]
        kernel = triton_backend.activation_name(act)
        failures = [] if kernel is not None else [f"{act_name} has no kernel activation"]
        out[f"ffn-{act_name}-{'gated' if gated else 'ungated'}"] = failures + _compare(
            _ffn(triton_backend, d, act), _ffn(reference, d, act)
        )
    # LoRA dropout runs in the kernels (no fallback: a spy on the reference says so), masks as the reference's
    d = _ffn_inputs(True, g)
    reference_ffn, reference_calls = reference.mixlora_ffn, []
    reference.mixlora_ffn = lambda *a, **kw: reference_calls.append(1) or reference_ffn(*a, **kw)
    try:
        got = _ffn(triton_backend, d, F.silu, dropout=LoraDropout(0.5, 7))
    finally:
        reference.mixlora_ffn = reference_ffn
    failures = [f"the reference ran {len(reference_calls)} times"] if reference_calls else []
    out["ffn-dropout"] = failures + _compare(got, _ffn(reference, d, F.silu, dropout=LoraDropout(0.5, 7)))
    # Fallbacks: these run the reference itself, so the results are bitwise equal to it.
    got, want = _ffn(triton_backend, d, ACT2FN["quick_gelu"]), _ffn(reference, d, ACT2FN["quick_gelu"])
    failures = ["quick_gelu has a kernel"] if triton_backend.activation_name(ACT2FN["quick_gelu"]) is not None else []
    out["fallback-quick_gelu"] = failures + [n for n in want if not torch.equal(got[n], want[n])]
    d64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in d.items()}
    d64["loras"] = {p: ExpertLora(lo.A.double(), lo.B.double()) for p, lo in d["loras"].items()}
    got, want = _ffn(triton_backend, d64, F.silu), _ffn(reference, d64, F.silu)
    out["fallback-fp64"] = [n for n in want if not torch.equal(got[n], want[n])]
    return out


def check_ops() -> dict[str, list[str]]:
    """route and moe_lora through the backend's autograd Functions and torch.library ops."""
    from moelora import triton_backend

    g = torch.Generator().manual_seed(1)
    x, router = torch.randn(33, 20, generator=g), torch.randn(8, 20, generator=g) * 0.5
    out = {}
    for kw in (dict(top_k=2), dict(top_p=0.7)):
        res = {}
        for impl in (triton_backend, reference):
            xl, rl = x.clone().requires_grad_(), router.clone().requires_grad_()
            r = impl.route(xl, rl, **kw)
            gx, gr = torch.autograd.grad(
                (r.weights * torch.arange(r.weights.shape[1])).sum() + r.probs.square().sum(), [xl, rl]
            )
            res[impl.__name__] = dict(
                weights=r.weights, probs=r.probs, indices=r.indices.double(), grad_x=gx, grad_router=gr
            )
        out[f"route-{next(iter(kw))}"] = _compare(res["moelora.triton_backend"], res["moelora.reference"])
    # E*r = 32: the dense-masked regime; E*r = 4 * 80 = 320 > 256: the sorted one (a spy says which ran)
    from moelora.kernels import moe_lora_sorted

    sorted_fwd, sorted_calls = moe_lora_sorted.moe_lora_sorted_fwd, []

    def spy(*args, **kwargs):
        sorted_calls.append(1)
        return sorted_fwd(*args, **kwargs)

    moe_lora_sorted.moe_lora_sorted_fwd = spy
    try:
        for case, r, regime in (("moe_lora", 8, "dense"), ("moe_lora-sorted", 80, "sorted")):
            d = _ffn_inputs(True, g, r=r)
            A, B = d["loras"]["up"][:2]
            res = {}
            sorted_calls.clear()
            for impl in (triton_backend, reference):
                leaves = [t.clone().requires_grad_() for t in (d["x"], d["weights"], A, B)]
                y = impl.moe_lora(*leaves[:2], d["indices"], *leaves[2:], 1.5)
                grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
                names = ["y", "grad x", "grad weights", "grad A", "grad B"]
                res[impl.__name__] = dict(zip(names, [y, *grads], strict=True))
            out[case] = _compare(res["moelora.triton_backend"], res["moelora.reference"])
            if bool(sorted_calls) != (regime == "sorted"):
                out[case].append(f"expected the {regime} regime, sorted kernel called {len(sorted_calls)} times")
    finally:
        moe_lora_sorted.moe_lora_sorted_fwd = sorted_fwd
    return out


def check_compile() -> dict[str, list[str]]:
    """opcheck of every op's schema and fake kernel; torch.compile(fullgraph=True) equals eager, fwd + bwd."""
    from moelora import triton_backend

    ops = torch.ops.moelora_triton
    g = torch.Generator().manual_seed(2)
    d = _ffn_inputs(True, g, T=9, H=12, I=20, E=4, k=2, r=4)
    x, router = d["x"], torch.randn(4, 12, generator=g)
    w, idx, probs = ops.route(x, router, 2, 0.0)
    (gA, gB), (uA, uB), (dA, dB) = (d["loras"][p][:2] for p in ("gate", "up", "down"))
    y, u, v = ops.moe_lora(x, w, idx, uA, uB, 2.0)
    big_A, big_B = torch.randn(4, 80, 12, generator=g) / 4, torch.randn(4, 20, 80, generator=g) / 9  # E*r = 320
    sy, su, order, offsets = ops.moe_lora_sorted(x, w, idx, big_A, big_B, 2.0)
    A_cat = torch.cat([gA, uA])
    ua = ops.rank_shrink(x, A_cat)
    ffn_args = (ua, d["gate"], d["up"], w, idx, gB, uB, dA, 2.0, "silu", False)
    hbar, zd = ops.mixlora_ffn(*ffn_args)
    grads_out = (torch.randn_like(hbar), torch.randn_like(zd))
    base = torch.randn(9, 12, generator=g)
    rs_w, rs_idx, rs_probs, rs_ua = ops.route_shrink(x, router, A_cat, 2, 0.0)
    rs_grads = (torch.randn_like(rs_w), torch.randn_like(rs_probs), torch.randn_like(rs_ua))
    cases = {
        "route": (ops.route.default, (x, router, 2, 0.0)),
        "route-top-p": (ops.route.default, (x, router, 0, 0.7)),
        "route-bwd": (ops.route_backward.default, (torch.randn_like(w), probs, x, router, w, idx, probs, True)),
        "moe_lora": (ops.moe_lora.default, (x, w, idx, uA, uB, 2.0)),
        "moe_lora-bwd": (ops.moe_lora_backward.default, (torch.randn_like(y), x, w, idx, uA, uB, u, v, 2.0)),
        "moe_lora_sorted": (ops.moe_lora_sorted.default, (x, w, idx, big_A, big_B, 2.0)),
        "moe_lora_sorted-bwd": (
            ops.moe_lora_sorted_backward.default,
            (torch.randn_like(sy), x, w, idx, big_A, big_B, su, order, offsets, 2.0),
        ),
        "rank_shrink": (ops.rank_shrink.default, (x, A_cat)),
        "rank_shrink-bwd": (ops.rank_shrink_backward.default, (torch.randn_like(ua), x, A_cat)),
        "route_shrink": (ops.route_shrink.default, (x, router, A_cat, 2, 0.0)),
        "route_shrink-top-p": (ops.route_shrink.default, (x, router, uA, 0, 0.7)),
        "route_shrink-bwd": (
            ops.route_shrink_backward.default,
            (*rs_grads, x, router, A_cat, rs_w, rs_idx, rs_probs, True),
        ),
        "ffn": (ops.mixlora_ffn.default, ffn_args),
        "ffn-shared-a": (ops.mixlora_ffn.default, (ua[:, :16], *ffn_args[1:-1], True)),
        "ffn-ungated": (
            ops.mixlora_ffn.default,
            (ua[:, 16:], None, d["up"], w, idx, None, uB, None, 2.0, "relu", False),
        ),
        "ffn-bwd": (ops.mixlora_ffn_backward.default, (*grads_out, *ffn_args)),
        "ffn-sorted": (ops.mixlora_ffn.default, ffn_args),  # run with MOELORA_FFN_REGIME=sorted below
        "ffn-sorted-bwd": (ops.mixlora_ffn_backward.default, (*grads_out, *ffn_args)),
        "down_expand": (ops.down_expand.default, (zd, dB, base, torch.float32)),
        "down_expand-delta": (ops.down_expand.default, (zd, dB, None, torch.float32)),
        "down_expand-bwd": (ops.down_expand_backward.default, (torch.randn_like(base), zd, dB, torch.float32)),
        # LoRA dropout's (drop_p, drop_seed), a seed past 2^32 as LoraDropout.draw gives
        "rank_shrink-dropout": (ops.rank_shrink.default, (x, A_cat, 0.3, 2**40 + 3)),
        "rank_shrink-dropout-bwd": (ops.rank_shrink_backward.default, (torch.randn_like(ua), x, A_cat, 0.3, 2**40)),
        "route_shrink-dropout": (ops.route_shrink.default, (x, router, A_cat, 2, 0.0, 0.3, 2**40 + 3)),
        "route_shrink-dropout-bwd": (
            ops.route_shrink_backward.default,
            (*rs_grads, x, router, A_cat, rs_w, rs_idx, rs_probs, True, 0.3, 2**40 + 3),
        ),
        "ffn-dropout": (ops.mixlora_ffn.default, (*ffn_args, 0.3, 2**40 + 3)),
        "ffn-dropout-bwd": (ops.mixlora_ffn_backward.default, (*grads_out, *ffn_args, 0.3, 2**40 + 3)),
    }
    hidden, num = torch.randn(3, 5, 12, generator=g), torch.tensor(reference.RATIONAL_GELU_NUMERATOR)
    den, pool_w = torch.tensor(reference.RATIONAL_GELU_DENOMINATOR), torch.randn(12, generator=g)
    pmask = torch.ones(3, 5, dtype=torch.bool)
    pmask[0, :2] = False
    route_args = (hidden, pmask, router, num, den, pool_w, 2, "attention")
    gates, pidx, pprobs, pooled, scores, lse = ops.prompt_route(*route_args)
    cases["prompt_route"] = (ops.prompt_route.default, route_args)
    cases["prompt_route-bwd"] = (
        ops.prompt_route_backward.default,
        (torch.randn_like(gates), None, *route_args[:6], pidx, pprobs, pooled, scores, lse, "attention"),
    )
    seg_args = (x, torch.arange(9) % 3, torch.tensor([0, -1, 1]), torch.rand(3, generator=g), uA[:2], uB[:2])
    seg_args = (*seg_args, torch.tensor([2.0, 0.5]))
    sy, su = ops.segmented_lora(*seg_args)
    cases["segmented_lora"] = (ops.segmented_lora.default, seg_args)
    cases["segmented_lora-bwd"] = (ops.segmented_lora_backward.default, (torch.randn_like(sy), *seg_args, su))
    out = {}
    for name, (op, args) in cases.items():
        try:
            with _ffn_regime("sorted" if "sorted" in name and name.startswith("ffn") else None):
                torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
            out[f"opcheck-{name}"] = []
        except Exception as exc:  # opcheck raises OpCheckError with the reason
            out[f"opcheck-{name}"] = [f"{type(exc).__name__}: {str(exc)[:500]}"]

    lo = {p: ExpertLora(*(t.clone().requires_grad_() for t in d["loras"][p][:2])) for p in ("gate", "up", "down")}

    def f(x, router):
        ffn = FFNSpec(
            gate_lora=lo["gate"],
            up_lora=lo["up"],
            down_lora=lo["down"],
            down_proj=lambda h: F.linear(h, d["Wd"], d["bias"]),
            act=F.silu,
            scaling=2.0,
            down_bias=d["bias"],
        )
        r = triton_backend.route(x, router, top_k=2)
        y = triton_backend.mixlora_ffn(x, d["gate"], d["up"], r.weights, r.indices, ffn)
        y_fused, r_fused = triton_backend.routed_mixlora_ffn(x, router, d["gate"], d["up"], ffn, top_k=2, top_p=None)
        y = y + y_fused + r_fused.probs.sum(-1, keepdim=True)
        no_bias = replace(ffn, down_bias=None, down_proj=lambda h: F.linear(h, d["Wd"]))  # the fused add
        y = y + triton_backend.mixlora_ffn(x, d["gate"], d["up"], r.weights, r.indices, no_bias)
        y = y + triton_backend.moe_lora(x, r.weights, r.indices, big[0], big[1], 2.0)  # sorted regime
        return y + triton_backend.moe_lora(x, r.weights, r.indices, lo["up"].A, lo["down"].B, 2.0)

    big = (big_A.clone().requires_grad_(), torch.randn(4, 12, 80, generator=g).requires_grad_())
    xl, rl = x.clone().requires_grad_(), router.clone().requires_grad_()
    params = [xl, rl, *(t for p in lo.values() for t in p[:2]), *big]
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        y = fn(xl, rl)
        results.append({"y": y, **{f"grad {i}": gr for i, gr in enumerate(torch.autograd.grad(y.sum(), params))}})
    out["compile-fullgraph"] = _compare(results[1], results[0], tol=1e-6)
    return out


def check_milora() -> dict[str, list[str]]:
    """A MiLoRA tiny llama (left padding): training forward + backward (prompt_route's kernels) and a mixed
    batch of MiLoRA and MixLoRA tenants at inference (segmented_lora's kernel), triton against reference."""
    from moelora import MiLoraConfig

    pm = get_moelora_model(tiny_model("llama"), MiLoraConfig(r=4, lora_dropout=0.0), "mi")
    pm.add_adapter(MiLoraConfig(r=8, lora_dropout=0.0, pooling="last", top_k=2), "mi2")
    pm.add_adapter(MixLoraConfig(r=4, num_experts=4, lora_dropout=0.0), "mix")
    randomize_adapters(pm)
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = {}
    train, mixed = {}, {}
    for name in ("reference", "triton"):
        pm.train()
        pm.zero_grad()
        with moelora.set_backend(name):
            impl = backend.resolve(ids.device)
            assert (
                name == "reference" or impl.prompt_route.__module__ == impl.segmented_lora.__module__ == impl.__name__
            )
            o = pm(ids, attention_mask=mask, labels=ids)
            o.loss.backward()
            grads = {f"grad {n}": p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
            train[name] = {"logits": o.logits.detach(), "aux loss": o.aux_loss.detach(), **grads}
            pm.eval()
            with torch.no_grad():
                logits = pm(ids, attention_mask=mask, adapter_names=["mi", "mix", "mi2"]).logits
            mixed[name] = {"logits": logits}
    n_grads = sum(k.startswith("grad ") for k in train["reference"])
    out["milora-train"] = ([] if n_grads == 2 * (14 + 4) else [f"{n_grads} gradients"]) + _compare(
        train["triton"], train["reference"], tol=1e-4
    )
    out["milora-mixed-batch"] = _compare(mixed["triton"], mixed["reference"])
    return out


MODELS = {
    "model-llama-topk": ("llama", {}),
    "model-phi3": ("phi3", {}),
    "model-phi": ("phi", {}),
    "model-llama-sorted-ffn": ("llama", {}, "sorted"),  # the combination-sorted FFN kernels, forced
    "model-phi3-sorted-ffn": ("phi3", {}, "sorted"),
}


def worker() -> dict[str, list[str]]:
    results = {name: check_model(*spec) for name, spec in MODELS.items()}
    return results | check_backend_ffn() | check_ops() | check_compile() | check_milora()


WORKER_CASES = [
    *MODELS,
    "ffn-silu-gated",
    "ffn-gelu-gated",
    "ffn-gelu_pytorch_tanh-ungated",
    "ffn-relu-gated",
    "ffn-dropout",
    "fallback-quick_gelu",
    "fallback-fp64",
    "route-top_k",
    "route-top_p",
    "moe_lora",
    "moe_lora-sorted",
    *(
        f"opcheck-{n}"
        for n in (
            *("route", "route-top-p", "route-bwd", "moe_lora", "moe_lora-bwd", "rank_shrink", "rank_shrink-bwd"),
            *("moe_lora_sorted", "moe_lora_sorted-bwd"),
            *("route_shrink", "route_shrink-top-p", "route_shrink-bwd"),
            *("ffn", "ffn-shared-a", "ffn-ungated", "ffn-bwd", "ffn-sorted", "ffn-sorted-bwd"),
            *("down_expand", "down_expand-delta", "down_expand-bwd"),
            *("rank_shrink-dropout", "rank_shrink-dropout-bwd", "route_shrink-dropout", "route_shrink-dropout-bwd"),
            *("ffn-dropout", "ffn-dropout-bwd"),
            *("prompt_route", "prompt_route-bwd", "segmented_lora", "segmented_lora-bwd"),
        )
    ),
    "compile-fullgraph",
    "milora-train",
    "milora-mixed-batch",
]


@pytest.mark.parametrize("case", WORKER_CASES)
def test_triton_backend_matches_reference(worker_results, case):
    assert case in worker_results, f"the worker did not run {case}"
    failures = worker_results[case]
    assert not failures, "; ".join(failures)


def test_triton_backend_with_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with moelora.set_backend("triton"), pytest.raises(RuntimeError, match=r"cannot run tensors on cpu.*CUDA tensors"):
        moelora.ops.route(torch.randn(3, 8), torch.randn(4, 8), top_k=1)


def test_missing_triton_gives_a_clear_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, to the import
    monkeypatch.setattr(backend, "_registered", {"reference": reference})
    monkeypatch.setattr(backend, "_triton_tried", False)
    monkeypatch.setattr(backend, "_why_missing", dict(backend._why_missing))
    monkeypatch.setitem(sys.modules, "moelora.triton_backend", None)  # as if `import triton` failed
    # and forget an earlier import in this process: `from moelora import triton_backend` would find it there
    monkeypatch.delattr(moelora, "triton_backend", raising=False)
    with moelora.set_backend("triton"), pytest.raises(RuntimeError, match="triton is not importable"):
        backend.resolve(torch.device("cpu"))


def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with moelora.set_backend("auto"):
        impl = backend.resolve(torch.device("cpu"))
    assert impl.__name__ in ("moelora.cpu_backend", "moelora.reference")


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.py end to end on tiny shapes under the interpreter: parity and repeat runs pass, the
    JSON and markdown land in --out with the device in their names."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)],
        env=WORKER_ENV,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report_path,) = tmp_path.glob("gpu-check-cpu-interpreter-*.json")
    report = json.loads(report_path.read_text())
    assert report["dry_run"] and report["parity"] and all(r["ok"] for r in report["parity"])
    assert {r["kernel"] for r in report["configs"]} == {
        "route_shrink_fwd_kernel",
        "mixlora_ffn_fwd_kernel",
        "mixlora_ffn_bwd_kernel_rows",
        "mixlora_ffn_bwd_kernel_cols",
        "moe_lora_fwd_kernel_shrink",
        "moe_lora_fwd_kernel_expand",
        "moe_lora_bwd_kernel_wgrad",
        "ffn_sorted_fwd_kernel",
        "ffn_sorted_bwd_kernel_rows",
        "ffn_sorted_bwd_kernel_wgrad",
    }
    assert all(r["ok"] for r in report["configs"])
    ffn_ops = {f"{op} {regime}" for op in ("mixlora_ffn", "routed_mixlora_ffn") for regime in ("dense", "sorted")}
    ops = {"route", "moe_lora", "moe_lora_sorted", "prompt_route", "segmented_lora"} | ffn_ops
    assert {r["op"] for r in report["parity"]} == ops
    assert all(row["route_shrink_GBps"] > 0 for row in report["bandwidth"])
    assert [row["E"] for row in report["regimes"]] == [4, 16]
    assert all(ms > 0 for row in report["regimes"] for ms in row["ms"].values())
    assert all(r["forward_bitwise"] and r["backward_bitwise"] for r in report["races"])
    assert all(ms > 0 for row in report["ffn"] for ms in row["ms"].values())
    assert {"triton-dense fwd+bwd", "triton-sorted fwd+bwd"} <= set(report["ffn"][0]["ms"])
    assert report_path.with_suffix(".md").read_text().startswith("# gpu_check on cpu-interpreter")


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args],
        env=WORKER_ENV,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_gpu_check_sections_then_merge(tmp_path):
    """What bench/gpu_session.sh does on a GPU: sections in separate runs (--only, --tag), then one report
    (--merge) holding every run's sections and nothing else."""
    parts = tmp_path / "parts"
    for section, tag in (("regimes", "a"), ("parity", "b")):
        proc = _gpu_check("--dry-run", "--only", section, "--dtypes", "fp32", "--out", str(parts), "--tag", tag)
        assert proc.returncode == 0, proc.stderr[-3000:]
    paths = sorted(parts.glob("gpu-check-*.json"))
    assert [p.stem.rsplit("-", 1)[1] for p in paths] == ["a", "b"]
    proc = _gpu_check("--merge", *map(str, paths), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (merged,) = tmp_path.glob("gpu-check-*.json")
    report = json.loads(merged.read_text())
    assert [row["E"] for row in report["regimes"]] == [4, 16]
    assert {r["dtype"] for r in report["parity"]} == {"fp32"} and all(r["ok"] for r in report["parity"])
    assert not {"ffn", "races", "bandwidth", "crossover"} & set(report)
    text = merged.with_suffix(".md").read_text()
    assert "## moe_lora regimes" in text and "## Parity" in text and "## MixLoRA FFN timings" not in text


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param(("--only", "ffn,speed"), "--only: unknown sections ['speed']", id="unknown-section"),
        pytest.param(("--dtypes", "fp8"), "--dtypes: unknown ['fp8']", id="unknown-dtype"),
    ],
)
def test_gpu_check_rejects_bad_arguments(args, match):
    proc = _gpu_check("--dry-run", *args)
    assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-2000:]


FORCE_EACH_CONFIG = """
from bench import parity  # --dry-run in argv: it sets TRITON_INTERPRET before triton is imported
import json, torch
kernel, tiles, _ = parity._autotuned_kernels()["mixlora_ffn_fwd_kernel"]
seen, run = set(), kernel.fn.run
def spy(*args, **kwargs):
    seen.add((kwargs["BT"], kwargs["BI"]))
    return run(*args, **kwargs)
kernel.fn.run = spy
rows = parity.config_parity((7, 20, 40, 4, 2, 8), ["fp32"], torch.device("cpu"))
print(json.dumps(dict(
    ok=[r["ok"] for r in rows if r["kernel"] == "mixlora_ffn_fwd_kernel"],
    seen=sorted(seen),
    tiles=sorted({(c.kwargs["BT"], c.kwargs["BI"]) for c in tiles}),
)))
"""


def test_gpu_check_forces_each_autotune_config():
    """gpu_check's configs section runs every GPU tile of an autotuned kernel in turn against the reference
    (the interpreter cannot autotune a list: forcing one tile at a time is how the other tiles get run)."""
    proc = subprocess.run(
        [sys.executable, "-c", FORCE_EACH_CONFIG, "--dry-run"],
        env={**WORKER_ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["ok"]) == 6 and all(out["ok"])
    # every GPU tile reached the kernel (beside the interpreter's own, while other kernels were forced)
    assert {tuple(t) for t in out["tiles"]} <= {tuple(t) for t in out["seen"]}, out
    assert len(out["tiles"]) == 5  # six tiles, two of them BT=16/BI=64 at 4 and 8 warps


if __name__ == "__main__":
    serve(worker)
