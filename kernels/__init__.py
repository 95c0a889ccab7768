"""moelora.kernels: the Triton backend (CUDA). Empty in this release: the kernels issue fills it.

Until then `MOELORA_BACKEND=auto` runs the pure-PyTorch reference on CUDA tensors (with one warning)
and `MOELORA_BACKEND=triton` raises. This package must never import transformers.
"""
