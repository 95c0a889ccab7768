"""Triton prompt_route (MiLoRA's router) under the Triton CPU interpreter against moelora.reference.prompt_route,
through the production op moelora.triton_backend.prompt_route.

Forward (gates, indices, probs) and the gradients of hidden, router_weight, numerator, denominator and
pool_weight, fp32 and fp16 hidden states (router parameters fp32, as the model keeps them; bf16 math is
broken in the interpreter: checked on a GPU only). Every pooling, left / right / no padding, B in {1, 3, 8},
S in {1, 5, 17}, H = 20 or 70 (not a multiple of the 64-wide H block), M = 7 or 3, top_k in {1, 3, M}.
Tolerances follow flash-attn's rule: the kernel and PyTorch at the test dtype are both compared with an
fp64 reference, and the kernel may err by twice PyTorch's own error plus 4 ulps of the output's dtype
(relative to the largest value). The selected modules must equal the fp64 reference's exactly.

The kernels run in a subprocess worker (this file run as a script): `import moelora` (conftest) already
imports triton, and TRITON_INTERPRET must be set before that for triton's own jit helpers to be
interpreted. The worker also keeps an interpreter segfault from killing the pytest process.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the child, before triton is imported; the pytest process itself stays uninterpreted
    os.environ["TRITON_INTERPRET"] = "1"

import zlib

import pytest
import torch
from _triton_worker import serve
from poison import nan_empty

pytest.importorskip("triton")

from moelora.kernels.prompt_route import check_inputs

from moelora import reference
from moelora.triton_backend import prompt_route

GRAD_NAMES = ("hidden", "router_weight", "numerator", "denominator", "pool_weight")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MASK_DTYPES = {"left": torch.bool, "right": torch.int64}


def make_mask(B: int, S: int, padding: str, g: torch.Generator) -> torch.Tensor | None:
    """[B, S] prompt mask: random lengths in 1..S (the first sequence full), padded on the left or right."""
    if padding == "none":
        return None
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    pos = torch.arange(S)[None, :]
    keep = pos >= (S - lengths)[:, None] if padding == "left" else pos < lengths[:, None]
    return keep.to(MASK_DTYPES[padding])


def make_inputs(B, S, H, M, padding, act, variant, g):
    """fp64 hidden [B, S, H], mask, and fp64 router parameters (numerator/denominator None for GELU)."""
    hidden = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    mask = make_mask(B, S, padding, g)
    if variant == "ties" and S > 1:  # repeated tokens: every feature's max is shared by two positions
        hidden[:, 1] = hidden[:, 0]
        if mask is not None:
            mask[:, :2] = mask[:, :2].max(dim=1, keepdim=True).values
    if variant == "float-mask" and mask is not None:
        mask = mask.float()
    router = torch.randn(M, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)  # spread-out probabilities
    pool_weight = torch.randn(H, generator=g, dtype=torch.float64) / H**0.5
    numerator = denominator = None
    if act == "rational":  # near the GELU fit, perturbed so no coefficient's gradient is special
        numerator = torch.tensor(reference.RATIONAL_GELU_NUMERATOR, dtype=torch.float64)
        numerator = numerator + 0.05 * torch.randn(numerator.shape, generator=g, dtype=torch.float64)
        denominator = torch.tensor(reference.RATIONAL_GELU_DENOMINATOR, dtype=torch.float64)
        denominator = denominator + 0.05 * torch.randn(denominator.shape, generator=g, dtype=torch.float64)
    return hidden, mask, router, numerator, denominator, pool_weight


def run(fn, hidden, mask, params, top_k, pooling, upstream, loss):
    """Forward, then the gradients of every differentiable input (None where an input is None or unused)."""
    leaves = [hidden, *params]
    out = fn(hidden, mask, params[0], params[1], params[2], top_k=top_k, pooling=pooling, pool_weight=params[3])
    outputs, grads_out = [], []
    if loss in ("both", "gates"):
        outputs.append(out.gates)
        grads_out.append(upstream[0].to(out.gates.dtype))
    if loss in ("both", "probs"):
        outputs.append(out.probs)
        grads_out.append(upstream[1].to(out.probs.dtype))
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True))
    return out, [next(grads) if t is not None else None for t in leaves]


def coefficient_scales(hidden, mask, params, k, pooling, upstream, loss) -> dict[str, torch.Tensor]:
    """fp64 sums over (b, h) of |each term| of d numerator and d denominator: the condition of those sums.

    d a_j = sum dg x^j / Q and d b_j = -sign(b_j) sum dg P / Q^2 |x|^j add B * H signed terms whose sizes
    (|x|^6 reaches hundreds) far exceed the result, so an fp32 error in the routing probabilities that every
    term of a sequence shares is amplified by sum |term| / |result|: the kernel may err by 4 ulps of that sum.
    """
    router, num, den, pool_weight = params
    x = reference.pool(hidden, mask, pooling, pool_weight)
    g = reference.rational(x, num, den).detach().requires_grad_()
    probs = torch.softmax(g @ router.T, dim=-1)
    top, indices = torch.topk(probs, k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, indices, top)
    terms = [(gates * upstream[0]).sum()] if loss in ("both", "gates") else []
    terms += [(probs * upstream[1]).sum()] if loss in ("both", "probs") else []
    (dg,) = torch.autograd.grad(sum(terms), g)
    ax = x.abs()
    q = 1.0 + sum(b.abs() * ax ** (j + 1) for j, b in enumerate(den))
    p = sum(a * x**j for j, a in enumerate(num))
    return {
        "numerator": torch.stack([(dg.abs() * ax**j / q).sum() for j in range(len(num))]),
        "denominator": torch.stack([(dg.abs() * p.abs() / q**2 * ax ** (j + 1)).sum() for j in range(len(den))]),
    }


def case_id(B, S, H, M, k, padding, pooling, dtype_name, act="rational", loss="both", variant="plain"):
    tail = "".join(f"-{v}" for v, default in ((act, "rational"), (loss, "both"), (variant, "plain")) if v != default)
    return f"B{B}-S{S}-H{H}-M{M}-k{k}-{padding}-{pooling}-{dtype_name}{tail}"


# B, S, H, M, top_k, padding: cycled over the poolings so that every pooling meets B = 1, 3, 8, S = 1, 5, 17,
# both M, top_k = 1, 3 and M, and each padding.
SHAPES = [
    (1, 1, 70, 7, 1, "none"),
    (3, 5, 20, 7, 3, "left"),
    (3, 17, 70, 3, 3, "right"),
    (8, 17, 20, 7, 7, "left"),
    (8, 5, 70, 3, 1, "right"),
]
FP16_SHAPES = [(3, 17, 70, 7, 3, "left"), (8, 5, 20, 3, 3, "right")]


def _table() -> dict[str, dict]:
    specs = []
    for pooling in reference.POOLINGS:
        for B, S, H, M, k, padding in SHAPES:
            specs.append(dict(B=B, S=S, H=H, M=M, k=k, padding=padding, pooling=pooling, dtype_name="fp32"))
        for B, S, H, M, k, padding in FP16_SHAPES:
            specs.append(dict(B=B, S=S, H=H, M=M, k=k, padding=padding, pooling=pooling, dtype_name="fp16"))
    base = dict(B=3, S=5, H=20, M=7, k=3, padding="left", dtype_name="fp32")
    specs += [
        {**base, "pooling": "attention", "act": "gelu"},  # numerator = denominator = None: exact GELU
        {**base, "pooling": "max", "act": "gelu", "dtype_name": "fp16"},
        {**base, "pooling": "attention", "loss": "gates"},  # the probs' upstream gradient arrives as None
        {**base, "pooling": "mean", "loss": "probs"},  # the gates' upstream gradient arrives as None
        {**base, "pooling": "max", "variant": "ties"},  # torch's amax splits the gradient between ties
        {**base, "pooling": "last", "padding": "right", "variant": "float-mask"},
        {**base, "pooling": "attention", "variant": "strided"},  # strided hidden and router_weight
    ]
    return {case_id(**s): s for s in specs}


TABLE = _table()


def check_case(B, S, H, M, k, padding, pooling, dtype_name, act="rational", loss="both", variant="plain") -> list[str]:
    """Kernel vs reference for one case; returns the failures (empty = pass). Runs in the worker."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(
        zlib.crc32(case_id(B, S, H, M, k, padding, pooling, "", act, loss, variant).encode())
    )
    hidden, mask, router, num, den, pool_weight = make_inputs(B, S, H, M, padding, act, variant, g)
    upstream = (
        torch.randn(B, M, generator=g, dtype=torch.float64),
        torch.randn(B, M, generator=g, dtype=torch.float64),
    )
    hidden_lp = hidden.to(dtype)

    def leaves(h, *params, strided=False):
        h = h.detach().clone()
        if strided:  # hidden seen through a permuted copy, router_weight as a transposed [H, M] buffer
            h = h.transpose(1, 2).contiguous().transpose(1, 2)
        params = [None if p is None else p.detach().clone() for p in params]
        if strided:
            params[0] = params[0].t().contiguous().t()
        return h.requires_grad_(), [None if p is None else p.requires_grad_() for p in params]

    params64 = (router, num, den, pool_weight if pooling == "attention" else None)
    params32 = tuple(None if p is None else p.float() for p in params64)

    def check(fn, h, params, strided=False):
        h, params = leaves(h, *params, strided=strided)
        return run(fn, h, mask, params, k, pooling, upstream, loss)

    want = check(reference.prompt_route, hidden_lp.double(), params64)
    torch_lp = check(reference.prompt_route, hidden_lp, params32)
    with nan_empty():
        got = check(prompt_route, hidden_lp, params32, strided=variant == "strided")

    scales = {}
    if act == "rational":
        scales = coefficient_scales(hidden_lp.double(), mask, params64, k, pooling, upstream, loss)
    failures = []
    if not torch.equal(got[0].indices, want[0].indices):
        failures.append(f"indices {got[0].indices.tolist()} != {want[0].indices.tolist()}")
    named = [("gates", 0), ("probs", 2)]
    results = [(n, got[0][i], torch_lp[0][i], want[0][i]) for n, i in named]
    results += [(n, *t) for n, *t in zip(GRAD_NAMES, got[1], torch_lp[1], want[1], strict=True)]
    for name, gk, gt, gw in results:
        if gw is None:
            if gk is not None and gk.abs().max() > 0:
                failures.append(f"grad {name}: expected none")
            continue
        if gk is None or gk.dtype != gt.dtype or gk.shape != gt.shape:
            desc = None if gk is None else f"{gk.dtype}{tuple(gk.shape)}"
            failures.append(f"{name}: {desc} != {gt.dtype}{tuple(gt.shape)}")
            continue
        if not torch.isfinite(gk).all():
            failures.append(f"{name}: non-finite values (an unwritten output?)")
            continue
        err = (gk.double() - gw).abs()
        err_torch = (gt.double() - gw).abs().max().item()
        scale = gw.abs().max() + scales.get(name, 0.0)  # per coefficient for the rational's gradients
        tol = torch.broadcast_to(2 * err_torch + 4 * torch.finfo(gk.dtype).eps * scale + 1e-12, err.shape)
        if (err > tol).any():
            worst = (err - tol).flatten().argmax()
            e, t = err.flatten()[worst].item(), tol.flatten()[worst].item()
            failures.append(f"{name}: error {e:.3g} > {t:.3g} (torch {err_torch:.3g})")
    return failures


