"""The "torch" backend of fused_logprobs: the same chunked algorithm as the Triton kernels in plain PyTorch (the
CPU path). Logits are computed in fp32 (hidden and a weight chunk converted to fp32) one vocabulary chunk at a
time, so the largest temporary is [N, chunk] rather than [N, V]; the backward pass recomputes each chunk.
Same interface as trainer.triton_logprobs.
"""

import torch

# Elements of one fp32 logits chunk [N, chunk] (64 MiB).
CHUNK_ELEMENTS = 1 << 24


def _chunk(N, V):
    return max(1, min(V, CHUNK_ELEMENTS // max(N, 1)))


def forward(hidden, weight, targets, with_entropy):
    N = hidden.shape[0]
    V = weight.shape[0]
    h = hidden.float()
    m = torch.full((N,), float("-inf"), dtype=torch.float32, device=hidden.device)
    s = torch.zeros_like(m)
    t = torch.zeros_like(m)
    z_target = torch.full_like(m, float("nan"))   # a target outside [0, V) stays NaN
    rows = torch.arange(N, device=hidden.device)
    step = _chunk(N, V)
    for c0 in range(0, V, step):
        z = h @ weight[c0:c0 + step].float().T
        new_m = torch.maximum(m, z.max(dim=1).values) if z.shape[1] else m
        alpha = torch.exp(m - new_m)
        e = torch.exp(z - new_m[:, None])
        s = s * alpha + e.sum(dim=1)
        if with_entropy:
            t = t * alpha + (e * z).sum(dim=1)
        m = new_m
        here = (targets >= c0) & (targets < c0 + z.shape[1])
        z_target = torch.where(here, z[rows, (targets - c0).clamp(0, z.shape[1] - 1)], z_target)
    lse = m + torch.log(s)
    entropy = lse - t / s if with_entropy else lse.new_empty(0)
    return z_target - lse, entropy, lse


def backward(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, need_dh, need_dw):
    N = hidden.shape[0]
    V = weight.shape[0]
    h = hidden.float()
    dh = torch.zeros_like(h) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    rows = torch.arange(N, device=hidden.device)
    step = _chunk(N, V)
    for c0 in range(0, V, step):
        w = weight[c0:c0 + step].float()
        z = h @ w.T
        p = torch.exp(z - lse[:, None])
        dz = -p * grad_logp[:, None]
        here = (targets >= c0) & (targets < c0 + z.shape[1])
        dz[rows[here], targets[here] - c0] += grad_logp[here]
        if grad_entropy is not None:
            dz -= grad_entropy[:, None] * p * (z - lse[:, None] + entropy[:, None])
        if need_dh:
            dh += dz @ w
        if need_dw:
            dw[c0:c0 + step] = (dz.T @ h).to(weight.dtype)
    return (dh.to(hidden.dtype) if need_dh else None), dw
