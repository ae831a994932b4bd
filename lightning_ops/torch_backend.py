"""The "torch" backend: lightning attention in vectorised PyTorch (runs anywhere; the CPU path).

Plain differentiable PyTorch: autograd and torch.compile trace straight through it, so unlike the
kernel backends it needs no torch.library op or hand-written backward.

Chunked form, all chunks at once: intra-chunk masked attention and per-chunk key-value sums are
batched matmuls over every chunk; only the carry of the state from chunk to chunk is a loop (T / C
steps of one small multiply-add). Arithmetic is float32 whatever the input dtype.
"""

import torch

CHUNK = 64


def _forward_one(q, k, v, slope, scale, h0):
    """One sequence batch: q/k [B, T, H, D], v [B, T, H, Dv], h0 [B, H, D, Dv] or None."""
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    dt = torch.float32
    state = (torch.zeros(B, H, D, Dv, dtype=dt, device=q.device) if h0 is None else h0.to(dt))
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), state
    C = min(CHUNK, T)
    n = -(-T // C)
    pad = n * C - T
    # [B, H, n, C, D]; zero padding at the end adds nothing to any sum.
    q_, k_, v_ = (torch.nn.functional.pad(x.to(dt).transpose(1, 2), (0, 0, 0, pad)).unflatten(2, (n, C))
                  for x in (q, k, v))
    s = slope.to(dt)[None, :, None, None, None]                               # [1, H, 1, 1, 1]
    i = torch.arange(C, device=q.device, dtype=dt)
    lengths = torch.full((n,), C, device=q.device, dtype=dt)
    lengths[-1] = T - (n - 1) * C
    dist = i[:, None] - i[None, :]
    intra_mask = torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), 0.0)     # [1, H, 1, C, C]
    q_decay = torch.exp(-s * (i[:, None] + 1))                                       # [1, H, 1, C, 1]
    k_exp = lengths[:, None, None] - 1 - i[None, :, None]                            # [n, C, 1]
    k_decay = torch.where(k_exp >= 0, torch.exp(-s * k_exp.clamp(min=0)), 0.0)       # [1, H, n, C, 1]
    chunk_decay = torch.exp(-slope.to(dt)[None, :, None] * lengths[None, None, :])   # [1, H, n]

    o = ((q_ @ k_.transpose(-1, -2)) * intra_mask) @ v_
    kv = (k_ * k_decay).transpose(-1, -2) @ v_                                        # [B, H, n, D, Dv]
    starts = []
    for c in range(n):
        starts.append(state)
        state = chunk_decay[:, :, c, None, None] * state + kv[:, :, c]
    o = o + (q_ * q_decay) @ torch.stack(starts, dim=2)
    o = (scale * o).flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), state


def lightning_fwd(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state=True):
    """Returns (o like v, final states [N, H, D, Dv] float32). The final state costs nothing extra here,
    so it is returned whatever `output_final_state` says (the op drops it when not asked for)."""
    if cu_seqlens is None:
        return _forward_one(q, k, v, slope, scale, initial_state)
    bounds = cu_seqlens.tolist()  # the torch backend may read lengths on the host
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, final = _forward_one(q[:, a:b], k[:, a:b], v[:, a:b], slope, scale, h0)
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(v.shape)
    H, D, Dv = q.shape[2], q.shape[3], v.shape[3]
    final = torch.cat(finals) if finals else q.new_zeros(0, H, D, Dv, dtype=torch.float32)
    return o, final


def lightning_fwd_with_cache(q, k, v, slope, state, slot_idx, cu_seqlens, scale):
    """Prefill from a slot cache, updating it in place: rows with a negative slot (padding) give zero
    output, rows with a slot >= S give NaN; neither touches the cache."""
    valid = (slot_idx >= 0) & (slot_idx < state.shape[0])
    idx = torch.where(valid, slot_idx, 0).long()
    old = state[idx]
    h0 = torch.where(valid[:, None, None, None], old, 0.0)
    o, final = lightning_fwd(q, k, v, slope, h0, cu_seqlens, scale)
    state.index_put_((idx,), torch.where(valid[:, None, None, None], final - old, 0.0), accumulate=True)
    fill = torch.where(slot_idx < 0, 0.0, float("nan")).to(o.dtype)
    if cu_seqlens is None:
        keep, fill = valid[:, None, None, None], fill[:, None, None, None]
    else:  # the sequence of each packed token
        seq = torch.searchsorted(cu_seqlens[1:], torch.arange(q.shape[1], device=q.device), right=True)
        keep, fill = valid[seq][None, :, None, None], fill[seq][None, :, None, None]
    return torch.where(keep, o, fill)


def lightning_decode(q, k, v, slope, state, slot_idx, scale):
    """In-place state update without host sync: rows with a negative slot add a zero delta to slot 0.
    A rate that is negative or not finite (not checked on the host on CUDA) makes its head's output and
    state NaN, as in the kernels."""
    valid = slot_idx >= 0
    idx = torch.where(valid, slot_idx, 0).long()
    old = state[idx]                                                                  # [B, H, D, Dv]
    rate = slope.float()
    decay = torch.where(torch.isfinite(rate) & (rate >= 0), torch.exp(-rate), float("nan"))[None, :, None, None]
    kv = k.float()[..., :, None] * v.float()[..., None, :]
    new = decay * old + kv
    delta = torch.where(valid[:, None, None, None], new - old, 0.0)
    state.index_put_((idx,), delta, accumulate=True)
    o = scale * torch.einsum("bhd,bhde->bhe", q.float(), new)
    return torch.where(valid[:, None, None], o, 0.0).to(q.dtype)
