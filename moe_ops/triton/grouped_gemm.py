"""Grouped GEMM over expert segments with device-side offsets, persistent, with SwiGLU epilogues.

Rows offsets[e]:offsets[e+1] of A multiply expert e's weight. The weight is addressed by strides
(stride_wk, stride_wn), so one kernel serves both layouts ([E, N, K] and [E, K, N]) and the transposed
product of the backward pass. Each program first builds the tile table from the offsets (per expert:
ceil(rows / BLOCK_M) x ceil(N / BLOCK_N) tiles, a prefix sum over experts), then walks the global tile
list with a stride of the grid size: a skewed routing only changes how many tiles an expert owns, never
how many programs are busy, and nothing is read back to the host. Inside an expert, M tiles run
fastest so that the programs working at the same time share one weight tile through L2.

Operands arrive through TMA descriptors on Hopper (USE_TMA: A as [M, K], the weight in its stored
3-D layout, so a box never crosses into another expert's weight) or through clamped pointer loads
(cp.async) elsewhere; both feed the same K loop and epilogues.

Epilogues (EPILOGUE):
  0: out = A @ W.
  1: SwiGLU forward. W holds 2N columns, gate first; the program computes the gate tile and the up
     tile of the same columns (two accumulators) and writes silu(gate) * up: N columns, not 2N.
     STORE_PREACT also writes [gate | up] (for the backward pass).
  2: SwiGLU backward. acc = dh (the gradient of the SwiGLU output); reads [gate | up] from `preact`
     and writes [dgate | dup] (2N columns) to out.
"""

import os

import torch
import triton
import triton.language as tl

from m1_kernels.dispatch import autotune_prune


def _set_block_shapes(nargs):
    """TMA descriptors take their box from the config being launched."""
    if nargs["USE_TMA"]:
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["a"].block_shape = [bm, bk]
        nargs["w"].block_shape = [1, bk, bn] if nargs["W_KN"] else [1, bn, bk]


def _config(bm, bn, bk, programs_per_sm, **launch):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PROGRAMS_PER_SM=programs_per_sm),
                         pre_hook=_set_block_shapes, **launch)


def _configs(interpreted):
    if interpreted:  # one small config: the interpreter runs every element
        return [_config(32, 32, 32, 1, num_warps=4)]
    # A short list: every key tunes on first use, and the M1 bench has ~15 keys.
    big = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8)]
    # Small-M tiles for decode: many programs stream the weights; the SwiGLU epilogue doubles the weight
    # tile, so some of these exceed shared memory there and the autotuner drops them.
    small = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 64, 4, 4)]
    return ([_config(m, n, k, 1, num_stages=s, num_warps=w) for m, n, k, s, w in big]
            + [_config(m, n, k, 2, num_stages=s, num_warps=w) for m, n, k, s, w in small])


# Below this many multiply-adds a problem takes microseconds: one config, no autotuning (keeps the
# property tests, which draw many small shapes, from compiling and timing every config for each).
TUNE_MIN_MACS = 1 << 30


def _element_bytes(operand):
    """Bytes per element of a kernel operand: a tensor, or a TMA descriptor over one."""
    return getattr(operand, "base", operand).element_size()


