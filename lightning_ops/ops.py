"""Public lightning-attention ops: input checks, backend dispatch, torch.library registration.

Semantics (docs/lightning.md), per head h with rate s_h > 0 and state S [D, Dv] in fp32:

    S_t = exp(-s_h) S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t

Each backend module provides the same functions on already-validated tensors: `lightning_fwd`,
`lightning_fwd_slots` (prefill from a slot cache), `lightning_decode` and, for the kernel backends
(triton_backend, cuda_backend), `lightning_bwd`. Kernel
backends run inside torch.library custom ops (fake tensors, autograd, opcheck); the torch backend is
plain differentiable PyTorch and is called directly.
"""

import importlib
from typing import Optional

import torch

from m1_kernels.dispatch import resolve_backend
from m1_kernels.validate import FLOAT_DTYPES, capturing, check_shape, check_tensor

from . import torch_backend

# Backends per op, fastest first as measured on Hopper (bench/results).
ATTN_BACKENDS = ("triton", "cuda", "torch")
DECODE_BACKENDS = ("cuda", "triton", "torch")

_KERNEL_MODULES = {"cuda": "m1_kernels.lightning_ops.cuda_backend", "triton": "m1_kernels.lightning_ops.triton_backend"}


def _impl(backend: str):
    """A kernel backend's module, imported on first use (only inside the custom ops, never traced)."""
    return importlib.import_module(_KERNEL_MODULES[backend])


# ---------------------------------------------------------------------------------------------------
# torch.library registration: the ops see validated tensors and a resolved backend name.

@torch.library.custom_op("m1_ops::lightning_attn_fwd", mutates_args=())
def _attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
              initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], scale: float,
              output_final_state: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if cu_seqlens is not None and not capturing(q.device):
        _check_cu_seqlens_values(cu_seqlens, q.shape[1])
    o, final = _impl(backend).lightning_fwd(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state)
    if final is None:  # not asked for; ops cannot return None, so an empty tensor stands for it
        final = q.new_empty(0, dtype=torch.float32)
    return o, final


@_attn_fwd.register_fake
def _(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state, backend):
    B, T, H, D = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final_shape = (N, H, D, v.shape[-1]) if output_final_state else (0,)
    return v.new_empty(B, T, H, v.shape[-1]), q.new_empty(final_shape, dtype=torch.float32)


