"""Blockwise lightning-attention prefill in Triton: a two-pass segmented scan (forward and backward).

One generic recurrence serves the forward pass and all three gradients. Per (sequence, head), with
rate s (lambda = exp(-s)) and time running forwards, or backwards through each sequence (`reverse`):

    S_t = lambda S_{t-1} + kv_scale * k_t^T v_t        S_{-1} = h0 (zeros if absent)
    o_t = out_scale * q_t S_t                           final = S_{L-1}

Each sequence is cut into segments of `segment_len` tokens (a multiple of 64), so that
(segments x heads x value tiles) programs fill the GPU without ever storing a per-block state. Head
dims D, Dv in {16, 32, 64, 128, 256}; the kernels walk a segment in blocks of BT tokens and split Dv
into tiles of BV columns (autotuned, see OUTPUT_TIERS):

1. `_segment_kv_kernel` reads k, v of one segment once and writes its decayed key-value sum
   sum_j lambda^(end-1-j) k_j^T v_j (fp32, [D, Dv], one program per value tile). A sequence's last
   segment needs no sum (only the final state would read it, and pass 3 carries that on chip), so a
   sequence that fits one segment costs pass 1 nothing. When the final state is returned,
   half-precision decayed keys go to the tensor cores as a hi + lo pair, so the sums are as exact as an
   fp32 computation on the same inputs; otherwise the states only feed the half-precision output and
   one dot suffices.
2. `_segment_scan_kernel` walks the segments of each sequence with two or more (element-parallel over
   the state) and replaces every sum by the state at its segment's start.
3. `_segment_output_kernel` runs one segment block by block, keeping a [D, BV] fp32 state tile on
   chip: intra-block masked decayed attention with tl.dot plus the inter-block q . S term. A
   one-segment sequence starts from h0 itself; the last segment of each sequence writes the final state
   (its state update then takes the decayed values as a hi + lo pair, the same exactness as pass 1).

Short sequences, as packed training batches and serving prefill produce them, are one segment each: one
kernel reads q, k, v and h0 and writes o and the final state, the floor's traffic.

Every decay factor is exp(-s * distance) with distance >= 0: small rates (the last layer) stay exact,
large rates underflow to zero, nothing overflows. The only positive exponent is one step, exp(+s),
which the backward needs for its shifted initial state (see `reverse` in `chunk_lightning`).

Memory traffic: q, k, v read once and o written once by pass 3 (its value tiles of one segment are
launched next to each other, so the second tile finds q and k in L2), k and v read once more by
pass 1 (except each sequence's last segment: with few long segments pass 1 reads little), plus 4
state-sized fp32 tiles per segment (~3% at the default length).
"""

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from m1_kernels.dispatch import autotune_prune, triton_interpreted

BLOCK_T = 64          # segment lengths are multiples of this; the kernels' blocks (BT) divide it
SCAN_ELEMENTS = 1024  # state elements per scan program
MAX_SEGMENT = 16384


# Config tiers, each (BV, BT, num_warps, num_stages) = (value columns, tokens per block, warps, stages).
# The autotuner times the configs of the first tier that has any fitting config for the call's head dims
# and dtype (`_fitting_tier`); the first fitting config is what M1_TRITON_CONFIG=0 (the test suites)
# runs. Tier 1 is the set the H200 sweeps chose from at D = Dv = 128 (bench/NOTES.md); tier 2 serves
# what tier 1 cannot: D = 256 and fp32 at large head dims.
#
# ptxas (sm_90a, bf16, 16-byte-aligned pointers as Triton specialises them), output kernel: D = Dv = 128
# BV 64 uses 245 registers at 4 warps (2 programs per SM), 207 at 8; BV 128 255 at 8 (3 stages spill 56
# bytes); BV 64 at 8 warps, 2 stages was never better than 3 stages. D = Dv = 256: BV 64 BT 64 at 8 warps
# 255 registers, no spill, 168 KB shared memory; BV 32 at 4 warps 244 registers, 148 KB. Segment-sum
# kernel, D = Dv = 256: BV 128 at 8 warps 255 registers, 96 KB; BV 64 BT 32 184 registers.
OUTPUT_TIERS = [[(64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3)],
                [(64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)]]
