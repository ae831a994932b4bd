"""fused_logprobs against float64: values, entropies and gradients (hypothesis over N, H, V with V crossing the
kernels' tiles and targets at both ends of the vocabulary), on the torch path and the Triton kernels
(interpreted on the CPU: fp32 and fp16; bf16 on the GPU), torch.library.opcheck, bad inputs; GPU tests at
real shapes."""

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from m1_kernels.trainer import fused_logprobs, torch_logprobs  # noqa: F401
from m1_kernels.trainer.logprobs import BACKENDS, _fused_logprobs, triton_logprobs

from numerics import DEVICE, assert_close64, assert_within_2x, max_err, nan_filled_outputs, require_backend

CPU_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)]
GPU_DTYPES = CPU_DTYPES + [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
NAMES = [b.name for b in BACKENDS]


def reference64(hidden, weight, targets):
    """log p, entropy (float64) and a function giving d(sum(g1 log p + g2 entropy)) / d(hidden, weight)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = torch.log_softmax(h @ w.T, dim=-1)
    logp = logits.gather(1, targets.long()[:, None])[:, 0]
    entropy = -(logits.exp() * logits).sum(-1)

    def grads(g1, g2):
        return torch.autograd.grad((logp * g1.double() + entropy * g2.double()).sum(), [h, w], retain_graph=True)
    return logp.detach(), entropy.detach(), grads


def plain_head(hidden, weight, targets):
    """What a user writes: logits in the operands' precision, then log_softmax in fp32 (the baseline that the
    2x rule measures against for 16-bit weights)."""
    logits = torch.log_softmax((hidden.to(weight.dtype) @ weight.T).float(), dim=-1)
    return logits.gather(1, targets.long()[:, None])[:, 0], -(logits.exp() * logits).sum(-1)


def problem(N, H, V, h_dtype, w_dtype, seed, device=DEVICE, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(device=device, dtype=h_dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5 * 3).to(device=device, dtype=w_dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0] = 0
    targets[-1] = V - 1
    g1 = torch.randn(N, generator=g, dtype=torch.float64).to(device)
    g2 = torch.randn(N, generator=g, dtype=torch.float64).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets.to(device), g1, g2


@contextlib.contextmanager
def small_chunks(dz_bytes=5120, dh_bytes=2560, torch_elements=1000):
    """Budgets small enough that the backward walks several vocabulary chunks and row blocks (dW accumulated
    over row blocks) and the torch path several chunks: the paths that large shapes take."""
    with contextlib.ExitStack() as stack:
        if triton_logprobs is not None:
            stack.enter_context(mock.patch.object(triton_logprobs, "DZ_BUDGET_BYTES", dz_bytes))
            stack.enter_context(mock.patch.object(triton_logprobs, "DH_BUDGET_BYTES", dh_bytes))
        stack.enter_context(mock.patch.object(torch_logprobs, "CHUNK_ELEMENTS", torch_elements))
        yield


def check_against_float64(backend, N, H, V, h_dtype, w_dtype, seed):
    hidden, weight, targets, g1, g2 = problem(N, H, V, h_dtype, w_dtype, seed)
    with nan_filled_outputs(), small_chunks():
        logp, entropy = fused_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
        dh, dw = torch.autograd.grad((logp * g1.float() + entropy * g2.float()).sum(), [hidden, weight])
    ref_logp, ref_entropy, grads = reference64(hidden, weight, targets)
    ref_dh, ref_dw = grads(g1, g2)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    # The logits are fp32-accurate for every dtype pair: products of 16-bit operands are exact in fp32.
    assert_close64("logp", logp, ref_logp, rtol=2e-6 * max(1.0, H ** 0.5))
    assert_close64("entropy", entropy, ref_entropy, rtol=2e-6 * max(1.0, H ** 0.5))
    if w_dtype == torch.float32:
        assert_close64("d hidden", dh, ref_dh, rtol=2e-5)
        assert_close64("d weight", dw, ref_dw, rtol=2e-5)
    else:
        # Gradients carry the weight's precision (d logits rounded to it once), as in the plain 16-bit head.
        base_h, base_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        lp, ent = plain_head(base_h, base_w, targets)
        bh, bw = torch.autograd.grad((lp * g1.float() + ent * g2.float()).sum(), [base_h, base_w])
        assert_within_2x("d hidden", dh, ref_dh, bh)
        assert_within_2x("d weight", dw, ref_dw, bw)


@pytest.mark.parametrize("backend", NAMES)
@given(dtypes=st.sampled_from(CPU_DTYPES if DEVICE.type == "cpu" else GPU_DTYPES), N=st.integers(1, 40),
       H=st.sampled_from([1, 8, 17, 40]), V=st.integers(1, 130), seed=st.integers(0, 99))
def test_values_and_gradients_against_float64(backend, dtypes, N, H, V, seed):
    require_backend(backend, NAMES)
    check_against_float64(backend, N, H, V, *dtypes, seed)


def test_running_accumulator_knob():
    """The bench's variant of the logits kernels (16-bit products accumulated in place) against float64."""
    require_backend("triton", NAMES)
    dtype = torch.float16 if DEVICE.type == "cpu" else torch.bfloat16
    with mock.patch.object(triton_logprobs, "RUNNING_ACCUMULATOR", True):
        check_against_float64("triton", 37, 40, 100, dtype, dtype, 5)


