"""The "cuda" backend: thin wrappers that hand validated tensors to the csrc extension (keyword calls).

The backward runs the forward's kernels (csrc/lightning_prefill.cu) on the adjoint recurrences, as the
Triton backend does (triton_backend.py). Writing dS_t for the gradient reaching state S_t:

    dq_t = scale * do_t S_t^T                   forward recurrence of (q, k, v) = (do, v, k), h0 = S0^T
    dS_t = lambda dS_{t+1} + scale q_t^T do_t   from dS_{T-1} = dfinal + scale q_{T-1}^T do_{T-1}
    dv_t = k_t dS_t,  dk_t = v_t dS_t^T         reverse recurrences of (k, q, do) and (v, do, q)
    d(initial state) = lambda dS_0

The reverse passes address time backwards (a pointer at the last token, negative token strides) and
run the kernels in their adjoint mode: k^T v terms scaled by `scale` (kv_scale), dfinal entering at
the first step undecayed, and the final state decayed once more, so it is d(initial state) itself.
"""

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from m1_kernels.extension import cuda_extension, kernel_dtype, ptr, stream_of
from m1_kernels.validate import host_values

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


# Per cu_seqlens tensor: (its in-place version, {(T, H, Dv, reverse, blocks/SM): tables}).
_PACKED_TABLES = WeakIdKeyDictionary()


def _segment_table(B, T, H, Dv, cu_seqlens, device, reverse=False):
    """Cut every sequence into segments of whole chunks (the kernels' token block), enough of them to
    fill the GPU (4 to 256 chunks each). With `reverse`, token positions count from the last token
    (t' = T - 1 - t) and each sequence's segments run from its end.

    Returns int32 tables on `device`: segments [G, 4] (row b, start t, length, sequence) and
    sequences [N, 2] (first segment, count). Tables are cached, fixed-length ones per shape and packed
    ones per cu_seqlens tensor and in-place version: a repeated call does no host work, copy or
    synchronisation. The op's value check, the forward's and the backward's tables share one host read
    of cu_seqlens (`host_values`; a model's layers share one cu_seqlens, so a training step
    synchronises once for it).
    """
    if cu_seqlens is None:
        return _fixed_length_table(B, T, H, Dv, device, SEGMENT_BLOCKS_PER_SM)
    version, tables = _PACKED_TABLES.get(cu_seqlens, (None, None))
    if version != cu_seqlens._version:  # new, or modified in place
        version, tables = cu_seqlens._version, {}
        _PACKED_TABLES[cu_seqlens] = (version, tables)
    key = (T, H, Dv, reverse, SEGMENT_BLOCKS_PER_SM)
    if key not in tables:
        bounds = host_values(cu_seqlens)
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        starts = [T - b for b in bounds[1:]] if reverse else bounds[:-1]
        tables[key] = _build_table([0] * len(lengths), starts, lengths, H, Dv, device, SEGMENT_BLOCKS_PER_SM)
    return tables[key]


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


def _in_time(x, reverse):
    """x's address and (row, token, head) strides, walking its tokens forwards or, reversed, from the
    last token backwards."""
    stride_b, stride_t, stride_h = x.stride()[:3]
    if not reverse:
        return ptr(x), (stride_b, stride_t, stride_h)
    return ptr(x) + (x.shape[1] - 1) * stride_t * x.element_size(), (stride_b, -stride_t, stride_h)


def _prefill(q, k, v, slope, initial_state, cu_seqlens, scale, slot_idx, output_final_state, *, kv_scale=1.0,
             reverse=False):
    """o = scale * (q S) over the recurrence S_t = lambda S_{t-1} + kv_scale k_t^T v_t; `reverse` runs it
    from each sequence's last token to its first in the adjoint convention (module docstring)."""
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    ext = cuda_extension(q.device)
    # 16-byte copies need 8-element-aligned strides and addresses.
    q, k, v = (x if all(s % 8 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0 else x.contiguous()
               for x in (q, k, v))
    segments, sequences = _segment_table(B, T, H, Dv, cu_seqlens, q.device, reverse)
    N = sequences.shape[0]
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=q.device)
    final = (torch.empty(N, H, D, Dv, dtype=torch.float32, device=q.device)
             if slot_idx is None and output_final_state else None)
    work = torch.empty(segments.shape[0], H, D, Dv, dtype=torch.float32, device=q.device)
    (q_ptr, q_strides), (k_ptr, k_strides), (v_ptr, v_strides), (o_ptr, o_strides) = (
        _in_time(x, reverse) for x in (q, k, v, o))
    ext.lightning_prefill_forward(
        q=q_ptr, k=k_ptr, v=v_ptr, o=o_ptr, q_strides=q_strides, k_strides=k_strides, v_strides=v_strides,
        o_strides=o_strides, slope=ptr(slope), initial_state=ptr(initial_state), final_state=ptr(final),
        slot_idx=ptr(slot_idx), segment_states=ptr(work), segments=ptr(segments), sequences=ptr(sequences),
        num_segments=segments.shape[0], num_sequences=N, num_heads=H, head_dim=D, value_dim=Dv,
        dtype=kernel_dtype(q.dtype), scale=float(scale), kv_scale=float(kv_scale), adjoint=reverse,
        stream=stream_of(q))
    return o, final


def lightning_fwd(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state=True):
    """Tensor-core forward (csrc/lightning_prefill.cu); bf16/fp16 only. Returns (o, final states or None);
    without final states the kernels skip each sequence's last segment sum."""
    return _prefill(q, k, v, slope, initial_state, cu_seqlens, scale, None, output_final_state)


def lightning_fwd_with_cache(q, k, v, slope, cache, slot_idx, cu_seqlens, scale):
    """Prefill from a slot cache, final states written back in place (negative slot: zeros, untouched)."""
    return _prefill(q, k, v, slope, cache, cu_seqlens, scale, slot_idx, False)[0]


def lightning_bwd(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale):
    """Returns (dq, dk, dv, d initial_state or None); dfinal may be None (no gradient on the state).
    Three passes of the forward kernels (module docstring)."""
    h0_t = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    dq, _ = _prefill(do, v, k, slope, h0_t, cu_seqlens, scale, None, False)
    dfinal = None if dfinal is None else dfinal.contiguous()
    dfinal_t = None if dfinal is None else dfinal.transpose(-1, -2).contiguous()
    dv, dh0 = _prefill(k, q, do, slope, dfinal, cu_seqlens, 1.0, None, initial_state is not None, kv_scale=scale,
                       reverse=True)
    dk, _ = _prefill(v, do, q, slope, dfinal_t, cu_seqlens, 1.0, None, False, kv_scale=scale, reverse=True)
    return dq, dk, dv, dh0