def _prune(configs, named_args, **kwargs):
    """Drop tiles far taller than the average expert segment or too big for the SwiGLU epilogues' two
    register tiles; tiny problems keep one config."""
    args = {**named_args, **kwargs}
    if _element_bytes(args["a"]) == 4:  # fp32 doubles every buffer: one tile that fits all epilogues
        c = next((c for c in configs if c.kwargs["BLOCK_M"] == 64), configs[0])
        return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=2, pre_hook=c.pre_hook)]
    rows_per_expert = max(1, args["M_BUCKET"] // max(1, args["E"]))
    epilogue = args["EPILOGUE"]
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if epilogue in (1, 2) and bm * bn > 128 * 128:  # two accumulators / two epilogue tiles
            continue
        if bm > 64 and rows_per_expert < 64:
            continue
        if bm < 64 and rows_per_expert >= 256:
            continue
        kept.append(c)
    kept = kept or configs[:1]
    if args["M_BUCKET"] * args["N"] * args["K"] < TUNE_MIN_MACS:
        kept = [next((c for c in kept if c.kwargs["BLOCK_M"] == 64), kept[-1])]
    return kept


def _prune_wgrad(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if args["M_BUCKET"] * args["P"] * args["Q"] < TUNE_MIN_MACS or _element_bytes(args["p_ptr"]) == 4:
        return configs[-1:]  # the smallest tile: tiny problems, and fp32 (the others overflow shared memory)
    return configs


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.autotune(configs=_configs(INTERPRETED), key=["M_BUCKET", "N", "K", "E", "EPILOGUE", "USE_TMA"],
                 prune_configs_by={"early_config_prune": autotune_prune(_prune)}, cache_results=True)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit
def grouped_gemm_kernel(a, w, offsets_ptr, out_ptr, preact_ptr, M, N, K, E,
                        stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_pm,
                        M_BUCKET, EPILOGUE: tl.constexpr, STORE_PREACT: tl.constexpr, USE_TMA: tl.constexpr,
                        W_KN: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PROGRAMS_PER_SM: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """`a` and `w` are pointers, or with USE_TMA tensor descriptors ([M, K] and the weight in its own
    [E, K, N] (W_KN) or [E, N, K] layout, blocks set by _set_block_shapes); the strides serve the
    pointer path only."""
    experts = tl.arange(0, BLOCK_E)
    starts = tl.load(offsets_ptr + experts, mask=experts < E, other=0)
    ends = tl.load(offsets_ptr + experts + 1, mask=experts < E, other=0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M * n_tiles
    tile_ends = tl.cumsum(tiles, axis=0)
    total = tl.sum(tiles, axis=0)
    ks = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), total, tl.num_programs(0)):
        e = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
        this = experts == e
        start = tl.sum(tl.where(this, starts, 0), axis=0)
        end = tl.sum(tl.where(this, ends, 0), axis=0)
        local = tile - tl.sum(tl.where(this, tile_ends - tiles, 0), axis=0)
        m_tiles = (end - start + BLOCK_M - 1) // BLOCK_M
        pid_n = local // m_tiles
        pid_m = local % m_tiles
        row0 = start + pid_m * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EPILOGUE == 1:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        if USE_TMA:
            # TMA boxes: rows past the segment hold the next expert's rows and are dropped by the masked
            # store; anything past a tensor's edge (M, K, N) arrives as zeros.
            n0 = pid_n * BLOCK_N
            for k0 in range(0, K, BLOCK_K):
                a_tile = a.load([row0, k0])
                if W_KN:
                    w_tile = w.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
                else:
                    w_tile = tl.trans(w.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))
                acc = tl.dot(a_tile, w_tile, acc, input_precision=DOT_PRECISION)
                if EPILOGUE == 1:
                    if W_KN:
                        up_tile = w.load([e, k0, n0 + N]).reshape(BLOCK_K, BLOCK_N)
                    else:
                        up_tile = tl.trans(w.load([e, n0 + N, k0]).reshape(BLOCK_N, BLOCK_K))
                    acc_up = tl.dot(a_tile, up_tile, acc_up, input_precision=DOT_PRECISION)
        else:
            # Clamped indices: the loads need no row/column masks (rows past the segment belong to the
            # next expert or repeat the last row; the stores are masked). Without a mask along the
            # contiguous dimension the loads vectorise.
            a_rows = tl.minimum(rows, end - 1).to(tl.int64)
            if EVEN_N:
                w_cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
            else:
                w_cols = tl.minimum(cols, N - 1)
            a_ptrs = a + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
            w_ptrs = w + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + w_cols[None, :] * stride_wn
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    a_tile = tl.load(a_ptrs)
                    w_tile = tl.load(w_ptrs)
                else:
                    k_mask = ks < K - k0
                    a_tile = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
                    w_tile = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
                acc = tl.dot(a_tile, w_tile, acc, input_precision=DOT_PRECISION)
                if EPILOGUE == 1:
                    if EVEN_K:
                        up_tile = tl.load(w_ptrs + N * stride_wn)
                    else:
                        up_tile = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None], other=0.0)
                    acc_up = tl.dot(a_tile, up_tile, acc_up, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K * stride_ak
                w_ptrs += BLOCK_K * stride_wk

        out_rows = rows.to(tl.int64)[:, None]
        mask = (rows < end)[:, None] & (cols < N)[None, :]
        if EPILOGUE == 0:
            tl.store(out_ptr + out_rows * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
        elif EPILOGUE == 1:
            h = acc * tl.sigmoid(acc) * acc_up
            tl.store(out_ptr + out_rows * stride_om + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)
            if STORE_PREACT:
                p = preact_ptr + out_rows * stride_pm + cols[None, :]
                tl.store(p, acc.to(preact_ptr.dtype.element_ty), mask=mask)
                tl.store(p + N, acc_up.to(preact_ptr.dtype.element_ty), mask=mask)
        else:
            p = preact_ptr + out_rows * stride_pm + cols[None, :]
            gate = tl.load(p, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(p + N, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            d_gate = acc * up * sig * (1.0 + gate * (1.0 - sig))
            d_up = acc * gate * sig
            o = out_ptr + out_rows * stride_om + cols[None, :]
            tl.store(o, d_gate.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(o + N, d_up.to(out_ptr.dtype.element_ty), mask=mask)


def _wgrad_configs(interpreted):
    if interpreted:
        return [triton.Config(dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_R=32), num_warps=4)]
    shapes = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (64, 128, 32, 4, 4)]
    return [triton.Config(dict(BLOCK_P=p, BLOCK_Q=q, BLOCK_R=r), num_stages=s, num_warps=w)
            for p, q, r, s, w in shapes]


@triton.autotune(configs=_wgrad_configs(INTERPRETED), key=["M_BUCKET", "P", "Q", "E"],
                 prune_configs_by={"early_config_prune": autotune_prune(_prune_wgrad)}, cache_results=True)
@triton.heuristics({"EVEN_P": lambda a: a["P"] % a["BLOCK_P"] == 0, "EVEN_Q": lambda a: a["Q"] % a["BLOCK_Q"] == 0})
@triton.jit
def grouped_wgrad_kernel(p_ptr, q_ptr, offsets_ptr, out_ptr, P, Q, E, stride_pr, stride_pc, stride_qr, stride_qc,
                         stride_oe, stride_op, stride_oq, M_BUCKET, DOT_PRECISION: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
                         EVEN_P: tl.constexpr, EVEN_Q: tl.constexpr):
    """out[e] = P[rows of e]^T @ Q[rows of e]: the weight gradient, reduced over each expert's tokens.
    An expert without tokens gets zeros. Tiles of one expert are adjacent so they share its rows in L2."""
    tiles_p = tl.cdiv(P, BLOCK_P)
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    pid = tl.program_id(0)
    e = pid // (tiles_p * tiles_q)
    local = pid % (tiles_p * tiles_q)
    ps = (local // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (local % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    # Columns are clamped rather than masked (their products land in columns the store drops); only
    # rows past the segment are masked, to zeros, so that they add nothing.
    p_cols = tl.max_contiguous(tl.multiple_of(ps, BLOCK_P), BLOCK_P) if EVEN_P else tl.minimum(ps, P - 1)
    q_cols = tl.max_contiguous(tl.multiple_of(qs, BLOCK_Q), BLOCK_Q) if EVEN_Q else tl.minimum(qs, Q - 1)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = (r0 + rs).to(tl.int64)
        r_mask = ((r0 + rs) < end)[:, None]
        p = tl.load(p_ptr + r[:, None] * stride_pr + p_cols[None, :] * stride_pc, mask=r_mask, other=0.0)
        q = tl.load(q_ptr + r[:, None] * stride_qr + q_cols[None, :] * stride_qc, mask=r_mask, other=0.0)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=DOT_PRECISION)
    o = out_ptr + e.to(tl.int64) * stride_oe + ps[:, None] * stride_op + qs[None, :] * stride_oq
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=(ps < P)[:, None] & (qs < Q)[None, :])


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
