"""Public MoE ops: input checks, backend dispatch, torch.library registration (docs/moe.md).

    weights, ids = route(x, gate_weight, top_k)                  fp32 softmax, top-k, renormalise
    x_sorted, sorted_idx, offsets = permute(x, ids, E)           stable expert-contiguous rows
    y = grouped_gemm(x_sorted, weight, offsets)                  rows offsets[e]:offsets[e+1] use expert e
    out = unpermute(y_sorted, sorted_idx, weights)               weighted combine, deterministic
    out = fused_moe(x, gate_weight, gate_up_proj, down_proj, top_k)

The backends and what each takes are declared once, in moe_ops/backends.py. Kernel backends run inside
the torch.library custom ops below (fake tensors, registered autograd, opcheck); the torch backend is
plain differentiable PyTorch and runs the op bodies directly (`_run` decides). Called eagerly (outside
torch.compile), fused_moe on a kernel backend skips the custom ops' dispatch: the same bodies and autograd
formulas, chained in `_MoeEager`; route, permute, grouped_gemm and unpermute run their body forward and
their registered formula backward (`_OpEager`). Offsets stay on the device: on CUDA tensors no op reads
a value back to the host (expert ids and offsets are checked on CPU tensors only), so a whole MoE forward
captures in a CUDA graph.
"""

from collections import Counter
from typing import Callable, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from m1_kernels.dispatch import part_impl, resolve_backend, run_backend as _run
from m1_kernels.validate import FLOAT_DTYPES, check_shape, check_tensor

from .backends import BACKENDS, ENV_VAR, MAX_EXPERTS, MAX_TOP_K, OP_BACKENDS

WEIGHT_LAYOUTS = ("nk", "kn")

def _impl(backend: str, part: Optional[str] = None):
    return part_impl(BACKENDS, backend, part)


def _flip(layout: str) -> str:
    return "kn" if layout == "nk" else "nk"


# ---------------------------------------------------------------------------------------------------
# Op bodies: validated tensors and a resolved backend name in, the backend's function called.

def _route_body(x, gate_weight, top_k, renormalize, backend):
    return _impl(backend, "route").route(x, gate_weight, top_k, renormalize)


def _permute_body(x, expert_ids, num_experts, backend):
    return _impl(backend, "permute").permute(x, expert_ids, num_experts)


def _unpermute_body(y_sorted, sorted_idx, weights, top_k, backend):
    return _impl(backend, "unpermute").unpermute(y_sorted, sorted_idx, weights, top_k)


def _grouped_gemm_body(x, weight, offsets, weight_layout, backend):
    return _impl(backend).grouped_gemm(x, weight, offsets, weight_layout)


def _unpermute_bwd_body(dout, y_sorted, sorted_idx, weights, backend):
    return _impl(backend, "unpermute").unpermute_backward(dout, y_sorted, sorted_idx, weights)


def _expert_mlp_body(x_sorted, gate_up_proj, down_proj, offsets, save_for_backward, backend):
    impl = _impl(backend)
    h, preact = impl.grouped_gemm_swiglu(x_sorted, gate_up_proj, offsets, save_for_backward)
    return impl.grouped_gemm(h, down_proj, offsets, "nk"), h, preact


def _expert_mlp_bwd_body(dy, x_sorted, h, preact, gate_up_proj, down_proj, offsets, backend):
    impl = _impl(backend)
    d_preact = impl.grouped_gemm_swiglu_backward(dy, down_proj, offsets, preact)
    d_down = impl.grouped_gemm_weight_grad(h, dy, offsets, "nk")
    dx = impl.grouped_gemm(d_preact, gate_up_proj, offsets, "kn")
    d_gate_up = impl.grouped_gemm_weight_grad(x_sorted, d_preact, offsets, "nk")
    return dx, d_gate_up, d_down


def _few_token_body(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend):
    return _impl(backend, "few_token").few_token_moe(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize)


