"""The CISPO trainer (docs/trainer.md): the policy-loss family, fp32-accurate fused log-probs, group advantages,
and the RL loop on the engine (`python -m m1_kernels.trainer --config FILE`).

`policy_loss`, `group_advantages`, `overlong_penalty`, `fused_logprobs` and `fused_head_loss` (the head, log-probs
and a token-separable loss in one pass) import without the model; the loop's names (`Trainer`, `TrainerConfig`,
`make_task`, `supervised_warmup`) import on first use.
"""

from .head_loss import fused_head_loss
from .logprobs import fused_logprobs
from .loss import group_advantages, overlong_penalty, policy_loss

# name -> submodule that defines it, imported on first access
_LAZY = {"Trainer": "loop", "TrainerConfig": "config", "make_task": "tasks", "supervised_warmup": "warmup"}

__all__ = ["policy_loss", "group_advantages", "overlong_penalty", "fused_logprobs", "fused_head_loss", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
