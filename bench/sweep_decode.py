"""Tiling sweep of the CUDA decode kernel (csrc/lightning_decode.cu variants), timed as CUDA-graph
replays. `python -m bench.sweep_decode` on a GPU; the result picks the kernel's default tiling."""

import torch

import lightning_ops
from lightning_ops import cuda_backend

from .harness import measure_ceilings, time_fn

VARIANTS = {0: "default", 1: "64 cols x 128 thr", 2: "32 x 128", 3: "128 x 256", 4: "64 x 256", 5: "32 x 256",
            6: "persistent 128 x 256"}


def main():
    device = torch.device("cuda")
    bw = measure_ceilings(device)["copy_GBps"]
    print(f"copy bandwidth {bw:.0f} GB/s")
    print(f"{'shape':<16}" + "".join(f"{name:>20}" for name in VARIANTS.values()))
    for H in (64, 8):
        for B in (16, 64, 128, 256):
            slope = lightning_ops.slopes(H, 0, 80, device=device)
            sets = []
            for _ in range(2):
                q, k, v = (torch.randn(B, H, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
                sets.append((q, k, v, torch.randn(B, H, 128, 128, device=device),
                             torch.arange(B, dtype=torch.int32, device=device)))
            floor = 2 * B * H * 128 * 128 * 4 / (bw * 1e9) * 1e3
            cells = []
            for variant in VARIANTS:
                fn = lambda x, var=variant: cuda_backend.lightning_decode(*x[:3], slope, x[3], x[4], 1.0, var)  # noqa: E731
                t = time_fn(fn, sets, device, cuda_graph=True)["median_ms"]
                cells.append(f"{t * 1e3:8.1f}us {floor / t:5.2f}")
            print(f"B{B:<4} H{H:<9}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
