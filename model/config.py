"""MiniMax-M1 configuration: one dataclass, read from either spelling of `config.json`.

Two spellings exist in the wild:

- the original release (`MiniMaxAI/MiniMax-M1-*`, remote code): `attn_type_list` (0 = lightning,
  1 = softmax), `layernorm_{full_attention,linear_attention,mlp}_{alpha,beta}`, `rotary_dim`,
  `rope_theta`, `postnorm`, `shared_intermediate_size`, ...
- `transformers` (`MiniMaxConfig`): `layer_types` ("linear_attention" / "full_attention"),
  `{full_attn,linear_attn,mlp}_{alpha,beta}_factor`, `rope_parameters` ({"rope_type", "rope_theta",
  optional "partial_rotary_factor"}), `block_size`, ...

`transformers`' MiniMax rotates every head dim; the original rotates the first `rotary_dim` (64 of 128).
We follow the original: a `transformers`-spelled config rotates `head_dim * partial_rotary_factor`
dims (all of them when the factor is absent, which is what `transformers` itself computes).

Fields we do not model raise instead of being dropped: an unknown key, or a known key with a value this
model does not implement (shared experts, pre-norm residuals, sliding windows, quantisation, ...).
Nothing is guessed either: the shape keys both spellings always hold (`_REQUIRED_KEYS`, the RoPE base and
the layer kinds) must be present (the dataclass defaults are the released model, for `preset`), and a value
of the wrong JSON type (a string for a number, "false" for a boolean, 64.0 for a size) raises TypeError
naming the field instead of being converted.
"""

import dataclasses
import json
import math
import os
from typing import Any

LINEAR, FULL = "linear_attention", "full_attention"

# DeepNorm residual scale of the released model (alpha = (2N)^(1/4) with N = 80 layers).
M1_ALPHA = 3.5565588200778455

# Keys shared by both spellings (same meaning).
_COMMON_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "rms_norm_eps",
    "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
    "rope_theta",
}
# Keys that describe training or packaging, not the forward pass: accepted and ignored.
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "use_cache", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "attention_dropout", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "block_size",
    # generic PretrainedConfig fields that `transformers`' to_dict() adds
    "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder", "problem_type",
}
# Keys that must hold one particular value (the only one this model implements).
_REQUIRED_VALUES = {
    "hidden_act": ("silu",),
    "sliding_window": (None,),
    "postnorm": (True,),
    "shared_intermediate_size": (0, None),
    "quantization_config": (None,),
}
_ORIGINAL_KEYS = {
    "attn_type_list", "rotary_dim", "shared_moe_mode",
    *(f"layernorm_{part}_{ab}" for part in ("full_attention", "linear_attention", "mlp") for ab in ("alpha", "beta")),
}
_TRANSFORMERS_KEYS = {
    "layer_types", "rope_parameters",
    *(f"{part}_{ab}_factor" for part in ("full_attn", "linear_attn", "mlp") for ab in ("alpha", "beta")),
}
_OUR_KEYS = {"lm_head_fp32", "lightning_norm_eps"}
_MODEL_TYPES = {"minimax_m1", "minimax", "minimax_text_01", "MiniMaxM1", "MiniMaxText01"}
# Keys a config.json must hold: both implementations define them, with defaults that differ from the
# released model's and from each other's (transformers: rope_theta 1e6, max_position_embeddings 131072),
# so a missing one would be a silent guess. Rope theta and the layer kinds are checked per spelling.
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "num_local_experts", "num_experts_per_tok", "rms_norm_eps", "max_position_embeddings")

_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok",
                  "max_position_embeddings")
