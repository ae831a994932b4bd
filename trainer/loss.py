"""The policy-gradient loss family of the MiniMax-M1 report (CISPO) and its peers, as settings of one function.

Per response token (r = exp(logprobs - old_logprobs), r^ = clip(r, 1 - eps_low, 1 + eps_high), A the advantage,
sg = stop-gradient):

    "cispo"         -sg(r^) * A * logprobs                 every token keeps a gradient, its weight is clipped
    "cispo_masked"  -sg(r^) * A * logprobs * M             the report's unified form: M is PPO's trust-region mask,
                                                           0 where (A > 0 and r > 1 + eps_high) or
                                                           (A < 0 and r < 1 - eps_low), else 1
    "ppo"           -min(r * A, r^ * A)                    PPO-clip; with eps_high > eps_low and token normalisation
                                                           this is DAPO's clip-higher
    "grpo"          the "ppo" term, normalised per sequence (GRPO)
    "reinforce"     -sg(r) * A * logprobs                  importance-weighted REINFORCE, no clipping

`eps_low=None` (or `eps_high=None`) means no bound on that side, for every method: the report's CISPO runs with
no lower bound and tunes only eps_high. DAPO is method="ppo", eps_low=0.2, eps_high=0.28.

Normalisation (`normalization=`) turns the per-token terms l[i, t] into one number:

    "token"            sum_{i,t} l / num_tokens                            the report's J, DAPO (default)
    "sequence"         (1 / num_sequences) sum_i (1/|o_i|) sum_t l         GRPO (each response weighs the same)
    "sample_and_token" the mean of the two above                           our reading of the report's section 5
                                                                           "combination of sample-level loss and
                                                                           token-level normalisation" (it gives no
                                                                           formula): long responses keep part of
                                                                           their token weight, but no longer all of it

num_tokens / num_sequences default to this call's counts; a trainer that splits a batch into micro-batches or
ranks passes the counts of the whole batch over all ranks, so that the summed gradients equal one big batch's
(see `global_count`).
"""

import torch
import torch.distributed as dist

from m1_kernels.validate import check_tensor

