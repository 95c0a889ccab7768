"""The C++ CPU backend: autograd Functions over the ops that csrc/ registers (torch.ops.moelora.*).

Importing this module loads the extension moelora._C; it raises ImportError when the extension was not
built (no compiler at install time), and moelora.backend then keeps the reference. The C++ ops compute in
fp32 (fp64 for fp64 inputs), like the reference. What they do not cover falls back to the reference:
DoRA (supports_dora = False) and activations other than SiLU, GELU (erf or tanh) and ReLU. MiLoRA's
segmented_lora is a C++ kernel at decoding sizes and ATen GEMMs grouped by adapter above them (moelora.segmented);
prompt_route is the reference's ATen code. LoRA dropout
(moelora.dropout) runs inside the C++ FFN from (p, seed): its Philox mask is made where it is used, in the
forward and again in the backward, and `dropout_mask` gives the same mask outside the kernel.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from moelora import backend, reference, segmented
from moelora.activations import activation_name
from moelora.reference import FFNSpec, Routing

_spec = importlib.util.find_spec("moelora._C")
if _spec is None or _spec.origin is None:
    raise ImportError("moelora._C is not built")
torch.ops.load_library(_spec.origin)
_ops = torch.ops.moelora


# Fake (meta) kernels: output shapes without running C++, so that torch.compile traces through the ops.
@torch.library.register_fake("moelora::route")
def _route_fake(x, router_weight, top_k, top_p):
    dt = reference.compute_dtype(x)
    k = top_k if top_k > 0 else router_weight.shape[0]
    probs = x.new_empty(x.shape[0], router_weight.shape[0], dtype=dt)
    return x.new_empty(x.shape[0], k, dtype=dt), x.new_empty(x.shape[0], k, dtype=torch.int64), probs


@torch.library.register_fake("moelora::route_backward")
def _route_backward_fake(grad_weights, grad_probs, x, router_weight, weights, indices, probs, renormalized):
    return torch.empty_like(x), torch.empty_like(router_weight)


@torch.library.register_fake("moelora::moe_lora")
def _moe_lora_fake(x, weights, indices, A, B, scaling):
    return x.new_empty(x.shape[0], B.shape[1])


@torch.library.register_fake("moelora::moe_lora_backward")
def _moe_lora_backward_fake(grad_y, x, weights, indices, A, B, scaling):
    return torch.empty_like(x), torch.empty_like(weights), torch.empty_like(A), torch.empty_like(B)


@torch.library.register_fake("moelora::mixlora_ffn")
def _mixlora_ffn_fake(
    x, gate, up, weights, indices, gA, gB, uA, uB, dA, dB, num_experts, scaling, act, dropout_p=0.0, seed=0
):
    dt = reference.compute_dtype(up)
    hidden = dB.shape[1] if dB is not None else 0
    return up.new_empty(up.shape, dtype=dt), up.new_empty(up.shape[0], hidden, dtype=dt)


@torch.library.register_fake("moelora::mixlora_ffn_backward")
def _mixlora_ffn_backward_fake(grad_hbar, grad_y_lora, x, gate, up, weights, indices, *loras_and_args):
    none = up.new_empty(0, dtype=reference.compute_dtype(up))
    like = [x, gate, up, weights, *loras_and_args[:6]]
    return [torch.empty_like(t) if t is not None else none for t in like]


@torch.library.register_fake("moelora::segmented_lora_decode")
def _segmented_lora_decode_fake(x, token_seq, seq_lora, seq_gate, A, B, scaling):
    return x.new_empty(x.shape[0], B.shape[1])


@torch.library.register_fake("moelora::dropout_mask")
def _dropout_mask_fake(seed, stream, numel, p):
    return torch.empty(numel, dtype=torch.bool)


supports_dora = False
lora = reference.lora  # a dense LoRA is two ATen GEMMs already
# MiLoRA's prompt router runs once per layer per prompt (a pooling reduction, one [B, H] x [H, M] GEMM, a
# softmax and a top-k over M <= 7 modules): at B=8, S=64, H=512 it took about 1 ms per layer on a loaded 2-core
# AMD EPYC, under 2% of the prefill, so the ATen code of the reference is this backend's op too.
prompt_route = reference.prompt_route

# segmented_lora calls of at most this many tokens without a gradient (decoding steps of many tenants) run the
# C++ kernel (csrc/segmented_lora.cpp: each token reads its adapter's A and B in place); larger ones, and any
# that needs a gradient, group rows by adapter through ATen GEMMs (moelora.segmented).
SEGMENTED_DECODE_TOKENS = 64


def segmented_lora(
    x: Tensor, token_seq: Tensor, seq_lora: Tensor, seq_gate: Tensor, A: Tensor, B: Tensor, scaling: Tensor
) -> Tensor:
    """moelora.reference.segmented_lora (shapes there) on this backend."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, seq_gate, A, B))
    if x.shape[0] <= SEGMENTED_DECODE_TOKENS and not grad and x.dim() == 2:
        return _ops.segmented_lora_decode(x, token_seq, seq_lora, seq_gate, A, B, scaling)
    return segmented.segmented_lora(x, token_seq, seq_lora, seq_gate, A, B, scaling)