def _fused_moe_body(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend):
    return _impl(backend).fused_moe(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize)


# ---------------------------------------------------------------------------------------------------
# torch.library registration: the ops see validated tensors and a resolved backend name.

@torch.library.custom_op("m1_ops::moe_route", mutates_args=())
def _route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool,
           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _route_body(x, gate_weight, top_k, renormalize, backend)


@_route.register_fake
def _(x, gate_weight, top_k, renormalize, backend):
    N = x.shape[0]
    return x.new_empty(N, top_k, dtype=torch.float32), x.new_empty(N, top_k, dtype=torch.int32)


def _route_setup_context(ctx, inputs, output):
    x, gate_weight, top_k, renormalize, backend = inputs
    ctx.save_for_backward(x, gate_weight, output[1])
    ctx.renormalize, ctx.backend = renormalize, backend


def _route_bwd_body(dweights, x, gate_weight, ids, renormalize, needs_dx, needs_dgate, backend):
    return _impl(backend, "route").route_backward(dweights, x, gate_weight, ids, renormalize, needs_dx, needs_dgate)


@torch.library.custom_op("m1_ops::moe_route_bwd", mutates_args=())
def _route_bwd(dweights: torch.Tensor, x: torch.Tensor, gate_weight: torch.Tensor, ids: torch.Tensor,
               renormalize: bool, needs_dx: bool, needs_dgate: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dgate) of route; a gradient not asked for is an empty [0, H] tensor (an op returns tensors)."""
    dx, dgate = _route_bwd_body(dweights, x, gate_weight, ids, renormalize, needs_dx, needs_dgate, backend)
    return (dx if needs_dx else x.new_empty(0, x.shape[1]),
            dgate if needs_dgate else gate_weight.new_empty(0, gate_weight.shape[1]))


@_route_bwd.register_fake
def _(dweights, x, gate_weight, ids, renormalize, needs_dx, needs_dgate, backend):
    return (x.new_empty(x.shape[0] if needs_dx else 0, x.shape[1]),
            gate_weight.new_empty(gate_weight.shape[0] if needs_dgate else 0, gate_weight.shape[1]))


def _route_backward(ctx, dweights, _dids):
    needs_dx, needs_dgate = ctx.needs_input_grad[:2]
    dx, dgate = _route_bwd(dweights, *ctx.saved_tensors, ctx.renormalize, needs_dx, needs_dgate, ctx.backend)
    return dx if needs_dx else None, dgate if needs_dgate else None, None, None, None


_route.register_autograd(_route_backward, setup_context=_route_setup_context)


@torch.library.custom_op("m1_ops::moe_permute", mutates_args=())
def _permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _permute_body(x, expert_ids, num_experts, backend)


@_permute.register_fake
def _(x, expert_ids, num_experts, backend):
    M = expert_ids.numel()
    return (x.new_empty(M, x.shape[1]), x.new_empty(M, dtype=torch.int32),
            x.new_empty(num_experts + 1, dtype=torch.int32))


def _permute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.top_k, ctx.backend = inputs[1].shape[1], inputs[3]


def _permute_backward(ctx, dx_sorted, _didx, _doffsets):
    (sorted_idx,) = ctx.saved_tensors
    # Each token's k copies sum back: the unweighted combine.
    return _unpermute(dx_sorted.contiguous(), sorted_idx, None, ctx.top_k, ctx.backend), None, None, None


_permute.register_autograd(_permute_backward, setup_context=_permute_setup_context)


@torch.library.custom_op("m1_ops::moe_unpermute", mutates_args=())
def _unpermute(y_sorted: torch.Tensor, sorted_idx: torch.Tensor, weights: Optional[torch.Tensor], top_k: int,
               backend: str) -> torch.Tensor:
    return _unpermute_body(y_sorted, sorted_idx, weights, top_k, backend)


@_unpermute.register_fake
def _(y_sorted, sorted_idx, weights, top_k, backend):
    return y_sorted.new_empty(sorted_idx.shape[0] // top_k, y_sorted.shape[1])


@torch.library.custom_op("m1_ops::moe_unpermute_bwd", mutates_args=())
def _unpermute_bwd(dout: torch.Tensor, y_sorted: torch.Tensor, sorted_idx: torch.Tensor, weights: torch.Tensor,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _unpermute_bwd_body(dout, y_sorted, sorted_idx, weights, backend)


@_unpermute_bwd.register_fake
def _(dout, y_sorted, sorted_idx, weights, backend):
    return torch.empty_like(y_sorted), torch.empty_like(weights, dtype=torch.float32)


def _unpermute_setup_context(ctx, inputs, output):
    y_sorted, sorted_idx, weights, top_k, backend = inputs
    ctx.save_for_backward(y_sorted, sorted_idx, weights)
    ctx.top_k, ctx.backend = top_k, backend


def _unpermute_backward(ctx, dout):
    y_sorted, sorted_idx, weights = ctx.saved_tensors
    dout = dout.contiguous()
    if weights is None:
        ones = torch.ones(sorted_idx.shape[0] // ctx.top_k, ctx.top_k, dtype=torch.float32, device=dout.device)
        dy, _ = _unpermute_bwd(dout, y_sorted, sorted_idx, ones, ctx.backend)
        return dy, None, None, None, None
    dy, dweights = _unpermute_bwd(dout, y_sorted, sorted_idx, weights, ctx.backend)
    return dy, None, dweights.to(weights.dtype), None, None


_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup_context)


@torch.library.custom_op("m1_ops::moe_grouped_gemm", mutates_args=())
def _grouped_gemm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, weight_layout: str,
                  backend: str) -> torch.Tensor:
    return _grouped_gemm_body(x, weight, offsets, weight_layout, backend)


@_grouped_gemm.register_fake
def _(x, weight, offsets, weight_layout, backend):
    return x.new_empty(x.shape[0], weight.shape[1] if weight_layout == "nk" else weight.shape[2])


@torch.library.custom_op("m1_ops::moe_grouped_gemm_wgrad", mutates_args=())
def _grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, weight_layout: str,
                        backend: str) -> torch.Tensor:
    return _impl(backend).grouped_gemm_weight_grad(x, dy, offsets, weight_layout)


@_grouped_gemm_wgrad.register_fake
def _(x, dy, offsets, weight_layout, backend):
    E, K, N = offsets.shape[0] - 1, x.shape[1], dy.shape[1]
    return x.new_empty(E, N, K) if weight_layout == "nk" else x.new_empty(E, K, N)


def _gemm_setup_context(ctx, inputs, output):
    x, weight, offsets, weight_layout, backend = inputs
    ctx.save_for_backward(x, weight, offsets)
    ctx.layout, ctx.backend = weight_layout, backend


def _gemm_backward(ctx, dy):
    x, weight, offsets = ctx.saved_tensors
    dy = dy.contiguous()
    dx = _grouped_gemm(dy, weight, offsets, _flip(ctx.layout), ctx.backend) if ctx.needs_input_grad[0] else None
    dw = _grouped_gemm_wgrad(x, dy, offsets, ctx.layout, ctx.backend) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None


_grouped_gemm.register_autograd(_gemm_backward, setup_context=_gemm_setup_context)


@torch.library.custom_op("m1_ops::moe_expert_mlp", mutates_args=())
def _expert_mlp(x_sorted: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                offsets: torch.Tensor, save_for_backward: bool,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = SwiGLU expert MLP of every sorted row; also returns h and [gate | up] for the backward
    (an empty [0, 2F] tensor when save_for_backward is False: inference writes no pre-activations)."""
    return _expert_mlp_body(x_sorted, gate_up_proj, down_proj, offsets, save_for_backward, backend)