KV_TIERS = [[(128, 64, 8, 2), (128, 64, 8, 3)],
            [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 1)]]
# fp32 state-tile elements per thread kept in registers (the [D, BV] tile lives across the block loop):
# above this ptxas runs out of registers and spills.
MAX_TILE_PER_THREAD = 64


def _configs(tiers):
    """Autotune configs; one under the interpreter (it would time nothing useful)."""
    options = [c for tier in tiers for c in tier]
    if triton_interpreted():
        options = options[:1]
    return [triton.Config(dict(BV=bv, BT=bt), num_warps=w, num_stages=st) for bv, bt, w, st in options]


@functools.cache
def _shared_memory_limit(device_index):
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _fitting_tier(tiers, shared_bytes, tensor_arg):
    """`early_config_prune` for a kernel with config `tiers`: the first tier's configs that fit the call
    (value tiles clipped to Dv, duplicates dropped; registers and an upper bound of the shared memory,
    `shared_bytes(D, TV, BT, stages, element size)`, within the GPU's limits). Constexprs arrive in
    kwargs, runtime arguments in named_args."""
    def prune(configs, named_args, **kwargs):
        D, DV = kwargs["D"], kwargs["DV"]
        x = named_args[tensor_arg]
        limit = _shared_memory_limit(x.device.index)
        for tier in tiers:
            kept, seen = [], set()
            for bv, bt, w, st in tier:
                tv = min(bv, DV)
                if (tv, bt, w, st) in seen or D * tv > MAX_TILE_PER_THREAD * 32 * w \
                        or shared_bytes(D, tv, bt, st, x.element_size()) > limit:
                    continue
                seen.add((tv, bt, w, st))
                kept.append(triton.Config(dict(BV=bv, BT=bt), num_warps=w, num_stages=st))
            if kept:
                return kept
        raise ValueError(f"no Triton lightning config fits D={D}, Dv={DV} on this GPU")
    return prune


def _output_shared_bytes(D, tv, bt, stages, size):
    """q, k [BT, D] and v [BT, TV] per pipeline stage, plus staged dot operands (measured within it)."""
    return (stages * (2 * bt * D + bt * tv) + bt * tv + bt * D) * size


def _kv_shared_bytes(D, tv, bt, stages, size):
    """k [BT, D] and v [BT, TV] per pipeline stage, plus the decayed keys (hi and lo) as dot operands."""
    return (stages * (bt * D + bt * tv) + 2 * bt * D) * size


@triton.jit
def _segment_bounds(g, seg_seq_ptr, seg_lo_ptr, cu_ptr, T, G, SEG, VARLEN: tl.constexpr):
    """Sequence n, its first token bos and length L, and the segment's logical token range [lo, hi).
    Unused varlen table rows (n < 0) get an empty range."""
    if VARLEN:
        n = tl.load(seg_seq_ptr + g)
        lo = tl.load(seg_lo_ptr + g)
        n_safe = tl.maximum(n, 0)
        bos = tl.load(cu_ptr + n_safe).to(tl.int64)
        L = (tl.load(cu_ptr + n_safe + 1).to(tl.int64) - bos).to(tl.int32)
        hi = tl.where(n >= 0, tl.minimum(lo + SEG, L), lo)
    else:
        n = g // G
        lo = (g % G) * SEG
        bos = n.to(tl.int64) * T
        L = T
        hi = tl.minimum(lo + SEG, L)
    return n, bos, L, lo, hi