@pytest.mark.parametrize("backend", NAMES)
def test_entropy_is_optional_and_unused_entropy_adds_no_gradient(backend):
    require_backend(backend, NAMES)
    hidden, weight, targets, g1, _ = problem(9, 16, 70, torch.float32, torch.float32, 0)
    logp = fused_logprobs(hidden, weight, targets, backend=backend)
    logp2, _ = fused_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    assert torch.equal(logp, logp2)
    a = torch.autograd.grad((logp * g1.float()).sum(), [hidden, weight])
    b = torch.autograd.grad((logp2 * g1.float()).sum(), [hidden, weight])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", NAMES)
def test_gradient_of_one_input_only(backend):
    require_backend(backend, NAMES)
    hidden, weight, targets, g1, _ = problem(12, 16, 50, torch.float32, torch.float32, 1)
    frozen = weight.detach()
    (dh,) = torch.autograd.grad((fused_logprobs(hidden, frozen, targets, backend=backend) * g1.float()).sum(), hidden)
    (dh_both, _) = torch.autograd.grad((fused_logprobs(hidden, weight, targets, backend=backend)
                                        * g1.float()).sum(), [hidden, weight])
    torch.testing.assert_close(dh, dh_both)


def test_backends_agree():
    require_backend("triton", NAMES)
    hidden, weight, targets, g1, g2 = problem(33, 40, 129, torch.float32, torch.float32, 2)
    out = {}
    for backend in NAMES:
        logp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
        out[backend] = (logp, ent, *torch.autograd.grad((logp * g1.float() + ent * g2.float()).sum(), [hidden, weight]))
    for a, b in zip(out["torch"], out["triton"]):
        assert max_err(a, b) <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("backend", NAMES)
def test_opcheck(backend):
    require_backend(backend, NAMES)
    hidden, weight, targets, _, _ = problem(10, 16, 40, torch.float32, torch.float32, 3)
    torch.library.opcheck(_fused_logprobs, (hidden, weight, targets, True, backend))
    if backend == "torch":  # the empty entropy output's fake; the interpreter makes a second triton run slow
        torch.library.opcheck(_fused_logprobs, (hidden, weight, targets, False, backend))