@_expert_mlp.register_fake
def _(x_sorted, gate_up_proj, down_proj, offsets, save_for_backward, backend):
    M, F = x_sorted.shape[0], down_proj.shape[2]
    return (x_sorted.new_empty(M, down_proj.shape[1]), x_sorted.new_empty(M, F),
            x_sorted.new_empty(M if save_for_backward else 0, 2 * F))


@torch.library.custom_op("m1_ops::moe_expert_mlp_bwd", mutates_args=())
def _expert_mlp_bwd(dy: torch.Tensor, x_sorted: torch.Tensor, h: torch.Tensor, preact: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, offsets: torch.Tensor,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _expert_mlp_bwd_body(dy, x_sorted, h, preact, gate_up_proj, down_proj, offsets, backend)


@_expert_mlp_bwd.register_fake
def _(dy, x_sorted, h, preact, gate_up_proj, down_proj, offsets, backend):
    return torch.empty_like(x_sorted), torch.empty_like(gate_up_proj), torch.empty_like(down_proj)


def _mlp_setup_context(ctx, inputs, output):
    x_sorted, gate_up_proj, down_proj, offsets, save_for_backward, backend = inputs
    ctx.save_for_backward(x_sorted, output[1], output[2], gate_up_proj, down_proj, offsets)
    ctx.saved, ctx.backend = save_for_backward, backend


def _mlp_backward(ctx, dy, _dh, _dpreact):
    if not ctx.saved:
        raise RuntimeError("moe_expert_mlp ran with save_for_backward=False; it cannot be differentiated")
    x_sorted, h, preact, gate_up_proj, down_proj, offsets = ctx.saved_tensors
    dx, d_gate_up, d_down = _expert_mlp_bwd(dy.contiguous(), x_sorted, h, preact, gate_up_proj, down_proj,
                                            offsets, ctx.backend)
    return dx, d_gate_up, d_down, None, None, None


_expert_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)



