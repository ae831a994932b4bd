"""Tiling sweep of the decode kernels (csrc/lightning_decode.cu variants, Triton value tiles), timed as
CUDA-graph replays next to a device copy of the same bytes. `python -m m1_kernels.bench.sweep_decode` on a GPU;
the result picks the kernels' default tilings."""

import argparse

import torch
import triton
import triton.language as tl

from m1_kernels import lightning_ops
from m1_kernels.extension import cuda_extension
from m1_kernels.lightning_ops import cuda_backend
from m1_kernels.lightning_ops.triton import fused_recurrent_lightning_decode

from .harness import measure_ceilings, time_fn

VARIANTS = {0: "default", 1: "64 cols x 128 thr", 2: "32 x 128", 3: "128 x 256", 4: "64 x 256", 5: "32 x 256",
            6: "128 x 256 1/SM", 7: "128 x 1024", 8: "128 x 512", 9: "128 x 512 st.cs", 10: "64 x 512 st.cs",
            11: "64 x 256 st.cs", 12: "64 x 256 plain"}
TRITON_TILES = [None, (64, 4), (128, 8), (128, 16)]  # (BV, num_warps); None: the batch picks


@triton.jit
def _copy_kernel(src, dst, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offsets, tl.load(src + offsets))


def triton_copy(src, dst, block=16384, warps=8):
    """The state's bytes through the simplest streaming kernel, one 64 KB program per (row, head) at
    the default block: out of place, or in place (dst is src) like the decode's update."""
    _copy_kernel[(src.numel() // block,)](src, dst, BLOCK=block, num_warps=warps)


def cuda_decode(q, k, v, slope, state, slot_idx, variant):
    """One CUDA decode step with a forced tiling: the knob is an argument of the extension only."""
    out = torch.empty(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)
    cuda_extension(q.device).lightning_decode(
        **cuda_backend.decode_arguments(q, k, v, slope, state, slot_idx, 1.0, out), variant=variant)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, nargs="+", default=[64, 8], help="head counts to sweep")
    args = parser.parse_args()
    device = torch.device("cuda")
    bw = measure_ceilings(device)["copy_GBps"]
    print(f"copy bandwidth {bw:.0f} GB/s")
    names = [f"cuda {name}" for name in VARIANTS.values()]
    names += [f"triton BV{t[0]} w{t[1]}" if t else "triton default" for t in TRITON_TILES]
    names += ["torch copy", "triton copy", "triton in place"]
    print(f"{'shape':<16}" + "".join(f"{name:>20}" for name in names))
    for H in args.heads:
        for B in (16, 64, 128, 256):
            slope = lightning_ops.slopes(H, 0, 80, device=device)
            sets = []
            for _ in range(2):
                q, k, v = (torch.randn(B, H, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
                state = torch.randn(B, H, 128, 128, device=device)
                sets.append((q, k, v, state, torch.arange(B, dtype=torch.int32, device=device),
                             torch.empty_like(state)))
            floor = 2 * B * H * 128 * 128 * 4 / (bw * 1e9) * 1e3
            fns = [lambda x, var=variant: cuda_decode(*x[:3], slope, x[3], x[4], var) for variant in VARIANTS]
            fns += [lambda x, t=tile: fused_recurrent_lightning_decode(*x[:3], slope, x[3], x[4], 1.0, t)
                    for tile in TRITON_TILES]
            # The same bytes through plain copies: what launch, ramp and the access pattern leave of the floor.
            fns += [lambda x: x[5].copy_(x[3]), lambda x: triton_copy(x[3], x[5]), lambda x: triton_copy(x[3], x[3])]
            cells = []
            for fn in fns:
                t = time_fn(fn, sets, device, cuda_graph=True)["median_ms"]
                cells.append(f"{t * 1e3:8.1f}us {floor / t:5.2f}")
            print(f"B{B:<4} H{H:<9}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
