"""The lightning family's backend table: what each backend runs, where, on which dtypes and head dims,
and what it borrows (the README's table is generated from it by m1_kernels.dispatch.backend_table_markdown).

Every backend module provides the same functions on validated tensors: `lightning_fwd`,
`lightning_fwd_with_cache`, `lightning_decode` and, for the kernel backends, `lightning_bwd`.
"""

import torch

from m1_kernels.dispatch import Backend

from . import cuda_backend, torch_backend

try:
    from . import triton_backend
except ImportError:  # triton is installed with the package on Linux only; backend_error says why it is missing
    triton_backend = None

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)  # as flash-linear-attention takes them
CUDA_HEAD_DIMS = (64, 128)
PREFILL_OPS = ("lightning_attn", "lightning_attn_with_cache")


def _head_dims_error(name, dims, head_dim, value_dim):
    if head_dim not in dims or value_dim not in dims:
        return (f"the {name} backend takes head dims D, Dv in {dims}, got D={head_dim}, Dv={value_dim}; "
                "backend='torch' takes any")
    return None


def _triton_unsupported(op, *, dtype, head_dim, value_dim):
    return _head_dims_error("triton", TRITON_HEAD_DIMS, head_dim, value_dim)


def _cuda_unsupported(op, *, dtype, head_dim, value_dim):
    if op in PREFILL_OPS and dtype not in (torch.bfloat16, torch.float16):
        return (f"the cuda backend's prefill takes bf16 or fp16 q/k/v (tensor cores), got {dtype}; "
                "use backend='triton' or 'torch' for fp32")
    return _head_dims_error("cuda", CUDA_HEAD_DIMS, head_dim, value_dim)


TRITON = Backend("triton", triton_backend, runs_on="CUDA GPUs; CPU tensors under TRITON_INTERPRET=1 (tests)",
                 dtypes=FLOATS, limits=f"D, Dv in {{{', '.join(map(str, TRITON_HEAD_DIMS))}}}",
                 unsupported=_triton_unsupported)
CUDA = Backend("cuda", cuda_backend, runs_on="sm_90a GPUs (H100, H200) with the extension built", dtypes=FLOATS,
               limits=f"D, Dv in {{{', '.join(map(str, CUDA_HEAD_DIMS))}}}; prefill: bfloat16, float16 only",
               unsupported=_cuda_unsupported)
TORCH = Backend("torch", torch_backend, runs_on="anywhere (plain PyTorch; the CPU default)", dtypes=FLOATS,
                limits="any head dims; fp32 arithmetic", custom_ops=False)

BACKENDS = (TRITON, CUDA, TORCH)
# The family's own choice, read before M1_OPS_BACKEND.
ENV_VAR = "M1_LIGHTNING_BACKEND"
# The backends of each op, fastest first as measured on the H200 (bench/NOTES.md): the default is the
# first that can run the call.
OP_BACKENDS = {
    "lightning_attn": (TRITON, CUDA, TORCH),
    "lightning_attn_with_cache": (TRITON, CUDA, TORCH),
    "lightning_attn_decode": (CUDA, TRITON, TORCH),
}
