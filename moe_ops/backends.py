"""The MoE family's backend table: what each backend runs, where, on which dtypes and sizes, and what it
borrows (the README's table is generated from it by m1_kernels.dispatch.backend_table_markdown).

The kernel backend modules (triton_backend, cuda_backend) provide the functions listed in
triton_backend's docstring on validated tensors; torch_backend provides the public ops themselves in
plain PyTorch (route, permute, grouped_gemm, unpermute, fused_moe).
"""

import torch

from m1_kernels.dispatch import Backend

from . import cuda_backend, torch_backend

try:
    from . import triton_backend
except ImportError:  # triton is installed with the package on Linux only; backend_error says why it is missing
    triton_backend = None

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
MAX_EXPERTS, MAX_TOP_K = 256, 8
# Few-token forward of the Triton backend (triton_backend.few_token_fits says why these bounds).
FEW_TOKEN_LIMIT = "fused_moe without gradients on <= 64 tokens (and N * top_k <= 128): the few-token kernels"


def _cuda_unsupported(op, *, dtype, gemm_sizes):
    """The CUTLASS grouped GEMM: 16-bit operands (tensor cores; fp32 accumulation) and rows of 16 bytes
    (TMA), so every GEMM size a multiple of 8 elements. Base addresses and row strides are checked when
    the kernel is called (cuda_backend names the tensor)."""
    if dtype not in CUDA_DTYPES:
        return (f"the cuda backend's grouped GEMM takes float16 or bfloat16 inputs (CUTLASS tensor cores), got "
                f"{dtype}; use backend='triton' or 'torch' for float32")
    odd = [f"{name}={value}" for name, value in gemm_sizes.items() if value % 8]
    if odd:
        return (f"the cuda backend needs GEMM sizes that are multiples of 8 (16-byte TMA rows), got {', '.join(odd)}; "
                "use backend='triton' or 'torch'")
    return None


TRITON = Backend("triton", triton_backend, runs_on="CUDA GPUs (TMA loads on Hopper); CPU tensors under "
                 "TRITON_INTERPRET=1 (tests)", dtypes=FLOATS,
                 limits=f"E <= {MAX_EXPERTS}, top_k <= {MAX_TOP_K}; {FEW_TOKEN_LIMIT}")
CUDA = Backend("cuda", cuda_backend, runs_on="sm_90a GPUs (H100, H200) with the extension built", dtypes=CUDA_DTYPES,
               limits="GEMM sizes (H, F; a grouped GEMM's N and K) multiples of 8, 16-byte aligned rows",
               borrows={"route": "triton", "permute": "triton", "unpermute": "triton", "few_token": "triton"},
               unsupported=_cuda_unsupported)
TORCH = Backend("torch", torch_backend, runs_on="anywhere (plain PyTorch; the CPU default)", dtypes=FLOATS,
                limits="grouped GEMM: torch._grouped_mm on CUDA bf16 with 16-byte rows, else a per-expert loop "
                "that reads the offsets on the host (not capturable in a CUDA graph)", custom_ops=False)

BACKENDS = (TRITON, CUDA, TORCH)
# The family's own choice, read before M1_OPS_BACKEND: e.g. M1_MOE_BACKEND=cuda trains the MoE layers on
# the CUTLASS GEMMs while lightning attention keeps its default.
ENV_VAR = "M1_MOE_BACKEND"
# The backends of each op, fastest first as measured on the H200 (bench/NOTES.md): the default is the
# first that can run the call. The cuda backend has no routing, permutation or few-token forward of its own:
# fused_moe borrows Triton's (declared above; without the few-token kernels a cuda model's decode ran its MoE
# 1.05-1.45x slower); route, permute and unpermute are not offered under its name.
OP_BACKENDS = {
    "route": (TRITON, TORCH),
    "permute": (TRITON, TORCH),
    "grouped_gemm": (TRITON, CUDA, TORCH),
    "unpermute": (TRITON, TORCH),
    "fused_moe": (TRITON, CUDA, TORCH),
}
