"""Context parallelism: a long sequence split in contiguous chunks over the ranks of a "cp" group.

Lightning layers (LASP-2 style, docs/parallel.md). With decay lambda_h = exp(-s_h), the state after
chunk r is linear in the chunks before it, so each rank:

1. runs its chunk from a zero state: o0 and the chunk-final state S_r ([N, H, D, Dv] fp32);
2. all-gathers the S_j (with each chunk's length);
3. forms its true initial state  I_r = sum_{j<r} lambda^(L_{j+1} + ... + L_{r-1}) S_j;
4. adds what that state contributes:  o_t += scale * lambda^(t+1) q_t I_r  (exactly the initial-state
   term of lightning_attn).

Step 4 costs one [T, D] x [D, Dv] product per head, the inter-chunk term of the op itself; running
the chunk again with `initial_state` would redo the whole op (intra-chunk attention and its
backward) for the same result. The backward of the all-gather is a reduce-scatter: the gradient of
each S_j is the sum of what the later ranks' corrections send back.

Packed sequences (cu_seqlens in global coordinates): a chunk holds pieces of sequences; the state
carried into a chunk flows only into its first piece, and only if that piece continues a sequence
from earlier chunks; a chunk with a sequence start inside cuts the carry from the chunks before it.

Softmax layers all-gather keys and values (uneven chunk lengths are padded for the collective) and
attend causally with global positions: rank r's queries see the keys up to the end of its chunk.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from m1_kernels.lightning_ops import LightningAttention, lightning_attn
from m1_kernels.model.modeling import SoftmaxAttention, apply_partial_rotary

from .comm import all_gather_sizes, gather_varlen, split_sizes

# Tokens per block of the initial-state correction: bounds its fp32 temporaries ([B, block, H, D]).
_CORRECTION_BLOCK = 4096


def _decay_powers(slope, t0, t1, dtype):
    """exp(-s_h (t + 1)) for t in [t0, t1): [t1 - t0, H, 1]."""
    t = torch.arange(t0 + 1, t1 + 1, device=slope.device, dtype=dtype)
    return torch.exp(-slope.to(dtype)[None, :, None] * t[:, None, None])


class _InitialStateCorrection(torch.autograd.Function):
    """o[:, t] + scale * exp(-s (t+1)) q[:, t] @ init for t < first (o unchanged after), blockwise in
    init's dtype (the states' fp32). Saves only q (already kept by the op) and init, not a copy of q."""

    @staticmethod
    def forward(ctx, o, q, init, slope, first, scale):
        out = o.clone()
        for t0 in range(0, first, _CORRECTION_BLOCK):
            t1 = min(first, t0 + _CORRECTION_BLOCK)
            qd = q[:, t0:t1].to(init.dtype) * _decay_powers(slope, t0, t1, init.dtype)
            corr = torch.einsum("bthd,bhde->bthe", qd, init)
            out[:, t0:t1] = (o[:, t0:t1].to(init.dtype) + scale * corr).to(o.dtype)
        ctx.save_for_backward(q, init, slope)
        ctx.first, ctx.scale = first, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, init, slope = ctx.saved_tensors
        dq = torch.zeros_like(q)
        dinit = torch.zeros_like(init)
        for t0 in range(0, ctx.first, _CORRECTION_BLOCK):
            t1 = min(ctx.first, t0 + _CORRECTION_BLOCK)
            decay = _decay_powers(slope, t0, t1, init.dtype)
            d = dout[:, t0:t1].to(init.dtype)
            dq[:, t0:t1] = (ctx.scale * decay * torch.einsum("bthe,bhde->bthd", d, init)).to(q.dtype)
            dinit += ctx.scale * torch.einsum("bthd,bthe->bhde", q[:, t0:t1].to(init.dtype) * decay, d)
        return dout, dq, dinit, None, None, None


def _chunk_from_zero(q, k, v, slope, scale, cu_seqlens, backend):
    """lightning_attn of this chunk from zero states, with its final states; an empty chunk does not
    reach the kernels (its output is empty and its states zero)."""
    if q.shape[1] == 0:
        B, _, H, D = q.shape
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        return v.new_zeros(v.shape), torch.zeros(N, H, D, v.shape[-1], dtype=torch.float32, device=q.device)
    return lightning_attn(q, k, v, slope, scale=scale, cu_seqlens=cu_seqlens, output_final_state=True,
                          backend=backend)


def _in_backward(state, q, k, v):
    """`state` as the all-gather's input. Whether the all-gather is differentiated must agree across
    ranks (its backward is a collective): an empty chunk's final state has no history, so it joins
    the graph as a leaf whenever the inputs ask for gradients."""
    if torch.is_grad_enabled() and not state.requires_grad and any(t.requires_grad for t in (q, k, v)):
        return state.detach().requires_grad_()
    return state


def _packed_plan(cu, sizes, rank):
    """Host-side plan of one chunk of a packed batch.

    Returns (local cu_seqlens, length of the first local piece, carry[j] for every rank j: whether
    chunk j's last state reaches this chunk's first piece, exponent[j]: the tokens in between)."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    a, b = starts[rank], starts[rank] + sizes[rank]
    local = [0] + [c - a for c in cu if a < c < b] + [sizes[rank]]
    # A chunk passes the carry through when no sequence starts inside it.
    passes = [not any(s <= c < s + n for c in cu) for s, n in zip(starts, sizes)]
    continues = a not in set(cu)
    carry, exponent = [], []
    for j in range(len(sizes)):
        between = range(j + 1, rank)
        carry.append(j < rank and continues and all(passes[m] for m in between))
        exponent.append(sum(sizes[m] for m in between))
    return local, local[1], carry, exponent


