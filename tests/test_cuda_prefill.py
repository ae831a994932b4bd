"""The CUDA (tensor-core) prefill forward, csrc/lightning_prefill.cu, against the float64 reference.

GPU only. bf16/fp16 inputs (the kernel's operands); errors within 2x of the same-precision PyTorch path.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from m1_kernels.lightning_ops import cuda_backend
from numerics import assert_within_2x, nan_filled_outputs
from m1_kernels.reference import lightning as RL

pytestmark = pytest.mark.gpu


def _inputs(B, T, H, D, Dv, dtype, seed, layer, N=None):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, dtype=torch.float64, generator=g) / math.sqrt(D) for _ in range(2))
    v = torch.randn(B, T, H, Dv, dtype=torch.float64, generator=g)
    h0 = torch.randn(N or B, H, D, Dv, dtype=torch.float64, generator=g)
    slope = RL.slopes(H, layer, 80)
    return [x.to(dtype).cuda() for x in (q, k, v)], slope.float().cuda(), h0.float().cuda()


def _reference(q, k, v, slope, h0, dtype, cu=None, scale=1.0):
    args = [x.cpu().to(dtype) for x in (q, k, v)] + [slope.cpu().double()]
    h0 = None if h0 is None else h0.cpu().to(dtype)
    if cu is None:
        return RL.lightning_attn_blockwise(*args, scale=scale, initial_state=h0, block_size=64)
    return RL.lightning_attn_varlen(RL.lightning_attn_blockwise, *args, cu.cpu(), scale=scale, initial_state=h0)


@given(B=st.integers(1, 2), T=st.sampled_from([1, 63, 64, 65, 300, 1000, 4099]), H=st.integers(1, 3),
       D=st.sampled_from([64, 128]), Dv=st.sampled_from([64, 128]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), layer=st.sampled_from([0, 78]),
       with_h0=st.booleans(), with_final=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_matches_reference(B, T, H, D, Dv, dtype, layer, with_h0, with_final, seed):
    """Without a final state the kernels skip each sequence's last segment sum: o must not change."""
    (q, k, v), slope, h0 = _inputs(B, T, H, D, Dv, dtype, seed, layer)
    h0 = h0 if with_h0 else None
    with nan_filled_outputs():
        o, final = cuda_backend.lightning_fwd(q, k, v, slope, h0, None, 0.5, with_final)
    o64, s64 = _reference(q, k, v, slope, h0, torch.float64, scale=0.5)
    o_pt, s_pt = _reference(q, k, v, slope, h0, dtype, scale=0.5)   # the same-precision PyTorch path
    assert_within_2x("o", o.cpu(), o64, o_pt)
    if with_final:
        assert_within_2x("final", final.cpu(), s64, s_pt.float())
    else:
        assert final is None


@pytest.mark.parametrize("with_final", [False, True])
def test_varlen_with_empty_and_short_sequences(with_final):
    lengths = [0, 1, 300, 64, 2000, 7]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32).cuda()
    (q, k, v), slope, h0 = _inputs(1, int(cu[-1]), 2, 128, 128, torch.bfloat16, 0, 40, N=len(lengths))
    with nan_filled_outputs():
        o, final = cuda_backend.lightning_fwd(q, k, v, slope, h0, cu, 1.0, with_final)
    o64, s64 = _reference(q, k, v, slope, h0, torch.float64, cu)
    o_pt, s_pt = _reference(q, k, v, slope, h0, torch.bfloat16, cu)
    assert_within_2x("o", o.cpu(), o64, o_pt)
    if with_final:
        assert_within_2x("final", final.cpu(), s64, s_pt.float())


def test_slot_cache_prefill_reads_and_writes_slots():
    (q, k, v), slope, h0 = _inputs(3, 200, 2, 128, 128, torch.bfloat16, 1, 0)
    cache = torch.randn(5, 2, 128, 128, device="cuda")
    slots = torch.tensor([4, -1, 1], dtype=torch.int32, device="cuda")
    before = cache.clone()
    o = cuda_backend.lightning_fwd_with_cache(q, k, v, slope, cache, slots, None, 1.0)
    o_ref, s_ref = cuda_backend.lightning_fwd(q, k, v, slope, before[[4, 0, 1]].contiguous(), None, 1.0)
    torch.testing.assert_close(o[0], o_ref[0])
    torch.testing.assert_close(o[2], o_ref[2])
    assert (o[1] == 0).all()
    torch.testing.assert_close(cache[4], s_ref[0])
    torch.testing.assert_close(cache[1], s_ref[2])
    for untouched in (0, 2, 3):
        assert torch.equal(cache[untouched], before[untouched])


