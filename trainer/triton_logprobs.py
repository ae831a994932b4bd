"""Triton kernels of fused_logprobs: chosen-token log-probabilities (and entropy) straight from hidden states and
the LM head weight, with fp32-accurate logits and no [N, V] logits tensor.

fp32-accurate logits from a 16-bit weight: a product of two bf16 (or two fp16) numbers is exact in fp32, and the
tensor cores accumulate in fp32, so a 16-bit hidden state times the 16-bit weight gives the fp32 logits with no
rounding beyond fp32 accumulation. An fp32 hidden state is split into pieces of the weight's dtype (3 for bf16,
2 for fp16: m1_kernels.model.lm_head's `split_dot` and `PIECES`, measured there), each multiplied with the same
weight tile into one fp32 accumulator. An fp32 weight runs fp32 dots ("ieee"). (lm_head's fp16 row scaling is
not applied: an fp32 hidden with an fp16 weight must stay within fp16's range, as hidden states after RMSNorm
do.) `split_dot` also sums each K tile's products in a fresh accumulator before adding them to the running
fp32 sum: Hopper's tensor cores drop the product bits below the running accumulator's exponent, which over
K = 6144 costs 2.5-6x the fp32 matmul's error (lm_head's measurement). That keeps the logits as accurate as
the engine's; RUNNING_ACCUMULATOR = True (a knob for the bench, which times both) lets the logits kernels
accumulate 16-bit products in place instead. The gradient GEMMs always do: their operand dz is already
rounded to 16 bits.

Forward (one launch, then a small combine in torch): program (row block, column group) computes logits tiles
[BLOCK_N, BLOCK_V] over its COLUMNS_PER_PROGRAM columns, keeping an online max m, sum s = sum exp(z - m) and
(for the entropy) t = sum exp(z - m) z per row, and picks the target's logit from the tile that holds it. The
combine merges the column groups: lse = M + log(sum_g s_g e^(m_g - M)); log p = z_target - lse;
entropy = lse - sum_g t_g e^(m_g - M) / sum_g s_g e^(m_g - M). Programs are ordered in groups of GROUP_N row
blocks that walk the same weight columns together, so a weight tile read from memory serves GROUP_N blocks
through L2.

Backward (d/dz of log p_target = onehot - p; of the entropy H = lse - sum p z: -p (z - lse + H)): over column
chunks of at most DZ_BUDGET_BYTES, a kernel recomputes the logits tiles and writes
dz = g_logp (onehot - p) - g_entropy p (z - lse + H) in the weight's dtype; two GEMMs then add dz @ W_chunk to
dh (fp32 accumulator) and write dW_chunk = dz^T @ h. Row blocks of at most DH_BUDGET_BYTES of fp32 accumulator
bound the extra memory at large token counts; dW then accumulates over row blocks (fp32 sum, one rounding per
block). The logits are computed twice (forward and backward): 8 N H V FLOPs in all, where 6 N H V is the
usual count.

trainer.head_loss (one pass, 6 N H V) runs the forward kernel with STORE_Z, which also writes each fp32 logits
tile to memory, then `dlogits_from_z`: d logits from those stored logits, one elementwise pass.
"""

import torch
import triton
import triton.language as tl

from m1_kernels.dispatch import autotune_prune, triton_interpreted
from m1_kernels.interpreter_compat import patch_triton_interpreter
from m1_kernels.model.lm_head import PIECES, split_dot

INTERPRETED = triton_interpreted()
if INTERPRETED:
    patch_triton_interpreter()

# Extra memory of the backward pass: the fp32 dh accumulator of one row block, the dz buffer of one chunk.
DH_BUDGET_BYTES = 512 << 20
DZ_BUDGET_BYTES = 256 << 20
# Columns one forward program covers (the same for every config, so the partial buffers have one size); the
# backward's chunk widths and row blocks are multiples of the largest tiles.
COLUMNS_PER_PROGRAM = 64 if INTERPRETED else 2048
# Columns of one program of the elementwise dz kernel, and of one step of the stats kernel, which covers
# STATS_COLUMNS of a row (trainer.head_loss).
DZ_BLOCK = 64 if INTERPRETED else 4096
STATS_COLUMNS = 4 * DZ_BLOCK if INTERPRETED else 16 * DZ_BLOCK
COLUMN_ALIGN, ROW_ALIGN = (32, 16) if INTERPRETED else (256, 128)
# Below this many multiply-adds a call takes microseconds: one config, no autotuning (the tests draw many shapes).
TUNE_MIN_MACS = 1 << 32
# See the module docstring: False = split_dot's per-tile accumulators in the logits kernels.
RUNNING_ACCUMULATOR = False