@triton.jit
def _sequence_bases(q_ptr, k_ptr, v_ptr, o_ptr, bos, L, h, H: tl.constexpr, D: tl.constexpr,
                    DV: tl.constexpr, REVERSE: tl.constexpr):
    """Pointers to logical position 0 of a sequence (its last token in reverse) for head h, and the
    row strides (negative in reverse) of the [T, H, D] and [T, H, Dv] layouts."""
    first = bos + (L - 1) if REVERSE else bos
    sign = -1 if REVERSE else 1
    return (q_ptr + first * (H * D) + h * D, k_ptr + first * (H * D) + h * D, v_ptr + first * (H * DV) + h * DV,
            o_ptr + first * (H * DV) + h * DV, sign * (H * D), sign * (H * DV))


@triton.autotune(configs=_configs(KV_TIERS), key=["H", "D", "DV", "REVERSE"],
                 prune_configs_by=dict(early_config_prune=autotune_prune(
                     _fitting_tier(KV_TIERS, _kv_shared_bytes, "k_ptr"))))
@triton.jit
def _segment_kv_kernel(k_ptr, v_ptr, slope_ptr, kv_ptr, seg_seq_ptr, seg_lo_ptr, cu_ptr, T, G, SEG, kv_scale,
                       H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                       REVERSE: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
                       SPLIT: tl.constexpr):
    TV: tl.constexpr = min(BV, DV)  # value columns of this program
    g = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    n, bos, L, lo, hi = _segment_bounds(g, seg_seq_ptr, seg_lo_ptr, cu_ptr, T, G, SEG, VARLEN)
    # The last segment's sum would only feed the final state, which pass 3 carries on chip: it (and an
    # unused table row) reads and writes nothing.
    needed = hi < L
    hi = tl.where(needed, hi, lo)
    s = tl.load(slope_ptr + h)
    rows = tl.arange(0, BT)
    d = tl.arange(0, D)
    e = iv * TV + tl.arange(0, TV)
    _, k_seq, v_seq, _, row_stride_k, row_stride_v = _sequence_bases(
        k_ptr, k_ptr, v_ptr, v_ptr, bos, L, h, H, D, DV, REVERSE)
    acc = tl.zeros([D, TV], dtype=tl.float32)
    for b0 in range(lo, hi, BT):
        t = b0 + rows
        live = t < hi
        p_k = tl.make_block_ptr(k_seq, (hi, D), (row_stride_k, 1), (b0, 0), (BT, D), (1, 0))
        p_v = tl.make_block_ptr(v_seq, (hi, DV), (row_stride_v, 1), (b0, iv * TV), (BT, TV), (1, 0))
        kb = tl.load(p_k, boundary_check=(0,), padding_option="zero")
        vb = tl.load(p_v, boundary_check=(0,), padding_option="zero")
        w = tl.where(live, tl.exp(-s * tl.maximum(hi - 1 - t, 0).to(tl.float32)), 0.0)
        kw32 = kb.to(tl.float32) * w[:, None]
        kw = kw32.to(kb.dtype)
        acc = tl.dot(tl.trans(kw), vb, acc, input_precision=DOT_PREC)
        if SPLIT:  # k * decay in two half-precision parts: the sums (hence states) stay fp32-exact
            kw_lo = (kw32 - kw.to(tl.float32)).to(kb.dtype)
            acc = tl.dot(tl.trans(kw_lo), vb, acc, input_precision=DOT_PREC)
    out = kv_ptr + (g.to(tl.int64) * H + h) * (D * DV) + d[:, None] * DV + e[None, :]
    tl.store(out, acc * kv_scale, mask=needed)


@triton.jit
def _state_row(slot_ptr, n, num_slots, USE_SLOTS: tl.constexpr):
    """Row of sequence n's initial and final state, and whether it exists: n itself, or with a slot cache
    its slot (an invalid slot starts from zeros and writes nothing)."""
    if USE_SLOTS:
        slot = tl.load(slot_ptr + n)
        return tl.maximum(slot, 0).to(tl.int64), (slot >= 0) & (slot < num_slots)
    return n.to(tl.int64), n >= 0


