"""MiniMax-M1: config, model, checkpoints, hybrid cache, generation, drop-in modules for `transformers`.

`M1Config` imports on its own; the rest imports the kernel packages (lightning_ops, moe_ops) or
safetensors on first use.
"""

from .config import M1Config

# name -> submodule that defines it, imported on first access
_LAZY = {
    "M1ForCausalLM": "modeling",
    "replace_hf_modules": "hf",
    "transformers_config": "hf",
    "convert_per_expert_state_dict": "checkpoint",
    "without_derived_buffers": "checkpoint",
    "Engine": "engine",
    "RequestOutput": "engine",
    "CompletionOutput": "engine",
    "SamplingParams": "sampling",
    "parallelize": "parallel",
}

__all__ = ["M1Config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
