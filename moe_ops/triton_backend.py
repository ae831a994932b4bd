"""The "triton" backend: launches the kernels of moe_ops/triton on validated tensors.

Every function here takes tensors already checked by moe_ops.ops and returns new tensors; none reads
device memory on the host, so the whole MoE forward captures in a CUDA graph. moe_ops.ops wraps them
in torch.library custom ops with fake implementations and autograd formulas.

The interface of a kernel backend module (moe_ops.cuda_backend implements the same names; offsets are
[E+1] int32 on the device with offsets[0] = 0 and offsets[E] = M):
    route(x, gate_weight, top_k, renormalize) -> (weights [N, k] fp32, ids [N, k] int32)
    route_backward(dweights, x, gate_weight, ids, renormalize, needs_dx, needs_dgate) -> (dx or None, dgate or None)
    permute(x, expert_ids, num_experts) -> (x_sorted [N*k, H], sorted_idx [N*k] int32, offsets)
    unpermute(y_sorted, sorted_idx, weights or None, top_k) -> out [N, H]
    unpermute_backward(dout, y_sorted, sorted_idx, weights) -> (dy_sorted, dweights fp32)
    grouped_gemm(x [M, K], weight [E, N, K] ("nk") or [E, K, N] ("kn"), offsets, weight_layout) -> y [M, N]
    grouped_gemm_weight_grad(x [M, K], dy [M, N], offsets, weight_layout) -> dweight (weight's shape)
    grouped_gemm_swiglu(x, gate_up_proj [E, 2F, H], offsets, store_preact) -> (h [M, F], [gate|up] [M, 2F] or [0, 2F])
    grouped_gemm_swiglu_backward(dy [M, H], down_proj [E, H, F], offsets, [gate|up]) -> d[gate|up] [M, 2F]

and, Triton only, the few-token forward of the whole layer (moe_ops.ops uses it for calls without
gradients that few_token_fits):
    few_token_fits(num_tokens, top_k) -> bool
    few_token_moe(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize) -> out [N, H]
"""

import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from m1_kernels.dispatch import triton_interpreted

from .triton import few_token as FT
from .triton import grouped_gemm as G
from .triton import permute as P
from .triton.routing import route_backward_kernel, route_gate_grad_kernel, route_kernel


def _pow2(n, lo=1):
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------------
# Routing and permutation

