"""Router kernel: fp32 logits, softmax, top-k and renormalisation fused, one block of tokens a program.

`softmax_top_k` is the part after the logits, shared with the few-token path (few_token.py)."""

import triton
import triton.language as tl


@triton.jit
def softmax_top_k(logits, expert_mask, experts, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """(weights, ids) [rows, BLOCK_K] of fp32 logits [rows, BLOCK_E]: softmax over the experts in
    expert_mask, the TOP_K largest in descending order (ties to the lowest expert index), optionally
    renormalised to sum to 1; slots past TOP_K hold 0."""
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
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
def route_kernel(x_ptr, gate_ptr, weights_ptr, ids_ptr, N, H, E, stride_xn, stride_xh, stride_ge, stride_gh,
                 TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, EXACT_16BIT_DOT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """EXACT_16BIT_DOT: x and gate share a 16-bit dtype, whose products are exact in fp32, so the tensor
    cores' fp32-accumulated dot gives the fp32 logits; otherwise both are cast to fp32 (ieee dot)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    logits = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + hs[None, :] * stride_xh,
                    mask=row_mask[:, None] & (hs[None, :] < H), other=0.0)
        g = tl.load(gate_ptr + experts[:, None] * stride_ge + hs[None, :] * stride_gh,
                    mask=expert_mask[:, None] & (hs[None, :] < H), other=0.0)
        if EXACT_16BIT_DOT:
            logits = tl.dot(x, tl.trans(g), logits)
        else:
            logits = tl.dot(x.to(tl.float32), tl.trans(g.to(tl.float32)), logits, input_precision="ieee")
    top_w, top_id = softmax_top_k(logits, expert_mask, experts, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K)
    slots = tl.arange(0, BLOCK_K)
    out_mask = row_mask[:, None] & (slots[None, :] < TOP_K)
    offs = rows[:, None] * TOP_K + slots[None, :]
    tl.store(weights_ptr + offs, top_w, mask=out_mask)
    tl.store(ids_ptr + offs, top_id, mask=out_mask)
