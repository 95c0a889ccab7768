"""The providers of one MixLoRA FFN (llama-style gate/up/down, SiLU) that the benchmark compares.

Every provider is a factory: `PROVIDERS[name](inputs)` returns a no-argument callable giving y [T, H].
The factory does the one-time set-up (the mixlora package builds modules), the callable is what is timed.

    loop         our re-implementation of the per-expert Python loop of PyPI mixlora 0.2.3 / MoE-PEFT:
                 the frozen down projection runs once per expert on that expert's gathered rows
    mixlora-pkg  the mixlora package's own MixLoraSparseMoe, when `import mixlora` works
    reference    moelora.reference.route + moelora.reference.mixlora_ffn: Wd runs once, on T rows
    fused        moelora.ops.route + moelora.ops.mixlora_ffn under the fused backend (C++ on CPU, Triton on
                 CUDA), when that backend is available
    lora         the frozen FFN with one dense LoRA on each of gate/up/down, as PEFT does (no router)
    base         the frozen FFN alone

loop, mixlora-pkg, reference and fused compute the same function; lora and base compute different math and
are there as the floor a MoE of LoRAs is measured against.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.fused import fused_backend
from moelora import backend, ops, reference

PROJ = ("gate_proj", "up_proj", "down_proj")
MOE_PROVIDERS = ("loop", "mixlora-pkg", "reference", "fused")
ALL_PROVIDERS = ("loop", "mixlora-pkg", "reference", "fused", "lora", "base")


@dataclass(frozen=True)
class Shape:
    """T tokens, hidden H, intermediate I, E experts, top-k, LoRA rank r."""

    T: int
    H: int
    I: int  # intermediate size
    E: int
    k: int
    r: int

    def label(self, fields: str = "THIEkr") -> str:
        return "-".join(f"{f}{getattr(self, f)}" for f in fields)


@dataclass
class FfnInputs:
    """One FFN's inputs, shared by every provider. Adapter tensors are fp32 whatever `dtype` (as MoE-PEFT)."""

    x: Tensor  # [T, H] model dtype, requires grad
    gate_proj: nn.Linear  # frozen Wg [I, H], no bias
    up_proj: nn.Linear  # frozen Wu [I, H]
    down_proj: nn.Linear  # frozen Wd [H, I]
    router: Tensor  # [E, H] fp32
    experts: dict[str, tuple[Tensor, Tensor]]  # proj -> A [E, r, in], B [E, out, r]
    dense: dict[str, tuple[Tensor, Tensor]]  # proj -> A [r, in], B [out, r], for `lora`
    top_k: int
    scaling: float
    grad_out: Tensor  # [T, H] model dtype, the upstream gradient of the backward


