"""The "cuda" backend: the expert GEMMs on the CUTLASS sm90a grouped GEMM of csrc/grouped_gemm_sm90.cu.

Every function takes tensors already checked by moe_ops.ops and returns new tensors. The grouped GEMM
reads the routing offsets on the device only (a setup kernel fills CUTLASS's per-expert problem sizes,
pointers and strides), so nothing here synchronises with the host and a whole MoE forward captures in a
CUDA graph. Routing, permutation and the weighted combine are the Triton kernels (they are cheap next
to the GEMMs).

The extension ships 16-bit kernels only (bf16, fp16; fp32 accumulation): float32 inputs run the
Triton grouped GEMM, as routing does, so the backend serves every dtype of the public ops. CUTLASS's
TMA loads need 16-byte aligned rows: for 16-bit inputs the GEMM's N and K, the row strides and the
base addresses must be multiples of 8 elements / 16 bytes (ValueError naming the argument otherwise).
The tile is chosen from the average rows per expert; M1_GROUPED_GEMM_TILE=large|small forces one (for
benchmarking).

SwiGLU: with many rows per expert (the large tile) and no pre-activation to keep for a backward, the
gate projection runs first and the up projection's epilogue computes silu(gate) * up directly, so the
[M, 2F] pre-activation never makes a round trip through memory; otherwise one [M, 2F] GEMM and a
vectorised SwiGLU kernel. M1_GROUPED_GEMM_SWIGLU=fused|separate forces either (for benchmarking).
"""

import functools
import os

import torch

from m1_kernels.extension import DTYPE_CODES, cuda_extension, ptr, stream_of

from . import triton_backend

route = triton_backend.route
permute = triton_backend.permute
unpermute = triton_backend.unpermute
unpermute_backward = triton_backend.unpermute_backward

TILE_CODES = {"auto": -1, "large": 0, "small": 1}  # must match m1::GroupedGemmTile
TILE_ENV = "M1_GROUPED_GEMM_TILE"
SWIGLU_ENV = "M1_GROUPED_GEMM_SWIGLU"
SMALL_TILE_MAX_ROWS_PER_EXPERT = 128  # must match kSmallTileMaxRowsPerGroup in csrc/grouped_gemm_sm90.cu


def _env_choice(var, choices):
    name = os.environ.get(var, "auto")
    if name not in choices:
        raise ValueError(f"{var} must be one of {tuple(choices)}, got {name!r}")
    return name


def _tile():
    return TILE_CODES[_env_choice(TILE_ENV, TILE_CODES)]


@functools.cache
def _workspace_bytes(num_experts: int, device_index: int) -> int:
    return cuda_extension().grouped_gemm_workspace_size(num_experts, device_index)


def _workspace(num_experts, device):
    return torch.empty(_workspace_bytes(num_experts, device.index), dtype=torch.uint8, device=device)


def _cutlass_dtype(t):
    return t.dtype in (torch.float16, torch.bfloat16)


def _check_tma(name, t, *dims):
    """16-byte aligned base address, unit last stride and 8-element multiples for the listed sizes."""
    if t.stride(-1) != 1 and t.numel():
        raise ValueError(f"{name} must have unit stride in its last dimension for the cuda backend, "
                         f"got strides {t.stride()}")
    if t.data_ptr() % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address for the cuda backend (TMA)")
    for what, value in dims:
        if value % 8:
            raise ValueError(f"{name}: {what} must be a multiple of 8 for the cuda backend (16-byte TMA rows), "
                             f"got {value}")


def _device_ctx(t):
    return torch.cuda.device(t.device)


