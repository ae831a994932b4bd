"""M1Config: both spellings of config.json, presets, round trips and clear errors."""

import json

import pytest

from m1_kernels.model.config import FULL, LINEAR, M1_ALPHA, M1Config

# The released MiniMax-M1 config.json (original spelling), field for field.
ORIGINAL_M1 = {
    "architectures": ["MiniMaxM1ForCausalLM"], "attention_dropout": 0.0,
    "attn_type_list": [1 if i % 8 == 7 else 0 for i in range(80)],
    "auto_map": {"AutoConfig": "configuration_minimax_m1.MiniMaxM1Config",
                 "AutoModelForCausalLM": "modeling_minimax_m1.MiniMaxM1ForCausalLM"},
    "bos_token_id": None, "eos_token_id": None, "head_dim": 128, "hidden_act": "silu", "hidden_size": 6144,
    "initializer_range": 0.02, "intermediate_size": 9216,
    "layernorm_full_attention_alpha": M1_ALPHA, "layernorm_full_attention_beta": 1.0,
    "layernorm_linear_attention_alpha": M1_ALPHA, "layernorm_linear_attention_beta": 1.0,
    "layernorm_mlp_alpha": M1_ALPHA, "layernorm_mlp_beta": 1.0, "max_position_embeddings": 10240000,
    "model_type": "minimax_m1", "num_attention_heads": 64, "num_experts_per_tok": 2, "num_hidden_layers": 80,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "postnorm": True,
    "rms_norm_eps": 1e-05, "rope_theta": 10000000, "rotary_dim": 64, "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0, "shared_intermediate_size": 0, "shared_moe_mode": "sigmoid",
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.2", "use_cache": True, "vocab_size": 200064,
}


def test_preset_is_the_released_model():
    c = M1Config.preset("minimax-m1")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.num_key_value_heads) == \
        (6144, 80, 64, 128, 8)
    assert c.full_layers == list(range(7, 80, 8)) and len(c.linear_layers) == 70
    assert (c.rotary_dim, c.rope_theta, c.num_local_experts, c.num_experts_per_tok) == (64, 1e7, 32, 2)
    assert (c.intermediate_size, c.vocab_size, c.rms_norm_eps) == (9216, 200064, 1e-5)
    assert c.full_attn_alpha == c.linear_attn_alpha == c.mlp_alpha == 3.5565588200778455
    assert c.full_attn_beta == c.linear_attn_beta == c.mlp_beta == 1.0


def test_original_spelling_reads_the_release(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ORIGINAL_M1))
    assert M1Config.from_pretrained(tmp_path) == M1Config.preset("minimax-m1")
    assert M1Config.from_pretrained(tmp_path / "config.json") == M1Config.preset("minimax-m1")


def test_transformers_spelling_of_minimaxconfig():
    from transformers import MiniMaxConfig
    hf = MiniMaxConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       layer_types=[LINEAR, LINEAR, LINEAR, FULL], full_attn_alpha_factor=2.5, mlp_beta_factor=0.5,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e7})
    c = M1Config.from_pretrained(hf.to_dict())
    assert c.layer_types == [LINEAR, LINEAR, LINEAR, FULL]
    assert c.rotary_dim == 16, "transformers rotates every head dim"
    assert (c.full_attn_alpha, c.mlp_beta, c.linear_attn_alpha, c.rope_theta) == (2.5, 0.5, 1.0, 1e7)


@pytest.mark.parametrize("spelling", ["original", "transformers"])
@pytest.mark.parametrize("preset", ["minimax-m1", "tiny", "tiny-full-rotary"])
def test_round_trip(spelling, preset, tmp_path):
    c = M1Config.preset(preset).replace(lm_head_fp32=spelling == "original", mlp_beta=0.75)
    c.save_pretrained(tmp_path, spelling=spelling)
    back = M1Config.from_pretrained(tmp_path)
    if spelling == "transformers":  # our own fields are not part of transformers' spelling
        back = back.replace(lm_head_fp32=c.lm_head_fp32)
    assert back == c


