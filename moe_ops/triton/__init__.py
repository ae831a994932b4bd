"""Triton kernels of the MoE ops (launched by moe_ops.triton_backend): `routing`, `permute`
(counting sort, gathers, combine), `grouped_gemm` (persistent grouped GEMM with SwiGLU epilogues,
weight gradients) and `few_token` (the decode-sized forward that streams each chosen expert once)."""

from m1_kernels.dispatch import triton_interpreted
from m1_kernels.interpreter_compat import patch_triton_interpreter

if triton_interpreted():
    patch_triton_interpreter()
