"""Property tests (hypothesis) on the ops: every backend agrees with the reference, or raises a clear error.

Random shapes (T from 0, H, I, E, k, r), dtypes (fp64, fp32, bf16), routings (random, ties in the router
logits, one dominant expert, unused slots, an expert chosen twice, all tokens on one expert) and
non-finite inputs (NaN, +inf, -inf at random places of x). Backends: `cpu` (the C++ ops) in this process;
`triton` (route and moe_lora, moelora.kernels) under TRITON_INTERPRET=1 in a child process, so that an
interpreter segfault fails the test instead of killing pytest (run directly, this file is that child).

What "agree" means:
- Values: flash-attn's rule. Both the backend and the reference at the test dtype are compared with the
  reference in fp64 on the same (rounded) inputs; the backend may err by twice the reference's own error
  plus a few ulps of the output dtype relative to the largest value (`ULPS`), plus 64 ulps of the compute
  dtype in absolute terms (every input is O(1), so a result that cancels to ~0 keeps that much rounding).
- Ties: where two experts have equal probabilities (within that tolerance) a backend may pick either, so
  an index may differ from the reference's only if its fp64 probability equals the reference's pick's.
  Gradients are compared when the indices are identical. For top-p, a row whose cumulative mass lies
  within the tolerance of top_p may keep one slot more or less: only its probs are compared.
- Non-finite inputs: the non-finite positions of every output are exactly the reference's (NaN
  propagates the same way, per token: a NaN in one token never reaches another token's output), the
  finite values agree as above, and every index is in [-1, E). Gradients are not compared there.
- Invalid cases (a top_k above E, a top_p above 1, a router of another width, an expert index outside
  [-1, E), an A of another input width) are drawn too: each must raise the exception type and message that
  EXPECTED_ERRORS names for its (backend, op, kind), exactly that type.
- Only valid cases that ran the fused path count: `moelora.backend.ops_ran()` says which backend ran the
  call, and a call that entered the reference's own op counts as a fallback even where ops_ran does not say
  so (the Triton backend hands T = 0 and moe_lora's fp64 to the reference without telling ops_ran: those
  print as "unreported fallback"). Every valid case must agree, fused or not, and at least MIN_FUSED_SHARE
  of each property's examples must be valid cases that ran fused, so it cannot pass on fallbacks alone.
  `lora` runs on the reference only: both fused backends' lora is the reference's own function.
Each test prints how many cases it ran and their outcomes (`pytest -s` shows them).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the Triton child: before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib
import json
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moelora
from moelora import backend as dispatch
from moelora import ops, reference
from moelora.reference import ExpertLora, FFNSpec

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
# Allowed error beyond twice the reference's own, in ulps of the output dtype, relative to the largest
# value. fp32/fp64: the backends sum in another order (up to ~H*r terms); bf16 outputs: one rounding step.
ULPS = {torch.float64: 64, torch.float32: 64, torch.bfloat16: 2, torch.float16: 2}
# About a quarter of the drawn cases are invalid (INVALID_KINDS) and cost little: these counts leave about as
# many valid cases as before invalid ones were drawn.
MAX_EXAMPLES = {"route": 150, "moe_lora": 150, "mixlora_ffn": 130, "lora": 50}
TRITON_MAX_EXAMPLES = 30  # the interpreter runs a kernel in ~0.1-1 s
# Of the examples drawn, at least this share must be valid cases that ran the fused path (the draws are
# derandomized, so the share is fixed: today 0.43 (Triton moe_lora, whose T = 0 falls back) to 0.85).
MIN_FUSED_SHARE = 0.25

# The invalid cases each op's strategy draws, and what each backend must raise for them: (exception type,
# regex of its message). The reference is not checked on them (it has no input checks of its own).
INVALID_KINDS = {
    "route": ("top_k>E", "top_p>1", "H-mismatch"),
    "moe_lora": ("index>=E", "index<-1", "A-in-mismatch"),
    "mixlora_ffn": ("index>=E", "index<-1"),
    "lora": (),
}
_CPU_INDEX_ERROR = (RuntimeError, r"^moelora cpu backend: expert index -?\d+ outside \[-1, \d+\)")
_TRITON_INDEX_ERROR = (ValueError, r"^moe_lora: indices must lie in \[-1, E=\d+\), got values in \[-?\d+, -?\d+\]")
EXPECTED_ERRORS: dict[tuple[str, str, str], tuple[type[Exception], str]] = {
    ("cpu", "route", "top_k>E"): (RuntimeError, r"^moelora cpu backend: route: top_k=\d+ exceeds \d+ experts"),
    ("cpu", "route", "top_p>1"): (
        RuntimeError,
        r"^moelora cpu backend: route: top_k=0 selects top-p routing, which needs top_p in \(0, 1\], got top_p=1\.5",
    ),
    ("cpu", "route", "H-mismatch"): (
        RuntimeError,
        r"^moelora cpu backend: route: x has \d+ features but router_weight is \[\d+, \d+\]",
    ),
    ("cpu", "moe_lora", "index>=E"): _CPU_INDEX_ERROR,
    ("cpu", "moe_lora", "index<-1"): _CPU_INDEX_ERROR,
    ("cpu", "moe_lora", "A-in-mismatch"): (
        RuntimeError,
        r"^moelora cpu backend: lora_A must be \[E, r, in=\d+\] and lora_B \[E, out, r\], got",
    ),
    ("cpu", "mixlora_ffn", "index>=E"): _CPU_INDEX_ERROR,
    ("cpu", "mixlora_ffn", "index<-1"): _CPU_INDEX_ERROR,
    ("triton", "route", "top_k>E"): (ValueError, r"^route: top_k must be an int in 1\.\.\d+ \(E experts\), got \d+$"),
    ("triton", "route", "top_p>1"): (ValueError, r"^route: top_p must be in \(0, 1\], got 1\.5$"),
    ("triton", "route", "H-mismatch"): (ValueError, r"^route: x has H=\d+ but router_weight has H=\d+$"),
    ("triton", "moe_lora", "index>=E"): _TRITON_INDEX_ERROR,
    ("triton", "moe_lora", "index<-1"): _TRITON_INDEX_ERROR,
    ("triton", "moe_lora", "A-in-mismatch"): (ValueError, r"^moe_lora: A is \[E, r, in=\d+\] but x has in=\d+$"),
}
ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "gelu_tanh": torch.nn.GELU(approximate="tanh")}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these ops are tiny, and on a shared 2-core machine OpenMP's waiting for a busy
    second core made them 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class DisagreementError(AssertionError):
    pass


# ---------------------------------------------------------------------------------------------- backends


def load_backend(name: str) -> object:
    """The module whose route / moe_lora / mixlora_ffn / lora implement backend `name`."""
    if name == "reference":
        return reference
    if name == "cpu":
        from moelora import cpu_backend

        return cpu_backend
    try:
        import moelora.kernels
    except ModuleNotFoundError:  # a source checkout without `pip install -e .`: map kernels/ as pyproject does
        import importlib.util

        kernels = Path(moelora.__file__).resolve().parent.parent / "kernels"
        spec = importlib.util.spec_from_file_location(
            "moelora.kernels", kernels / "__init__.py", submodule_search_locations=[str(kernels)]
        )
        sys.modules["moelora.kernels"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["moelora.kernels"])
    from moelora import triton_backend  # the ops models run: route and moe_lora (kernels/ has launchers only)

    return triton_backend


def cpu_built() -> bool:
    try:
        load_backend("cpu")
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------- comparisons


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor) -> float:
    """Check `got` against the fp64 `oracle` as the module docstring says; returns the value tolerance used."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise DisagreementError(
            f"{name}: {got.dtype}{tuple(got.shape)} but the reference gives {ref.dtype}{tuple(ref.shape)}"
        )
    fin_got, fin_ref = torch.isfinite(got), torch.isfinite(ref)
    if not torch.equal(fin_got, fin_ref):
        bad = (fin_got != fin_ref).nonzero()[:4].tolist()
        raise DisagreementError(f"{name}: non-finite positions differ from the reference's, e.g. at {bad}")
    both = fin_ref & torch.isfinite(oracle)
    if not both.any():
        return 0.0
    g, r, o = got.double()[both], ref.double()[both], oracle.double()[both]
    scale = o.abs().max().item()
    err_ref = (r - o).abs().max().item()
    # The absolute floor: outputs that cancel to ~0 (a near one-hot softmax's gradient) carry the rounding
    # of O(1) terms (every input here is O(1) by construction), in the compute dtype.
    floor = 64 * _eps(torch.promote_types(got.dtype, torch.float32))
    tol = 2 * err_ref + ULPS[got.dtype] * _eps(got.dtype) * scale + floor
    err = (g - o).abs().max().item()
    if err > tol:
        raise DisagreementError(f"{name}: error {err:.3g} > tolerance {tol:.3g} (reference's own error {err_ref:.3g})")
    return tol


