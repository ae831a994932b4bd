"""A short supervised warm-up on a task's correct answers (cross-entropy on the answer tokens only, through
the same fused log-probs as RL), so that RL starts from a policy that knows the format and is right some of
the time.
"""

import random

import torch

from .loop import Sample, make_batch, token_logprobs


def supervised_warmup(model, task, *, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                      backend=None, stop=None) -> list:
    """Up to `steps` AdamW steps (betas (0.9, 0.95)) of mean answer-token cross-entropy on fresh task samples;
    returns the losses. `stop(step, loss)` is called after every step when given; True ends the warm-up."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = model.lm_head.weight.device
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        pairs = [task.sample(rng) for _ in range(batch_size)]
        batch = make_batch([Sample(p, a, [0.0] * len(a), 0.0) for p, a in pairs], device)
        lp, _ = token_logprobs(model, batch.input_ids, batch.targets, batch.mask, backend=backend)
        loss = -lp.sum() / batch.mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if stop is not None and stop(step, losses[-1]):
            break
    return losses
