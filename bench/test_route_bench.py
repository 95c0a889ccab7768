"""pytest-benchmark suite of the router alone (softmax + top-k / top-p), with parity as a real test."""

from __future__ import annotations

import pytest
import torch

from bench import route
from bench.conftest import skip_if_missing, tiny_shape
from bench.suites import ROUTE
from bench.timing import MODES, check_parity

ROUTINGS = [pytest.param(None, id="top-k"), pytest.param(0.5, id="top-p")]


@pytest.mark.parametrize("top_p", ROUTINGS)
@pytest.mark.parametrize("with_grads", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ROUTE.checked)
def test_parity(provider, with_grads, top_p):
    skip_if_missing(ROUTE, provider)
    inp = route.make_inputs(tiny_shape(ROUTE, top_p=top_p))
    parity = check_parity(ROUTE, provider, inp, with_grads)
    assert parity.ok, parity.summary()
    assert set(parity.rel_err) == {"weights", "probs"} | ({"dx", "drouter"} if with_grads else set())


def test_parity_catches_routing_without_renormalisation(monkeypatch):
    def unnormalised(inp):
        probs = torch.softmax(torch.nn.functional.linear(inp.x.float(), inp.router), dim=-1)
        weights, indices = torch.topk(probs, inp.top_k, dim=-1)
        return lambda: route.Routing(weights, indices, probs)

    monkeypatch.setitem(route.PROVIDERS, "torch-naive", unnormalised)
    parity = check_parity(ROUTE, "torch-naive", route.make_inputs(tiny_shape(ROUTE)), with_grads=False)
    assert not parity.ok


def test_compared_ignores_slot_order():
    out = route.naive_route(route.make_inputs(tiny_shape(ROUTE)))
    flipped = route.Routing(out.weights.flip(-1), out.indices.flip(-1), out.probs)
    assert torch.equal(route.compared(out)["weights"], route.compared(flipped)["weights"])


def test_top_p_keeps_the_shortest_prefix_over_p():
    inp = route.make_inputs(tiny_shape(ROUTE, top_p=0.5))
    out = route.naive_route(inp)
    mass = out.weights.sum(-1)
    smallest_kept = out.weights.gather(1, (out.indices >= 0).sum(-1, keepdim=True) - 1).squeeze(1)
    assert (mass > 0.5).all()  # enough experts...
    assert (mass - smallest_kept <= 0.5).all()  # ...and not one more than needed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ROUTE.providers)
def test_latency(benchmark, provider, mode):
    skip_if_missing(ROUTE, provider)
    out = benchmark(ROUTE.step(provider, route.make_inputs(tiny_shape(ROUTE)), mode))
    assert all(torch.isfinite(t).all() for t in (out if mode == "fwd+bwd" else out[:1]))
