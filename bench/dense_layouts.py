"""The dense bf16 matmul rate (cuBLAS) by operand layout, next to the MoE weight gradients.

The harness's dense rate is `a @ b` on row-major tensors: A is K-major, B N-major. The MoE weight gradient
reduces over tokens, the rows of both its operands, so both are M/N-major; the forward GEMMs have both
K-major. This measures, in one process, whether cuBLAS itself runs slower in those layouts, at 8192^3 and
batched at the weight gradients' per-expert shapes (uniform routing), next to our grouped kernels on the same
shapes. `python -m m1_kernels.bench.dense_layouts` on a GPU.
"""

import torch

from . import cases_moe
from .harness import measure_ceilings, run_case, time_fn

# (A major dimension, B major dimension) of C[M, N] = A[M, K] @ B[K, N]
LAYOUTS = (("K", "N"), ("M", "N"), ("K", "K"), ("M", "K"))


def operand(rows, cols, major, batch, device, transposed_major):
    """A [batch,] rows x cols bf16 tensor, contiguous along `cols` unless `major` is transposed_major."""
    shape = (batch,) if batch else ()
    if major == transposed_major:
        t = torch.randn(*shape, cols, rows, device=device, dtype=torch.bfloat16)
        return t.transpose(-1, -2)
    return torch.randn(*shape, rows, cols, device=device, dtype=torch.bfloat16)


def dense_rate(M, N, K, a_major, b_major, device, batch=0):
    """TFLOP/s of (batched) A @ B with A's major dimension a_major ("K" or "M") and B's b_major ("N" or "K")."""
    a = operand(M, K, a_major, batch, device, transposed_major="M")
    b = operand(K, N, b_major, batch, device, transposed_major="K")
    fn = (lambda _: torch.bmm(a, b)) if batch else (lambda _: a @ b)
    t = time_fn(fn, [None], device, warmup=3, reps=20)["median_ms"]
    return 2.0 * max(batch, 1) * M * N * K / (t * 1e-3) / 1e12, t


def main():
    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    print(f"harness ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, dense {ceilings['matmul_TFLOPs']:.0f} TFLOP/s")
    m1 = cases_moe.m1_moe_shape()
    E, H, F = m1["E"], m1["H"], m1["F"]
    tokens = 8192
    rows = tokens * m1["top_k"] // E
    shapes = {"8192^3": (8192, 8192, 8192, 0),
              f"dW_down per expert, {E} x ({H} x {F}, K={rows})": (H, F, rows, E),
              f"dW_gate_up per expert, {E} x ({2 * F} x {H}, K={rows})": (2 * F, H, rows, E)}
    print("cuBLAS TFLOP/s by layout (A major, B major); the weight gradient's own layout is (M, N)")
    for name, (M, N, K, batch) in shapes.items():
        rates = {f"A {a}-major, B {b}-major": dense_rate(M, N, K, a, b, device, batch) for a, b in LAYOUTS}
        print(f"  {name}: " + "; ".join(f"{k} {r:.0f} ({t:.3f} ms)" for k, (r, t) in rates.items()))
    print(f"ours, T{tokens} uniform routing (run's dense {ceilings['matmul_TFLOPs']:.0f} TFLOP/s):")
    for what in cases_moe.BACKWARD_GEMMS:
        if what.startswith("dW"):
            for row in run_case(cases_moe.backward_gemm_case(device, what, tokens, **m1), device, ceilings):
                print(f"  {what} {row['impl']}: " + (f"{row['median_ms']:.3f} ms, {row['TFLOPs']:.0f} TFLOP/s"
                                                     if "TFLOPs" in row else row["error"]))


if __name__ == "__main__":
    main()
