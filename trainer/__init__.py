"""The CISPO trainer (docs/trainer.md): the policy-loss family, fp32-accurate fused log-probs, group advantages,
and the RL loop on the engine (`python -m m1_kernels.trainer --config FILE`).

`policy_loss`, `group_advantages` and `fused_logprobs` import without the model; the loop's names import it
on first use.
"""

from .logprobs import fused_logprobs
from .loss import group_advantages, overlong_penalty, policy_loss

__all__ = ["policy_loss", "group_advantages", "overlong_penalty", "fused_logprobs"]
