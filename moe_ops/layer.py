"""moe_ops.SparseMoE: the MiniMax-M1 sparse MoE block on top of fused_moe.

Parameter names and shapes follow transformers' MiniMaxSparseMoeBlock (gate.weight [E, H],
experts.gate_up_proj [E, 2F, H] with gate rows first, experts.down_proj [E, H, F]), so its state dict
loads as is. Checkpoint naming lives in m1_kernels.model: `convert_per_expert_state_dict` turns the original
release's per-expert names (experts.{e}.w1 / w3 / w2.weight) into these, `sparse_moe_from_hf` shares a
transformers block's weights.
"""

import torch
from torch import nn

from .ops import fused_moe


class _Router(nn.Module):
    def __init__(self, hidden_size, num_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))


class _Experts(nn.Module):
    def __init__(self, hidden_size, ffn_size, num_experts):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts: forward(x [..., H]) -> [..., H].

    Args:
        hidden_size (H), ffn_size (F, per expert), num_experts (E), top_k: the MoE shape.
        backend: passed to fused_moe ("triton", "cuda", "torch", or None for the default).

    Weights start as N(0, 1/fan_in); load a state dict with load_state_dict (see the module docstring for
    the original release's names).
    """

    def __init__(self, hidden_size, ffn_size, num_experts, top_k, backend=None, device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.ffn_size, self.num_experts, self.top_k = hidden_size, ffn_size, num_experts, top_k
        self.backend = backend
        self.gate = _Router(hidden_size, num_experts)
        self.experts = _Experts(hidden_size, ffn_size, num_experts)
        self.reset_parameters()
        self.to(device=device, dtype=dtype)

    def reset_parameters(self):
        for p, fan_in in ((self.gate.weight, self.hidden_size), (self.experts.gate_up_proj, self.hidden_size),
                          (self.experts.down_proj, self.ffn_size)):
            nn.init.normal_(p, std=fan_in ** -0.5)

    def forward(self, x):
        shape = x.shape
        out = fused_moe(x.reshape(-1, shape[-1]), self.gate.weight, self.experts.gate_up_proj,
                        self.experts.down_proj, self.top_k, backend=self.backend)
        return out.view(shape)

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, backend={self.backend!r}")