_RESIDUAL_FACTORS = ("linear_attn_alpha", "linear_attn_beta", "full_attn_alpha", "full_attn_beta", "mlp_alpha",
                     "mlp_beta")
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps", "lightning_norm_eps")
_FLOATS = _POSITIVE_FLOATS + _RESIDUAL_FACTORS
_BOOLS = ("tie_word_embeddings", "lm_head_fp32")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class M1Config:
    """Shape and residual constants of a MiniMax-M1-style hybrid model.

    layer_types[i] is "linear_attention" (lightning) or "full_attention" (softmax, GQA, partial RoPE).
    Residuals are post-norm DeepNorm: h = norm(x); out = alpha * h + beta * f(h), with (alpha, beta) per
    sub-layer kind. `lm_head_fp32` computes the LM head in float32 (the M1 report's fix for the
    probability mismatch between training and inference engines).
    """
    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    rotary_dim: int = 64
    rope_theta: float = 10_000_000.0
    intermediate_size: int = 9216
    num_local_experts: int = 32
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6
    layer_types: list = dataclasses.field(default_factory=lambda: [FULL if i % 8 == 7 else LINEAR for i in range(80)])
    linear_attn_alpha: float = M1_ALPHA
    linear_attn_beta: float = 1.0
    full_attn_alpha: float = M1_ALPHA
    full_attn_beta: float = 1.0
    mlp_alpha: float = M1_ALPHA
    mlp_beta: float = 1.0
    max_position_embeddings: int = 10_240_000
    tie_word_embeddings: bool = False
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    lm_head_fp32: bool = False

    def __post_init__(self):
        if not isinstance(self.layer_types, (list, tuple)):
            raise TypeError(f"layer_types must be a list, got {type(self.layer_types).__name__}")
        self.layer_types = list(self.layer_types)
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self):
        """Raise TypeError naming the first field of the wrong type, then ValueError naming the first
        inconsistent one (JSON gives strings, floats and booleans where integers belong: none is converted)."""
        for name in _POSITIVE_INTS + ("rotary_dim",):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in _FLOATS:
            if not _is_number(getattr(self, name)):
                raise TypeError(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in _TOKEN_IDS:
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [] if value is None else [value]
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise TypeError(f"{name} must be None, a token id or a list of token ids, got {value!r}")
        for name in _POSITIVE_INTS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers but num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        bad = sorted({repr(t) for t in self.layer_types if t not in (LINEAR, FULL)})
        if bad:
            raise ValueError(f"layer_types may only hold {LINEAR!r} or {FULL!r}, got {bad}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not (0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and within [0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                             f"({self.num_local_experts})")
        if LINEAR in self.layer_types and self.num_hidden_layers < 2:
            raise ValueError("lightning layers need num_hidden_layers >= 2 (their decay depends on depth)")
        for name in _POSITIVE_FLOATS:
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)!r}")
        for name in _RESIDUAL_FACTORS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------------------------------------
    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    def replace(self, **changes) -> "M1Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "M1Config":
        """Named configurations.

        "minimax-m1": the released model (456.09B parameters, 45.94B active without embeddings and head).
        "minimax-m1-slice": real widths, 8 layers (7 lightning + 1 softmax), 4 experts; fits one 80 GB GPU.
        "tiny": 4 layers (3 lightning + 1 softmax), hidden 64, partial rotary (8 of 16 dims): CPU tests.
        "tiny-full-rotary": "tiny" with rotary on every head dim, where `transformers` agrees with us.
        """
        if name == "minimax-m1":
            return cls()
        if name == "minimax-m1-slice":
            return cls(num_hidden_layers=8, layer_types=[LINEAR] * 7 + [FULL], num_local_experts=4)
        tiny = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, rotary_dim=8, intermediate_size=32, num_local_experts=4,
                    num_experts_per_tok=2, layer_types=[LINEAR, LINEAR, LINEAR, FULL], max_position_embeddings=4096)
        if name == "tiny":
            return cls(**tiny)
        if name == "tiny-full-rotary":
            return cls(**{**tiny, "rotary_dim": 16})
        raise ValueError(f"unknown preset {name!r}; choose one of 'minimax-m1', 'minimax-m1-slice', 'tiny', "
                         "'tiny-full-rotary'")

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_dict) -> "M1Config":
        """Read a config.json (a folder holding one, the file itself, or its parsed dict) in either spelling."""
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        elif isinstance(path_or_dict, (str, os.PathLike)):
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            with open(path) as f:
                raw = json.load(f)
        else:
            raise TypeError(f"path_or_dict must be a path or a dict, got {type(path_or_dict).__name__}")
        return cls(**_parse(raw))

    def to_dict(self, spelling: str = "original") -> dict:
        """The config.json dict in the original release's spelling (default) or `transformers`' spelling."""
        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                      num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                      head_dim=self.head_dim, num_local_experts=self.num_local_experts,
                      num_experts_per_tok=self.num_experts_per_tok, rms_norm_eps=self.rms_norm_eps,
                      max_position_embeddings=self.max_position_embeddings,
                      tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                      eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, hidden_act="silu")
        if spelling == "original":
            return dict(architectures=["MiniMaxM1ForCausalLM"], model_type="minimax_m1", **common,
                        attn_type_list=[int(t == FULL) for t in self.layer_types], rotary_dim=self.rotary_dim,
                        rope_theta=self.rope_theta, postnorm=True, shared_intermediate_size=0,
                        layernorm_full_attention_alpha=self.full_attn_alpha,
                        layernorm_full_attention_beta=self.full_attn_beta,
                        layernorm_linear_attention_alpha=self.linear_attn_alpha,
                        layernorm_linear_attention_beta=self.linear_attn_beta,
                        layernorm_mlp_alpha=self.mlp_alpha, layernorm_mlp_beta=self.mlp_beta,
                        lightning_norm_eps=self.lightning_norm_eps, lm_head_fp32=self.lm_head_fp32)
        if spelling == "transformers":
            rope = {"rope_type": "default", "rope_theta": self.rope_theta}
            if self.rotary_dim != self.head_dim:
                rope["partial_rotary_factor"] = self.rotary_dim / self.head_dim
            return dict(architectures=["MiniMaxForCausalLM"], model_type="minimax", **common,
                        layer_types=list(self.layer_types), rope_parameters=rope,
                        full_attn_alpha_factor=self.full_attn_alpha, full_attn_beta_factor=self.full_attn_beta,
                        linear_attn_alpha_factor=self.linear_attn_alpha,
                        linear_attn_beta_factor=self.linear_attn_beta,
                        mlp_alpha_factor=self.mlp_alpha, mlp_beta_factor=self.mlp_beta)
        raise ValueError(f"spelling must be 'original' or 'transformers', got {spelling!r}")

    def save_pretrained(self, folder, spelling: str = "original"):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(self.to_dict(spelling), f, indent=2)


