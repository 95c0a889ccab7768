"""Backend choice: MOELORA_BACKEND=auto|triton|cpu|reference, or moelora.set_backend(name).

One op name, several implementations. A backend is a module-like object with the functions of
moelora.reference (route, moe_lora, mixlora_ffn, lora) and a `supports_dora` flag; fused backends
register themselves here when their code is importable and built.

Fallbacks are visible: a fused backend that hands a call to the reference says so through `fell_back`, which
warns once per (op, reason), and `ops_ran()` tells which backend ran each op since `reset_ops_ran()` (a
MoeLoraModel resets it at the start of every forward, so it describes the last one).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from types import ModuleType
from typing import Any

import torch

from moelora import reference

BACKENDS = ("auto", "triton", "cpu", "reference")
_registered: dict[str, Any] = {"reference": reference}
_why_missing: dict[str, str] = {
    "triton": "triton is not importable (pip install triton; Linux with an NVIDIA GPU)",
    "cpu": "the C++ extension moelora._C is not built (reinstall with a C++ compiler: scripts/install.sh)",
}
_override: list[str] = []
_cpu_tried = False
_triton_tried = False
_warned: set[str] = set()
_ran: Counter[tuple[str, str]] = Counter()  # (op, backend name) -> calls since reset_ops_ran()
_fallback_reason: list[str | None] = []  # one entry per op call in progress; fell_back fills the innermost
_resolved: dict[tuple[str, str], Any] = {}  # (backend name, device type) -> implementation, made once
_resolved_over: list[dict[str, Any]] = [_registered]  # the _registered those entries were made from


def register_backend(name: str, impl: ModuleType | Any) -> None:
    """Make `impl` the implementation behind backend `name` ('triton' or 'cpu')."""
    if name not in ("triton", "cpu"):
        raise ValueError(f"register_backend: name must be 'triton' or 'cpu', got {name!r}")
    _registered[name] = impl
    _resolved.clear()


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The requested backend name: the innermost set_backend, else MOELORA_BACKEND, else 'auto'."""
    if _override:
        return _override[-1]
    return _check_name(os.environ.get("MOELORA_BACKEND", "auto").strip().lower() or "auto", "MOELORA_BACKEND")


class set_backend:  # noqa: N801 - used as a function and as a context manager, like torch.set_grad_enabled
    """Pick the backend for this process: `set_backend("reference")`, or `with set_backend("cpu"): ...`."""

    def __init__(self, name: str) -> None:
        self.name = _check_name(name, "set_backend")
        self._previous = list(_override)
        _override.clear()
        _override.append(self.name)

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc: object) -> None:
        _override.clear()
        _override.extend(self._previous)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_cpu_backend() -> None:
    """Register the C++ backend the first time it is wanted, if moelora._C was built."""
    global _cpu_tried
    if _cpu_tried:
        return
    _cpu_tried = True
    try:
        from moelora import cpu_backend
    except (ImportError, OSError) as e:
        _why_missing["cpu"] = (
            f"the C++ extension moelora._C is not built or does not load ({e}); reinstall with a C++ compiler "
            "and torch importable at build time (scripts/install.sh does this)"
        )
    else:
        _registered["cpu"] = cpu_backend
        _resolved.clear()


def _interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _load_triton_backend() -> None:
    """Register the Triton backend the first time it is wanted; triton is imported only then."""
    global _triton_tried
    if _triton_tried:
        return
    _triton_tried = True
    try:
        from moelora import triton_backend
    except ImportError as e:
        _why_missing["triton"] = f"triton is not importable ({e}); pip install triton (Linux with an NVIDIA GPU)"
    else:
        _registered["triton"] = triton_backend
        _resolved.clear()


def resolve(device: torch.device) -> Any:
    """The implementation to run for tensors on `device` under the current backend choice."""
    name = get_backend()
    # Every op call resolves its backend, a decoding step about 30 times: reuse the answer (2.2 -> 1.2 us).
    key = (name, device.type)
    if _resolved_over[0] is not _registered:  # replaced (tests do), so the entries may be stale
        _resolved.clear()
        _resolved_over[0] = _registered
    impl = _resolved.get(key)
    if impl is None:
        impl = _resolve(name, device)
        if not (name == "triton" and device.type == "cpu"):  # that one depends on TRITON_INTERPRET
            _resolved[key] = impl
    return impl


def _resolve(name: str, device: torch.device) -> Any:
    if name in ("auto", "cpu") and device.type == "cpu":
        _load_cpu_backend()
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise RuntimeError(
            f"moelora: backend 'triton' was requested but cannot run tensors on {device}: the Triton kernels need "
            "CUDA tensors (TRITON_INTERPRET=1 runs them on CPU tensors through Triton's interpreter, slowly)"
        )
    if (name == "auto" and device.type == "cuda") or name == "triton":
        _load_triton_backend()
    if name == "reference":
        return reference
    if name == "auto":
        fast = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
        if fast is not None and fast in _registered:
            return _registered[fast]
        _warn_once(
            f"auto-{device.type}",
            f"moelora: no fused backend for {device.type} tensors "
            f"({_why_missing.get(fast, 'no fused backend for this device') if fast else 'unsupported device'}); "
            "using the pure-PyTorch reference backend. Set MOELORA_BACKEND=reference to silence this.",
        )
        return reference
    if name not in _registered:
        raise RuntimeError(f"moelora: backend {name!r} was requested but is not available: {_why_missing[name]}")
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"moelora: backend 'cpu' needs CPU tensors, got tensors on {device}")
    return _registered[name]


def backend_name(impl: Any) -> str:
    """'reference', 'cpu' or 'triton': the registered name of a backend implementation."""
    if impl is reference:
        return "reference"
    return next((n for n, v in _registered.items() if v is impl), "unknown")


def run_op(op: str, impl: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) as op `op` on backend `impl`, counted in ops_ran() under the backend that really ran
    it: the reference when the backend called fell_back during the call."""
    _fallback_reason.append(None)
    try:
        out = fn(*args, **kwargs)
    finally:
        reason = _fallback_reason.pop()
    if not torch.compiler.is_compiling():  # traced, the count would guard every step's graph on its value
        _ran[(op, "reference" if reason is not None else backend_name(impl))] += 1
    return out


def fell_back(op: str, reason: str) -> None:
    """A fused backend hands this call of `op` to the reference because of `reason`: warn once per (op, reason)."""
    if _fallback_reason:
        _fallback_reason[-1] = reason
    _warn_once(f"fallback:{op}:{reason}", f"moelora: {op} ran on the reference backend, not the fused one: {reason}")


def ops_ran() -> dict[str, dict[str, int]]:
    """{op: {backend: calls}} since the last reset_ops_ran() (by default: the last MoeLoraModel forward); calls
    inside torch.compile are not counted (a count there would make every call recompile)."""
    out: dict[str, dict[str, int]] = {}
    for (op, where), n in sorted(_ran.items()):
        out.setdefault(op, {})[where] = n
    return out


def reset_ops_ran() -> None:
    _ran.clear()


def resolve_for_dora(device: torch.device) -> Any:
    """Like resolve(), but a backend without DoRA falls back to the reference with a one-time notice."""
    impl = resolve(device)
    if impl is not reference and not getattr(impl, "supports_dora", False):
        fell_back("mixlora_ffn", f"the {backend_name(impl)} backend does not cover DoRA")
        return reference
    return impl
