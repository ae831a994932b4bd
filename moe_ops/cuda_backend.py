"""The "cuda" backend: the expert GEMMs on the CUTLASS sm90a grouped GEMM of csrc/grouped_gemm_sm90.cu.

Every function takes tensors already checked by moe_ops.ops and returns new tensors. The grouped GEMM
reads the routing offsets on the device only (a setup kernel fills CUTLASS's per-expert problem sizes,
pointers and strides), so nothing here synchronises with the host and a whole MoE forward captures in a
CUDA graph. Routing, permutation, the weighted combine and the few-token forward (inference on <= 64
tokens) are not here: fused_moe borrows the Triton backend's (declared in moe_ops/backends.py).

The extension ships 16-bit kernels only (bf16, fp16; fp32 accumulation): the backend table refuses
float32 calls before they get here. CUTLASS's TMA loads need 16-byte aligned rows: the GEMM's N and K,
the row strides and the base addresses must be multiples of 8 elements / 16 bytes (ValueError naming
the argument otherwise). The tile is chosen from the average rows per expert (the extension's
GROUPED_GEMM_SMALL_TILE_MAX_ROWS_PER_EXPERT); M1_GROUPED_GEMM_TILE=large|small forces one (for
benchmarking).

SwiGLU: with many rows per expert (the large tile) and no pre-activation to keep for a backward, the
gate projection runs first and the up projection's epilogue computes silu(gate) * up directly, so the
[M, 2F] pre-activation never makes a round trip through memory; otherwise one [M, 2F] GEMM and a
vectorised SwiGLU kernel. M1_GROUPED_GEMM_SWIGLU=fused|separate forces either (for benchmarking).
"""

import functools
import os

import torch

from m1_kernels.extension import cuda_extension, kernel_dtype, ptr, stream_of

TILES = ("auto", "large", "small")  # the extension's GroupedGemmTile members
TILE_ENV = "M1_GROUPED_GEMM_TILE"
SWIGLU_ENV = "M1_GROUPED_GEMM_SWIGLU"


def _env_choice(var, choices):
    name = os.environ.get(var, "auto")
    if name not in choices:
        raise ValueError(f"{var} must be one of {tuple(choices)}, got {name!r}")
    return name


def _tile_name():
    return _env_choice(TILE_ENV, TILES)


@functools.cache
def _workspace_bytes(num_experts: int, device_index: int) -> int:
    return cuda_extension().grouped_gemm_workspace_size(num_experts=num_experts, device=device_index)