@torch.library.custom_op("m1_ops::moe_few_token", mutates_args=())
def _few_token(x: torch.Tensor, gate_weight: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
               top_k: int, renormalize: bool, backend: str) -> torch.Tensor:
    """The whole layer's forward for few tokens (inference: no autograd formula; fused_moe calls it only
    when no gradient is needed)."""
    return _few_token_body(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend)


@_few_token.register_fake
def _(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend):
    return torch.empty_like(x)


class _Steps(NamedTuple):
    """fused_moe's steps on a kernel backend: the custom ops (traced by torch.compile and export) or their
    bodies (eager calls, which skip the ops' dispatch)."""
    few_token: Callable
    route: Callable
    permute: Callable
    expert_mlp: Callable
    unpermute: Callable


_OPS = _Steps(_few_token, _route, _permute, _expert_mlp, _unpermute)
_BODIES = _Steps(_few_token_body, _route_body, _permute_body, _expert_mlp_body, _unpermute_body)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _moe_forward(steps, x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend, save_for_backward):
    """Route, permute, the expert MLP as two grouped GEMMs, the weighted combine: (out, the intermediates
    the backward reads)."""
    weights, ids = steps.route(x, gate_weight, top_k, renormalize, backend)
    x_sorted, sorted_idx, offsets = steps.permute(x, ids, gate_weight.shape[0], backend)
    y_sorted, h, preact = steps.expert_mlp(x_sorted, gate_up_proj, down_proj, offsets, save_for_backward, backend)
    out = steps.unpermute(y_sorted, sorted_idx, weights, top_k, backend)
    return out, (weights, ids, x_sorted, sorted_idx, offsets, y_sorted, h, preact)


def _fused_moe_steps(steps, x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend):
    """fused_moe on a kernel backend: the few-token forward where the backend has or borrows one and the call
    fits it (few tokens, no gradient), else _moe_forward."""
    impl = _impl(backend, "few_token")
    if (not _needs_grad(x, gate_weight, gate_up_proj, down_proj) and hasattr(impl, "few_token_moe")
            and impl.few_token_fits(x.shape[0], top_k)):
        return steps.few_token(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend)
    save = _needs_grad(x, gate_up_proj, down_proj)
    return _moe_forward(steps, x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend, save)[0]


