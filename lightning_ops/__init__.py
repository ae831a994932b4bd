"""Lightning attention: blockwise prefill (forward/backward), varlen, slot-cached decode."""

from .ops import lightning_attn, lightning_attn_decode
from .slopes import slopes

__all__ = ["lightning_attn", "lightning_attn_decode", "slopes"]
