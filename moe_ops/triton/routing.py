"""Router kernels: fp32 logits, softmax, top-k and renormalisation fused, one block of tokens a program; and
their backward, which recomputes the logits instead of keeping the [N, E] probabilities.

`router_logits` and `softmax_top_k` are shared with the few-token path (few_token.py)."""

import triton
import triton.language as tl


@triton.jit
def softmax_over_experts(logits, expert_mask):
    """fp32 softmax over the experts in expert_mask of logits [rows, BLOCK_E]; 0 for padding experts."""
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return probs / tl.sum(probs, axis=1)[:, None]


@triton.jit
def softmax_top_k(logits, expert_mask, experts, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """(weights, ids) [rows, BLOCK_K] of fp32 logits [rows, BLOCK_E]: softmax over the experts in
    expert_mask, the TOP_K largest in descending order (ties to the lowest expert index), optionally
    renormalised to sum to 1; slots past TOP_K hold 0."""
    probs = softmax_over_experts(logits, expert_mask)
    # Padding experts get -1 so that they lose to any real expert, even one whose probability underflowed.
    probs = tl.where(expert_mask[None, :], probs, -1.0)
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.float32)
    top_id = tl.zeros((logits.shape[0], BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        best_id = tl.min(tl.where(probs == best[:, None], experts[None, :], BLOCK_E), axis=1)
        top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
        top_id = tl.where(slots[None, :] == j, best_id[:, None], top_id)
        probs = tl.where(experts[None, :] == best_id[:, None], -2.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    return top_w, top_id


@triton.jit
def router_logits(x_ptr, gate_ptr, rows, row_mask, experts, expert_mask, h_start, h_end, stride_xn, stride_xh,
                  stride_ge, stride_gh, EXACT_16BIT_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 logits [BLOCK_N, BLOCK_E] = x[rows, h_start:h_end] @ gate[experts, h_start:h_end]^T.
    EXACT_16BIT_DOT: x and gate share a 16-bit dtype, whose products are exact in fp32, so the tensor
    cores' fp32-accumulated dot gives the fp32 logits; otherwise both are cast to fp32 (ieee dot)."""
    logits = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for h0 in range(h_start, h_end, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < h_end
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + hs[None, :] * stride_xh,
                    mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        g = tl.load(gate_ptr + experts[:, None].to(tl.int64) * stride_ge + hs[None, :] * stride_gh,
                    mask=expert_mask[:, None] & h_mask[None, :], other=0.0)
        if EXACT_16BIT_DOT:
            logits = tl.dot(x, tl.trans(g), logits)
        else:
            logits = tl.dot(x.to(tl.float32), tl.trans(g.to(tl.float32)), logits, input_precision="ieee")
    return logits


@triton.jit
def program_logits(x_ptr, gate_ptr, N, H, E, stride_xn, stride_xh, stride_ge, stride_gh,
                   EXACT_16BIT_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    """This program's block of tokens (rows, row_mask), the experts (experts, expert_mask) and their logits."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    logits = router_logits(x_ptr, gate_ptr, rows, row_mask, experts, expert_mask, 0, H, stride_xn, stride_xh,
                           stride_ge, stride_gh, EXACT_16BIT_DOT, BLOCK_N, BLOCK_E, BLOCK_H)
    return rows, row_mask, experts, expert_mask, logits


@triton.jit
def route_kernel(x_ptr, gate_ptr, weights_ptr, ids_ptr, N, H, E, stride_xn, stride_xh, stride_ge, stride_gh,
                 TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, EXACT_16BIT_DOT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, row_mask, experts, expert_mask, logits = program_logits(x_ptr, gate_ptr, N, H, E, stride_xn, stride_xh,
                                                                  stride_ge, stride_gh, EXACT_16BIT_DOT, BLOCK_N,
                                                                  BLOCK_E, BLOCK_H)
    top_w, top_id = softmax_top_k(logits, expert_mask, experts, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K)
    slots = tl.arange(0, BLOCK_K)
    out_mask = row_mask[:, None] & (slots[None, :] < TOP_K)
    offs = rows[:, None] * TOP_K + slots[None, :]
    tl.store(weights_ptr + offs, top_w, mask=out_mask)
    tl.store(ids_ptr + offs, top_id, mask=out_mask)


@triton.jit
def route_backward_kernel(x_ptr, gate_ptr, ids_ptr, dweights_ptr, dlogits_ptr, dx_ptr, N, H, E, stride_xn,
                          stride_xh, stride_ge, stride_gh, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                          EXACT_16BIT_DOT: tl.constexpr, STORE_DLOGITS: tl.constexpr, STORE_DX: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    """From d(weights) [N, TOP_K] fp32 to d(logits) [N, E] fp32 (stored if STORE_DLOGITS, for
    route_gate_grad_kernel) and dx = d(logits) @ gate [N, H] in x's dtype (if STORE_DX), through
    softmax, the pick of ids and the renormalisation. The probabilities come from the logits recomputed
    as route_kernel computes them."""
    rows, row_mask, experts, expert_mask, logits = program_logits(x_ptr, gate_ptr, N, H, E, stride_xn, stride_xh,
                                                                  stride_ge, stride_gh, EXACT_16BIT_DOT, BLOCK_N,
                                                                  BLOCK_E, BLOCK_H)
    probs = softmax_over_experts(logits, expert_mask)
    # d p_j = dw_j, or with renormalisation (w_j = p_j / total, total the picked p's sum)
    # d p_j = (dw_j - sum_i dw_i w_i) / total; the picked experts are distinct.
    total = tl.full((BLOCK_N,), 1.0, tl.float32)
    dw_dot_w = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if RENORMALIZE:
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            picked = tl.load(ids_ptr + rows * TOP_K + j, mask=row_mask, other=-1)
            p_j = tl.sum(tl.where(experts[None, :] == picked[:, None], probs, 0.0), axis=1)
            total += p_j
            dw_dot_w += tl.load(dweights_ptr + rows * TOP_K + j, mask=row_mask, other=0.0) * p_j
        total = tl.where(total > 0, total, 1.0)  # rows past N pick nothing
        dw_dot_w = dw_dot_w / total
    d_probs = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        picked = tl.load(ids_ptr + rows * TOP_K + j, mask=row_mask, other=-1)
        d_p = (tl.load(dweights_ptr + rows * TOP_K + j, mask=row_mask, other=0.0) - dw_dot_w) / total
        d_probs = tl.where(experts[None, :] == picked[:, None], d_p[:, None], d_probs)
    d_logits = probs * (d_probs - tl.sum(d_probs * probs, axis=1)[:, None])
    if STORE_DLOGITS:
        tl.store(dlogits_ptr + rows[:, None] * E + experts[None, :], d_logits,
                 mask=row_mask[:, None] & expert_mask[None, :])
    if STORE_DX:
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            g = tl.load(gate_ptr + experts[:, None].to(tl.int64) * stride_ge + hs[None, :] * stride_gh,
                        mask=expert_mask[:, None] & h_mask[None, :], other=0.0)
            dx = tl.dot(d_logits, g.to(tl.float32), input_precision="ieee")
            tl.store(dx_ptr + rows[:, None].to(tl.int64) * H + hs[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & h_mask[None, :])


@triton.jit
def route_gate_grad_kernel(dlogits_ptr, x_ptr, partial_ptr, N, H, E, ROWS_PER_SPLIT, stride_xn, stride_xh,
                           BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    """partial[split] [E, H] fp32 = d(logits)[rows of the split]^T @ x[same rows], for one block of hidden
    columns: the splits are summed in order on the host (deterministic, no atomics)."""
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    col_mask = cols < H
    acc = tl.zeros((BLOCK_E, BLOCK_H), dtype=tl.float32)
    row_end = tl.minimum(N, (split + 1) * ROWS_PER_SPLIT)
    for r0 in range(split * ROWS_PER_SPLIT, row_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < row_end
        dl = tl.load(dlogits_ptr + rows[:, None] * E + experts[None, :],
                     mask=row_mask[:, None] & (experts < E)[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + cols[None, :] * stride_xh,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(dl), x.to(tl.float32), acc, input_precision="ieee")
    tl.store(partial_ptr + (split * E + experts[:, None]).to(tl.int64) * H + cols[None, :], acc,
             mask=(experts < E)[:, None] & col_mask[None, :])
