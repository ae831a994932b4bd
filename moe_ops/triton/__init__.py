"""Triton kernels of the MoE ops (launched by moe_ops.triton_backend): `routing`, `permute`
(counting sort, gathers, combine) and `grouped_gemm` (persistent grouped GEMM with SwiGLU epilogues,
weight gradients)."""

from m1_kernels.dispatch import triton_interpreted
from m1_kernels.interpreter_compat import patch_triton_interpreter

if triton_interpreted():
    patch_triton_interpreter()
