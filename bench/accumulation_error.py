"""How the order of an fp32 dot's sum sets its error, on the CPU: `python -m bench.accumulation_error`.

A Triton "ieee" fp32 tl.dot compiles to FMA loops that chain every product onto the accumulator they are given,
so `acc = tl.dot(a, b, acc)` over a K loop rounds along one chain of K additions. The kernels now start a fresh
partial sum per K-block and add it to the total (moelora.kernels.moe_lora.fp32_dot_precision). This script
emulates both orders in numpy (each product exact, each addition rounded to fp32, as an FMA does) on
x [T, K] @ w [N, K]^T (w stored as the kernels store A) and prints their largest error against a float64
product, next to torch's CPU fp32 matmul of the same operands (whose order is the BLAS's choice: it moves with
the layout). It measures summation order only, not a GPU.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def _fma_chain(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_k x[:, k] w[:, k] in fp32, one rounding per step, in k order (an FMA per step)."""
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k in range(x.shape[1]):
        acc = (acc.astype(np.float64) + np.outer(x[:, k], w[:, k]).astype(np.float64)).astype(np.float32)
    return acc


def _blocked(x: np.ndarray, w: np.ndarray, block: int) -> np.ndarray:
    """A fresh FMA chain per K-block of `block`, each block's sum added to the total in fp32."""
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for k0 in range(0, x.shape[1], block):
        acc = acc + _fma_chain(x[:, k0 : k0 + block], w[:, k0 : k0 + block])
    return acc


def errors(K: int, T: int = 1000, N: int = 8, block: int = 32, seed: int = 0) -> dict[str, float]:
    """Largest absolute error of each order against float64, on seeded normal x and 0.02-scaled w."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    torch_cpu = (torch.from_numpy(x) @ torch.from_numpy(w).T).numpy()
    return {
        "one chain": float(np.abs(_fma_chain(x, w) - exact).max()),
        f"per {block}-block": float(np.abs(_blocked(x, w, block) - exact).max()),
        "torch cpu": float(np.abs(torch_cpu - exact).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", default="512,1376,4096", help="comma list of reduction lengths")
    ap.add_argument("--block", type=int, default=32, help="K-block of the blocked order")
    args = ap.parse_args()
    print(f"| K | one chain | per {args.block}-block | one chain / blocked | torch cpu |")
    print("|---|---|---|---|---|")
    for K in (int(k) for k in args.K.split(",")):
        e = errors(K, block=args.block)
        chain, blocked = e["one chain"], e[f"per {args.block}-block"]
        print(f"| {K} | {chain:.2e} | {blocked:.2e} | {chain / blocked:.1f} | {e['torch cpu']:.2e} |")


if __name__ == "__main__":
    main()
