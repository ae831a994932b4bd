"""fused_head_loss: the LM head, the chosen tokens' log-probabilities and a token-separable loss in one pass,
whose gradients in hidden and weight are formed in the forward (docs/trainer.md, "One-pass head loss").

    loss, logp, entropy = fused_head_loss(hidden [N, H], weight [V, H], targets [N], loss_fn,
                                          return_entropy=True)
    loss.backward()          # hands out the gradients formed in the forward, times d(outer) / d loss

fused_logprobs never holds [N, V] logits, so its backward recomputes them: 8 N H V FLOPs. Here each chunk of
rows computes its logits once, into memory, with their lse (and entropy); asks loss_fn for d loss / d log p of
those rows; and turns that into d logits = g (onehot - softmax) in the weight's dtype, into a block of several
chunks' rows. Each block's d logits are multiplied into d hidden and d weight at once (cuBLAS): 6 N H V FLOPs,
with one chunk's fp32 logits and one block's d logits (about 1 GiB) as the largest temporaries. Liger-Kernel's
fused linear cross-entropy does this for cross-entropy; any loss that is a sum of per-token terms of log p
works the same way.

Backends: "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1): the logits of a 16-bit hidden and weight from
cuBLAS in LOGITS_PIECES slices of the hidden width, each its own tensor-core accumulator, added in fp32
(logits_gemm="cublas", the default), or from fused_logprobs's logits kernel with a store of the logits
(logits_gemm="triton": split_dot's per-tile accumulators, as accurate as an fp32 head, slower; also for an
fp32 hidden or weight); then Triton row passes for lse, entropy and d logits, and torch.mm for the two gradient
products. "torch" (plain PyTorch, the CPU default): the same chunks in fp32 arithmetic on an fp32 copy of the
weight.
"""

import torch

from m1_kernels.dispatch import Backend, resolve_backend
from m1_kernels.validate import FLOAT_DTYPES

from .logprobs import check_head_inputs, triton_logprobs

# The largest temporaries: one chunk's fp32 logits plus one gradient block's 16-bit d logits (an fp32 d logits
# overwrites the logits in place, and a block is then one chunk). At V = 200064: 512-row chunks, 1536-row blocks.
BUDGET_BYTES = 1 << 30
ROW_ALIGN = 128      # default chunks hold whole 128-row tiles (the logits kernel's, cuBLAS's)
# Chunks per gradient block: the d hidden and d weight GEMMs run once per block (see _one_pass). More chunks per
# block means smaller chunks, and each chunk costs a call of loss_fn's gradient (host work).
BLOCK_CHUNKS = 3
# The logits GEMM of the triton backend for a 16-bit hidden of the weight's dtype: "triton" (the fused tile
# kernel, split_dot's per-tile accumulators) or "cublas" (cuBLAS in LOGITS_PIECES slices of the hidden width,
# each its own tensor-core accumulator, added in fp32). bench/NOTES.md has both's rate and error.
LOGITS_GEMMS = ("triton", "cublas")
LOGITS_GEMM = "cublas"
LOGITS_PIECES = 2

TRITON = Backend("triton", triton_logprobs, runs_on="CUDA GPUs; CPU tensors under TRITON_INTERPRET=1 (tests)",
                 dtypes=FLOAT_DTYPES, limits="hidden fp32 or the weight's dtype", custom_ops=False)
TORCH = Backend("torch", None, runs_on="anywhere (plain PyTorch, chunked; the CPU default)", dtypes=FLOAT_DTYPES,
                limits="fp32 arithmetic on an fp32 copy of the weight", custom_ops=False)
BACKENDS = (TRITON, TORCH)


