"""Few-token MoE (decode): each chosen expert's weights streamed once, its rows held in registers.

With a handful of tokens the layer is a weight read: at M1 width one token reads two experts'
3 x 6144 x 9216 bf16 weights (0.68 GB) for 0.1 GFLOP of work. The grouped GEMM's tile table, sized for
thousands of rows, leaves most of the GPU idle here. These kernels instead give every (chosen expert,
output tile) its own program, which loops over the reduction dimension streaming weight tiles while
all of that expert's rows (at most one per token, so at most N <= 64) sit in one register tile
(`tl.dot` pads them to 16). Nothing is read back to the host: the grid is sized for the worst case,
S = min(E, N * k) experts, and the programs of slots past the experts actually chosen exit at once.

    router_logits_kernel  (hidden slice): partial fp32 logits x[:, slice] @ gate[:, slice]^T, so the
                          router weight is read by many SMs rather than one
    route_plan_kernel     one program: the partial logits summed in slice order (deterministic),
                          softmax / top-k / renormalise as moe_ops.route, then a stable counting sort
                          of the N*k (token, slot) entries by expert (sorted_idx, offsets, as
                          moe_ops.permute) and the chosen experts in order (active[s] = the s-th
                          expert with rows, -1 past the last)
    gate_up_kernel        (slot, F tile): h[rows of e] = silu(x W_gate_e^T) * (x W_up_e^T), x rows
                          gathered from the tokens directly (no permuted copy of x)
    down_kernel           (slot, H tile): ys[entry] = weight[entry] * (h[rows of e] W_down_e^T), fp32,
                          written at each row's (token, slot) entry
    slot_sum_kernel       out[t] = sum_j ys[t * k + j] in slot order, cast to x's dtype (deterministic:
                          no atomics)

Programs are numbered with the output tile fastest, so every chosen expert's programs launch before
any of the idle slots'.
"""

import triton
import triton.language as tl

from m1_kernels.dispatch import autotune_prune

from .grouped_gemm import INTERPRETED
from .routing import router_logits, softmax_top_k


@triton.jit
def router_logits_kernel(x_ptr, gate_ptr, partial_ptr, N, H, E, SLICE, stride_xn, stride_ge,
                         EXACT_16BIT_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    """partial[s] [BLOCK_N, BLOCK_E] = x[:, s*SLICE:(s+1)*SLICE] @ gate[:, same]^T in fp32."""
    s = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)
    experts = tl.arange(0, BLOCK_E)
    logits = router_logits(x_ptr, gate_ptr, rows, rows < N, experts, experts < E, s * SLICE,
                           tl.minimum(H, (s + 1) * SLICE), stride_xn, 1, stride_ge, 1, EXACT_16BIT_DOT, BLOCK_N,
                           BLOCK_E, BLOCK_H)
    tl.store(partial_ptr + s * BLOCK_N * BLOCK_E + rows[:, None] * BLOCK_E + experts[None, :], logits)


