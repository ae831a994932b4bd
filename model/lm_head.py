"""LM head with fp32-accurate logits from a 16-bit weight, without an fp32 copy of the weight.

    logits = lm_head_logits(hidden [N, H], weight [V, H]) -> [N, V] float32

The product of two bf16 (or two fp16) numbers is exact in fp32, so a tensor-core dot of 16-bit
operands with an fp32 accumulator only rounds the sums. An fp32 activation x is split into pieces in
the weight's dtype, hi = round(x), lo = round(x - hi), lo2 = round(x - hi - lo), and every piece's dot
with the same weight tile goes into one fp32 accumulator (`split_dot`): the weight is read once, and
the logits are as accurate as an fp32 matmul on the fp32 activation and the 16-bit weight. Pieces
needed (measured against float64 at H = 6144, see tests/test_lm_head.py): fp32 activation with a
bf16 weight, 3 (2 leave ~10x the fp32 head's error: x - hi - lo keeps 2^-17 of x); fp16 with bf16,
2 (11 bits into 8); fp32 with fp16, 2 (11-bit pieces); an activation in the weight's dtype, 1; bf16
with fp16, 1 (8 bits fit in 11). fp16 pieces have a narrow exponent range, so with an fp16 weight
each row of a wider activation is first scaled by a power of two (exact) to a maximum in [0.5, 1)
and the logits scaled back; what then falls below fp16's subnormal spacing (2^-24 of the row's
maximum) is below fp32's rounding of the largest products and no further piece could hold it. An
fp32 weight takes a plain fp32 matmul.

Backends: "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1, where fp16 weights are the ones to
test: the interpreter's bf16 dot is wrong) and "torch" (any device, the CPU default): fp32 matmuls
over chunks of the vocabulary, so at most one chunk of the weight exists in fp32. Inference only on
the triton backend (no backward; a call that needs gradients runs the torch path).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from m1_kernels.dispatch import Backend, autotune_prune, resolve_backend, triton_interpreted
from m1_kernels.interpreter_compat import patch_triton_interpreter
from m1_kernels.validate import FLOAT_DTYPES, check_tensor

if triton_interpreted():
    patch_triton_interpreter()

TORCH_CHUNK_BYTES = 256 << 20   # fp32 weight rows the torch path converts at a time
_OPAQUE_ADD = tl.constexpr(not triton_interpreted())   # split_dot's inline PTX does not interpret

# Pieces of the activation, by (activation dtype, weight dtype); see the module docstring.
PIECES = {(torch.float32, torch.bfloat16): 3, (torch.float16, torch.bfloat16): 2,
          (torch.bfloat16, torch.bfloat16): 1, (torch.float32, torch.float16): 2,
          (torch.bfloat16, torch.float16): 1, (torch.float16, torch.float16): 1}


@triton.jit
def split_dot(x, w, acc, PIECES: tl.constexpr):
    """acc + x @ w for an x [M, K] (any float dtype) and a 16-bit w [K, N]: x as the sum of PIECES
    pieces in w's dtype (each the rounding of what the previous ones leave), every piece's products
    with w exact in fp32. One load of w serves all pieces. PIECES gives the count per dtype pair; for
    fp16 pieces, scale each row of x first by a power of two to a maximum in [0.5, 1) (as
    `_logits_triton` does), or small values fall below fp16's range.

    The tile's products go into a fresh accumulator, smallest piece first, which is then added to
    `acc` with fp32 adds: Hopper's tensor cores align an MMA's products to the exponent of the running
    accumulator and drop the bits below it, so one accumulator carried over K = 6144 gave 2.5-6x the
    fp32 matmul's error on the H200 (bench/NOTES.md, session 7)."""
    tl.static_assert(PIECES <= 3)
    hi = x.to(w.dtype)
    if PIECES == 1:
        part = tl.dot(hi, w)
    else:
        rest = x.to(tl.float32) - hi.to(tl.float32)
        mid = rest.to(w.dtype)
        if PIECES == 2:
            part = tl.dot(hi, w, tl.dot(mid, w))
        else:
            lo = (rest - mid.to(tl.float32)).to(w.dtype)
            part = tl.dot(hi, w, tl.dot(mid, w, tl.dot(lo, w)))
    if _OPAQUE_ADD:
        # Triton's combiner folds `acc + dot(a, b)` back into `dot(a, b, acc)`; an identity move hides it.
        part = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [part], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return acc + part


def _configs():
    """(BM, BN, BK, warps, stages): narrow row tiles that stream the weight at small N, square tiles
    for the matmul-bound large N. One config under the interpreter."""
    small = [(16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (32, 64, 256, 4, 3), (64, 64, 128, 4, 4),
             (16, 32, 512, 4, 3)]
    large = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 128, 8, 3),
             (256, 128, 64, 8, 3)]
    options = [(16, 32, 64, 4, 1)] if triton_interpreted() else small + large
    return [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s) for bm, bn, bk, w, s in options]


