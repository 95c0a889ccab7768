"""LoRA dropout inside the Triton kernels (kernels/philox.py), under the interpreter, fp32 and fp16.

- the kernels' Philox mask (triton_backend.dropout_mask) is bitwise moelora.dropout.dropout_mask: seeds below
  and above 2^32 (and 2^64 - 1), both streams and another, odd numel, p 0.05 and 0.5;
- rank_shrink with dropout equals the shrink of x times that mask and 1 / (1 - p): the mask a kernel used,
  reproduced outside it;
- the fused FFN with dropout (x's mask before the gate/up shrinks, each h_j's before the down shrink) through
  routed_mixlora_ffn (route_shrink: one read of x) and mixlora_ffn (rank_shrink), in the dense and the sorted
  regime (forced through FFN_REGIME_ENV), against the reference fed the same LoraDropout: forward and every
  gradient by tests/tolerance.py's rule (fp64 oracle, twice PyTorch's own error plus 4 ulps); spies check
  that the fused kernels ran (no reference fallback) and the oracle without dropout must fail the same rule,
  so that a kernel ignoring the mask cannot pass;
- p = 0 (LoraDropout(0.0, seed)) and dropout=None give bitwise the no-dropout results.

Kernels run in a subprocess worker (this file as a script), as in the other Triton test files.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # the worker, before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import torch.nn.functional as F
from _triton_worker import serve
from poison import nan_empty
from tolerance import tolerance_failure

pytest.importorskip("triton")

from moelora import dropout as seeded_dropout
from moelora import reference
from moelora.dropout import H_STREAM, X_STREAM, LoraDropout
from moelora.reference import ExpertLora, FFNSpec

WORKER_TIMEOUT = 1500  # seconds: the interpreter worker (tests/_triton_worker.py)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
T, H, I = 37, 20, 28  # not multiples of any block size
SCALING = 2.0

MASK_CASES = [
    # id, seed, stream, numel, p
    ("seed0-x-n1-p05", 0, X_STREAM, 1, 0.05),
    ("seed11-h-n1001-p50", 11, H_STREAM, 1001, 0.5),
    ("seed2^31+5-x-n4099-p05", 2**31 + 5, X_STREAM, 4099, 0.05),
    ("seed2^32+7-h-n777-p50", 2**32 + 7, H_STREAM, 777, 0.5),
    ("seed2^63-25-stream5-n1025-p50", 2**63 - 25, 5, 1025, 0.5),
    ("seed2^64-1-h-n333-p05", 2**64 - 1, H_STREAM, 333, 0.05),
]

FFN_CASES = [
    # id, family, E, r, k (None = top-p 0.6), loras, regime, entry: routed (route_shrink) or ffn (rank_shrink)
    ("llama-dense-routed", "gated", 4, 8, 2, "gate,up,down", "dense", "routed"),
    ("llama-sorted-routed", "gated", 4, 8, 2, "gate,up,down", "sorted", "routed"),
    ("llama-dense-ffn", "gated", 4, 8, 2, "gate,up,down", "dense", "ffn"),
    ("llama-sorted-ffn", "gated", 4, 8, 2, "gate,up,down", "sorted", "ffn"),
    ("llama-E8-r16-dense-routed", "gated", 8, 16, 2, "gate,up,down", "dense", "routed"),  # 256 rank columns
    ("phi3-shared-A-sorted-routed", "shared", 4, 8, 2, "gate,up,down", "sorted", "routed"),
    ("phi-ungated-dense-routed", "ungated", 4, 8, 2, "up,down", "dense", "routed"),
    ("llama-topp-sorted-ffn", "gated", 4, 4, None, "gate,up,down", "sorted", "ffn"),
    ("llama-down-only-dense-ffn", "gated", 4, 8, 2, "down", "dense", "ffn"),  # the h mask alone
    ("llama-gate-up-sorted-routed", "gated", 4, 8, 2, "gate,up", "sorted", "routed"),  # the x mask alone
]
FFN_ACT = {"gated": F.silu, "shared": F.silu, "ungated": torch.nn.GELU(approximate="tanh")}
DROPOUT = LoraDropout(0.3, 2**40 + 11)


def check_mask(seed: int, stream: int, numel: int, p: float) -> list[str]:
    from moelora import triton_backend

    got = triton_backend.dropout_mask(seed, stream, numel, p, "cpu")
    want = seeded_dropout.dropout_mask(seed, stream, numel, p)
    if got.dtype != torch.bool or got.shape != want.shape:
        return [f"mask {got.dtype} {tuple(got.shape)}, want bool {tuple(want.shape)}"]
    if not torch.equal(got, want):
        return [f"{int((got != want).sum())} of {numel} mask elements differ"]
    return []


def check_rank_shrink_mask() -> list[str]:
    """ops.rank_shrink with (p, seed) against (x * triton mask / (1 - p)) @ A_all^T in fp64: fp32 ieee dots."""
    from moelora import triton_backend

    g = torch.Generator().manual_seed(3)
    x, A = torch.randn(T, H, generator=g), torch.randn(8, 4, H, generator=g)
    ua = torch.ops.moelora_triton.rank_shrink(x, A, DROPOUT.p, DROPOUT.seed)
    keep = triton_backend.dropout_mask(DROPOUT.seed, X_STREAM, T * H, DROPOUT.p, "cpu").reshape(T, H)
    want = (x.double() * keep * DROPOUT.scale) @ A.reshape(-1, H).double().t()
    err = (ua.double() - want).abs().max().item()
    return [] if err < 1e-5 else [f"rank_shrink with dropout errs {err:.3g} from the masked shrink"]


def _ffn_inputs(family, E, r, loras, g):
    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    d = dict(x=rand(T, H), router=rand(E, H, scale=0.5), Wg=rand(I, H, scale=H**-0.5), Wu=rand(I, H, scale=H**-0.5))
    d["Wd"] = rand(H, I, scale=I**-0.5)
    d["gate_A"] = rand(E, r, H, scale=H**-0.5)
    d["up_A"] = d["gate_A"] if family == "shared" else rand(E, r, H, scale=H**-0.5)
    d["gate_B"], d["up_B"] = rand(E, I, r, scale=0.3), rand(E, I, r, scale=0.3)
    d["down_A"], d["down_B"] = rand(E, r, I, scale=I**-0.5), rand(E, H, r, scale=0.3)
    d["upstream"] = rand(T, H)
    if family == "ungated" or "gate" not in loras:
        del d["gate_A"], d["gate_B"]
    for p in ("up", "down"):
        if p not in loras:
            del d[f"{p}_A"], d[f"{p}_B"]
    return d


def _run_ffn(impl, d, family, k, dtype, entry, dropout):
    """y, routing weights and probs, and the gradients of every leaf through impl (reference: route then
    mixlora_ffn; triton_backend: routed_mixlora_ffn, or route then mixlora_ffn for entry "ffn")."""
    names = [n for n in d if n != "upstream" and (n != "up_A" or family != "shared")]
    leaves = {n: d[n].to(dtype).detach().clone().requires_grad_() for n in names}
    if family == "shared" and "up_A" in d:
        leaves["up_A"] = leaves["gate_A"]
    x = leaves["x"]
    gate = F.linear(x, leaves["Wg"]) if family != "ungated" else None
    up = F.linear(x, leaves["Wu"])

    def lora(p):
        return ExpertLora(leaves[f"{p}_A"], leaves[f"{p}_B"], None) if f"{p}_A" in leaves else None

    kw = dict(gate_lora=lora("gate"), up_lora=lora("up"), down_lora=lora("down"), act=FFN_ACT[family])
    kw |= dict(scaling=SCALING, down_proj=lambda h: F.linear(h, leaves["Wd"]))
    if dropout is not ...:  # ...: no dropout argument at all
        kw["dropout"] = dropout
    ffn = FFNSpec(**kw)
    top = dict(top_k=k, top_p=None if k is not None else 0.6)
    if impl is reference or entry == "ffn":
        routing = impl.route(x, leaves["router"], **top)
        y = impl.mixlora_ffn(x, gate, up, routing.weights, routing.indices, ffn)
    else:
        y, routing = impl.routed_mixlora_ffn(x, leaves["router"], gate, up, ffn, **top)
    loss = (y * d["upstream"].to(dtype)).sum() + (routing.probs**2).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    named = {"y": y, "weights": routing.weights, "probs": routing.probs}
    named.update({f"grad_{n}": gr for n, gr in zip(leaves, grads, strict=True) if n != "up_A" or family != "shared"})
    return named


class _Spies:
    """Count the calls of the fused kernels' host functions and of the reference FFN during a triton run."""

    def __init__(self):
        import moelora.kernels.mixlora_ffn as ffn_kernels
        import moelora.kernels.mixlora_ffn_shrink_expand as shrink_expand_kernels
        import moelora.kernels.mixlora_ffn_sorted as sorted_kernels
        import moelora.kernels.route as route_kernels

        self.targets = {
            "route_shrink": (route_kernels, "route_shrink_fwd"),
            "rank_shrink": (shrink_expand_kernels, "shrink_x"),
            "dense": (ffn_kernels, "mixlora_ffn_core_fwd"),
            "sorted": (sorted_kernels, "mixlora_ffn_sorted_core_fwd"),
            "reference": (reference, "mixlora_ffn"),
        }
        self.calls = dict.fromkeys(self.targets, 0)

    def __enter__(self):
        self.saved = {name: getattr(mod, attr) for name, (mod, attr) in self.targets.items()}
        for name, (mod, attr) in self.targets.items():
            setattr(mod, attr, self._counting(name, self.saved[name]))
        return self

    def _counting(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, (mod, attr) in self.targets.items():
            setattr(mod, attr, self.saved[name])


def _failures(want, torch_lp, got, dtype) -> list[str]:
    eps = torch.finfo(dtype).eps
    out = []
    for n in want:
        if want[n] is None:
            continue
        if got[n] is None or got[n].shape != want[n].shape:
            out.append(f"{n}: {None if got[n] is None else tuple(got[n].shape)}, want {tuple(want[n].shape)}")
        elif (failure := tolerance_failure(n, got[n], torch_lp[n], want[n], eps)) is not None:
            out.append(failure)
    return out


def check_ffn(family, E, r, k, loras, regime, entry, dtype_name) -> list[str]:
    from moelora import set_backend, triton_backend

    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(E * 100 + r + len(loras))
    d = _ffn_inputs(family, E, r, loras.split(","), g)
    d64 = {n: t.double() for n, t in d.items()}
    want = _run_ffn(reference, d64, family, k, torch.float64, entry, DROPOUT)
    torch_lp = _run_ffn(reference, d, family, k, dtype, entry, DROPOUT)
    torch_lp = {n: t.float() if n in ("weights", "probs") else t for n, t in torch_lp.items()}
    os.environ[triton_backend.FFN_REGIME_ENV] = regime
    try:
        with _Spies() as spies, nan_empty(), set_backend("triton"):
            got = _run_ffn(triton_backend, d, family, k, dtype, entry, DROPOUT)
    finally:
        os.environ.pop(triton_backend.FFN_REGIME_ENV)
    failures = _failures(want, torch_lp, got, dtype)
    shrunk = int("gate" in loras or "up" in loras)
    expect = dict(reference=0, dense=int(regime == "dense"), sorted=int(regime == "sorted"))
    expect |= dict(route_shrink=shrunk * (entry == "routed"), rank_shrink=shrunk * (entry == "ffn"))
    for name, n in expect.items():
        if spies.calls[name] != n:
            failures.append(f"{name} called {spies.calls[name]} times, expected {n} ({spies.calls})")
    # the oracle without dropout must fail the same rule: a kernel that ignored a mask could not pass
    plain = _run_ffn(reference, d64, family, k, torch.float64, entry, None)
    if not _failures(want, torch_lp, plain, dtype):
        failures.append("the reference without dropout passes as well: the test cannot see the masks")
    return failures


def check_p0_bitwise(regime: str) -> list[str]:
    """LoraDropout(0.0, seed) and dropout=None give bitwise the results of a call without a dropout argument."""
    from moelora import set_backend, triton_backend

    g = torch.Generator().manual_seed(9)
    d = _ffn_inputs("gated", 4, 8, ["gate", "up", "down"], g)
    os.environ[triton_backend.FFN_REGIME_ENV] = regime
    try:
        with set_backend("triton"):
            runs = {
                name: _run_ffn(triton_backend, d, "gated", 2, torch.float32, "routed", drop)
                for name, drop in (("absent", ...), ("None", None), ("p=0", LoraDropout(0.0, 123)))
            }
    finally:
        os.environ.pop(triton_backend.FFN_REGIME_ENV)
    base = runs.pop("absent")
    return [f"{name}: {n} differs" for name, run in runs.items() for n in base if not torch.equal(run[n], base[n])]


def worker() -> dict[str, list[str]]:
    out = {}
    for case_id, *args in MASK_CASES:
        out[f"mask-{case_id}"] = check_mask(*args)
    out["rank-shrink-mask"] = check_rank_shrink_mask()
    for case_id, *args in FFN_CASES:
        for dtype_name in DTYPES:
            out[f"ffn-{case_id}-{dtype_name}"] = check_ffn(*args, dtype_name)
    for regime in ("dense", "sorted"):
        out[f"p0-bitwise-{regime}"] = check_p0_bitwise(regime)
    return out


@pytest.mark.parametrize("case", [c[0] for c in MASK_CASES])
def test_triton_mask_is_the_reference_mask(worker_results, case):
    failures = worker_results[f"mask-{case}"]
    assert not failures, "; ".join(failures)


def test_rank_shrink_uses_the_reproducible_mask(worker_results):
    failures = worker_results["rank-shrink-mask"]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", [c[0] for c in FFN_CASES])
def test_fused_ffn_with_dropout_matches_reference(worker_results, case, dtype_name):
    failures = worker_results[f"ffn-{case}-{dtype_name}"]
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("regime", ["dense", "sorted"])
def test_p0_and_none_equal_no_dropout_bitwise(worker_results, regime):
    failures = worker_results[f"p0-bitwise-{regime}"]
    assert not failures, "; ".join(failures)


def test_kernel_args_reject_a_seed_the_ops_cannot_carry():
    from moelora.kernels import philox

    with pytest.raises(ValueError, match="seed"):
        philox.kernel_args(LoraDropout(0.5, 2**63))


if __name__ == "__main__":
    serve(worker)
