"""The references agree with each other (float64) and with independent formulations."""

import math

import torch
from hypothesis import given, strategies as st

from m1_kernels.reference import attention as RA
from m1_kernels.reference import lightning as RL
from m1_kernels.reference import moe as RM


def _qkv(B, T, H, D, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, dtype=torch.float64, generator=g) / math.sqrt(D)
    k = torch.randn(B, T, H, D, dtype=torch.float64, generator=g) / math.sqrt(D)
    v = torch.randn(B, T, H, Dv, dtype=torch.float64, generator=g)
    h0 = torch.randn(B, H, D, Dv, dtype=torch.float64, generator=g)
    return q, k, v, h0


@given(B=st.integers(1, 2), T=st.sampled_from([1, 7, 31, 32, 33, 70]), H=st.integers(1, 4),
       D=st.sampled_from([4, 8]), Dv=st.sampled_from([4, 8]), layer=st.sampled_from([0, 3, 78]),
       block=st.sampled_from([8, 16, 32]), with_h0=st.booleans(), seed=st.integers(0, 2**16))
def test_three_lightning_forms_agree(B, T, H, D, Dv, layer, block, with_h0, seed):
    q, k, v, h0 = _qkv(B, T, H, D, Dv, seed)
    slope = RL.slopes(H, layer, 80)
    h0 = h0 if with_h0 else None
    o_q, s_q = RL.lightning_attn_quadratic(q, k, v, slope, 0.5, h0)
    for form in (RL.lightning_attn_recurrent,
                 lambda *a, **kw: RL.lightning_attn_blockwise(*a, block_size=block, **kw)):
        o, s = form(q, k, v, slope, scale=0.5, initial_state=h0)
        torch.testing.assert_close(o, o_q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s, s_q, rtol=1e-10, atol=1e-12)


def test_slopes_match_minimax_release():
    s = RL.slopes(64, 0, 80)
    assert abs(s[0].item() - 2 ** (-1 / 8) * (1 + 1e-5)) < 1e-12
    assert abs(s[-1].item() - 2 ** -8 * (1 + 1e-5)) < 1e-12
    last = RL.slopes(64, 78, 80) / s
    torch.testing.assert_close(last, torch.full_like(last, (1 - 78 / 79 + 1e-5) / (1 + 1e-5)))
    # H not a power of two: the ALiBi recipe interleaves the next power's slopes.
    s6 = RL.slopes(6, 0, 2) / (1 + 1e-5)
    expected = [2 ** (-8 * (i + 1) / 4) for i in range(4)] + [2 ** (-8 * 1 / 8), 2 ** (-8 * 3 / 8)]
    torch.testing.assert_close(s6, torch.tensor(expected, dtype=torch.float64))


def test_varlen_equals_separate_sequences():
    q, k, v, _ = _qkv(1, 20, 2, 4, 4, 0)
    h0 = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    slope = RL.slopes(2, 1, 4)
    cu = torch.tensor([0, 0, 1, 9, 20])  # an empty and a length-1 sequence
    o, s = RL.lightning_attn_varlen(RL.lightning_attn_recurrent, q, k, v, slope, cu, initial_state=h0)
    for n, (a, b) in enumerate([(0, 0), (0, 1), (1, 9), (9, 20)]):
        o_n, s_n = RL.lightning_attn_quadratic(q[:, a:b], k[:, a:b], v[:, a:b], slope, initial_state=h0[n:n + 1])
        torch.testing.assert_close(o[:, a:b], o_n)
        torch.testing.assert_close(s[n:n + 1], s_n)


def test_decode_step_equals_recurrence():
    q, k, v, h0 = _qkv(3, 1, 2, 4, 4, 1)
    slope = RL.slopes(2, 0, 2)
    state = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    state[3] = h0[0]
    state[0] = h0[2]
    o, new = RL.lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], slope, state, torch.tensor([3, -1, 0]))
    o_ref, s_ref = RL.lightning_attn_recurrent(q, k, v, slope, initial_state=h0)
    torch.testing.assert_close(o[0], o_ref[0, 0])
    torch.testing.assert_close(o[2], o_ref[2, 0])
    assert (o[1] == 0).all()
    torch.testing.assert_close(new[3], s_ref[0])
    torch.testing.assert_close(new[0], s_ref[2])
    for untouched in (1, 2, 4):
        assert torch.equal(new[untouched], state[untouched])


@given(N=st.integers(1, 40), E=st.integers(1, 8), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_moe_loop_equals_dense_mixture(N, E, k, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    H, F_ = 8, 6
    x = torch.randn(N, H, dtype=torch.float64, generator=g)
    gate = torch.randn(E, H, dtype=torch.float64, generator=g)
    gate_up = torch.randn(E, 2 * F_, H, dtype=torch.float64, generator=g) / math.sqrt(H)
    down = torch.randn(E, H, F_, dtype=torch.float64, generator=g) / math.sqrt(F_)
    out = RM.moe(x, gate, gate_up, down, k)
    # Dense form: every expert on every token, combined with a sparse weight matrix.
    probs = torch.softmax(x @ gate.T, dim=-1)
    top = probs.topk(k, dim=-1)
    dense_w = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    h = torch.einsum("nh,efh->nef", x, gate_up)
    act = torch.nn.functional.silu(h[..., :F_]) * h[..., F_:]
    y = torch.einsum("nef,ehf->neh", act, down)
    torch.testing.assert_close(out, (dense_w[..., None] * y).sum(1))
    assert torch.allclose(RM.route(x, gate, k)[0].sum(-1), torch.ones(N, dtype=torch.float64))


def test_partial_rotary_is_a_rotation_of_pairs():
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    pos = torch.arange(5)
    y = RA.apply_partial_rotary(x, pos, rotary_dim=4, theta=10000.0)
    assert torch.equal(y[..., 4:], x[..., 4:])
    # Rotate-half pairs dim i with dim i + rotary_dim/2: as complex numbers, multiplication by e^{i pos f}.
    z = torch.complex(x[..., :2], x[..., 2:4])
    freq = 1.0 / 10000.0 ** (torch.arange(0, 4, 2, dtype=torch.float64) / 4)
    zr = z * torch.exp(1j * pos[None, :, None, None] * freq)
    torch.testing.assert_close(y[..., :2], zr.real)
    torch.testing.assert_close(y[..., 2:4], zr.imag)


def test_softmax_attention_matches_sdpa_with_gqa():
    q = torch.randn(2, 6, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 9, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 9, 2, 8, dtype=torch.float64)
    out = RA.softmax_attention(q, k, v)
    kk, vv = (x.repeat_interleave(2, dim=2).transpose(1, 2) for x in (k, v))
    mask = torch.ones(6, 9, dtype=torch.bool).tril(diagonal=3)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2))
