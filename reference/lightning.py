"""Lightning attention, written three independent ways, plus MiniMax slopes and varlen packing.

Per head h with rate s_h > 0 and decay lambda_h = exp(-s_h), state S [D, Dv]:

    S_t = lambda_h S_{t-1} + k_t^T v_t      (S_{-1} = initial state, zeros if absent)
    o_t = scale * q_t S_t                    (the current token is included)

Layout [B, T, H, D]; slope [H]; states [B, H, D, Dv]. Every function computes in the dtype it is
given (tests pass float64) and returns (o, final_state).
"""

import math

import torch


def slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """MiniMax decay rates: ALiBi slopes times (1 - layer_idx / (num_layers - 1) + 1e-5), float64 [H]."""

    def alibi(n: int) -> list[float]:
        if math.log2(n).is_integer():
            start = 2.0 ** (-8.0 / n)
            return [start ** (i + 1) for i in range(n)]
        closest = 2 ** math.floor(math.log2(n))  # the ALiBi recipe for n not a power of two
        return alibi(closest) + alibi(2 * closest)[0::2][: n - closest]

    factor = 1.0 - layer_idx / (num_layers - 1) + 1e-5
    return torch.tensor(alibi(num_heads), dtype=torch.float64) * factor


def _zeros_state(q, v):
    B, _, H, D = q.shape
    return torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype, device=q.device)


def lightning_attn_quadratic(q, k, v, slope, scale=1.0, initial_state=None):
    """Materialised T x T decay mask: o = scale * ((q k^T) * M) v + scale * lambda^(t+1) q S0."""
    B, T, H, D = q.shape
    s = slope.to(q.dtype)
    t = torch.arange(T, dtype=q.dtype, device=q.device)
    dist = t[:, None] - t[None, :]                                            # t - j
    mask = torch.where(dist >= 0, torch.exp(-s[:, None, None] * dist.clamp(min=0)), torch.zeros((), dtype=q.dtype))
    scores = torch.einsum("bthd,bjhd->bhtj", q, k) * mask                     # [B, H, T, T]
    o = torch.einsum("bhtj,bjhe->bthe", scores, v)
    s0 = _zeros_state(q, v) if initial_state is None else initial_state.to(q.dtype)
    q_decay = torch.exp(-s[None, :] * (t[:, None] + 1))                       # [T, H]
    o = o + torch.einsum("bthd,bhde->bthe", q * q_decay[None, :, :, None], s0)
    k_decay = torch.exp(-s[None, :] * (T - 1 - t[:, None]))                   # [T, H]
    final = torch.einsum("bthd,bthe->bhde", k * k_decay[None, :, :, None], v) + torch.exp(-s * T)[None, :, None, None] * s0
    return scale * o, final


def lightning_attn_recurrent(q, k, v, slope, scale=1.0, initial_state=None):
    """Token by token, exactly the definition."""
    T = q.shape[1]
    decay = torch.exp(-slope.to(q.dtype))[None, :, None, None]
    state = _zeros_state(q, v) if initial_state is None else initial_state.to(q.dtype).clone()
    outs = []
    for t in range(T):
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], state))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o, state


def lightning_attn_blockwise(q, k, v, slope, scale=1.0, initial_state=None, block_size=256):
    """The original release's algorithm: per block, intra-block masked attention plus the query times
    the carried state (inter-block); the state advances once per block."""
    B, T, H, D = q.shape
    s = slope.to(q.dtype)[None, :, None, None]                                 # [1, H, 1, 1]
    state = _zeros_state(q, v) if initial_state is None else initial_state.to(q.dtype).clone()
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))                        # [B, H, T, D]
    outs = []
    for start in range(0, T, block_size):
        n = min(block_size, T - start)
        qb, kb, vb = (x[:, :, start:start + n] for x in (qh, kh, vh))
        i = torch.arange(n, dtype=q.dtype, device=q.device)
        q_decay = torch.exp(-s * (i[:, None] + 1))                             # [1, H, n, 1]
        k_decay = torch.exp(-s * (n - 1 - i[:, None]))                         # [1, H, n, 1]
        dist = i[:, None] - i[None, :]
        diag = torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), torch.zeros((), dtype=q.dtype))
        intra = ((qb @ kb.transpose(-1, -2)) * diag) @ vb
        inter = (qb * q_decay) @ state
        outs.append(scale * (intra + inter))
        state = torch.exp(-s * n) * state + (kb * k_decay).transpose(-1, -2) @ vb
    o = torch.cat(outs, dim=2).transpose(1, 2) if outs else v.new_zeros(v.shape)
    return o, state


def lightning_attn_varlen(fn, q, k, v, slope, cu_seqlens, scale=1.0, initial_state=None):
    """Apply a single-sequence form `fn` to each packed sequence of q/k/v [1, total, H, D].

    cu_seqlens [N + 1] holds the sequence boundaries; initial_state is [N, H, D, Dv] or None.
    Returns (o [1, total, H, Dv], final states [N, H, D, Dv]).
    """
    bounds = [int(x) for x in cu_seqlens]
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, final = fn(q[:, a:b], k[:, a:b], v[:, a:b], slope, scale=scale, initial_state=h0)
        outs.append(o)
        finals.append(final)
    return torch.cat(outs, dim=1), torch.cat(finals, dim=0)


def lightning_decode_step(q, k, v, slope, state, slot_idx, scale=1.0):
    """One token per row: q/k/v [B, H, D]; state [S, H, D, Dv]; slot_idx [B] (negative = padding).

    Returns (o [B, H, Dv], the updated copy of state); padding rows give zeros and touch no slot.
    """
    new_state = state.clone()
    o = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    decay = torch.exp(-slope.to(state.dtype))[:, None, None]
    for b, slot in enumerate(int(x) for x in slot_idx):
        if slot < 0:
            continue
        new_state[slot] = decay * state[slot] + k[b].to(state.dtype)[:, :, None] * v[b].to(state.dtype)[:, None, :]
        o[b] = (scale * torch.einsum("hd,hde->he", q[b].to(state.dtype), new_state[slot])).to(q.dtype)
    return o, new_state
