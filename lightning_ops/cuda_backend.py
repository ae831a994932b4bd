"""The "cuda" backend: thin wrappers that hand validated tensors to the csrc extension (keyword calls).

It has no backward: lightning_ops.BACKENDS declares that training with backend="cuda" runs the Triton
backward.
"""

import functools

import torch

from m1_kernels.extension import cuda_extension, kernel_dtype, ptr, stream_of

# Segments are sized for about this many blocks per SM of the sums and output kernels: enough for
# whole waves, few enough that the sums (which skip each sequence's last segment) read little.
# A tuning constant: bench/sweep_prefill.py overrides it to time other segment counts.
SEGMENT_BLOCKS_PER_SM = 8


def decode_arguments(q, k, v, slope, state, slot_idx, scale, out):
    """The extension's keyword arguments for one decode step writing into `out` (bench/sweep_decode.py
    passes them with a forced tiling `variant`; production never does)."""
    B, H, D = q.shape
    return dict(q=ptr(q), k=ptr(k), v=ptr(v), q_strides=q.stride()[:2], k_strides=k.stride()[:2],
                v_strides=v.stride()[:2], slope=ptr(slope), state=ptr(state), slot_idx=ptr(slot_idx), out=ptr(out),
                batch=B, num_heads=H, head_dim=D, value_dim=v.shape[-1], num_slots=state.shape[0],
                dtype=kernel_dtype(q.dtype), scale=float(scale), stream=stream_of(q))


def lightning_decode(q, k, v, slope, state, slot_idx, scale):
    ext = cuda_extension(q.device)
    out = torch.empty(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)
    ext.lightning_decode(**decode_arguments(q, k, v, slope, state, slot_idx, scale, out))
    return out


def _segment_table(B, T, H, Dv, cu_seqlens, device):
    """Cut every sequence into segments of whole chunks (the kernels' token block), enough of them to
    fill the GPU (4 to 256 chunks each).

    Returns int32 tables on `device`: segments [G, 4] (row b, start t, length, sequence) and
    sequences [N, 2] (first segment, count). Fixed-length tables are cached per shape, so a repeated
    call does no host work or copy; packed sequences read cu_seqlens on the host once per call.
    """
    if cu_seqlens is None:
        return _fixed_length_table(B, T, H, Dv, device, SEGMENT_BLOCKS_PER_SM)
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return _build_table([0] * len(lengths), bounds[:-1], lengths, H, Dv, device, SEGMENT_BLOCKS_PER_SM)


@functools.lru_cache(maxsize=64)
def _fixed_length_table(B, T, H, Dv, device, blocks_per_sm):
    return _build_table(list(range(B)), [0] * B, [T] * B, H, Dv, device, blocks_per_sm)


def _build_table(rows, starts, lengths, H, Dv, device, blocks_per_sm):
    ext = cuda_extension(device)
    chunk = ext.LIGHTNING_PREFILL_CHUNK
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks_per_segment = H * (Dv // ext.LIGHTNING_PREFILL_VALUE_TILE)
    total = max(sum(lengths), 1)
    seg_len = -(-total * blocks_per_segment // (blocks_per_sm * sms))
    seg_len = min(max(4 * chunk, -(-seg_len // chunk) * chunk), 256 * chunk)
    segments, sequences = [], []
    for n, (row, start, length) in enumerate(zip(rows, starts, lengths)):
        first = len(segments)
        segments += [(row, start + t, min(seg_len, length - t), n) for t in range(0, length, seg_len)]
        sequences.append((first, len(segments) - first))
    as_table = lambda rows_, width: torch.tensor(rows_, dtype=torch.int32).reshape(-1, width).to(device)  # noqa: E731
    return as_table(segments, 4), as_table(sequences, 2)


def _prefill(q, k, v, slope, initial_state, cu_seqlens, scale, slot_idx, output_final_state):
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    ext = cuda_extension(q.device)
    # 16-byte copies need 8-element-aligned strides and addresses.
    q, k, v = (x if all(s % 8 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0 else x.contiguous()
               for x in (q, k, v))
    segments, sequences = _segment_table(B, T, H, Dv, cu_seqlens, q.device)
    N = sequences.shape[0]
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=q.device)
    final = (torch.empty(N, H, D, Dv, dtype=torch.float32, device=q.device)
             if slot_idx is None and output_final_state else None)
    work = torch.empty(segments.shape[0], H, D, Dv, dtype=torch.float32, device=q.device)
    ext.lightning_prefill_forward(
        q=ptr(q), k=ptr(k), v=ptr(v), o=ptr(o), q_strides=q.stride()[:3], k_strides=k.stride()[:3],
        v_strides=v.stride()[:3], o_strides=o.stride()[:3], slope=ptr(slope), initial_state=ptr(initial_state),
        final_state=ptr(final), slot_idx=ptr(slot_idx), segment_states=ptr(work), segments=ptr(segments),
        sequences=ptr(sequences), num_segments=segments.shape[0], num_sequences=N, num_heads=H, head_dim=D,
        value_dim=Dv, dtype=kernel_dtype(q.dtype), scale=float(scale), stream=stream_of(q))
    return o, final


def lightning_fwd(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state=True):
    """Tensor-core forward (csrc/lightning_prefill.cu); bf16/fp16 only. Returns (o, final states or None);
    without final states the kernels skip each sequence's last segment sum."""
    return _prefill(q, k, v, slope, initial_state, cu_seqlens, scale, None, output_final_state)


def lightning_fwd_with_cache(q, k, v, slope, cache, slot_idx, cu_seqlens, scale):
    """Prefill from a slot cache, final states written back in place (negative slot: zeros, untouched)."""
    return _prefill(q, k, v, slope, cache, cu_seqlens, scale, slot_idx, False)[0]
