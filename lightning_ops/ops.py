"""Public lightning-attention ops: input checks, backend dispatch, torch.library registration.

Semantics (docs/lightning.md), per head h with rate s_h >= 0 and state S [D, Dv] in fp32:

    S_t = exp(-s_h) S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t

The backends and what each takes are declared once, in lightning_ops/backends.py. Kernel backends
run inside the torch.library custom ops below (fake tensors, registered autograd, opcheck); the torch
backend is plain differentiable PyTorch and runs the same op bodies directly (`_run` decides).

Kernel backends called eagerly skip the custom op's dispatch (`_AttnEager`: the same body and
autograd formula; lightning_attn_with_cache, which has no backward, runs its body); torch.compile traces
the custom ops.

Checks that read tensor values on the host (a host-device synchronisation on CUDA) run in the op
bodies, outside torch.compile tracing and CUDA-graph capture:
- cu_seqlens (starts at 0, ends at T, non-decreasing): every prefill call on CPU tensors; on CUDA,
  each tensor once per packed length T (again after it is modified in place). A model's layers share
  one cu_seqlens, so a forward synchronises once, not once per layer (a sync per call also left the
  GPU idle while the host launched the next call: 0.6 ms of a 1.9 ms pack of 160 sequences on the H200).
- slope (finite and >= 0): every call on CPU tensors; on CUDA, each slope tensor once per prefill op
  (again after it is modified in place), never in decode, whose kernels turn a bad rate into NaN
  outputs and states instead of silently wrong numbers. LightningAttention's rates come from
  `slopes`, positive by construction (it rejects a layer index outside the model).
- slot_idx (in range, distinct): CPU tensors only. On CUDA an out-of-range slot gives NaN output and
  touches no state; duplicate slots are not detected (the result is then undefined).
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from m1_kernels.dispatch import part_impl, resolve_backend, run_backend as _run
from m1_kernels.validate import FLOAT_DTYPES, can_read_values, check_shape, check_tensor, host_values

from .backends import BACKENDS, ENV_VAR, OP_BACKENDS

def _impl(backend: str, part: Optional[str] = None):
    return part_impl(BACKENDS, backend, part)


# ---------------------------------------------------------------------------------------------------
# Op bodies: validated tensors and a resolved backend name in, the backend's function called.

def _attn_fwd_body(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state, backend):
    _check_values(q.device, slope=slope, cu_seqlens=cu_seqlens, total=q.shape[1])
    return _impl(backend).lightning_fwd(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state)


def _attn_bwd_body(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale, backend):
    return _impl(backend, "backward").lightning_bwd(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale)


def _with_cache_body(q, k, v, slope, cache, slot_idx, cu_seqlens, scale, backend):
    _check_values(q.device, slope=slope, cu_seqlens=cu_seqlens, total=q.shape[1], slot_idx=slot_idx,
                  num_slots=cache.shape[0])
    return _impl(backend).lightning_fwd_with_cache(q, k, v, slope, cache, slot_idx, cu_seqlens, scale)


def _decode_body(q, k, v, slope, state, slot_idx, scale, backend):
    _check_values(q.device, slope=slope if q.device.type == "cpu" else None, slot_idx=slot_idx,
                  num_slots=state.shape[0])
    return _impl(backend).lightning_decode(q, k, v, slope, state, slot_idx, scale)


# ---------------------------------------------------------------------------------------------------
# torch.library registration

@torch.library.custom_op("m1_ops::lightning_attn_fwd", mutates_args=())
def _attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
              initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], scale: float,
              output_final_state: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    o, final = _attn_fwd_body(q, k, v, slope, initial_state, cu_seqlens, scale, output_final_state, backend)
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
    dq, dk, dv, dh0 = _attn_bwd_body(do, dfinal, q, k, v, slope, initial_state, cu_seqlens, scale, backend)
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


def _attn_grads(bwd, ctx, do, dfinal):
    """The gradients of the forward's inputs, the backward pass run by `bwd` (the op or its body)."""
    q, k, v, slope, initial_state, cu_seqlens = ctx.saved_tensors
    dfinal = dfinal if ctx.output_final_state else None
    dq, dk, dv, dh0 = bwd(do.contiguous(), dfinal, q, k, v, slope, initial_state, cu_seqlens, ctx.scale, ctx.backend)
    return dq, dk, dv, None, (dh0 if initial_state is not None else None), None, None, None, None


