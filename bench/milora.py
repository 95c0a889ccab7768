"""The `milora` suite: one llama decoder layer's seven projections with B sequences from B MiLoRA adapters.

The layer (attention replaced, see below), in the model dtype, x [T, H] the residual stream entering it:

    h = rms_norm(x);  q, k, v = Wq h, Wk h, Wv h            (+ each module's LoRA delta when it fires)
    x = x + Wo v'                                           v' = v (v repeated H/KV times with GQA)
    h = rms_norm(x);  y = x + Wd (silu(Wg h) * Wu h)        -> outputs y, q, k

Attention is replaced by its single-key case (softmax over one key is 1, so the output is v): the step
times the seven projections, the two norms and the SiLU product, no KV cache. Attention over a cache costs
every provider the same adapter-independent time, so leaving it out makes `milora/base` larger (the
conservative choice). q and k feed attention (and the cache): they are outputs of the step, compared by
parity like y.

Every sequence b has its own adapter b: per module m, A_m [B, r, in], B_m [B, out, r] (fp32 unless
lora_dtype="model"), s = alpha / r = 2, and a router Wr [B, 7, H] fp32 with a rational (GELU-initialised)
activation and an attention-pooling vector. Gates [B, 7] are MiLoRA's p_m on the top-k modules, 0
elsewhere; for the decode step they are fixed, as if cached at prefill. They are drawn as the routing
that a per-token router with the same Wr gives on this step's token (softmax(x Wr_b^T), top-k, p kept):
then `mixlora-style`, which recomputes them every step, computes the same function as the cached-gate
providers and parity compares all of them with one reference.

Modes:
    decode   one token per sequence: x [B, H]
    prefill  B prompts of S tokens: x [B*S, H]; the MiLoRA providers first route each prompt (prompt_route
             on the hidden states entering the layer, i.e. x itself), then run the adapted layer

Providers (`PROVIDERS[name][mode](inputs)` returns the timed callable, None where it has no such mode):
    base                the frozen layer alone
    reference           moelora.reference.segmented_lora per projection (and reference.prompt_route per
                        adapter at prefill), called directly: the oracle of the parity check
    milora              our path: per projection ONE segmented_lora call over the B stacked adapters, gates
                        and the "unselected module -> LoRA -1" maps cached (no router, no host sync at decode);
                        through moelora.ops under the fused backend when it has the op, else
                        moelora.triton_backend called directly on CUDA, else moelora.ops (the reference fallback)
    milora-loop         PEFT's mixed-batch way: per projection, a Python loop over the sequences whose module
                        fires, each adding g * s * B_b(A_b x[rows]) to its own rows (gates as Python floats)
    mixlora-style       decode only: per-token routing at every step (fp32 router GEMM with each token's
                        adapter router, softmax, top-k over the 7 modules, gates scattered), then the same
                        segmented_lora calls as `milora` with those per-token gates
    router              prefill only: ONE prompt_route call on all B prompts [B, S, H] with one router (the
                        op's own cost; what a batch sharing one adapter pays)
    router-per-adapter  prefill only: one prompt_route call per adapter on its own prompt (what a batch of B
                        different adapters pays with today's op, one router_weight per call; MoeLoraModel does
                        the same)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.fused import fused_backend
from moelora import backend, ops, reference

MODULES = ("q", "k", "v", "o", "gate", "up", "down")
MODES = ("decode", "prefill")
PROVIDERS_ORDER = ("base", "reference", "milora", "milora-loop", "mixlora-style", "router", "router-per-adapter")
LORA_DTYPES = ("fp32", "model")
EPS = 1e-5
SCALING = 2.0  # lora_alpha = 2 r


@dataclass(frozen=True)
class MiloraShape:
    """B sequences (= B adapters); hidden H, intermediate I, k/v width KV; LoRA rank r; top-k of the 7
    modules; prefill prompt length S; adapter tensors in fp32 or in the model dtype."""

    B: int
    H: int
    I: int  # intermediate size
    KV: int
    r: int
    k: int
    S: int
    lora_dtype: str = "fp32"

    def label(self) -> str:
        text = "-".join(f"{f}{getattr(self, f)}" for f in ("B", "H", "I", "KV", "r", "k", "S"))
        return text + ("-lora_model_dtype" if self.lora_dtype == "model" else "")


@dataclass
class MiloraInputs:
    shape: MiloraShape
    x: Tensor  # [B, H] model dtype: the decode step's tokens, one per sequence
    prompt: Tensor  # [B, S, H] model dtype: the prompts' hidden states entering the layer
    mask: Tensor  # [B, S] int64 ones: the prompts' attention mask
    W: dict[str, Tensor]  # module -> frozen [out, in], model dtype
    norms: tuple[Tensor, Tensor]  # the two RMSNorm weights [H]
    A: dict[str, Tensor]  # module -> [B, r, in]
    Bm: dict[str, Tensor]  # module -> [B, out, r]
    scaling: Tensor  # [B] fp32
    router: Tensor  # [B, 7, H] fp32, one per adapter
    pool_weight: Tensor  # [B, H] fp32
    numerator: Tensor  # [7] fp32, the rational activation (GELU init)
    denominator: Tensor  # [5] fp32
    gates: Tensor  # [B, 7] fp32: the decode step's cached gates
    grad_out: None = None  # no gradient mode in this suite


def _dims(shape: MiloraShape) -> dict[str, tuple[int, int]]:
    """module -> (in, out)."""
    H, I, KV = shape.H, shape.I, shape.KV
    return {"q": (H, H), "k": (H, KV), "v": (H, KV), "o": (H, H), "gate": (H, I), "up": (H, I), "down": (I, H)}


def token_routing(x: Tensor, router: Tensor, top_k: int) -> Tensor:
    """Per-token routing over the 7 modules, token t with router t: gates [T, 7] fp32 (p on the top-k, else 0)."""
    probs = torch.softmax(torch.einsum("th,tmh->tm", x.float(), router), dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, idx, top)


def make_inputs(
    shape: MiloraShape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> MiloraInputs:
    """Seeded, drawn on the CPU so every device sees the same numbers; B non-zero so every LoRA term counts."""
    if shape.H % shape.KV != 0:
        raise ValueError(f"milora: KV ({shape.KV}) must divide H ({shape.H})")
    if not 1 <= shape.k <= len(MODULES):
        raise ValueError(f"milora: k must be in 1..{len(MODULES)}, got {shape.k}")
    if shape.lora_dtype not in LORA_DTYPES:
        raise ValueError(f"milora: lora_dtype must be one of {LORA_DTYPES}, got {shape.lora_dtype!r}")
    g = torch.Generator().manual_seed(seed)
    n, r = shape.B, shape.r
    lora_dt = torch.float32 if shape.lora_dtype == "fp32" else dtype

    def randn(*size: int, std: float, dt: torch.dtype = torch.float32) -> Tensor:
        return (torch.randn(size, generator=g) * std).to(device=device, dtype=dt)

    x = randn(n, shape.H, std=1.0)
    router = randn(n, len(MODULES), shape.H, std=0.5 * shape.H**-0.5)  # logits of std ~0.5: varied top-k
    inp = MiloraInputs(
        shape=shape,
        x=x.to(dtype),
        prompt=randn(n, shape.S, shape.H, std=1.0, dt=dtype),
        mask=torch.ones(n, shape.S, dtype=torch.int64, device=device),
        W={m: randn(o, i, std=i**-0.5, dt=dtype) for m, (i, o) in _dims(shape).items()},
        norms=(1.0 + randn(shape.H, std=0.1, dt=dtype), 1.0 + randn(shape.H, std=0.1, dt=dtype)),
        A={m: randn(n, r, i, std=i**-0.5, dt=lora_dt) for m, (i, _) in _dims(shape).items()},
        Bm={m: randn(n, o, r, std=0.1 * r**-0.5, dt=lora_dt) for m, (_, o) in _dims(shape).items()},
        scaling=torch.full((n,), SCALING, device=device),
        router=router,
        pool_weight=randn(n, shape.H, std=shape.H**-0.5),
        numerator=torch.tensor(reference.RATIONAL_GELU_NUMERATOR, device=device),
        denominator=torch.tensor(reference.RATIONAL_GELU_DENOMINATOR, device=device),
        gates=token_routing(x, router, shape.k),  # from the fp32 x: the same gates whatever the dtype
    )
    return inp


# The layer, with `delta(m, h)` the adapter's contribution to module m on input h (None: the frozen layer).
Delta = Callable[[str, Tensor], Tensor | None]


def layer(inp: MiloraInputs, x: Tensor, delta: Delta) -> tuple[Tensor, Tensor, Tensor]:
    """y, q, k of the decoder layer on x [T, H] (attention replaced by its single-key case, see the module doc)."""

    def proj(m: str, h: Tensor) -> Tensor:
        y = F.linear(h, inp.W[m])
        d = delta(m, h)
        return y if d is None else y + d.to(y.dtype)

    H = inp.shape.H
    h = F.rms_norm(x, (H,), inp.norms[0], EPS)
    q, k, v = proj("q", h), proj("k", h), proj("v", h)
    if v.shape[-1] != H:
        v = v.repeat(1, H // v.shape[-1])  # GQA with one key: each query head reads its kv head's v
    x = x + proj("o", v)
    h = F.rms_norm(x, (H,), inp.norms[1], EPS)
    y = x + proj("down", F.silu(proj("gate", h)) * proj("up", h))
    return y, q, k


def _no_delta(m: str, h: Tensor) -> None:
    return None


# ---- which implementation of the two MiLoRA ops runs ------------------------------------------------------


def milora_op(op: str, device: torch.device) -> tuple[Callable[..., Any], str]:
    """(callable, what it is) for op "segmented_lora" or "prompt_route" on `device`.

    moelora.ops under the fused backend when that backend implements the op; else, on CUDA, the Triton op of
    moelora.triton_backend called directly; else moelora.ops under the
    current backend, which falls back to the reference. Resolved here, in the untimed set-up."""
    try:
        name = fused_backend(device)
    except RuntimeError:
        name = None
    if name is not None:
        with backend.set_backend(name):
            impl = backend.resolve(device)
        if hasattr(impl, op):
            fn = getattr(ops, op)

            def run(*args: Any, **kwargs: Any) -> Any:
                with backend.set_backend(name):
                    return fn(*args, **kwargs)

            return run, f"moelora.ops.{op} under backend {name}"
    if device.type == "cuda":
        try:
            module = importlib.import_module("moelora.triton_backend")
        except ImportError as exc:
            why = f"moelora.triton_backend not importable: {exc}"
        else:
            return getattr(module, op), f"moelora.triton_backend.{op} (Triton, called directly)"
    else:
        why = "no fused CPU version"
    return getattr(ops, op), f"moelora.ops.{op} -> the reference ({why})"


def op_notes(device: torch.device) -> list[str]:
    return [f"milora: {op} runs {milora_op(op, device)[1]}" for op in ("segmented_lora", "prompt_route")]


# ---- the cached maps of one batch --------------------------------------------------------------------------


@dataclass
class Maps:
    token_seq: Tensor  # [T] int64: each token's sequence
    ids: Tensor  # [B] int64: sequence b runs adapter b
    gate_cols: dict[str, Tensor]  # module -> [B] fp32 contiguous: each sequence's gate of that module
    active: dict[str, Tensor]  # module -> [B] int64: b where the module fires for b, -1 elsewhere


def maps(gates: Tensor, tokens_per_seq: int) -> Maps:
    n = gates.shape[0]
    ids = torch.arange(n, device=gates.device)
    cols = {m: gates[:, j].contiguous() for j, m in enumerate(MODULES)}
    return Maps(
        token_seq=ids.repeat_interleave(tokens_per_seq),
        ids=ids,
        gate_cols=cols,
        active={m: torch.where(c > 0, ids, -1) for m, c in cols.items()},
    )


def segmented_delta(inp: MiloraInputs, seg: Callable[..., Tensor], mp: Maps, skip_unselected: bool = True) -> Delta:
    """delta(m, h): one segmented_lora call over the B stacked adapters of module m."""
    lora_of = mp.active if skip_unselected else dict.fromkeys(MODULES, mp.ids)

    def delta(m: str, h: Tensor) -> Tensor:
        return seg(h, mp.token_seq, lora_of[m], mp.gate_cols[m], inp.A[m], inp.Bm[m], inp.scaling)

    return delta


def loop_delta(inp: MiloraInputs, gates: list[list[float]], tokens_per_seq: int) -> Delta:
    """delta(m, h): PEFT's mixed-batch loop, each firing sequence's rows through its own adapter."""
    fires = {m: [(b, row[j]) for b, row in enumerate(gates) if row[j] != 0.0] for j, m in enumerate(MODULES)}
    s = SCALING

    def delta(m: str, h: Tensor) -> Tensor:
        out = torch.zeros(h.shape[0], inp.Bm[m].shape[1], dtype=torch.float32, device=h.device)
        A, Bm = inp.A[m], inp.Bm[m]
        for b, gate in fires[m]:
            rows = slice(b * tokens_per_seq, (b + 1) * tokens_per_seq)
            hb = h[rows].to(A.dtype)
            out[rows] += (gate * s) * F.linear(F.linear(hb, A[b]), Bm[b]).float()
        return out

    return delta


# ---- providers ----------------------------------------------------------------------------------------------

Step = Callable[[], Any]


def _route_each(inp: MiloraInputs, route: Callable[..., Any], hidden: Tensor) -> Tensor:
    """Each prompt through its own adapter's router: gates [B, 7]."""
    return torch.cat(
        [
            route(
                hidden[b : b + 1],
                inp.mask[b : b + 1],
                inp.router[b],
                inp.numerator,
                inp.denominator,
                top_k=inp.shape.k,
                pooling="attention",
                pool_weight=inp.pool_weight[b],
            ).gates
            for b in range(inp.shape.B)
        ]
    )


