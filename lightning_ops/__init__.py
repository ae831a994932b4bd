"""Lightning attention: blockwise prefill (forward/backward), varlen, slot-cache prefill and decode, the M1 layer."""

from .backends import BACKENDS
from .layer import LightningAttention
from .ops import lightning_attn, lightning_attn_decode, lightning_attn_with_cache
from .slopes import slopes

__all__ = ["BACKENDS", "LightningAttention", "lightning_attn", "lightning_attn_decode", "lightning_attn_with_cache",
           "slopes"]