def _grads(out: torch.Tensor | tuple, inputs: list[torch.Tensor], seed: int) -> list:
    """Gradients of a fixed random linear function of the outputs (zeros where an input gets none)."""
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    g = torch.Generator().manual_seed(seed)
    got: tuple = (None,) * len(inputs)
    if outs:  # an output built from no input (T = 0, no used slot) has no graph: every gradient is zero
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
        got = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, got, strict=True)]


# Where the last backend call ran: "fused", "reference" (ops_ran counted it there: the reference backend, or
# a fallback the backend reported) or "unreported fallback" (the reference's own op ran, but ops_ran counted
# the fused backend).
_last_ran: list[str] = []


@contextlib.contextmanager
def _reference_entered(op: str) -> Iterator[list[bool]]:
    """Notes whether moelora.reference.<op> runs inside the block. The backends call it through the module
    (`reference.route(...)`) when they hand a call over, so this sees fallbacks that ops_ran is not told of."""
    original, entered = getattr(reference, op), [False]

    def probe(*args, **kwargs):
        entered[0] = True
        return original(*args, **kwargs)

    setattr(reference, op, probe)
    try:
        yield entered
    finally:
        setattr(reference, op, original)


def on_backend(backend: str, op: str, *args, **kwargs):
    """moelora.ops.<op>(*args, **kwargs) on `backend`, recording in _last_ran whether the fused path ran it."""
    dispatch.reset_ops_ran()
    with moelora.set_backend(backend), _reference_entered(op) as entered:
        out = getattr(ops, op)(*args, **kwargs)
    ran = dispatch.ops_ran().get(op, {})
    if ran == {backend: 1} and backend != "reference":
        _last_ran[:] = ["unreported fallback" if entered[0] else "fused"]
    elif ran == {"reference": 1}:
        _last_ran[:] = ["reference"]
    else:
        raise AssertionError(f"one call of {op} on {backend}, but ops_ran() says {ran}")
    return out