def _flat_prompt(inp: MiloraInputs) -> Tensor:
    return inp.prompt.reshape(-1, inp.shape.H)


def base_decode(inp: MiloraInputs) -> Step:
    return lambda: layer(inp, inp.x, _no_delta)


def base_prefill(inp: MiloraInputs) -> Step:
    x = _flat_prompt(inp)
    return lambda: layer(inp, x, _no_delta)


def reference_decode(inp: MiloraInputs) -> Step:
    delta = segmented_delta(inp, reference.segmented_lora, maps(inp.gates, 1), skip_unselected=False)
    return lambda: layer(inp, inp.x, delta)


def reference_prefill(inp: MiloraInputs) -> Step:
    x = _flat_prompt(inp)

    def run() -> tuple[Tensor, ...]:
        gates = _route_each(inp, reference.prompt_route, inp.prompt)
        delta = segmented_delta(inp, reference.segmented_lora, maps(gates, inp.shape.S), skip_unselected=False)
        return (*layer(inp, x, delta), gates)

    return run


def milora_decode(inp: MiloraInputs) -> Step:
    seg, _ = milora_op("segmented_lora", inp.x.device)
    delta = segmented_delta(inp, seg, maps(inp.gates, 1))  # built once: the cache a decode step reads
    return lambda: layer(inp, inp.x, delta)


