"""lightning_ops.LightningAttention: the MiniMax-M1 linear-attention layer on top of the lightning ops.

    qkv = silu(qkv_proj(x)) viewed [B, T, H, 3D], split per head into q | k | v
    o = lightning_attn(q, k, v, slopes)            (or one decode step on a slot cache)
    out = out_proj(sigmoid(output_gate(x)) * RMSNorm_{H*D}(o))

Parameter names and shapes are those of transformers' MiniMaxLightningAttention (qkv_proj, output_gate,
out_proj, norm.weight). Its derived buffers (slope_rate, query_decay, key_decay, diagonal_decay) are not
part of ours (m1_kernels.model knows transformers' names: its `without_derived_buffers` drops them from a
transformers state dict, its `HFLightningAttention.from_hf` shares a transformers layer's weights); the
decay rates are recomputed by `lightning_ops.slopes` (the release's formula; transformers divides by
num_layers - 1 + 1e-5 instead of num_layers - 1, a relative difference of about 1e-5 / (num_layers - 1)
except near the last layer).
"""

import torch
import torch.nn.functional as F
from torch import nn

from m1_kernels.norm import RMSNorm
from m1_kernels.validate import check_tensor

from .ops import lightning_attn, lightning_attn_decode, lightning_attn_with_cache
from .slopes import slopes


class LightningAttention(nn.Module):
    """The M1 lightning-attention layer: forward(hidden_states [B, T, hidden]) -> [B, T, hidden].

    Args:
        hidden_size, num_heads (H), head_dim (D): the layer's shape.
        layer_idx, num_layers: position among all layers (sets the decay rates, see `slopes`).
        norm_eps: epsilon of the RMSNorm over H * D.
        backend: kernel backend of the lightning ops ("cuda", "triton", "torch" or None for the default).
    """

    def __init__(self, hidden_size, num_heads, head_dim, layer_idx, num_layers, norm_eps=1e-6, backend=None,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.layer_idx, self.num_layers, self.backend = layer_idx, num_layers, backend
        inner = num_heads * head_dim
        factory = dict(device=device, dtype=dtype)
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False, **factory)
        self.output_gate = nn.Linear(hidden_size, inner, bias=False, **factory)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False, **factory)
        self.norm = RMSNorm(inner, norm_eps, **factory)
        # Derived, not a checkpoint entry; kept fp32 (the ops take fp32 rates) whatever the weights' dtype.
        self.register_buffer("slope", slopes(num_heads, layer_idx, num_layers, device=device), persistent=False)

    def forward(self, hidden_states, state=None, slot_idx=None, cu_seqlens=None):
        """
        Args:
            hidden_states: [B, T, hidden].
            state: optional fp32 slot cache [S, H, D, D], updated in place (inference: no backward):
                prefill starts each sequence from its slot and writes the final state back
                (lightning_attn_with_cache); with T == 1 and no cu_seqlens, one decode step
                (lightning_attn_decode).
            slot_idx: [B] int32 distinct slot of each row, or of each packed sequence with cu_seqlens
                (default arange); negative = padding (zero output, state untouched).
            cu_seqlens: [N + 1] boundaries of sequences packed along T (B == 1).
        Returns:
            [B, T, hidden] in the dtype of hidden_states.
        """
        check_tensor("hidden_states", hidden_states, ndim=3)
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [B, T, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        B, T, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        # The projections see 2-D rows: a decode step's [B, 1, hidden] may arrive as a transposed [1, B, hidden]
        # (strides (hidden, B * hidden, 1)), which torch's matmul runs as B matrix-vector products, each
        # reading the whole weight (bench/NOTES.md, session 8: 33 of a 38 ms step at B = 64).
        x = hidden_states.reshape(B * T, self.hidden_size)
        qkv = F.silu(self.qkv_proj(x)).view(B, T, H, 3 * D)
        q, k, v = qkv.split(D, dim=-1)
        slope = self.slope.float()
        if state is not None and slot_idx is None:
            rows = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
            slot_idx = torch.arange(rows, dtype=torch.int32, device=hidden_states.device)
        if state is None:
            o, _ = lightning_attn(q, k, v, slope, cu_seqlens=cu_seqlens, backend=self.backend)
        elif T == 1 and cu_seqlens is None:
            o = lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], slope, state, slot_idx=slot_idx,
                                      backend=self.backend)[:, None]
        else:
            o = lightning_attn_with_cache(q, k, v, slope, state, slot_idx, cu_seqlens=cu_seqlens,
                                          backend=self.backend)
        o = self.norm(o.reshape(B * T, H * D))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * o).view(B, T, self.hidden_size)