def leaves(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def as64(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


# -------------------------------------------------------------------------------------------- strategies


def _x(T: int, H: int, dtype: torch.dtype, g: torch.Generator, nonfinite: str, where: list[int]) -> torch.Tensor:
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    if nonfinite != "none" and T > 0:
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[nonfinite]
        for w in where:
            x.view(-1)[w % x.numel()] = value
    return x.to(dtype)


NONFINITE = st.sampled_from(["none"] * 6 + ["nan", "inf", "-inf"])


def _invalid(draw, op: str, invalid: bool) -> str:
    """'none' (a valid case) or one of INVALID_KINDS[op], about one case in four."""
    kinds = INVALID_KINDS[op] if invalid else ()
    return draw(st.sampled_from(["none"] * 3 * len(kinds) + list(kinds))) if kinds else "none"


@st.composite
def route_cases(draw, dtypes=tuple(DTYPES), invalid=True) -> dict:
    E = draw(st.integers(1, 10))
    top_p = draw(st.none() | st.floats(0.05, 1.0))
    top_k = draw(st.integers(1, E)) if top_p is None else None
    bad = _invalid(draw, "route", invalid)
    if bad == "top_k>E":
        top_k, top_p = E + 1, None
    elif bad == "top_p>1":
        top_k, top_p = None, 1.5
    return dict(
        T=draw(st.integers(0, 40)),
        H=draw(st.integers(1, 40)),
        E=E,
        top_k=top_k,
        top_p=top_p,
        invalid=bad,
        dtype=draw(st.sampled_from(dtypes)),
        kind=draw(st.sampled_from(["random", "duplicate-experts", "zero-tokens", "dominant", "huge-logits"])),
        nonfinite=draw(NONFINITE),
        where=draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def route_inputs(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(c["seed"])
    T, H, E = c["T"], c["H"], c["E"]
    x = _x(T, H, DTYPES[c["dtype"]], g, c["nonfinite"], c["where"])
    w = torch.randn(E, H + (c["invalid"] == "H-mismatch"), generator=g) * 0.5
    if c["kind"] == "duplicate-experts" and E > 1:  # equal logits, exactly: ties between two experts
        w[E - 1] = w[0]
    elif c["kind"] == "zero-tokens" and T > 0:  # all logits 0: every expert ties
        x[::2] = 0
    elif c["kind"] == "dominant" and c["invalid"] != "H-mismatch":  # (w must have x's width for this one)
        # one expert far ahead: the others' probabilities underflow to tied zeros
        w[E // 2] = 40.0 * torch.nan_to_num(x.double()).mean(0).sign().float() if T > 0 else w[E // 2]
    elif c["kind"] == "huge-logits":
        w = w * 1e4
    return x, w


def make_routing(T: int, E: int, k: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [T, k] fp32 > 0 (0 in unused slots), indices [T, k] int64 (-1 = unused)."""
    if kind == "repeated":  # one expert in two slots of a token: its contribution counts twice
        indices = torch.randint(0, E, (T, k), generator=g)
    else:
        indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
        indices = indices.long()
    if kind == "one-expert":
        indices = torch.full((T, k), -1, dtype=torch.int64)
        indices[:, 0] = 0
    elif kind == "empty-expert" and k < E:
        indices = torch.where(indices == E - 1, torch.full_like(indices, -1), indices)
    elif kind == "unused-slots":
        indices[torch.rand(T, k, generator=g) < 0.3] = -1
    weights = (torch.rand(T, k, generator=g) + 0.1) * (indices >= 0)
    return weights, indices


def _with_bad_index(indices: torch.Tensor, E: int, kind: str) -> torch.Tensor:
    """indices with token 0's first slot made invalid by `kind` ('index>=E', 'index<-1'), else unchanged."""
    if kind in ("index>=E", "index<-1"):
        indices = indices.clone()
        indices[0, 0] = E if kind == "index>=E" else -2
    return indices


@st.composite
def moe_lora_cases(draw, dtypes=tuple(DTYPES), invalid=True) -> dict:
    E = draw(st.integers(1, 8))
    bad = _invalid(draw, "moe_lora", invalid)
    # An invalid case has a token to carry the bad index, and no fp64: the Triton backend hands T = 0 and
    # fp64 to the reference before its input checks (the reference has none of its own).
    dtype = draw(st.sampled_from(dtypes if bad == "none" else [d for d in dtypes if d != "fp64"]))
    return dict(
        invalid=bad,
        T=draw(st.integers(0 if bad == "none" else 1, 40)),
        IN=draw(st.integers(1, 40)),
        OUT=draw(st.integers(1, 40)),
        E=E,
        k=draw(st.integers(1, E)),
        r=draw(st.integers(1, 12)),
        dtype=dtype,
        param_dtype=draw(st.sampled_from(["fp32", dtype])),
        routing=draw(st.sampled_from(["random", "unused-slots", "one-expert", "empty-expert", "repeated"])),
        scaling=draw(st.sampled_from([0.5, 2.0])),
        nonfinite=draw(NONFINITE),
        where=draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def moe_lora_inputs(c: dict) -> tuple:
    g = torch.Generator().manual_seed(c["seed"])
    T, E, r = c["T"], c["E"], c["r"]
    x = _x(T, c["IN"], DTYPES[c["dtype"]], g, c["nonfinite"], c["where"])
    weights, indices = make_routing(T, E, c["k"], c["routing"], g)
    indices = _with_bad_index(indices, E, c["invalid"])
    pdt = DTYPES[c["param_dtype"]]
    a_in = c["IN"] + (c["invalid"] == "A-in-mismatch")
    A = (torch.randn(E, r, a_in, generator=g, dtype=torch.float64) / c["IN"] ** 0.5).to(pdt)
    B = (torch.randn(E, c["OUT"], r, generator=g, dtype=torch.float64) / r**0.5).to(pdt)
    return x, weights, indices, A, B, c["scaling"]


@st.composite
def ffn_cases(draw, invalid=True) -> dict:
    E = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(tuple(DTYPES)))
    bad = _invalid(draw, "mixlora_ffn", invalid)
    return dict(
        invalid=bad,
        T=draw(st.integers(0 if bad == "none" else 1, 32)),  # an invalid case has a token to carry the bad index
        H=draw(st.integers(1, 24)),
        I=draw(st.integers(1, 40)),
        E=E,
        k=draw(st.integers(1, E)),
        r=draw(st.integers(1, 8)),
        dtype=dtype,
        param_dtype=draw(st.sampled_from(["fp32", dtype])),
        gated=draw(st.booleans()),
        loras=draw(st.sampled_from(["all", "all", "no-gate", "no-up", "no-down", "down-only"])),
        act=draw(st.sampled_from(sorted(ACTS))),
        bias=draw(st.booleans()),
        routing=draw(st.sampled_from(["random", "unused-slots", "one-expert", "empty-expert", "repeated"])),
        nonfinite=draw(NONFINITE),
        where=draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def lora_cases(draw, invalid=True) -> dict:
    return dict(
        invalid=_invalid(draw, "lora", invalid),
        shape=draw(st.lists(st.integers(0, 6), min_size=0, max_size=2)),
        IN=draw(st.integers(1, 40)),
        OUT=draw(st.integers(1, 40)),
        r=draw(st.integers(1, 16)),
        dtype=draw(st.sampled_from(tuple(DTYPES))),
        nonfinite=draw(NONFINITE),
        where=draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ------------------------------------------------------------------------------------------------ checks


def _grad_ok(c: dict) -> bool:
    return c["nonfinite"] == "none"


def check_route(backend: str, c: dict) -> str:
    x, w = route_inputs(c)
    k, p, T, E = c["top_k"], c["top_p"], c["T"], c["E"]
    xg, wg = leaves(x, w)
    got = on_backend(backend, "route", xg, wg, top_k=k, top_p=p)
    xr, wr = leaves(x, w)
    ref = reference.route(xr, wr, top_k=k, top_p=p)
    x64, w64 = as64(x, w)
    orc = reference.route(x64, w64, top_k=k, top_p=p)
    if got.indices.dtype != torch.int64 or got.indices.shape != ref.indices.shape:
        raise DisagreementError(
            f"indices: {got.indices.dtype}{tuple(got.indices.shape)}, expected int64{tuple(ref.indices.shape)}"
        )
    if got.indices.numel() and (got.indices.min() < -1 or got.indices.max() >= E):
        raise DisagreementError(f"indices outside [-1, {E}): {got.indices.min().item()}..{got.indices.max().item()}")
    tol_p = compare("probs", got.probs, ref.probs, orc.probs) + 1e-6  # fp32 probs of fp64-equal ties
    finite = torch.isfinite(ref.probs).all(dim=1)  # [T]
    if not torch.equal(finite, torch.isfinite(got.weights).all(dim=1)) or not torch.equal(
        finite, torch.isfinite(ref.weights).all(dim=1)
    ):
        raise DisagreementError("weights: the rows with non-finite values are not those with non-finite probs")
    p64 = orc.probs.detach()
    near_cut = torch.zeros(T, dtype=torch.bool)  # top-p rows whose cut could move by rounding
    if p is not None and p < 1.0 and T:
        sorted_p = torch.sort(p64, dim=1, descending=True).values
        near_cut = ((torch.cumsum(sorted_p, dim=1) - sorted_p - p).abs() <= 2 * tol_p).any(dim=1)
    check = finite & ~near_cut
    ties = 0
    for t in check.nonzero().flatten().tolist():
        gi, ri = got.indices[t], ref.indices[t]
        chosen = gi[gi >= 0]
        if chosen.unique().numel() != chosen.numel():
            raise DisagreementError(f"token {t}: an expert chosen twice: {gi.tolist()}")
        if not torch.equal(gi >= 0, ri >= 0):
            raise DisagreementError(f"token {t}: used slots {gi.tolist()}, reference {ri.tolist()}")
        for j in (gi != ri).nonzero().flatten().tolist():
            if (p64[t, gi[j]] - p64[t, ri[j]]).abs() > 2 * tol_p:
                raise DisagreementError(f"token {t} slot {j}: expert {gi[j].item()}, reference {ri[j].item()}: no tie")
            ties += 1
    if check.any():
        compare("weights", got.weights[check], ref.weights[check], orc.weights[check])
    if not finite.all():
        return "non-finite propagated like the reference"
    if near_cut.any():
        return "agree (top-p cut within rounding of top_p: probs only there)"
    if ties:
        return "agree (ties: a different but equally probable expert)"
    if not _grad_ok(c):
        return "agree, forward (non-finite input, finite outputs)"
    g_got = _grads((got.weights, got.probs), [xg, wg], c["seed"])
    g_ref = _grads((ref.weights, ref.probs), [xr, wr], c["seed"])
    g_orc = _grads((orc.weights, orc.probs), [x64, w64], c["seed"])
    for name, a, b, o in zip(("grad_x", "grad_router"), g_got, g_ref, g_orc, strict=True):
        compare(name, a, b, o)
    return "agree, forward and gradients"


def check_moe_lora(backend: str, c: dict) -> str:
    x, weights, indices, A, B, s = moe_lora_inputs(c)
    args_got = leaves(x, weights, A, B)
    got = on_backend(backend, "moe_lora", args_got[0], args_got[1], indices, args_got[2], args_got[3], s)
    args_ref = leaves(x, weights, A, B)
    ref = reference.moe_lora(args_ref[0], args_ref[1], indices, args_ref[2], args_ref[3], s)
    args_64 = as64(x, weights, A, B)
    orc = reference.moe_lora(args_64[0], args_64[1], indices, args_64[2], args_64[3], s)
    compare("y", got, ref, orc)
    if not _grad_ok(c):
        return "non-finite propagated like the reference"
    names = ("grad_x", "grad_weights", "grad_A", "grad_B")
    for name, a, b, o in zip(
        names,
        _grads(got, args_got, c["seed"]),
        _grads(ref, args_ref, c["seed"]),
        _grads(orc, args_64, c["seed"]),
        strict=True,
    ):
        compare(name, a, b, o)
    return "agree, forward and gradients"


def ffn_inputs(c: dict) -> tuple[list, dict]:
    g = torch.Generator().manual_seed(c["seed"])
    T, H, I, E, r = c["T"], c["H"], c["I"], c["E"], c["r"]
    dt, pdt = DTYPES[c["dtype"]], DTYPES[c["param_dtype"]]
    x = _x(T, H, dt, g, c["nonfinite"], c["where"])
    gate = torch.randn(T, I, generator=g).to(dt) if c["gated"] else None
    up = torch.randn(T, I, generator=g).to(dt)
    weights, indices = make_routing(T, E, c["k"], c["routing"], g)
    indices = _with_bad_index(indices, E, c["invalid"])
    Wd = (torch.randn(H, I, generator=g) / I**0.5).to(dt)
    bd = torch.randn(H, generator=g).to(dt) if c["bias"] else None

    def pair(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        A = (torch.randn(E, r, n_in, generator=g) / n_in**0.5).to(pdt)
        return A, (torch.randn(E, n_out, r, generator=g) / r**0.5).to(pdt)

    have = {
        "all": ("gate", "up", "down"),
        "no-gate": ("up", "down"),
        "no-up": ("gate", "down"),
        "no-down": ("gate", "up"),
        "down-only": ("down",),
    }[c["loras"]]
    if not c["gated"]:
        have = tuple(h for h in have if h != "gate") or ("up",)
    loras = {
        "gate": pair(H, I) if "gate" in have else (None, None),
        "up": pair(H, I) if "up" in have else (None, None),
        "down": pair(I, H) if "down" in have else (None, None),
    }
    tensors = [x, gate, up, weights, *loras["gate"], *loras["up"], *loras["down"], Wd, bd]
    return tensors, {"indices": indices, "act": c["act"]}


def _run_ffn(backend: str | None, tensors: list, indices: torch.Tensor, act: str) -> torch.Tensor:
    """mixlora_ffn on `backend` through moelora.ops, or (None) the reference's function called directly: the
    oracles must not overwrite _last_ran, which describes the backend's call."""
    x, gate, up, weights, gA, gB, uA, uB, dA, dB, Wd, bd = tensors

    def lora(A, B):
        return None if A is None else ExpertLora(A, B)

    run = reference.mixlora_ffn if backend is None else lambda *a, **k: on_backend(backend, "mixlora_ffn", *a, **k)
    ffn = FFNSpec(
        gate_lora=lora(gA, gB),
        up_lora=lora(uA, uB),
        down_lora=lora(dA, dB),
        down_proj=lambda h: F.linear(h, Wd, bd),
        act=ACTS[act],
        scaling=2.0,
        down_bias=bd,
    )
    return run(x, gate, up, weights, indices, ffn)


def check_mixlora_ffn(backend: str, c: dict) -> str:
    tensors, extra = ffn_inputs(c)
    diff = [i for i, t in enumerate(tensors) if t is not None and i < 10]  # not the frozen Wd, bd
    runs = {}
    for name, prep in (("got", leaves), ("ref", leaves), ("orc", as64)):
        ts = list(tensors)
        for i, t in zip(diff, prep(*[tensors[i] for i in diff]), strict=True):
            ts[i] = t
        if name == "orc":
            ts[10], ts[11] = (None if t is None else t.double() for t in tensors[10:])
        y = _run_ffn(backend if name == "got" else None, ts, extra["indices"], extra["act"])
        runs[name] = (y, [ts[i] for i in diff])
    compare("y", runs["got"][0], runs["ref"][0], runs["orc"][0])
    if not _grad_ok(c):
        return "non-finite propagated like the reference"
    grads = {n: _grads(out, ins, c["seed"]) for n, (out, ins) in runs.items()}
    for i, a, b, o in zip(diff, grads["got"], grads["ref"], grads["orc"], strict=True):
        compare(f"grad of input {i}", a, b, o)
    return "agree, forward and gradients"


def check_lora(backend: str, c: dict) -> str:
    g = torch.Generator().manual_seed(c["seed"])
    dt = DTYPES[c["dtype"]]
    n = 1
    for d in c["shape"]:
        n *= d
    x = _x(n, c["IN"], dt, g, c["nonfinite"], c["where"]).reshape(*c["shape"], c["IN"])
    A = torch.randn(c["r"], c["IN"], generator=g) / c["IN"] ** 0.5
    B = torch.randn(c["OUT"], c["r"], generator=g)
    got_in, ref_in, orc_in = leaves(x, A, B), leaves(x, A, B), as64(x, A, B)
    got = on_backend(backend, "lora", *got_in, 2.0)
    ref, orc = reference.lora(*ref_in, 2.0), reference.lora(*orc_in, 2.0)
    compare("y", got, ref, orc)
    if not _grad_ok(c):
        return "non-finite propagated like the reference"
    for name, a, b, o in zip(
        ("grad_x", "grad_A", "grad_B"),
        _grads(got, got_in, 1),
        _grads(ref, ref_in, 1),
        _grads(orc, orc_in, 1),
        strict=True,
    ):
        compare(name, a, b, o)
    return "agree, forward and gradients"


OPS: dict[str, tuple[Callable, Callable]] = {
    "route": (route_cases, check_route),
    "moe_lora": (moe_lora_cases, check_moe_lora),
    "mixlora_ffn": (ffn_cases, check_mixlora_ffn),
    "lora": (lora_cases, check_lora),
}


def run_property(op: str, backend: str, max_examples: int, dtypes: tuple[str, ...] = tuple(DTYPES)) -> Counter:
    """Run the property for `op` on `backend`; returns the outcome counts. A disagreement, or an invalid case
    that does not raise what EXPECTED_ERRORS says, propagates (hypothesis shrinks it and reports the case)."""
    if backend == "triton":
        load_backend("triton")  # maps kernels/ into moelora.kernels in a source checkout
    strategy, check = OPS[op]
    counts: Counter = Counter()  # outcome -> cases; "case:..." keys count what the cases held
    kwargs = {"dtypes": dtypes} if op in ("route", "moe_lora") else {}

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy(invalid=backend != "reference", **kwargs))
    def prop(case: dict) -> None:
        _last_ran.clear()
        if case["invalid"] != "none":
            error, pattern = EXPECTED_ERRORS[(backend, op, case["invalid"])]
            with pytest.raises(error, match=pattern) as raised:
                check(backend, case)
            assert type(raised.value) is error, f"{type(raised.value).__name__}, not {error.__name__}: {raised.value}"
            assert _last_ran == [], f"{op} on {backend} ran the {case['invalid']} case and raised afterwards"
            outcome = f"invalid, raised the expected {error.__name__}"
        else:
            agreement = check(backend, case)
            outcome = f"{_last_ran[0]}: {agreement}"
        counts[outcome] += 1
        counts[f"case:{case['dtype']}"] += 1
        counts["case:T=0"] += case.get("T", 1) == 0 or 0 in case.get("shape", [1])
        counts["case:non-finite input"] += case["nonfinite"] != "none"

    prop()
    return counts


def outcomes(counts: Counter | dict) -> dict[str, int]:
    return {k: v for k, v in counts.items() if not k.startswith("case:")}


def summary(op: str, backend: str, counts: Counter) -> str:
    held = ", ".join(f"{k[5:]} {v}" for k, v in sorted(counts.items()) if k.startswith("case:"))
    parts = "; ".join(f"{v} {k}" for k, v in Counter(outcomes(counts)).most_common())
    return f"{op}[{backend}]: {sum(outcomes(counts).values())} cases ({held}): {parts}"


def ran(counts: Counter | dict, where: str) -> int:
    """Valid cases (all of which agreed: a disagreement fails the property) that ran `where`."""
    return sum(v for k, v in counts.items() if k.startswith(f"{where}:"))


def invalid(counts: Counter | dict) -> int:
    return sum(v for k, v in counts.items() if k.startswith("invalid"))


def assert_fused_share(op: str, backend: str, counts: Counter | dict, max_examples: int) -> None:
    """Enough valid cases ran fused (fallbacks agree trivially), and invalid cases were drawn where the op has
    them: the property cannot pass vacuously."""
    assert ran(counts, "fused") >= MIN_FUSED_SHARE * max_examples, summary(op, backend, counts)
    assert invalid(counts) > 0 or not INVALID_KINDS[op], summary(op, backend, counts)


BACKEND_PARAMS = [
    pytest.param(
        "cpu", id="cpu", marks=pytest.mark.skipif(not cpu_built(), reason="moelora._C is not built (no compiler)")
    )
]


# Not lora: both fused backends' `lora` is the reference's own function (two GEMMs), so a property would
# compare the reference with itself; test_reference_matches_its_fp64_self covers it.
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("op", ["route", "moe_lora", "mixlora_ffn"])
def test_backend_agrees_with_reference(op, backend):
    counts = run_property(op, backend, MAX_EXAMPLES[op])
    print(summary(op, backend, counts))
    assert_fused_share(op, backend, counts, MAX_EXAMPLES[op])


@pytest.mark.parametrize("op", list(OPS))
def test_reference_matches_its_fp64_self(op):
    """The oracle itself: the reference at each dtype against the reference in fp64 (the comparison rule's
    baseline; also runs the T=0, tie and NaN cases through the reference alone). Valid cases only."""
    counts = run_property(op, "reference", MAX_EXAMPLES[op] // 5)
    print(summary(op, "reference", counts))
    assert ran(counts, "reference") == sum(outcomes(counts).values()) > 0, summary(op, "reference", counts)


ALL_BACKENDS = [pytest.param("reference", id="reference"), *BACKEND_PARAMS]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    ("T", "routing"), [pytest.param(0, "random", id="T0"), pytest.param(3, "unused", id="T3-no-slot-used")]
)
def test_mixlora_ffn_with_no_used_slot(backend, T, routing):
    """The smallest cases the properties found: no (token, slot) pair at all. y = 0 and every gradient is
    zero (no down bias: with one, y stays 0 but the weights get the bias's gradient through sum_j w_j)."""
    c = dict(T=T, H=5, I=7, E=3, k=2, r=2, dtype="fp32", param_dtype="fp32", gated=True, loras="all", act="silu")
    c.update(bias=False, routing="random", nonfinite="none", where=[0], seed=0, invalid="none")
    tensors, extra = ffn_inputs(c)
    indices = torch.full((T, 2), -1, dtype=torch.int64) if routing == "unused" else extra["indices"]
    tensors[3] = torch.zeros(T, 2)
    inputs = leaves(*tensors[:10])
    y = _run_ffn(backend, [*inputs, *tensors[10:]], indices, "silu")
    assert y.shape == (T, 5) and torch.equal(y, torch.zeros(T, 5)), y
    for t, g in zip(inputs, _grads(y, inputs, 0), strict=True):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_mixlora_ffn_activation_propagates_non_finite_like_torch(backend, act, value):
    """A non-finite value in G or U reaches y as torch's activation makes it (relu(nan) = nan in torch)."""
    c = dict(T=4, H=5, I=7, E=3, k=2, r=2, dtype="fp32", param_dtype="fp32", gated=True, loras="all", act=act)
    c.update(bias=False, routing="random", nonfinite="none", where=[0], seed=1, invalid="none")
    tensors, extra = ffn_inputs(c)
    for i in (1, 2):  # token 1's G, token 2's U
        tensors[i] = tensors[i].clone()
        tensors[i][i, 3] = float(value)
    got = _run_ffn(backend, tensors, extra["indices"], act)
    want = _run_ffn(None, tensors, extra["indices"], act)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (
        f"{act}({value}): non-finite rows {(~torch.isfinite(got)).any(1).tolist()}, "
        f"reference {(~torch.isfinite(want)).any(1).tolist()}"
    )


# ----------------------------------------------------------------------------- Triton, in a child process

# bf16 is not run under the interpreter: numpy has no bf16, and the interpreter's bf16 math is wrong
# (tests/test_triton_*.py check bf16 on a GPU only). fp64: the route kernel computes in fp64; moe_lora hands
# fp64 to the reference, so drawing it there would spend the interpreter's time on fallbacks.
TRITON_DTYPES = {"route": ("fp64", "fp32"), "moe_lora": ("fp32",)}
TRITON_OPS = tuple(TRITON_DTYPES)


def triton_worker(out_path: str) -> None:
    results = {}
    for op in TRITON_OPS:
        try:
            counts = run_property(op, "triton", TRITON_MAX_EXAMPLES, TRITON_DTYPES[op])
            results[op] = {"counts": dict(counts), "summary": summary(op, "triton", counts)}
        except BaseException as e:  # hypothesis's report: the error and the falsifying case (its notes)
            notes = "\n".join(getattr(e, "__notes__", []))
            results[op] = {"failure": f"{type(e).__name__}: {e}\n{notes}"}
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton-properties") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = str(Path(moelora.__file__).resolve().parent.parent)  # the children import this moelora
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the Triton interpreter child did not finish in 600 s", pytrace=False)
    if proc.returncode != 0 or not out.exists():
        how = (
            f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        )
        pytest.fail(f"the Triton interpreter child died ({how}):\n{proc.stderr[-4000:]}", pytrace=False)
    return json.loads(out.read_text())


@pytest.mark.parametrize("op", TRITON_OPS)
def test_triton_interpreted_agrees_with_reference(triton_results, op):
    result = triton_results[op]
    assert "failure" not in result, result.get("failure")
    print(result["summary"])
    assert_fused_share(op, "triton", result["counts"], TRITON_MAX_EXAMPLES)


if __name__ == "__main__":
    triton_worker(sys.argv[1])