def _workspace(num_experts, device):
    return torch.empty(_workspace_bytes(num_experts, device.index), dtype=torch.uint8, device=device)


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
    weight [E, K, N]); rows outside [offsets[0], offsets[E]) are zeros. `tile`: a GroupedGemmTile
    name (default: M1_GROUPED_GEMM_TILE, else "auto"). With gate ([M, N], "nk" only),
    y = silu(gate) * (x W_e^T) from the fused epilogue (large tile)."""
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
        ext.grouped_gemm(x=ptr(x), x_row_stride=x.stride(0), w=ptr(weight), w_expert_stride=weight.stride(0),
                         w_row_stride=weight.stride(1), gate=ptr(gate), y=ptr(y), offsets=ptr(offsets), num_rows=M,
                         n=N, k=K, num_experts=E, weight_k_major=weight_layout == "nk", dtype=kernel_dtype(x.dtype),
                         tile=getattr(ext.GroupedGemmTile, tile or _tile_name()), device=x.device.index,
                         workspace=ptr(workspace), workspace_bytes=workspace.numel(), stream=stream_of(x))
    return y


def grouped_gemm_weight_grad(x, dy, offsets, weight_layout):
    """dW_e = dy_e^T x_e ("nk", [E, N, K]) or x_e^T dy_e ("kn", [E, K, N]); zeros for empty experts."""
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
        ext.grouped_gemm_wgrad(p=ptr(p), p_row_stride=p.stride(0), q=ptr(q), q_row_stride=q.stride(0), out=ptr(dw),
                               offsets=ptr(offsets), num_rows=x.shape[0], r=R, c=C, num_experts=E,
                               dtype=kernel_dtype(x.dtype), device=x.device.index, workspace=ptr(workspace),
                               workspace_bytes=workspace.numel(), stream=stream_of(x))
    return dw


def swiglu(gate_up):
    """silu(gate_up[:, :F]) * gate_up[:, F:] as [M, F] (gate columns first), fp32 math."""
    ext = cuda_extension(gate_up.device)
    M, F2 = gate_up.shape
    F = F2 // 2
    _check_tma("gate_up", gate_up, ("F (half of gate_up.shape[1])", F), ("gate_up.stride(0)", gate_up.stride(0)))
    h = torch.empty(M, F, dtype=gate_up.dtype, device=gate_up.device)
    with _device_ctx(gate_up):
        ext.swiglu(gate_up=ptr(gate_up), in_row_stride=gate_up.stride(0), out=ptr(h), rows=M, f=F,
                   dtype=kernel_dtype(gate_up.dtype), stream=stream_of(gate_up))
    return h


def swiglu_backward(dh, gate_up):
    """[d_gate | d_up] [M, 2F] of h = silu(gate_up[:, :F]) * gate_up[:, F:] from dh [M, F], fp32 math."""
    ext = cuda_extension(dh.device)
    M, F = dh.shape
    _check_tma("dh", dh, ("F (dh.shape[1])", F), ("dh.stride(0)", dh.stride(0)))
    _check_tma("gate_up", gate_up, ("gate_up.stride(0)", gate_up.stride(0)))
    if dh.stride(0) != F:
        raise ValueError(f"dh must be contiguous for the cuda backend, got strides {dh.stride()}")
    if gate_up.shape != (M, 2 * F) or gate_up.dtype != dh.dtype:
        raise ValueError(f"gate_up must be [{M}, {2 * F}] {dh.dtype} like dh, got {list(gate_up.shape)} "
                         f"{gate_up.dtype}")
    out = torch.empty(M, 2 * F, dtype=dh.dtype, device=dh.device)
    with _device_ctx(dh):
        ext.swiglu_backward(dh=ptr(dh), gate_up=ptr(gate_up), in_row_stride=gate_up.stride(0), out=ptr(out), rows=M,
                            f=F, dtype=kernel_dtype(dh.dtype), stream=stream_of(dh))
    return out


def _fuse_swiglu(x, num_experts, store_preact):
    if store_preact:  # the backward needs [gate | up]
        return False
    choice = _env_choice(SWIGLU_ENV, ("auto", "fused", "separate"))
    if choice != "auto":
        return choice == "fused"
    tile = _tile_name()
    small_max = cuda_extension(x.device).GROUPED_GEMM_SMALL_TILE_MAX_ROWS_PER_EXPERT
    return tile == "large" or (tile == "auto" and x.shape[0] > small_max * num_experts)


def grouped_gemm_swiglu(x, gate_up_proj, offsets, store_preact):
    """(silu(x W_gate^T) * (x W_up^T) [M, F], [gate | up] [M, 2F] or an empty [0, 2F] tensor)."""
    F = gate_up_proj.shape[1] // 2
    if _fuse_swiglu(x, gate_up_proj.shape[0], store_preact):
        gate = grouped_gemm(x, gate_up_proj[:, :F], offsets, "nk", tile="large")
        h = grouped_gemm(x, gate_up_proj[:, F:], offsets, "nk", gate=gate)
        return h, x.new_empty(0, 2 * F)
    preact = grouped_gemm(x, gate_up_proj, offsets, "nk")
    h = swiglu(preact)
    return h, preact if store_preact else preact.new_empty(0, preact.shape[1])


def grouped_gemm_swiglu_backward(dy, down_proj, offsets, preact):
    """d[gate | up] from dy [M, H] through y = h down_e^T (down_proj [E, H, F]) and h = silu(gate) * up: the
    grouped GEMM, then one vectorised pass over dh and [gate | up] (with the elementwise part in fp32 PyTorch
    the whole took 8.2 ms at M1 shapes, where torch._grouped_mm's GEMM alone takes 2.9)."""
    return swiglu_backward(grouped_gemm(dy, down_proj, offsets, "kn"), preact)
