"""MiniMax-M1: config, model, checkpoints, hybrid cache, generation, drop-in modules for `transformers`.

`M1Config` imports on its own; `M1ForCausalLM` and `replace_hf_modules` import the kernel packages
(lightning_ops, moe_ops) on first use.
"""

from .config import M1Config

__all__ = ["M1Config", "M1ForCausalLM", "replace_hf_modules"]


def __getattr__(name):
    if name == "M1ForCausalLM":
        from .modeling import M1ForCausalLM
        return M1ForCausalLM
    if name == "replace_hf_modules":
        from .hf import replace_hf_modules
        return replace_hf_modules
    raise AttributeError(f"module 'model' has no attribute {name!r}")
