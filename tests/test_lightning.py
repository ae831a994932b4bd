"""lightning_attn and lightning_attn_decode, every backend, against the float64 references.

Each test runs once per backend that the op implements: "torch" everywhere, "triton" on the GPU and
under the Triton interpreter on the CPU, "cuda" on the GPU only.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from m1_kernels import lightning_ops
from m1_kernels.dispatch import Backend, resolve_backend
from m1_kernels.lightning_ops import ops
from m1_kernels.lightning_ops.backends import CUDA_HEAD_DIMS, OP_BACKENDS, TRITON_HEAD_DIMS
from numerics import DEVICE, assert_within_2x, dispatched_custom_ops, nan_filled_outputs, require_backend
from m1_kernels.reference import lightning as RL

ON_GPU = DEVICE.type == "cuda"
# Long sequences only where they are cheap: the interpreter runs Triton kernels element by element.
T_VALUES = [1, 63, 64, 65, 200, 257, 1000] if ON_GPU else [1, 15, 16, 17, 63, 64, 65, 130]


ATTN_BACKENDS = [b.name for b in OP_BACKENDS["lightning_attn"]]
DECODE_BACKENDS = [b.name for b in OP_BACKENDS["lightning_attn_decode"]]


def _backend_param(name):
    marks = [pytest.mark.gpu] if name == "cuda" else []
    return pytest.param(name, marks=marks, id=name)


# The cuda prefill takes bf16/fp16 only (tensor-core operands); tests/test_cuda_prefill.py covers it.
ATTN = [_backend_param(b) for b in ("torch", "triton")]
DECODE = [_backend_param(b) for b in ("torch", "triton", "cuda")]
# The torch backend is plain PyTorch, not a torch.library op: opcheck applies to the kernel backends.
ATTN_KERNELS, DECODE_KERNELS = ATTN[1:], DECODE[1:]


def head_dim_pairs(backend):
    """(D, Dv) pairs to draw: every kernel size on the GPU; under the interpreter the smallest sizes,
    mixed pairs and 256 against a small partner (256 x 256 costs the CPU too much)."""
    if backend == "torch":
        return [(8, 8), (8, 64), (64, 8), (64, 64)]
    if backend == "cuda":
        return [(D, Dv) for D in CUDA_HEAD_DIMS for Dv in CUDA_HEAD_DIMS]
    if ON_GPU:
        return [(D, Dv) for D in TRITON_HEAD_DIMS for Dv in TRITON_HEAD_DIMS]
    return [(16, 16), (32, 32), (64, 64), (16, 32), (256, 16), (32, 256)]


def main_dim(backend):
    """The head dim of the tests that are not about head dims: M1's on the GPU."""
    return 128 if ON_GPU and backend != "torch" else 64


def make_inputs(B, T, H, D, Dv, dtype, seed, layer=0, num_layers=80, with_h0=True, N=None):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, dtype=torch.float64, generator=g) / math.sqrt(D) for _ in range(2))
    v = torch.randn(B, T, H, Dv, dtype=torch.float64, generator=g)
    h0 = torch.randn(N or B, H, D, Dv, dtype=torch.float64, generator=g) if with_h0 else None
    slope = RL.slopes(H, layer, num_layers)
    to = dict(device=DEVICE)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            slope.to(dtype=torch.float32, **to), None if h0 is None else h0.to(dtype=torch.float32, **to))


def reference(q, k, v, slope, h0, scale=1.0, dtype=torch.float64, cu_seqlens=None):
    """The quadratic reference in `dtype` on the inputs' device (float64: the truth; low precision: the
    baseline). On the GPU it runs there: a CPU float64 T x T reference would dominate the GPU suite."""
    args = [x.to(dtype) for x in (q, k, v)] + [slope.double()]
    h0 = None if h0 is None else h0.to(dtype)
    if cu_seqlens is None:
        return RL.lightning_attn_quadratic(*args, scale=scale, initial_state=h0)
    return RL.lightning_attn_varlen(RL.lightning_attn_quadratic, *args, cu_seqlens.cpu(), scale=scale,
                                    initial_state=h0)