def fused_head_loss(hidden, weight, targets, loss_fn, *, return_entropy: bool = False, backend: str | None = None,
                    chunk_rows: int | None = None, logits_gemm: str | None = None):
    """loss_fn of the log-probabilities of `targets` under softmax(hidden @ weight^T), with the head's gradients
    formed in the forward: the logits are computed once (6 N H V FLOPs where fused_logprobs + backward take 8).

    loss_fn must be a sum of per-token terms, loss = sum_n f_n(logp[n]), where each f_n may use constants
    (old log-probs, advantages, the mask, token or sequence counts fixed in advance) but no other token's
    log-prob. Why: the gradient of a chunk of rows is formed before later chunks' log-probs exist, from
    loss_fn's derivative at a vector that holds this chunk's log-probs and placeholders (0, or earlier chunks'
    values) elsewhere; separability makes those other entries irrelevant. A loss that couples tokens (a
    normalisation by the batch's own log-probs, a KL against a mean) gets wrong gradients, silently. Every
    setting of trainer.policy_loss is separable when num_tokens / num_sequences are given or follow from the
    mask. loss_fn is called once per chunk (with gradients) and once on all log-probs (the returned value).

    Gradients: d logits is rounded to the weight's dtype once (as in any 16-bit head) and multiplied with
    cuBLAS, once per gradient block of rows. d hidden is one product over the whole vocabulary (fp32
    accumulation, one rounding to hidden's dtype; an fp32 hidden with a 16-bit weight gets an fp32 product,
    torch.mm's out_dtype). d weight adds up
    over the blocks in the weight's dtype (no [V, H] fp32 accumulator, which would be 4.9 GB at M1's size):
    one rounding per block, so with c blocks its error grows to about sqrt(c / 2) times a single rounding's;
    an fp32 hidden enters that product rounded to the weight's dtype, as in a 16-bit head.
    The torch backend computes all of this in fp32. The backward multiplies the stashed gradients by the
    incoming scalar in place (one more rounding unless it is a power of two) and runs once per forward.

    Args:
        hidden: [N, H] float32, float16 or bfloat16 (unit stride in H); fp32 with a 16-bit weight is
            multiplied in 16-bit pieces (fp32-accurate logits); 16-bit with an fp32 weight is converted.
        weight: [V, H] (the LM head's weight, unit stride in H), float32, float16 or bfloat16.
        targets: [N] int32 or int64 token ids in [0, V) (checked on CPU tensors; on the GPU an id out of range
            gives a NaN log-prob).
        loss_fn: callable(logp [N] fp32) -> 0-d tensor, a sum of per-token terms (see above); it must not
            modify its argument.
        return_entropy: also return each row's entropy (detached: a metric).
        backend: "triton" or "torch" (default: triton on CUDA, torch on CPU; see m1_kernels.dispatch).
        chunk_rows: rows per logits chunk; a gradient block holds BLOCK_CHUNKS chunks (16-bit d logits) or one
            (fp32). Default: as many as keep one chunk's logits and one block's d logits within BUDGET_BYTES, a
            multiple of 128.
        logits_gemm: "triton" (the fused tile kernel; log-prob error as the fp32 head's) or "cublas" (cuBLAS in
            LOGITS_PIECES slices of H; faster, about 15x that error: docs/trainer.md); triton backend only,
            "cublas" for a 16-bit hidden of the weight's dtype. Default: LOGITS_GEMM where it applies.

    Returns:
        (loss, logp, entropy): loss a 0-d fp32 tensor differentiable in hidden and weight; logp [N] fp32 and
        entropy [N] fp32 (None without return_entropy), both detached.
    """
    hidden = check_head_inputs(hidden, weight, targets)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or a positive integer, got {chunk_rows!r}")
    row = resolve_backend("fused_head_loss", backend, BACKENDS, hidden.device)
    logits_gemm = _logits_gemm(logits_gemm, row.name, hidden, weight)
    grad = torch.is_grad_enabled()
    loss, logp, entropy = _HeadLoss.apply(hidden, weight, targets.contiguous(), loss_fn, return_entropy,
                                          logits_gemm, chunk_rows, grad and hidden.requires_grad,
                                          grad and weight.requires_grad)
    return loss, logp, (entropy if return_entropy else None)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, loss_fn, with_entropy, logits_gemm, chunk_rows, need_dh, need_dw):
        loss, logp, entropy, dh, dw = _one_pass(hidden, weight, targets, loss_fn, with_entropy, logits_gemm,
                                                chunk_rows, need_dh, need_dw)
        ctx.grads = (dh, dw)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        if ctx.grads is None:
            raise RuntimeError("fused_head_loss: a second backward through one forward (retain_graph=True); its "
                               "gradients were formed in the forward and are handed out once")
        dh, dw = ctx.grads
        ctx.grads = None   # the returned tensors are then their only holders (autograd may keep them as .grad)
        # In place: no second [V, H] buffer.
        for grad in (dh, dw):
            if grad is not None:
                grad.mul_(grad_loss)
        return dh, dw, None, None, None, None, None, None, None


