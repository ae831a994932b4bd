"""The CUDA decode kernel's tilings (csrc/lightning_decode.cu): every variant the sweep may pick is
checked against the float64 decode step, including padding rows, the NaN of out-of-range slots and
q/k/v rows that are views into a wider tensor at an odd offset; the extension takes keyword arguments
only and names its dtype enum."""

import pytest
import torch

from m1_kernels import lightning_ops
from m1_kernels.lightning_ops import cuda_backend
from m1_kernels.extension import cuda_extension
from m1_kernels.reference import lightning as RL

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("variant", range(13))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [6, 300])
def test_every_tiling_matches_reference(variant, dtype, B):
    """B 6: hand-picked slots with padding and unordered slots; B 300: a shuffled cache, every 7th row
    padding."""
    from m1_kernels.lightning_ops import cuda_backend

    H, D = 5, 128
    q, k, v = (torch.randn(B, H, D, dtype=torch.float64) for _ in range(3))
    if B == 6:
        S, slots = 9, torch.tensor([4, -1, 0, 8, -3, 2], dtype=torch.int32)
    else:  # distinct slots, every 7th row padding
        S = B + 3
        slots = torch.randperm(S, generator=torch.Generator().manual_seed(B))[:B].to(torch.int32)
        slots[::7] = -1
    state = torch.randn(S, H, D, D, dtype=torch.float64)
    slope = RL.slopes(H, 78, 80)
    lo = [x.to(dtype) for x in (q, k, v)]
    o64, s64 = RL.lightning_decode_step(*[x.double() for x in lo], slope, state, slots, scale=0.3)
    dev_state = state.float().cuda()
    dq, dk, dv = (x.cuda() for x in lo)
    o = torch.full((B, H, D), float("nan"), dtype=dtype, device="cuda")
    # The tiling knob is an argument of the extension only (the backend function takes none).
    cuda_extension(o.device).lightning_decode(**cuda_backend.decode_arguments(
        dq, dk, dv, slope.float().cuda(), dev_state, slots.cuda(), 0.3, o), variant=variant)
    torch.testing.assert_close(o.cpu().double(), o64.to(dtype).double(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dev_state.cpu().double(), s64, rtol=1e-5, atol=1e-5)


def test_out_of_range_slot_gives_nan_and_leaves_state():
    q, k, v = (torch.randn(2, 2, 64, device="cuda") for _ in range(3))
    state = torch.randn(2, 2, 64, 64, device="cuda")
    before = state.clone()
    o = lightning_ops.lightning_attn_decode(q, k, v, lightning_ops.slopes(2, 0, 80, device="cuda"), state,
                                            slot_idx=torch.tensor([1, 7], dtype=torch.int32, device="cuda"),
                                            backend="cuda")
    assert torch.isnan(o[1]).all() and not torch.isnan(o[0]).any()
    assert torch.equal(state[0], before[0])


@pytest.mark.parametrize("D", [64, 128])
def test_strided_unaligned_rows_match_reference(D):
    """q/k/v as views into one wider tensor at an odd element offset (a fused projection's split)."""
    from m1_kernels.lightning_ops import cuda_backend

    B, H, S = 7, 3, 9
    wide = torch.randn(B, H, 3 * D + 1, dtype=torch.float64).to(torch.bfloat16)
    q, k, v = wide[..., 1:D + 1], wide[..., D + 1:2 * D + 1], wide[..., 2 * D + 1:]
    slots = torch.tensor([3, -1, 0, 8, 5, 2, 7], dtype=torch.int32)
    state = torch.randn(S, H, D, D, dtype=torch.float64)
    slope = RL.slopes(H, 0, 80)
    o64, s64 = RL.lightning_decode_step(q.double(), k.double(), v.double(), slope, state, slots, scale=0.5)
    dev_state = state.float().cuda()
    dev_wide = wide.cuda()
    dev_q, dev_k, dev_v = dev_wide[..., 1:D + 1], dev_wide[..., D + 1:2 * D + 1], dev_wide[..., 2 * D + 1:]
    o = cuda_backend.lightning_decode(dev_q, dev_k, dev_v, slope.float().cuda(), dev_state, slots.cuda(), 0.5)
    torch.testing.assert_close(o.cpu().double(), o64.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dev_state.cpu().double(), s64, rtol=1e-5, atol=1e-5)


def test_extension_takes_keywords_and_named_dtypes():
    """Positional calls and raw integer dtype codes are refused by the binding itself."""
    ext = cuda_extension(torch.device("cuda"))
    assert {m for m in ext.DType.__members__} == {"float32", "float16", "bfloat16"}
    assert {m for m in ext.GroupedGemmTile.__members__} == {"auto", "large", "small"}
    q = torch.randn(1, 1, 64, device="cuda")
    state = torch.zeros(1, 1, 64, 64, device="cuda")
    args = cuda_backend.decode_arguments(q, q, q, torch.ones(1, device="cuda"), state,
                                         torch.zeros(1, dtype=torch.int32, device="cuda"), 1.0, torch.empty_like(q))
    with pytest.raises(TypeError):
        ext.lightning_decode(*args.values())
    with pytest.raises(TypeError):
        ext.lightning_decode(**dict(args, dtype=0))
