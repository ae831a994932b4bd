"""Permutation kernels: expert histogram, offsets, stable scatter, row gathers and the weighted combine.

The flat entries i = token * k + slot are cut into blocks. `count_kernel` histograms each block,
`scan_kernel` turns the per-block counts into each block's first rank inside every expert (one program
per expert, a running prefix over blocks), and `scatter_kernel` places every entry at
offsets[e] + (entries of expert e in earlier blocks) + (entries of e earlier in its block): a stable
counting sort with no atomics and no host synchronisation.
"""

import triton
import triton.language as tl


@triton.jit
def count_kernel(ids_ptr, block_counts_ptr, NK, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + i, mask=i < NK, other=-1)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(block_counts_ptr + pid * E + experts, counts, mask=experts < E)


@triton.jit
def scan_kernel(block_counts_ptr, block_base_ptr, totals_ptr, NB, E, BLOCK_B: tl.constexpr):
    e = tl.program_id(0)
    running = tl.zeros((), dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        counts = tl.load(block_counts_ptr + bs * E + e, mask=bs < NB, other=0)
        tl.store(block_base_ptr + bs * E + e, running + tl.cumsum(counts, axis=0) - counts, mask=bs < NB)
        running += tl.sum(counts, axis=0)
    tl.store(totals_ptr + e, running)


@triton.jit
def scatter_kernel(ids_ptr, block_base_ptr, totals_ptr, sorted_idx_ptr, offsets_ptr, NK, E,
                   BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    totals = tl.load(totals_ptr + experts, mask=experts < E, other=0)
    ends = tl.cumsum(totals, axis=0)
    if pid == 0:
        tl.store(offsets_ptr + 1 + experts, ends, mask=experts < E)
        tl.store(offsets_ptr, 0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + i, mask=i < NK, other=-1)
    # Ids outside [0, E) (not checked on the device) match no expert and are not placed.
    valid = (i < NK) & (e >= 0) & (e < E)
    onehot = (e[:, None] == experts[None, :]).to(tl.int32)
    rank_in_block = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    expert_start = tl.sum(onehot * (ends - totals)[None, :], axis=1)
    block_base = tl.load(block_base_ptr + pid * E + e, mask=valid, other=0)
    tl.store(sorted_idx_ptr + expert_start + block_base + rank_in_block, i, mask=valid)


@triton.jit
def gather_rows_kernel(src_ptr, sorted_idx_ptr, row_scale_ptr, out_ptr, M, H, stride_src, stride_out,
                       TOP_K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """out[p] = src[sorted_idx[p] // k] (times row_scale[sorted_idx[p]] when given)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < M
    entry = tl.load(sorted_idx_ptr + rows, mask=row_mask, other=0)
    mask = row_mask[:, None] & (hs[None, :] < H)
    vals = tl.load(src_ptr + (entry // TOP_K)[:, None].to(tl.int64) * stride_src + hs[None, :], mask=mask)
    if HAS_SCALE:
        scale = tl.load(row_scale_ptr + entry, mask=row_mask, other=0.0)
        vals = vals.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + hs[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def invert_kernel(sorted_idx_ptr, inverse_ptr, M, BLOCK: tl.constexpr):
    """inverse[sorted_idx[p]] = p: a permutation, so every write has its own address."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    entry = tl.load(sorted_idx_ptr + p, mask=p < M, other=0)
    tl.store(inverse_ptr + entry, p, mask=p < M)


@triton.jit
def combine_kernel(y_ptr, inverse_ptr, weights_ptr, out_ptr, N, H, stride_y, stride_out,
                   TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_j w[t, j] * y[inverse[t * k + j]], in fp32, slots in order: deterministic."""
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < N
    mask = token_mask[:, None] & (hs[None, :] < H)
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(inverse_ptr + tokens * TOP_K + j, mask=token_mask, other=0)
        y = tl.load(y_ptr + row[:, None].to(tl.int64) * stride_y + hs[None, :], mask=mask, other=0.0)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + tokens * TOP_K + j, mask=token_mask, other=0.0)
            acc += y.to(tl.float32) * w[:, None]
        else:
            acc += y.to(tl.float32)
    tl.store(out_ptr + tokens[:, None].to(tl.int64) * stride_out + hs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def combine_weight_grad_kernel(dout_ptr, y_ptr, inverse_ptr, dweights_ptr, N, H, stride_dout, stride_y,
                               TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """dweights[t, j] = <dout[t], y[inverse[t * k + j]]> in fp32."""
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_mask = tokens < N
    for j in tl.static_range(TOP_K):
        row = tl.load(inverse_ptr + tokens * TOP_K + j, mask=token_mask, other=0)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            mask = token_mask[:, None] & (hs[None, :] < H)
            d = tl.load(dout_ptr + tokens[:, None].to(tl.int64) * stride_dout + hs[None, :], mask=mask, other=0.0)
            y = tl.load(y_ptr + row[:, None].to(tl.int64) * stride_y + hs[None, :], mask=mask, other=0.0)
            acc += tl.sum(d.to(tl.float32) * y.to(tl.float32), axis=1)
        tl.store(dweights_ptr + tokens * TOP_K + j, acc, mask=token_mask)
