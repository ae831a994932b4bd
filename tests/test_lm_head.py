"""lm_head_logits (model/lm_head.py): fp32-accurate logits from a 16-bit weight without an fp32 copy of it.

Rule: error against float64 within 2x the error of the fp32 head in plain torch (F.linear on the fp32
activation and the weight converted to fp32), plus a tiny floor. The Triton kernel runs under the
interpreter with fp16 weights (its bf16 dot is wrong on the CPU); bf16 weights run on the GPU.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.profiler import ProfilerActivity, profile

from m1_kernels.dispatch import backend_error, triton_config
from m1_kernels.model import lm_head as LH
from m1_kernels.model.lm_head import PIECES, lm_head_logits
from numerics import DEVICE, assert_within_2x, max_err, nan_filled_outputs

needs_triton = pytest.mark.skipif(backend_error("triton", DEVICE) is not None, reason="triton backend unavailable here")
FLOOR = 1e-7  # absolute floor (times max(1, |logit| max)) on top of 2x the fp32 head's error


def fp32_head(hidden, weight):
    """What the model did before: the whole weight converted to fp32 (the accuracy yardstick)."""
    return F.linear(hidden.float(), weight.float())


def inputs(N, H, V, hidden_dtype, weight_dtype, magnitude, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=torch.float64) * magnitude).to(device=device, dtype=hidden_dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.02).to(device=device, dtype=weight_dtype)
    return hidden, weight


def reference(hidden, weight):
    return hidden.double() @ weight.double().T


def split_emulated(hidden, weight, pieces):
    """The kernel's arithmetic in plain torch: the activation (row-scaled for fp16 weights) as `pieces`
    pieces in the weight's dtype, each piece's exact products summed in fp32."""
    x, scale = hidden.float(), torch.ones(hidden.shape[0], 1)
    if weight.dtype == torch.float16 and hidden.dtype != torch.float16:
        exponent = torch.frexp(x.abs().amax(1, keepdim=True)).exponent
        x, scale = torch.ldexp(x, -exponent), torch.ldexp(scale, exponent)
    acc, w32 = torch.zeros(hidden.shape[0], weight.shape[0]), weight.float()
    for _ in range(pieces):
        piece = x.to(weight.dtype).float()
        acc += piece @ w32.T
        x = x - piece
    return acc * scale


@pytest.mark.parametrize("pair", list(PIECES), ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_piece_counts_are_the_fewest_that_keep_fp32_accuracy(pair):
    """The PIECES table, measured at the M1 hidden size: its count is within 2x of the fp32 head, one
    piece fewer is not (when there is one fewer)."""
    hidden_dtype, weight_dtype = pair
    hidden, weight = inputs(8, 6144, 512, hidden_dtype, weight_dtype, 3.0, 0, device="cpu")
    ref, base = reference(hidden, weight), max_err(fp32_head(hidden, weight), reference(hidden, weight))
    scale = max(1.0, ref.abs().max().item())
    errors = {p: max_err(split_emulated(hidden, weight, p), ref) for p in (PIECES[pair] - 1, PIECES[pair]) if p}
    assert errors[PIECES[pair]] <= 2 * base + FLOOR * scale, (errors, base)
    if PIECES[pair] > 1:
        assert errors[PIECES[pair] - 1] > 2 * base + FLOOR * scale, (errors, base)


@needs_triton
@given(N=st.sampled_from([1, 3, 17, 40]), H=st.sampled_from([1, 63, 64, 65, 200]),
       V=st.sampled_from([1, 31, 32, 33, 100]),
       hidden_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       magnitude=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**16))
def test_triton_fp16_weight_matches_fp32_head(N, H, V, hidden_dtype, magnitude, seed):
    hidden, weight = inputs(N, H, V, hidden_dtype, torch.float16, magnitude, seed)
    with nan_filled_outputs():
        out = lm_head_logits(hidden, weight, backend="triton")
    assert out.dtype == torch.float32
    assert_within_2x("logits", out, reference(hidden, weight), fp32_head(hidden, weight), atol=FLOOR)


@given(N=st.sampled_from([1, 5]), V=st.sampled_from([1, 7, 300]),
       weight_dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       hidden_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_torch_path_matches_fp32_head(N, V, weight_dtype, hidden_dtype, seed):
    hidden, weight = inputs(N, 64, V, hidden_dtype, weight_dtype, 1.0, seed)
    with pytest.MonkeyPatch.context() as patch, nan_filled_outputs():
        patch.setattr(LH, "TORCH_CHUNK_BYTES", 64 * 4 * 3)   # 3 weight rows per chunk: many chunks
        out = lm_head_logits(hidden, weight, backend="torch")
    assert_within_2x("logits", out, reference(hidden, weight), fp32_head(hidden, weight), atol=FLOOR)


def test_torch_path_never_converts_the_whole_weight(monkeypatch):
    """The largest CPU allocation during the call is one chunk (plus the output), not V x H fp32."""
    monkeypatch.setattr(LH, "TORCH_CHUNK_BYTES", 1 << 20)
    hidden, weight = inputs(4, 512, 4000, torch.float32, torch.bfloat16, 1.0, 0, device="cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lm_head_logits(hidden, weight, backend="torch")
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= (1 << 20), f"largest allocation {largest} B; the fp32 weight is {4000 * 512 * 4} B"


def test_fp32_weight_is_a_plain_fp32_matmul():
    hidden, weight = inputs(3, 40, 9, torch.bfloat16, torch.float32, 1.0, 0)
    assert torch.equal(lm_head_logits(hidden, weight), F.linear(hidden.float(), weight))


def test_gradients_through_the_torch_path():
    """A call that needs gradients runs the torch path (the default skips triton); the grads match float64."""
    hidden, weight = inputs(3, 32, 20, torch.float32, torch.bfloat16, 1.0, 1)
    hidden.requires_grad_(True)
    upstream = torch.randn(3, 20, device=DEVICE)
    (lm_head_logits(hidden, weight) * upstream).sum().backward()
    want = upstream.double() @ weight.double()
    torch.testing.assert_close(hidden.grad.double(), want, rtol=1e-5, atol=1e-6)
    if backend_error("triton", DEVICE) is None:
        with pytest.raises(ValueError, match="backward"):
            lm_head_logits(hidden, weight, backend="triton")


def test_bad_inputs_raise():
    hidden, weight = inputs(2, 16, 5, torch.float32, torch.bfloat16, 1.0, 0)
    with pytest.raises(ValueError, match="hidden"):
        lm_head_logits(hidden[0], weight)
    with pytest.raises(ValueError, match="weight"):
        lm_head_logits(hidden, weight[:, :8])
    with pytest.raises(TypeError, match="weight"):
        lm_head_logits(hidden, weight.int())
    with pytest.raises(TypeError, match="hidden"):
        lm_head_logits(hidden.long(), weight)
    with pytest.raises(ValueError, match="weight"):
        lm_head_logits(hidden, weight.T.contiguous().T)
    with pytest.raises(ValueError, match="backend"):
        lm_head_logits(hidden, weight, backend="cuda")


# ---------------------------------------------------------------------------------------------------
# GPU: bf16 weights at the M1 hidden size, the full vocabulary, every autotune config

VOCAB, HIDDEN = 200064, 6144


def _check_gpu(N, V, hidden_dtype, weight_dtype=torch.bfloat16, seed=0):
    hidden, weight = inputs(N, HIDDEN, V, hidden_dtype, weight_dtype, 3.0, seed)
    with nan_filled_outputs():
        out = lm_head_logits(hidden, weight)
    ref = reference(hidden, weight)  # float64 on the GPU
    assert_within_2x("logits", out, ref, fp32_head(hidden, weight), atol=FLOOR)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 7, 64, 300, 2048])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_bf16_weight_matches_fp32_head_on_gpu(N, hidden_dtype):
    _check_gpu(N, 32000 + 7, hidden_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_fp16_weight_on_gpu(hidden_dtype):
    _check_gpu(64, 32000 + 7, hidden_dtype, torch.float16)


@pytest.mark.gpu
@pytest.mark.xdist_group("large_memory")
def test_full_vocabulary_without_fp32_weight_copy():
    """At V = 200064, H = 6144 the call adds its output and little else (an fp32 weight copy is 4.9 GB)."""
    hidden, weight = inputs(64, HIDDEN, VOCAB, torch.float32, torch.bfloat16, 3.0, 0)
    lm_head_logits(hidden, weight)  # autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = lm_head_logits(hidden, weight)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= out.numel() * 4 + (64 << 20), f"{extra / 2**30:.2f} GiB extra"
    rows = slice(0, 8)
    ref = reference(hidden[rows], weight)
    assert_within_2x("logits", out[rows], ref, fp32_head(hidden[rows], weight), atol=FLOOR)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 2048])
def test_every_autotune_config_lm_head(N):
    hidden, weight = inputs(N, HIDDEN, 4096 + 5, torch.float32, torch.bfloat16, 3.0, 0)
    ref, base = reference(hidden, weight), fp32_head(hidden, weight)
    kept = LH._prune(LH._lm_head_kernel.configs, dict(N_BUCKET=min(max(N, 1), 4096)))
    for index in range(len(kept)):
        with triton_config(index, [LH._lm_head_kernel]), nan_filled_outputs():
            out = lm_head_logits(hidden, weight)
        assert_within_2x(f"logits (config {index}: {kept[index]})", out, ref, base, atol=FLOOR)
