"""Mixture-of-Experts as a per-expert loop (docs/moe.md).

Router: logits = x @ gate^T in float32 (or the input's dtype when that is wider), softmax, top-k,
renormalise the k weights to sum to 1. Expert e: w2(silu(w1 x) * w3 x) with
gate_up_proj[e] = [w1; w3] ([2F, H], gate rows first) and down_proj[e] = w2 ([H, F]).
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
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down.T


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
