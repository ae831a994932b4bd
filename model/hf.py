"""Drop-in replacement of `transformers`' MiniMax modules by ours, in place, sharing the weights.

`replace_hf_modules(hf_model)` swaps every `MiniMaxLightningAttention` for `lightning_ops.LightningAttention`
and every `MiniMaxSparseMoeBlock` for `moe_ops.SparseMoE`. The MoE block is called as ours is
(`mlp(hidden_states) -> hidden_states`). The attention is called by `MiniMaxDecoderLayer` with keyword
arguments (position embeddings, a 2D padding mask, the `MiniMaxCache`) and must return a pair, so the
lightning layer is an `HFLightningAttention`, a subclass of ours that only adds that calling convention:
parameter names, and so `state_dict()` and `save_pretrained`, stay those of `transformers`, less the
decay buffers it derives from the config (`slope_rate`, `query_decay`, ...): ours recomputes its rates, and a
`transformers` state dict that holds them still loads (they are dropped on load).

Cache: `MiniMaxCache.linear_cache[layer]` holds our fp32 state `[B, H, D, D]` (transformers keeps it
in the activation dtype); `batch_select_indices` / `batch_repeat_interleave` work on it unchanged.
Not carried over: router-logit and attention-weight recording (`output_router_logits`,
`output_attentions`) of the replaced modules.
"""

import torch

from m1_kernels.lightning_ops import LightningAttention, slopes
from m1_kernels.moe_ops import SparseMoE

from .checkpoint import HF_DERIVED_BUFFERS
from .modeling import family_backends


class HFLightningAttention(LightningAttention):
    """LightningAttention with the calling convention of `transformers`' MiniMaxLightningAttention."""

    @classmethod
    def from_hf(cls, hf_module, backend=None):
        """The layer sharing the parameters of a `transformers` MiniMaxLightningAttention (no copies)."""
        w = hf_module.qkv_proj.weight
        ours = cls(hf_module.qkv_proj.in_features, hf_module.num_attention_heads, hf_module.head_dim,
                   hf_module.layer_idx, hf_module.num_hidden_layers, norm_eps=hf_module.norm.variance_epsilon,
                   backend=backend, device="meta", dtype=w.dtype)
        ours.qkv_proj.weight = hf_module.qkv_proj.weight
        ours.output_gate.weight = hf_module.output_gate.weight
        ours.out_proj.weight = hf_module.out_proj.weight
        ours.norm.weight = hf_module.norm.weight
        ours.slope = slopes(ours.num_heads, ours.layer_idx, ours.num_layers, device=w.device)
        return ours

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in HF_DERIVED_BUFFERS:      # a transformers state dict of the swapped model still loads
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        if attention_mask is not None:
            # Padding tokens: qkv = silu(qkv_proj(0)) = 0, so they add nothing to the state (as transformers'
            # apply_mask_to_padding_states); their own outputs are never read.
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        if past_key_values is None:
            return super().forward(hidden_states), None
        B = hidden_states.shape[0]
        state = past_key_values.get_linear_cache(self.layer_idx)
        first_call = not isinstance(state, torch.Tensor)
        if first_call:                                           # an empty state per row
            H, D = self.num_heads, self.head_dim
            state = hidden_states.new_zeros(B, H, D, D, dtype=torch.float32)
        elif state.dtype != torch.float32 or not state.is_contiguous():
            state = state.float().contiguous()
        slots = torch.arange(B, dtype=torch.int32, device=hidden_states.device)
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            # Slot-cache calls are inference only. A training forward that also builds a cache (transformers'
            # default use_cache=True) gets the differentiable output plus a second, no-grad pass that fills
            # the state: correct, at twice the cost (pass use_cache=False when training).
            if not first_call:
                raise ValueError("continuing from a MiniMaxCache is inference only: run it under torch.no_grad()")
            out = super().forward(hidden_states)
            with torch.no_grad():
                super().forward(hidden_states.detach(), state=state, slot_idx=slots)
        else:
            out = super().forward(hidden_states, state=state, slot_idx=slots)
        past_key_values.set_linear_cache(self.layer_idx, state)
        return out, state


def transformers_config(config, **overrides):
    """`transformers`' MiniMaxConfig of an M1Config (for building the same model there). Its MiniMax rotates
    every head dim whatever the config says: the two agree only when rotary_dim == head_dim."""
    from transformers import MiniMaxConfig
    fields = {k: v for k, v in config.to_dict("transformers").items() if k not in ("architectures", "model_type")}
    return MiniMaxConfig(**{**fields, **overrides})


def sparse_moe_from_hf(hf_block, backend=None) -> SparseMoE:
    """A SparseMoE sharing the parameters of a `transformers` MiniMaxSparseMoeBlock (no copies)."""
    E, two_f, H = hf_block.experts.gate_up_proj.shape
    module = SparseMoE(H, two_f // 2, E, hf_block.top_k, backend=backend, device="meta")
    module.gate.weight = hf_block.gate.weight
    module.experts.gate_up_proj = hf_block.experts.gate_up_proj
    module.experts.down_proj = hf_block.experts.down_proj
    return module


def replace_hf_modules(hf_model, backend=None):
    """Swap the lightning-attention and MoE modules of a `transformers` MiniMaxForCausalLM (or MiniMaxModel)
    for ours, in place, sharing their parameters; returns the same model. `backend` picks the kernel
    backend of the new modules: one name for both, or {"lightning": ..., "moe": ...} (M1ForCausalLM's
    `backend`; None: the default dispatch)."""
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention, MiniMaxSparseMoeBlock

    backend = family_backends(backend)
    base = getattr(hf_model, "model", hf_model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"expected a transformers MiniMaxForCausalLM or MiniMaxModel, got {type(hf_model).__name__}")
    replaced = 0
    for layer in layers:
        attn = layer.self_attn
        if isinstance(attn, MiniMaxLightningAttention):
            layer.self_attn = HFLightningAttention.from_hf(attn, backend=backend["lightning"])
            replaced += 1
        if isinstance(layer.mlp, MiniMaxSparseMoeBlock):
            layer.mlp = sparse_moe_from_hf(layer.mlp, backend=backend["moe"])
            replaced += 1
    if not replaced:
        ours = any(isinstance(layer.mlp, SparseMoE) for layer in layers)
        raise ValueError("found no MiniMaxLightningAttention or MiniMaxSparseMoeBlock to replace"
                         + (" (this model's modules were replaced already)" if ours else ""))
    return hf_model
