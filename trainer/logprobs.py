"""fused_logprobs: chosen-token log-probabilities (and entropies) from hidden states and the LM head weight,
with fp32-accurate logits, chunked over the vocabulary so that [N, V] logits never exist (docs/trainer.md).

    logp = fused_logprobs(hidden [N, H], weight [V, H], targets [N])              # [N] fp32
    logp, entropy = fused_logprobs(hidden, weight, targets, return_entropy=True)

Differentiable in hidden and weight (the backward pass recomputes the logits chunk by chunk). Backends: "triton"
(CUDA; CPU tensors under TRITON_INTERPRET=1) and "torch" (plain PyTorch, chunked; the CPU default); both run
inside the torch.library custom op `m1_trainer::fused_logprobs` (fake tensors and registered autograd, so
torch.compile and opcheck work).
"""

from typing import Optional

import torch

from m1_kernels.dispatch import Backend, resolve_backend
from m1_kernels.validate import FLOAT_DTYPES, capturing, check_tensor

from . import torch_logprobs

try:
    from . import triton_logprobs
except ImportError:  # triton is installed with the package on Linux only; backend_error says why it is missing
    triton_logprobs = None

TRITON = Backend("triton", triton_logprobs, runs_on="CUDA GPUs; CPU tensors under TRITON_INTERPRET=1 (tests)",
                 dtypes=FLOAT_DTYPES, limits="hidden fp32 or the weight's dtype")
TORCH = Backend("torch", torch_logprobs, runs_on="anywhere (plain PyTorch, chunked; the CPU default)",
                dtypes=FLOAT_DTYPES, limits="fp32 arithmetic on fp32 copies of each weight chunk")
BACKENDS = (TRITON, TORCH)
_IMPL = {b.name: b.impl for b in BACKENDS}


@torch.library.custom_op("m1_trainer::fused_logprobs", mutates_args=())
def _fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_entropy: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _IMPL[backend].forward(hidden, weight, targets, with_entropy)


@_fused_logprobs.register_fake
def _(hidden, weight, targets, with_entropy, backend):
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(N, **f32), hidden.new_empty(N if with_entropy else 0, **f32), hidden.new_empty(N, **f32)


@torch.library.custom_op("m1_trainer::fused_logprobs_backward", mutates_args=())
def _fused_logprobs_backward(grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor,
                             weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                             need_dh: bool, need_dw: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dh, dw = _IMPL[backend].backward(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, need_dh,
                                     need_dw)
    # A custom op returns tensors: an unwanted gradient is an empty one.
    return (hidden.new_empty(0) if dh is None else dh), (weight.new_empty(0) if dw is None else dw)


@_fused_logprobs_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, need_dh, need_dw, backend):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, with_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.with_entropy, ctx.backend = with_entropy, backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an unused entropy arrives as None: no entropy term in the backward


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dh or need_dw):
        return None, None, None, None, None
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
    grad_entropy = grad_entropy.float().contiguous() if ctx.with_entropy and grad_entropy is not None else None
    dh, dw = _fused_logprobs_backward(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, need_dh,
                                      need_dw, ctx.backend)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None


_fused_logprobs.register_autograd(_backward, setup_context=_setup_context)


def fused_logprobs(hidden, weight, targets, *, return_entropy: bool = False, backend: str | None = None):
    """Log-probabilities of `targets` under softmax(hidden @ weight^T), computed without [N, V] logits.

    Args:
        hidden: [N, H] float32, float16 or bfloat16 (unit stride in H). An fp32 hidden with a 16-bit weight is
            multiplied in two 16-bit pieces (fp32-accurate logits); a 16-bit hidden with an fp32 weight is
            converted to fp32 (exactly).
        weight: [V, H] (the LM head's weight, unit stride in H), float32, float16 or bfloat16.
        targets: [N] int32 or int64 token ids in [0, V) (checked on CPU tensors; on the GPU an id out of range
            gives a NaN log-prob).
        return_entropy: also return the entropy of each row's distribution (differentiable too).
        backend: "triton" or "torch" (default: triton on CUDA, torch on CPU; see m1_kernels.dispatch).

    Returns:
        logp [N] fp32, or (logp, entropy) with return_entropy.
    """
    hidden = check_head_inputs(hidden, weight, targets)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    row = resolve_backend("fused_logprobs", backend, BACKENDS, hidden.device)
    logp, entropy, _ = _fused_logprobs(hidden, weight, targets.contiguous(), return_entropy, row.name)
    return (logp, entropy) if return_entropy else logp


def check_head_inputs(hidden, weight, targets):
    """The checks of fused_logprobs and fused_head_loss (errors name the argument); returns hidden, converted to
    fp32 when the weight is fp32."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, unit_last_stride=True)
    device = hidden.device
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=device, unit_last_stride=True)
    check_tensor("targets", targets, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[1] = {H}, got {tuple(weight.shape)}")
    if V == 0:
        raise ValueError("weight must have at least one row (an empty vocabulary has no log-probabilities)")
    if targets.shape[0] != N:
        raise ValueError(f"targets must be [N] with N = hidden.shape[0] = {N}, got {tuple(targets.shape)}")
    if weight.dtype == torch.float32 and hidden.dtype != torch.float32:
        hidden = hidden.float()
    elif hidden.dtype not in (weight.dtype, torch.float32):
        raise TypeError(f"hidden must be float32 or the weight's dtype {weight.dtype}, got {hidden.dtype}")
    if N and device.type == "cpu" and not capturing(device):
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"targets must lie in [0, V={V}), got values in [{lo}, {hi}]")
    return hidden
