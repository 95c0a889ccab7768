"""Triton `route` against `moelora.reference.route`, on CPU tensors through the Triton interpreter.

Through the production op, moelora.triton_backend.route (its input checks included; T = 0 goes to the
reference there without a launch).

Forward (weights, indices, probs) and the gradients of x and the router weight, fp32 and fp16 inputs
(bf16 math is broken in the interpreter: checked on a GPU only); tolerances follow each output's dtype.

The kernels run in ONE child process: TRITON_INTERPRET must be set before triton is first imported, and
`import moelora` (conftest) already imports it; the child also keeps an interpreter segfault (an
out-of-bounds load) from taking the whole pytest run down. Run directly, this file is that child:
`python tests/test_triton_route.py OUT.pt` computes every case and saves (actual, expected) pairs.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the child, before triton is imported; the pytest process itself stays uninterpreted
    os.environ["TRITON_INTERPRET"] = "1"

import sys

import pytest
import torch
from _triton_worker import run_script

pytest.importorskip("triton")

from moelora import reference

INDEX_SENTINEL = -777  # neither a valid index nor the -1 of an unused slot


def _spec(T, H, E, mode, v, dtype=torch.float32, loss="both", inputs="randn"):
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}[dtype]
    tail = "" if (loss, inputs) == ("both", "randn") else f"-{loss}-{inputs}"
    case_id = f"T{T}-H{H}-E{E}-{mode}{v}-{name}{tail}"
    return case_id, dict(T=T, H=H, E=E, mode=mode, v=v, dtype=dtype, loss=loss, inputs=inputs)


def _table() -> dict[str, dict]:
    specs = []
    for T in (1, 7, 63, 500):
        for i, E in enumerate((1, 4, 8, 16)):
            H = (20, 72)[(T + i) % 2]  # neither is a multiple of the 64-wide H block
            for k in sorted({1, min(2, E), E}):
                specs.append(_spec(T, H, E, "k", k))
            specs += [_spec(T, H, E, "p", 0.6), _spec(T, H, E, "p", 1.0)]
    for T, H, E in ((7, 72, 4), (63, 20, 8), (500, 72, 16)):
        for mode, v in (("k", 2), ("k", E), ("p", 0.6), ("p", 1.0)):
            specs.append(_spec(T, H, E, mode, v, torch.float16))
    for loss in ("weights", "probs"):  # the other upstream gradient reaches the backward as None
        specs += [_spec(40, 20, 8, "k", 2, loss=loss), _spec(40, 20, 8, "p", 0.6, loss=loss)]
    specs += [
        _spec(20, 17, 6, "k", 3, torch.float64, inputs="strided"),  # fp64 computes in fp64; strided x and Wr
        _spec(33, 20, 8, "k", 2, inputs="one-expert"),  # every token picks expert 5 first
        _spec(5, 20, 8, "k", 3, inputs="ties"),  # all logits 0: ties go to the lower index
        _spec(0, 20, 4, "k", 2),  # empty batch: no launch, zero router gradient
    ]
    return dict(specs)


CASES = _table()


def _inputs(s: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    T, H, E = s["T"], s["H"], s["E"]
    if s["inputs"] == "strided":
        x = torch.randn(T, 2 * H, generator=g, dtype=s["dtype"])[:, ::2]
        return x, torch.randn(H, E, generator=g).t()
    if s["inputs"] == "one-expert":
        w = torch.randn(E, H, generator=g) * 0.1  # small, not zero: torch.topk breaks ties its own way
        # Dominant by ~5 logits (other probabilities ~5e-3). At 2.0 (~24 logits, others ~1e-11) the logit
        # gradients were differences of O(1) terms ~1e-9 apart, fp32 rounding noise: a fresh install (numpy
        # 2.4.6 does the interpreter's dots) put it at 0.54 of grad_x's largest value.
        w[5] = 0.5
        return torch.rand(T, H, generator=g) + 0.1, w
    if s["inputs"] == "ties":
        return torch.zeros(T, H), torch.randn(E, H, generator=g)
    return torch.randn(T, H, generator=g).to(s["dtype"]), torch.randn(E, H, generator=g) * 0.5


def _run_case(s: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(actual, expected) for every output and gradient of one case."""
    from moelora.triton_backend import route

    g = torch.Generator().manual_seed(1000 * s["T"] + 10 * s["H"] + s["E"])
    x, w = _inputs(s, g)
    kwargs = {"top_k": s["v"]} if s["mode"] == "k" else {"top_p": s["v"]}
    k = s["v"] if s["mode"] == "k" else s["E"]
    dt = reference.compute_dtype(x)
    gw = torch.randn(s["T"], k, generator=g, dtype=dt) * (s["loss"] != "probs")
    gp = torch.randn(s["T"], s["E"], generator=g, dtype=dt) * (s["loss"] != "weights")

    results = []
    for fn in (route, reference.route):
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        out = fn(xr, wr, **kwargs)
        terms = {"weights": (out.weights * gw).sum(), "probs": (out.probs * gp).sum()}
        loss = sum(terms.values()) if s["loss"] == "both" else terms[s["loss"]]
        results.append((*out, *torch.autograd.grad(loss, (xr, wr))))
    pairs = dict(zip(("weights", "indices", "probs", "grad_x", "grad_router"), zip(*results, strict=True), strict=True))
    if s["inputs"] == "ties":  # torch.topk's tie order is unspecified; which experts win decides the gradients
        pairs = {"indices": (pairs["indices"][0], torch.arange(k).expand(s["T"], k)), "probs": pairs["probs"]}
    return pairs