def test_long_sequence_last_layer_bf16():
    """T = 65536 with the last linear layer's near-zero decay: the state keeps growing."""
    (q, k, v), slope, h0 = _inputs(1, 65536, 2, 128, 128, torch.bfloat16, 2, 78)
    o, final = cuda_backend.lightning_fwd(q, k, v, slope, h0, None, 1.0)
    # float64 truth on the GPU, chunk by chunk (the quadratic CPU reference would be T^2).
    q64, k64, v64 = (x.double() for x in (q, k, v))
    o64, s64 = RL.lightning_attn_blockwise(q64, k64, v64, slope.double(), initial_state=h0.double(), block_size=256)
    o_pt, s_pt = RL.lightning_attn_blockwise(q, k, v, slope.double(), initial_state=h0, block_size=256)
    assert_within_2x("o", o.double(), o64, o_pt)
    assert_within_2x("final", final.double(), s64, s_pt.float())


def _gradients(fn, tensors, do, dfinal):
    """Gradients of <o, do> + <final, dfinal> (dfinal None: the final state is not used) for `tensors`."""
    leaves = [x.detach().requires_grad_() for x in tensors]
    o, final = fn(*leaves)
    outputs, grads = ([o], [do.to(o)]) if dfinal is None else ([o, final], [do.to(o), dfinal.to(final)])
    torch.autograd.backward(outputs, grads)
    return [x.grad for x in leaves]


def _assert_gradients_close(got, truth, names, dtype):
    """Relative to the float64 gradient's norm: the kernels round q, k, v, do and their score and
    state operands to the input type (bf16 keeps 8 bits, fp16 11)."""
    limit = 1.5e-2 if dtype == torch.bfloat16 else 5e-3
    for name, g, t in zip(names, got, truth):
        assert g is not None and g.shape == t.shape, f"{name}: {None if g is None else tuple(g.shape)}"
        assert not torch.isnan(g).any(), f"{name}: NaN (an element no pass wrote)"
        rel = ((g.double().cpu() - t).norm() / t.norm().clamp_min(1e-30)).item()
        assert rel < limit, f"{name}: relative error {rel:.2e} >= {limit:.0e}"


@given(B=st.integers(1, 2), T=st.sampled_from([1, 63, 64, 65, 300, 1000, 4099]), H=st.integers(1, 2),
       D=st.sampled_from([64, 128]), Dv=st.sampled_from([64, 128]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), layer=st.sampled_from([0, 78]),
       decay_boost=st.sampled_from([1.0, 8.0]), with_h0=st.booleans(), with_dfinal=st.booleans(),
       scale=st.sampled_from([1.0, 0.5]), seed=st.integers(0, 2**16))
def test_backward_matches_reference(B, T, H, D, Dv, dtype, layer, decay_boost, with_h0, with_dfinal, scale, seed):
    """The cuda backward's three passes (two walking time backwards in the adjoint convention) against
    float64 autograd through the blockwise reference; decay_boost makes off-by-one-step decays visible."""
    (q, k, v), slope, h0 = _inputs(B, T, H, D, Dv, dtype, seed, layer)
    slope = slope * decay_boost
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, Dv, dtype=torch.float64, generator=g).to(dtype)
    dfinal = torch.randn(B, H, D, Dv, dtype=torch.float64, generator=g) if with_dfinal else None
    h0 = h0 if with_h0 else None
    with nan_filled_outputs():
        dq, dk, dv, dh0 = cuda_backend.lightning_bwd(do.cuda(), None if dfinal is None else dfinal.float().cuda(),
                                                     q, k, v, slope, h0, None, scale)
    tensors = [x.cpu().double() for x in (q, k, v)] + ([h0.cpu().double()] if with_h0 else [])
    truth = _gradients(lambda *t: RL.lightning_attn_blockwise(*t[:3], slope.cpu().double(), scale=scale,
                                                              initial_state=t[3] if with_h0 else None, block_size=64),
                       tensors, do.double(), dfinal)
    _assert_gradients_close([dq, dk, dv] + ([dh0] if with_h0 else []), truth, ["dq", "dk", "dv", "dh0"], dtype)
    if not with_h0:
        assert dh0 is None


