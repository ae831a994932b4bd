"""moe_ops.SparseMoE: the MiniMax-M1 sparse MoE block on top of fused_moe.

Parameter names and shapes follow transformers' MiniMaxSparseMoeBlock (gate.weight [E, H],
experts.gate_up_proj [E, 2F, H] with gate rows first, experts.down_proj [E, H, F]), so its state dict
loads as is; `convert_per_expert_state_dict` turns the original release's per-expert names
(experts.{e}.w1 / w3 / w2.weight) into these.
"""

import re

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

    Weights start as N(0, 1/fan_in); load a checkpoint with load_state_dict (HF names) or
    convert_per_expert_state_dict (original names), or share an HF block's with from_hf.
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

    @classmethod
    def from_hf(cls, hf_block, backend=None):
        """A SparseMoE sharing the parameters of a transformers MiniMaxSparseMoeBlock (no copies)."""
        E, two_f, H = hf_block.experts.gate_up_proj.shape
        module = cls(H, two_f // 2, E, hf_block.top_k, backend=backend, device="meta")
        module.gate.weight = hf_block.gate.weight
        module.experts.gate_up_proj = hf_block.experts.gate_up_proj
        module.experts.down_proj = hf_block.experts.down_proj
        return module

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, backend={self.backend!r}")


_PER_EXPERT = re.compile(r"^(?P<prefix>.*)experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")


def convert_per_expert_state_dict(state_dict):
    """Rename the original release's per-expert weights to the stacked layout of SparseMoE.

    `...experts.{e}.w1.weight` [F, H] (gate), `w3` [F, H] (up) and `w2` [H, F] (down) become
    `...experts.gate_up_proj` [E, 2F, H] (= cat(w1, w3) per expert) and `...experts.down_proj`
    [E, H, F]; every other entry (for example `...gate.weight`) passes through unchanged. Works on a
    block's own state dict or a whole model's (any prefix such as `block_sparse_moe.`).
    """
    out, groups = {}, {}
    for name, tensor in state_dict.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = tensor
        else:
            groups.setdefault(m["prefix"], {})[(int(m["e"]), m["w"])] = tensor
    for prefix, weights in groups.items():
        E = 1 + max(e for e, _ in weights)
        missing = [f"{prefix}experts.{e}.{w}.weight" for e in range(E) for w in ("w1", "w2", "w3")
                   if (e, w) not in weights]
        if missing:
            raise ValueError(f"per-expert state dict is missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        out[f"{prefix}experts.gate_up_proj"] = torch.stack(
            [torch.cat([weights[(e, "w1")], weights[(e, "w3")]]) for e in range(E)])
        out[f"{prefix}experts.down_proj"] = torch.stack([weights[(e, "w2")] for e in range(E)])
    return out
