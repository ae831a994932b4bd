"""One-token lightning-attention decode in Triton, on a slot cache of fp32 states.

    S[slot] <- exp(-s_h) S[slot] + k^T v        o = scale * q S[slot]

One program owns a [D, BV] tile of one (row, head) state: it reads the tile once, writes it once and
writes its BV outputs, so the kernel moves exactly the floor's bytes (plus q, k, v). Slots are read
on the device: a negative slot (padding) writes zeros and touches no state; a slot >= S (not checked
on the host, which would synchronise) writes NaN and touches no state; a bad rate (negative or not
finite) makes its head's outputs and states NaN. No host sync: CUDA-graph safe.
"""

import torch
import triton
import triton.language as tl

# Tiles wide enough for long coalesced rows, narrow enough that small batches still fill the GPU.
_MIN_PROGRAMS = 2048


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, slope_ptr, state_ptr, slot_ptr, o_ptr, stride_qb, stride_qh,
                   stride_kb, stride_kh, stride_vb, stride_vh, num_slots, scale,
                   H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    # Launch order is value tile, then head, then row: the programs resident at one time stream whole
    # rows of the cache (H * D * DV contiguous floats each), not pieces H * D * DV floats apart.
    pid = tl.program_id(0)
    e = (pid % (DV // BV)) * BV + tl.arange(0, BV)
    h = (pid // (DV // BV)) % H
    b = pid // (DV // BV * H)
    d = tl.arange(0, D)
    slot = tl.load(slot_ptr + b)
    out = o_ptr + (b * H + h) * DV + e
    if (slot < 0) | (slot >= num_slots):
        fill = tl.where(slot < 0, tl.zeros([BV], tl.float32), float("nan"))
        tl.store(out, fill.to(o_ptr.dtype.element_ty))
    else:
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32)
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + d).to(tl.float32)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + e).to(tl.float32)
        rate = tl.load(slope_ptr + h)
        # A negative or non-finite rate (not checked on the host: that would synchronise) gives NaN.
        decay = tl.where((rate >= 0) & (rate < float("inf")), tl.exp(-rate), float("nan"))
        tile = state_ptr + (slot.to(tl.int64) * H + h) * (D * DV) + d[:, None] * DV + e[None, :]
        S = tl.load(tile) * decay + k[:, None] * v[None, :]
        tl.store(tile, S)
        o = tl.sum(q[:, None] * S, axis=0) * scale
        tl.store(out, o.to(o_ptr.dtype.element_ty))


def _value_tile(rows: int, dv: int) -> int:
    bv = min(dv, 64)  # 32 KB tiles at 8 warps: many resident programs, many loads in flight
    while bv > 16 and rows * triton.cdiv(dv, bv) < _MIN_PROGRAMS:
        bv //= 2
    return bv


def fused_recurrent_lightning_decode(q, k, v, slope, state, slot_idx, scale, tile=None):
    """q, k [B, H, D]; v [B, H, Dv] (unit last stride); state [S, H, D, Dv] fp32 contiguous, updated in
    place; slot_idx [B] int32. Returns o [B, H, Dv] in q's dtype. `tile` = (BV, num_warps) forces a
    tiling (bench/sweep_decode.py); None picks it from the batch."""
    B, H, D = q.shape
    Dv = v.shape[-1]
    o = torch.empty(B, H, Dv, dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    bv = _value_tile(B * H, Dv) if tile is None else tile[0]
    warps = max(1, min(8, D * bv // 1024)) if tile is None else tile[1]  # 8 warps for 128 x 64 tiles
    _decode_kernel[(B * H * (Dv // bv),)](q, k, v, slope, state, slot_idx, o, q.stride(0), q.stride(1),
                                          k.stride(0), k.stride(1), v.stride(0), v.stride(1), state.shape[0],
                                          float(scale), H=H, D=D, DV=Dv, BV=bv, num_warps=warps)
    return o