def lightning_attn_cp(q, k, v, slope, group, *, scale=1.0, cu_seqlens=None, chunk_sizes=None, backend=None):
    """Lightning attention over a sequence split in contiguous chunks across the ranks of `group`.

    Rank r holds chunk r (ranks in group order hold consecutive chunks). Equal to lightning_attn on
    the whole sequence, restricted to this chunk; differentiable in q, k, v (collectives in the
    backward too, so every rank must run it).

    Args:
        q, k: [B, T_r, H, D]; v: [B, T_r, H, Dv]: this rank's chunk (T_r may differ between ranks,
            and may be 0). Same B, H, D, Dv on every rank.
        slope: [H] fp32 decay rates.
        group: the torch.distributed process group of the chunks.
        scale: multiplies the output.
        cu_seqlens: optional [N + 1] boundaries of sequences packed along the *whole* sequence
            (global positions, the same on every rank; B == 1). Values are read on the host.
        chunk_sizes: with cu_seqlens, the length of every rank's chunk (host ints; default: the
            packed length split as evenly as possible, the first ranks one longer). Without
            cu_seqlens the lengths travel with the states and need not be given.
        backend: kernel backend of lightning_attn.

    Returns:
        o [B, T_r, H, Dv] in q's dtype.
    """
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    T = q.shape[1]
    if cu_seqlens is None:
        if chunk_sizes is not None:
            raise ValueError("chunk_sizes goes with cu_seqlens (without it the lengths travel with the states)")
        o, final = _chunk_from_zero(q, k, v, slope, scale, None, backend)
        packed = torch.cat([_in_backward(final, q, k, v).flatten(), final.new_full((1,), float(T))])
        gathered = gather_varlen(packed[None], 0, [1] * world, group)           # [world, n + 1]
        states = gathered[:, :-1].view(world, *final.shape)
        lengths = gathered[:, -1].detach()
        ends = lengths.cumsum(0)
        before = ends[rank - 1] if rank > 0 else ends.new_zeros(())
        exponent = (before - ends).clamp(min=0)        # tokens of the chunks strictly between j and r
        carry = torch.arange(world, device=q.device) < rank
        first = T
    else:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B = {q.shape[0]}")
        cu = [int(c) for c in cu_seqlens.tolist()]
        if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0, got {cu}")
        sizes = split_sizes(cu[-1], world) if chunk_sizes is None else [int(n) for n in chunk_sizes]
        if len(sizes) != world or sum(sizes) != cu[-1] or sizes[rank] != T or min(sizes) < 0:
            raise ValueError(f"chunk_sizes {sizes} must give {world} non-negative chunk lengths summing to the "
                             f"packed length {cu[-1]}, this rank's being q.shape[1] = {T}")
        local, first, carry, exponent = _packed_plan(cu, sizes, rank)
        local = torch.tensor(local, dtype=cu_seqlens.dtype, device=q.device)
        o, finals = _chunk_from_zero(q, k, v, slope, scale, local, backend)
        last = _in_backward(finals[-1:], q, k, v)      # the piece that may run on into the next chunk
        states = gather_varlen(last[None], 0, [1] * world, group)                # [world, 1, H, D, Dv]
        carry = torch.tensor(carry, device=q.device)
        exponent = torch.tensor(exponent, dtype=torch.float32, device=q.device)
    # coef[j, h] = lambda_h^exponent[j] for the chunks whose state reaches this one, else 0.
    coef = torch.where(carry[:, None], torch.exp(-slope.float()[None, :] * exponent[:, None]), 0.0)
    init = torch.einsum("jh,jbhde->bhde", coef, states)
    # Every rank applies the correction (zero on rank 0) so that every rank's backward reaches the
    # all-gather's reduce-scatter.
    return _InitialStateCorrection.apply(o, q, init, slope, first, float(scale))