def _frozen_linear(weight: Tensor) -> nn.Linear:
    """A bias-free nn.Linear around `weight` [out, in], frozen; built on meta so no throwaway init runs."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def make_inputs(
    shape: Shape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> FfnInputs:
    """Seeded random inputs, drawn on the CPU so that every device sees the same numbers.

    Magnitudes keep every term visible: base projections of unit scale, LoRA deltas about 0.2 of them
    (B is random, not the zero of a fresh adapter, so that every gradient is non-zero), router logits of
    std ~0.02 * sqrt(H) as with MoE-PEFT's router_init_range.
    """
    g = torch.Generator().manual_seed(seed)
    T, H, E, r, inter = shape.T, shape.H, shape.E, shape.r, shape.I

    def randn(*size: int, std: float, dt: torch.dtype = torch.float32, grad: bool = True) -> Tensor:
        t = (torch.randn(size, generator=g) * std).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    dims = {"gate_proj": (inter, H), "up_proj": (inter, H), "down_proj": (H, inter)}  # (out, in)
    x = randn(T, H, std=1.0, dt=dtype)
    linears = {n: _frozen_linear(randn(o, i, std=i**-0.5, dt=dtype, grad=False)) for n, (o, i) in dims.items()}
    router = randn(E, H, std=0.02)
    experts = {n: (randn(E, r, i, std=i**-0.5), randn(E, o, r, std=0.1 * r**-0.5)) for n, (o, i) in dims.items()}
    dense = {n: (randn(r, i, std=i**-0.5), randn(o, r, std=0.1 * r**-0.5)) for n, (o, i) in dims.items()}
    return FfnInputs(
        x=x,
        **linears,
        router=router,
        experts=experts,
        dense=dense,
        top_k=shape.k,
        scaling=2.0,  # lora_alpha = 2 r, the usual MixLoRA setting
        grad_out=randn(T, H, std=1.0, dt=dtype, grad=False),
    )


def grad_targets(name: str, inp: FfnInputs) -> list[tuple[str, Tensor]]:
    """What the fwd+bwd mode differentiates for provider `name`: never the frozen base weights."""
    if name == "base":
        return [("x", inp.x)]
    if name == "lora":
        return [("x", inp.x)] + [(f"{p}.{ab}", t) for p in PROJ for ab, t in zip("AB", inp.dense[p], strict=True)]
    pairs = [("x", inp.x), ("router", inp.router)]
    return pairs + [(f"{p}.{ab}", t) for p in PROJ for ab, t in zip("AB", inp.experts[p], strict=True)]


def loop_ffn(inp: FfnInputs) -> Tensor:
    """The per-expert loop of mixlora 0.2.3 / MoE-PEFT, written afresh (dropout off, no jitter).

    The original's precision policy: routing and LoRA in fp32; base projections, activation and Wd in the
    model dtype; the weighted sum in fp32. Every expert runs, even one with no tokens, as in the original.
    """
    x = inp.x
    xf = x.float()
    probs = torch.softmax(F.linear(xf, inp.router), dim=-1)
    weights, indices = torch.topk(probs, inp.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    G, U = inp.gate_proj(x), inp.up_proj(x)  # once per token, shared by all experts
    (Ag, Bg), (Au, Bu), (Ad, Bd) = (inp.experts[p] for p in PROJ)
    s = inp.scaling
    y = xf.new_zeros(x.shape[0], inp.down_proj.out_features)
    for e in range(inp.router.shape[0]):
        tokens, slots = torch.where(indices == e)
        xe = xf[tokens]
        gate = G[tokens] + (F.linear(F.linear(xe, Ag[e]), Bg[e]) * s).to(x.dtype)
        up = U[tokens] + (F.linear(F.linear(xe, Au[e]), Bu[e]) * s).to(x.dtype)
        h = F.silu(gate) * up
        # The cost this library removes: Wd on the expert's rows, T*k rows in all instead of T.
        out = inp.down_proj(h) + (F.linear(F.linear(h.float(), Ad[e]), Bd[e]) * s).to(x.dtype)
        y.index_add_(0, tokens, out.float() * weights[tokens, slots].unsqueeze(-1))
    return y.to(x.dtype)


def _mixlora(impl: ModuleType, inp: FfnInputs) -> Tensor:
    """route + mixlora_ffn of `impl` (moelora.reference or moelora.ops), as MixLoraFFN calls them."""
    x = inp.x
    routing = impl.route(x, inp.router, top_k=inp.top_k)
    loras = {p: reference.ExpertLora(*inp.experts[p]) for p in PROJ}
    ffn = reference.FFNSpec(
        gate_lora=loras["gate_proj"],
        up_lora=loras["up_proj"],
        down_lora=loras["down_proj"],
        down_proj=inp.down_proj,
        act=F.silu,
        scaling=inp.scaling,
    )
    return impl.mixlora_ffn(x, inp.gate_proj(x), inp.up_proj(x), routing.weights, routing.indices, ffn)


def reference_ffn(inp: FfnInputs) -> Tensor:
    """moelora.reference called directly, so that no backend choice changes what runs."""
    return _mixlora(reference, inp)


def fused_ffn(inp: FfnInputs) -> Callable[[], Tensor]:
    """moelora.ops under the device's fused backend; the backend is entered per call (microseconds)."""
    name = fused_backend(inp.x.device)

    def run() -> Tensor:
        with backend.set_backend(name):
            return _mixlora(ops, inp)

    return run