def _prune(configs, named_args, **kwargs):
    """Row tiles no taller than the rows (rounded to a power of two, at least 16); from 1024 rows on, the
    matmul-bound tiles only."""
    n = named_args["N_BUCKET"]
    kept = [c for c in configs if c.kwargs["BM"] <= max(16, n) and (n < 1024 or c.kwargs["BM"] >= 64)]
    return kept or configs[:1]


@triton.autotune(configs=_configs(), key=["N_BUCKET", "V", "H", "PIECES"],
                 prune_configs_by=dict(early_config_prune=autotune_prune(_prune)))
@triton.jit
def _lm_head_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, V, H, stride_xn, stride_wv, stride_on, N_BUCKET,
                    PIECES: tl.constexpr, ROW_SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GROUP_M: tl.constexpr):
    # Row tiles of one vocabulary tile run next to each other (groups of GROUP_M row tiles), so a
    # weight tile comes from memory once and the activation rows stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BM)
    per_group = GROUP_M * tl.cdiv(V, BN)
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, H, BK):
        k = k0 + ks
        x = tl.load(x_rows + k[None, :], mask=(rows < N)[:, None] & (k < H)[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=(k < H)[:, None] & (cols < V)[None, :], other=0.0)   # [BK, BN]
        acc = split_dot(x, w, acc, PIECES)
    if ROW_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=rows < N, other=1.0)[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :], acc,
             mask=(rows < N)[:, None] & (cols < V)[None, :])


def _logits_triton(hidden, weight):
    N, H = hidden.shape
    V = weight.shape[0]
    out = torch.empty(N, V, dtype=torch.float32, device=hidden.device)
    if N == 0 or V == 0:
        return out
    x, scale = hidden, None
    if weight.dtype == torch.float16 and hidden.dtype != torch.float16:
        # fp16 pieces: bring each row's largest magnitude to [0.5, 1) by a power of two (exact both ways).
        x32 = hidden.float()
        exponent = torch.frexp(x32.abs().amax(1)).exponent
        x, scale = torch.ldexp(x32, -exponent[:, None]), torch.ldexp(torch.ones_like(x32[:, 0]), exponent)
    x = x if x.stride(1) == 1 else x.contiguous()
    grid = lambda meta: (triton.cdiv(N, meta["BM"]) * triton.cdiv(V, meta["BN"]),)  # noqa: E731
    _lm_head_kernel[grid](x, weight, x if scale is None else scale, out, N, V, H, x.stride(0), weight.stride(0),
                          out.stride(0), min(triton.next_power_of_2(N), 4096),
                          PIECES=PIECES[(hidden.dtype, weight.dtype)], ROW_SCALE=scale is not None, GROUP_M=8)
    return out


def _logits_torch(hidden, weight):
    x = hidden.float()
    N, H = x.shape
    V = weight.shape[0]
    out = x.new_empty(N, V)
    step = max(1, TORCH_CHUNK_BYTES // (4 * max(H, 1)))
    for v0 in range(0, V, step):
        out[:, v0:v0 + step] = x @ weight[v0:v0 + step].float().T
    return out


def _triton_unsupported(op, *, needs_grad):
    return "the triton backend has no backward (inference only)" if needs_grad else None


TRITON = Backend("triton", _logits_triton, runs_on="CUDA GPUs; CPU tensors under TRITON_INTERPRET=1 (tests)",
                 dtypes=FLOAT_DTYPES, limits="inference (no backward)", unsupported=_triton_unsupported)
TORCH = Backend("torch", _logits_torch, runs_on="anywhere (plain PyTorch; the CPU default)", dtypes=FLOAT_DTYPES,
                limits="fp32 matmuls over vocabulary chunks", custom_ops=False)
BACKENDS = (TRITON, TORCH)


def lm_head_logits(hidden, weight, *, backend=None):
    """fp32 logits of hidden states under an LM-head weight, as accurate as an fp32 matmul.

    Args:
        hidden: [N, H], any float dtype.
        weight: [V, H] in bfloat16, float16 or float32 (unit last stride). A 16-bit weight is never
            converted as a whole: the triton backend splits the activation instead, the torch backend
            converts one vocabulary chunk at a time.
        backend: "triton" or "torch" (default: triton on CUDA unless gradients are needed, torch on CPU).

    Returns:
        logits [N, V] float32.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device, unit_last_stride=True)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight has {weight.shape[1]} input features but hidden has {hidden.shape[1]}")
    if weight.dtype == torch.float32:
        return F.linear(hidden.float(), weight)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    impl = resolve_backend("lm_head_logits", backend, BACKENDS, hidden.device, needs_grad=needs_grad).impl
    return impl(hidden, weight)
