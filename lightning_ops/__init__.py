"""Lightning attention: blockwise prefill (forward/backward), varlen, slot-cached decode, the M1 layer."""

from .layer import LightningAttention
from .ops import lightning_attn, lightning_attn_decode
from .slopes import slopes

__all__ = ["LightningAttention", "lightning_attn", "lightning_attn_decode", "slopes"]