def check_empty_sequence() -> list[str]:
    """A sequence without prompt tokens routes as if it pooled to zeros; its hidden states get no gradient."""
    g = torch.Generator().manual_seed(5)
    failures = []
    for pooling in reference.POOLINGS:
        hidden, _, router, num, den, pool_weight = (
            t.float() if t is not None else None for t in make_inputs(3, 5, 20, 7, "none", "rational", "plain", g)
        )
        mask = torch.ones(3, 5, dtype=torch.bool)
        mask[1] = False
        pw = pool_weight if pooling == "attention" else None
        h = hidden.clone().requires_grad_()
        with nan_empty():
            got = prompt_route(h, mask, router, num, den, top_k=3, pooling=pooling, pool_weight=pw)
        (grad,) = torch.autograd.grad((got.gates * torch.arange(7.0)).sum() + got.probs[:, 0].sum(), h)
        zeroed = hidden.clone()
        zeroed[1] = 0.0
        want = reference.prompt_route(
            zeroed, mask | (torch.arange(3) == 1)[:, None], router, num, den, top_k=3, pooling=pooling, pool_weight=pw
        )
        if not torch.equal(got.indices, want.indices) or not torch.allclose(got.probs, want.probs, atol=1e-6):
            failures.append(f"{pooling}: routing {got.probs.tolist()} != {want.probs.tolist()}")
        if not torch.isfinite(grad).all() or grad[1].abs().max() != 0:
            failures.append(f"{pooling}: the empty sequence's hidden gradient is not zero")
    return failures


