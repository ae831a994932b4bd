"""The engine's sampler in one Triton pass per row (semantics and hash: model/sampling.py).

One program per row walks the row's logits once: the Gumbel race (or the plain argmax for greedy
rows), the chosen token's raw logit and an online log-sum-exp, so the token and its log-probability
cost one read of the logits.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    """lowbias32 on uint64 lanes holding uint32 values (products stay below 2^64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _sample_kernel(logits_ptr, stride_row, rows_ptr, inv_temp_ptr, floor_ptr, keys_ptr, tokens_ptr, logprobs_ptr,
                   V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    src = tl.load(rows_ptr + r).to(tl.int64)
    inv_t = tl.load(inv_temp_ptr + r)
    floor = tl.load(floor_ptr + r)
    key = tl.load(keys_ptr + r).to(tl.uint64)
    row = logits_ptr + src * stride_row
    m = tl.full((), float("-inf"), tl.float32)        # running max and sum of exp of the raw logits
    s = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int64)
    best_logit = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < V
        x = tl.load(row + offs, mask=inside, other=float("-inf"))
        new_m = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
        m = new_m
        key_v = (_mix32(offs.to(tl.uint64) ^ key) + key) & 0xFFFFFFFF
        u = ((_mix32(key_v) >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        scaled = tl.where(inside, x, 0.0) * inv_t     # (masked lanes: no -inf * 0)
        race = tl.where(scaled >= floor, scaled - tl.log(-tl.log(u)), float("-inf"))
        score = tl.where(inside, tl.where(inv_t > 0, race, x), float("-inf"))
        block_best = tl.max(score, 0)
        block_idx = tl.argmax(score, 0)
        take = block_best > best                      # strict: the earliest maximum wins, as torch.argmax
        best_idx = tl.where(take, start + block_idx, best_idx)
        best_logit = tl.where(take, tl.sum(tl.where(offs == start + block_idx, x, 0.0), 0), best_logit)
        best = tl.where(take, block_best, best)
    tl.store(tokens_ptr + r, best_idx)
    tl.store(logprobs_ptr + r, best_logit - m - tl.log(s))


def sample_triton(logits, rows, inv_temp, floor, keys):
    """Same contract as sampling.sample_torch: logits [*, V] fp32 (rows contiguous), rows [R] int64,
    inv_temp [R] fp32, floor [R] fp32, keys [R] int64 -> tokens [R] int64, logprobs [R] fp32."""
    R, V = rows.shape[0], logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(R, dtype=torch.int64, device=logits.device)
    logprobs = torch.full((R,), float("nan"), dtype=torch.float32, device=logits.device)
    if R:   # the per-row vectors are read as contiguous arrays
        _sample_kernel[(R,)](logits, logits.stride(0), rows.contiguous(), inv_temp.float().contiguous(),
                             floor.float().contiguous(), keys.contiguous(), tokens, logprobs, V, BLOCK=2048,
                             num_warps=8)
    return tokens, logprobs
