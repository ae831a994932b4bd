"""The "torch" backend: MoE in vectorised PyTorch (runs anywhere; the CPU path).

Plain differentiable PyTorch: autograd and torch.compile trace straight through it, so it needs no
torch.library op or hand-written backward. Permutation is a stable sort of the flat expert ids;
offsets come from `searchsorted` on the device (no host sync). The grouped GEMMs use
`torch._grouped_mm` where it runs (CUDA bf16 with 16-byte aligned rows); elsewhere they loop over the
experts, which reads the offsets on the host.
"""

import torch
import torch.nn.functional as F

LAYOUTS = ("nk", "kn")


def route(x, gate_weight, top_k, renormalize):
    """fp32 logits and softmax, top-k, optional renormalisation -> (weights fp32, ids int32)."""
    probs = torch.softmax(x.float() @ gate_weight.float().T, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def permute(x, expert_ids, num_experts):
    """Stable expert-contiguous order of the flat (token * k + slot) entries."""
    flat = expert_ids.reshape(-1).long()
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=x.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    x_sorted = x[order // expert_ids.shape[1]]
    return x_sorted, order.to(torch.int32), offsets


def _grouped_mm_runs(x, w_kn):
    """torch._grouped_mm needs CUDA bf16 and rows whose byte strides are multiples of 16."""
    K, N = w_kn.shape[1], w_kn.shape[2]
    return (x.is_cuda and x.dtype == torch.bfloat16 and w_kn.dtype == torch.bfloat16 and x.shape[0] > 0
            and K % 8 == 0 and N % 8 == 0)


def grouped_gemm(x, weight, offsets, weight_layout):
    """y[offsets[e]:offsets[e+1]] = x[same rows] @ W_e, W_e = weight[e].T ("nk") or weight[e] ("kn")."""
    w_kn = weight.transpose(1, 2) if weight_layout == "nk" else weight
    if _grouped_mm_runs(x, w_kn):
        y = torch._grouped_mm(x.contiguous(), w_kn, offs=offsets[1:])
        if y.requires_grad:  # its backward rejects the broadcast (stride-0) gradients of .sum()
            y.register_hook(torch.Tensor.contiguous)
        return y
    bounds = offsets.tolist()
    parts = [x[a:b] @ w_kn[e] for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    if not parts:
        return x.new_zeros(x.shape[0], w_kn.shape[2])
    return torch.cat(parts)


def unpermute(y_sorted, sorted_idx, weights, top_k):
    """out[t] = sum_j weights[t, j] * y_sorted[row of entry t * k + j] (weights None: the plain sum),
    summed in fp32 in slot order."""
    N = sorted_idx.numel() // top_k
    inverse = torch.argsort(sorted_idx.long())
    gathered = y_sorted[inverse].view(N, top_k, y_sorted.shape[1]).float()
    if weights is not None:
        gathered = gathered * weights.float()[..., None]
    return gathered.sum(dim=1).to(y_sorted.dtype)


def swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize):
    weights, ids = route(x, gate_weight, top_k, renormalize)
    x_sorted, sorted_idx, offsets = permute(x, ids, gate_weight.shape[0])
    h = swiglu(grouped_gemm(x_sorted, gate_up_proj, offsets, "nk"))
    y_sorted = grouped_gemm(h, down_proj, offsets, "nk")
    return unpermute(y_sorted, sorted_idx, weights, top_k).to(x.dtype)
