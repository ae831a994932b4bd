"""policy_loss, group_advantages, overlong_penalty: worked examples computed by hand (values and the gradients
with respect to the log-probs), micro-batch splitting, bad arguments.

The batch used throughout (two responses, five response tokens; the last column of row 0 and the last two of
row 1 are padding holding junk):

    row 0, A = +1: log p = [-1.0, -0.5, -2.0, pad], ratios r = [1.5, 0.5, 1.0]
    row 1, A = -1: log p = [-0.1, -3.0, pad, pad],  ratios r = [2.0, 0.25]

With eps_low = 0.2, eps_high = 0.28 the clip range is [0.8, 1.28]: r = 1.5 and 2.0 are above it, 0.5 and 0.25
below. PPO-clip drops (zero gradient) r = 1.5 (A > 0, above) and r = 0.25 (A < 0, below); it keeps r = 0.5
(A > 0, below: min picks r A) and r = 2.0 (A < 0, above: min picks r A) with the unclipped weight r, where
CISPO uses the clipped weight. Gradient of each per-token term with respect to log p (before normalisation):
    CISPO          -r^ A:        row 0: -1.28, -0.8, -1.0   row 1: +1.28, +0.8
    CISPO, no low  (eps_low None) row 0: -1.28, -0.5, -1.0   row 1: +1.28, +0.25
    PPO-clip       -r A or 0:     row 0:  0,    -0.5, -1.0   row 1: +2.0,   0
"""

import math

import pytest
import torch

from m1_kernels.trainer import group_advantages, overlong_penalty, policy_loss

JUNK = float("nan")


def batch():
    logprobs = torch.tensor([[-1.0, -0.5, -2.0, JUNK], [-0.1, -3.0, float("-inf"), JUNK]], dtype=torch.float64)
    log_ratio = torch.tensor([[math.log(1.5), math.log(0.5), 0.0, 0.0], [math.log(2.0), math.log(0.25), 0.0, 0.0]],
                             dtype=torch.float64)
    old = (logprobs - log_ratio).float()
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    adv = torch.tensor([1.0, -1.0])
    return logprobs.float().requires_grad_(), old, adv, mask


def loss_and_grad(**kwargs):
    logprobs, old, adv, mask = batch()
    loss, metrics = policy_loss(logprobs, old, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.item(), grad, metrics


def expect_grad(grad, row0, row1):
    want = torch.tensor([row0 + [0.0] * (4 - len(row0)), row1 + [0.0] * (4 - len(row1))])
    assert not torch.isnan(grad).any(), "NaN leaked from padding into the gradient"
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-6)


def test_cispo_without_lower_bound():
    # Per-token -r^ A log p: row 0: 1.28*-1.0, 0.5*-0.5, 1.0*-2.0 negated -> 1.28 + 0.25 + 2.0; row 1 (A = -1):
    # 1.28*-0.1 + 0.25*-3.0 = -0.878. Sum 2.652 over 5 tokens.
    loss, grad, _ = loss_and_grad(method="cispo", eps_low=None, eps_high=0.28)
    assert loss == pytest.approx(2.652 / 5, abs=1e-6)
    expect_grad(grad, [-1.28 / 5, -0.5 / 5, -1.0 / 5], [1.28 / 5, 0.25 / 5])


def test_cispo_with_lower_bound():
    loss, grad, _ = loss_and_grad(method="cispo", eps_low=0.2, eps_high=0.28)
    # row 0: 1.28 + 0.8*0.5 + 2.0 = 3.68; row 1: 1.28*-0.1 + 0.8*-3.0 = -2.528
    assert loss == pytest.approx((3.68 - 2.528) / 5, abs=1e-6)
    expect_grad(grad, [-1.28 / 5, -0.8 / 5, -1.0 / 5], [1.28 / 5, 0.8 / 5])


def test_cispo_masked_drops_what_ppo_drops():
    loss, grad, _ = loss_and_grad(method="cispo_masked", eps_low=0.2, eps_high=0.28)
    # r = 1.5 (A > 0) and r = 0.25 (A < 0) are masked; the rest keep CISPO's clipped weight.
    assert loss == pytest.approx((0.4 + 2.0 - 0.128) / 5, abs=1e-6)
    expect_grad(grad, [0.0, -0.8 / 5, -1.0 / 5], [1.28 / 5, 0.0])


