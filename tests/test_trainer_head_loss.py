"""fused_head_loss against float64 autograd of log_softmax + policy_loss: loss, log-probs, entropies and both
gradients for every policy_loss method and normalisation (hypothesis over shapes, dtypes, chunk sizes down to one
row, targets at both ends of the vocabulary), on the torch path and the Triton kernels (interpreted on the CPU:
fp32 and fp16; bf16 on the GPU); equality with the two-pass path (fused_logprobs, then policy_loss); the
trainer's update through it; no-grad and frozen inputs, the backward's scaling, bad inputs; GPU tests at bf16."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from m1_kernels.dispatch import backend_error
from m1_kernels.trainer import fused_head_loss, fused_logprobs, policy_loss
from m1_kernels.trainer.config import TrainerConfig
from m1_kernels.trainer.head_loss import BACKENDS
from m1_kernels.trainer.loop import Group, Trainer, make_batch
from m1_kernels.trainer.loss import METHODS
from m1_kernels.trainer.tasks import make_task

from numerics import ATOL, DEVICE, assert_within_2x, max_err, nan_filled_outputs, require_backend

CPU_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)]
GPU_DTYPES = CPU_DTYPES + [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
NAMES = [b.name for b in BACKENDS]
# (backend, logits_gemm): the triton backend with each logits GEMM; "cublas" takes a 16-bit hidden of the weight's
# dtype (on the CPU fp32 copies stand in for cuBLAS: the slicing and the fp32 sums of the pieces are tested).
MODES = [("triton", "triton"), ("triton", "cublas"), ("torch", None)]
MODE_IDS = ["triton", "triton-cublas", "torch"]
# Log-ratios log(pi / pi_old) of the problems: away from the clip edges log(0.8) and log(1.28), where a rounding
# of log p could flip a token between PPO's branches (a jump in the gradient, not an error).
LOG_RATIOS = [-0.6, -0.3, -0.1, 0.0, 0.1, 0.3, 0.6]


def scatter(mask, flat):
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat)


def policy_problem(B, T, V, seed, per_token_advantages, device=DEVICE):
    """A [B, T] batch: mask (row 0 keeps a token), targets of the masked tokens (the first at column 0, the last
    at V - 1), advantages, and the log-ratio of each token."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    N = int(mask.sum())
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[-1] = 0, V - 1
    advantages = torch.randn(B, T if per_token_advantages else 1, generator=g).squeeze(-1)
    advantages[advantages.abs() < 0.3] = 0.0     # some tokens without signal
    log_ratio = torch.tensor(LOG_RATIOS)[torch.randint(0, len(LOG_RATIOS), (B, T), generator=g)]
    return mask.to(device), targets.to(device), advantages.to(device), log_ratio.to(device)


def make_loss_fn(mask, old_logprobs, advantages, **settings):
    """policy_loss of the masked tokens' log-probs [N] (in their dtype: float64 for the reference)."""
    return lambda flat: policy_loss(scatter(mask, flat), old_logprobs, advantages, mask, **settings)[0]