def _parse(raw: dict) -> dict:
    """Map a raw config.json dict (either spelling) onto M1Config's fields; raise on anything unclear."""
    original = sorted(k for k in raw if k in _ORIGINAL_KEYS)
    hf = sorted(k for k in raw if k in _TRANSFORMERS_KEYS)
    if original and hf:
        raise ValueError(f"config mixes the original release's keys {original} with transformers' keys {hf}; "
                         "use one spelling")
    unknown = sorted(set(raw) - _COMMON_KEYS - _IGNORED_KEYS - set(_REQUIRED_VALUES) - _ORIGINAL_KEYS
                     - _TRANSFORMERS_KEYS - _OUR_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise ValueError(f"config is missing {missing}: a MiniMax config.json always holds them, and guessing "
                         "would build a different model")
    for key, allowed in _REQUIRED_VALUES.items():
        if key not in raw:
            continue
        # 1 == True and 0.0 == 0 in Python: compare types as well, and say so when only the type is wrong.
        if not any(type(raw[key]) is type(a) and raw[key] == a for a in allowed):
            types = {type(a) for a in allowed if a is not None}
            if raw[key] is not None and types and type(raw[key]) not in types:
                raise TypeError(f"config {key} must be {' or '.join(t.__name__ for t in types)}, got {raw[key]!r}")
            raise ValueError(f"config {key}={raw[key]!r} is not supported (this model implements {key}="
                             f"{' or '.join(repr(a) for a in allowed)})")
    if "model_type" in raw and raw["model_type"] not in _MODEL_TYPES:
        raise ValueError(f"config model_type {raw['model_type']!r} is not a MiniMax model ({sorted(_MODEL_TYPES)})")

    out = {k: raw[k] for k in _COMMON_KEYS | _OUR_KEYS if k in raw and k != "rope_theta"}
    if out.get("head_dim") is None:         # as both implementations derive it
        heads = _need_int(raw, "num_attention_heads")
        if heads < 1:
            raise ValueError(f"num_attention_heads must be a positive integer, got {heads}")
        out["head_dim"] = _need_int(raw, "hidden_size") // heads
    head_dim = _need_int(out, "head_dim")
    theta = raw.get("rope_theta")

    if original or not hf:
        if "attn_type_list" not in raw:
            raise ValueError("config must list the layer kinds: 'attn_type_list' (original) or 'layer_types' "
                             "(transformers)")
        kinds = raw["attn_type_list"]
        if not isinstance(kinds, list) or not all(_is_int(k) for k in kinds):
            raise TypeError(f"attn_type_list must be a list of integers, got {kinds!r}")
        if any(k not in (0, 1) for k in kinds):
            raise ValueError(f"attn_type_list may only hold 0 (lightning) or 1 (softmax), got {sorted(set(kinds))}")
        out["layer_types"] = [FULL if k == 1 else LINEAR for k in kinds]
        out["rotary_dim"] = raw.get("rotary_dim", head_dim)
        for ours, theirs in (("full_attn", "full_attention"), ("linear_attn", "linear_attention"), ("mlp", "mlp")):
            for ab in ("alpha", "beta"):
                out[f"{ours}_{ab}"] = raw.get(f"layernorm_{theirs}_{ab}", 1.0)
    else:
        if "layer_types" not in raw:
            raise ValueError("config must list the layer kinds: 'attn_type_list' (original) or 'layer_types' "
                             "(transformers)")
        if not isinstance(raw["layer_types"], list):
            raise TypeError(f"layer_types must be a list, got {raw['layer_types']!r}")
        out["layer_types"] = list(raw["layer_types"])
        rope = raw.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise TypeError(f"rope_parameters must be a dict, got {rope!r}")
        extra = sorted(set(rope) - {"rope_type", "rope_theta", "partial_rotary_factor"})
        if extra or rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters {rope} not supported: only the default RoPE (rope_type 'default', "
                             "rope_theta, partial_rotary_factor)")
        if theta is not None and "rope_theta" in rope and rope["rope_theta"] != theta:
            raise ValueError(f"rope_theta {theta} disagrees with rope_parameters.rope_theta {rope['rope_theta']}")
        theta = rope.get("rope_theta", theta)
        factor = rope.get("partial_rotary_factor", 1.0)
        if not _is_number(factor):
            raise TypeError(f"rope_parameters.partial_rotary_factor must be a number, got {factor!r}")
        rotary = head_dim * factor
        if rotary != int(rotary):
            raise ValueError(f"partial_rotary_factor {factor} does not give a whole number of dims of head_dim {head_dim}")
        out["rotary_dim"] = int(rotary)
        for part in ("full_attn", "linear_attn", "mlp"):
            for ab in ("alpha", "beta"):
                out[f"{part}_{ab}"] = raw.get(f"{part}_{ab}_factor", 1.0)
    if theta is None:
        raise ValueError("config is missing the RoPE base: 'rope_theta' (original) or 'rope_parameters.rope_theta' "
                         "(transformers)")
    if not _is_number(theta):
        raise TypeError(f"rope_theta must be a number, got {theta!r}")
    out["rope_theta"] = float(theta)
    if "num_hidden_layers" not in out:
        out["num_hidden_layers"] = len(out["layer_types"])
    return out


def _need_int(d: dict, key: str) -> int:
    """d[key], which arithmetic needs before validate() runs: raise naming it when it is not an integer."""
    if not _is_int(d.get(key)):
        raise TypeError(f"{key} must be an integer, got {d.get(key)!r}")
    return d[key]