def test_ppo_clip_higher():
    loss, grad, _ = loss_and_grad(method="ppo", eps_low=0.2, eps_high=0.28)
    # -min(rA, r^A): row 0: -1.28, -0.5, -1.0; row 1: -min(-2.0, -1.28) = 2.0, -min(-0.25, -0.8) = 0.8
    assert loss == pytest.approx((-2.78 + 2.8) / 5, abs=1e-6)
    expect_grad(grad, [0.0, -0.5 / 5, -1.0 / 5], [2.0 / 5, 0.0])


def test_cispo_and_ppo_gradients_differ_exactly_on_clipped_tokens():
    _, g_cispo, metrics = loss_and_grad(method="cispo", eps_low=0.2, eps_high=0.28)
    _, g_ppo, _ = loss_and_grad(method="ppo", eps_low=0.2, eps_high=0.28)
    differ = (g_cispo - g_ppo).abs() > 1e-7
    # Every clipped token differs (1.5, 0.5, 2.0, 0.25); the unclipped r = 1.0 agrees.
    assert differ.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert metrics["cispo_ppo_differ_fraction"].item() == pytest.approx(4 / 5)
    assert metrics["ppo_masked_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["clipped_fraction"].item() == pytest.approx(4 / 5)
    assert metrics["clipped_low_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["clipped_high_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["ratio_mean"].item() == pytest.approx(5.25 / 5, rel=1e-6)
    assert metrics["ratio_min"].item() == pytest.approx(0.25, rel=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(2.0, rel=1e-6)
    assert metrics["tokens"].item() == 5


def test_grpo_normalises_per_sequence():
    loss, grad, _ = loss_and_grad(method="grpo", eps_low=0.2, eps_high=0.28)
    # (1/2) (sum row 0 / 3 + sum row 1 / 2) of the PPO terms
    assert loss == pytest.approx(0.5 * (-2.78 / 3 + 2.8 / 2), abs=1e-6)
    expect_grad(grad, [0.0, -0.5 / 6, -1.0 / 6], [2.0 / 4, 0.0])


def test_reinforce():
    loss, grad, _ = loss_and_grad(method="reinforce")
    # -r A log p: row 0: 1.5 + 0.25 + 2.0; row 1: 2.0*-0.1 + 0.25*-3.0 = -0.95
    assert loss == pytest.approx((3.75 - 0.95) / 5, abs=1e-6)
    expect_grad(grad, [-1.5 / 5, -0.5 / 5, -1.0 / 5], [2.0 / 5, 0.25 / 5])


def test_sample_and_token_is_the_mean_of_both():
    loss, grad, _ = loss_and_grad(method="cispo", eps_low=None, normalization="sample_and_token")
    # token: per-token gradients / 5; sequence: row 0 / (2*3), row 1 / (2*2); the mean of the two
    g0 = [-1.28, -0.5, -1.0]
    g1 = [1.28, 0.25]
    expect_grad(grad, [0.5 * g / 5 + 0.5 * g / 6 for g in g0], [0.5 * g / 5 + 0.5 * g / 4 for g in g1])
    assert loss == pytest.approx(0.5 * 2.652 / 5 + 0.5 * (3.53 / 6 + -0.878 / 4), abs=1e-6)


def test_token_advantages_equal_sequence_advantages():
    logprobs, old, adv, mask = batch()
    a, _ = policy_loss(logprobs, old, adv, mask)
    b, _ = policy_loss(logprobs, old, adv[:, None].expand(2, 4).clone(), mask)
    assert a.item() == b.item()


@pytest.mark.parametrize("method", ["cispo", "ppo", "reinforce"])
def test_micro_batches_with_the_global_count_sum_to_the_batch(method):
    logprobs, old, adv, mask = batch()
    full, _ = policy_loss(logprobs, old, adv, mask, method=method, eps_low=0.2)
    (g_full,) = torch.autograd.grad(full, logprobs)
    parts = [policy_loss(logprobs[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], method=method, eps_low=0.2,
                         num_tokens=5)[0] for i in range(2)]
    (g_parts,) = torch.autograd.grad(parts[0] + parts[1], logprobs)
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-7)
    torch.testing.assert_close(g_parts, g_full)


def test_grpo_micro_batches_with_the_global_sequence_count():
    logprobs, old, adv, mask = batch()
    full, _ = policy_loss(logprobs, old, adv, mask, method="grpo", eps_low=0.2)
    parts = sum(policy_loss(logprobs[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], method="grpo",
                            eps_low=0.2, num_sequences=2)[0] for i in range(2))
    assert parts.item() == pytest.approx(full.item(), abs=1e-7)


def test_an_empty_mask_gives_zero_loss_and_gradient():
    logprobs, old, adv, mask = batch()
    loss, metrics = policy_loss(logprobs, old, adv, torch.zeros_like(mask))
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == 0.0 and (grad == 0).all() and metrics["tokens"].item() == 0


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    sample = group_advantages(rewards, std="sample")
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: all equal -> 0; group 2: mean 2, std sqrt(2/3)
    s0, s2 = 0.5 / math.sqrt(1 / 3), 1 / math.sqrt(2 / 3)
    torch.testing.assert_close(sample, torch.tensor([[s0, -s0, -s0, s0], [0.0] * 4, [s2, -s2, 0.0, 0.0]]))
    population = group_advantages(rewards, std="population")
    p2 = 1 / math.sqrt(0.5)
    torch.testing.assert_close(population, torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0] * 4, [p2, -p2, 0.0, 0.0]]))
    torch.testing.assert_close(group_advantages(rewards, std=None),
                               torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [1.0, -1.0, 0.0, 0.0]]))