def _seed_arg(seed: int) -> int:
    """A seed in [0, 2^64) as the schema's int64: the same 64 bits (C++ reads them back as uint64)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"dropout seed must be in [0, 2^64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def dropout_mask(seed: int, stream: int, numel: int, p: float) -> Tensor:
    """The keep mask (bool [numel]) that mixlora_ffn's dropout with (p, seed) applies to `stream`, made in C++:
    bitwise moelora.dropout.dropout_mask(seed, stream, numel, p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_mask: p must be in [0, 1), got {p!r}")
    return _ops.dropout_mask(_seed_arg(seed), stream, numel, float(p))


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, router_weight: Tensor, top_k: int, top_p: float):
        weights, indices, probs = _ops.route(x, router_weight, top_k, top_p)
        ctx.save_for_backward(x, router_weight, weights, indices, probs)
        ctx.renormalized = top_k > 0
        ctx.mark_non_differentiable(indices)
        return weights, indices, probs

    @staticmethod
    def backward(ctx, grad_weights, _grad_indices, grad_probs):
        x, router_weight, weights, indices, probs = ctx.saved_tensors
        if grad_weights is None:
            grad_weights = torch.zeros_like(weights)
        grad_x, grad_router = _ops.route_backward(
            grad_weights, grad_probs, x, router_weight, weights, indices, probs, ctx.renormalized
        )
        return grad_x, grad_router, None, None


def route(x: Tensor, router_weight: Tensor, top_k: int | None = None, top_p: float | None = None) -> Routing:
    """moelora.reference.route in C++: one GEMM, then softmax and top-k / top-p per token."""
    if (top_k is None) == (top_p is None):
        raise ValueError("route: pass exactly one of top_k and top_p")
    weights, indices, probs = _Route.apply(x, router_weight, top_k or 0, float(top_p or 0.0))
    return Routing(weights, indices, probs)


class _MoeLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, indices, A, B, scaling):
        ctx.save_for_backward(x, weights, indices, A, B)
        ctx.scaling = scaling
        return _ops.moe_lora(x, weights, indices, A, B, scaling)

    @staticmethod
    def backward(ctx, grad_y):
        x, weights, indices, A, B = ctx.saved_tensors
        grad_x, grad_w, grad_A, grad_B = _ops.moe_lora_backward(grad_y, x, weights, indices, A, B, ctx.scaling)
        return grad_x, grad_w, None, grad_A, grad_B, None


def moe_lora(x: Tensor, weights: Tensor, indices: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """moelora.reference.moe_lora in C++ (per-expert gathered GEMMs)."""
    return _MoeLora.apply(x, weights, indices, A, B, float(scaling))


class _MixLoraFfn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, up, weights, indices, gA, gB, uA, uB, dA, dB, num_experts, scaling, act, p, seed):
        hbar, y_lora = _ops.mixlora_ffn(
            x, gate, up, weights, indices, gA, gB, uA, uB, dA, dB, num_experts, scaling, act, p, seed
        )
        ctx.save_for_backward(x, gate, up, weights, indices, gA, gB, uA, uB, dA, dB)
        ctx.args = (num_experts, scaling, act, p, seed)  # the backward makes the dropout masks again
        ctx.mark_non_differentiable(indices)
        return hbar, y_lora

    @staticmethod
    def backward(ctx, grad_hbar, grad_y_lora):
        x, gate, up, weights, indices, gA, gB, uA, uB, dA, dB = ctx.saved_tensors
        if grad_hbar is None:
            grad_hbar = torch.zeros(up.shape, dtype=reference.compute_dtype(up))
        grads = _ops.mixlora_ffn_backward(
            grad_hbar, grad_y_lora, x, gate, up, weights, indices, gA, gB, uA, uB, dA, dB, *ctx.args
        )
        # The C++ side returns a 1-d empty tensor for an input that has no gradient (an absent LoRA or gate).
        grad_x, grad_gate, grad_up, grad_w, *lora_grads = (
            None if g.dim() == 1 and g.numel() == 0 else g for g in grads
        )
        return (grad_x, grad_gate, grad_up, grad_w, None, *lora_grads, None, None, None, None, None)


def mixlora_ffn(x: Tensor, gate: Tensor | None, up: Tensor, weights: Tensor, indices: Tensor, ffn: FFNSpec) -> Tensor:
    """moelora.reference.mixlora_ffn with the rank-r work, activation, weighted sum and LoRA dropout in C++.

    The frozen down projection runs here, once, on hbar (so a quantised base layer still works). With
    `ffn.dropout`, x is dropped for the gate/up shrinks and each h_j for the down shrink by the Philox masks
    of moelora.dropout (rebuild them with `dropout_mask`); the router and hbar see them undropped.
    """
    act_name = activation_name(ffn.act)
    if act_name is None or not ffn.has_lora:
        # Not covered in C++: another activation; without any LoRA there is nothing to fuse.
        if act_name is None:
            backend.fell_back("mixlora_ffn", f"the cpu backend does not cover the activation {ffn.act!r}")
        return reference.mixlora_ffn(x, gate, up, weights, indices, ffn)
    flat = [t for p in ffn.loras for t in ((p.A, p.B) if p is not None else (None, None))]
    dropout = ffn.dropout
    p, seed = (float(dropout.p), _seed_arg(dropout.seed)) if dropout is not None else (0.0, 0)
    args = (ffn.num_experts, float(ffn.scaling), act_name, p, seed)
    hbar, y_lora = _MixLoraFfn.apply(x, gate, up, weights, indices, *flat, *args)
    y = ffn.down_proj(hbar.to(up.dtype)).to(hbar.dtype)
    if ffn.down_bias is not None:
        y = y + (weights.to(hbar.dtype).sum(dim=-1, keepdim=True) - 1.0) * ffn.down_bias.to(hbar.dtype)
    if ffn.down_lora is not None:
        y = y + y_lora
    return y.to(up.dtype)