def check_no_grad() -> list[str]:
    """Inference: no autograd graph, outputs as with gradients."""
    g = torch.Generator().manual_seed(3)
    hidden, mask, router, num, den, pw = (
        t.float() if t is not None else None for t in make_inputs(3, 5, 20, 7, "left", "rational", "plain", g)
    )
    with torch.no_grad(), nan_empty():
        got = prompt_route(hidden, mask, router, num, den, top_k=3, pooling="attention", pool_weight=pw)
    want = reference.prompt_route(hidden, mask, router, num, den, top_k=3, pooling="attention", pool_weight=pw)
    if got.gates.grad_fn is not None:
        return ["an autograd graph under no_grad"]
    ok = torch.equal(got.indices, want.indices) and torch.allclose(got.gates, want.gates, atol=1e-6)
    return [] if ok else ["no-grad routing differs from the reference"]


def worker() -> dict[str, list[str]]:
    results = {name: check_case(**spec) for name, spec in TABLE.items()}
    results["empty-sequence"] = check_empty_sequence()
    results["no-grad"] = check_no_grad()
    return results


@pytest.mark.parametrize("name", list(TABLE))
def test_matches_reference(worker_results, name):
    failures = worker_results[name]
    assert not failures, "; ".join(failures)


def test_empty_sequence_pools_to_zero(worker_results):
    failures = worker_results["empty-sequence"]
    assert not failures, "; ".join(failures)


