"""The trainer's LM-head log-probs (trainer.fused_logprobs) at MiniMax-M1 width: 8192 and 32768 tokens, hidden
6144, vocabulary 200064, bf16 hidden and weight, forward + backward (the gradient of sum(g * log p) in hidden
and weight), FLOPs counted as 6 N H V (the harness's floor is then the time at the bf16 matmul rate measured
in the run, so "of floor" is the fraction of that rate).

Ours twice: as shipped (each K tile's 16-bit products summed in a fresh accumulator, then added in fp32: as
accurate as the engine's head) and with trainer.triton_logprobs.RUNNING_ACCUMULATOR (the products accumulate in
place, faster, with 2.5-6x the fp32 matmul's rounding error on Hopper): the trade-off measured in one run.

Ours once more as "ours[one-pass loss]": trainer.fused_head_loss with the trainer's CISPO loss (policy_loss,
eps_high 0.28, token-normalised), whose gradients are formed in the forward: the logits are computed once,
6 N H V FLOPs where the rows above do 8 (forward, then recomputed in the backward). Its upstream gradient is
the loss's instead of a random one; the work is the same. Its default logits GEMM on the GPU is cuBLAS in slices of the hidden width (each its
own accumulator, added in fp32); "triton logits" is the same pass with the fused logits kernel of the rows
above ("ours[one-pass, triton logits]"): the rate against the error.

Peers: the fp32 head in plain PyTorch (the M1 report's fix: hidden and weight converted to fp32, [N, V] fp32
logits, log_softmax) and the bf16 head in plain PyTorch (bf16 logits, log_softmax in fp32). The fp32 head is
not run at 32768 tokens: about 4.6 s per call (nine calls in the timing loop) and about 90 GB.

The report (after the table) adds per implementation: extra memory (peak allocated during one call minus what
was allocated before it, minus the gradients it returns: dW alone is 2.3 GiB), the largest log-prob error
against float64 on 256 evenly spaced rows, and the relative error of d hidden on those rows against float64
(g (w_target - sum_v p_v w_v), with g = d loss / d log p of the implementation's own loss); float64 computed on
the device in vocabulary chunks.
Targets (issue): error <= 1e-4, >= 0.7 of the bf16 matmul rate, extra memory <= 1 GiB.

Without a GPU: 128 tokens, hidden 64, vocabulary 1000 on the CPU torch path (a smoke test, not speed).
"""

import json
import math

import torch
import torch.nn.functional as F

from m1_kernels.trainer import fused_head_loss, fused_logprobs, policy_loss
from m1_kernels.trainer.logprobs import triton_logprobs

from .harness import Case

GROUP = "trainer lm-head log-probs"
ERROR_ROWS = 256


def logprobs_fp64(hidden, weight, targets, rows, chunk=8192, mean_weight=False):
    """(log p, entropy) in float64 of `rows` (a 1-D index tensor), computed on hidden's device one vocabulary
    chunk at a time (never [rows, V] at once); with mean_weight also sum_v p_v weight_v per row ([rows, H],
    what d hidden = g (weight_target - sum_v p_v weight_v) needs)."""
    h = hidden[rows].double()
    t = targets[rows].long()
    n = h.shape[0]
    m = torch.full((n,), -math.inf, dtype=torch.float64, device=h.device)
    s = torch.zeros_like(m)
    zt = torch.zeros_like(m)
    ez = torch.zeros_like(m)
    ew = torch.zeros_like(h) if mean_weight else None
    idx = torch.arange(n, device=h.device)
    for c0 in range(0, weight.shape[0], chunk):
        w = weight[c0:c0 + chunk].double()
        z = h @ w.T
        new_m = torch.maximum(m, z.max(dim=1).values)
        alpha = torch.exp(m - new_m)
        e = torch.exp(z - new_m[:, None])
        s = s * alpha + e.sum(dim=1)
        ez = ez * alpha + (e * z).sum(dim=1)
        if mean_weight:
            ew = ew * alpha[:, None] + e @ w
        m = new_m
        here = (t >= c0) & (t < c0 + z.shape[1])
        zt = torch.where(here, z[idx, (t - c0).clamp(0, z.shape[1] - 1)], zt)
    lse = m + torch.log(s)
    if mean_weight:
        return zt - lse, lse - ez / s, ew / s[:, None]
    return zt - lse, lse - ez / s


