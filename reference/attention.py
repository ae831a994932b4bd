"""Softmax attention with grouped KV heads and partial rotary embedding (MiniMax-M1's softmax layers).

RoPE is the rotate-half form applied to the first `rotary_dim` dims of each head; the rest pass through.
"""

import torch


def rotary_cos_sin(positions, rotary_dim, theta, dtype=torch.float64):
    """cos/sin [T, rotary_dim] for integer positions [T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rotary(x, positions, rotary_dim, theta):
    """x [B, T, H, D]: rotate the first rotary_dim dims (rotate-half), keep the rest."""
    cos, sin = rotary_cos_sin(positions, rotary_dim, theta, dtype=x.dtype)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def softmax_attention(q, k, v, scale=None, causal=True):
    """q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D] with Hq a multiple of Hkv. Causal alignment puts the
    queries at the end of the keys (query i sees keys up to Tk - Tq + i), as in decode with a cache."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = D ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        qi = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        ki = torch.arange(Tk, device=q.device)[None, :]
        scores = scores.masked_fill(ki > qi, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def gather_paged(pages, page_ids, length):
    """A paged cache [P, Hkv, page_size, D] -> the first `length` rows [length, Hkv, D] of the sequence
    whose pages are `page_ids` in order (row t is in page page_ids[t // page_size], offset t % page_size)."""
    page_size = pages.shape[2]
    used = [int(p) for p in page_ids[: -(-length // page_size)]]
    rows = [pages[p].transpose(0, 1) for p in used]
    return torch.cat(rows)[:length] if rows else pages.new_zeros(0, pages.shape[1], pages.shape[3])
