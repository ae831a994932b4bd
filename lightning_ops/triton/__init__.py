"""Triton kernels of lightning attention: `chunk` (prefill forward/backward), `fused_recurrent` (decode)."""

from m1_kernels.dispatch import triton_interpreted
from m1_kernels.interpreter_compat import patch_triton_interpreter

if triton_interpreted():
    patch_triton_interpreter()

from .chunk import chunk_lightning  # noqa: E402
from .fused_recurrent import fused_recurrent_lightning_decode  # noqa: E402

__all__ = ["chunk_lightning", "fused_recurrent_lightning_decode"]