def _ours(backend):
    def forward(x):
        return fused_logprobs(x["hidden"], x["weight"], x["targets"], backend=backend)
    return forward


def _cispo_loss(x):
    """The trainer's CISPO loss of the N tokens' log-probs (one row), on the inputs' old log-probs and advantages."""
    old, adv = x["old_logprobs"][None], x["advantages"][None]
    mask = torch.ones_like(old, dtype=torch.bool)
    return lambda logp: policy_loss(logp[None], old, adv, mask, method="cispo", eps_high=0.28)[0]


def _one_pass_cispo(backend, logits_gemm=None):
    """fused_head_loss with _cispo_loss; (log p, gradients)."""
    def call(x):
        loss, logp, _ = fused_head_loss(x["hidden"], x["weight"], x["targets"], _cispo_loss(x), backend=backend,
                                        logits_gemm=logits_gemm)
        return logp, torch.autograd.grad(loss, [x["hidden"], x["weight"]])
    call.loss = _cispo_loss
    return call


def _plain_head(dtype):
    def forward(x):
        logits = F.linear(x["hidden"].to(dtype), x["weight"].to(dtype))
        return torch.log_softmax(logits.float(), dim=-1).gather(1, x["targets"][:, None])[:, 0]
    return forward


def _fwd_bwd(forward, running_accumulator=False):
    def call(x):
        if running_accumulator:
            triton_logprobs.RUNNING_ACCUMULATOR = True
        try:
            logp = forward(x)
            grads = torch.autograd.grad(logp, [x["hidden"], x["weight"]], x["grad"])
        finally:
            if running_accumulator:
                triton_logprobs.RUNNING_ACCUMULATOR = False
        return logp, grads
    call.loss = lambda x: lambda logp: (logp * x["grad"]).sum()
    return call