def _attn_backward(ctx, do, dfinal):
    return _attn_grads(_attn_bwd, ctx, do, dfinal)


_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


class _AttnEager(torch.autograd.Function):
    """lightning_attn's kernel backends in eager mode: the op's body and autograd formula without the
    custom op's dispatch (on the H200's host the op layer took 0.52-0.60 ms per forward+backward through
    the custom op, 0.34-0.38 ms this way; bench/NOTES.md, session 15). torch.compile and export trace
    the custom op (`_run`)."""

    @staticmethod
    def forward(ctx, *inputs):  # ctx first: the separate setup_context form binds arguments by signature
        output = _attn_fwd_body(*inputs)
        _attn_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @once_differentiable  # as through the ops: the backward op has no formula of its own
    def backward(ctx, do, dfinal):
        return _attn_grads(_attn_bwd_body, ctx, do, dfinal)


@torch.library.custom_op("m1_ops::lightning_attn_with_cache", mutates_args=("cache",))
def _with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, cache: torch.Tensor,
                slot_idx: torch.Tensor, cu_seqlens: Optional[torch.Tensor], scale: float,
                backend: str) -> torch.Tensor:
    return _with_cache_body(q, k, v, slope, cache, slot_idx, cu_seqlens, scale, backend)


@_with_cache.register_fake
def _(q, k, v, slope, cache, slot_idx, cu_seqlens, scale, backend):
    return v.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("m1_ops::lightning_attn_decode", mutates_args=("state",))
def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, state: torch.Tensor,
            slot_idx: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    return _decode_body(q, k, v, slope, state, slot_idx, scale, backend)


