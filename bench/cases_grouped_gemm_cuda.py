"""MoE expert GEMM pair + SwiGLU on the CUDA (CUTLASS sm90a) grouped GEMM, MiniMax-M1 shapes.

    h = silu(x W_gate_e^T) * (x W_up_e^T)      gate_up_proj [E, 2F, H]
    y = h W_down_e^T                           down_proj    [E, H, F]

over expert-sorted rows (the shapes of M1Config.preset("minimax-m1"): E32 top-2, H6144, F9216; 64 and
8192 tokens). The routing is a seeded random softmax top-2, so expert sizes are ragged as in a real
model, and it is fixed per case so that the floor can count exactly the weights of the experts that
receive rows. Peer: torch._grouped_mm for both GEMMs with PyTorch's SwiGLU between them (the anchor
figures of docs/benchmarks.md). At 64 tokens the rows "ours[cuda] tile=large|small" force each compiled
tile, to check the automatic choice; at 8192 tokens "ours[cuda] swiglu=separate" times the unfused path
([M, 2F] GEMM, SwiGLU kernel) against the default (gate GEMM, then the up GEMM with SwiGLU in its
epilogue).

Floor: max(FLOPs / matmul rate, bytes / copy bandwidth), with FLOPs = 6 M H F (M = tokens * top_k)
and bytes = the active experts' weights plus x read and y written once (h can stay on chip).
"""

import torch

from .cases_moe import m1_moe_shape
from .harness import Case


def _routing(tokens, E, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randn(tokens, E, generator=g).topk(top_k, dim=1).indices
    counts = torch.bincount(ids.flatten(), minlength=E)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)


def _torch_grouped_mm_pair(inputs):
    x, gate_up, down, offsets = inputs
    ends = offsets[1:]
    F = down.shape[2]
    pre = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=ends)
    h = torch.nn.functional.silu(pre[:, :F]) * pre[:, F:]
    return torch._grouped_mm(h, down.transpose(1, 2), offs=ends)


def gemm_pair_case(device, tokens, E, top_k, H, F, dtype=torch.bfloat16):
    from m1_kernels.extension import cuda_extension
    from m1_kernels.moe_ops import cuda_backend, ops

    offsets_host = _routing(tokens, E, top_k, seed=tokens)
    M = tokens * top_k
    active = int((offsets_host[1:] > offsets_host[:-1]).sum())

    def make():
        x = torch.randn(M, H, device=device, dtype=dtype)
        gate_up = torch.randn(E, 2 * F, H, device=device, dtype=dtype) * H ** -0.5
        down = torch.randn(E, H, F, device=device, dtype=dtype) * F ** -0.5
        return x, gate_up, down, offsets_host.to(device)

    def pair(tile):
        return lambda i: cuda_backend.grouped_gemm(
            cuda_backend.swiglu(cuda_backend.grouped_gemm(i[0], i[1], i[3], "nk", tile=tile)), i[2], i[3], "nk",
            tile=tile)

    impls = {"ours[cuda]": lambda i: ops._expert_mlp(i[0], i[1], i[2], i[3], False, "cuda")[0]}
    if M > cuda_extension(device).GROUPED_GEMM_SMALL_TILE_MAX_ROWS_PER_EXPERT * E:  # the auto path fuses SwiGLU
        impls["ours[cuda] swiglu=separate"] = pair(None)
    else:
        impls.update({f"ours[cuda] tile={tile}": pair(tile) for tile in ("large", "small")})
    if hasattr(torch, "_grouped_mm"):
        impls["torch._grouped_mm"] = _torch_grouped_mm_pair
    elem = torch.finfo(dtype).bits // 8
    weight_bytes = active * 3 * F * H * elem
    return Case("moe gemm pair (cuda)", f"E{E} top{top_k} H{H} F{F} tokens{tokens}", make, impls,
                bytes=weight_bytes + 2 * M * H * elem, flops=6.0 * M * H * F, max_sets=1,
                params=dict(tokens=tokens, E=E, top_k=top_k, H=H, F=F, active_experts=active))


def cases(device):
    from m1_kernels.extension import cuda_extension_error

    if device.type != "cuda" or cuda_extension_error(device) is not None:
        return []  # the CUDA backend has nothing to time without a GPU and the built extension
    return [gemm_pair_case(device, tokens, **m1_moe_shape()) for tokens in (64, 8192)]
