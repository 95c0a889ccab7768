"""moelora.kernels: the Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1).

- `route`: router GEMM + softmax + top-k / top-p, fused; backward. `route_shrink`: the same and every
  expert's gate/up LoRA shrink from one read of x (x @ [Wr | A_all]^T, up to 256 rank columns).
- `moe_lora`: the dense-masked regime (one read of x for every expert's shrink, one expand GEMM with
  K = E*r); backward.
- `moe_lora_sorted`: the sorted regime for large E*r (ScatterMoE-style): `sort_by_expert` (no host sync),
  gather on load, scatter on store to per-pair buffers summed over slots in a fixed order, per-expert
  contiguous loops for dA / dB; backward.
- `mixlora_ffn`: from the frozen base's G and U, the gate/up LoRA expand per slot, activation (SiLU,
  GELU erf / tanh, ReLU), product, weighted sum into hbar and the down-LoRA shrink, never materialising
  [T, k, I]; `mixlora_ffn_bwd`: its backward, recomputing h. The caller runs the frozen down projection once,
  on hbar. Dense-masked (every slot's rank work over all E*r columns, no sort).
- `mixlora_ffn_sorted` / `mixlora_ffn_sorted_bwd`: the same op with tokens sorted by their combination of
  experts (`combo_sort`, no host sync), so that a block shares one expert per slot: r rank columns per slot
  instead of E*r, the sum over slots still in registers; the weight gradients per expert over its (token,
  slot) pairs.
- `mixlora_ffn_shrink_expand`: the FFN's rank-space ends, shared by both regimes: the gate/up shrink
  `shrink_x` (x read once per 128 rank columns) and the down LoRA's expand `down_expand` (Wd hbar added
  before its one rounding); backward.
- `prompt_route` (MiLoRA): pool each prompt (attention / mean / last / max, padding ignored), rational
  activation, softmax over the layer's modules, top-k gates; `prompt_route_bwd`: backward.
- `segmented_lora` (MiLoRA, many tenants): one LoRA and gate per sequence through token -> sequence ->
  LoRA maps, inactive tokens skipped, fixed grids (CUDA-graph capturable); backward.
- `philox`: moelora.dropout's seeded LoRA-dropout mask (Philox4x32-10) inside a kernel, bit for bit; the
  shrinks (rank_shrink, route_shrink), their backward and both fused FFN regimes apply it behind a DROPOUT
  constexpr, forward and backward, without storing a mask.
- `_common`: the JIT helpers and tiling rules the FFN files and `route` share (activations, dot modes,
  slicing of reductions).
Each file holds kernels and their launchers (plain functions on tensors, shapes in their docstrings) and
the input checks of its op (a `_bwd` file: its backward's kernels and launchers); no autograd.
moelora.triton_ops registers the launchers as torch.library ops (namespace moelora_triton) with fake kernels
and autograd, moelora.triton_backend dispatches to them behind `MOELORA_BACKEND=triton` (and `auto` on
CUDA); the tests run those ops against moelora.reference under the interpreter in fp32 and fp16.
No atomics in any forward or backward: results are deterministic.
Run on a GPU once (H200, 2026-12-04: bench/results/gpu-check-cuda-nvidia-h200-2026-12-04.md): bf16 and fp16
parity and bitwise repeat runs pass; speed is short of issue 3's goals at T = 8192. The kernel files never
import transformers.
"""

import sys as _sys

if __name__ != "moelora.kernels":
    # Imported as top-level `kernels`: the repository root is on sys.path (`python -m bench`, pytest or a script
    # run from a checkout), and this folder shadows the Hugging Face `kernels` package, which transformers
    # (>= 5.25 depends on it) imports as soon as it finds one. This folder is only ever meant as
    # moelora.kernels, so hand the name to the next `kernels` on sys.path where there is one. Where there is
    # none, stay: transformers then imports this folder to read a version, finds none and moves on.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import system returns what sys.modules holds after this runs
        _spec.loader.exec_module(_module)