def _fused_moe_kernels(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend):
    """fused_moe as a chain of custom ops, each with its registered autograd formula."""
    return _fused_moe_steps(_OPS, x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend)


class _MoeEager(torch.autograd.Function):
    """fused_moe's kernel backends in eager mode with a gradient: the steps' bodies forward, the ops'
    autograd formulas chained backward, without the dispatch of seven custom-op calls per forward+backward
    (host time of the op layer on the CPU with a stub backend: 0.90-0.92 ms through the custom ops,
    0.41-0.44 ms this way; bench/NOTES.md, session 17). torch.compile and export trace the custom ops."""

    @staticmethod
    def forward(ctx, x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend):
        save = any(ctx.needs_input_grad[i] for i in (0, 2, 3))  # the expert MLP's inputs
        out, saved = _moe_forward(_BODIES, x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend,
                                  save)
        ctx.save_for_backward(x, gate_weight, gate_up_proj, down_proj, *saved)
        ctx.top_k, ctx.renormalize, ctx.backend = top_k, renormalize, backend
        return out

    @staticmethod
    @once_differentiable  # as through the ops: the backward kernels have no formula of their own
    def backward(ctx, dout):
        x, gate_weight, gate_up_proj, down_proj, weights, ids, x_sorted, sorted_idx, offsets, y_sorted, h, preact = (
            ctx.saved_tensors)
        needs_x, needs_gate, needs_gate_up, needs_down = ctx.needs_input_grad[:4]
        dy_sorted, dweights = _unpermute_bwd_body(dout.contiguous(), y_sorted, sorted_idx, weights, ctx.backend)
        dx = d_gate_up = d_down = None
        if needs_x or needs_gate_up or needs_down:
            dx_sorted, d_gate_up, d_down = _expert_mlp_bwd_body(dy_sorted, x_sorted, h, preact, gate_up_proj,
                                                                down_proj, offsets, ctx.backend)
            if needs_x:  # permute's backward: each token's k copies summed
                dx = _unpermute_body(dx_sorted, sorted_idx, None, ctx.top_k, ctx.backend)
        d_gate = None
        if needs_x or needs_gate:  # the routing weights' gradient, as the ops run it only when it is needed
            dx_route, d_gate = _route_bwd_body(dweights, x, gate_weight, ids, ctx.renormalize, needs_x, needs_gate,
                                               ctx.backend)
            if dx_route is not None:  # dx is this backward's own tensor: add in place, no third [N, H] buffer
                dx = dx_route if dx is None else dx.add_(dx_route)
        return (dx, d_gate, d_gate_up if needs_gate_up else None, d_down if needs_down else None,
                None, None, None)


def _fused_moe_eager(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend):
    """fused_moe on a kernel backend outside torch.compile: the steps' bodies, no custom-op dispatch."""
    if _needs_grad(x, gate_weight, gate_up_proj, down_proj):
        return _MoeEager.apply(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend)
    return _fused_moe_steps(_BODIES, x, gate_weight, gate_up_proj, down_proj, top_k, renormalize, backend)


class _OpEager(torch.autograd.Function):
    """One custom op in eager mode: its body forward and its registered autograd formula backward (whose
    backward ops stay custom ops: the formula is the op's, second derivatives included), without the
    forward's dispatch. The op's inputs come first, so that ctx.needs_input_grad lines up with them as
    the formula expects; the (body, setup_context, backward) triple is the last input."""

    @staticmethod
    def forward(ctx, *inputs):
        *args, (body, setup_context, backward) = inputs
        out = body(*args)
        setup_context(ctx, tuple(args), out)
        ctx.formula = backward
        return out

    @staticmethod
    def backward(ctx, *grads):
        return (*ctx.formula(ctx, *grads), None)


