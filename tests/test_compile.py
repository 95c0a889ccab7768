"""torch.compile through the C++ ops: their fake kernels agree with the real ones, and whole MixLoRA and MiLoRA
models compile with fullgraph=True and equal eager, forward and backward.

The reference backend compiles too, but only with graph breaks (its expert sort reads sizes on the host)
and slowly (~100 s for the tiny llama here), so it is not run in CI.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_adapters, tiny_model

import moelora
from moelora import MiLoraConfig, MixLoraConfig, get_moelora_model

cpu = pytest.importorskip("moelora.cpu_backend", reason="moelora._C is not built", exc_type=ImportError)
ops = torch.ops.moelora


def _op_cases():
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k, r = 9, 12, 20, 4, 2, 4
    x, gate, up = (torch.randn(T, n, generator=g) for n in (H, I, I))
    router = torch.randn(E, H, generator=g)
    weights, indices, probs = ops.route(x, router, k, 0.0)
    loras = [torch.randn(E, r, H, generator=g), torch.randn(E, I, r, generator=g)] * 2
    loras += [torch.randn(E, r, I, generator=g), torch.randn(E, H, r, generator=g)]
    grad_k, grad_h = torch.randn(T, k, generator=g), torch.randn(T, H, generator=g)
    return [
        pytest.param(ops.route.default, (x, router, k, 0.0), id="route"),
        pytest.param(ops.route.default, (x, router, 0, 0.7), id="route-top-p"),
        pytest.param(
            ops.route_backward.default, (grad_k, probs, x, router, weights, indices, probs, True), id="route-bwd"
        ),
        pytest.param(ops.moe_lora.default, (x, weights, indices, loras[0], loras[1], 2.0), id="moe_lora"),
        pytest.param(
            ops.moe_lora_backward.default,
            (torch.randn(T, I), x, weights, indices, loras[0], loras[1], 2.0),
            id="moe_lora-bwd",
        ),
        pytest.param(ops.mixlora_ffn.default, (x, gate, up, weights, indices, *loras, E, 2.0, "silu"), id="ffn"),
        pytest.param(
            ops.mixlora_ffn.default,
            (x, None, up, weights, indices, None, None, *loras[2:], E, 2.0, "gelu_tanh"),
            id="ffn-ungated",
        ),
        pytest.param(
            ops.mixlora_ffn_backward.default,
            (torch.randn(T, I), grad_h, x, gate, up, weights, indices, *loras, E, 2.0, "silu"),
            id="ffn-bwd",
        ),
    ]


@pytest.mark.parametrize(("op", "args"), _op_cases())
def test_fake_kernels_match_the_real_ops(op, args):
    # Autograd lives in Python (autograd.Function in moelora.cpu_backend), so that check does not apply.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_whole_model_compiles_fullgraph_and_equals_eager():
    pm = get_moelora_model(tiny_model("llama"), MixLoraConfig(lora_dropout=0.0))
    randomize_adapters(pm)
    pm.train()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with moelora.set_backend("cpu"):
        eager = pm(ids, labels=ids)
        eager.loss.backward()
        want = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        pm.zero_grad()
        compiled = torch.compile(pm, fullgraph=True)(ids, labels=ids)
        compiled.loss.backward()
    got = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    # Inductor fuses and reorders the base model's fp32 ops: agreement to fp32 rounding, not bitwise.
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(got) == 30
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=f"grad {n}")


def test_milora_model_compiles_fullgraph_and_equals_eager():
    """MiLoRA's routing hooks (prefill detection, per-layer routers, the kept routing) trace into one graph."""
    pm = get_moelora_model(tiny_model("llama"), MiLoraConfig(r=4, lora_dropout=0.0))
    randomize_adapters(pm)
    pm.train()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with moelora.set_backend("cpu"):
        eager = pm(ids, attention_mask=mask, labels=ids)
        eager.loss.backward()
        want = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        pm.zero_grad()
        compiled = torch.compile(pm, fullgraph=True)(ids, attention_mask=mask, labels=ids)
        compiled.loss.backward()
    got = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-6)
    # 2 layers x (7 modules x A, B + router weight, pooling vector, rational numerator and denominator)
    assert got.keys() == want.keys() and len(got) == 2 * (14 + 4)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=f"grad {n}")