def milora_prefill(inp: MiloraInputs) -> Step:
    seg, _ = milora_op("segmented_lora", inp.x.device)
    route, _ = milora_op("prompt_route", inp.x.device)
    x = _flat_prompt(inp)

    def run() -> tuple[Tensor, ...]:
        gates = _route_each(inp, route, inp.prompt)
        return (*layer(inp, x, segmented_delta(inp, seg, maps(gates, inp.shape.S))), gates)

    return run


def loop_decode(inp: MiloraInputs) -> Step:
    delta = loop_delta(inp, inp.gates.tolist(), 1)  # the gates cached on the host at prefill
    return lambda: layer(inp, inp.x, delta)


def loop_prefill(inp: MiloraInputs) -> Step:
    x = _flat_prompt(inp)

    def run() -> tuple[Tensor, ...]:
        gates = _route_each(inp, reference.prompt_route, inp.prompt)
        return (*layer(inp, x, loop_delta(inp, gates.tolist(), inp.shape.S)), gates)

    return run


def mixlora_style_decode(inp: MiloraInputs) -> Step:
    seg, _ = milora_op("segmented_lora", inp.x.device)
    token_seq = ids = torch.arange(inp.shape.B, device=inp.x.device)
    k = inp.shape.k

    def run() -> tuple[Tensor, Tensor, Tensor]:
        gates = token_routing(inp.x, inp.router, k).T.contiguous()  # [7, T]: every step, every token

        def delta(m: str, h: Tensor) -> Tensor:
            col = gates[MODULES.index(m)]
            return seg(h, token_seq, torch.where(col > 0, ids, -1), col, inp.A[m], inp.Bm[m], inp.scaling)

        return layer(inp, inp.x, delta)

    return run