@_decode.register_fake
def _(q, k, v, slope, state, slot_idx, scale, backend):
    return v.new_empty(q.shape[0], q.shape[1], v.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Checks

# CUDA tensors found valid, with their in-place version (and what else the check depended on) then:
# checked once, not on every call.
_VALID_SLOPES = WeakIdKeyDictionary()
_VALID_CU_SEQLENS = WeakIdKeyDictionary()


def _check_once(valid, check, tensor, *args):
    """Runs `check(tensor, *args)` unless `tensor` passed it on CUDA in this version with these args."""
    key = (tensor._version, *args)
    if valid.get(tensor) == key:
        return
    check(tensor, *args)
    if tensor.device.type != "cpu":
        valid[tensor] = key


def _check_cu_seqlens_values(cu_seqlens, total):
    cu = host_values(cu_seqlens)
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, got {cu[0]}..{cu[-1]}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")


def _check_slope_values(slope):
    if not bool((torch.isfinite(slope) & (slope >= 0)).all()):
        raise ValueError(f"slope must hold finite rates >= 0 (the per-step decay is exp(-slope)), "
                         f"got {slope.tolist()}")


def _check_values(device, *, slope=None, cu_seqlens=None, total=None, slot_idx=None, num_slots=None):
    """The checks that read tensor values on the host (see the module docstring for which run where)."""
    if not can_read_values(device):
        return
    if cu_seqlens is not None:
        _check_once(_VALID_CU_SEQLENS, _check_cu_seqlens_values, cu_seqlens, total)
    if slope is not None:
        _check_once(_VALID_SLOPES, _check_slope_values, slope)
    if slot_idx is not None and slot_idx.device.type == "cpu":
        used = slot_idx[slot_idx >= 0]
        if used.numel() and int(used.max()) >= num_slots:
            raise ValueError(f"slot_idx holds slot {int(used.max())} but the cache has {num_slots} slots")
        if used.unique().numel() != used.numel():
            raise ValueError(f"slot_idx must hold distinct slots (negative ones aside), got {slot_idx.tolist()}")


def _check_qkv(q, k, v, ndim):
    check_tensor("q", q, ndim=ndim, dtypes=FLOAT_DTYPES, unit_last_stride=True)
    check_tensor("k", k, ndim=ndim, dtypes=(q.dtype,), device=q.device, unit_last_stride=True)
    check_tensor("v", v, ndim=ndim, dtypes=(q.dtype,), device=q.device, unit_last_stride=True)
    check_shape("k", k, q.shape, " (the shape of q)")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must match q in all but the last dim: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError("head dims of q and v must be positive")


def _check_slope(slope, H, device):
    check_tensor("slope", slope, ndim=1, dtypes=(torch.float32,), device=device)
    check_shape("slope", slope, (H,), " (one rate per head)")


def _check_scale(scale):
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")


def _check_cu_seqlens(cu_seqlens, B, device):
    """Returns the number of sequences N."""
    if cu_seqlens is None:
        return B
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    if B != 1:
        raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B = {B}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError("cu_seqlens must hold at least two boundaries")
    return cu_seqlens.shape[0] - 1


def _check_cache(name, cache, H, D, Dv, device):
    check_tensor(name, cache, ndim=4, dtypes=(torch.float32,), device=device, contiguous=True)
    if cache.shape[1:] != (H, D, Dv):
        raise ValueError(f"{name} must have shape [S, {H}, {D}, {Dv}] (S slots), got {tuple(cache.shape)}")


def _check_slot_idx(slot_idx, rows, device):
    check_tensor("slot_idx", slot_idx, ndim=1, dtypes=(torch.int32,), device=device)
    check_shape("slot_idx", slot_idx, (rows,), " (one slot per sequence)")


def _backend(op, backend, q, v):
    return resolve_backend(op, backend, OP_BACKENDS[op], q.device, family_var=ENV_VAR, dtype=q.dtype,
                           head_dim=q.shape[-1], value_dim=v.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Public API

def lightning_attn(q, k, v, slope, *, scale=1.0, initial_state=None, output_final_state=False,
                   cu_seqlens=None, backend=None):
    """Lightning attention prefill (forward and backward).

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, Dv]; bf16, fp16 or fp32, unit stride in the last dim.
        slope: [H] fp32 decay rates s_h >= 0 (the per-step decay is exp(-s_h)).
        scale: multiplies the output (MiniMax uses 1.0).
        initial_state: [N, H, D, Dv] fp32, N = B (or the number of sequences with cu_seqlens).
        output_final_state: also return the fp32 state after the last token of each sequence.
        cu_seqlens: [N + 1] int32/int64 boundaries of sequences packed along T (requires B == 1).
        backend: "cuda", "triton", "torch" or None (see m1_kernels.dispatch; what each takes:
            lightning_ops.BACKENDS).

    Returns:
        (o [B, T, H, Dv] in q's dtype, final_state [N, H, D, Dv] fp32 or None).

    Autograd flows to q, k, v and initial_state. To continue from a slot cache in place (serving,
    chunked prefill), use lightning_attn_with_cache.
    """
    _check_qkv(q, k, v, ndim=4)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    _check_slope(slope, H, q.device)
    N = _check_cu_seqlens(cu_seqlens, B, q.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, dtypes=(torch.float32,), device=q.device,
                     contiguous=True)
        check_shape("initial_state", initial_state, (N, H, D, Dv), " ([N, H, D, Dv], N sequences)")
    _check_scale(scale)
    row = _backend("lightning_attn", backend, q, v)
    o, final = _run(row, _attn_fwd, _attn_fwd_body, q, k, v, slope, initial_state, cu_seqlens, float(scale),
                    output_final_state, eager=_AttnEager.apply)
    return o, (final if output_final_state else None)


def lightning_attn_with_cache(q, k, v, slope, cache, slot_idx, *, cu_seqlens=None, scale=1.0, backend=None):
    """Prefill that continues from a slot cache and writes the final states back into it, in place.

    For inference (serving, chunked prefill): there is no backward, and calling it on q, k or v that
    require grad while grad mode is on raises RuntimeError.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, Dv]; bf16, fp16 or fp32, unit stride in the last dim.
        slope: [H] fp32 decay rates s_h >= 0.
        cache: [S, H, D, Dv] fp32 contiguous slot cache, updated in place: sequence n starts from
            cache[slot_idx[n]] and its final state is written back there.
        slot_idx: [N] int32 distinct slots, N = B (or the number of sequences with cu_seqlens). A
            negative slot marks a padding sequence: zero output, no state read or written. On CUDA the
            slots are not checked on the host (that would synchronise): a slot >= S gives NaN output
            and touches no state; duplicate slots give an undefined result.
        cu_seqlens: [N + 1] int32/int64 boundaries of sequences packed along T (requires B == 1).
        scale: multiplies the output.
        backend: "cuda", "triton", "torch" or None, as for lightning_attn.

    Returns:
        o [B, T, H, Dv] in q's dtype.
    """
    _check_qkv(q, k, v, ndim=4)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise RuntimeError("lightning_attn_with_cache is in-place inference and has no backward, but q, k or v "
                           "requires grad; run it under torch.no_grad() or use lightning_attn with "
                           "initial_state and output_final_state=True for training")
    _check_slope(slope, H, q.device)
    N = _check_cu_seqlens(cu_seqlens, B, q.device)
    _check_cache("cache", cache, H, D, Dv, q.device)
    _check_slot_idx(slot_idx, N, q.device)
    _check_scale(scale)
    row = _backend("lightning_attn_with_cache", backend, q, v)
    # No gradient flows here (refused above), so eager calls run the body without the custom op's dispatch.
    return _run(row, _with_cache, _with_cache_body, q, k, v, slope, cache, slot_idx, cu_seqlens, float(scale),
                eager=_with_cache_body)


def lightning_attn_decode(q, k, v, slope, state, *, slot_idx=None, scale=1.0, backend=None):
    """One decode step for a batch of sequences; updates `state` in place, no host synchronisation on
    CUDA (capturable in a CUDA graph).

    Args:
        q, k: [B, H, D]; v: [B, H, Dv]; bf16, fp16 or fp32.
        slope: [H] fp32 decay rates s_h >= 0 (checked on CPU tensors; on CUDA a bad rate gives NaN).
        state: [S, H, D, Dv] fp32 contiguous slot cache, updated in place.
        slot_idx: [B] int32 distinct slots, one per row (default: row b uses slot b); a negative slot
            marks a padding row, which is skipped and gives zeros. On CUDA tensors slots are not read
            on the host: a slot >= S gives a NaN output row and touches no state; duplicate slots give
            an undefined result.
        scale: multiplies the output.
        backend: "cuda", "triton", "torch" or None, as for lightning_attn.

    Returns:
        o [B, H, Dv] in q's dtype.
    """
    _check_qkv(q, k, v, ndim=3)
    B, H, D = q.shape
    Dv = v.shape[-1]
    _check_slope(slope, H, q.device)
    _check_cache("state", state, H, D, Dv, q.device)
    if slot_idx is None:
        if state.shape[0] < B:
            raise ValueError(f"state has {state.shape[0]} slots for a batch of {B}; pass slot_idx")
        slot_idx = torch.arange(B, dtype=torch.int32, device=q.device)
    _check_slot_idx(slot_idx, B, q.device)
    _check_scale(scale)
    row = _backend("lightning_attn_decode", backend, q, v)
    return _run(row, _decode, _decode_body, q, k, v, slope, state, slot_idx, float(scale))
