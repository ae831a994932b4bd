"""The "cuda" backend: thin wrappers that hand validated tensors to the csrc extension."""

import functools

import torch

from m1_kernels.extension import DTYPE_CODES, cuda_extension, ptr, stream_of


def lightning_decode(q, k, v, slope, state, slot_idx, scale, variant=0):
    """`variant` forces one of the kernel's tilings (bench/sweep_decode.py); 0 is the tuned default."""
    ext = cuda_extension(q.device)
    B, H, D = q.shape
    Dv = v.shape[-1]
    out = torch.empty(B, H, Dv, dtype=q.dtype, device=q.device)
    ext.lightning_decode(
        ptr(q), ptr(k), ptr(v), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ptr(slope), ptr(state), ptr(slot_idx), ptr(out), B, H, D, Dv, state.shape[0], DTYPE_CODES[q.dtype],
        float(scale), stream_of(q), variant)
    return out


# Segments are sized for about this many blocks per SM of the sums and output kernels: enough for
# whole waves, few enough that the sums (which skip each sequence's last segment) read little.
SEGMENT_BLOCKS_PER_SM = 8


def _segment_table(B, T, H, Dv, cu_seqlens, device, blocks_per_sm=None):
    """Cut every sequence into segments of whole 64-token chunks, enough of them to fill the GPU.

    Returns int32 tables on `device`: segments [G, 4] (row b, start t, length, sequence) and
    sequences [N, 2] (first segment, count). Fixed-length tables are cached per shape, so a repeated
    call does no host work or copy; packed sequences read cu_seqlens on the host once per call.
    """
    blocks_per_sm = blocks_per_sm or SEGMENT_BLOCKS_PER_SM
    if cu_seqlens is None:
        return _fixed_length_table(B, T, H, Dv, device, blocks_per_sm)
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return _build_table([0] * len(lengths), bounds[:-1], lengths, H, Dv, device, blocks_per_sm)


@functools.lru_cache(maxsize=64)
def _fixed_length_table(B, T, H, Dv, device, blocks_per_sm):
    return _build_table(list(range(B)), [0] * B, [T] * B, H, Dv, device, blocks_per_sm)


def _build_table(rows, starts, lengths, H, Dv, device, blocks_per_sm):
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks_per_segment = H * (Dv // 64)
    total = max(sum(lengths), 1)
    seg_len = -(-total * blocks_per_segment // (blocks_per_sm * sms))
    seg_len = min(max(256, -(-seg_len // 64) * 64), 16384)
    segments, sequences = [], []
    for n, (row, start, length) in enumerate(zip(rows, starts, lengths)):
        first = len(segments)
        segments += [(row, start + t, min(seg_len, length - t), n) for t in range(0, length, seg_len)]
        sequences.append((first, len(segments) - first))
    as_table = lambda rows_, width: torch.tensor(rows_, dtype=torch.int32).reshape(-1, width).to(device)  # noqa: E731
    return as_table(segments, 4), as_table(sequences, 2)


def _prefill(q, k, v, slope, initial_state, cu_seqlens, scale, slot_idx=None, output_final_state=True,
             blocks_per_sm=None):
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the cuda backend's prefill takes bf16 or fp16 q/k/v (tensor cores), got {q.dtype}; "
                        "use backend='triton' or 'torch' for fp32")
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    if D not in (64, 128) or Dv not in (64, 128):
        raise ValueError(f"the cuda backend supports head dims D, Dv in (64, 128), got D={D}, Dv={Dv}")
    ext = cuda_extension(q.device)
    # 16-byte copies need 8-element-aligned strides and addresses.
    q, k, v = (x if all(s % 8 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0 else x.contiguous()
               for x in (q, k, v))
    segments, sequences = _segment_table(B, T, H, Dv, cu_seqlens, q.device, blocks_per_sm)
    N = sequences.shape[0]
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=q.device)
    final = (torch.empty(N, H, D, Dv, dtype=torch.float32, device=q.device)
             if slot_idx is None and output_final_state else None)
    work = torch.empty(segments.shape[0], H, D, Dv, dtype=torch.float32, device=q.device)
    strides = [s for x in (q, k, v, o) for s in (x.stride(0), x.stride(1), x.stride(2))]
    ext.lightning_prefill_forward(
        ptr(q), ptr(k), ptr(v), ptr(o), strides, ptr(slope), ptr(initial_state), ptr(final), ptr(slot_idx),
        ptr(work), ptr(segments), ptr(sequences), segments.shape[0], N, H, D, Dv, DTYPE_CODES[q.dtype],
        float(scale), stream_of(q))
    return o, final


def lightning_fwd(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state=True, blocks_per_sm=None):
    """Tensor-core forward (csrc/lightning_prefill.cu); bf16/fp16 only. Returns (o, final states or None);
    without final states the kernels skip each sequence's last segment sum. `blocks_per_sm` overrides
    SEGMENT_BLOCKS_PER_SM (bench/sweep_prefill.py)."""
    return _prefill(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state=output_final_state,
                    blocks_per_sm=blocks_per_sm)


def lightning_fwd_slots(q, k, v, slope, state, slot_idx, cu_seqlens, scale):
    """Prefill from a slot cache, final states written back in place (negative slot: zeros, untouched)."""
    return _prefill(q, k, v, slope, state, cu_seqlens, scale, slot_idx=slot_idx)[0]


def lightning_bwd(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale):
    """No CUDA backward yet: the Triton backward serves training with backend='cuda'."""
    from . import triton_backend

    return triton_backend.lightning_bwd(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale)