def router_prefill(inp: MiloraInputs) -> Step:
    route, _ = milora_op("prompt_route", inp.x.device)

    def run() -> Tensor:
        return route(
            inp.prompt,
            inp.mask,
            inp.router[0],
            inp.numerator,
            inp.denominator,
            top_k=inp.shape.k,
            pooling="attention",
            pool_weight=inp.pool_weight[0],
        ).gates

    return run


def router_per_adapter_prefill(inp: MiloraInputs) -> Step:
    route, _ = milora_op("prompt_route", inp.x.device)
    return lambda: _route_each(inp, route, inp.prompt)


PROVIDERS: dict[str, dict[str, Callable[[MiloraInputs], Step] | None]] = {
    "base": {"decode": base_decode, "prefill": base_prefill},
    "reference": {"decode": reference_decode, "prefill": reference_prefill},
    "milora": {"decode": milora_decode, "prefill": milora_prefill},
    "milora-loop": {"decode": loop_decode, "prefill": loop_prefill},
    "mixlora-style": {"decode": mixlora_style_decode, "prefill": None},
    "router": {"decode": None, "prefill": router_prefill},
    "router-per-adapter": {"decode": None, "prefill": router_per_adapter_prefill},
}

# ---- what parity compares ------------------------------------------------------------------------------------

