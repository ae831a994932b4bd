"""The "triton" backend: validated tensors in, Triton kernels (lightning_ops/triton) out.

The backward reuses the forward's segmented kernels (see triton/chunk.py), with no T x T buffer and
no per-token or per-block state. Writing dS_t for the gradient reaching state S_t,

    dq_t = scale * do_t S_t^T                  forward recurrence of (q, k, v) = (do, v, k), h0 = S0^T
    dv_t = k_t dS_t,  dk_t = v_t dS_t^T        reverse recurrences of (k, q, do) and (v, do, q) with
    dS_t = lambda dS_{t+1} + scale q_t^T do_t  kv_scale = scale, h0 = dfinal (resp. its transpose)
    d(initial state) = lambda dS_0             the reverse recurrence's final state

The dk recurrence's states are the transposes of the dv recurrence's, so the dk pass reads the dv pass's
segment start states (transposed) instead of forming its own: the backward costs three output passes
and two segment-sum passes and scans.
"""

from .triton import chunk_lightning, fused_recurrent_lightning_decode


def lightning_fwd(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state=True):
    """Returns (o like v in q's dtype, final states [N, H, D, Dv] fp32, or None when not asked for:
    the kernels then skip the work only the final state needs)."""
    return chunk_lightning(q, k, v, slope, initial_state, cu_seqlens, out_scale=scale,
                           final="new" if output_final_state else None)


def lightning_fwd_with_cache(q, k, v, slope, state, slot_idx, cu_seqlens, scale):
    """Prefill from a slot cache: sequence n starts from state[slot_idx[n]] and its final state is
    written back there in place (negative slot: zeros out, state untouched). Returns o."""
    o, _ = chunk_lightning(q, k, v, slope, state, cu_seqlens, out_scale=scale, final=state, slot_idx=slot_idx)
    return o


def lightning_bwd(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale):
    """Returns (dq, dk, dv, d initial_state or None); dfinal may be None (no gradient on the state)."""
    h0_t = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
    dq, _ = chunk_lightning(do, v, k, slope, h0_t, cu_seqlens, out_scale=scale)
    dfinal = None if dfinal is None else dfinal.contiguous()
    dfinal_t = None if dfinal is None else dfinal.transpose(-1, -2).contiguous()
    dv, dh0, starts = chunk_lightning(k, q, do, slope, dfinal, cu_seqlens, kv_scale=scale, reverse=True,
                                      final="new" if initial_state is not None else None, return_starts=True)
    dk, _ = chunk_lightning(v, do, q, slope, dfinal_t, cu_seqlens, kv_scale=scale, reverse=True,
                            starts=starts.transposed())
    return dq, dk, dv, dh0


def lightning_decode(q, k, v, slope, state, slot_idx, scale):
    return fused_recurrent_lightning_decode(q, k, v, slope, state, slot_idx, scale)