def head(hidden, weight, targets, dtype):
    """log p of targets from logits computed in `dtype` (float64: the reference; the weight's 16-bit dtype: the
    plain head that the 2x rule measures against), log_softmax in at least fp32."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    logp_all = torch.log_softmax(logits.to(torch.promote_types(dtype, torch.float32)), dim=-1)
    return logp_all.gather(1, targets.long()[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


def grads_of(loss_fn, hidden, weight, targets, dtype):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp, entropy = head(h, w, targets, dtype)
    loss = loss_fn(logp)
    return (loss.detach(), logp.detach(), entropy.detach(), *torch.autograd.grad(loss, [h, w]))


def natural_scales(loss_fn, logp, hidden, weight):
    """Sizes of the gradients' terms, the scale of fp32 rounding (a gradient itself may cancel to near 0, e.g.
    onehot - p of a certain token): d hidden_n = g_n (w_t - sum_v p_v w_v), d weight_v = sum_n g_n (...) h_n,
    with g = d loss / d logp."""
    x = logp.detach().clone().requires_grad_()
    g = torch.autograd.grad(loss_fn(x), x)[0].abs()
    return (2 * g.max() * weight.detach().abs().max()).item(), (2 * g.sum() * hidden.detach().abs().max()).item()


def weights(N, H, V, h_dtype, w_dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1000)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=h_dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5 * 3).to(device=device, dtype=w_dtype)
    return hidden.requires_grad_(), weight.requires_grad_()


def check_against_float64(backend, B, T, H, V, h_dtype, w_dtype, seed, chunk_rows, settings,
                          per_token_advantages=False, logits_gemm=None):
    mask, targets, advantages, log_ratio = policy_problem(B, T, V, seed, per_token_advantages)
    N = int(mask.sum())
    hidden, weight = weights(N, H, V, h_dtype, w_dtype, seed)
    ref_logp, _ = head(hidden.detach(), weight.detach(), targets, torch.float64)
    # Off the mask the old log-probs hold NaN: policy_loss must keep them out.
    old = torch.where(mask, scatter(mask, ref_logp).float() - log_ratio, float("nan"))
    loss_fn = make_loss_fn(mask, old, advantages, **settings)
    ref_loss, ref_logp, ref_entropy, ref_dh, ref_dw = grads_of(loss_fn, hidden, weight, targets, torch.float64)
    with nan_filled_outputs():
        loss, logp, entropy = fused_head_loss(hidden, weight, targets, loss_fn, return_entropy=True, backend=backend,
                                              chunk_rows=chunk_rows, logits_gemm=logits_gemm)
        dh, dw = torch.autograd.grad(loss, [hidden, weight])
    assert loss.dtype == logp.dtype == entropy.dtype == torch.float32 and loss.dim() == 0
    assert not logp.requires_grad and not entropy.requires_grad
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    # fp32 rounding at the logits' size (a near-certain row's entropy cancels down from it).
    z_max = (hidden.detach().double() @ weight.detach().double().T).abs().max().item() if N else 0.0
    for name, out, ref in (("logp", logp, ref_logp), ("entropy", entropy, ref_entropy)):
        assert not torch.isnan(out).any() and out.shape == ref.shape, name
        assert max_err(out, ref) <= 2e-6 * max(1.0, H ** 0.5) * max(1.0, z_max), name
    # policy_loss computes in fp32 whatever its input: compare at the reference's scale of per-token terms.
    scale = (ref_logp.abs().max().item() + 1) * (advantages.abs().max().item() + 1) * 2
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * scale, (loss.item(), ref_loss.item())
    if w_dtype == torch.float32:
        scale_h, scale_w = natural_scales(loss_fn, ref_logp, hidden, weight)
        assert max_err(dh, ref_dh) <= 2e-5 * max(scale_h, ref_dh.abs().max().item()), "d hidden"
        assert max_err(dw, ref_dw) <= 2e-5 * max(scale_w, ref_dw.abs().max().item()), "d weight"
    else:
        # d logits rounded to the weight's dtype once, as in the plain 16-bit head; d weight once per chunk.
        _, _, _, base_dh, base_dw = grads_of(loss_fn, hidden, weight, targets, w_dtype)
        chunks = math.ceil(N / (chunk_rows or N))
        # The floor of the weight's dtype, also for an fp32 d hidden: its operand d logits has that precision.
        assert_within_2x("d hidden", dh, ref_dh, base_dh, atol=ATOL[w_dtype])
        assert_within_2x("d weight", dw, ref_dw, base_dw, factor=2 * max(1.0, math.sqrt(chunks / 2)))


SETTINGS = [dict(method=m, normalization=n) for m in METHODS if m != "grpo"
            for n in ("token", "sequence", "sample_and_token")] + [dict(method="grpo")]


@pytest.mark.parametrize("backend, logits_gemm", MODES, ids=MODE_IDS)
@given(dtypes=st.sampled_from(CPU_DTYPES if DEVICE.type == "cpu" else GPU_DTYPES),
       settings=st.sampled_from(SETTINGS), eps_low=st.sampled_from([None, 0.2]),
       eps_high=st.sampled_from([None, 0.28]), counts=st.booleans(), per_token_advantages=st.booleans(),
       B=st.integers(1, 4), T=st.integers(1, 9), H=st.sampled_from([1, 8, 17, 40]), V=st.integers(1, 130),
       chunk_rows=st.sampled_from([None, 1, 3, 7]), seed=st.integers(0, 99))
def test_loss_and_gradients_against_float64(backend, logits_gemm, dtypes, settings, eps_low, eps_high, counts,
                                            per_token_advantages, B, T, H, V, chunk_rows, seed):
    require_backend(backend, NAMES)
    assume(logits_gemm != "cublas" or dtypes[0] == dtypes[1] != torch.float32)
    # counts: the mini-batch's global token / sequence counts (a trainer's micro-batches), not this call's.
    settings = dict(settings, eps_low=eps_low, eps_high=eps_high,
                    **(dict(num_tokens=B * T + 3, num_sequences=B + 2) if counts else {}))
    check_against_float64(backend, B, T, H, V, *dtypes, seed, chunk_rows, settings, per_token_advantages,
                          logits_gemm)


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(s.values()))
def test_every_method_and_normalization(backend, settings):
    """Every policy_loss setting at one fixed problem over four chunks (the property test draws some)."""
    require_backend(backend, NAMES)
    check_against_float64(backend, 4, 8, 16, 97, torch.float32, torch.float32, 7, 5,
                          dict(settings, eps_low=0.2, eps_high=0.28), per_token_advantages=True)


@pytest.mark.parametrize("backend", NAMES)
def test_equals_the_two_pass_path(backend):
    """fused_logprobs, then policy_loss, then backward: the same log-probs, loss and gradients."""
    require_backend(backend, NAMES)
    mask, targets, advantages, log_ratio = policy_problem(3, 11, 120, 3, False)
    hidden, weight = weights(int(mask.sum()), 24, 120, torch.float32, torch.float32, 3)
    old = torch.where(mask, -4.0 - log_ratio, 0.0)
    loss_fn = make_loss_fn(mask, old, advantages, method="cispo", eps_high=0.28)
    loss, logp, entropy = fused_head_loss(hidden, weight, targets, loss_fn, return_entropy=True, backend=backend,
                                          chunk_rows=4)
    grads = torch.autograd.grad(loss, [hidden, weight])
    logp2, entropy2 = fused_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    loss2 = loss_fn(logp2)
    grads2 = torch.autograd.grad(loss2, [hidden, weight])
    for name, a, b in [("logp", logp, logp2), ("entropy", entropy, entropy2), ("loss", loss, loss2),
                       ("d hidden", *[g[0] for g in (grads, grads2)]), ("d weight", *[g[1] for g in (grads, grads2)])]:
        # fp32 sums in different orders (the GPU's matmuls and reductions): a few ulps of the largest value
        assert max_err(a, b) <= 4e-6 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("backend", NAMES)
def test_no_grad_frozen_weight_and_backward_scaling(backend):
    require_backend(backend, NAMES)
    mask, targets, advantages, _ = policy_problem(2, 6, 50, 4, False)
    hidden, weight = weights(int(mask.sum()), 8, 50, torch.float32, torch.float32, 4)
    loss_fn = make_loss_fn(mask, torch.full(mask.shape, -3.0, device=DEVICE), advantages)
    loss, logp, entropy = fused_head_loss(hidden, weight, targets, loss_fn, backend=backend, chunk_rows=3)
    assert entropy is None
    with torch.no_grad():
        loss_ng, logp_ng, _ = fused_head_loss(hidden, weight, targets, loss_fn, backend=backend, chunk_rows=3)
    assert not loss_ng.requires_grad and torch.equal(loss_ng, loss.detach()) and torch.equal(logp_ng, logp)
    # The backward multiplies by the incoming gradient, and hands its gradients out once.
    (loss * 3).backward(retain_graph=True)
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    hidden.grad = weight.grad = None
    (dh1, dw1) = torch.autograd.grad(fused_head_loss(hidden, weight, targets, loss_fn, backend=backend)[0],
                                     [hidden, weight])
    torch.testing.assert_close(dh, 3 * dh1)
    torch.testing.assert_close(dw, 3 * dw1)
    # A frozen weight: d hidden only, the same.
    (dh_only,) = torch.autograd.grad(fused_head_loss(hidden, weight.detach(), targets, loss_fn, backend=backend)[0],
                                     hidden)
    torch.testing.assert_close(dh_only, dh1)


def test_no_tokens():
    hidden, weight = weights(0, 8, 20, torch.float32, torch.float32, 0)
    targets = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss, logp, _ = fused_head_loss(hidden, weight, targets, lambda lp: lp.sum())
    dh, dw = torch.autograd.grad(loss, [hidden, weight], allow_unused=True)
    assert loss.item() == 0.0 and logp.shape == (0,) and dh.shape == (0, 8) and not dw.any()


def test_trainer_update_equals_the_two_pass_path(tmp_path):
    """The trainer's one-pass update (Trainer._head_loss) gives the loss and parameter gradients of the model's
    forward, fused_logprobs and policy_loss."""
    trainer = Trainer(TrainerConfig(model_overrides=dict(vocab_size=48), max_num_seqs=4, max_model_len=32,
                                    out_dir=str(tmp_path / "run"), progress=False, resume=False, device="cpu",
                                    method="ppo", eps_low=0.2, eps_high=0.28, normalization="sample_and_token"),
                      task=make_task("reverse"))
    group = Group([1, 15, 16, 3], [[16, 15, 2], [15, 2], [16, 16, 16, 2]], [[-1.0] * 3, [-1.5] * 2, [-3.0] * 4],
                  ["stop"] * 3, [1.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    batch = make_batch(trainer._samples([group]), trainer.device)
    args = (batch.old_logprobs, batch.advantages, batch.mask)
    kw = dict(method="ppo", eps_low=0.2, eps_high=0.28, normalization="sample_and_token", num_tokens=12,
              num_sequences=5)
    params = list(trainer.model.parameters())
    results = []
    for one_pass in (True, False):
        if one_pass:
            loss, lp, _ = trainer._head_loss(batch, args, kw)
        else:
            lp, _ = trainer.sequence_logprobs(batch)
            loss = policy_loss(lp, *args, **kw)[0]
        results.append((loss.detach(), lp.detach(), torch.autograd.grad(loss, params, allow_unused=True)))
    (loss1, lp1, g1), (loss2, lp2, g2) = results
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp1, lp2, rtol=1e-6, atol=1e-6)
    assert g1[[p is trainer.model.lm_head.weight for p in params].index(True)] is not None
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_inputs():
    hidden, weight = weights(4, 8, 10, torch.float32, torch.float32, 0, device="cpu")
    targets = torch.tensor([0, 3, 9, 2])
    ok = lambda lp: lp.sum()  # noqa: E731
    with pytest.raises(ValueError, match="hidden"):
        fused_head_loss(hidden[0], weight, targets, ok)
    with pytest.raises(ValueError, match="weight"):
        fused_head_loss(hidden, weight[:, :4], targets, ok)
    with pytest.raises(ValueError, match="targets"):
        fused_head_loss(hidden, weight, targets[:3], ok)
    with pytest.raises(ValueError, match="targets must lie"):
        fused_head_loss(hidden, weight, torch.full_like(targets, 10), ok)
    with pytest.raises(TypeError, match="hidden must be float32 or the weight's dtype"):
        fused_head_loss(hidden.half(), weight.bfloat16(), targets, ok)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        fused_head_loss(hidden, weight, targets, 3.0)
    with pytest.raises(TypeError, match="loss_fn must return a 0-d tensor"):
        fused_head_loss(hidden, weight, targets, lambda lp: lp)
    with pytest.raises(ValueError, match="loss_fn's value carries no gradient"):
        fused_head_loss(hidden, weight, targets, lambda lp: lp.detach().sum())
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_head_loss(hidden, weight, targets, ok, chunk_rows=0)
    with pytest.raises(TypeError, match="return_entropy"):
        fused_head_loss(hidden, weight, targets, ok, return_entropy=1)
    with pytest.raises(ValueError, match="not a backend"):
        fused_head_loss(hidden, weight, targets, ok, backend="cuda-graph")
    with pytest.raises(ValueError, match="logits_gemm must be None or one of"):
        fused_head_loss(hidden, weight, targets, ok, logits_gemm="cutlass")
    with pytest.raises(ValueError, match="logits_gemm='triton' applies to the triton backend"):
        fused_head_loss(hidden, weight, targets, ok, backend="torch", logits_gemm="triton")
    if backend_error("triton", hidden.device) is None:
        with pytest.raises(ValueError, match="logits_gemm='cublas' needs a 16-bit hidden"):
            fused_head_loss(hidden, weight, targets, ok, backend="triton", logits_gemm="cublas")


# ------------------------------------------------------------------------------------------------------
# GPU: bf16

def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("h_dtype, logits_gemm", [(torch.bfloat16, "triton"), (torch.float32, "triton"),
                                                  (torch.bfloat16, "cublas")],
                         ids=["bf16-hidden", "fp32-hidden", "bf16-hidden-cublas"])
def test_gpu_bf16_medium_against_float64_and_the_two_pass_path(h_dtype, logits_gemm):
    """2048 tokens, hidden 1024, vocabulary 32003, a bf16 weight, CISPO over 4 chunks: log-probs within 1e-5 of
    float64 and of fused_logprobs's (cuBLAS's logits: 5e-5); gradients within 2x of the bf16 head's error,
    d hidden within 2x of the two-pass path's error (cuBLAS's one tensor-core accumulator over the vocabulary
    against Triton's tiles: 1.56x measured on the H200, session 10), d weight within sqrt(chunks) of its error
    (one rounding per gradient block at most)."""
    N, H, V, chunk = 2048, 1024, 32003, 512
    mask = torch.ones(8, N // 8, dtype=torch.bool, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[0], targets[-1] = 0, V - 1
    advantages = torch.randn(8, generator=g).to(DEVICE)
    hidden, weight = weights(N, H, V, h_dtype, torch.bfloat16, 0)
    ref_logp, _ = head(hidden.detach(), weight.detach(), targets, torch.float64)
    log_ratio = torch.tensor(LOG_RATIOS)[torch.randint(0, len(LOG_RATIOS), (N,), generator=g)].to(DEVICE)
    loss_fn = make_loss_fn(mask, scatter(mask, (ref_logp - log_ratio).float()), advantages, method="cispo",
                           eps_high=0.28)
    ref_loss, ref_logp, _, ref_dh, ref_dw = grads_of(loss_fn, hidden, weight, targets, torch.float64)
    loss, logp, _ = fused_head_loss(hidden, weight, targets, loss_fn, chunk_rows=chunk, logits_gemm=logits_gemm)
    dh, dw = torch.autograd.grad(loss, [hidden, weight])
    logp2 = fused_logprobs(hidden, weight, targets)
    dh2, dw2 = torch.autograd.grad(loss_fn(logp2), [hidden, weight])
    tol = 1e-5 if logits_gemm == "triton" else 5e-5
    assert max_err(logp, ref_logp) <= tol and max_err(logp, logp2) <= tol
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    _, _, _, base_dh, base_dw = grads_of(loss_fn, hidden, weight, targets, torch.bfloat16)
    assert_within_2x("d hidden", dh, ref_dh, base_dh, atol=ATOL[torch.bfloat16])
    assert_within_2x("d weight", dw, ref_dw, base_dw)
    assert rel_err(dh, ref_dh) <= 2 * rel_err(dh2, ref_dh) + 1e-6
    assert rel_err(dw, ref_dw) <= math.sqrt(N / chunk) * rel_err(dw2, ref_dw) + 1e-6


@pytest.mark.gpu
@pytest.mark.xdist_group("large_memory")
@pytest.mark.parametrize("logits_gemm", ["triton", "cublas"])
def test_gpu_real_shape_error_and_memory(logits_gemm):
    """8192 tokens, hidden 6144, vocabulary 200064, bf16, a CISPO loss: log-prob error at most 1e-4 against
    float64 on 256 rows, finite gradients, and at most 1 GiB (plus 64 MiB of small buffers) allocated beyond the
    inputs and the two gradients."""
    from m1_kernels.bench.cases_trainer import logprobs_fp64
    N, H, V = 8192, 6144, 200064
    hidden, weight = weights(N, H, V, torch.bfloat16, torch.bfloat16, 0)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    mask = torch.ones(1, N, dtype=torch.bool, device=DEVICE)
    advantages = torch.randn(1, N, device=DEVICE)
    loss_fn = make_loss_fn(mask, torch.full((1, N), -12.0, device=DEVICE), advantages, method="cispo")
    torch.autograd.grad(fused_head_loss(hidden, weight, targets, loss_fn, logits_gemm=logits_gemm)[0],
                        [hidden, weight])
    # (a first call: its autotuning's trial buffers are not the steady state measured below)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, logp, _ = fused_head_loss(hidden, weight, targets, loss_fn, logits_gemm=logits_gemm)
    dh, dw = torch.autograd.grad(loss, [hidden, weight])
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - dh.numel() * 2 - dw.numel() * 2
    assert extra <= (1 << 30) + (64 << 20), f"{extra / 2**30:.2f} GiB beyond inputs and gradients"
    rows = torch.arange(0, N, N // 256, device=DEVICE)
    ref_logp, _ = logprobs_fp64(hidden.detach(), weight.detach(), targets, rows)
    assert max_err(logp[rows], ref_logp) <= 1e-4
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