def test_bad_inputs():
    # CPU tensors: target ids are range-checked on the CPU only (on the GPU that would be a host sync).
    hidden, weight, targets, _, _ = problem(4, 8, 10, torch.float32, torch.float32, 0, device="cpu")
    with pytest.raises(ValueError, match="hidden"):
        fused_logprobs(hidden[0], weight, targets)
    with pytest.raises(ValueError, match="weight"):
        fused_logprobs(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="targets"):
        fused_logprobs(hidden, weight, targets[:3])
    with pytest.raises(TypeError, match="targets"):
        fused_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="targets must lie"):
        fused_logprobs(hidden, weight, torch.full_like(targets, 10))
    with pytest.raises(TypeError, match="hidden must be float32 or the weight's dtype"):
        fused_logprobs(hidden.half(), weight.bfloat16(), targets)
    with pytest.raises(ValueError, match="unit stride"):
        fused_logprobs(hidden.detach().T.contiguous().T, weight, targets)
    with pytest.raises(ValueError, match="at least one row"):
        fused_logprobs(hidden, weight[:0], targets)
    with pytest.raises(ValueError, match="not a backend"):
        fused_logprobs(hidden, weight, targets, backend="cuda-graph")


# ------------------------------------------------------------------------------------------------------
# GPU: bf16 at real shapes

@pytest.mark.gpu
@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float32], ids=["bf16-hidden", "fp32-hidden"])
def test_gpu_gradients_bf16_medium(h_dtype):
    """1000 tokens, hidden 1024, vocabulary 32003 against float64, with budgets that make the backward walk 8
    vocabulary chunks and 4 row blocks."""
    with small_chunks(dz_bytes=8 << 20, dh_bytes=1 << 20, torch_elements=1 << 22):
        check_against_float64("triton", 1000, 1024, 32003, h_dtype, torch.bfloat16, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(triton_logprobs.TILE_CONFIGS)) if triton_logprobs else [])
def test_gpu_every_autotune_config(index):
    """Each tile config of the three kernels (a problem above TUNE_MIN_MACS, so none is pruned), with several
    vocabulary chunks."""
    from m1_kernels.dispatch import triton_config
    kernels = [triton_logprobs._forward_kernel, triton_logprobs._dlogits_kernel, triton_logprobs._matmul_kernel]
    with triton_config(index, kernels), small_chunks(dz_bytes=2 << 20, dh_bytes=1 << 20):
        check_against_float64("triton", 1000, 1024, 4200, torch.bfloat16, torch.bfloat16, index)


@pytest.mark.gpu
@pytest.mark.xdist_group("large_memory")
def test_gpu_real_shape_error_below_1e4():
    """8192 tokens, hidden 6144, vocabulary 200064, bf16 hidden and weight: log-prob and entropy error at most
    1e-4 against float64 on 512 rows (the issue's target), at least 10x below the bf16 head's; the backward runs
    (13 vocabulary chunks) and gives finite gradients."""
    from m1_kernels.bench.cases_trainer import logprobs_fp64
    N, H, V = 8192, 6144, 200064
    hidden, weight, targets, g1, _ = problem(N, H, V, torch.bfloat16, torch.bfloat16, 0)
    logp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True)
    rows = torch.arange(0, N, N // 512, device=DEVICE)
    ref_logp, ref_ent = logprobs_fp64(hidden.detach(), weight.detach(), targets, rows)
    assert max_err(logp[rows], ref_logp) <= 1e-4
    assert max_err(ent[rows], ref_ent) <= 1e-4
    dh, dw = torch.autograd.grad((logp * g1.float()).sum(), [hidden, weight])
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    with torch.no_grad():
        base = plain_head(hidden, weight, targets)[0]
    assert max_err(logp[rows], ref_logp) * 10 < max_err(base[rows], ref_logp), "no better than the bf16 head"


def test_torch_compile_traces_the_op():
    """The custom op's fake and autograd registrations under torch.compile (aot_eager: no C++ toolchain)."""
    hidden, weight, targets, g1, g2 = problem(11, 16, 37, torch.float32, torch.float32, 4)

    def loss(h, w):
        logp, ent = _fused_logprobs(h, w, targets, True, "torch")[:2]
        return (logp * g1.float() + ent * g2.float()).sum()

    eager = torch.autograd.grad(loss(hidden, weight), [hidden, weight])
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(hidden, weight),
                                   [hidden, weight])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
