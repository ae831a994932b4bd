"""The "cuda" backend: thin wrappers that hand validated tensors to the csrc extension."""

import torch

from m1_core.extension import DTYPE_CODES, cuda_extension, ptr, stream_of


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