class ContextParallelLightning(LightningAttention):
    """LightningAttention whose attention runs over the chunks of a "cp" group (lightning_attn_cp).

    The projections, gate and norm are the parent's; the training forward only (no slot cache)."""

    cp_group: dist.ProcessGroup

    @classmethod
    def convert(cls, module: LightningAttention, group) -> "ContextParallelLightning":
        """Turn `module` into this class in place (same parameters and names)."""
        module.__class__ = cls
        module.cp_group = group
        return module

    def forward(self, hidden_states, state=None, slot_idx=None, cu_seqlens=None):
        if state is not None or slot_idx is not None or cu_seqlens is not None:
            raise ValueError("a context-parallel lightning layer runs full forwards only: state, slot_idx and "
                             "cu_seqlens must be None")
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        qkv = F.silu(self.qkv_proj(hidden_states)).view(B, T, H, 3 * D)
        q, k, v = qkv.split(D, dim=-1)
        o = lightning_attn_cp(q, k, v, self.slope.float(), self.cp_group, backend=self.backend)
        o = self.norm(o.reshape(B, T, H * D))
        return self.out_proj(torch.sigmoid(self.output_gate(hidden_states)) * o)


class ContextParallelSoftmax(SoftmaxAttention):
    """SoftmaxAttention over the chunks of a "cp" group: keys and values all-gathered, causal in global
    positions (the RoPE of cos/sin must already use global positions)."""

    cp_group: dist.ProcessGroup

    @classmethod
    def convert(cls, module: SoftmaxAttention, group) -> "ContextParallelSoftmax":
        """Turn `module` into this class in place (same parameters and names)."""
        module.__class__ = cls
        module.cp_group = group
        return module

    def forward(self, x, cos, sin, cache=None, plan=None):
        if cache is not None:
            raise ValueError("a context-parallel softmax layer runs full forwards only: cache must be None")
        B, T, _ = x.shape
        q = apply_partial_rotary(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_partial_rotary(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        sizes = all_gather_sizes(T, self.cp_group, x.device)
        end = sum(sizes[:dist.get_rank(self.cp_group) + 1])
        # Keys after this chunk are never attended to: keep the gathered ones up to its end.
        kv = gather_varlen(torch.cat([k, v], dim=-1), 1, sizes, self.cp_group)[:, :end]
        keys, values = kv.transpose(1, 2).split(self.head_dim, dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=causal_lower_right(T, end),
                                           enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
