"""The engine's sampler in one Triton pass over the logits (semantics and hash: model/sampling.py).

Each row is cut into pieces of PIECE columns, one program each: a program walks its piece once for the
Gumbel race (or the plain argmax for greedy rows), the winner's raw logit and an online log-sum-exp.
A second kernel, one program per row, merges the pieces in column order (the earliest maximum wins, as
torch.argmax). A program per whole row left a decode step at B = 1 waiting about a millisecond on one SM
walking 200064 columns (bench/NOTES.md, session 8).
"""

import torch
import triton
import triton.language as tl


BLOCK = 2048
PIECE = 4 * BLOCK      # columns per program: 25 programs per row at M1's vocabulary


@triton.jit
def _mix32(x):
    """lowbias32 on uint64 lanes holding uint32 values (products stay below 2^64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _sample_kernel(logits_ptr, stride_row, rows_ptr, inv_temp_ptr, floor_ptr, keys_ptr, part_ptr, V,
                   PIECE: tl.constexpr, BLOCK: tl.constexpr):
    """Piece p of row r: part[r, p] = (max, sum of exp(x - max), best score, its column, its raw logit)."""
    r = tl.program_id(0)
    p = tl.program_id(1)
    pieces = tl.num_programs(1)
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
    for start in range(p * PIECE, p * PIECE + PIECE, BLOCK):
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
    part = part_ptr + (r * pieces + p) * 5
    tl.store(part, m)
    tl.store(part + 1, s)
    tl.store(part + 2, best)
    tl.store(part + 3, best_idx.to(tl.float32))     # exact: columns < 2^24
    tl.store(part + 4, best_logit)


@triton.jit
def _merge_kernel(part_ptr, tokens_ptr, logprobs_ptr, PIECES: tl.constexpr, PIECES_POW2: tl.constexpr):
    r = tl.program_id(0)
    i = tl.arange(0, PIECES_POW2)
    ok = i < PIECES
    part = part_ptr + (r * PIECES + i) * 5
    m = tl.load(part, mask=ok, other=float("-inf"))
    s = tl.load(part + 1, mask=ok, other=0.0)
    best = tl.load(part + 2, mask=ok, other=float("-inf"))
    top = tl.max(m, 0)
    total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - top), 0.0), 0)
    winner = tl.argmax(best, 0)                        # the first piece holding the maximum: the earliest column
    pick = i == winner
    token = tl.sum(tl.where(pick, tl.load(part + 3, mask=ok, other=0.0), 0.0), 0)
    logit = tl.sum(tl.where(pick, tl.load(part + 4, mask=ok, other=0.0), 0.0), 0)
    tl.store(tokens_ptr + r, token.to(tl.int64))
    tl.store(logprobs_ptr + r, logit - top - tl.log(total))


def sample_triton(logits, rows, inv_temp, floor, keys):
    """Same contract as sampling.sample_torch: logits [*, V] fp32 (rows contiguous), rows [R] int64,
    inv_temp [R] fp32, floor [R] fp32, keys [R] int64 -> tokens [R] int64, logprobs [R] fp32."""
    R, V = rows.shape[0], logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(R, dtype=torch.int64, device=logits.device)
    logprobs = torch.full((R,), float("nan"), dtype=torch.float32, device=logits.device)
    if R:   # the per-row vectors are read as contiguous arrays
        pieces = triton.cdiv(V, PIECE)
        part = torch.empty(R, pieces, 5, dtype=torch.float32, device=logits.device)
        _sample_kernel[(R, pieces)](logits, logits.stride(0), rows.contiguous(), inv_temp.float().contiguous(),
                                    floor.float().contiguous(), keys.contiguous(), part, V, PIECE=PIECE,
                                    BLOCK=BLOCK, num_warps=8)
        _merge_kernel[(R,)](part, tokens, logprobs, PIECES=pieces, PIECES_POW2=triton.next_power_of_2(pieces))
    return tokens, logprobs
