"""Segment length x output-kernel config sweep of the Triton lightning prefill forward
(lightning_ops/triton/chunk.py), against the byte floor. `python -m m1_kernels.bench.sweep_prefill` on a GPU;
the result sets `default_segment_len` and the order of the autotune list. Column i forces config i of
the output kernel (and config min(i, 1) of the segment-sum kernel) through M1_TRITON_CONFIG; `*` marks
the segment length the op picks today. The default segment is then timed without and with the final
state (which adds the last segment's sums and the hi + lo split of pass 1), next to the CUDA forward
(csrc/lightning_prefill.cu) at its default and other segment counts, each with its time per kernel.
`--breakdown` prints only those lines."""

import argparse
import contextlib

import torch
import triton

from m1_kernels import lightning_ops
from m1_kernels.lightning_ops.triton import chunk
from m1_kernels.extension import cuda_extension_error
from m1_kernels.dispatch import triton_config

from .harness import measure_ceilings, time_fn

SHAPES = [(1, 8192, 64), (1, 32768, 64), (1, 131072, 8), (1, 1 << 20, 8)]  # (B, T, H), D = Dv = 128
SEGMENTS = [1024, 2048, 4096, 8192, 16384]
CUDA_BLOCKS_PER_SM = [4, 16]  # besides cuda_backend.SEGMENT_BLOCKS_PER_SM


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--breakdown", action="store_true", help="only the per-kernel times at the default segment")
    parser.add_argument("--tokens", type=int, nargs="+", help="only the shapes with these sequence lengths")
    args = parser.parse_args()
    device = torch.device("cuda")
    bw = measure_ceilings(device)["copy_GBps"]
    kernels = [chunk._segment_kv_kernel, chunk._segment_output_kernel]
    # At D = Dv = 128 in bf16 the pruning keeps the first tier, so index i is its config i.
    configs = [f"BV{bv} BT{bt} w{w} s{st}" for bv, bt, w, st in chunk.OUTPUT_TIERS[0]]
    print(f"copy bandwidth {bw:.0f} GB/s; cells: ms and fraction of the floor (q, k, v read, o written once)")
    if not args.breakdown:
        print(f"{'shape':<18}{'segment':>8}" + "".join(f"{c:>18}" for c in configs))
    for B, T, H in [s for s in SHAPES if not args.tokens or s[1] in args.tokens]:
        slope = lightning_ops.slopes(H, 0, 80, device=device)
        sets = [[torch.randn(B, T, H, 128, device=device, dtype=torch.bfloat16) for _ in range(3)] for _ in range(2)]
        floor = 4 * B * T * H * 128 * 2 / (bw * 1e9) * 1e3
        default = chunk.default_segment_len(B * T, H, 128, device)
        for seg in [s for s in SEGMENTS if s <= T and not args.breakdown]:
            cells = []
            for index in range(len(configs)):
                try:
                    with triton_config(index, kernels):
                        t = time_fn(lambda x, s=seg: chunk.chunk_lightning(*x, slope, None, None, segment_len=s),
                                    sets, device)["median_ms"]
                    cells.append(f"{t:8.3f} {floor / t:5.2f}")
                except triton.runtime.errors.OutOfResources:
                    cells.append("out of resources")
            mark = "*" if seg == default else " "
            print(f"B{B} T{T:<8} H{H:<3}{seg:>7}{mark}" + "".join(f"{c:>18}" for c in cells))
        print(f"B{B} T{T:<8} H{H:<3} default segment {default}")
        for final in (None, "new"):
            breakdown(f"default segment, tuned configs, final={final}",
                      lambda f=final: chunk.chunk_lightning(*sets[0], slope, None, None, final=f), device)
        if cuda_extension_error(device) is None:
            from m1_kernels.lightning_ops import cuda_backend

            for final in (False, True):
                breakdown(f"cuda forward, final state {final}",
                          lambda f=final: cuda_backend.lightning_fwd(*sets[0], slope, None, None, 1.0, f), device)
            for blocks in CUDA_BLOCKS_PER_SM:
                with segment_blocks_per_sm(blocks):
                    breakdown(f"cuda forward, no final state, segments for {blocks} blocks per SM",
                              lambda: cuda_backend.lightning_fwd(*sets[0], slope, None, None, 1.0, False), device)
        del sets


@contextlib.contextmanager
def segment_blocks_per_sm(blocks):
    """Time the CUDA forward with segments sized for `blocks` blocks per SM: the tuning constant is set
    here, in the sweep, never through the backend's arguments."""
    from m1_kernels.lightning_ops import cuda_backend

    default = cuda_backend.SEGMENT_BLOCKS_PER_SM
    cuda_backend.SEGMENT_BLOCKS_PER_SM = blocks
    try:
        yield
    finally:
        cuda_backend.SEGMENT_BLOCKS_PER_SM = default


def breakdown(label, run, device):
    """Print the median time of run() and its time per kernel."""
    t = time_fn(lambda _: run(), [None], device)["median_ms"]
    print(f"    {label}: {t:.3f} ms; per kernel: {kernel_times(run)}")


def kernel_times(fn, calls=10):
    """Mean GPU time per call of each kernel fn launches (torch.profiler): where the time goes."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    short = lambda key: key.split("<")[0].split("::")[-1].split("(")[0].removeprefix("void ")  # noqa: E731
    return ", ".join(f"{short(e.key)} {e.device_time_total / calls / 1e3:.3f} ms" for e in rows)


if __name__ == "__main__":
    main()