@pytest.mark.parametrize("change, message", [
    ({"some_new_field": 1}, "unknown config keys \\['some_new_field'\\]"),
    ({"layer_types": [LINEAR] * 80}, "mixes the original release's keys"),
    ({"attn_type_list": [0] * 79}, "layer_types lists 79 layers but num_hidden_layers is 80"),
    ({"attn_type_list": [2] * 80}, "attn_type_list may only hold 0"),
    ({"postnorm": False}, "postnorm=False is not supported"),
    ({"shared_intermediate_size": 512}, "shared_intermediate_size=512 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"sliding_window": 4096}, "sliding_window=4096 is not supported"),
    ({"num_key_value_heads": 7}, "multiple of num_key_value_heads"),
    ({"rotary_dim": 130}, "rotary_dim must be even and within"),
    ({"num_experts_per_tok": 33}, "exceeds num_local_experts"),
    ({"model_type": "llama"}, "not a MiniMax model"),
    ({"attn_type_list": None}, None),
])
def test_original_spelling_errors(change, message):
    raw = {**ORIGINAL_M1, **change}
    if change.get("attn_type_list", 0) is None:
        del raw["attn_type_list"]
        message = "must list the layer kinds"
    with pytest.raises(ValueError, match=message):
        M1Config.from_pretrained(raw)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e7, "factor": 4}}, "only the default RoPE"),
    ({"rope_theta": 1e6}, "disagrees with rope_parameters.rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.3}},
     "whole number of dims"),
    ({"layer_types": [LINEAR, "sliding_attention", LINEAR, FULL]}, "may only hold"),
])
def test_transformers_spelling_errors(change, message):
    raw = {**M1Config.preset("tiny-full-rotary").to_dict("transformers"), **change}
    with pytest.raises(ValueError, match=message):
        M1Config.from_pretrained(raw)