@torch.library.custom_op("m1_ops::lightning_attn_bwd", mutates_args=())
def _attn_bwd(do: torch.Tensor, dfinal: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, slope: torch.Tensor, initial_state: Optional[torch.Tensor],
              cu_seqlens: Optional[torch.Tensor], scale: float,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dh0 = _impl(backend).lightning_bwd(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale)
    if dh0 is None:  # ops cannot return None: an empty tensor stands for "no initial state"
        dh0 = q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dh0


@_attn_bwd.register_fake
def _(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale, backend):
    dh0 = q.new_empty(0, dtype=torch.float32) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0


def _attn_setup_context(ctx, inputs, output):
    q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state, backend = inputs
    ctx.save_for_backward(q, k, v, slope, initial_state, cu_seqlens)
    ctx.scale, ctx.output_final_state, ctx.backend = scale, output_final_state, backend


def _attn_backward(ctx, do, dfinal):
    q, k, v, slope, initial_state, cu_seqlens = ctx.saved_tensors
    dfinal = dfinal if ctx.output_final_state else None
    dq, dk, dv, dh0 = _attn_bwd(do.contiguous(), dfinal, q, k, v, slope, initial_state, cu_seqlens,
                                ctx.scale, ctx.backend)
    return dq, dk, dv, None, (dh0 if initial_state is not None else None), None, None, None, None


_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("m1_ops::lightning_attn_fwd_slots", mutates_args=("state",))
def _attn_fwd_slots(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, state: torch.Tensor,
                    slot_idx: torch.Tensor, cu_seqlens: Optional[torch.Tensor], scale: float,
                    backend: str) -> torch.Tensor:
    if cu_seqlens is not None and not capturing(q.device):
        _check_cu_seqlens_values(cu_seqlens, q.shape[1])
    return _impl(backend).lightning_fwd_slots(q, k, v, slope, state, slot_idx, cu_seqlens, scale)


@_attn_fwd_slots.register_fake
def _(q, k, v, slope, state, slot_idx, cu_seqlens, scale, backend):
    return v.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("m1_ops::lightning_attn_decode", mutates_args=("state",))
def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, state: torch.Tensor,
            slot_idx: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    return _impl(backend).lightning_decode(q, k, v, slope, state, slot_idx, scale)


@_decode.register_fake
def _(q, k, v, slope, state, slot_idx, scale, backend):
    return v.new_empty(q.shape[0], q.shape[1], v.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Checks

def _check_cu_seqlens_values(cu_seqlens, total):
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, got {cu[0]}..{cu[-1]}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")


def _check_slots(slot_idx, state, rows, device):
    """slot_idx [rows] int32 into a slot cache `state` [S, ...]; values are checked on CPU tensors only
    (reading CUDA values would synchronise)."""
    check_tensor("slot_idx", slot_idx, ndim=1, dtypes=(torch.int32,), device=device)
    check_shape("slot_idx", slot_idx, (rows,), " (one slot per sequence)")
    if slot_idx.device.type == "cpu" and rows and int(slot_idx.max()) >= state.shape[0]:
        raise ValueError(f"slot_idx holds slot {int(slot_idx.max())} but the cache has {state.shape[0]} slots")


KERNEL_HEAD_DIMS = (64, 128)  # of the triton and cuda kernels; the torch backend takes any


def _head_dims_unsupported(D, Dv):
    def why(backend):
        if backend != "torch" and (D not in KERNEL_HEAD_DIMS or Dv not in KERNEL_HEAD_DIMS):
            return (f"the {backend} backend supports head dims D, Dv in {KERNEL_HEAD_DIMS}, got D={D}, Dv={Dv}; "
                    "use backend='torch' for other sizes")
        return None
    return why


def _check_slope(slope, H, device):
    check_tensor("slope", slope, ndim=1, dtypes=(torch.float32,), device=device)
    check_shape("slope", slope, (H,), " (one rate per head)")


def _check_qkv(q, k, v, ndim):
    check_tensor("q", q, ndim=ndim, dtypes=FLOAT_DTYPES, unit_last_stride=True)
    check_tensor("k", k, ndim=ndim, dtypes=(q.dtype,), device=q.device, unit_last_stride=True)
    check_tensor("v", v, ndim=ndim, dtypes=(q.dtype,), device=q.device, unit_last_stride=True)
    check_shape("k", k, q.shape, " (the shape of q)")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must match q in all but the last dim: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError("head dims of q and v must be positive")


# ---------------------------------------------------------------------------------------------------
# Public API

def lightning_attn(q, k, v, slope, *, scale=1.0, initial_state=None, output_final_state=False,
                   cu_seqlens=None, slot_idx=None, backend=None):
    """Lightning attention prefill (forward and backward).

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, Dv]; bf16, fp16 or fp32, unit stride in the last dim.
        slope: [H] fp32 decay rates s_h (the per-step decay is exp(-s_h)).
        scale: multiplies the output (MiniMax uses 1.0).
        initial_state: [N, H, D, Dv] fp32, N = B (or the number of sequences with cu_seqlens).
        output_final_state: also return the fp32 state after the last token of each sequence.
        cu_seqlens: [N + 1] int32/int64 boundaries of sequences packed along T (requires B == 1).
        slot_idx: [N] int32; continue from a slot cache (serving, chunked prefill). `initial_state` is
            then the cache [S, H, D, Dv] fp32: sequence n starts from initial_state[slot_idx[n]] and
            its final state is written back into that slot in place (slots must be distinct). A
            negative slot marks a padding sequence: zero output, no state read or written. For
            inference: the kernel backends register no backward for it (backward raises); returns
            (o, None). On CUDA the slots are not checked on the host (that
            would synchronise): a slot >= S gives NaN output and touches no state.
        backend: "cuda", "triton", "torch" or None (see m1_kernels.dispatch). The triton backend takes
            D, Dv in (64, 128).

    Returns:
        (o [B, T, H, Dv] in q's dtype, final_state [N, H, D, Dv] fp32 or None).
    """
    _check_qkv(q, k, v, ndim=4)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    _check_slope(slope, H, q.device)
    N = B
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B = {B}")
        if cu_seqlens.shape[0] < 2:
            raise ValueError("cu_seqlens must hold at least two boundaries")
        N = cu_seqlens.shape[0] - 1
    if slot_idx is not None:
        if initial_state is None:
            raise ValueError("slot_idx needs initial_state: the slot cache [S, H, D, Dv] it indexes")
        check_tensor("initial_state", initial_state, ndim=4, dtypes=(torch.float32,), device=q.device,
                     contiguous=True)
        if initial_state.shape[1:] != (H, D, Dv):
            raise ValueError(f"initial_state (the slot cache) must have shape [S, {H}, {D}, {Dv}], "
                             f"got {tuple(initial_state.shape)}")
        _check_slots(slot_idx, initial_state, N, q.device)
        if output_final_state:
            raise ValueError("with slot_idx the final states are written into the slot cache; "
                             "output_final_state must be False")
    elif initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, dtypes=(torch.float32,), device=q.device,
                     contiguous=True)
        check_shape("initial_state", initial_state, (N, H, D, Dv), " ([N, H, D, Dv], N sequences)")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    backend = resolve_backend("lightning_attn", backend, ATTN_BACKENDS, q.device, _head_dims_unsupported(D, Dv))
    if slot_idx is not None:
        if backend == "torch":
            if cu_seqlens is not None:
                _check_cu_seqlens_values(cu_seqlens, T)
            return torch_backend.lightning_fwd_slots(q, k, v, slope, initial_state, slot_idx, cu_seqlens,
                                                     float(scale)), None
        return _attn_fwd_slots(q, k, v, slope, initial_state, slot_idx, cu_seqlens, float(scale), backend), None
    if backend == "torch":
        if cu_seqlens is not None:
            _check_cu_seqlens_values(cu_seqlens, T)
        o, final = torch_backend.lightning_fwd(q, k, v, slope, initial_state, cu_seqlens, float(scale))
    else:
        o, final = _attn_fwd(q, k, v, slope, initial_state, cu_seqlens, float(scale), output_final_state,
                             backend)
    return o, (final if output_final_state else None)


def lightning_attn_decode(q, k, v, slope, state, *, slot_idx=None, scale=1.0, backend=None):
    """One decode step for a batch of sequences; updates `state` in place, no host synchronisation.

    Args:
        q, k: [B, H, D]; v: [B, H, Dv]; bf16, fp16 or fp32.
        slope: [H] fp32 decay rates.
        state: [S, H, D, Dv] fp32 contiguous slot cache, updated in place.
        slot_idx: [B] int32 slot of each row (default: row b uses slot b); a negative slot marks a
            padding row, which is skipped and gives zeros. On CUDA tensors slots are not read on the
            host (that would synchronise); a slot >= S gives a NaN output row and touches no state.
        scale: multiplies the output.

    Returns:
        o [B, H, Dv] in q's dtype.
    """
    _check_qkv(q, k, v, ndim=3)
    B, H, D = q.shape
    Dv = v.shape[-1]
    _check_slope(slope, H, q.device)
    check_tensor("state", state, ndim=4, dtypes=(torch.float32,), device=q.device, contiguous=True)
    if state.shape[1:] != (H, D, Dv):
        raise ValueError(f"state must have shape [S, {H}, {D}, {Dv}], got {tuple(state.shape)}")
    if slot_idx is None:
        if state.shape[0] < B:
            raise ValueError(f"state has {state.shape[0]} slots for a batch of {B}; pass slot_idx")
        slot_idx = torch.arange(B, dtype=torch.int32, device=q.device)
    _check_slots(slot_idx, state, B, q.device)
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
    backend = resolve_backend("lightning_attn_decode", backend, DECODE_BACKENDS, q.device,
                              _head_dims_unsupported(D, Dv))
    if backend == "torch":
        return torch_backend.lightning_decode(q, k, v, slope, state, slot_idx, float(scale))
    return _decode(q, k, v, slope, state, slot_idx, float(scale), backend)
