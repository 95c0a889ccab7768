"""moelora.kernels: the Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1).

In this release: `route` (router GEMM + softmax + top-k / top-p, fused; backward) and `moe_lora` (the
dense-masked regime: one read of x for every expert's shrink, one expand GEMM with K = E*r; backward),
each tested against moelora.reference under the interpreter in fp32 and fp16. Not yet: the fused
`mixlora_ffn` kernel, the sorted regime for large E*r, torch.library registration, and any run on a GPU.
Until `mixlora_ffn` exists these kernels are not registered as the `triton` backend, so
`MOELORA_BACKEND=triton` still raises and `auto` runs the reference on CUDA tensors.
The kernel files never import transformers.
"""