@triton.jit
def route_plan_kernel(partial_ptr, weights_ptr, ids_ptr, sorted_idx_ptr, offsets_ptr, active_ptr, N, E, S,
                      NUM_SLICES, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    rows = tl.arange(0, BLOCK_N)
    experts = tl.arange(0, BLOCK_E)
    logits = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for s in range(0, NUM_SLICES):
        logits += tl.load(partial_ptr + s * BLOCK_N * BLOCK_E + rows[:, None] * BLOCK_E + experts[None, :])
    top_w, top_id = softmax_top_k(logits, experts < E, experts, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K)
    slots = tl.arange(0, BLOCK_K)
    valid = (rows < N)[:, None] & (slots < TOP_K)[None, :]
    entry = rows[:, None] * TOP_K + slots[None, :]
    tl.store(weights_ptr + entry, top_w, mask=valid)
    tl.store(ids_ptr + entry, top_id, mask=valid)

    # Stable counting sort of the entries (token-major, as their index t * k + j) by expert.
    e = tl.reshape(tl.where(valid, top_id, -1), (BLOCK_N * BLOCK_K,))
    entry = tl.reshape(entry, (BLOCK_N * BLOCK_K,))
    onehot = (e[:, None] == experts[None, :]).to(tl.int32)
    counts = tl.sum(onehot, axis=0)
    ends = tl.cumsum(counts, axis=0)
    tl.store(offsets_ptr + 1 + experts, ends, mask=experts < E)
    tl.store(offsets_ptr, 0)
    rank = tl.sum((tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
    pos = tl.sum(onehot * (ends - counts)[None, :], axis=1) + rank
    tl.store(sorted_idx_ptr + pos, entry, mask=e >= 0)
    used = (counts > 0) & (experts < E)
    slot = tl.cumsum(used.to(tl.int32), axis=0) - 1
    tl.store(active_ptr + slot, experts, mask=used)
    ss = tl.arange(0, BLOCK_S)
    tl.store(active_ptr + ss, tl.full((BLOCK_S,), -1, tl.int32),
             mask=(ss >= tl.sum(used.to(tl.int32), axis=0)) & (ss < S))


def _configs(interpreted, tile_name):
    if interpreted:  # one small config: the interpreter runs every element
        return [triton.Config({tile_name: 16, "BLOCK_K": 32}, num_warps=4)]
    # Narrow output tiles give thousands of programs (the weight stream needs every SM busy, with no
    # tail wave of a few programs); long K tiles give 16-byte loads of 256-512 contiguous bytes; the
    # last two fit two or three programs per SM (the others one, with deeper pipelines).
    shapes = [(32, 256, 4, 4), (16, 256, 4, 5), (64, 128, 4, 4), (32, 128, 4, 6), (16, 512, 4, 3), (64, 256, 8, 3),
              (16, 256, 4, 3), (32, 128, 4, 3)]
    return [triton.Config({tile_name: n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in shapes]


def _prune(tiles_per_weight_row):
    """Drop configs whose pipeline stages exceed shared memory: per stage the rows' tile and
    `tiles_per_weight_row` weight tiles (gate and up: 2)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elem = args["w_ptr"].element_size()
        kept = []
        for c in configs:
            n, k = next(v for name, v in c.kwargs.items() if name != "BLOCK_K"), c.kwargs["BLOCK_K"]
            stage = (args["BLOCK_M"] + tiles_per_weight_row * n) * k * elem
            if stage * max(c.num_stages, 1) <= 200 * 1024:
                kept.append(c)
        return kept or configs[-1:]
    return prune


@triton.autotune(configs=_configs(INTERPRETED, "BLOCK_F"), key=["BLOCK_M", "H", "F", "S"],
                 prune_configs_by={"early_config_prune": autotune_prune(_prune(2))}, cache_results=True)
@triton.heuristics({"EVEN_K": lambda a: a["H"] % a["BLOCK_K"] == 0})
@triton.jit
def gate_up_kernel(x_ptr, w_ptr, sorted_idx_ptr, offsets_ptr, active_ptr, h_ptr, H, F, S,
                   stride_xn, stride_we, stride_wf, stride_wh, stride_hm,
                   TOP_K: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """w: gate_up_proj [E, 2F, H], gate rows first; h [N*k, F] in expert-sorted row order."""
    f_tiles = tl.cdiv(F, BLOCK_F)
    pid = tl.program_id(0)
    e = tl.load(active_ptr + pid // f_tiles)
    if e < 0:
        return
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    # Padding rows (most of the tile with one token) are masked: they cost no memory traffic.
    token = tl.load(sorted_idx_ptr + rows, mask=row_mask, other=0) // TOP_K
    fs = (pid % f_tiles) * BLOCK_F + tl.arange(0, BLOCK_F)
    w_rows = tl.minimum(fs, F - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xn + ks[None, :]
    g_ptrs = w_ptr + e.to(tl.int64) * stride_we + w_rows[:, None] * stride_wf + ks[None, :] * stride_wh
    u_ptrs = g_ptrs + F * stride_wf
    acc_g = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_mask = ks < H - k0
            xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_mask[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_mask[None, :], other=0.0)
        acc_g = tl.dot(xt, tl.trans(g), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(xt, tl.trans(u), acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wh
        u_ptrs += BLOCK_K * stride_wh
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + fs[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (fs < F)[None, :])


@triton.autotune(configs=_configs(INTERPRETED, "BLOCK_N"), key=["BLOCK_M", "H", "F", "S"],
                 prune_configs_by={"early_config_prune": autotune_prune(_prune(1))}, cache_results=True)
@triton.heuristics({"EVEN_K": lambda a: a["F"] % a["BLOCK_K"] == 0})
@triton.jit
def down_kernel(h_ptr, w_ptr, sorted_idx_ptr, offsets_ptr, active_ptr, weights_ptr, ys_ptr, H, F, S,
                stride_hm, stride_we, stride_wh, stride_wf, stride_ys,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """w: down_proj [E, H, F]; ys [N*k, H] fp32, row t * k + j = weight[t, j] * expert_{ids[t, j]}(x_t)."""
    n_tiles = tl.cdiv(H, BLOCK_N)
    pid = tl.program_id(0)
    e = tl.load(active_ptr + pid // n_tiles)
    if e < 0:
        return
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    ns = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = tl.minimum(ns, H - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + ks[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + w_rows[:, None] * stride_wh + ks[None, :] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        if EVEN_K:
            ht = tl.load(h_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_mask = ks < F - k0
            ht = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
        acc = tl.dot(ht, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wf
    entry = tl.load(sorted_idx_ptr + rows, mask=row_mask, other=0)
    weight = tl.load(weights_ptr + entry, mask=row_mask, other=0.0)
    tl.store(ys_ptr + entry.to(tl.int64)[:, None] * stride_ys + ns[None, :], acc * weight[:, None],
             mask=row_mask[:, None] & (ns < H)[None, :])


@triton.jit
def slot_sum_kernel(ys_ptr, out_ptr, H, stride_ys, stride_out, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = hs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(ys_ptr + (t * TOP_K + j).to(tl.int64) * stride_ys + hs, mask=mask, other=0.0)
    tl.store(out_ptr + t.to(tl.int64) * stride_out + hs, acc.to(out_ptr.dtype.element_ty), mask=mask)