def _op_eager(body, setup_context, backward):
    """The eager path of one op (dispatch.run_backend's `eager`): the body alone without a gradient."""
    def call(*args):
        if _needs_grad(*(a for a in args if isinstance(a, torch.Tensor))):
            return _OpEager.apply(*args, (body, setup_context, backward))
        return body(*args)
    return call


_ROUTE_EAGER = _op_eager(_route_body, _route_setup_context, _route_backward)
_PERMUTE_EAGER = _op_eager(_permute_body, _permute_setup_context, _permute_backward)
_GROUPED_GEMM_EAGER = _op_eager(_grouped_gemm_body, _gemm_setup_context, _gemm_backward)
_UNPERMUTE_EAGER = _op_eager(_unpermute_body, _unpermute_setup_context, _unpermute_backward)


# ---------------------------------------------------------------------------------------------------
# Checks

def _check_x(name, x):
    check_tensor(name, x, ndim=2, dtypes=FLOAT_DTYPES, unit_last_stride=True)
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have a positive hidden size, got shape {tuple(x.shape)}")


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _check_gate(gate_weight, x, top_k):
    check_tensor("gate_weight", gate_weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device, unit_last_stride=True)
    E = gate_weight.shape[0]
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"gate_weight must have 1 to {MAX_EXPERTS} experts (rows), got {E}")
    if gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"gate_weight must have shape [E, {x.shape[1]}] (hidden size of x), "
                         f"got {tuple(gate_weight.shape)}")
    _check_int("top_k", top_k, 1, min(MAX_TOP_K, E))


def _check_expert_ids(expert_ids, N, num_experts, device):
    check_tensor("expert_ids", expert_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=device)
    if expert_ids.shape[0] != N:
        raise ValueError(f"expert_ids must have one row per token ({N}), got shape {tuple(expert_ids.shape)}")
    _check_int("expert_ids.shape[1] (top_k)", expert_ids.shape[1], 1, MAX_TOP_K)
    if expert_ids.device.type == "cpu" and expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")


def _check_offsets(offsets, E, M, device):
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int32,), device=device, contiguous=True)
    check_shape("offsets", offsets, (E + 1,), f" ([E + 1], one boundary per expert of weight ({E}) and the end)")
    if offsets.device.type == "cpu":
        values = offsets.tolist()
        if values[0] != 0 or values[-1] != M or any(b < a for a, b in zip(values[:-1], values[1:])):
            raise ValueError(f"offsets must rise from 0 to the number of rows {M}, got {values}")


def _check_weight(name, weight, x):
    check_tensor(name, weight, ndim=3, dtypes=(x.dtype,), device=x.device)
    if weight.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one expert, got shape {tuple(weight.shape)}")


def _check_expert_weights(gate_up_proj, down_proj, x, E):
    """gate_up_proj [E, 2F, H] and down_proj [E, H, F]: each checked against E (gate_weight) and H (x)
    first, so that a wrong tensor is the one named; then the F they share."""
    H = x.shape[1]
    _check_weight("gate_up_proj", gate_up_proj, x)
    _check_weight("down_proj", down_proj, x)
    E_gu, two_f, H_gu = gate_up_proj.shape
    if E_gu != E or H_gu != H or two_f == 0 or two_f % 2:
        raise ValueError(f"gate_up_proj must have shape [E, 2F, H] = [{E}, 2F, {H}] (E experts of gate_weight, "
                         f"H of x, gate rows first so 2F is even), got {tuple(gate_up_proj.shape)}")
    F = two_f // 2
    if down_proj.shape[0] != E or down_proj.shape[1] != H:
        transposed = " (transposed? down_proj is stored [E, H, F])" if tuple(down_proj.shape) == (E, F, H) else ""
        raise ValueError(f"down_proj must have shape [E, H, F] = [{E}, {H}, F] (E experts of gate_weight, H of x), "
                         f"got {tuple(down_proj.shape)}{transposed}")
    if down_proj.shape[2] != F:
        raise ValueError(f"gate_up_proj and down_proj disagree on the expert FFN size F: gate_up_proj "
                         f"{tuple(gate_up_proj.shape)} has 2F = {two_f}, down_proj {tuple(down_proj.shape)} has "
                         f"F = {down_proj.shape[2]}")
    return F