@pytest.mark.parametrize("backend", ATTN)
@given(data=st.data())
def test_forward_matches_reference(backend, data):
    require_backend(backend, ATTN_BACKENDS)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU or backend == "torch" else [])
    B = data.draw(st.integers(1, 2))
    T = data.draw(st.sampled_from(T_VALUES))
    H = data.draw(st.integers(1, 3))
    D, Dv = data.draw(st.sampled_from(head_dim_pairs(backend)))
    dtype = data.draw(st.sampled_from(dtypes))
    layer = data.draw(st.sampled_from([0, 40, 78]))
    with_h0 = data.draw(st.booleans())
    scale = data.draw(st.sampled_from([1.0, 0.25]))
    q, k, v, slope, h0 = make_inputs(B, T, H, D, Dv, dtype, data.draw(st.integers(0, 2**16)), layer,
                                     with_h0=with_h0)
    with nan_filled_outputs():
        o, final = lightning_ops.lightning_attn(q, k, v, slope, scale=scale, initial_state=h0,
                                                output_final_state=True, backend=backend)
    assert o.dtype == dtype and final.dtype == torch.float32
    o64, s64 = reference(q, k, v, slope, h0, scale)
    o_pt, s_pt = reference(q, k, v, slope, h0, scale, dtype=dtype if dtype != torch.float16 else torch.float32)
    assert_within_2x("o", o.cpu(), o64, o_pt.to(dtype))
    assert_within_2x("final_state", final.cpu(), s64, s_pt.float())


@pytest.mark.parametrize("backend", ATTN)
@given(data=st.data())
def test_gradients_match_reference(backend, data):
    require_backend(backend, ATTN_BACKENDS)
    T = data.draw(st.sampled_from(T_VALUES))
    D, Dv = data.draw(st.sampled_from(head_dim_pairs(backend)))
    with_h0 = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    q, k, v, slope, h0 = make_inputs(1, T, 2, D, Dv, torch.float32, seed, layer=78, with_h0=with_h0)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(q.shape[:-1] + (Dv,), dtype=torch.float64, generator=g)
    dfinal = torch.randn(1, 2, D, Dv, dtype=torch.float64, generator=g)

    def grads(fn, tensors, cast):
        leaves = [x.detach().to(cast).requires_grad_() for x in tensors]
        o, final = fn(*leaves)
        torch.autograd.backward([o, final], [do.to(o), dfinal.to(final)])
        return [x.grad for x in leaves]

    tensors = [q, k, v] + ([h0] if with_h0 else [])

    def ours(q_, k_, v_, h0_=None):
        with nan_filled_outputs():
            return lightning_ops.lightning_attn(q_, k_, v_, slope, initial_state=h0_, output_final_state=True,
                                                backend=backend)

    def ref(q_, k_, v_, h0_=None):
        return RL.lightning_attn_recurrent(q_, k_, v_, slope.to(q_), initial_state=h0_)

    got = grads(ours, tensors, torch.float32)
    truth = grads(ref, tensors, torch.float64)
    base = grads(ref, tensors, torch.float32)
    for name, a, t, b in zip(["dq", "dk", "dv", "dh0"], got, truth, base):
        assert_within_2x(name, a.cpu(), t, b, atol=1e-4)


@pytest.mark.parametrize("backend", ATTN)
def test_varlen_equals_separate_calls(backend):
    require_backend(backend, ATTN_BACKENDS)
    D = main_dim(backend)
    lengths = [0, 1, 17, 64, 5] if not ON_GPU else [0, 1, 300, 64, 1000, 7]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    total = int(cu[-1])
    q, k, v, slope, h0 = make_inputs(1, total, 2, D, D, torch.float32, 3, layer=10, N=len(lengths))
    with nan_filled_outputs():
        o, final = lightning_ops.lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True,
                                                cu_seqlens=cu, backend=backend)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, f_n = lightning_ops.lightning_attn(q[:, a:b], k[:, a:b], v[:, a:b], slope,
                                                initial_state=h0[n:n + 1].contiguous(), output_final_state=True,
                                                backend=backend)
        torch.testing.assert_close(o[:, a:b], o_n, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(final[n:n + 1], f_n, rtol=1e-4, atol=1e-5)
    o64, s64 = reference(q, k, v, slope, h0, cu_seqlens=cu)
    o32, s32 = reference(q, k, v, slope, h0, dtype=torch.float32, cu_seqlens=cu)
    assert_within_2x("o", o.cpu(), o64, o32)
    assert_within_2x("final", final.cpu(), s64, s32)


@pytest.mark.parametrize("backend", ATTN)
@given(T1=st.sampled_from(T_VALUES), T2=st.sampled_from(T_VALUES), seed=st.integers(0, 2**16))
def test_prefill_continues_from_state(backend, T1, T2, seed):
    require_backend(backend, ATTN_BACKENDS)
    D = main_dim(backend)
    q, k, v, slope, h0 = make_inputs(2, T1 + T2, 2, D, D, torch.float32, seed, layer=78)
    o, final = lightning_ops.lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True,
                                            backend=backend)
    o1, s1 = lightning_ops.lightning_attn(q[:, :T1], k[:, :T1], v[:, :T1], slope, initial_state=h0,
                                          output_final_state=True, backend=backend)
    o2, s2 = lightning_ops.lightning_attn(q[:, T1:], k[:, T1:], v[:, T1:], slope, initial_state=s1,
                                          output_final_state=True, backend=backend)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s2, final, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", DECODE)