def test_no_grad(worker_results):
    failures = worker_results["no-grad"]
    assert not failures, "; ".join(failures)


def _good(**change):
    args = dict(
        hidden=torch.randn(2, 5, 20),
        mask=torch.ones(2, 5, dtype=torch.bool),
        router_weight=torch.randn(7, 20),
        numerator=torch.randn(7),
        denominator=torch.randn(5),
        top_k=3,
        pooling="attention",
        pool_weight=torch.randn(20),
    )
    return {**args, **change}


BAD = [
    ("pooling", dict(pooling="sum"), ValueError, "pooling must be one of"),
    ("hidden-2d", dict(hidden=torch.randn(5, 20)), ValueError, "hidden must be 3-d"),
    ("hidden-int", dict(hidden=torch.ones(2, 5, 20, dtype=torch.long)), TypeError, "hidden must be float16"),
    ("hidden-fp64", dict(hidden=torch.randn(2, 5, 20, dtype=torch.float64)), TypeError, "hidden must be float16"),
    ("no-sequences", dict(hidden=torch.randn(0, 5, 20), mask=None), ValueError, "no sequences"),
    ("empty-prompt", dict(hidden=torch.randn(2, 0, 20), mask=None), ValueError, "prompt is empty"),
    ("mask-shape", dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must be"),
    ("router-H", dict(router_weight=torch.randn(7, 21)), ValueError, "router_weight is"),
    ("router-too-many", dict(router_weight=torch.randn(65, 20)), ValueError, "1..64 modules"),
    ("top_k-0", dict(top_k=0), ValueError, "top_k must be in"),
    ("top_k-8", dict(top_k=8), ValueError, "top_k must be in"),
    ("top_k-bool", dict(top_k=True), ValueError, "top_k must be in"),
    ("numerator-only", dict(denominator=None), ValueError, "both numerator and denominator"),
    ("numerator-empty", dict(numerator=torch.randn(0)), ValueError, "rational needs"),
    ("no-pool-weight", dict(pool_weight=None), ValueError, "needs pool_weight"),
    ("pool-weight-H", dict(pool_weight=torch.randn(21)), ValueError, "pool_weight must be"),
    ("router-device", dict(router_weight=torch.randn(7, 20, device="meta")), ValueError, "router_weight is on meta"),
    ("cpu-uninterpreted", dict(), ValueError, "need CUDA tensors"),
]


@pytest.mark.parametrize(("change", "error", "match"), [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_inputs(change, error, match):
    args = _good(**change)
    hidden, mask, router, num, den = (
        args.pop(n) for n in ("hidden", "mask", "router_weight", "numerator", "denominator")
    )
    if os.environ.get("TRITON_INTERPRET") == "1" and match == "need CUDA tensors":
        pytest.skip("the interpreter runs CPU tensors")
    with pytest.raises(error, match=match):
        check_inputs(hidden, mask, router, num, den, args["top_k"], args["pooling"], args["pool_weight"])
    if hidden.dtype in (torch.float16, torch.bfloat16, torch.float32):  # else the backend runs the reference
        with pytest.raises(error, match=match):
            prompt_route(hidden, mask, router, num, den, **args)


def test_fp64_runs_the_reference():
    args = _good(hidden=torch.randn(2, 5, 20, dtype=torch.float64))
    got, want = prompt_route(**args), reference.prompt_route(**args)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


if __name__ == "__main__":
    serve(worker)