METHODS = ("cispo", "cispo_masked", "ppo", "grpo", "reinforce")
NORMALIZATIONS = ("token", "sequence", "sample_and_token")
ADVANTAGE_STD = ("sample", "population", None)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_eps(name, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be None or a number >= 0, got {value!r}")


def _check_count(name, value):
    if value is None:
        return
    v = value.item() if isinstance(value, torch.Tensor) else value
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name} must be a positive count (or None for this call's count), got {value!r}")


def policy_loss(logprobs, old_logprobs, advantages, mask, *, method: str = "cispo", eps_low: float | None = None,
                eps_high: float | None = 0.28, normalization: str | None = None, num_tokens=None, num_sequences=None):
    """The loss of one (micro-)batch of responses and metrics about its tokens.

    Args:
        logprobs: [B, T] log-probabilities of the chosen tokens under the policy being trained (differentiable).
        old_logprobs: [B, T] log-probabilities under the policy that sampled them (no gradient flows into them).
        advantages: [B] (one per response) or [B, T] (per token).
        mask: [B, T] bool, True on response tokens; other positions may hold anything (even inf or NaN).
        method: "cispo", "cispo_masked", "ppo", "grpo" or "reinforce" (see the module docstring).
        eps_low, eps_high: the clip range [1 - eps_low, 1 + eps_high] of the ratio; None = unbounded side.
        normalization: "token", "sequence" or "sample_and_token"; None picks "sequence" for "grpo" and "token"
            otherwise. "grpo" is "ppo" with "sequence": it takes no other normalisation.
        num_tokens: the response-token count that "token" divides by (default: mask.sum()).
        num_sequences: the response count that "sequence" divides by (default: rows with a response token).

    Returns:
        (loss, metrics): loss is a 0-d fp32 tensor; metrics maps names to 0-d tensors (no host sync), measured
        over this call's response tokens: "clipped_fraction" (ratio outside the clip range, split into
        "clipped_low_fraction" / "clipped_high_fraction"), "ppo_masked_fraction" (tokens PPO-clip drops: its
        gradient is zero there while CISPO's is not), "cispo_ppo_differ_fraction" (tokens whose gradient with
        respect to the log-prob differs between CISPO and PPO-clip: A != 0 and the ratio outside the clip range),
        "ratio_mean", "ratio_min", "ratio_max", "tokens".
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if normalization is None:
        normalization = "sequence" if method == "grpo" else "token"
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if method == "grpo" and normalization != "sequence":
        raise ValueError(f"method='grpo' is 'ppo' with normalization='sequence'; for normalization="
                         f"{normalization!r} use method='ppo'")
    _check_eps("eps_low", eps_low)
    _check_eps("eps_high", eps_high)
    if eps_low is not None and eps_low >= 1:
        raise ValueError(f"eps_low must be < 1 (the lower clip bound 1 - eps_low must stay positive), got {eps_low}")
    _check_count("num_tokens", num_tokens)
    _check_count("num_sequences", num_sequences)
    check_tensor("logprobs", logprobs, ndim=2, dtypes=_FLOATS)
    device = logprobs.device
    check_tensor("old_logprobs", old_logprobs, ndim=2, dtypes=_FLOATS, device=device)
    check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,), device=device)
    check_tensor("advantages", advantages, dtypes=_FLOATS, device=device)
    shape = tuple(logprobs.shape)
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of logprobs {shape}, got {tuple(t.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        advantages = advantages[:, None]
    elif tuple(advantages.shape) != shape:
        raise ValueError(f"advantages must be [B] = [{shape[0]}] or [B, T] = {list(shape)}, got "
                         f"{list(advantages.shape)}")

    lp = logprobs.float()
    adv = advantages.float().detach().expand(shape)
    # Padding may hold -inf or NaN: keep it out of exp() so that no NaN reaches the gradient through 0 * NaN.
    log_ratio = torch.where(mask, lp - old_logprobs.float().detach(), 0.0)
    ratio = torch.exp(log_ratio)
    lo = None if eps_low is None else 1.0 - eps_low
    hi = None if eps_high is None else 1.0 + eps_high
    clipped = ratio if lo is None and hi is None else ratio.clamp(min=lo, max=hi)
    below = ratio < lo if lo is not None else torch.zeros_like(mask)
    above = ratio > hi if hi is not None else torch.zeros_like(mask)
    ppo_masked = ((adv > 0) & above) | ((adv < 0) & below)
    lp = torch.where(mask, lp, 0.0)

    if method == "cispo":
        per_token = -clipped.detach() * adv * lp
    elif method == "cispo_masked":
        per_token = -clipped.detach() * adv * lp * (~ppo_masked)
    elif method in ("ppo", "grpo"):
        per_token = -torch.minimum(ratio * adv, clipped * adv)
    else:  # reinforce
        per_token = -ratio.detach() * adv * lp
    per_token = torch.where(mask, per_token, 0.0)

    tokens_here = mask.sum()
    loss = per_token.new_zeros(())
    if normalization in ("token", "sample_and_token"):
        count = tokens_here.clamp(min=1) if num_tokens is None else num_tokens
        token_loss = per_token.sum() / count
        loss = token_loss if normalization == "token" else loss + 0.5 * token_loss
    if normalization in ("sequence", "sample_and_token"):
        lengths = mask.sum(dim=1)
        per_sequence = per_token.sum(dim=1) / lengths.clamp(min=1)
        count = (lengths > 0).sum().clamp(min=1) if num_sequences is None else num_sequences
        sequence_loss = per_sequence.sum() / count
        loss = sequence_loss if normalization == "sequence" else loss + 0.5 * sequence_loss

    with torch.no_grad():
        n = tokens_here.clamp(min=1).float()
        outside = (below | above) & mask
        empty = tokens_here == 0          # where-reductions, not ratio[mask]: indexing by a mask waits for the GPU
        metrics = {
            "clipped_fraction": outside.sum() / n,
            "clipped_low_fraction": (below & mask).sum() / n,
            "clipped_high_fraction": (above & mask).sum() / n,
            "ppo_masked_fraction": (ppo_masked & mask).sum() / n,
            # CISPO's gradient in logprobs is -r^ A, PPO-clip's is -r A (or 0 when masked): equal iff A = 0 or r = r^.
            "cispo_ppo_differ_fraction": (outside & (adv != 0)).sum() / n,
            "ratio_mean": torch.where(mask, ratio, 0.0).sum() / n,
            "ratio_min": torch.where(empty, 1.0, torch.where(mask, ratio, float("inf")).amin()),
            "ratio_max": torch.where(empty, 1.0, torch.where(mask, ratio, float("-inf")).amax()),
            "tokens": tokens_here,
        }
    return loss, metrics


def group_advantages(rewards, std: str | None = "sample", eps: float = 0.0):
    """Group-relative advantages (R - mean_group R) / std_group R of rewards [P, G] (P prompts, G samples each).

    std: "sample" (divide by the unbiased std, G - 1 in the denominator, as torch.std), "population" (G), or None
    (no division: Dr. GRPO). A group whose rewards are all equal gets advantage 0 (it carries no signal), never
    0/0. eps is added to the std (0 by default: equal rewards are caught exactly, so no eps is needed).
    Returns fp32 [P, G].
    """
    check_tensor("rewards", rewards, ndim=2, dtypes=_FLOATS)
    if std not in ADVANTAGE_STD:
        raise ValueError(f"std must be one of {ADVANTAGE_STD}, got {std!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    G = rewards.shape[1]
    if std == "sample" and G < 2:
        raise ValueError(f"std='sample' needs at least 2 samples per group, got G={G}")
    r = rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)
    if std is None:
        return centred
    spread = r.std(dim=1, correction=1 if std == "sample" else 0, keepdim=True)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, 0.0, centred / torch.where(flat, 1.0, spread + eps))


def overlong_penalty(lengths, max_tokens: int, buffer: int, factor: float = 1.0):
    """DAPO's soft overlong punishment, added to the reward of each response of `lengths` tokens:
    0 up to max_tokens - buffer, then falling linearly to -factor at max_tokens (and -factor beyond)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 < buffer <= max_tokens:
        raise ValueError(f"buffer must be an integer in [1, max_tokens={max_tokens}], got {buffer!r}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    excess = (lengths - (max_tokens - buffer)).clamp(min=0)
    return -factor * (excess / buffer).clamp(max=1.0)


def global_count(count, group=None):
    """count (a number or 0-d tensor) summed over the ranks of `group` when torch.distributed is initialised,
    else unchanged: the num_tokens / num_sequences of a data-parallel batch."""
    if not (dist.is_available() and dist.is_initialized()):
        return count
    t = torch.as_tensor(count, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    return t.item()