def _check_combine_rows(y_sorted, sorted_idx, weights):
    """unpermute's three inputs must agree on N * k; when two agree, the third is the one named."""
    N, k = weights.shape
    rows = {"y_sorted": y_sorted.shape[0], "sorted_idx": sorted_idx.shape[0], "weights": N * k}
    if len(set(rows.values())) == 1:
        return
    agreed = [value for value, count in Counter(rows.values()).items() if count == 2]
    described = (f"y_sorted has {rows['y_sorted']} rows, sorted_idx {rows['sorted_idx']} entries, "
                 f"weights {tuple(weights.shape)} = [N, k]")
    if not agreed:
        raise ValueError(f"y_sorted, sorted_idx and weights must agree on N * k: {described}")
    odd = next(name for name, value in rows.items() if value != agreed[0])
    what = {"y_sorted": f"N * k = {agreed[0]} rows", "sorted_idx": f"N * k = {agreed[0]} entries",
            "weights": f"shape [N, k] with N * k = {agreed[0]}"}[odd]
    raise ValueError(f"{odd} must have {what} like the other two inputs ({described})")


# ---------------------------------------------------------------------------------------------------
# Public API

def route(x, gate_weight, top_k, *, renormalize=True, backend=None):
    """Router: fp32 logits x @ gate_weight^T, softmax over experts, top-k, optional renormalisation.

    Args:
        x: [N, H] bf16, fp16 or fp32. gate_weight: [E, H] (any float dtype), E <= 256.
        top_k: experts per token, 1 <= top_k <= min(8, E).
        renormalize: rescale the k weights to sum to 1.
    Returns:
        (weights [N, k] fp32, expert_ids [N, k] int32), in descending weight order. Differentiable in
        x and gate_weight through the weights.
    """
    _check_x("x", x)
    _check_gate(gate_weight, x, top_k)
    row = resolve_backend("route", backend, OP_BACKENDS["route"], x.device, family_var=ENV_VAR)
    return _run(row, _route, _route_body, x, gate_weight, top_k, bool(renormalize), eager=_ROUTE_EAGER)


def permute(x, expert_ids, num_experts, *, backend=None):
    """Gather token rows into a stable expert-contiguous order.

    Args:
        x: [N, H]. expert_ids: [N, k] int32/int64 in [0, num_experts) (checked on CPU tensors only).
        num_experts: E, 1 <= E <= 256.
    Returns:
        (x_sorted [N*k, H], sorted_idx [N*k] int32: the flat token * k + slot entry of each sorted row,
        offsets [E+1] int32 on x's device: expert e owns rows offsets[e]:offsets[e+1]). Entries of one
        expert keep their flat order. Differentiable in x.
    """
    _check_x("x", x)
    _check_int("num_experts", num_experts, 1, MAX_EXPERTS)
    _check_expert_ids(expert_ids, x.shape[0], num_experts, x.device)
    row = resolve_backend("permute", backend, OP_BACKENDS["permute"], x.device, family_var=ENV_VAR)
    return _run(row, _permute, _permute_body, x, expert_ids, num_experts, eager=_PERMUTE_EAGER)