def _config(m, n, k, warps, stages):
    return triton.Config(dict(BLOCK_N=m, BLOCK_V=n, BLOCK_K=k, GROUP=8), num_warps=warps, num_stages=stages)


# The interpreter runs every element: one small config. On the GPU, three tile shapes for 16-bit operands (at
# most 192 KiB of shared memory, with an fp32 hidden tile too), and one narrow tile for fp32 operands, whose
# doubled buffers would not fit the others.
TILE_CONFIGS = [_config(16, 32, 16, 4, 1)] if INTERPRETED else \
    [_config(128, 256, 64, 8, 3), _config(128, 128, 64, 8, 4), _config(64, 256, 64, 8, 4)]
FP32_CONFIG = TILE_CONFIGS[0] if INTERPRETED else _config(64, 128, 32, 4, 2)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if args["FP32_DOT"]:
        return [FP32_CONFIG]
    if args["N_BUCKET"] * args["K_BUCKET"] * args["V_TOTAL"] < TUNE_MIN_MACS:
        return configs[-1:]
    return configs


@triton.jit
def _grouped_pid(pid, num_a, num_b, GROUP: tl.constexpr):
    """Program id -> (a, b) with GROUP consecutive a-blocks sharing each b-block (L2 reuse of the b operand)."""
    per_group = GROUP * num_b
    first = (pid // per_group) * GROUP
    size = tl.minimum(num_a - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, H, stride_hn, stride_wv, PIECES: tl.constexpr, EVEN_K: tl.constexpr,
                 FP32_DOT: tl.constexpr, RUNNING_ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """fp32 logits h[rows] @ w[cols]^T ([BLOCK_N, BLOCK_V]); rows and cols must be in bounds."""
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + ks[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_wv + ks[:, None]          # the W^T tile [BLOCK_K, BLOCK_V]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = ks < H - k * BLOCK_K
            h = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if FP32_DOT:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        elif RUNNING_ACC and PIECES == 1:
            acc = tl.dot(h, w, acc)
        else:  # 16-bit w: h in PIECES pieces of w's dtype, each product exact in fp32
            acc = split_dot(h, w, acc, PIECES)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


# Autotune keys hold powers of two of the row and reduction sizes: an RL run's token counts change every call.
@triton.autotune(configs=TILE_CONFIGS, key=["N_BUCKET", "K_BUCKET", "V_TOTAL", "PIECES", "WITH_ENTROPY", "STORE_Z"],
                 prune_configs_by={"early_config_prune": autotune_prune(_prune)}, cache_results=True)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _forward_kernel(h_ptr, w_ptr, tgt_ptr, part_m_ptr, part_s_ptr, part_t_ptr, zt_ptr, z_ptr, N, V_TOTAL, K,
                    stride_hn, stride_wv, stride_z, N_BUCKET, K_BUCKET, WITH_ENTROPY: tl.constexpr,
                    STORE_Z: tl.constexpr, PIECES: tl.constexpr, FP32_DOT: tl.constexpr, RUNNING_ACC: tl.constexpr,
                    COLUMNS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Partial (m, s, t) of rows block x COLUMNS columns into part_*[group, row]; the target logit into zt; with
    STORE_Z the fp32 logits into z too."""
    V = V_TOTAL
    num_groups = tl.cdiv(V, COLUMNS)
    pid_n, pid_g = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_groups, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_in = rows % N                       # rows past N repeat valid ones: loads need no mask, results dropped
    targets = tl.load(tgt_ptr + rows_in).to(tl.int32)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    found = tl.zeros((BLOCK_N,), dtype=tl.int32)
    first_col = pid_g * COLUMNS
    n_tiles = tl.cdiv(tl.minimum(V - first_col, COLUMNS), BLOCK_V)
    for j in range(0, n_tiles):
        cols = first_col + j * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = _logits_tile(h_ptr, w_ptr, rows_in, cols % V, K, stride_hn, stride_wv, PIECES, EVEN_K, FP32_DOT,
                           RUNNING_ACC, BLOCK_N, BLOCK_V, BLOCK_K)
        if STORE_Z:
            tl.store(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], acc,
                     mask=row_ok[:, None] & col_ok[None, :])
        z = tl.where(col_ok[None, :], acc, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - new_m)
        e = tl.exp(z - new_m[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            t = t * alpha + tl.sum(e * tl.where(col_ok[None, :], acc, 0.0), axis=1)
        m = new_m
        hit = cols[None, :] == targets[:, None]
        z_target += tl.sum(tl.where(hit, acc, 0.0), axis=1)
        found += tl.sum(hit.to(tl.int32), axis=1)
    out = pid_g * N + rows
    tl.store(part_m_ptr + out, m, mask=row_ok)
    tl.store(part_s_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(part_t_ptr + out, t, mask=row_ok)
    tl.store(zt_ptr + rows, z_target, mask=row_ok & (found > 0))


@triton.autotune(configs=TILE_CONFIGS, key=["N_BUCKET", "K_BUCKET", "V_TOTAL", "PIECES", "WITH_ENTROPY_GRAD"],
                 prune_configs_by={"early_config_prune": autotune_prune(_prune)}, cache_results=True)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dz_ptr, N, V_TOTAL, K,
                    col_start, cols_here, stride_hn, stride_wv, stride_dz, N_BUCKET, K_BUCKET,
                    WITH_ENTROPY_GRAD: tl.constexpr, PIECES: tl.constexpr, FP32_DOT: tl.constexpr,
                    RUNNING_ACC: tl.constexpr,
                    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP: tl.constexpr):
    """dz[:, 0:cols_here] for logits columns col_start + (0:cols_here), recomputed tile by tile."""
    pid_n, pid_v = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(cols_here, BLOCK_V), GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rows_in = rows % N
    cols = col_start + local % cols_here
    z = _logits_tile(h_ptr, w_ptr, rows_in, cols, K, stride_hn, stride_wv, PIECES, EVEN_K, FP32_DOT, RUNNING_ACC,
                     BLOCK_N, BLOCK_V, BLOCK_K)
    lse = tl.load(lse_ptr + rows_in)
    g = tl.load(g_logp_ptr + rows_in)
    targets = tl.load(tgt_ptr + rows_in).to(tl.int32)
    p = tl.exp(z - lse[:, None])
    dz = tl.where(cols[None, :] == targets[:, None], g[:, None], 0.0) - p * g[:, None]
    if WITH_ENTROPY_GRAD:
        g_ent = tl.load(g_ent_ptr + rows_in)
        ent = tl.load(ent_ptr + rows_in)
        dz -= g_ent[:, None] * p * (z - lse[:, None] + ent[:, None])
    ok = (rows < N)[:, None] & (local < cols_here)[None, :]
    tl.store(dz_ptr + rows[:, None] * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dz_from_logits_kernel(z_ptr, lse_ptr, g_ptr, tgt_ptr, dz_ptr, V, stride_z, stride_dz, BLOCK: tl.constexpr):
    """dz = g (onehot - exp(z - lse)) of one row's BLOCK columns, from stored fp32 logits (trainer.head_loss).
    dz may be z itself (an fp32 weight): each element is read, then written, by the same thread."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < V
    z = tl.load(z_ptr + row * stride_z + cols, mask=ok, other=float("-inf"))
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    target = tl.load(tgt_ptr + row).to(tl.int32)
    dz = tl.where(cols == target, g, 0.0) - tl.exp(z - lse) * g
    tl.store(dz_ptr + row * stride_dz + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _logits_stats_kernel(z_ptr, tgt_ptr, part_m_ptr, part_s_ptr, part_t_ptr, zt_ptr, N, V, stride_z,
                         WITH_ENTROPY: tl.constexpr, COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    """The forward kernel's partial (m, s, t) and target logit, from stored fp32 logits: program (row, group)
    reads z[row, group * COLUMNS:][:COLUMNS] in BLOCK-wide pieces (trainer.head_loss's cuBLAS logits)."""
    row = tl.program_id(0)
    group = tl.program_id(1)
    target = tl.load(tgt_ptr + row).to(tl.int32)
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)    # per lane; merged across lanes at the end
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    t = tl.zeros((BLOCK,), dtype=tl.float32)
    z_target = tl.zeros((BLOCK,), dtype=tl.float32)
    found = tl.zeros((BLOCK,), dtype=tl.int32)
    first = group * COLUMNS
    for c0 in range(first, tl.minimum(first + COLUMNS, V), BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < V
        z = tl.load(z_ptr + row.to(tl.int64) * stride_z + cols, mask=ok, other=float("-inf"))
        new_m = tl.maximum(m, z)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)     # a lane with no column yet: all terms 0
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        s = s * alpha + e
        if WITH_ENTROPY:
            t = t * alpha + e * tl.where(ok, z, 0.0)
        m = new_m
        hit = cols == target
        z_target += tl.where(hit, z, 0.0)
        found += hit.to(tl.int32)
    tl.store(zt_ptr + row, tl.sum(z_target, axis=0), mask=tl.sum(found, axis=0) > 0)
    top = tl.max(m, axis=0)
    scale = tl.exp(m - top)
    out = group * N + row
    tl.store(part_m_ptr + out, top)
    tl.store(part_s_ptr + out, tl.sum(s * scale, axis=0))
    if WITH_ENTROPY:
        tl.store(part_t_ptr + out, tl.sum(t * scale, axis=0))


@triton.autotune(configs=TILE_CONFIGS, key=["N_BUCKET", "K_BUCKET", "V_TOTAL", "PIECES", "ACCUMULATE"],
                 prune_configs_by={"early_config_prune": autotune_prune(_prune)}, cache_results=True,
                 restore_value=["c_ptr"])   # timing the configs must not accumulate into c several times
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, V_TOTAL, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                   stride_cn, N_BUCKET, K_BUCKET, ACCUMULATE: tl.constexpr, PIECES: tl.constexpr,
                   FP32_DOT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """c[M, V_TOTAL] (+)= a[M, K] @ b[K, V_TOTAL] with fp32 accumulation (BLOCK_N rows, BLOCK_V columns per
    tile; names shared with the logits kernels so that one config list serves all three). A 16-bit b with an
    a of any float dtype: a in PIECES pieces of b's dtype."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_N), tl.cdiv(V_TOTAL, BLOCK_V), GROUP)
    rows = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_n * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows % M)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + (cols % V_TOTAL)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = ks < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if FP32_DOT:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif PIECES == 1:
            acc = tl.dot(a, b, acc)
        else:
            acc = split_dot(a, b, acc, PIECES)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    ok = (rows < M)[:, None] & (cols < V_TOTAL)[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------
# Launchers (inputs validated by trainer.logprobs: 2-D, unit last stride, hidden fp32 or the weight's dtype)

def _bucket(n):
    return triton.next_power_of_2(max(int(n), 1))


def _pieces(a_dtype, b_dtype):
    """Pieces of an a operand in b's 16-bit dtype (1 for an fp32 b: FP32_DOT takes over)."""
    return 1 if b_dtype == torch.float32 else PIECES[(a_dtype, b_dtype)]


def _grid_2d(rows, cols):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(cols, meta["BLOCK_V"]),)


def _partials(N, groups, with_entropy, device):
    """(part_m, part_s, part_t, z_target) of a forward: per column group and row, and the target logits (NaN until
    found: a target outside [0, V) matches no column, so its log-prob stays NaN instead of a plausible number)."""
    part_m = torch.empty(groups, N, dtype=torch.float32, device=device)
    part_s = torch.empty_like(part_m)
    part_t = torch.empty_like(part_m) if with_entropy else part_m      # unused without entropy
    return part_m, part_s, part_t, torch.full((N,), float("nan"), dtype=torch.float32, device=device)


def _combine(part_m, part_s, part_t, z_target, with_entropy):
    """(log p, entropy or [0], lse) from the column groups' partials (module docstring)."""
    top = part_m.max(dim=0).values
    scale = torch.exp(part_m - top)
    total = (part_s * scale).sum(dim=0)
    lse = top + torch.log(total)
    entropy = lse - (part_t * scale).sum(dim=0) / total if with_entropy else lse.new_empty(0)
    return z_target - lse, entropy, lse


def forward(hidden, weight, targets, with_entropy, z=None):
    """(log p [N], entropy [N] or [0], lse [N]), all fp32; a given z ([N, V] fp32, unit column stride) receives
    the logits (trainer.head_loss)."""
    N, H = hidden.shape
    V = weight.shape[0]
    groups = triton.cdiv(V, COLUMNS_PER_PROGRAM)
    part_m, part_s, part_t, z_target = _partials(N, groups, with_entropy, hidden.device)
    if N == 0:
        return z_target, z_target.new_empty(N if with_entropy else 0), z_target.clone()
    _forward_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * groups,)](
        hidden, weight, targets, part_m, part_s, part_t, z_target, part_m if z is None else z, N, V, H,
        hidden.stride(0), weight.stride(0), 0 if z is None else z.stride(0), _bucket(N), _bucket(H),
        WITH_ENTROPY=with_entropy, STORE_Z=z is not None, PIECES=_pieces(hidden.dtype, weight.dtype),
        FP32_DOT=weight.dtype == torch.float32, RUNNING_ACC=RUNNING_ACCUMULATOR, COLUMNS=COLUMNS_PER_PROGRAM)
    return _combine(part_m, part_s, part_t, z_target, with_entropy)


def logits_stats(z, targets, with_entropy):
    """forward's (log p, entropy or [0], lse) from given fp32 logits z [n, V] (unit column stride)."""
    n, V = z.shape
    groups = triton.cdiv(V, STATS_COLUMNS)
    part_m, part_s, part_t, z_target = _partials(n, groups, with_entropy, z.device)
    if n == 0:
        return z_target, z_target.new_empty(n if with_entropy else 0), z_target.clone()
    _logits_stats_kernel[(n, groups)](z, targets, part_m, part_s, part_t, z_target, n, V, z.stride(0),
                                      WITH_ENTROPY=with_entropy, COLUMNS=STATS_COLUMNS, BLOCK=DZ_BLOCK,
                                      num_warps=4 if INTERPRETED else 8)
    return _combine(part_m, part_s, part_t, z_target, with_entropy)


def _matmul(a, b, c, accumulate):
    M, K = a.shape
    Nc = b.shape[1]
    _matmul_kernel[_grid_2d(M, Nc)](
        a, b, c, M, Nc, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), _bucket(M),
        _bucket(K), ACCUMULATE=accumulate, PIECES=_pieces(a.dtype, b.dtype), FP32_DOT=b.dtype == torch.float32)


def backward(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, need_dh, need_dw):
    """(dh or None, dW or None): gradients of sum(grad_logp * log p + grad_entropy * entropy); grad_entropy may be
    None (no entropy term)."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    dh = torch.zeros_like(hidden) if need_dh and hidden.dtype == torch.float32 else None
    dh_out = torch.empty_like(hidden) if need_dh and dh is None else dh
    dw = torch.empty_like(weight) if need_dw else None
    if N == 0:
        if dw is not None:
            dw.zero_()
        return dh_out, dw
    with_ent = grad_entropy is not None
    dz_dtype = weight.dtype
    # Rows per block: an fp32 hidden accumulates into its own gradient; a 16-bit one into an fp32 block buffer.
    rows_per_block = N if dh is not None or not need_dh else \
        max(ROW_ALIGN, DH_BUDGET_BYTES // (H * 4) // ROW_ALIGN * ROW_ALIGN)
    for r0 in range(0, N, rows_per_block):
        r1 = min(N, r0 + rows_per_block)
        n = r1 - r0
        h_rows = hidden[r0:r1]
        acc = None
        if need_dh:
            acc = dh[r0:r1] if dh is not None else torch.zeros(n, H, dtype=torch.float32, device=device)
        chunk = max(COLUMN_ALIGN, min(V, DZ_BUDGET_BYTES // (n * dz_dtype.itemsize)) // COLUMN_ALIGN * COLUMN_ALIGN)
        dz = torch.empty(n, min(chunk, V), dtype=dz_dtype, device=device)
        for c0 in range(0, V, chunk):
            cols = min(chunk, V - c0)
            _dlogits_kernel[_grid_2d(n, cols)](
                h_rows, weight, targets[r0:r1], lse[r0:r1], entropy[r0:r1] if with_ent else lse,
                grad_logp[r0:r1], grad_entropy[r0:r1] if with_ent else grad_logp, dz, n, V, H, c0, cols,
                h_rows.stride(0), weight.stride(0), dz.stride(0), _bucket(n), _bucket(H), WITH_ENTROPY_GRAD=with_ent,
                PIECES=_pieces(hidden.dtype, weight.dtype), FP32_DOT=weight.dtype == torch.float32,
                RUNNING_ACC=RUNNING_ACCUMULATOR)
            dz_c = dz[:, :cols]
            if need_dh:
                _matmul(dz_c, weight[c0:c0 + cols], acc, accumulate=True)
            if need_dw and hidden.dtype == dz_dtype:
                _matmul(dz_c.t(), h_rows, dw[c0:c0 + cols], accumulate=r0 > 0)
            elif need_dw:  # the fp32 hidden is the split operand: dW^T = h^T @ dz
                _matmul(h_rows.t(), dz_c, dw[c0:c0 + cols].t(), accumulate=r0 > 0)
        if need_dh and dh is None:
            dh_out[r0:r1] = acc
    return dh_out, dw


def dlogits_from_z(z, lse, g, targets, dz):
    """dz [n, V] (the weight's dtype, or z itself) = g (onehot(targets) - softmax) from the fp32 logits z [n, V]
    and their lse [n]: the gradient of sum(g * log p) in the logits (trainer.head_loss)."""
    n, V = z.shape
    if n:
        _dz_from_logits_kernel[(n, triton.cdiv(V, DZ_BLOCK))](z, lse, g, targets, dz, V, z.stride(0), dz.stride(0),
                                                             BLOCK=DZ_BLOCK, num_warps=4 if INTERPRETED else 8)
    return dz