@triton.jit
def _segment_scan_kernel(kv_ptr, h0_ptr, final_ptr, slope_ptr, slot_ptr, seq_seg0_ptr, cu_ptr, T, G, SEG,
                         num_slots, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BE: tl.constexpr,
                         HAS_H0: tl.constexpr, HAS_FINAL: tl.constexpr, USE_SLOTS: tl.constexpr,
                         REVERSE: tl.constexpr, VARLEN: tl.constexpr):
    """Start states of the segments of sequences with two or more segments (pass 3 starts a one-segment
    sequence from h0 itself), and the final state of an empty sequence (pass 3 writes the others)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BE + tl.arange(0, BE)
    if VARLEN:
        L = (tl.load(cu_ptr + n + 1) - tl.load(cu_ptr + n)).to(tl.int32)
        g0 = tl.load(seq_seg0_ptr + n)
    else:
        L = T
        g0 = n * G
    segments = tl.cdiv(L, SEG)
    if segments != 1:
        s = tl.load(slope_ptr + h)
        row, exists = _state_row(slot_ptr, n, num_slots, USE_SLOTS)
        S = tl.zeros([BE], dtype=tl.float32)
        if HAS_H0:
            S = tl.load(h0_ptr + (row * H + h) * (D * DV) + offs, mask=exists, other=0.0)
        if segments == 0:
            if HAS_FINAL:  # an empty sequence's final state is its initial state
                tl.store(final_ptr + (row * H + h) * (D * DV) + offs, S, mask=exists)
        else:
            if REVERSE:  # the reverse recurrence takes its initial state one step early
                S = S * tl.exp(s)
            for j in range(0, segments - 1):
                ptr = kv_ptr + ((g0 + j).to(tl.int64) * H + h) * (D * DV) + offs
                kv = tl.load(ptr)
                tl.store(ptr, S)
                S = S * tl.exp(-s * SEG) + kv
            tl.store(kv_ptr + ((g0 + segments - 1).to(tl.int64) * H + h) * (D * DV) + offs, S)


class _KeepSlotStates:
    """Autotuning hooks of the output kernel. With a slot cache it reads its initial states from and writes its
    final states to the same rows, so every timed launch would advance them once more: the hooks save the
    rows the launch writes and put them back."""

    def __init__(self):
        self.saved = None

    def before(self, nargs, reset_only=False):
        final, slots = nargs["final_ptr"], nargs["slot_ptr"]
        if reset_only or final is None or slots is None:
            return
        rows = slots[(slots >= 0) & (slots < final.shape[0])].long()
        self.saved = rows, final[rows].clone()

    def after(self, nargs, exception):
        if self.saved is not None:
            rows, states = self.saved
            nargs["final_ptr"][rows] = states
            self.saved = None


_keep_slot_states = _KeepSlotStates()


# LEN_BUCKET (the mean sequence length, a power of two up to the segment length) keys the tuning: a pack of
# short sequences is thousands of programs of a few blocks each, a long sequence fewer and longer ones, and one
# config tuned on whichever came first would serve both.
@triton.autotune(configs=_configs(OUTPUT_TIERS), key=["H", "D", "DV", "REVERSE", "LEN_BUCKET"],
                 prune_configs_by=dict(early_config_prune=autotune_prune(
                     _fitting_tier(OUTPUT_TIERS, _output_shared_bytes, "q_ptr"))),
                 pre_hook=_keep_slot_states.before, post_hook=_keep_slot_states.after)
@triton.jit(do_not_specialize=["LEN_BUCKET"])  # a tuning key only: no compiled variant per value
def _segment_output_kernel(q_ptr, k_ptr, v_ptr, o_ptr, slope_ptr, start_ptr, h0_ptr, final_ptr, seg_seq_ptr,
                           seg_lo_ptr, cu_ptr, slot_ptr, T, G, SEG, num_slots, out_scale, kv_scale,
                           stride_start_row, stride_start_d, stride_start_e, LEN_BUCKET,
                           H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
                           BV: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
                           USE_SLOTS: tl.constexpr, HAS_H0: tl.constexpr, HAS_FINAL: tl.constexpr,
                           SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    TV: tl.constexpr = min(BV, DV)  # value columns of this program
    iv = tl.program_id(0)  # value tiles of one segment run side by side: q, k blocks come from L2
    g = tl.program_id(1)
    h = tl.program_id(2)
    n, bos, L, lo, hi = _segment_bounds(g, seg_seq_ptr, seg_lo_ptr, cu_ptr, T, G, SEG, VARLEN)
    s = tl.load(slope_ptr + h)
    rows = tl.arange(0, BT)
    d = tl.arange(0, D)
    e = iv * TV + tl.arange(0, TV)
    tile = (h * D + d[:, None]) * DV + e[None, :]  # this program's [D, TV] tile of one [H, D, Dv] state
    row, exists = _state_row(slot_ptr, tl.maximum(n, 0), num_slots, USE_SLOTS)
    last = (hi >= L) & (n >= 0)
    if (lo == 0) & last:  # the whole sequence: its start state is h0 (the scan skipped it)
        S = tl.zeros([D, TV], dtype=tl.float32)
        if HAS_H0:
            S = tl.load(h0_ptr + row * (H * D * DV) + tile, mask=exists, other=0.0)
            if REVERSE:  # the reverse recurrence takes its initial state one step early
                S = S * tl.exp(s)
    else:
        # Strided: the start states may be another call's, transposed (see SegmentStarts).
        S = tl.load(start_ptr + g.to(tl.int64) * stride_start_row + h * (D * DV) + d[:, None] * stride_start_d
                    + e[None, :] * stride_start_e)
    q_decay = tl.exp(-s * (rows + 1).to(tl.float32))
    dist = rows[:, None] - rows[None, :]
    intra_decay = tl.where(dist >= 0, tl.exp(-s * tl.maximum(dist, 0).to(tl.float32)), 0.0) * kv_scale
    q_seq, k_seq, v_seq, o_seq, row_stride_qk, row_stride_vo = _sequence_bases(
        q_ptr, k_ptr, v_ptr, o_ptr, bos, L, h, H, D, DV, REVERSE)
    fill = 0.0
    if USE_SLOTS:  # padding sequence (negative slot): zeros; slot out of range: NaN (cannot be checked
        slot = tl.load(slot_ptr + tl.maximum(n, 0))  # on the host without a sync)
        fill = tl.where(slot < 0, 0.0, float("nan"))
    for b0 in range(lo, hi, BT):
        t = b0 + rows
        live = t < hi
        # Block pointers over the segment's logical rows [0, hi): rows past the segment read zeros.
        p_q = tl.make_block_ptr(q_seq, (hi, D), (row_stride_qk, 1), (b0, 0), (BT, D), (1, 0))
        p_k = tl.make_block_ptr(k_seq, (hi, D), (row_stride_qk, 1), (b0, 0), (BT, D), (1, 0))
        p_v = tl.make_block_ptr(v_seq, (hi, DV), (row_stride_vo, 1), (b0, iv * TV), (BT, TV), (1, 0))
        qb = tl.load(p_q, boundary_check=(0,), padding_option="zero")
        kb = tl.load(p_k, boundary_check=(0,), padding_option="zero")
        vb = tl.load(p_v, boundary_check=(0,), padding_option="zero")
        # Decays go on the smaller operand or the result (per-row factors commute with the dots).
        o = tl.dot(qb, S.to(qb.dtype), input_precision=DOT_PREC) * q_decay[:, None]
        scores = tl.dot(qb, tl.trans(kb), input_precision=DOT_PREC) * intra_decay
        o = tl.dot(scores.to(vb.dtype), vb, o, input_precision=DOT_PREC) * out_scale
        if USE_SLOTS:
            o = tl.where(exists, o, fill)
        p_o = tl.make_block_ptr(o_seq, (hi, DV), (row_stride_vo, 1), (b0, iv * TV), (BT, TV), (1, 0))
        tl.store(p_o, o.to(o_ptr.dtype.element_ty), boundary_check=(0,))
        blen = tl.minimum(hi - b0, BT)
        w = tl.where(live, tl.exp(-s * tl.maximum(blen - 1 - rows, 0).to(tl.float32)), 0.0) * kv_scale
        vw32 = vb.to(tl.float32) * w[:, None]
        vw = vw32.to(vb.dtype)
        S = tl.dot(tl.trans(kb), vw, S * tl.exp(-s * blen.to(tl.float32)), input_precision=DOT_PREC)
        if SPLIT & last:  # the final state's sums as exact as pass 1's: decayed values as hi + lo
            S = tl.dot(tl.trans(kb), (vw32 - vw.to(tl.float32)).to(vb.dtype), S, input_precision=DOT_PREC)
    if HAS_FINAL:
        if last:
            if REVERSE:
                S = S * tl.exp(-s)
            tl.store(final_ptr + row * (H * D * DV) + tile, S, mask=exists)


def default_segment_len(total_tokens: int, heads: int, dv: int, device: torch.device) -> int:
    """Segment length (a power of two, >= BLOCK_T) giving about 4 output programs per SM (2 waves at 2
    resident per SM). Longer segments mean fewer sums for pass 1 to read (it skips each sequence's last
    segment), shorter ones fill the GPU: bench/sweep_prefill.py on the H200 puts the optimum at 3-4
    programs per SM from T 8K H64 to T 1M H8 (bench/NOTES.md)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    work = total_tokens * heads * max(dv // 64, 1) / (4 * sms)
    seg = 1 << max(0, round(math.log2(max(work, 1.0))))
    return int(min(max(seg, BLOCK_T), MAX_SEGMENT))


def _segment_table(cu_seqlens, total, seg):
    """Varlen segment table, built on the device without a host sync: a fixed upper bound of
    cdiv(total, seg) + N rows; row g holds (sequence or -1, first logical token) and each sequence's
    first row. Segments never cross sequence boundaries."""
    N = cu_seqlens.shape[0] - 1
    rows = triton.cdiv(total, seg) + N
    cu = cu_seqlens.to(torch.int64)
    nseg = (cu[1:] - cu[:-1] + seg - 1) // seg
    ends = torch.cumsum(nseg, 0)
    first = ends - nseg
    g = torch.arange(rows, device=cu.device)
    n = torch.searchsorted(ends, g, right=True)
    valid = n < N
    lo = (g - first[n.clamp(max=N - 1)]) * seg
    seg_seq = torch.where(valid, n, -1).to(torch.int32)
    seg_lo = torch.where(valid, lo, 0).to(torch.int32)
    return rows, seg_seq, seg_lo, first.to(torch.int32)


@dataclasses.dataclass
class SegmentStarts:
    """The segment start states of one chunk_lightning call ([rows, H, D, Dv] fp32; the row of a one-segment
    sequence is unused, its start is h0) and the segment length that cut the sequences."""
    states: torch.Tensor
    segment_len: int

    def transposed(self):
        """The start states of the recurrence with k and v swapped and h0 transposed: sum_j w_j v_j^T k_j
        is the transpose of sum_j w_j k_j^T v_j (the backward's dk and dv passes)."""
        return SegmentStarts(self.states.transpose(-1, -2), self.segment_len)


def chunk_lightning(q, k, v, slope, h0, cu_seqlens, *, out_scale=1.0, kv_scale=1.0, reverse=False,
                    final=None, slot_idx=None, segment_len=None, starts=None, return_starts=False):
    """Run the generic recurrence (module docstring) on q/k [B, T, H, D], v [B, T, H, Dv].

    h0: [N, H, D, Dv] fp32 initial states, or the slot cache when `slot_idx` [N] is given.
    final: None (no final state), "new" (return a fresh [N, H, D, Dv] fp32 tensor) or, with slot_idx,
        the slot cache that receives each sequence's final state in place.
    reverse: time runs backwards within each sequence, h0 enters at the last token with decay
        lambda^0 (not lambda^1) and the final state is multiplied by lambda: what dk, dv and
        d(initial state) need.
    starts: a SegmentStarts of an earlier call on the same sequences whose states are this call's (for
        instance another call's `.transposed()`): passes 1 and 2 are skipped. Not with `final`.
    return_starts: also return this call's SegmentStarts.
    Returns (o [B, T, H, Dv] in q's dtype, final state tensor or None[, SegmentStarts]).
    """
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    q, k, v = (x.contiguous() for x in (q, k, v))
    device = q.device
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=device)
    if final == "new":
        final = torch.empty(N, H, D, Dv, dtype=torch.float32, device=device)
    if starts is not None:
        if final is not None:
            raise ValueError("chunk_lightning: starts from another call leave no pass to form `final`")
        segment_len = starts.segment_len
    seg = segment_len or default_segment_len(B * T, H, Dv, device)
    assert seg % BLOCK_T == 0
    if cu_seqlens is None:
        G = triton.cdiv(T, seg)
        rows, seg_seq, seg_lo, seg0, cu = B * G, None, None, None, None
    else:
        G = 0
        rows, seg_seq, seg_lo, seg0 = _segment_table(cu_seqlens, B * T, seg)
        cu = cu_seqlens
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    # Half-precision decayed keys as a hi + lo pair only where a final state is returned: start states
    # that only feed a half-precision output do not need fp32-exact sums.
    exact_sums = final is not None and q.dtype != torch.float32
    use_slots = slot_idx is not None
    num_slots = h0.shape[0] if h0 is not None else 0
    value_tiles = lambda meta: triton.cdiv(Dv, min(meta["BV"], Dv))  # noqa: E731
    if starts is not None:
        states = starts.states
        if states.shape != (rows, H, D, Dv) or states.stride(1) != D * Dv:
            raise ValueError(f"chunk_lightning: starts of shape {tuple(states.shape)} are not this call's "
                             f"[{rows}, {H}, {D}, {Dv}] segment states")
    else:
        states = torch.empty(rows, H, D, Dv, dtype=torch.float32, device=device)
    if rows and starts is None:
        _segment_kv_kernel[lambda meta: (rows, H, value_tiles(meta))](
            k, v, slope, states, seg_seq, seg_lo, cu, T, G, seg, float(kv_scale), H=H, D=D, DV=Dv,
            REVERSE=reverse, VARLEN=cu is not None, DOT_PREC=dot_prec, SPLIT=exact_sums)
    if N and starts is None:
        _segment_scan_kernel[(N, H, triton.cdiv(D * Dv, SCAN_ELEMENTS))](
            states, h0, final, slope, slot_idx, seg0, cu, T, G, seg, num_slots, H=H, D=D, DV=Dv,
            BE=min(SCAN_ELEMENTS, D * Dv), HAS_H0=h0 is not None, HAS_FINAL=final is not None,
            USE_SLOTS=use_slots, REVERSE=reverse, VARLEN=cu is not None, num_warps=4)
    if rows:
        len_bucket = min(seg, triton.next_power_of_2(max(1, B * T // max(N, 1))))
        _segment_output_kernel[lambda meta: (value_tiles(meta), rows, H)](
            q, k, v, o, slope, states, h0, final, seg_seq, seg_lo, cu, slot_idx, T, G, seg, num_slots,
            float(out_scale), float(kv_scale), states.stride(0), states.stride(2), states.stride(3), len_bucket,
            H=H, D=D, DV=Dv, REVERSE=reverse, VARLEN=cu is not None, USE_SLOTS=use_slots, HAS_H0=h0 is not None,
            HAS_FINAL=final is not None, SPLIT=exact_sums, DOT_PREC=dot_prec)
    if return_starts:
        return o, final, SegmentStarts(states, seg)
    return o, final