def grouped_gemm(x, weight, offsets, weight_layout, tile=None, gate=None):
    """y [M, N]: rows offsets[e]:offsets[e+1] of x times W_e^T ("nk", weight [E, N, K]) or W_e ("kn",
    weight [E, K, N]); rows outside [offsets[0], offsets[E]) are zeros. With gate ([M, N], "nk" only),
    y = silu(gate) * (x W_e^T) from the fused epilogue (large tile)."""
    if not _cutlass_dtype(x):
        return triton_backend.grouped_gemm(x, weight, offsets, weight_layout)
    ext = cuda_extension(x.device)
    M, K = x.shape
    E = weight.shape[0]
    N = weight.shape[1] if weight_layout == "nk" else weight.shape[2]
    _check_tma("x", x, ("K (x.shape[1])", K), ("x.stride(0)", x.stride(0)))
    _check_tma("weight", weight, ("N (output columns)", N), ("weight.stride(0)", weight.stride(0)),
               ("weight.stride(1)", weight.stride(1)))
    if gate is not None and (gate.shape != (M, N) or not gate.is_contiguous() or gate.dtype != x.dtype):
        raise ValueError(f"gate must be a contiguous {x.dtype} tensor of shape {(M, N)}, got "
                         f"{gate.dtype} {tuple(gate.shape)} with strides {gate.stride()}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    workspace = _workspace(E, x.device)
    with _device_ctx(x):
        ext.grouped_gemm(ptr(x), x.stride(0), ptr(weight), weight.stride(0), weight.stride(1), ptr(gate), ptr(y),
                         ptr(offsets), M, N, K, E, weight_layout == "nk", DTYPE_CODES[x.dtype],
                         _tile() if tile is None else tile, x.device.index, ptr(workspace), workspace.numel(),
                         stream_of(x))
    return y


def grouped_gemm_weight_grad(x, dy, offsets, weight_layout):
    """dW_e = dy_e^T x_e ("nk", [E, N, K]) or x_e^T dy_e ("kn", [E, K, N]); zeros for empty experts."""
    if not _cutlass_dtype(x):
        return triton_backend.grouped_gemm_weight_grad(x, dy, offsets, weight_layout)
    ext = cuda_extension(x.device)
    E = offsets.numel() - 1
    p, q = (dy, x) if weight_layout == "nk" else (x, dy)
    p_name, q_name = ("dy", "x") if weight_layout == "nk" else ("x", "dy")
    R, C = p.shape[1], q.shape[1]
    _check_tma(p_name, p, (f"{p_name}.shape[1]", R), (f"{p_name}.stride(0)", p.stride(0)))
    _check_tma(q_name, q, (f"{q_name}.shape[1]", C), (f"{q_name}.stride(0)", q.stride(0)))
    dw = torch.empty(E, R, C, dtype=x.dtype, device=x.device)
    workspace = _workspace(E, x.device)
    with _device_ctx(x):
        ext.grouped_gemm_wgrad(ptr(p), p.stride(0), ptr(q), q.stride(0), ptr(dw), ptr(offsets), x.shape[0], R, C, E,
                               DTYPE_CODES[x.dtype], x.device.index, ptr(workspace), workspace.numel(),
                               stream_of(x))
    return dw


def swiglu(gate_up):
    """silu(gate_up[:, :F]) * gate_up[:, F:] as [M, F] (gate columns first), fp32 math."""
    if not _cutlass_dtype(gate_up):
        raise TypeError(f"gate_up: the CUDA SwiGLU supports float16 and bfloat16, got {gate_up.dtype}")
    ext = cuda_extension(gate_up.device)
    M, F2 = gate_up.shape
    F = F2 // 2
    _check_tma("gate_up", gate_up, ("F (half of gate_up.shape[1])", F), ("gate_up.stride(0)", gate_up.stride(0)))
    h = torch.empty(M, F, dtype=gate_up.dtype, device=gate_up.device)
    with _device_ctx(gate_up):
        ext.swiglu(ptr(gate_up), gate_up.stride(0), ptr(h), M, F, DTYPE_CODES[gate_up.dtype], stream_of(gate_up))
    return h


def _fuse_swiglu(x, num_experts, store_preact):
    if store_preact:  # the backward needs [gate | up]
        return False
    choice = _env_choice(SWIGLU_ENV, ("auto", "fused", "separate"))
    if choice != "auto":
        return choice == "fused"
    tile = _tile()
    return tile == TILE_CODES["large"] or (
        tile == TILE_CODES["auto"] and x.shape[0] > SMALL_TILE_MAX_ROWS_PER_EXPERT * num_experts)


def grouped_gemm_swiglu(x, gate_up_proj, offsets, store_preact):
    """(silu(x W_gate^T) * (x W_up^T) [M, F], [gate | up] [M, 2F] or an empty [0, 2F] tensor)."""
    if not _cutlass_dtype(x):
        return triton_backend.grouped_gemm_swiglu(x, gate_up_proj, offsets, store_preact)
    F = gate_up_proj.shape[1] // 2
    if _fuse_swiglu(x, gate_up_proj.shape[0], store_preact):
        gate = grouped_gemm(x, gate_up_proj[:, :F], offsets, "nk", tile=TILE_CODES["large"])
        h = grouped_gemm(x, gate_up_proj[:, F:], offsets, "nk", gate=gate)
        return h, x.new_empty(0, 2 * F)
    preact = grouped_gemm(x, gate_up_proj, offsets, "nk")
    h = swiglu(preact)
    return h, preact if store_preact else preact.new_empty(0, preact.shape[1])


def grouped_gemm_swiglu_backward(dy, down_proj, offsets, preact):
    """d[gate | up] from dy [M, H] through y = h down_e^T (down_proj [E, H, F]) and h = silu(gate) * up
    (the elementwise part in fp32 PyTorch: training-only, memory-bound, small next to the GEMMs)."""
    if not _cutlass_dtype(dy):
        return triton_backend.grouped_gemm_swiglu_backward(dy, down_proj, offsets, preact)
    dh = grouped_gemm(dy, down_proj, offsets, "kn").float()
    F = dh.shape[1]
    gate, up = preact[:, :F].float(), preact[:, F:].float()
    sig = torch.sigmoid(gate)
    d_gate = dh * up * sig * (1 + gate * (1 - sig))
    d_up = dh * gate * sig
    return torch.cat([d_gate, d_up], dim=1).to(dy.dtype)
