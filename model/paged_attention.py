"""Softmax attention over a paged KV cache: the engine's cache writes, decode and chunked prefill.

Layout (one pair per softmax layer): `k_pages`, `v_pages` [num_pages, Hkv, page_size, D] in the model's
dtype. A sequence owns pages listed in its row of a block table: its token t lives in page
`block_table[n, t // page_size]` at offset `t % page_size`. Each (page, kv head) holds page_size
contiguous rows of D elements, so a kernel reads whole 2*D-byte rows (256 B at D = 128, bf16)
whatever the page size; page_size 16 is the recommended default (little memory lost in the last
partial page, cheap copy-on-write of a shared prompt's last page).

    write_kv(k, v, k_pages, v_pages, slot_mapping)                 token t -> slot slot_mapping[t] (< 0: skip)
    o = paged_attention_decode(q, k_pages, v_pages, block_table, seq_lens, scale)
    o = paged_attention_prefill(q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens, scale)

Decode: row b's one query (all H heads) attends to its first seq_lens[b] cached tokens; a row with
seq_lens[b] == 0 is padding (zeros out, nothing read). Prefill: sequence n's cu_seqlens_q[n+1] -
cu_seqlens_q[n] packed queries are the last ones of its seq_lens[n] cached tokens (their keys and
values already written), causal. Heads are grouped (GQA): query head h reads kv head h // (H // Hkv).

The Triton decode kernel is flash-decoding: programs over (key split, kv head, row); one program
loads each K/V tile once for all H / Hkv query heads of its kv head (tensor-core dots), and the number
of splits per row comes from the shapes (enough programs to fill the GPU when the batch is small),
each row's keys being cut into that many equal page-aligned ranges on the device; a second kernel
combines the splits' partial outputs by their log-sum-exp. Nothing reads device values on the host,
and the grids depend on shapes only: decode and write_kv capture in CUDA graphs. Prefill programs run
over (query block of a sequence, kv head); the block -> sequence map is a device-side prefix sum.

Values are checked on CPU tensors (ValueError naming the argument); on CUDA a check would
synchronise, so the kernels guard themselves instead: a page id out of range or a length the block
table cannot hold makes that row's output NaN (never a read outside the cache), and write_kv skips a
slot past the cache's end.
"""

import functools
import math
import types

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from m1_kernels.dispatch import Backend, resolve_backend, triton_interpreted
from m1_kernels.interpreter_compat import patch_triton_interpreter
from m1_kernels.validate import FLOAT_DTYPES, check_shape, check_tensor

if triton_interpreted():
    patch_triton_interpreter()

RECOMMENDED_PAGE_SIZE = 16
COMBINE_CHUNK = 32  # splits the combine kernel reads per step
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kp_ptr, vp_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kp, stride_kph, stride_kps, stride_vp, stride_vph, stride_vps, num_slots,
                     PS: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if (slot >= 0) & (slot < num_slots):  # negative: padding; past the end: never written (see module doc)
        d = tl.arange(0, D)
        page, off = slot // PS, slot % PS
        k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d)
        v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d)
        tl.store(kp_ptr + page * stride_kp + h * stride_kph + off * stride_kps + d, k)
        tl.store(vp_ptr + page * stride_vp + h * stride_vph + off * stride_vps + d, v)


