"""Mixture-of-Experts as per-expert loops (docs/moe.md): the layer, the grouped GEMM and its weight
gradient, the weighted combine.

Router: logits = x @ gate^T in float32 (or the input's dtype when that is wider), softmax, top-k,
renormalise the k weights to sum to 1. Expert e: w2(silu(w1 x) * w3 x) with
gate_up_proj[e] = [w1; w3] ([2F, H], gate rows first) and down_proj[e] = w2 ([H, F]).

Every function computes in the dtype of its first argument; expert weights are converted one expert
at a time, so a float64 reference at M1 width holds only the experts in use in float64.
"""

import torch
import torch.nn.functional as F


def route(x, gate_weight, top_k, renormalize=True):
    """Returns (weights [N, k] in the router dtype, expert ids [N, k] int64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    probs = torch.softmax(x.to(dtype) @ gate_weight.to(dtype).T, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert(x, gate_up, down):
    """SwiGLU expert: gate_up [2F, H] (gate rows first), down [H, F]."""
    gate, up = (x @ gate_up.to(x.dtype).T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.to(x.dtype).T


def moe(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize=True):
    """x [N, H] -> [N, H]: sum_k weight_k * expert_{e_k}(x), one expert at a time."""
    weights, ids = route(x, gate_weight, top_k, renormalize)
    out = torch.zeros_like(x)
    for e in range(gate_up_proj.shape[0]):
        rows, slot = torch.nonzero(ids == e, as_tuple=True)
        if rows.numel():
            y = expert(x[rows], gate_up_proj[e], down_proj[e])
            out.index_add_(0, rows, (weights[rows, slot, None].to(x.dtype) * y))
    return out


def _segments(offsets):
    bounds = offsets.tolist()
    return list(enumerate(zip(bounds[:-1], bounds[1:])))


def grouped_gemm(x, weight, offsets, weight_layout="nk"):
    """y [M, N]: rows offsets[e]:offsets[e+1] of x times weight[e]^T ("nk", weight [E, N, K]) or
    weight[e] ("kn", weight [E, K, N]); rows outside [offsets[0], offsets[E]) are zeros."""
    N = weight.shape[1] if weight_layout == "nk" else weight.shape[2]
    bounds = offsets.tolist()
    parts = [x.new_zeros(bounds[0], N)]
    for e, (a, b) in _segments(offsets):
        w = weight[e].to(x.dtype)
        parts.append(x[a:b] @ (w.T if weight_layout == "nk" else w))
    parts.append(x.new_zeros(x.shape[0] - bounds[-1], N))
    return torch.cat(parts)


def grouped_gemm_weight_grad(x, dy, offsets, weight_layout="nk"):
    """dW_e = dy_e^T x_e ("nk", [E, N, K]) or x_e^T dy_e ("kn", [E, K, N]) over the rows of expert e;
    zeros for an expert without rows."""
    grads = [dy[a:b].T @ x[a:b] if weight_layout == "nk" else x[a:b].T @ dy[a:b] for _, (a, b) in _segments(offsets)]
    return torch.stack(grads)


def expert_mlp(x_sorted, gate_up_proj, down_proj, offsets):
    """The SwiGLU expert of each expert-sorted row: rows offsets[e]:offsets[e+1] go through expert e."""
    parts = [expert(x_sorted[a:b], gate_up_proj[e], down_proj[e]) for e, (a, b) in _segments(offsets)]
    return torch.cat(parts) if parts else x_sorted.new_zeros(0, down_proj.shape[1])


def unpermute(y_sorted, sorted_idx, weights):
    """out[t] = sum_j weights[t, j] * y_sorted[p] where sorted_idx[p] = t * k + j, one slot at a time."""
    N, k = weights.shape
    row_of_entry = torch.empty_like(sorted_idx, dtype=torch.long)
    row_of_entry[sorted_idx.long()] = torch.arange(sorted_idx.numel(), device=sorted_idx.device)
    rows = row_of_entry.view(N, k)
    out = torch.zeros(N, y_sorted.shape[1], dtype=y_sorted.dtype, device=y_sorted.device)
    for j in range(k):
        out = out + weights[:, j, None].to(y_sorted.dtype) * y_sorted[rows[:, j]]
    return out
