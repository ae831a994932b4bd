"""CUDA backend of the MoE grouped GEMM (csrc/grouped_gemm_sm90.cu, moe_ops/cuda_backend.py).

GPU: forward, dX and dW against a per-expert loop (float64 for small shapes, float32 at M1 shapes),
error within 2x of the same-precision PyTorch loop; both weight layouts, both tiles, empty experts,
all rows on one expert, a single row, rows that no expert covers, M1 shapes (E32 H6144 F9216, the TP
shard F1152 and the EP shard of 4 experts), the SwiGLU kernel and its backward, the SwiGLU epilogue of the up GEMM,
NaN-prefilled outputs, CUDA-graph
capture with offsets that change between replays (the offsets are only read on the device).
CPU: the extension exports the entries, its argument checks raise ValueError naming the argument,
and asking for the backend without a GPU raises a clear error.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from m1_kernels import moe_ops
from m1_kernels.moe_ops import cuda_backend
from m1_kernels.reference import moe as RM
from numerics import assert_within_2x, nan_filled_outputs

ON_GPU = torch.cuda.is_available()
DTYPES = [torch.bfloat16, torch.float16]


def _extension():
    try:
        from m1_kernels import _cuda
    except ImportError:
        pytest.skip("the CUDA extension is not built")
    return _cuda


def _offsets(counts, device="cuda"):
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _split(M, E, kind, g):
    """Rows per expert: random cuts, all on one expert, or every other expert empty."""
    if kind == "one_expert":
        counts = [0] * E
        counts[int(torch.randint(0, E, (1,), generator=g))] = M
        return counts
    if kind == "alternate_empty":
        full = list(range(0, E, 2))
        counts = [0] * E
        for i in range(M):
            counts[full[i % len(full)]] += 1
        return counts
    cut = torch.sort(torch.randint(0, M + 1, (E - 1,), generator=g)).values.tolist()
    return [b - a for a, b in zip([0] + cut, cut + [M])]


def _weights(E, N, K, layout, dtype, g):
    """[E, N, K] ("nk") or [E, K, N] ("kn") weights, drawn on the GPU (M1 weights are ~7 GB) from a seed of g."""
    gpu = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    w = (torch.randn(E, N, K, generator=gpu, device="cuda", dtype=torch.float32) / math.sqrt(K)).to(dtype)
    return w.transpose(1, 2).contiguous() if layout == "kn" else w


# ---------------------------------------------------------------------------------------------------
# GPU: against the per-expert loop

@pytest.mark.gpu
@given(M=st.sampled_from([1, 7, 130, 1000]), E=st.sampled_from([1, 3, 8, 32]), K=st.sampled_from([64, 200, 1024]),
       N=st.sampled_from([8, 136, 512]), layout=st.sampled_from(["nk", "kn"]),
       kind=st.sampled_from(["random", "one_expert", "alternate_empty"]), dtype=st.sampled_from(DTYPES),
       tile=st.sampled_from(["large", "small"]), seed=st.integers(0, 2**16))
def test_forward_matches_per_expert_loop(M, E, K, N, layout, kind, dtype, tile, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = _offsets(_split(M, E, kind, g))
    x = torch.randn(M, K, generator=g).to(device="cuda", dtype=dtype)
    w = _weights(E, N, K, layout, dtype, g)
    with nan_filled_outputs():
        y = cuda_backend.grouped_gemm(x, w, offsets, layout, tile=tile)
    ref = RM.grouped_gemm(x.double(), w.double(), offsets, layout)
    base = RM.grouped_gemm(x, w, offsets, layout)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_within_2x("y", y, ref, base)


@pytest.mark.gpu
@given(M=st.sampled_from([1, 9, 300]), E=st.sampled_from([1, 4, 16]), K=st.sampled_from([64, 264]),
       N=st.sampled_from([128, 200]), layout=st.sampled_from(["nk", "kn"]),
       kind=st.sampled_from(["random", "one_expert", "alternate_empty"]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_backward_dx_and_dw_match_per_expert_loop(M, E, K, N, layout, kind, dtype, seed):
    """Through the public op's autograd: dX = dY @ W (the same kernel, layout swapped), dW_e = dY_e^T X_e
    (grouped over the token dimension, zeros for empty experts)."""
    g = torch.Generator().manual_seed(seed)
    offsets = _offsets(_split(M, E, kind, g))
    x = torch.randn(M, K, generator=g).to(device="cuda", dtype=dtype).requires_grad_()
    w = _weights(E, N, K, layout, dtype, g).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(device="cuda", dtype=dtype)
    with nan_filled_outputs():
        y = moe_ops.grouped_gemm(x, w, offsets, weight_layout=layout, backend="cuda")
        y.backward(dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w)]
    RM.grouped_gemm(*leaves64, offsets, layout).backward(dy.double())
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    RM.grouped_gemm(*leaves, offsets, layout).backward(dy)
    assert_within_2x("dx", x.grad, leaves64[0].grad, leaves[0].grad)
    assert_within_2x("dw", w.grad, leaves64[1].grad, leaves[1].grad)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_wgrad_of_empty_experts_is_zero(layout):
    g = torch.Generator().manual_seed(0)
    offsets = _offsets([0, 5, 0, 0, 3, 0])
    x = torch.randn(8, 64, generator=g).to(device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(8, 32, generator=g).to(device="cuda", dtype=torch.bfloat16)
    with nan_filled_outputs():
        dw = cuda_backend.grouped_gemm_weight_grad(x, dy, offsets, layout)
    for e in (0, 2, 3, 5):
        assert torch.equal(dw[e], torch.zeros_like(dw[e])), f"expert {e} has no rows: its gradient must be 0"
    ref = RM.grouped_gemm_weight_grad(x.double(), dy.double(), offsets, layout)
    assert_within_2x("dw", dw, ref, RM.grouped_gemm_weight_grad(x, dy, offsets, layout))


@pytest.mark.gpu
@pytest.mark.parametrize("tile", ["large", "small"])
def test_single_row_and_uncovered_rows(tile):
    """One row on one expert; rows before offsets[0] and after offsets[E] come out as zeros."""
    g = torch.Generator().manual_seed(1)
    w = _weights(4, 64, 128, "nk", torch.bfloat16, g)
    x = torch.randn(1, 128, generator=g).to(device="cuda", dtype=torch.bfloat16)
    with nan_filled_outputs():
        y = cuda_backend.grouped_gemm(x, w, _offsets([0, 0, 1, 0]), "nk", tile=tile)
    torch.testing.assert_close(y.float(), (x.float() @ w[2].float().T), rtol=2e-2, atol=2e-2)
    x = torch.randn(10, 128, generator=g).to(device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([3, 4, 6, 6, 8], dtype=torch.int32, device="cuda")
    with nan_filled_outputs():
        y = cuda_backend.grouped_gemm(x, w, offsets, "nk", tile=tile)
    assert torch.equal(y[:3], torch.zeros_like(y[:3])) and torch.equal(y[8:], torch.zeros_like(y[8:]))
    torch.testing.assert_close(y[3:8].float(), RM.grouped_gemm(x.float(), w.float(), offsets, "nk")[3:8], rtol=2e-2,
                               atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_kernel(dtype):
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(37, 2 * 136, generator=g) * 3).to(device="cuda", dtype=dtype)
    with nan_filled_outputs():
        h = cuda_backend.swiglu(gate_up)
    ref = torch.nn.functional.silu(gate_up[:, :136].double()) * gate_up[:, 136:].double()
    base = torch.nn.functional.silu(gate_up[:, :136]) * gate_up[:, 136:]
    assert_within_2x("h", h, ref, base)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_backward_kernel(dtype):
    """[d_gate | d_up] from dh and [gate | up], against float64 autograd through silu(gate) * up; gate_up with a
    row stride wider than its 2F columns."""
    g = torch.Generator().manual_seed(3)
    F = 136
    wide = (torch.randn(37, 2 * F + 16, generator=g) * 3).to(device="cuda", dtype=dtype)
    gate_up = wide[:, :2 * F]
    dh = torch.randn(37, F, generator=g).to(device="cuda", dtype=dtype)
    with nan_filled_outputs():
        d = cuda_backend.swiglu_backward(dh, gate_up)

    def grad(dtype_of_math):
        pre = gate_up.to(dtype_of_math).requires_grad_()
        (torch.nn.functional.silu(pre[:, :F]) * pre[:, F:]).backward(dh.to(dtype_of_math))
        return pre.grad
    assert_within_2x("d[gate | up]", d, grad(torch.float64), grad(dtype))
    for bad in (gate_up[:, :F], gate_up.to(torch.float16 if dtype == torch.bfloat16 else torch.bfloat16)):
        with pytest.raises(ValueError, match="gate_up must be"):
            cuda_backend.swiglu_backward(dh, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("M,E,kind", [(1, 4, "random"), (300, 3, "alternate_empty"), (3000, 8, "random"),
                                      (777, 5, "one_expert")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_swiglu_epilogue_matches_reference(monkeypatch, M, E, kind, dtype):
    """Gate GEMM, then the up GEMM with D = silu(gate) * acc in its epilogue (forced on, whatever the rows)."""
    monkeypatch.setenv(cuda_backend.SWIGLU_ENV, "fused")
    H, F = 256, 136
    g = torch.Generator().manual_seed(M + E)
    offsets = _offsets(_split(M, E, kind, g))
    x = torch.randn(M, H, generator=g).to(device="cuda", dtype=dtype)
    gate_up = _weights(E, 2 * F, H, "nk", dtype, g)
    with nan_filled_outputs():
        h, preact = cuda_backend.grouped_gemm_swiglu(x, gate_up, offsets, False)
    assert preact.shape == (0, 2 * F) and h.shape == (M, F)
    pre64 = RM.grouped_gemm(x.double(), gate_up.double(), offsets, "nk")
    ref = torch.nn.functional.silu(pre64[:, :F]) * pre64[:, F:]
    pre = RM.grouped_gemm(x, gate_up, offsets, "nk")
    base = torch.nn.functional.silu(pre[:, :F]) * pre[:, F:]
    assert_within_2x("h", h, ref, base)
    monkeypatch.setenv(cuda_backend.SWIGLU_ENV, "separate")
    h_separate, _ = cuda_backend.grouped_gemm_swiglu(x, gate_up, offsets, False)
    assert_within_2x("h (separate SwiGLU kernel)", h_separate, ref, base)


# ---------------------------------------------------------------------------------------------------
# GPU: M1 shapes

def _m1_routing(tokens, E, k, seed):
    """Offsets of a softmax top-k routing of random tokens (random, hence ragged, expert sizes)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randn(tokens, E, generator=g).topk(k, dim=1).indices
    counts = torch.bincount(ids.flatten(), minlength=E)
    return _offsets(counts.tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("E,F,tokens", [(32, 9216, 64), (32, 9216, 1024), (32, 1152, 4096), (4, 9216, 2048)])
def test_m1_shapes_forward_and_backward(E, F, tokens):
    """gate_up (N 2F, K 6144) and down (N 6144, K F) GEMMs of MiniMax-M1 in bf16 with top-2 routing, and
    the backward of the down GEMM (dX, dW), against the float32 per-expert loop."""
    H, k = 6144, 2
    g = torch.Generator().manual_seed(E + F + tokens)
    offsets = _m1_routing(tokens, E, k, tokens)
    M = tokens * k
    x = (torch.randn(M, H, generator=g)).to(device="cuda", dtype=torch.bfloat16)
    gate_up = _weights(E, 2 * F, H, "nk", torch.bfloat16, g)
    with nan_filled_outputs():
        pre = cuda_backend.grouped_gemm(x, gate_up, offsets, "nk")
    assert_within_2x("gate_up", pre, RM.grouped_gemm(x.float(), gate_up, offsets, "nk"),
                     RM.grouped_gemm(x, gate_up, offsets, "nk"))
    del gate_up
    h = cuda_backend.swiglu(pre).requires_grad_()
    down = _weights(E, H, F, "nk", torch.bfloat16, g).requires_grad_()
    with nan_filled_outputs():
        y = moe_ops.grouped_gemm(h, down, offsets, backend="cuda")
        dy = torch.randn_like(y)
        y.backward(dy)
    leaves32 = [t.detach().float().requires_grad_() for t in (h, down)]
    RM.grouped_gemm(*leaves32, offsets, "nk").backward(dy.float())
    leaves = [t.detach().clone().requires_grad_() for t in (h, down)]
    base = RM.grouped_gemm(*leaves, offsets, "nk")
    base.backward(dy)
    assert_within_2x("down", y.detach(), RM.grouped_gemm(leaves32[0].detach(), leaves32[1].detach(), offsets, "nk"),
                     base.detach())
    assert_within_2x("dx", h.grad, leaves32[0].grad, leaves[0].grad)
    assert_within_2x("dw", down.grad, leaves32[1].grad, leaves[1].grad)


# ---------------------------------------------------------------------------------------------------
# GPU: CUDA graphs

@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 2048])
def test_captures_in_a_cuda_graph_and_follows_new_offsets(tokens):
    """The routing offsets are read on the device only: a captured graph replays correctly after the
    offsets (and the inputs) change in place."""
    E, H, F = 8, 1024, 1152
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(device="cuda", dtype=torch.bfloat16)
    w1 = _weights(E, 2 * F, H, "nk", torch.bfloat16, g)
    w2 = _weights(E, H, F, "nk", torch.bfloat16, g)
    offsets = _offsets(_split(tokens, E, "random", g))

    def mlp():
        h, _ = cuda_backend.grouped_gemm_swiglu(x, w1, offsets, False)
        return cuda_backend.grouped_gemm(h, w2, offsets, "nk")

    mlp()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mlp()
    offsets.copy_(_offsets(_split(tokens, E, "one_expert", g)))
    x.copy_(torch.randn(tokens, H, generator=g).to(device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(captured, mlp(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# CPU: the extension's entries and errors

def test_extension_exports_the_grouped_gemm_entries():
    ext = _extension()
    for name in ("grouped_gemm", "grouped_gemm_wgrad", "grouped_gemm_workspace_size", "swiglu", "swiglu_backward"):
        assert callable(getattr(ext, name, None)), f"m1_kernels._cuda lacks {name}"
    assert [name for name in cuda_backend.TILES if not hasattr(ext.GroupedGemmTile, name)] == []
    assert ext.GROUPED_GEMM_SMALL_TILE_MAX_ROWS_PER_EXPERT > 0


@pytest.mark.parametrize("field,value,message", [
    ("n", 12, "n \\(output columns\\) must be a positive multiple of 8"),
    ("k", 20, "k \\(reduction length\\) must be a positive multiple of 8"),
    ("x_row_stride", 68, "x row stride must be a positive multiple of 8"),
    ("x", 8, "x must be 16-byte aligned"),
    ("dtype", "float32", "dtype must be float16 or bfloat16"),
    ("gate", 1 << 25 | 8, "gate must be 16-byte aligned"),
    ("weight_k_major", False, "gate \\(fused SwiGLU\\) needs weight layout 'nk'"),
])
def test_extension_rejects_bad_arguments_before_touching_the_gpu(field, value, message):
    ext = _extension()
    args = dict(x=1 << 20, x_row_stride=64, w=1 << 21, w_expert_stride=64 * 64, w_row_stride=64, gate=0, y=1 << 22,
                offsets=1 << 23, num_rows=4, n=64, k=64, num_experts=2, weight_k_major=True,
                dtype=ext.DType.bfloat16, tile=ext.GroupedGemmTile.auto, device=0, workspace=1 << 24,
                workspace_bytes=1 << 16, stream=0)
    args[field] = getattr(ext.DType, value) if field == "dtype" else value
    if field == "weight_k_major":
        args["gate"] = 1 << 25
    with pytest.raises(ValueError, match=message):
        ext.grouped_gemm(**args)


@pytest.mark.parametrize("field,value,message", [
    ("f", 12, "f \\(SwiGLU width\\) must be a positive multiple of 8"),
    ("in_row_stride", 68, "gate_up row stride must be a positive multiple of 8"),
    ("dh", 8, "dh must be 16-byte aligned"),
    ("out", 1 << 22 | 4, "out must be 16-byte aligned"),
])
def test_swiglu_backward_rejects_bad_arguments_before_touching_the_gpu(field, value, message):
    ext = _extension()
    args = dict(dh=1 << 20, gate_up=1 << 21, in_row_stride=128, out=1 << 22, rows=4, f=64, dtype=ext.DType.bfloat16,
                stream=0)
    args[field] = value
    with pytest.raises(ValueError, match=message):
        ext.swiglu_backward(**args)


@pytest.mark.skipif(ON_GPU, reason="checks the behaviour without a GPU")
def test_without_a_gpu_the_cuda_backend_raises_clearly():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="'cuda' is unavailable"):
        moe_ops.grouped_gemm(x, w, offsets, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        cuda_backend.grouped_gemm(x, w, offsets, "nk")
    ext = _extension()
    if ext.device_count() == 0:
        with pytest.raises(RuntimeError, match="cannot query CUDA device 0"):
            ext.grouped_gemm_workspace_size(num_experts=32, device=0)


@pytest.mark.gpu
def test_float32_is_refused_not_substituted():
    """The extension has 16-bit kernels only: backend="cuda" with float32 inputs raises (it used to run
    the Triton GEMM silently); without a backend the default (triton) runs them."""
    x = torch.randn(8, 64, device="cuda")
    gate, gate_up, down = torch.randn(4, 64, device="cuda"), torch.randn(4, 64, 64, device="cuda"), \
        torch.randn(4, 64, 32, device="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        moe_ops.fused_moe(x, gate, gate_up, down, 2, backend="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        moe_ops.grouped_gemm(x, gate_up, _offsets([2, 2, 2, 2]), backend="cuda")
    assert moe_ops.fused_moe(x, gate, gate_up, down, 2).shape == (8, 64)