def _child(path: str) -> None:
    empty = torch.empty

    def poisoned(*args, **kwargs):  # an output the kernel never writes keeps NaN / the sentinel
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else INDEX_SENTINEL)

    torch.empty = poisoned
    torch.save({case_id: _run_case(s) for case_id, s in CASES.items()}, path)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """The tensors themselves (not a failure list): the worker saves them, the tests compare them."""
    path = tmp_path_factory.mktemp("triton_route") / "results.pt"
    run_script(__file__, str(path))
    return torch.load(path)


def _tol(dtype: torch.dtype) -> float:
    """Relative to the largest expected magnitude: fp32 rounding, or 2 ulps of a 16-bit output."""
    return max(1e-5, 2 * torch.finfo(dtype).eps) if dtype != torch.float64 else 1e-12


@pytest.mark.parametrize("case_id", list(CASES))
def test_route_matches_reference(results, case_id):
    for name, (actual, expected) in results[case_id].items():
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        if not actual.is_floating_point():
            assert torch.equal(actual, expected), f"{name}: {(actual != expected).sum().item()} entries differ"
            continue
        assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten output?)"
        if actual.numel() == 0:
            continue
        scale = expected.abs().max().clamp_min(1e-30)
        err = ((actual.double() - expected.double()).abs().max() / scale).item()
        assert err <= _tol(actual.dtype), f"{name}: relative error {err:.3g} > {_tol(actual.dtype):.3g}"
    if CASES[case_id]["inputs"] == "one-expert":
        assert (results[case_id]["indices"][0][:, 0] == 5).all()
    weights = results[case_id].get("weights")
    if CASES[case_id]["mode"] == "k" and weights is not None and weights[0].numel():
        torch.testing.assert_close(weights[0].sum(-1), torch.ones_like(weights[0][:, 0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("x", "w", "kwargs", "error", "match"),
    [
        pytest.param((4, 8), (3, 8), {}, ValueError, "exactly one", id="neither"),
        pytest.param((4, 8), (3, 8), {"top_k": 1, "top_p": 0.5}, ValueError, "exactly one", id="both"),
        pytest.param((2, 4, 8), (3, 8), {"top_k": 1}, ValueError, "x must be 2-D", id="x-3d"),
        pytest.param((4, 8), (8,), {"top_k": 1}, ValueError, "router_weight must be 2-D", id="w-1d"),
        pytest.param((4, 8), (3, 9), {"top_k": 1}, ValueError, "H=8", id="h-mismatch"),
        pytest.param((4, 8), (3, 8), {"top_k": 0}, ValueError, "top_k", id="k0"),
        pytest.param((4, 8), (3, 8), {"top_k": 4}, ValueError, "top_k", id="k-gt-E"),
        pytest.param((4, 8), (3, 8), {"top_k": 1.0}, ValueError, "top_k", id="k-float"),
        pytest.param((4, 8), (3, 8), {"top_p": 0.0}, ValueError, "top_p", id="p0"),
        pytest.param((4, 8), (3, 8), {"top_p": 1.5}, ValueError, "top_p", id="p-gt-1"),
    ],
)
def test_route_bad_arguments(x, w, kwargs, error, match):
    from moelora.triton_backend import route

    with pytest.raises(error, match=match):
        route(torch.randn(x), torch.randn(w), **kwargs)


@pytest.mark.parametrize("bad", ["x", "router_weight"])
def test_route_rejects_integer_inputs(bad):
    from moelora.triton_backend import route

    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match=bad):
        route(x.long() if bad == "x" else x, w.long() if bad == "router_weight" else w, top_k=1)


def test_route_rejects_mixed_devices():
    from moelora.triton_backend import route

    with pytest.raises(ValueError, match="router_weight is on meta"):
        route(torch.randn(4, 8), torch.randn(3, 8, device="meta"), top_k=1)


if __name__ == "__main__":
    _child(sys.argv[1])
