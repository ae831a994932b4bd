"""Metrics of the RL loop: the train-versus-rollout log-prob agreement, the JSONL log and its plots."""

import json
import math
import os

import torch


def logprob_agreement(train_logprobs, rollout_logprobs) -> dict:
    """How well two computations of the same tokens' log-probs agree (1-D tensors over the same tokens):
    max and mean |difference| and the Pearson correlation of the probabilities exp(log p) (the M1 report's
    Fig. 3 measure; 1.0 when both are constant and equal, NaN when only one is constant)."""
    a = train_logprobs.detach().double().flatten()
    b = rollout_logprobs.detach().double().flatten()
    if a.numel() == 0:
        return {"logprob_abs_diff_max": 0.0, "logprob_abs_diff_mean": 0.0, "prob_pearson": 1.0}
    diff = (a - b).abs()
    pa, pb = a.exp() - a.exp().mean(), b.exp() - b.exp().mean()
    denom = (pa.square().sum() * pb.square().sum()).sqrt().item()
    if denom > 0:
        pearson = (pa * pb).sum().item() / denom
    else:
        pearson = 1.0 if torch.equal(a, b) else math.nan
    return {"logprob_abs_diff_max": diff.max().item(), "logprob_abs_diff_mean": diff.mean().item(),
            "prob_pearson": pearson}


class MetricsLog:
    """Appends one JSON object per line to `path` (flushed per record, so a killed run keeps its steps)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, step: int):
        """Drop records of steps >= `step` (a resumed run rewrites them)."""
        if not os.path.exists(self.path):
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", -1) < step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r, allow_nan=True) + "\n" for r in kept)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# (title, [(key, label), ...]) per panel
PANELS = [
    ("reward", [("reward_mean", "mean"), ("reward_std", "std over samples")]),
    ("response length (tokens)", [("response_length_mean", "mean"), ("response_length_max", "max")]),
    ("tokens clipped / differing", [("clipped_fraction", "ratio clipped"),
                                    ("cispo_ppo_differ_fraction", "CISPO vs PPO-clip gradient differs"),
                                    ("ppo_masked_fraction", "PPO-clip drops")]),
    ("entropy (nats per token)", [("entropy_mean", "entropy")]),
    ("gradient norm", [("grad_norm", "mean over updates"), ("grad_norm_max", "max")]),
    ("train vs engine |d log p|", [("engine_logprob_abs_diff_max", "max"),
                                   ("engine_logprob_abs_diff_mean", "mean")]),
    ("train vs engine prob. correlation", [("engine_prob_pearson", "Pearson")]),
    ("groups kept (dynamic sampling)", [("groups_kept_fraction", "first round")]),
]


def plot_metrics(records, path, title=None) -> str | None:
    """A grid of the PANELS over steps; returns the path (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if isinstance(records, (str, os.PathLike)):
        records = read_jsonl(records)
    cols = 4
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, (panel, series) in zip(axes.flat, PANELS):
        drawn = 0
        for key, label in series:
            ys = [r.get(key, math.nan) for r in records]
            ys = [math.nan if y is None else y for y in ys]
            if any(not math.isnan(y) for y in ys):
                ax.plot(steps, ys, label=label, lw=1.2)
                drawn += 1
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(series) > 1 and drawn:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