@pytest.mark.parametrize("with_dfinal", [False, True])
def test_varlen_backward_with_empty_and_short_sequences(with_dfinal):
    """Packed sequences walked backwards: an empty sequence's initial-state gradient is dfinal itself."""
    lengths = [0, 1, 300, 64, 2000, 7, 0]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32).cuda()
    T, N = int(cu[-1]), len(lengths)
    (q, k, v), slope, h0 = _inputs(1, T, 2, 128, 64, torch.bfloat16, 0, 0, N=N)
    slope = slope * 8
    g = torch.Generator().manual_seed(5)
    do = torch.randn(1, T, 2, 64, dtype=torch.float64, generator=g).to(torch.bfloat16)
    dfinal = torch.randn(N, 2, 128, 64, dtype=torch.float64, generator=g) if with_dfinal else None
    with nan_filled_outputs():
        got = cuda_backend.lightning_bwd(do.cuda(), None if dfinal is None else dfinal.float().cuda(), q, k, v, slope,
                                         h0, cu, 1.0)
    truth = _gradients(lambda *t: RL.lightning_attn_varlen(RL.lightning_attn_blockwise, *t[:3],
                                                           slope.cpu().double(), cu.cpu(), initial_state=t[3]),
                       [x.cpu().double() for x in (q, k, v, h0)], do.double(), dfinal)
    _assert_gradients_close(got, truth, ["dq", "dk", "dv", "dh0"], torch.bfloat16)
    if with_dfinal:
        torch.testing.assert_close(got[3][0], dfinal[0].float().cuda())


def test_packed_segment_tables_cached_per_cu_seqlens_version():
    """A packed table is built (a host read of cu_seqlens) once per tensor, direction and in-place
    version, in reversed positions for the backward's reverse passes."""
    cu = torch.tensor([0, 100, 700], dtype=torch.int32, device="cuda")
    first = cuda_backend._segment_table(1, 700, 2, 64, cu, cu.device)
    assert cuda_backend._segment_table(1, 700, 2, 64, cu, cu.device) is first
    backwards = cuda_backend._segment_table(1, 700, 2, 64, cu, cu.device, reverse=True)
    assert backwards is not first

    def spans(tables):  # per sequence: (first start, total length) of its segments
        segments, sequences = (x.cpu() for x in tables)
        return [(segments[a, 1].item(), segments[a:a + n, 2].sum().item()) for a, n in sequences.tolist()]

    assert spans(first) == [(0, 100), (100, 600)]
    assert spans(backwards) == [(600, 100), (0, 600)]  # reversed positions t' = 699 - t
    cu[1] = 300
    rebuilt = cuda_backend._segment_table(1, 700, 2, 64, cu, cu.device)
    assert rebuilt is not first and spans(rebuilt) == [(0, 300), (300, 400)]


def test_fp32_and_other_head_dims_rejected_clearly():
    """The backend table's limits for the cuda prefill, raised when it is asked for."""
    from m1_kernels import lightning_ops

    (q, k, v), slope, _ = _inputs(1, 8, 1, 64, 64, torch.float32, 0, 0)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        lightning_ops.lightning_attn(q, k, v, slope, backend="cuda")
    (q, k, v), slope, _ = _inputs(1, 8, 1, 32, 64, torch.bfloat16, 0, 0)
    with pytest.raises(ValueError, match="cuda backend takes head dims"):
        lightning_ops.lightning_attn(q, k, v, slope, backend="cuda")


def test_public_api_continuation_gradients_and_opcheck():
    from m1_kernels import lightning_ops
    from m1_kernels.lightning_ops import ops

    (q, k, v), slope, h0 = _inputs(2, 700, 2, 128, 128, torch.float16, 3, 78)
    o, final = lightning_ops.lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True, backend="cuda")
    o1, s1 = lightning_ops.lightning_attn(q[:, :333], k[:, :333], v[:, :333], slope, initial_state=h0,
                                          output_final_state=True, backend="cuda")
    o2, s2 = lightning_ops.lightning_attn(q[:, 333:], k[:, 333:], v[:, 333:], slope, initial_state=s1,
                                          output_final_state=True, backend="cuda")
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s2, final, rtol=2e-2, atol=2e-2)
    # Gradients of sum(o * w) for both backends' backwards against float64 autograd through the reference.
    w = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def grads(fn, tensors):
        leaves = [x.detach().requires_grad_() for x in tensors]
        (fn(*leaves) * w.to(leaves[0])).sum().backward()
        return [x.grad.double().cpu() for x in leaves]

    truth = grads(lambda *t: RL.lightning_attn_quadratic(*t, slope.cpu().double(), initial_state=h0.cpu().double())[0],
                  [x.cpu().double() for x in (q, k, v)])
    for backend in ("cuda", "triton"):
        got = grads(lambda *t: lightning_ops.lightning_attn(*t, slope, initial_state=h0, backend=backend)[0], (q, k, v))
        for name, g, t in zip(("dq", "dk", "dv"), got, truth):
            rel = ((g - t).norm() / t.norm()).item()
            assert rel < 5e-3, f"{backend} {name}: relative error {rel:.2e}"
    torch.library.opcheck(ops._attn_fwd, (q, k, v, slope, h0, None, 1.0, True, "cuda"))