def _inputs(N, H, V, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    # Logits with a standard deviation near 3, as an LM head's (hidden after RMSNorm: rms 1).
    x = {"hidden": torch.randn(N, H, device=device, dtype=dtype, generator=g).requires_grad_(),
         "weight": (torch.randn(V, H, device=device, dtype=dtype, generator=g) * (3 / H ** 0.5)).requires_grad_(),
         "targets": torch.randint(0, V, (N,), device=device, generator=g),
         "grad": torch.randn(N, device=device, dtype=torch.float32, generator=g) / N,
         "advantages": torch.randn(N, device=device, dtype=torch.float32, generator=g)}
    # The sampling policy's log-probs: ours, off by ratios of about exp(+-0.2) (some beyond CISPO's clip).
    with torch.no_grad():
        x["old_logprobs"] = fused_logprobs(x["hidden"], x["weight"], x["targets"]) + 0.2 * torch.randn(
            N, device=device, generator=g)
    return x


def _calls(device, N):
    """label -> forward + backward of every implementation run at N tokens: call(x) -> (log p, (d hidden,
    d weight)), the gradients of call.loss(x)(log p) (a sum over tokens; the report's reference needs it)."""
    ours = "triton" if device.type == "cuda" else "torch"
    impls = {f"ours[{ours}]": _fwd_bwd(_ours(ours))}
    if device.type == "cuda":
        impls["ours[triton] running acc"] = _fwd_bwd(_ours("triton"), running_accumulator=True)
    impls["ours[one-pass loss]"] = _one_pass_cispo(ours)
    if device.type == "cuda":
        impls["ours[one-pass, triton logits]"] = _one_pass_cispo("triton", "triton")
    impls["bf16 head (torch)"] = _fwd_bwd(_plain_head(torch.bfloat16))
    if device.type != "cuda" or N <= 8192:
        impls["fp32 head (torch)"] = _fwd_bwd(_plain_head(torch.float32))
    return impls


def _shapes(device):
    if device.type == "cuda":
        return [(N, 6144, 200064) for N in (8192, 32768)]
    return [(128, 64, 1000)]


def logprobs_case(device, N, H, V):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Case(GROUP, f"fwd+bwd N{N} H{H} V{V} {str(dtype).removeprefix('torch.')}",
                lambda: _inputs(N, H, V, device, dtype),
                _calls(device, N),
                flops=6.0 * N * H * V, max_sets=1, params=dict(N=N, H=H, V=V))


def cases(device):
    return [logprobs_case(device, *shape) for shape in _shapes(device)]


# ------------------------------------------------------------------------------------------------------
# The extra report printed by `python -m m1_kernels.bench`: memory and accuracy of each implementation

def _measure(call, x, device):
    """(extra bytes or None off the GPU, log p, d hidden) of one call: extra = peak allocated during it minus
    what was allocated before, minus the gradients it returns (they must exist whatever computes them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    logp, grads = call(x)
    extra = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before - sum(g.numel() * g.element_size() for g in grads)
    return extra, logp.detach(), grads[0]


def _upstream(loss_fn, logp):
    """d loss_fn / d log p at log p (the gradient each row's d hidden is scaled by)."""
    x = logp.detach().float().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(loss_fn(x), x)[0]


def report(rows, device, stem) -> list[str]:
    timed = [r for r in rows if r["group"] == GROUP and "median_ms" in r]
    if not timed:
        return []
    print(f"\ntrainer LM-head log-probs, forward + backward: extra memory, log-prob error and d hidden's relative "
          f"error against float64 ({ERROR_ROWS} rows)")
    print(f"{'case':<40} {'impl':<26} {'ms':>9} {'TFLOP/s':>8} {'of bf16 mm':>10} {'extra GiB':>10} {'max err':>9} "
          f"{'dh rel err':>10}")
    for name in dict.fromkeys(r["case"] for r in timed):
        params = next(r["params"] for r in timed if r["case"] == name)
        N, H, V = params["N"], params["H"], params["V"]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        x = _inputs(N, H, V, device, dtype)
        rows_idx = torch.linspace(0, N - 1, min(ERROR_ROWS, N), device=device).long()
        weight = x["weight"].detach()
        ref, _, mean_w = logprobs_fp64(x["hidden"].detach(), weight, x["targets"], rows_idx, mean_weight=True)
        # d hidden of a row: g (w_target - sum_v p_v w_v), g = d loss / d log p (the loss is a sum over tokens)
        w_target = weight[x["targets"][rows_idx]].double()
        for label, call in _calls(device, N).items():
            row = next((r for r in timed if r["case"] == name and r["impl"] == label), None)
            if row is None:
                continue
            extra, logp, dh = _measure(call, x, device)
            err = (logp[rows_idx].double() - ref).abs().max().item()
            g = _upstream(call.loss(x), logp)[rows_idx].double()
            dh_ref = g[:, None] * (w_target - mean_w)
            dh_err = ((dh[rows_idx].double() - dh_ref).norm() / dh_ref.norm()).item()
            row.update(extra_mem_GiB=None if extra is None else extra / 2**30, max_logp_error=err,
                       dhidden_rel_error=dh_err)
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            print(f"{name[:40]:<40} {label:<26} {row['median_ms']:>9.2f} {fmt(row.get('TFLOPs'), '8.1f'):>8} "
                  f"{fmt(row.get('fraction_of_floor'), '10.3f'):>10} {fmt(row['extra_mem_GiB'], '10.2f'):>10} "
                  f"{err:>9.1e} {dh_err:>10.1e}")
            del logp, dh
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda" and not any(r["case"].startswith("fwd+bwd N32768") and r["impl"].startswith("fp32")
                                         for r in timed):
        print("(fp32 head not run at 32768 tokens: about 4.6 s per call and about 90 GB)")
    if device.type != "cuda":
        print("(no GPU: the CPU torch path at a small shape; says nothing about GPU speed or memory)")
    if stem is None:
        return []
    path = stem + "-trainer_logprobs.json"
    keys = ("case", "impl", "median_ms", "TFLOPs", "fraction_of_floor", "extra_mem_GiB", "max_logp_error",
            "dhidden_rel_error", "params")
    with open(path, "w") as f:
        json.dump({"error_rows": ERROR_ROWS, "rows": [{k: r.get(k) for k in keys} for r in timed]}, f, indent=1)
    return [path]