LAYER_KEYS = ("y", "q", "k")


def _reference_router_gates(inp: MiloraInputs) -> Tensor:
    return reference.prompt_route(
        inp.prompt,
        inp.mask,
        inp.router[0],
        inp.numerator,
        inp.denominator,
        top_k=inp.shape.k,
        pooling="attention",
        pool_weight=inp.pool_weight[0],
    ).gates


def parity_keys(name: str) -> tuple[str, ...]:
    """The outputs of provider `name` that parity compares (a subset of the reference's)."""
    keys: list[str] = []
    modes = PROVIDERS[name]
    if name in ("router", "router-per-adapter"):
        return ("prefill gates (one router)",) if name == "router" else ("prefill gates",)
    if modes["decode"] is not None:
        keys += [f"decode {k}" for k in LAYER_KEYS]
    if modes["prefill"] is not None:
        keys += [f"prefill {k}" for k in LAYER_KEYS] + ["prefill gates"]
    return tuple(keys)


def outputs(name: str, inp: MiloraInputs, with_grads: bool = False) -> dict[str, Tensor]:
    """Every output of provider `name` in every mode it has; the reference adds the one-router gates."""
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        factories = PROVIDERS[name]
        if name == "router":
            return {"prefill gates (one router)": factories["prefill"](inp)()}
        if name == "router-per-adapter":
            return {"prefill gates": factories["prefill"](inp)()}
        if factories["decode"] is not None:
            out |= {f"decode {k}": v for k, v in zip(LAYER_KEYS, factories["decode"](inp)(), strict=True)}
        if factories["prefill"] is not None:
            *values, gates = factories["prefill"](inp)()
            out |= {f"prefill {k}": v for k, v in zip(LAYER_KEYS, values, strict=True)}
            out["prefill gates"] = gates
        if name == "reference":
            out["prefill gates (one router)"] = _reference_router_gates(inp)
    return out


def step(name: str, inp: MiloraInputs, mode: str) -> Step:
    """The timed unit of provider `name` in `mode`, under torch.no_grad (inference)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    factory = PROVIDERS[name][mode]
    if factory is None:
        raise ValueError(f"milora: provider {name} has no {mode} mode")
    fn = factory(inp)

    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def runs(name: str, mode: str) -> bool:
    return PROVIDERS[name].get(mode) is not None