def test_partial_rotary_factor_gives_rotary_dim():
    raw = M1Config.preset("minimax-m1").to_dict("transformers")
    assert raw["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert M1Config.from_pretrained(raw).rotary_dim == 64


def test_bad_inputs():
    with pytest.raises(TypeError, match="path_or_dict"):
        M1Config.from_pretrained(3)
    with pytest.raises(FileNotFoundError):
        M1Config.from_pretrained("/nonexistent/folder")
    with pytest.raises(ValueError, match="unknown preset"):
        M1Config.preset("gpt2")
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        M1Config(hidden_size=0)


# ------------------------------------------------------------------------------------------------------
# Nothing guessed, nothing converted

REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_local_experts", "num_experts_per_tok", "rms_norm_eps", "max_position_embeddings"]


@pytest.mark.parametrize("spelling", ["original", "transformers"])
@pytest.mark.parametrize("field", REQUIRED)
def test_a_missing_shape_key_is_named_not_taken_from_the_released_model(spelling, field):
    raw = M1Config.preset("tiny").to_dict(spelling)
    del raw[field]
    with pytest.raises(ValueError, match=f"config is missing \\['{field}'\\]"):
        M1Config.from_pretrained(raw)


def test_a_missing_rope_base_is_named():
    raw = M1Config.preset("tiny").to_dict("original")
    del raw["rope_theta"]
    with pytest.raises(ValueError, match="missing the RoPE base: 'rope_theta'"):
        M1Config.from_pretrained(raw)
    raw = M1Config.preset("tiny").to_dict("transformers")
    del raw["rope_parameters"]["rope_theta"]
    with pytest.raises(ValueError, match="rope_parameters.rope_theta"):
        M1Config.from_pretrained(raw)


def test_defaulted_keys_take_what_both_implementations_take():
    """head_dim = hidden // heads, the layer count from the layer list, residual factors 1 (the defaults of
    transformers' MiniMaxConfig and of the release's remote code)."""
    tiny = M1Config.preset("tiny-full-rotary")
    raw = tiny.to_dict("transformers")
    for key in ("head_dim", "num_hidden_layers", "mlp_alpha_factor", "full_attn_beta_factor"):
        del raw[key]
    c = M1Config.from_pretrained(raw)
    assert c == tiny.replace(mlp_alpha=1.0, full_attn_beta=1.0)
    assert c.head_dim == tiny.hidden_size // tiny.num_attention_heads


@pytest.mark.parametrize("key, value, field", [
    ("hidden_size", "64", "hidden_size"),
    ("vocab_size", 128.0, "vocab_size"),
    ("num_local_experts", True, "num_local_experts"),
    ("num_hidden_layers", "4", "num_hidden_layers"),
    ("head_dim", "16", "head_dim"),
    ("rotary_dim", 8.0, "rotary_dim"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps"),
    ("rope_theta", "1e7", "rope_theta"),
    ("layernorm_mlp_alpha", "3.5", "mlp_alpha"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),
    ("tie_word_embeddings", 0, "tie_word_embeddings"),
    ("lm_head_fp32", "true", "lm_head_fp32"),
    ("postnorm", "true", "postnorm"),
    ("shared_intermediate_size", "0", "shared_intermediate_size"),
    ("attn_type_list", ["0", "0", "0", "1"], "attn_type_list"),
    ("attn_type_list", "0001", "attn_type_list"),
    ("eos_token_id", "2", "eos_token_id"),
    ("bos_token_id", [1, "2"], "bos_token_id"),
])
def test_wrong_json_types_raise_type_error_naming_the_field(key, value, field):
    """`"false"` used to be read as true, "64" failed deep inside the model, 128.0 built a float-sized layer."""
    raw = {**M1Config.preset("tiny").to_dict("original"), key: value}
    with pytest.raises(TypeError, match=field):
        M1Config.from_pretrained(raw)


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["rope_parameters"].update(rope_theta="1e6"), "rope_theta"),
    (lambda r: r["rope_parameters"].update(partial_rotary_factor="0.5"), "partial_rotary_factor"),
    (lambda r: r.update(rope_parameters=[1e6]), "rope_parameters"),
    (lambda r: r.update(layer_types="linear_attention"), "layer_types"),
    (lambda r: r.update(linear_attn_beta_factor="1"), "linear_attn_beta"),
])
def test_wrong_json_types_in_the_transformers_spelling(edit, field):
    raw = M1Config.preset("tiny").to_dict("transformers")
    edit(raw)
    with pytest.raises(TypeError, match=field):
        M1Config.from_pretrained(raw)


def test_direct_construction_checks_types_and_finiteness():
    with pytest.raises(TypeError, match="tie_word_embeddings"):
        M1Config(tie_word_embeddings="false")
    with pytest.raises(TypeError, match="layer_types must be a list"):
        M1Config.preset("tiny").replace(layer_types="linear_attention")
    with pytest.raises(ValueError, match="mlp_beta must be finite"):
        M1Config.preset("tiny").replace(mlp_beta=float("nan"))
    with pytest.raises(ValueError, match="rope_theta must be positive and finite"):
        M1Config.preset("tiny").replace(rope_theta=float("inf"))
    with pytest.raises(ValueError, match="max_position_embeddings must be a positive integer"):
        M1Config.preset("tiny").replace(max_position_embeddings=0)


def test_transformers_config_builds_the_same_model_there():
    from m1_kernels.model.hf import transformers_config
    c = M1Config.preset("tiny-full-rotary").replace(mlp_beta=0.5, tie_word_embeddings=True)
    hf = transformers_config(c, block_size=8)
    assert type(hf).__name__ == "MiniMaxConfig" and hf.block_size == 8
    assert M1Config.from_pretrained(hf.to_dict()) == c