def lora_ffn(inp: FfnInputs) -> Tensor:
    """Wd(act(Wg x + s Bg Ag x) * (Wu x + s Bu Au x)) + s Bd Ad h: one dense LoRA per projection."""
    x, s = inp.x, inp.scaling
    gate = inp.gate_proj(x) + reference.lora(x, *inp.dense["gate_proj"], s)
    up = inp.up_proj(x) + reference.lora(x, *inp.dense["up_proj"], s)
    h = F.silu(gate) * up
    return inp.down_proj(h) + reference.lora(h, *inp.dense["down_proj"], s)


def base_ffn(inp: FfnInputs) -> Tensor:
    x = inp.x
    return inp.down_proj(F.silu(inp.gate_proj(x)) * inp.up_proj(x))


def mixlora_pkg_missing() -> str | None:
    """Why the mixlora package cannot be benchmarked, or None when it can."""
    if importlib.util.find_spec("mixlora") is None:
        return "mixlora-pkg skipped: `import mixlora` fails (pip install mixlora==0.2.3 to include it)"
    try:
        import mixlora.model  # noqa: F401 - its import asserts torch/transformers versions
    except Exception as exc:  # any failure of a third-party import means: not comparable here
        return f"mixlora-pkg skipped: `import mixlora` raised {type(exc).__name__}: {exc}"
    return None


def mixlora_pkg_version() -> str | None:
    try:
        return importlib.metadata.version("mixlora")
    except importlib.metadata.PackageNotFoundError:
        return None


def mixlora_pkg(inp: FfnInputs) -> Callable[[], Tensor]:
    """The mixlora package's MixLoraSparseMoe on our weights (dropout off: it asserts dropout > 0).

    Its LoraLinear owns its lora_A/lora_B parameters; we drop them and bind views of our stacked tensors
    before every call (3 E views, microseconds), so that gradients land on the shared inputs and parity
    can compare them.
    """
    from mixlora.lora_linear import LoraLinear
    from mixlora.model import MixLoraSparseMoe

    E, r = inp.router.shape[0], inp.experts["gate_proj"][0].shape[1]
    cfg = SimpleNamespace(
        dtype_=torch.float32,
        act_fn_=F.silu,
        num_experts_=E,
        top_k_=inp.top_k,
        jitter_noise_=0.0,
        model_type_="llama",
        lora_init_="original",
        lora_r_=r,
        lora_alpha_=r,
        lora_dropout_=0.05,
        use_rslora_=False,
        use_dora_=False,
    )
    mlp = nn.Module()
    for p in PROJ:
        setattr(mlp, p, getattr(inp, p))
    moe = MixLoraSparseMoe(mlp, cfg)
    moe.gate_ = inp.router
    bound: list[tuple[nn.Module, str, int]] = []
    for e in range(E):
        for p in PROJ:
            lin = LoraLinear(getattr(mlp, p), cfg)
            lin.dropout_ = nn.Identity()
            lin.scaling_ = inp.scaling
            del lin.lora_A.weight, lin.lora_B.weight
            moe.experts_[f"experts.{e}.{p}"] = lin
            bound.append((lin, p, e))

    def run() -> Tensor:
        for lin, p, e in bound:
            A, B = inp.experts[p]
            lin.lora_A.weight, lin.lora_B.weight = A[e], B[e]
        return moe(inp.x.unsqueeze(0)).squeeze(0)

    return run


def _pure(fn: Callable[[FfnInputs], Tensor]) -> Callable[[FfnInputs], Callable[[], Tensor]]:
    def factory(inp: FfnInputs) -> Callable[[], Tensor]:
        return lambda: fn(inp)

    return factory


PROVIDERS: dict[str, Callable[[FfnInputs], Callable[[], Tensor]]] = {
    "loop": _pure(loop_ffn),
    "mixlora-pkg": mixlora_pkg,
    "reference": _pure(reference_ffn),
    "fused": fused_ffn,
    "lora": _pure(lora_ffn),
    "base": _pure(base_ffn),
}