@given(data=st.data())
def test_decode_matches_reference(backend, data):
    require_backend(backend, DECODE_BACKENDS)
    B = data.draw(st.integers(1, 6))
    D, Dv = data.draw(st.sampled_from(head_dim_pairs(backend)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    H, S = 3, 8
    q, k, v = (torch.randn(B, H, d, generator=g, dtype=torch.float64) for d in (D, D, Dv))
    state = torch.randn(S, H, D, Dv, generator=g, dtype=torch.float64)
    slots = torch.randperm(S, generator=g)[:B].to(torch.int32)
    slots[torch.rand(B, generator=g) < 0.3] = -1                       # padding rows
    slope = RL.slopes(H, 78, 80)
    o64, s64 = RL.lightning_decode_step(q, k, v, slope, state, slots, scale=0.5)
    lo = [x.to(dtype) for x in (q, k, v)]
    o_pt, s_pt = RL.lightning_decode_step(*[x.to(torch.float32 if dtype == torch.float16 else dtype) for x in lo],
                                       slope, state.float(), slots, scale=0.5)
    st_dev = state.float().to(DEVICE)
    with nan_filled_outputs():
        o = lightning_ops.lightning_attn_decode(*[x.to(DEVICE) for x in lo], slope.float().to(DEVICE), st_dev,
                                                slot_idx=slots.to(DEVICE), scale=0.5, backend=backend)
    assert o.dtype == dtype
    assert_within_2x("o", o.cpu(), o64, o_pt.to(dtype))
    assert_within_2x("state", st_dev.cpu(), s64, s_pt, atol=1e-5)
    assert (o.cpu()[slots < 0] == 0).all()


@pytest.mark.parametrize("backend", DECODE)
def test_token_by_token_decode_equals_prefill(backend):
    require_backend(backend, DECODE_BACKENDS)
    T, B, H, D = 20, 2, 2, 64
    q, k, v, slope, h0 = make_inputs(B, T, H, D, D, torch.float32, 7, layer=0)
    o_ref, s_ref = lightning_ops.lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True,
                                                backend="torch")
    state = torch.zeros(B + 1, H, D, D, device=DEVICE)
    state[1:] = h0                                                      # rows live in slots 1 and 2
    slots = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)
    outs = [lightning_ops.lightning_attn_decode(q[:, t], k[:, t], v[:, t], slope, state, slot_idx=slots,
                                                backend=backend) for t in range(T)]
    torch.testing.assert_close(torch.stack(outs, dim=1), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state[1:], s_ref, rtol=1e-4, atol=1e-4)
    assert (state[0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", DECODE)
def test_decode_captures_in_cuda_graph(backend):
    require_backend(backend, DECODE_BACKENDS)
    B, H, D, S = 4, 8, 128, 6
    q, k, v = (torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    slope = lightning_ops.slopes(H, 0, 80, device="cuda")
    slots = torch.tensor([5, -1, 0, 2], dtype=torch.int32, device="cuda")
    state = torch.randn(S, H, D, D, device="cuda")
    expect_state = state.clone()
    expect = lightning_ops.lightning_attn_decode(q, k, v, slope, expect_state, slot_idx=slots, backend="torch")
    lightning_ops.lightning_attn_decode(q, k, v, slope, state.clone(), slot_idx=slots, backend=backend)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    work = state.clone()
    with torch.cuda.graph(graph):
        out = lightning_ops.lightning_attn_decode(q, k, v, slope, work, slot_idx=slots, backend=backend)
    work.copy_(state)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), expect.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(work, expect_state, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# torch.library integration

@pytest.mark.parametrize("backend", ATTN_KERNELS)
def test_opcheck_lightning_attn(backend):
    backend = require_backend(backend, ATTN_BACKENDS)
    D = main_dim(backend)
    q, k, v, slope, h0 = make_inputs(1, 33, 2, D, D, torch.float32, 0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    cu = torch.tensor([0, 10, 33], dtype=torch.int32, device=DEVICE)
    h0_2 = h0.repeat(2, 1, 1, 1).contiguous()
    torch.library.opcheck(ops._attn_fwd, (q, k, v, slope, h0, None, 1.0, True, backend))
    torch.library.opcheck(ops._attn_fwd, (q, k, v, slope, h0_2, cu, 0.5, True, backend))
    torch.library.opcheck(ops._attn_fwd, (q, k, v, slope, None, None, 1.0, False, backend))


@pytest.mark.parametrize("backend", DECODE_KERNELS)
def test_opcheck_decode(backend):
    backend = require_backend(backend, DECODE_BACKENDS)
    q, k, v = (torch.randn(3, 2, 64, device=DEVICE) for _ in range(3))
    state = torch.randn(4, 2, 64, 64, device=DEVICE)
    slots = torch.tensor([2, -1, 0], dtype=torch.int32, device=DEVICE)
    slope = lightning_ops.slopes(2, 0, 80, device=DEVICE)
    torch.library.opcheck(ops._decode, (q, k, v, slope, state, slots, 1.0, backend))


@pytest.mark.parametrize("backend", ATTN)
def test_torch_compile(backend):
    backend = require_backend(backend, ATTN_BACKENDS)
    D = main_dim(backend)
    q, k, v, slope, h0 = make_inputs(1, 40, 2, D, D, torch.float32, 1)

    def f(q, k, v, h0):
        o, s = lightning_ops.lightning_attn(q, k, v, slope, initial_state=h0, output_final_state=True,
                                            backend=backend)
        return o.sum() + s.sum()

    q.requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    (g_c,) = torch.autograd.grad(compiled(q, k, v, h0), q)
    (g_e,) = torch.autograd.grad(f(q, k, v, h0), q)
    torch.testing.assert_close(g_c, g_e)


@pytest.mark.parametrize("backend", ATTN_KERNELS)
def test_eager_calls_skip_the_custom_op_with_its_results(backend):
    """Outside torch.compile a kernel backend runs the op's body and autograd formula directly
    (_AttnEager): the same outputs and gradients as through the custom op, without its dispatch, and like it
    no second derivative; the slot-cache prefill runs its body."""
    backend = require_backend(backend, ATTN_BACKENDS)
    D = main_dim(backend)
    q, k, v, slope, h0 = make_inputs(1, 40, 2, D, D, torch.float32, 3)
    g = torch.Generator().manual_seed(4)
    do, dfinal = (torch.randn(x, generator=g).to(DEVICE) for x in ((1, 40, 2, D), (1, 2, D, D)))

    def run(fn):
        leaves = [x.detach().requires_grad_() for x in (q, k, v, h0)]
        o, final = fn(*leaves)
        torch.autograd.backward([o, final], [do, dfinal])
        return [o, final] + [x.grad for x in leaves]

    with dispatched_custom_ops() as op_calls:
        via_op = run(lambda *t: ops._attn_fwd(*t[:3], slope, t[3], None, 0.5, True, backend))
    assert op_calls == ["m1_ops::lightning_attn_fwd", "m1_ops::lightning_attn_bwd"]
    with dispatched_custom_ops() as eager_calls:
        eager = run(lambda *t: lightning_ops.lightning_attn(*t[:3], slope, scale=0.5, initial_state=t[3],
                                                            output_final_state=True, backend=backend))
    assert eager_calls == []
    for name, a, b in zip(["o", "final", "dq", "dk", "dv", "dh0"], eager, via_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for attn in (lambda *t: ops._attn_fwd(*t[:3], slope, t[3], None, 0.5, True, backend)[0],  # no second
                 lambda *t: lightning_ops.lightning_attn(*t[:3], slope, scale=0.5, initial_state=t[3],
                                                         backend=backend)[0]):           # derivative either way
        leaves = [x.detach().requires_grad_() for x in (q, k, v, h0)]
        (dq,) = torch.autograd.grad(attn(*leaves).square().sum(), leaves[0], create_graph=True)
        with pytest.raises(RuntimeError, match="autograd formula|once_differentiable"):
            dq.sum().backward()

    # The slot-cache prefill (inference, no backward) runs its body: same output, same cache update.
    caches = [torch.zeros(3, 2, D, D, device=DEVICE) for _ in range(2)]
    slots = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    with torch.no_grad(), dispatched_custom_ops() as op_calls:
        o_op = ops._with_cache(q, k, v, slope, caches[0], slots, None, 0.5, backend)
    assert op_calls == ["m1_ops::lightning_attn_with_cache"]
    with torch.no_grad(), dispatched_custom_ops() as eager_calls:
        o_eager = lightning_ops.lightning_attn_with_cache(q, k, v, slope, caches[1], slots, scale=0.5,
                                                          backend=backend)
    assert eager_calls == []
    torch.testing.assert_close(o_eager, o_op, rtol=0, atol=0)
    torch.testing.assert_close(caches[1], caches[0], rtol=0, atol=0)
    assert caches[1][2].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Bad input is rejected with errors that name the argument

def _good(T=8, D=64):
    return make_inputs(1, T, 2, D, D, torch.float32, 0)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(q=a["q"].double()), TypeError, "q must have dtype"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "k must have dtype"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
    (lambda a: a.update(k=a["k"][:, :, :1]), ValueError, "k must have shape"),
    (lambda a: a.update(v=a["v"][:, :4]), ValueError, "v must match q"),
    (lambda a: a.update(q=a["q"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError, "unit stride"),
    (lambda a: a.update(slope=a["slope"][:1]), ValueError, "slope must have shape"),
    (lambda a: a.update(slope=a["slope"].double()), TypeError, "slope must have dtype"),
    (lambda a: a.update(slope=-a["slope"]), ValueError, "slope must hold finite rates >= 0"),
    (lambda a: a.update(slope=a["slope"] / 0), ValueError, "slope must hold finite rates >= 0"),
    (lambda a: a.update(slope=torch.tensor([0.5, float("nan")])), ValueError, "slope must hold finite rates"),
    (lambda a: a.update(initial_state=a["initial_state"][:, :1].contiguous()), ValueError, "initial_state"),
    (lambda a: a.update(initial_state=a["initial_state"].half()), TypeError, "initial_state must have dtype"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "non-decreasing|initial_state"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 5, 8.0])), TypeError, "cu_seqlens must have dtype"),
    (lambda a: a.update(backend="fortran"), ValueError, "not a backend"),
    (lambda a: a.update(scale="1"), TypeError, "scale"),
])
def test_bad_input_rejected(mutate, error, match):
    q, k, v, slope, h0 = (x.cpu() for x in _good())
    args = dict(q=q, k=k, v=v, slope=slope, initial_state=h0, backend="torch")
    mutate(args)
    with pytest.raises(error, match=match):
        lightning_ops.lightning_attn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("slope"), **args)


def test_unsorted_cu_seqlens_rejected():
    q, k, v, slope, _ = (None if x is None else x.cpu() for x in _good())
    with pytest.raises(ValueError, match="non-decreasing"):
        lightning_ops.lightning_attn(q, k, v, slope, cu_seqlens=torch.tensor([0, 6, 3, 8]), backend="torch")
    with pytest.raises(ValueError, match="end at the packed length"):
        lightning_ops.lightning_attn(q, k, v, slope, cu_seqlens=torch.tensor([0, 3, 7]), backend="torch")


def test_value_checks_run_once_per_cuda_tensor_version():
    """The host reads of cu_seqlens and slope: every call on CPU tensors; once per version (and packed
    length) of any other tensor, so a model's layers sharing one cu_seqlens synchronise once."""
    calls = []
    check = lambda tensor, total: calls.append(total)  # noqa: E731
    valid = {}
    cpu, dev = torch.zeros(3), torch.zeros(3, device="meta")
    for _ in range(2):
        ops._check_once(valid, check, cpu, 70)
    assert len(calls) == 2 and cpu not in valid
    for _ in range(2):
        ops._check_once(valid, check, dev, 70)
    assert len(calls) == 3 and valid[dev] == (dev._version, 70)
    ops._check_once(valid, check, dev, 60)   # another packed length
    dev.add_(1)                              # an in-place change
    ops._check_once(valid, check, dev, 60)
    assert calls == [70, 70, 70, 60, 60]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_cu_seqlens_checked_once_per_cuda_tensor(backend):
    """On CUDA the prefill reads a cu_seqlens tensor on the host once per version and packed length: a
    shorter pack and an in-place change are checked (and rejected) again."""
    require_backend(backend, ATTN_BACKENDS)
    q, k, v = (torch.randn(1, 70, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    slope = lightning_ops.slopes(2, 0, 80, device="cuda")
    cu = torch.tensor([0, 30, 70], dtype=torch.int32, device="cuda")
    lightning_ops.lightning_attn(q, k, v, slope, cu_seqlens=cu, backend=backend)
    assert ops._VALID_CU_SEQLENS.get(cu) == (cu._version, 70)
    with pytest.raises(ValueError, match="end at the packed length 60"):
        lightning_ops.lightning_attn(q[:, :60], k[:, :60], v[:, :60], slope, cu_seqlens=cu, backend=backend)
    cu[1] = 71
    with pytest.raises(ValueError, match="non-decreasing"):
        lightning_ops.lightning_attn(q, k, v, slope, cu_seqlens=cu, backend=backend)


def test_decode_bad_input_rejected():
    q, k, v = (torch.randn(2, 2, 64) for _ in range(3))
    slope = lightning_ops.slopes(2, 0, 80)
    state = torch.zeros(3, 2, 64, 64)
    with pytest.raises(ValueError, match="slot_idx holds slot 3"):
        lightning_ops.lightning_attn_decode(q, k, v, slope, state, slot_idx=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="slot_idx must hold distinct slots"):
        lightning_ops.lightning_attn_decode(q, k, v, slope, state, slot_idx=torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="slot_idx must have dtype"):
        lightning_ops.lightning_attn_decode(q, k, v, slope, state, slot_idx=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="state must have shape"):
        lightning_ops.lightning_attn_decode(q, k, v, slope, state[:, :, :32].contiguous())
    with pytest.raises(ValueError, match="state must be contiguous"):
        lightning_ops.lightning_attn_decode(q, k, v, slope, state.transpose(2, 3))
    with pytest.raises(TypeError, match="state must have dtype"):
        lightning_ops.lightning_attn_decode(q, k, v, slope, state.half())
    with pytest.raises(ValueError, match="2 slots for a batch of 2|slots for a batch"):
        lightning_ops.lightning_attn_decode(q, k, v, slope, state[:1])
    for bad in (-slope, slope.clone().fill_(float("inf")), torch.tensor([float("nan"), 0.5])):
        with pytest.raises(ValueError, match="slope must hold finite rates >= 0"):
            lightning_ops.lightning_attn_decode(q, k, v, bad, state)
    assert (state == 0).all()
    # Padding rows may share the negative slot; a zero rate (no decay) is allowed.
    lightning_ops.lightning_attn_decode(q, k, v, torch.zeros(2), state, slot_idx=torch.tensor([-1, -1], dtype=torch.int32))


@pytest.mark.parametrize("backend", ATTN)
def test_with_cache_bad_input_rejected(backend):
    backend = require_backend(backend, ATTN_BACKENDS)
    q, k, v, slope, _ = make_inputs(2, 8, 2, 64, 64, torch.float32, 0)
    cache = torch.zeros(3, 2, 64, 64, device=DEVICE)
    slots = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)

    def call(**changes):
        args = dict(q=q, k=k, v=v, slope=slope, cache=cache, slot_idx=slots, backend=backend) | changes
        with torch.no_grad():
            return lightning_ops.lightning_attn_with_cache(*[args.pop(n) for n in ("q", "k", "v", "slope", "cache",
                                                                                  "slot_idx")], **args)

    with pytest.raises(ValueError, match="slot_idx must have shape"):
        call(slot_idx=slots[:1])
    with pytest.raises(TypeError, match="slot_idx must have dtype"):
        call(slot_idx=slots.long())
    with pytest.raises(ValueError, match="cache must have shape"):
        call(cache=cache[:, :1].contiguous())
    with pytest.raises(TypeError, match="cache must have dtype"):
        call(cache=cache.double())
    with pytest.raises(ValueError, match="slope must hold finite rates >= 0"):
        call(slope=-slope)
    with pytest.raises(ValueError, match="needs B == 1"):
        call(cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=DEVICE))
    if DEVICE.type == "cpu":  # slots are read on the host for CPU tensors only
        with pytest.raises(ValueError, match="slot_idx holds slot 3"):
            call(slot_idx=torch.tensor([0, 3], dtype=torch.int32))
        with pytest.raises(ValueError, match="slot_idx must hold distinct slots"):
            call(slot_idx=torch.tensor([2, 2], dtype=torch.int32))
    assert (cache == 0).all()
    leaf = q.detach().requires_grad_()
    with pytest.raises(RuntimeError, match="lightning_attn_with_cache is in-place inference"):
        lightning_ops.lightning_attn_with_cache(leaf, k, v, slope, cache, slots, backend=backend)


def test_layer_rejects_inputs_that_are_not_3d():
    layer = lightning_ops.LightningAttention(32, 2, 16, 0, 4)
    with pytest.raises(ValueError, match="hidden_states must be 3-D"):
        layer(torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, T, 32\]"):
        layer(torch.randn(1, 5, 16))
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        layer([[0.0] * 32])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_bad_slope_on_cuda(backend):
    """On CUDA the prefill checks each slope tensor on the host once (and again after an in-place
    change); decode never reads it on the host, and its kernels give NaN instead of wrong numbers."""
    require_backend(backend, DECODE_BACKENDS)
    q, k, v = (torch.randn(1, 70, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    slope = lightning_ops.slopes(2, 0, 80, device="cuda")
    lightning_ops.lightning_attn(q, k, v, slope, backend=backend)
    assert ops._VALID_SLOPES.get(slope) == (slope._version,)
    slope.neg_()
    with pytest.raises(ValueError, match="slope must hold finite rates >= 0"):
        lightning_ops.lightning_attn(q, k, v, slope, backend=backend)
    with pytest.raises(ValueError, match="slope must hold finite rates >= 0"):
        with torch.no_grad():
            lightning_ops.lightning_attn_with_cache(q, k, v, slope, torch.zeros(1, 2, 64, 64, device="cuda"),
                                                    torch.zeros(1, dtype=torch.int32, device="cuda"), backend=backend)
    state = torch.zeros(2, 2, 64, 64, device="cuda")
    bad = torch.tensor([0.5, float("inf")], device="cuda")
    o = lightning_ops.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], bad, state[:1], backend=backend)
    assert torch.isnan(o[:, 1]).all() and torch.isnan(state[0, 1]).all()
    assert torch.isfinite(o[:, 0]).all() and torch.isfinite(state[0, 0]).all() and (state[1] == 0).all()


def test_default_backend_skips_kernels_that_cannot_take_the_arguments(monkeypatch):
    """A tiny model's head dim (8) has no kernel: the default falls through to torch, while asking for a
    kernel backend raises; the table's rows say why."""
    monkeypatch.delenv("M1_OPS_BACKEND", raising=False)
    cuda = torch.device("cuda")
    rows = [Backend("triton", None, "", (), unsupported=lambda op, head_dim: f"no {op} kernel for D={head_dim}"),
            Backend("torch", None, "", (), custom_ops=False)]
    assert resolve_backend("op", None, rows, cuda, head_dim=8) is rows[1]
    with pytest.raises(ValueError, match="op: no op kernel for D=8"):
        resolve_backend("op", "triton", rows, cuda, head_dim=8)
    q, k, v = (torch.randn(1, 3, 2, 8, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match="triton backend takes head dims"):
        lightning_ops.lightning_attn(q, k, v, lightning_ops.slopes(2, 0, 80, device=DEVICE), backend="triton")


def test_backend_choice_order_argument_family_variable_global_variable(monkeypatch):
    """backend= > the family's variable (M1_LIGHTNING_BACKEND, M1_MOE_BACKEND) > M1_OPS_BACKEND > the default
    order; each family reads its own variable only, and an error names the variable that asked."""
    from m1_kernels import moe_ops

    rows = [Backend("triton", None, "", ()), Backend("torch", None, "", (), custom_ops=False)]
    pick = lambda requested=None: resolve_backend("op", requested, rows, torch.device("cpu"),  # noqa: E731
                                                  family_var="M1_FAMILY_BACKEND").name
    monkeypatch.delenv("M1_OPS_BACKEND", raising=False)
    assert pick() == "torch"
    monkeypatch.setenv("M1_OPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="op: M1_OPS_BACKEND='cuda' is not implemented for this op"):
        pick()
    monkeypatch.setenv("M1_FAMILY_BACKEND", "torch")
    assert pick() == "torch"
    monkeypatch.setenv("M1_FAMILY_BACKEND", "cuda")
    with pytest.raises(ValueError, match="op: M1_FAMILY_BACKEND='cuda'"):
        pick()
    assert pick("torch") == "torch"
    monkeypatch.delenv("M1_OPS_BACKEND")
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    x, gate = torch.randn(4, 16), torch.randn(3, 16)
    monkeypatch.setenv("M1_MOE_BACKEND", "cuda")  # the MoE family's choice: lightning attention keeps its default
    lightning_ops.lightning_attn(q, k, v, lightning_ops.slopes(2, 0, 80))
    with pytest.raises(ValueError, match="route: M1_MOE_BACKEND='cuda' is not implemented"):
        moe_ops.route(x, gate, 2)
    monkeypatch.setenv("M1_LIGHTNING_BACKEND", "nonesuch")
    with pytest.raises(ValueError, match="lightning_attn: M1_LIGHTNING_BACKEND='nonesuch' is not a backend"):
        lightning_ops.lightning_attn(q, k, v, lightning_ops.slopes(2, 0, 80))


def test_backend_table_declares_borrowing_and_limits():
    """The table behind the README: each kernel backend runs its own backward (nothing borrowed, the
    row says "-"); a borrowing backend is unavailable where its lender is."""
    from m1_kernels.dispatch import backend_table_markdown

    by_name = {b.name: b for b in lightning_ops.BACKENDS}
    for name in ("cuda", "triton"):
        assert by_name[name].borrows == {}
        assert ops._impl(name, "backward") is ops._impl(name) is by_name[name].impl
    text = backend_table_markdown("Lightning attention", lightning_ops.BACKENDS, OP_BACKENDS)
    for b in lightning_ops.BACKENDS:
        assert f"| `{b.name}` | {b.runs_on} |" in text
    assert "prefill: bfloat16, float16 only | - |" in text
    assert "`lightning_attn_decode`: `cuda` > `triton` > `torch`" in text
    lender_missing = Backend("torch", None, "", (), borrows={"backward": "cuda"})
    assert "borrows from 'cuda'" in (lender_missing.device_error(torch.device("cpu")) or "")


def test_cu_seqlens_check_and_cuda_tables_share_one_host_read_per_version(monkeypatch):
    """On a device, the op's value check of cu_seqlens and the cuda backend's packed segment tables
    (forward, and the backward's reversed ones) read it on the host once per in-place version; tables are
    built once per direction and shape. A meta tensor stands in for a CUDA one (its host values patched)."""
    from m1_kernels.lightning_ops import cuda_backend

    builds, reads, values = [], [], [0, 100, 700]
    monkeypatch.setattr(cuda_backend, "_build_table", lambda rows, starts, lengths, *rest: builds.append(
        (list(starts), list(lengths))) or object())
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (reads.append(1) or list(values)) if t.is_meta
                        else real_tolist(t))
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    ops._check_values(cu.device, cu_seqlens=cu, total=700)
    forward = cuda_backend._segment_table(1, 700, 2, 64, cu, cu.device)
    assert cuda_backend._segment_table(1, 700, 2, 64, cu, cu.device) is forward
    backward = cuda_backend._segment_table(1, 700, 2, 64, cu, cu.device, reverse=True)
    assert backward is not forward
    assert builds == [([0, 100], [100, 600]), ([600, 0], [100, 600])] and len(reads) == 1
    values[1] = 300
    cu.add_(0)  # an in-place change: read again
    ops._check_values(cu.device, cu_seqlens=cu, total=700)
    assert cuda_backend._segment_table(1, 700, 2, 64, cu, cu.device) is not forward
    assert builds[-1] == ([0, 300], [300, 400]) and len(reads) == 2
    values[1] = 800
    cu.add_(0)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops._check_values(cu.device, cu_seqlens=cu, total=700)


def test_cuda_backend_unavailable_raises_clearly(monkeypatch):
    q, k, v = (torch.randn(1, 2, 64) for _ in range(3))
    with pytest.raises(RuntimeError, match="'cuda' is unavailable"):
        lightning_ops.lightning_attn_decode(q, k, v, lightning_ops.slopes(2, 0, 80), torch.zeros(1, 2, 64, 64),
                                            backend="cuda")
    monkeypatch.setenv("M1_OPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="M1_OPS_BACKEND='cuda' is unavailable"):
        lightning_ops.lightning_attn_decode(q, k, v, lightning_ops.slopes(2, 0, 80), torch.zeros(1, 2, 64, 64))