def test_overlong_penalty_by_hand():
    got = overlong_penalty([3, 6, 8, 10, 12], max_tokens=10, buffer=4, factor=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="dpo"), ValueError, "method"),
    (dict(method="grpo", normalization="token"), ValueError, "grpo"),
    (dict(normalization="mean"), ValueError, "normalization"),
    (dict(eps_low=1.0), ValueError, "eps_low"),
    (dict(eps_high=-0.1), ValueError, "eps_high"),
    (dict(num_tokens=0), ValueError, "num_tokens"),
    (dict(num_sequences=-2), ValueError, "num_sequences"),
])
def test_bad_arguments(kwargs, error, match):
    logprobs, old, adv, mask = batch()
    with pytest.raises(error, match=match):
        policy_loss(logprobs, old, adv, mask, **kwargs)


def test_bad_tensors():
    logprobs, old, adv, mask = batch()
    with pytest.raises(TypeError, match="mask"):
        policy_loss(logprobs, old, adv, mask.float())
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(logprobs, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logprobs, old, adv[:1], mask)
    with pytest.raises(ValueError, match="logprobs"):
        policy_loss(logprobs[0], old, adv, mask)
    with pytest.raises(ValueError, match="std='sample'"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.ones(3, 2), std="unbiased")
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty([1], max_tokens=4, buffer=5)


def _data_parallel_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    from m1_kernels.trainer.loss import global_count
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    logprobs, old, adv, mask = batch()
    rows = slice(rank, rank + 1)            # rank r holds response r
    n_tokens = global_count(mask[rows].sum().item())
    loss, _ = policy_loss(logprobs[rows], old[rows], adv[rows], mask[rows], method="cispo", num_tokens=n_tokens)
    (grad,) = torch.autograd.grad(loss * world, logprobs)   # the trainer's loss scale
    dist.all_reduce(grad)
    grad /= world                           # what DDP / FSDP2 reduction does: the mean over ranks
    torch.save({"tokens": n_tokens, "grad": grad}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_data_parallel_counts_give_the_single_process_gradient(tmp_path):
    """Two gloo ranks with one response each: token counts summed over ranks, the loss scaled by the world
    size and the gradients averaged give the gradient of one process holding both responses."""
    import torch.multiprocessing as mp
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    logprobs, old, adv, mask = batch()
    loss, _ = policy_loss(logprobs, old, adv, mask, method="cispo")
    (want,) = torch.autograd.grad(loss, logprobs)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got["tokens"] == 5
        torch.testing.assert_close(got["grad"], want)