def _logits_gemm(requested, backend, hidden, weight):
    """The logits GEMM of one call: "torch" on the torch backend, else `requested` or LOGITS_GEMM (see there)."""
    cublas_ok = hidden.dtype == weight.dtype != torch.float32
    if requested is None:
        return backend if backend == "torch" else LOGITS_GEMM if cublas_ok else "triton"
    if requested not in LOGITS_GEMMS:
        raise ValueError(f"logits_gemm must be None or one of {LOGITS_GEMMS}, got {requested!r}")
    if backend != "triton":
        raise ValueError(f"logits_gemm={requested!r} applies to the triton backend, not {backend!r}")
    if requested == "cublas" and not cublas_ok:
        raise ValueError(f"logits_gemm='cublas' needs a 16-bit hidden of the weight's dtype, got hidden "
                         f"{hidden.dtype} and weight {weight.dtype}")
    return requested


def _one_pass(hidden, weight, targets, loss_fn, with_entropy, logits_gemm, chunk_rows, need_dh, need_dw):
    """(loss, logp, entropy or [0], dh or None, dW or None), chunk by chunk of rows.

    Each chunk's logits give its log-probs, then its d logits into the current gradient block; each full block
    then takes one GEMM for d hidden and one for d weight. Blocks rather than chunks for those: d weight adds up
    in the weight's dtype (reading and writing all of it per GEMM) and d hidden's output is only rows x H,
    too few tiles to fill the GPU at one chunk's rows."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    on_torch = logits_gemm == "torch"
    # The gradient products' operands: the weight itself (triton), fp32 copies (torch).
    h_all, w_op = (hidden.float(), weight.float()) if on_torch else (hidden, weight)
    with_grads = need_dh or need_dw
    dz_in_place = w_op.dtype == torch.float32 or not with_grads
    rows, block_rows = _chunk_rows(N, V, 0 if dz_in_place else w_op.element_size(), chunk_rows)
    z_buf = torch.empty(rows, V, **f32)
    dz_buf = z_buf if dz_in_place else torch.empty(block_rows, V, dtype=w_op.dtype, device=device)
    logp = torch.zeros(N, **f32)                 # zeros: the placeholders of rows not computed yet
    entropy = torch.empty(N if with_entropy else 0, **f32)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = (torch.zeros if N == 0 else torch.empty)(V, H, dtype=w_op.dtype, device=device) if need_dw else None
    for b0 in range(0, N, block_rows):
        b1 = min(N, b0 + block_rows)
        for r0 in range(b0, b1, rows):
            r1 = min(b1, r0 + rows)
            h, t, z = h_all[r0:r1], targets[r0:r1], z_buf[:r1 - r0]
            if on_torch:
                lp, ent, lse = _torch_logits(h, w_op, t, z, with_entropy)
            elif logits_gemm == "cublas":
                lp, ent, lse = triton_logprobs.logits_stats(_cublas_logits(h, weight, z), t, with_entropy)
            else:
                lp, ent, lse = triton_logprobs.forward(h, weight, t, with_entropy, z=z)
            logp[r0:r1] = lp
            if with_entropy:
                entropy[r0:r1] = ent
            if not with_grads:
                continue
            g = _loss_grad(loss_fn, logp)[r0:r1].contiguous()
            if on_torch:
                _torch_dlogits(z, lse, g, t)
            else:
                triton_logprobs.dlogits_from_z(z, lse, g, t, dz_buf[r0 - b0:r1 - b0])
        if not with_grads:
            continue
        dz = dz_buf[:b1 - b0]
        if need_dh:
            if dh.dtype == dz.dtype:
                torch.mm(dz, w_op, out=dh[b0:b1])
            else:
                dh[b0:b1] = _mm_fp32(dz, w_op, torch.empty(b1 - b0, H, **f32))
        if need_dw:
            # An fp32 hidden with a 16-bit weight: rounded to the weight's dtype here, as in a 16-bit head.
            h_op = h_all[b0:b1].to(dw.dtype)
            if b0 == 0:
                torch.mm(dz.T, h_op, out=dw)
            else:
                dw.addmm_(dz.T, h_op)
    with torch.no_grad():
        loss = _call(loss_fn, logp).detach().float()
    return loss, logp, entropy, dh, (dw.to(weight.dtype) if need_dw else None)


def _chunk_rows(N, V, dz_bytes, chunk_rows):
    """(rows per logits chunk, rows per gradient block), at most N (at least 1): chunk_rows or as many as keep
    the fp32 logits of a chunk and the d logits of a block (dz_bytes per element, 0 when written over the
    logits: a block is then a chunk) within BUDGET_BYTES, in whole ROW_ALIGN tiles."""
    chunks = BLOCK_CHUNKS if dz_bytes else 1
    if chunk_rows is None:
        chunk_rows = max(ROW_ALIGN, BUDGET_BYTES // (V * (4 + chunks * dz_bytes)) // ROW_ALIGN * ROW_ALIGN)
    rows = max(1, min(N, chunk_rows))
    return rows, max(1, min(N, rows * chunks))


def _cublas_logits(h, w, z):
    """z = h @ w^T (fp32) from 16-bit h and w, over LOGITS_PIECES slices of the hidden width."""
    H = h.shape[1]
    return _mm_fp32(h, w.T, z, sorted({H * i // LOGITS_PIECES // 8 * 8 for i in range(LOGITS_PIECES)}))


def _call(loss_fn, logp):
    loss = loss_fn(logp)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(f"loss_fn must return a 0-d tensor, got "
                        f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    return loss


def _loss_grad(loss_fn, logp):
    """d loss_fn / d logp at (a copy of) logp, fp32; only the rows just computed are used (see the contract)."""
    x = logp.clone().requires_grad_()
    with torch.enable_grad():
        loss = _call(loss_fn, x)
        if not loss.requires_grad:
            raise ValueError("loss_fn's value carries no gradient: it must be computed from its argument with "
                             "differentiable operations")
        (g,) = torch.autograd.grad(loss, x, allow_unused=True, materialize_grads=True)
    return g.float()


def _mm_fp32(a, b, out, starts=(0,)):
    """out (fp32) = a @ b, the reduction dimension cut at `starts` (the first 0): each slice summed in its own
    accumulator (cuBLAS's fp32 output of 16-bit operands on CUDA, torch.mm's out_dtype, torch >= 2.8) and added
    to out in fp32 (cuBLAS's epilogue). A single tensor-core accumulator over a long reduction keeps fewer of
    the exact products' bits (lm_head's measurement). CPU tensors: fp32 copies (16-bit products are exact in
    fp32, so the result is the same kind)."""
    ends = [*starts[1:], a.shape[1]]
    for i, (k0, k1) in enumerate(zip(starts, ends)):
        x, y = a[:, k0:k1], b[k0:k1]
        if x.dtype == torch.float32 or not x.is_cuda:
            x, y = x.float(), y.float()
            if i == 0:
                torch.mm(x, y, out=out)
            else:
                out.addmm_(x, y)
        elif i == 0:
            torch.mm(x, y, out_dtype=torch.float32, out=out)
        else:
            torch.addmm(out, x, y, out_dtype=torch.float32, out=out)
    return out


def _torch_logits(h, w, targets, z, with_entropy):
    """The torch backend's logits chunk: z = h @ w^T (fp32) and (log p, entropy or None, lse)."""
    torch.mm(h, w.T, out=z)
    lse = torch.logsumexp(z, dim=1)
    logp = z.gather(1, targets.long()[:, None])[:, 0] - lse
    entropy = lse - torch.linalg.vecdot(torch.softmax(z, dim=1), z) if with_entropy else None
    return logp, entropy, lse


def _torch_dlogits(z, lse, g, targets):
    """d logits = g (onehot - softmax), written over the fp32 logits z."""
    dz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    dz[torch.arange(z.shape[0], device=z.device), targets.long()] += g
    return dz