def grouped_gemm(x, weight, offsets, *, weight_layout="nk", backend=None):
    """Per-expert matmul over contiguous row segments, offsets on the device (no host sync).

    Args:
        x: [M, K] bf16, fp16 or fp32.
        weight: [E, N, K] for weight_layout "nk" (y = x W_e^T, as HF stores experts) or [E, K, N] for
            "kn" (y = x W_e); x's dtype.
        offsets: [E+1] int32, offsets[0] = 0, non-decreasing, offsets[E] = M (checked on CPU tensors).
    Returns:
        y [M, N] in x's dtype (fp32 accumulation). Differentiable in x and weight.
    """
    _check_x("x", x)
    _check_weight("weight", weight, x)
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
    K, N = weight.shape[2:0:-1] if weight_layout == "nk" else weight.shape[1:]
    if K != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} (layout {weight_layout!r}: "
                         f"{'[E, N, K]' if weight_layout == 'nk' else '[E, K, N]'}) has K = {K} but x has "
                         f"{x.shape[1]} columns")
    _check_offsets(offsets, weight.shape[0], x.shape[0], x.device)
    row = resolve_backend("grouped_gemm", backend, OP_BACKENDS["grouped_gemm"], x.device, family_var=ENV_VAR,
                          dtype=x.dtype, gemm_sizes={"N (output columns)": N, "K (x.shape[1])": K})
    return _run(row, _grouped_gemm, _grouped_gemm_body, x, weight, offsets, weight_layout,
                eager=_GROUPED_GEMM_EAGER)


def unpermute(y_sorted, sorted_idx, weights, *, backend=None):
    """Weighted combine back to token order: out[t] = sum_j weights[t, j] * y_sorted[row of t * k + j].

    Deterministic (a gather through the inverse permutation, then a sum over the k slots in order, in
    fp32; no atomics).

    Args:
        y_sorted: [N*k, H]. sorted_idx: [N*k] int32 from permute. weights: [N, k] fp32.
    Returns:
        out [N, H] in y_sorted's dtype. Differentiable in y_sorted and weights.
    """
    _check_x("y_sorted", y_sorted)
    check_tensor("sorted_idx", sorted_idx, ndim=1, dtypes=(torch.int32,), device=y_sorted.device, contiguous=True)
    check_tensor("weights", weights, ndim=2, dtypes=(torch.float32,), device=y_sorted.device, contiguous=True)
    N, k = weights.shape
    _check_int("weights.shape[1] (top_k)", k, 1, MAX_TOP_K)
    _check_combine_rows(y_sorted, sorted_idx, weights)
    if sorted_idx.device.type == "cpu" and not torch.equal(
            torch.sort(sorted_idx).values, torch.arange(N * k, dtype=torch.int32)):
        raise ValueError("sorted_idx must be a permutation of 0 .. N*k-1")
    row = resolve_backend("unpermute", backend, OP_BACKENDS["unpermute"], y_sorted.device, family_var=ENV_VAR)
    return _run(row, _unpermute, _unpermute_body, y_sorted, sorted_idx, weights, k, eager=_UNPERMUTE_EAGER)


def fused_moe(x, gate_weight, gate_up_proj, down_proj, top_k, *, renormalize=True, backend=None):
    """The MoE layer: route, permute, SwiGLU experts as two grouped GEMMs, weighted combine.

    Args:
        x: [N, H] bf16, fp16 or fp32. gate_weight: [E, H] (any float dtype).
        gate_up_proj: [E, 2F, H] (gate rows first), down_proj: [E, H, F]; x's dtype.
        top_k: experts per token (<= min(8, E)). renormalize: rescale the k weights to sum to 1.
    Returns:
        out [N, H] in x's dtype; differentiable in x and all weights (gate_weight through the routing
        weights). No host synchronisation on CUDA: capturable in a CUDA graph. On the triton backend a
        call with few tokens and no gradient runs the few-token kernels (moe_ops/backends.py says when).
    """
    _check_x("x", x)
    _check_gate(gate_weight, x, top_k)
    F = _check_expert_weights(gate_up_proj, down_proj, x, gate_weight.shape[0])
    row = resolve_backend("fused_moe", backend, OP_BACKENDS["fused_moe"], x.device, family_var=ENV_VAR,
                          dtype=x.dtype, gemm_sizes={"H": x.shape[1], "F": F})
    return _run(row, _fused_moe_kernels, _fused_moe_body, x, gate_weight, gate_up_proj, down_proj, top_k,
                bool(renormalize), eager=_fused_moe_eager)