@triton.jit
def _tile_offsets(bt_row, start, end, num_pages, stride_kp, stride_ks, stride_vp, stride_vs,
                  PS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets in k_pages / v_pages (kv head excluded) of the keys start .. start+BLOCK_N-1 of one
    sequence, which of them are < end, and whether a page id among those is out of range (its rows are
    then read from page 0 and the caller's output becomes NaN). Tiles start at multiples of BLOCK_N."""
    pos = start + tl.arange(0, BLOCK_N)
    live = pos < end
    if PS % BLOCK_N == 0:  # the tile lies inside one page: one block-table entry
        page = tl.load(bt_row + start // PS)
        bad = (page < 0) | (page >= num_pages)
    else:
        page = tl.load(bt_row + pos // PS, mask=live, other=0)
        bad = tl.max(((page < 0) | (page >= num_pages)).to(tl.int32), 0) > 0
    page = tl.where(bad, 0, page).to(tl.int64)
    slot = pos % PS
    return page * stride_kp + slot * stride_ks, page * stride_vp + slot * stride_vs, live, bad


@triton.jit
def _attend_tile(q, k_base, v_base, k_off, v_off, allowed, m_i, l_i, acc, scale_log2, D: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """One online-softmax step: the rows of q against one tile of keys (allowed [rows, BLOCK_N] masks
    them), in log2 units. Masked-out keys are loaded as zeros, so stale or NaN cache rows never count."""
    d = tl.arange(0, D)
    keys_live = tl.max(allowed.to(tl.int32), 0) > 0
    k = tl.load(k_base + k_off[:, None] + d[None, :], mask=keys_live[:, None], other=0.0)
    v = tl.load(v_base + v_off[:, None] + d[None, :], mask=keys_live[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay empty
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _split_range(L, split, num_splits, min_split, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of split `split` of a row with L keys, and how many splits have keys: the row is cut
    into num_splits equal ranges of at least min_split keys, rounded up to whole tiles."""
    per = tl.maximum(tl.cdiv(L, num_splits), min_split)
    per = tl.cdiv(per, BLOCK_N) * BLOCK_N
    lo = split * per
    return lo, tl.minimum(lo + per, L), tl.cdiv(L, per)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, o_ptr, po_ptr, plse_ptr,
                   stride_qb, stride_qh, stride_kp, stride_kh, stride_ks, stride_vp, stride_vh, stride_vs,
                   stride_bt, num_pages, max_pages, num_splits, min_split, scale_log2,
                   H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                   BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    split = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2)
    L = tl.load(len_ptr + b)
    cap = max_pages * PS
    bad = (L < 0) | (L > cap)
    lo, hi, _ = _split_range(tl.minimum(tl.maximum(L, 0), cap), split, num_splits, min_split, BLOCK_N)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = hkv * G + g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < G)[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = k_ptr + hkv * stride_kh
    v_base = v_ptr + hkv * stride_vh
    for start in range(lo, hi, BLOCK_N):
        k_off, v_off, live, tile_bad = _tile_offsets(bt_row, start, hi, num_pages, stride_kp, stride_ks,
                                                     stride_vp, stride_vs, PS, BLOCK_N)
        bad = bad | tile_bad
        allowed = tl.broadcast_to(live[None, :], (G_PAD, BLOCK_N))
        m_i, l_i, acc = _attend_tile(q, k_base, v_base, k_off, v_off, allowed, m_i, l_i, acc, scale_log2,
                                     D, DOT_PREC)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = tl.where(bad, float("nan"), acc / l_safe[:, None])
    row = (b * H + heads).to(tl.int64)
    if SPLIT:
        if hi > lo:  # splits without keys write nothing: the combine reads only the first ones
            part = row * num_splits + split
            tl.store(po_ptr + part[:, None] * D + d[None, :], out, mask=(g < G)[:, None])
            tl.store(plse_ptr + part, m_i + tl.log2(l_safe), mask=g < G)
    else:  # seq_lens == 0: l = 0 and acc = 0, zeros out
        tl.store(o_ptr + row[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=(g < G)[:, None])


@triton.jit
def _combine_kernel(po_ptr, plse_ptr, len_ptr, o_ptr, num_splits, min_split, max_pages,
                    H: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BS: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    L = tl.load(len_ptr + b)
    cap = max_pages * PS
    _, _, n_active = _split_range(tl.minimum(tl.maximum(L, 0), cap), 0, num_splits, min_split, BLOCK_N)
    d = tl.arange(0, D)
    base = pid.to(tl.int64) * num_splits
    m = tl.full([1], float("-inf"), tl.float32)
    den = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, n_active, BS):
        s = s0 + tl.arange(0, BS)
        live = s < n_active
        lse = tl.load(plse_ptr + base + s, mask=live, other=float("-inf"))
        part = tl.load(po_ptr + (base + s)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        w = tl.exp2(lse - m_new)
        alpha = tl.exp2(m - m_new)
        den = den * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        m = m_new
    out = tl.where(den > 0, acc / tl.where(den > 0, den, 1.0), 0.0)
    out = tl.where((L < 0) | (L > cap), float("nan"), out)
    tl.store(o_ptr + pid.to(tl.int64) * D + d, out.to(o_ptr.dtype.element_ty))


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, len_ptr, qblk_ptr, o_ptr,
                    stride_qt, stride_qh, stride_kp, stride_kh, stride_ks, stride_vp, stride_vh, stride_vs,
                    stride_bt, N, num_pages, max_pages, scale_log2,
                    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, PS: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SEQ: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    hkv = tl.program_id(1)
    if pid < tl.load(qblk_ptr + N):  # the grid is an upper bound on the query blocks
        # Sequence of this block: how many sequences end at or before it (qblk is a prefix sum).
        n = 0
        for c in range(0, N, BLOCK_SEQ):
            idx = c + tl.arange(0, BLOCK_SEQ)
            ends = tl.load(qblk_ptr + 1 + idx, mask=idx < N, other=2147483647)
            n += tl.sum((ends <= pid).to(tl.int32), 0)
        t0 = tl.load(cu_ptr + n)
        qlen = tl.load(cu_ptr + n + 1) - t0
        L = tl.load(len_ptr + n)
        cap = max_pages * PS
        ctx = L - qlen                                  # position of the sequence's first query
        bad = (ctx < 0) | (L > cap)
        r = tl.arange(0, BLOCK_Q * G_PAD)
        tok = (pid - tl.load(qblk_ptr + n)) * BLOCK_Q + r // G_PAD
        g = r % G_PAD
        row_ok = (tok < qlen) & (g < G)
        d = tl.arange(0, D)
        heads = hkv * G + g
        q = tl.load(q_ptr + (t0 + tok).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        qpos = ctx + tok
        kv_end = tl.minimum(tl.minimum(tl.max(qpos, 0) + 1, L), cap)
        m_i = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * G_PAD, D], tl.float32)
        bt_row = bt_ptr + n.to(tl.int64) * stride_bt
        k_base = k_ptr + hkv * stride_kh
        v_base = v_ptr + hkv * stride_vh
        for start in range(0, kv_end, BLOCK_N):
            k_off, v_off, live, tile_bad = _tile_offsets(bt_row, start, kv_end, num_pages, stride_kp, stride_ks,
                                                         stride_vp, stride_vs, PS, BLOCK_N)
            bad = bad | tile_bad
            pos = start + tl.arange(0, BLOCK_N)
            allowed = live[None, :] & (pos[None, :] <= qpos[:, None])
            m_i, l_i, acc = _attend_tile(q, k_base, v_base, k_off, v_off, allowed, m_i, l_i, acc, scale_log2,
                                         D, DOT_PREC)
        out = tl.where(bad, float("nan"), acc / tl.where(l_i > 0, l_i, 1.0)[:, None])
        o_rows = (t0 + tok).to(tl.int64) * H + heads
        tl.store(o_ptr + o_rows[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------
# Triton launchers (validated inputs)

def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 caches: no tf32 rounding of q . k


def _strides(pages):
    return pages.stride(0), pages.stride(1), pages.stride(2)


def _write_kv_triton(k, v, k_pages, v_pages, slot_mapping):
    T, Hkv, D = k.shape
    if T == 0:
        return
    P, _, PS, _ = k_pages.shape
    _write_kv_kernel[(T, Hkv)](k, v, k_pages, v_pages, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                               v.stride(1), *_strides(k_pages), *_strides(v_pages), P * PS, PS=PS, D=D,
                               num_warps=1 if D <= 64 else 2)


@functools.cache
def _resident_programs(device_index, program_smem):
    """Decode programs one GPU runs at once: shared memory (the pipelined K/V tiles) bounds them per SM."""
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 << 10) - (4 << 10)
    return props.multi_processor_count * max(1, smem // program_smem)


@functools.lru_cache(maxsize=256)
def _pick_splits(resident, pairs, capacity, min_split, block_n, group, elem):
    """The split count with the best modelled speed for a batch of full-length rows: the fraction of the
    last wave of programs that is busy (rows of equal length give programs of equal work), over the
    extra traffic of the fp32 partial outputs (written, then read by the combine) against the K/V reads."""
    def speed(splits):
        per = triton.cdiv(max(triton.cdiv(capacity, splits), min_split), block_n) * block_n
        active = triton.cdiv(capacity, per)
        waves = pairs * active / resident
        partials = active * group * 8 if splits > 1 else 0        # fp32 per query head and dim, twice
        return waves / math.ceil(waves) / (1 + partials / (capacity * 2 * elem))

    return max(range(1, triton.cdiv(capacity, min_split) + 1), key=speed)


def _decode_splits(device, pairs, capacity, min_split, block_n, group, elem, program_smem):
    """Splits per (row, kv head), from shapes only (never from the lengths: CUDA graphs replay them)."""
    resident = 16
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        resident = _resident_programs(index, program_smem)
    return _pick_splits(resident, pairs, capacity, min_split, block_n, group, elem)


def _decode_triton(q, k_pages, v_pages, block_table, seq_lens, scale, splits=None, tile=None):
    """`splits` forces the split count and `tile` = (BLOCK_N, num_warps, num_stages) the tiling (tests,
    sweeps); None picks them from the shapes."""
    B, H, D = q.shape
    P, Hkv, PS, _ = k_pages.shape
    G = H // Hkv
    o = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    block_n, warps, stages = tile or (64 if D <= 128 else 32, 4, 2)
    min_split = 2 * block_n
    max_pages = block_table.shape[1]
    if splits is None:
        program_smem = stages * block_n * D * q.element_size() * 2          # K and V tiles in flight
        splits = _decode_splits(q.device, B * Hkv, max_pages * PS, min_split, block_n, G, q.element_size(),
                                program_smem)
    if splits > 1:
        po = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        plse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    else:
        po = plse = o  # not read: SPLIT is off
    common = dict(H=H, D=D, PS=PS, BLOCK_N=block_n)
    _decode_kernel[(splits, Hkv, B)](
        q, k_pages, v_pages, block_table, seq_lens, o, po, plse, q.stride(0), q.stride(1), *_strides(k_pages),
        *_strides(v_pages), block_table.stride(0), P, max_pages, splits, min_split, scale * 1.4426950408889634,
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), SPLIT=splits > 1, DOT_PREC=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages, **common)
    if splits > 1:
        _combine_kernel[(B * H,)](po, plse, seq_lens, o, splits, min_split, max_pages, BS=COMBINE_CHUNK,
                                  num_warps=4, **common)
    return o


def _prefill_triton(q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens, scale):
    T, H, D = q.shape
    P, Hkv, PS, _ = k_pages.shape
    N = seq_lens.shape[0]
    o = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return o
    G = H // Hkv
    g_pad = triton.next_power_of_2(G)
    rows = 64 if triton_interpreted() or D > 128 else 128
    block_q = max(1, rows // g_pad, 16 // g_pad)
    qblk = torch.zeros(N + 1, dtype=torch.int32, device=q.device)
    blocks = torch.div(cu_seqlens_q[1:] - cu_seqlens_q[:-1] + block_q - 1, block_q, rounding_mode="floor")
    torch.cumsum(blocks, 0, dtype=torch.int32, out=qblk[1:])   # query blocks before each sequence, on the device
    grid = (triton.cdiv(T, block_q) + N, Hkv)
    _prefill_kernel[grid](q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens, qblk, o, q.stride(0), q.stride(1),
                          *_strides(k_pages), *_strides(v_pages), block_table.stride(0), N, P, block_table.shape[1],
                          scale * 1.4426950408889634, H=H, G=G, G_PAD=g_pad, D=D, PS=PS, BLOCK_Q=block_q,
                          BLOCK_N=64 if D <= 128 else 32, BLOCK_SEQ=128, DOT_PREC=_dot_precision(q.dtype),
                          num_warps=8 if block_q * g_pad >= 128 else 4, num_stages=2)
    return o


# ---------------------------------------------------------------------------------------------------
# torch paths (any device; the CPU default). Decode gathers every row's pages; prefill loops over the
# sequences on the host (it reads cu_seqlens_q and seq_lens: a synchronisation on CUDA).

def _write_kv_torch(k, v, k_pages, v_pages, slot_mapping):
    P, _, PS, _ = k_pages.shape
    keep = (slot_mapping >= 0) & (slot_mapping < P * PS)
    slots = slot_mapping[keep]
    k_pages[slots // PS, :, slots % PS] = k[keep]
    v_pages[slots // PS, :, slots % PS] = v[keep]


def _gathered(pages, table):
    """pages [P, Hkv, PS, D], table [R, n] page ids (in range) -> [R, Hkv, n * PS, D]."""
    R, n = table.shape
    _, Hkv, PS, D = pages.shape
    return pages[table.long()].permute(0, 2, 1, 3, 4).reshape(R, Hkv, n * PS, D)


def _bad_rows(block_table, seq_lens, num_pages, page_size):
    """Rows whose length the table cannot hold or whose used page ids are out of range (NaN rows)."""
    max_pages = block_table.shape[1]
    used = torch.arange(max_pages, device=block_table.device)[None, :] * page_size < seq_lens[:, None]
    wild = ((block_table < 0) | (block_table >= num_pages)) & used
    return wild.any(1) | (seq_lens < 0) | (seq_lens > max_pages * page_size)


def _decode_torch(q, k_pages, v_pages, block_table, seq_lens, scale):
    B, H, D = q.shape
    P, Hkv, PS, _ = k_pages.shape
    table = block_table.clamp(0, P - 1)
    k, v = _gathered(k_pages, table), _gathered(v_pages, table)
    live = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]      # [B, L]
    k.masked_fill_(~live[:, None, :, None], 0)   # (gathered copies) stale or NaN rows past a length never count
    v.masked_fill_(~live[:, None, :, None], 0)
    # The H / Hkv query heads of a kv head act as that many query rows: no K/V repetition.
    o = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=live[:, None, None, :],
                                       scale=scale).reshape(B, H, D)
    o = torch.where((seq_lens > 0)[:, None, None], o, 0)
    return torch.where(_bad_rows(block_table, seq_lens, P, PS)[:, None, None], float("nan"), o)


def _prefill_torch(q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens, scale):
    T, H, D = q.shape
    P, Hkv, PS, _ = k_pages.shape
    o = torch.empty_like(q)
    bad = _bad_rows(block_table, seq_lens, P, PS).tolist()
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for n in range(len(lens)):
        t0, t1, L = cu[n], cu[n + 1], lens[n]
        if t1 == t0:
            continue
        if bad[n] or L < t1 - t0:
            o[t0:t1] = float("nan")
            continue
        table = block_table[n:n + 1, :triton.cdiv(L, PS)]
        k, v = _gathered(k_pages, table)[:, :, :L], _gathered(v_pages, table)[:, :, :L]
        qpos = torch.arange(L - (t1 - t0), L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]
        o[t0:t1] = F.scaled_dot_product_attention(q[None, t0:t1].transpose(1, 2), k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=True)[0].transpose(0, 1)
    return o


# ---------------------------------------------------------------------------------------------------
# Backends and public functions

def _triton_unsupported(op, *, head_dim):
    if head_dim not in TRITON_HEAD_DIMS:
        return (f"the triton backend takes head dims D in {TRITON_HEAD_DIMS}, got D={head_dim}; "
                "backend='torch' takes any")
    return None


TRITON = Backend("triton", types.SimpleNamespace(write_kv=_write_kv_triton, decode=_decode_triton,
                                                 prefill=_prefill_triton),
                 runs_on="CUDA GPUs; CPU tensors under TRITON_INTERPRET=1 (tests)", dtypes=FLOAT_DTYPES,
                 limits=f"D in {{{', '.join(map(str, TRITON_HEAD_DIMS))}}}", unsupported=_triton_unsupported)
TORCH = Backend("torch", types.SimpleNamespace(write_kv=_write_kv_torch, decode=_decode_torch,
                                               prefill=_prefill_torch),
                runs_on="anywhere (plain PyTorch; the CPU default)", dtypes=FLOAT_DTYPES,
                limits="prefill reads lengths on the host (a sync on CUDA)", custom_ops=False)
BACKENDS = (TRITON, TORCH)


def _check_pages(k_pages, v_pages):
    check_tensor("k_pages", k_pages, ndim=4, dtypes=FLOAT_DTYPES, unit_last_stride=True)
    check_tensor("v_pages", v_pages, ndim=4, dtypes=(k_pages.dtype,), device=k_pages.device, unit_last_stride=True)
    check_shape("v_pages", v_pages, k_pages.shape, " (as k_pages)")
    if k_pages.shape[2] < 1:
        raise ValueError(f"k_pages must have page_size >= 1, got shape {tuple(k_pages.shape)}")


def _check_query(name, q, k_pages):
    check_tensor(name, q, ndim=3, dtypes=(k_pages.dtype,), device=k_pages.device, unit_last_stride=True)
    H, D = q.shape[1:]
    Hkv = k_pages.shape[1]
    if D != k_pages.shape[3]:
        raise ValueError(f"{name} has head dim {D} but k_pages has {k_pages.shape[3]}")
    if H % Hkv:
        raise ValueError(f"{name} has {H} heads, not a multiple of the {Hkv} kv heads of k_pages")


def _check_table(block_table, seq_lens, rows, k_pages):
    device = k_pages.device
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=device, unit_last_stride=True)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device, contiguous=True)
    if block_table.shape[0] != rows:
        raise ValueError(f"block_table must have {rows} rows (one per sequence), got shape {tuple(block_table.shape)}")
    check_shape("seq_lens", seq_lens, (rows,))
    if device.type == "cpu" and rows:
        P, PS = k_pages.shape[0], k_pages.shape[2]
        cap = block_table.shape[1] * PS
        if int(seq_lens.min()) < 0 or int(seq_lens.max()) > cap:
            raise ValueError(f"seq_lens must lie in [0, {cap}] (block_table has {block_table.shape[1]} pages of "
                             f"{PS} per row), got {seq_lens.tolist()}")
        if _bad_rows(block_table, seq_lens, P, PS).any():
            raise ValueError(f"block_table holds a page id outside [0, {P}) among the pages seq_lens uses")


def _backend(op, backend, device, head_dim):
    return resolve_backend(op, backend, BACKENDS, device, head_dim=head_dim).impl


def write_kv(k, v, k_pages, v_pages, slot_mapping, *, backend=None):
    """Write keys/values of Ttot tokens into the paged cache, in place.

    Args:
        k, v: [Ttot, Hkv, D] in the cache's dtype (unit last stride).
        k_pages, v_pages: [num_pages, Hkv, page_size, D], written in place.
        slot_mapping: [Ttot] int64; token t goes to page slot_mapping[t] // page_size at offset
            slot_mapping[t] % page_size; a negative slot is skipped (padding). Slots must be distinct.
        backend: "triton" or "torch" (default: triton on CUDA, torch on CPU).
    """
    _check_pages(k_pages, v_pages)
    check_tensor("k", k, ndim=3, dtypes=(k_pages.dtype,), device=k_pages.device, unit_last_stride=True)
    check_tensor("v", v, ndim=3, dtypes=(k_pages.dtype,), device=k_pages.device, unit_last_stride=True)
    T = k.shape[0]
    check_shape("k", k, (T, k_pages.shape[1], k_pages.shape[3]), " ([Ttot, Hkv, D] of k_pages)")
    check_shape("v", v, k.shape, " (as k)")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=k_pages.device, contiguous=True)
    check_shape("slot_mapping", slot_mapping, (T,))
    if k_pages.device.type == "cpu" and T:
        slots = k_pages.shape[0] * k_pages.shape[2]
        used = slot_mapping[slot_mapping >= 0]
        if used.numel() and int(used.max()) >= slots:
            raise ValueError(f"slot_mapping holds slot {int(used.max())} but the cache has {slots} slots")
        if used.unique().numel() != used.numel():
            raise ValueError("slot_mapping writes one slot twice")
    _backend("write_kv", backend, k_pages.device, k_pages.shape[3]).write_kv(k, v, k_pages, v_pages, slot_mapping)


def paged_attention_decode(q, k_pages, v_pages, block_table, seq_lens, scale, *, backend=None):
    """One query token per row against its cached keys/values (see the module docstring).

    Args:
        q: [B, H, D] in the cache's dtype; H a multiple of the cache's Hkv.
        k_pages, v_pages: [num_pages, Hkv, page_size, D].
        block_table: [B, max_pages] int32, row b's pages in order (entries past its length are not read).
        seq_lens: [B] int32, cached tokens of each row (0: a padding row, zeros out).
        scale: softmax scale (usually D ** -0.5).
        backend: "triton" or "torch" (default: triton on CUDA, torch on CPU).

    Returns:
        o [B, H, D] in q's dtype. No host synchronisation on CUDA (capturable in a CUDA graph; warm it
        up eagerly first, as every Triton kernel compiles on its first call).
    """
    _check_pages(k_pages, v_pages)
    _check_query("q", q, k_pages)
    _check_table(block_table, seq_lens, q.shape[0], k_pages)
    return _backend("paged_attention_decode", backend, q.device, q.shape[2]).decode(
        q, k_pages, v_pages, block_table, seq_lens, float(scale))


def paged_attention_prefill(q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens, scale, *, backend=None):
    """Causal attention of packed query chunks against their sequences' cached keys/values.

    Args:
        q: [Ttot, H, D] packed: sequence n's queries are rows cu_seqlens_q[n] .. cu_seqlens_q[n+1]-1, the
            last ones of its seq_lens[n] cached tokens (their keys/values already written).
        k_pages, v_pages: [num_pages, Hkv, page_size, D].
        block_table: [N, max_pages] int32.
        cu_seqlens_q: [N + 1] int32, non-decreasing from 0 to Ttot.
        seq_lens: [N] int32, each at least its query count.
        scale: softmax scale.
        backend: "triton" or "torch" (default: triton on CUDA, torch on CPU).

    Returns:
        o [Ttot, H, D] in q's dtype.
    """
    _check_pages(k_pages, v_pages)
    _check_query("q", q, k_pages)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=q.device, contiguous=True)
    N = cu_seqlens_q.shape[0] - 1
    if N < 0:
        raise ValueError("cu_seqlens_q must hold at least one entry (0)")
    _check_table(block_table, seq_lens, N, k_pages)
    if q.device.type == "cpu":
        cu = cu_seqlens_q.tolist()
        if cu[0] != 0 or cu[-1] != q.shape[0] or any(a > b for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens_q must rise from 0 to Ttot={q.shape[0]}, got {cu}")
        short = [n for n in range(N) if seq_lens[n] < cu[n + 1] - cu[n]]
        if short:
            raise ValueError(f"seq_lens[{short[0]}] = {int(seq_lens[short[0]])} is shorter than its "
                             f"{cu[short[0] + 1] - cu[short[0]]} queries")
    return _backend("paged_attention_prefill", backend, q.device, q.shape[2]).prefill(
        q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens, float(scale))