def _router_launch(x, gate_weight, top_k, renormalize):
    """The router kernels' common launch: grid, strides and tiles (16 tokens a program, every expert in
    one tile, hidden blocks sized to keep the [16, E] x [E, BLOCK_H] tiles in registers)."""
    N, E = x.shape[0], gate_weight.shape[0]
    block_e = _pow2(E, 16)
    exact = x.dtype == gate_weight.dtype and x.dtype in (torch.float16, torch.bfloat16)
    args = (N, x.shape[1], E, x.stride(0), x.stride(1), gate_weight.stride(0), gate_weight.stride(1))
    meta = dict(TOP_K=top_k, RENORMALIZE=bool(renormalize), EXACT_16BIT_DOT=exact, BLOCK_N=16, BLOCK_E=block_e,
                BLOCK_H=max(16, min(128, 4096 // block_e)))
    return (triton.cdiv(N, 16),), args, meta


def route(x, gate_weight, top_k, renormalize):
    N = x.shape[0]
    weights = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(N, top_k, dtype=torch.int32, device=x.device)
    if N == 0:
        return weights, ids
    grid, args, meta = _router_launch(x, gate_weight, top_k, renormalize)
    route_kernel[grid](x, gate_weight, weights, ids, *args, BLOCK_K=_pow2(top_k, 2), **meta)
    return weights, ids


def route_backward(dweights, x, gate_weight, ids, renormalize, needs_dx, needs_dgate):
    """Gradients of route's weights with respect to x [N, H] and gate_weight [E, H] (None where not needed),
    from the logits recomputed as route computes them: the [N, E] d(logits) in fp32 (for dgate only), dx
    from the same kernel, dgate from per-split partial sums over the tokens, added in order."""
    N, H = x.shape
    E = gate_weight.shape[0]
    dx = torch.empty(N, H, dtype=x.dtype, device=x.device) if needs_dx else None
    d_logits = torch.empty(N, E, dtype=torch.float32, device=x.device) if needs_dgate else None
    if N == 0:
        return dx, gate_weight.new_zeros(E, H) if needs_dgate else None
    grid, args, meta = _router_launch(x, gate_weight, ids.shape[1], renormalize)
    route_backward_kernel[grid](x, gate_weight, ids, dweights.float().contiguous(), d_logits, dx, *args,
                                STORE_DLOGITS=needs_dgate, STORE_DX=needs_dx, **meta)
    if not needs_dgate:
        return dx, None
    block_n, block_e = 32, meta["BLOCK_E"]
    block_h = max(16, min(64, 4096 // block_e))
    column_blocks, row_blocks = triton.cdiv(H, block_h), triton.cdiv(N, block_n)
    # Enough programs to fill the GPU: the tokens split into parts whose partial sums are added in order.
    splits = min(row_blocks, max(1, 4 * G.num_sms(x.device) // column_blocks))
    rows_per_split = triton.cdiv(row_blocks, splits) * block_n
    splits = triton.cdiv(N, rows_per_split)
    partial = torch.empty(splits, E, H, dtype=torch.float32, device=x.device)
    route_gate_grad_kernel[(column_blocks, splits)](
        d_logits, x, partial, N, H, E, rows_per_split, x.stride(0), x.stride(1), BLOCK_N=block_n, BLOCK_E=block_e,
        BLOCK_H=block_h)
    return dx, (partial[0] if splits == 1 else partial.sum(0)).to(gate_weight.dtype)


def sort_by_expert(expert_ids, num_experts):
    """(sorted_idx [N*k] int32, offsets [E+1] int32): a stable counting sort on the device."""
    flat = expert_ids.reshape(-1).to(torch.int32).contiguous()
    NK, E = flat.numel(), num_experts
    device = flat.device
    sorted_idx = torch.empty(NK, dtype=torch.int32, device=device)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=device)
    if NK == 0:
        return sorted_idx, offsets.zero_()
    block_e = _pow2(E, 16)
    block = max(16, min(1024, 16384 // block_e))  # one-hot tiles of [block, block_e] stay in registers
    nb = triton.cdiv(NK, block)
    block_counts = torch.empty(nb, E, dtype=torch.int32, device=device)
    block_base = torch.empty(nb, E, dtype=torch.int32, device=device)
    totals = torch.empty(E, dtype=torch.int32, device=device)
    P.count_kernel[(nb,)](flat, block_counts, NK, E, BLOCK=block, BLOCK_E=block_e)
    P.scan_kernel[(E,)](block_counts, block_base, totals, nb, E, BLOCK_B=256)
    P.scatter_kernel[(nb,)](flat, block_base, totals, sorted_idx, offsets, NK, E, BLOCK=block, BLOCK_E=block_e)
    return sorted_idx, offsets


def gather_rows(src, sorted_idx, top_k, row_scale=None, out_dtype=None):
    """out[p] = src[sorted_idx[p] // top_k] (* row_scale[sorted_idx[p]])."""
    M, H = sorted_idx.numel(), src.shape[1]
    out = torch.empty(M, H, dtype=out_dtype or src.dtype, device=src.device)
    if M and H:
        block_h = min(256, _pow2(H, 16))
        P.gather_rows_kernel[(triton.cdiv(M, 16), triton.cdiv(H, block_h))](
            src, sorted_idx, row_scale if row_scale is not None else src, out, M, H, src.stride(0), out.stride(0),
            TOP_K=top_k, HAS_SCALE=row_scale is not None, BLOCK_M=16, BLOCK_H=block_h)
    return out


def permute(x, expert_ids, num_experts):
    sorted_idx, offsets = sort_by_expert(expert_ids, num_experts)
    return gather_rows(x, sorted_idx, expert_ids.shape[1]), sorted_idx, offsets


def inverse_permutation(sorted_idx):
    M = sorted_idx.numel()
    inverse = torch.empty_like(sorted_idx)
    if M:
        P.invert_kernel[(triton.cdiv(M, 1024),)](sorted_idx, inverse, M, BLOCK=1024)
    return inverse


def unpermute(y_sorted, sorted_idx, weights, top_k):
    """Weighted (or, with weights None, plain) sum of each token's k rows, in slot order."""
    N, H = sorted_idx.numel() // top_k, y_sorted.shape[1]
    out = torch.empty(N, H, dtype=y_sorted.dtype, device=y_sorted.device)
    if N and H:
        inverse = inverse_permutation(sorted_idx)
        block_h = min(256, _pow2(H, 16))
        P.combine_kernel[(triton.cdiv(N, 16), triton.cdiv(H, block_h))](
            y_sorted, inverse, weights if weights is not None else y_sorted, out, N, H, y_sorted.stride(0),
            out.stride(0), TOP_K=top_k, HAS_WEIGHTS=weights is not None, BLOCK_N=16, BLOCK_H=block_h)
    return out


def unpermute_backward(dout, y_sorted, sorted_idx, weights):
    """(dy_sorted, dweights) of out = unpermute(y_sorted, sorted_idx, weights)."""
    N, top_k = weights.shape
    dy_sorted = gather_rows(dout, sorted_idx, top_k, row_scale=weights, out_dtype=y_sorted.dtype)
    dweights = torch.empty(N, top_k, dtype=torch.float32, device=dout.device)
    H = dout.shape[1]
    if N:
        inverse = inverse_permutation(sorted_idx)
        P.combine_weight_grad_kernel[(triton.cdiv(N, 16),)](
            dout, y_sorted, inverse, dweights, N, H, dout.stride(0), y_sorted.stride(0), TOP_K=top_k,
            BLOCK_N=16, BLOCK_H=min(256, _pow2(H, 16)))
    return dy_sorted, dweights


# ---------------------------------------------------------------------------------------------------
# Grouped GEMMs

def _weight_strides(weight, w_kn):
    """(stride_e, stride_k, stride_n) of W_e seen as a [K, N] matrix."""
    se, s1, s2 = weight.stride()
    return (se, s1, s2) if w_kn else (se, s2, s1)


def _tma_ready(t):
    """Host TMA descriptors need a unit last stride and 16-byte aligned base and row strides."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 for s in t.stride()[:-1]))


def _use_tma(a, weight):
    """TMA loads on Hopper (and in the interpreter, so that the CPU tests cover the path); the pointer
    path elsewhere, for unaligned tensors, or with M1_MOE_TMA=0."""
    if os.environ.get("M1_MOE_TMA", "1") == "0" or not (_tma_ready(a) and _tma_ready(weight)):
        return False
    if a.device.type == "cuda":
        return torch.cuda.get_device_capability(a.device)[0] >= 9
    return triton_interpreted()


def _launch_gemm(a, weight, w_kn, offsets, out, N, K, epilogue=0, preact=None):
    """out = epilogue(a @ W_e) per segment; w_kn: the weight is stored [E, K, N] (else [E, N, K])."""
    M, E = a.shape[0], weight.shape[0]
    if M == 0 or N == 0:
        return out
    sms = G.num_sms(a.device)

    def grid(meta):
        upper = (triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"])
        return (max(1, min(sms * meta["PROGRAMS_PER_SM"], upper)),)

    use_tma = _use_tma(a, weight)
    a_arg, w_arg = a, weight
    if use_tma:  # boxes are placeholders until the config's pre-hook sets them
        a_arg = TensorDescriptor(a, list(a.shape), list(a.stride()), [1, 1])
        w_arg = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [1, 1, 1])
    G.grouped_gemm_kernel[grid](
        a_arg, w_arg, offsets, out, preact if preact is not None else out, M, N, K, E, a.stride(0), a.stride(1),
        *_weight_strides(weight, w_kn), out.stride(0), preact.stride(0) if preact is not None else 0, M_BUCKET=_pow2(M),
        EPILOGUE=epilogue, STORE_PREACT=preact is not None, USE_TMA=use_tma, W_KN=w_kn,
        DOT_PRECISION=_dot_precision(a.dtype), BLOCK_E=_pow2(E, 16))
    return out


def grouped_gemm(x, weight, offsets, weight_layout):
    K = x.shape[1]
    N = weight.shape[1] if weight_layout == "nk" else weight.shape[2]
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    return _launch_gemm(x, weight, weight_layout == "kn", offsets, y, N, K)


def grouped_gemm_weight_grad(x, dy, offsets, weight_layout):
    """dW_e = dy_e^T x_e ("nk", [E, N, K]) or x_e^T dy_e ("kn", [E, K, N]); zeros for empty experts."""
    E = offsets.numel() - 1
    p, q = (dy, x) if weight_layout == "nk" else (x, dy)
    P_, Q_ = p.shape[1], q.shape[1]
    dw = torch.empty(E, P_, Q_, dtype=x.dtype, device=x.device)
    if P_ and Q_:
        def grid(meta):
            return (E * triton.cdiv(P_, meta["BLOCK_P"]) * triton.cdiv(Q_, meta["BLOCK_Q"]),)

        G.grouped_wgrad_kernel[grid](
            p, q, offsets, dw, P_, Q_, E, p.stride(0), p.stride(1), q.stride(0), q.stride(1), dw.stride(0),
            dw.stride(1), dw.stride(2), M_BUCKET=_pow2(x.shape[0]), DOT_PRECISION=_dot_precision(x.dtype))
    return dw


def grouped_gemm_swiglu(x, gate_up_proj, offsets, store_preact):
    """(silu(x W_gate^T) * (x W_up^T) [M, F], [gate | up] [M, 2F] or an empty tensor), gate_up_proj [E, 2F, H]."""
    M, K = x.shape
    F = gate_up_proj.shape[1] // 2
    h = torch.empty(M, F, dtype=x.dtype, device=x.device)
    preact = torch.empty(M if store_preact else 0, 2 * F, dtype=x.dtype, device=x.device)
    _launch_gemm(x, gate_up_proj, False, offsets, h, F, K, epilogue=1,
                 preact=preact if store_preact else None)
    return h, preact


def grouped_gemm_swiglu_backward(dy, down_proj, offsets, preact):
    """d[gate | up] from dy [M, H] through y = h down_e^T (down_proj [E, H, F]) and h = silu(gate) * up."""
    M, H = dy.shape
    F = down_proj.shape[2]
    d_preact = torch.empty(M, 2 * F, dtype=dy.dtype, device=dy.device)
    return _launch_gemm(dy, down_proj, True, offsets, d_preact, F, H, epilogue=2,
                        preact=preact)


# ---------------------------------------------------------------------------------------------------
# Few-token forward (decode)

# An expert gets at most one row per token, so with N <= 64 tokens all its rows fit one register tile
# of the few-token kernels; N * k <= 128 bounds the one-program route-and-plan kernel's one-hot tile of
# entries by experts.
FEW_TOKEN_MAX_TOKENS = 64
FEW_TOKEN_MAX_ENTRIES = 128


def few_token_fits(num_tokens, top_k):
    return num_tokens <= FEW_TOKEN_MAX_TOKENS and num_tokens * top_k <= FEW_TOKEN_MAX_ENTRIES


def few_token_route(x, gate_weight, top_k, renormalize):
    """Routing and plan of the few-token forward: (weights [N, k] fp32, ids [N, k] int32) as route's,
    then sorted_idx [N*k] and offsets [E+1] as permute's (a stable sort by expert), and active
    [min(E, N*k)]: active[s] the s-th expert that has rows, -1 past the last. Two launches: partial
    logits over slices of the hidden dimension (the router weight read by many SMs), then one program."""
    N, H = x.shape
    E = gate_weight.shape[0]
    NK, S = N * top_k, min(E, N * top_k)
    block_n, block_e = _pow2(N, 16), _pow2(E, 16)
    block_h = max(16, min(128, 8192 // block_e))
    # As many slices as keep the partial logits (read back by one program) within 64 KB.
    slices = max(1, min(triton.cdiv(H, block_h), 16384 // (block_n * block_e)))
    slice_len = triton.cdiv(triton.cdiv(H, slices), block_h) * block_h
    slices = triton.cdiv(H, slice_len)
    partial = torch.empty(slices, block_n, block_e, dtype=torch.float32, device=x.device)
    FT.router_logits_kernel[(slices,)](
        x, gate_weight, partial, N, H, E, slice_len, x.stride(0), gate_weight.stride(0),
        EXACT_16BIT_DOT=x.dtype == gate_weight.dtype and x.dtype in (torch.float16, torch.bfloat16),
        BLOCK_N=block_n, BLOCK_E=block_e, BLOCK_H=block_h)
    weights = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(N, top_k, dtype=torch.int32, device=x.device)
    sorted_idx = torch.empty(NK, dtype=torch.int32, device=x.device)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=x.device)
    active = torch.empty(S, dtype=torch.int32, device=x.device)
    FT.route_plan_kernel[(1,)](partial, weights, ids, sorted_idx, offsets, active, N, E, S, slices, TOP_K=top_k,
                               RENORMALIZE=bool(renormalize), BLOCK_N=block_n, BLOCK_E=block_e,
                               BLOCK_K=_pow2(top_k, 2), BLOCK_S=_pow2(S, 16))
    return weights, ids, sorted_idx, offsets, active


def few_token_moe(x, gate_weight, gate_up_proj, down_proj, top_k, renormalize):
    """The MoE layer's forward for few tokens (few_token_fits): routing and plan, gate_up + SwiGLU,
    down + weight, slot sum; five launches, each chosen expert's weights read once
    (moe_ops/triton/few_token.py)."""
    N, H = x.shape
    F = down_proj.shape[2]
    out = torch.empty(N, H, dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    weights, _, sorted_idx, offsets, active = few_token_route(x, gate_weight, top_k, renormalize)
    NK, S = sorted_idx.numel(), active.numel()
    block_m, precision = _pow2(N, 16), _dot_precision(x.dtype)
    h = torch.empty(NK, F, dtype=x.dtype, device=x.device)
    FT.gate_up_kernel[lambda meta: (S * triton.cdiv(F, meta["BLOCK_F"]),)](
        x, gate_up_proj, sorted_idx, offsets, active, h, H, F, S, x.stride(0), *gate_up_proj.stride(), h.stride(0),
        TOP_K=top_k, DOT_PRECISION=precision, BLOCK_M=block_m)
    ys = torch.empty(NK, H, dtype=torch.float32, device=x.device)
    FT.down_kernel[lambda meta: (S * triton.cdiv(H, meta["BLOCK_N"]),)](
        h, down_proj, sorted_idx, offsets, active, weights, ys, H, F, S, h.stride(0), *down_proj.stride(),
        ys.stride(0), DOT_PRECISION=precision, BLOCK_M=block_m)
    block_h = min(1024, _pow2(H, 16))
    FT.slot_sum_kernel[(N, triton.cdiv(H, block_h))](ys, out, H, ys.stride(0), out.stride(0), TOP_K=top_k,
                                                     BLOCK_H=block_h)
    return out
