"""The MiniMax-M1 model on the CPU (torch backend, tiny configs): equivalence with `transformers`,
drop-in replacement, hybrid cache, checkpoints, partial rotary, parameter counts (generation: test_engine.py)."""

import json
import os
from unittest import mock

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import save_file

from m1_kernels.lightning_ops import LightningAttention
from m1_kernels.model import M1Config, M1ForCausalLM, SamplingParams, replace_hf_modules
from m1_kernels.moe_ops import SparseMoE
from m1_kernels.model.checkpoint import convert_per_expert_state_dict
from m1_kernels.model.modeling import SoftmaxAttention, rotary_cos_sin, apply_partial_rotary
from m1_kernels.reference import attention as RA

ALPHA = 3.5565588200778455


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tiny_model(preset="tiny", seed=0, **changes):
    torch.manual_seed(seed)
    return M1ForCausalLM(M1Config.preset(preset).replace(**changes), backend="torch").eval()


def hf_tiny(seed=0):
    from transformers import MiniMaxConfig, MiniMaxForCausalLM
    torch.manual_seed(seed)
    config = MiniMaxConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention"] * 3 + ["full_attention"], full_attn_alpha_factor=ALPHA,
        linear_attn_alpha_factor=ALPHA, mlp_alpha_factor=ALPHA, block_size=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7})
    model = MiniMaxForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init so that the layers do something
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tiny")
    hf = hf_tiny()
    hf.save_pretrained(folder)
    return hf, folder


# ------------------------------------------------------------------------------------------------------
# Equivalence with transformers and drop-in replacement

def test_transformers_checkpoint_gives_same_logits_and_greedy_tokens(hf_checkpoint):
    hf, folder = hf_checkpoint
    ours = M1ForCausalLM.from_pretrained(folder, backend="torch")
    assert ours.config.rotary_dim == ours.config.head_dim
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert relative_error(got, expected) <= 1e-4
    prompt = ids[:, :12]
    hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                            pad_token_id=0)[:, 12:]
    outs = ours.generate(prompt.tolist(), SamplingParams(temperature=0.0, max_tokens=10))
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens.tolist()


def test_replace_hf_modules_keeps_logits_and_shares_weights():
    hf = hf_tiny(seed=3)
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(2))
    prompt = ids[:, :9]
    with torch.no_grad():
        before = hf(ids).logits
    greedy_before = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False, pad_token_id=0)
    pointers = {n: p.data_ptr() for n, p in hf.named_parameters()}
    replace_hf_modules(hf)
    layer0 = hf.model.layers[0]
    assert isinstance(layer0.self_attn, LightningAttention) and isinstance(layer0.mlp, SparseMoE)
    assert {n: p.data_ptr() for n, p in hf.named_parameters()} == pointers, "weights must be shared, names kept"
    with torch.no_grad():
        after = hf(ids).logits
    assert relative_error(after, before) <= 1e-4
    greedy_after = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(greedy_after, greedy_before)


def test_replace_hf_modules_left_padded_batch():
    """transformers pads on the left for generation: padded tokens must not touch the lightning state."""
    hf = hf_tiny(seed=4)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        before = hf(ids, attention_mask=mask).logits
        replace_hf_modules(hf)
        after = hf(ids, attention_mask=mask).logits
    assert relative_error(after[1, 4:], before[1, 4:]) <= 1e-4
    assert relative_error(after[0], before[0]) <= 1e-4


def test_replace_hf_modules_trains_through_the_default_cache():
    """transformers builds a MiniMaxCache even in a training forward (use_cache defaults to True)."""
    hf = hf_tiny(seed=6)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(6))
    expected = hf(ids, labels=ids)
    expected.loss.backward()
    grads = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad()
    replace_hf_modules(hf)
    got = hf(ids, labels=ids)
    got.loss.backward()
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5 * abs(expected.loss.item())
    for n, g in grads.items():
        assert relative_error(dict(hf.named_parameters())[n].grad, g) <= 1e-3, n
    with torch.no_grad():    # and the cache it built continues the sequence (positions given: transformers
        # would read the past length from layer 0, a lightning layer without keys)
        step = hf(ids[:, -1:], past_key_values=got.past_key_values, use_cache=True,
                  position_ids=torch.full((2, 1), 12)).logits
        full = hf(torch.cat([ids, ids[:, -1:]], dim=1), use_cache=False).logits[:, -1:]
    assert relative_error(step, full) <= 1e-4


def _layer_backends(layers):
    return {(type(layer.self_attn).__name__, layer.mlp.backend, layer.self_attn.backend) for layer in layers}


def test_backend_per_op_family():
    """A mapping sets each op family's backend (the others keep the default dispatch), in the model and in
    replace_hf_modules; a model with its families on Triton (the interpreter on a CPU) and torch runs
    each family's kernels where it says and agrees with the all-torch model."""
    config = M1Config.preset("tiny")
    model = M1ForCausalLM(config, backend={"moe": "triton", "attention": "torch"})
    assert _layer_backends(model.model.layers) == {("LightningAttention", "triton", None),
                                                   ("SoftmaxAttention", "triton", "torch")}
    model = M1ForCausalLM(config, backend="cuda")  # the softmax layers' kernels have no cuda backend
    assert _layer_backends(model.model.layers) == {("LightningAttention", "cuda", "cuda"),
                                                   ("SoftmaxAttention", "cuda", None)}
    hf = replace_hf_modules(hf_tiny(), backend={"lightning": "torch"})
    assert {(layer.mlp.backend, layer.self_attn.backend) for layer in hf.model.layers[:3]} == {(None, "torch")}
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from m1_kernels.lightning_ops import backends as lightning_backends
    from m1_kernels.moe_ops import backends as moe_backends
    torch.manual_seed(0)
    mixed = M1ForCausalLM(config, backend={"moe": "triton", "lightning": "torch", "attention": "torch"}).eval()
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    moe_triton = moe_backends.TRITON.impl  # 12 tokens without gradients: its few-token kernels
    with (mock.patch.object(moe_triton, "few_token_moe", wraps=moe_triton.few_token_moe) as moe,
          mock.patch.object(lightning_backends.TRITON.impl, "lightning_fwd") as lightning_triton,
          torch.no_grad()):
        got = mixed(ids)
    assert moe.call_count == config.num_hidden_layers and not lightning_triton.called
    with torch.no_grad():
        expected = tiny_model()(ids)
    assert relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("backend, error, match", [
    ({"mlp": "cuda"}, ValueError, r"\['mlp'\] are not op families"),
    ({"moe": "cutlass"}, ValueError, r"backend\['moe'\] must be one of"),
    ("fast", ValueError, "backend must be one of"),
    (["triton"], TypeError, "backend must be a backend name, a mapping"),
])
def test_bad_backends_rejected(backend, error, match):
    with pytest.raises(error, match=match):
        M1ForCausalLM(M1Config.preset("tiny"), backend=backend)
    with pytest.raises(error, match=match):
        replace_hf_modules(hf_tiny(), backend=backend)


def test_replace_hf_modules_rejects_other_models():
    with pytest.raises(TypeError, match="MiniMaxForCausalLM"):
        replace_hf_modules(torch.nn.Linear(2, 2))
    hf = replace_hf_modules(hf_tiny())
    with pytest.raises(ValueError, match="replaced already"):
        replace_hf_modules(hf)


def test_a_transformers_state_dict_loads_into_the_swapped_model():
    """The swapped lightning layers derive their decay buffers; a transformers state dict (which holds them)
    still loads strictly, and restores the weights."""
    hf = hf_tiny(seed=7)
    saved = {k: v.clone() for k, v in hf.state_dict().items()}
    assert "model.layers.0.self_attn.slope_rate" in saved
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(7))
    replace_hf_modules(hf)
    assert "model.layers.0.self_attn.slope_rate" not in hf.state_dict()
    with torch.no_grad():
        before = hf(ids).logits
        for p in hf.parameters():
            p.zero_()
        hf.load_state_dict(saved, strict=True)
        assert torch.equal(hf(ids).logits, before)


# ------------------------------------------------------------------------------------------------------
# Partial rotary and softmax attention against reference/attention.py

def test_softmax_layer_partial_rotary_matches_reference():
    config = M1Config.preset("tiny")          # rotary on 8 of 16 dims per head
    assert config.rotary_dim < config.head_dim
    torch.manual_seed(0)
    attn = SoftmaxAttention(config, layer_idx=3).double()
    B, T = 2, 13
    x = torch.randn(B, T, config.hidden_size, dtype=torch.float64)
    positions = torch.arange(T)
    q = attn.q_proj(x).view(B, T, 4, 16)
    k = attn.k_proj(x).view(B, T, 2, 16)
    v = attn.v_proj(x).view(B, T, 2, 16)
    q = RA.apply_partial_rotary(q, positions, config.rotary_dim, config.rope_theta)
    k = RA.apply_partial_rotary(k, positions, config.rotary_dim, config.rope_theta)
    expected = attn.o_proj(RA.softmax_attention(q, k, v).reshape(B, T, -1))
    cos, sin = rotary_cos_sin(positions.expand(B, T), config.rotary_dim, config.rope_theta)
    with torch.no_grad():
        got = attn(x, cos.double(), sin.double())
    assert relative_error(got, expected) <= 1e-6


def test_rotary_leaves_the_pass_through_dims_alone():
    x = torch.randn(1, 5, 2, 16)
    cos, sin = rotary_cos_sin(torch.arange(5)[None] + 10 ** 6, 8, 1e7)
    out = apply_partial_rotary(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    # a rotation: the norm of each rotated pair is kept
    assert torch.allclose(out[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Hybrid cache

@pytest.mark.parametrize("preset", ["tiny", "tiny-full-rotary"])
def test_prefill_then_decode_matches_full_forward_for_ragged_batch(preset):
    model = tiny_model(preset)
    lengths = [21, 9, 14]
    ids = torch.randint(0, 128, (3, max(lengths)), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(num_slots=4, max_len=32)
        prompt = [6, 3, 1]
        out = model(ids, cache=cache, slot_idx=[2, 0, 3], lengths=prompt)   # padded rows, scattered slots
        for b, n in enumerate(prompt):
            assert relative_error(out[b, :n], full[b, :n]) <= 1e-5
        slot_of = {0: 2, 1: 0, 2: 3}
        while True:
            rows = [b for b in range(3) if int(cache.seq_lens[slot_of[b]]) < lengths[b]]
            if not rows:
                break
            pos = [int(cache.seq_lens[slot_of[b]]) for b in rows]
            step = model(torch.stack([ids[b, p] for b, p in zip(rows, pos)])[:, None], cache=cache,
                         slot_idx=[slot_of[b] for b in rows])
            for j, (b, p) in enumerate(zip(rows, pos)):
                assert relative_error(step[j, 0], full[b, p]) <= 1e-5, (b, p)
    assert cache.seq_lens.tolist() == [9, 0, 21, 14]


def test_chunked_prefill_matches_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 30)
        first = model(ids[:, :11], cache=cache)
        second = model(ids[:, 11:], cache=cache)
    assert relative_error(torch.cat([first, second], dim=1), full) <= 1e-5


def test_cache_rejects_bad_steps():
    model = tiny_model()
    cache = model.new_cache(2, 8)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="out of range"):
        model(ids, cache=cache, slot_idx=[0, 2])
    with pytest.raises(ValueError, match="names a slot twice"):
        model(ids, cache=cache, slot_idx=[1, 1])
    with pytest.raises(ValueError, match="lengths"):
        model(ids, cache=cache, lengths=[5, 1])
    with pytest.raises(ValueError, match="on the host"):
        model(ids, cache=cache, slot_idx=torch.tensor([0, 1], device="meta"))
    model(ids, cache=cache)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="holds at most 8"):
        model(ids[:, :1], cache=cache)
    cache.reset([0])
    assert cache.seq_lens.tolist() == [0, 8]
    assert cache.lightning_states[0][0].abs().sum() == 0 and cache.lightning_states[0][1].abs().sum() > 0


def test_cache_state_is_fp32_and_kv_in_model_dtype():
    model = tiny_model().cast_parameters(torch.bfloat16)
    cache = model.new_cache(1, 4)
    assert all(s.dtype == torch.float32 for s in cache.lightning_states.values())
    assert all(k.dtype == torch.bfloat16 for k in cache.keys.values())
    assert sorted(cache.lightning_states) == [0, 1, 2] and sorted(cache.keys) == [3]


# ------------------------------------------------------------------------------------------------------
# Checkpoints

PARTIAL_ROTARY_WARNING = "ignore:rotary_dim 8 < head_dim 16"     # tiny in transformers' names: expected


@pytest.mark.filterwarnings(PARTIAL_ROTARY_WARNING)
@pytest.mark.parametrize("names", ["original", "transformers"])
@pytest.mark.parametrize("shard_bytes", [1 << 30, 40_000])
def test_checkpoint_round_trip(names, shard_bytes, tmp_path):
    model = tiny_model(seed=5)
    model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes, names=names)
    files = sorted(os.listdir(tmp_path))
    if shard_bytes < 1 << 30:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    else:
        assert "model.safetensors" in files
    keys = set()
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(tmp_path / f, "pt") as h:
                keys |= set(h.keys())
    if names == "original":
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
        assert not any(".mlp." in k for k in keys)
    else:
        assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    back = M1ForCausalLM.from_pretrained(tmp_path, backend="torch")
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_transformers_loads_what_we_save_in_its_names(tmp_path):
    from transformers import MiniMaxForCausalLM
    model = tiny_model("tiny-full-rotary", seed=6)
    model.save_pretrained(tmp_path, names="transformers")
    hf = MiniMaxForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert relative_error(hf(ids).logits, model(ids)) <= 1e-4
    with pytest.warns(UserWarning, match="ignores partial_rotary_factor"):
        tiny_model("tiny").save_pretrained(tmp_path / "partial", names="transformers")


def test_checkpoint_dtype_and_device(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    back = M1ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.bfloat16())


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.norm.weight"), r"missing keys: model\.norm\.weight"),
    (lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
     r"missing keys: model\.layers\.1\.mlp\.experts\.gate_up_proj\[expert 2 w3\]"),
    (lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
     r"unexpected keys: model\.layers\.0\.self_attn\.extra\.weight"),
    (lambda t: t.update({"model.layers.9.input_layernorm.weight": torch.zeros(64)}),
     r"unexpected keys: model\.layers\.9\.input_layernorm\.weight"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(128, 32)}),
     r"shape mismatches: lm_head\.weight: checkpoint \(128, 32\) vs model \(128, 64\)"),
    (lambda t: t.update({"model.layers.2.block_sparse_moe.experts.0.w1.weight": torch.zeros(16, 64)}),
     r"model\.layers\.2\.block_sparse_moe\.experts\.0\.w1\.weight: checkpoint \(16, 64\) vs model \(32, 64\)"),
])
def test_checkpoint_errors_name_the_keys(edit, message, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    _rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        M1ForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_missing_files(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        M1ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local checkpoint folder.*snapshot_download"):
        M1ForCausalLM.from_pretrained("MiniMaxAI/MiniMax-M1-40k")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_checkpoint_integer_tensor_for_a_float_weight_is_named(dtype, tmp_path):
    """An integer tensor used to be converted silently by copy_()."""
    tiny_model().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.1.input_layernorm.weight":
                                           t["model.layers.1.input_layernorm.weight"].to(dtype)}))
    with pytest.raises(TypeError, match=r"floating point .*model\.layers\.1\.input_layernorm\.weight \("):
        M1ForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_dtype_as_transformers_takes_it(tmp_path):
    model = tiny_model().cast_parameters("bfloat16")          # names work wherever a dtype does
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    for dtype, expected in [("float32", torch.float32), ("float", torch.float32), ("half", torch.float16),
                            ("bfloat16", torch.bfloat16), (torch.float16, torch.float16),
                            ("auto", torch.bfloat16), (None, torch.bfloat16)]:
        back = M1ForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert {p.dtype for p in back.parameters()} == {expected}, dtype
    for bad in ("torch.bfloat16", "bf16", "cat"):
        with pytest.raises(ValueError, match=f"dtype {bad!r} is not a torch dtype name"):
            M1ForCausalLM.from_pretrained(tmp_path, dtype=bad)
    for bad in ("int8", torch.int32, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="not a dtype the model runs in"):
            M1ForCausalLM.from_pretrained(tmp_path, dtype=bad)
    with pytest.raises(TypeError, match="dtype must be"):
        M1ForCausalLM.from_pretrained(tmp_path, dtype=16)
    # "auto" without a dtype in config.json: the dtype of the stored weights, as transformers does
    config = json.loads((tmp_path / "config.json").read_text())
    del config["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert M1ForCausalLM.from_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.filterwarnings(PARTIAL_ROTARY_WARNING)
def test_saving_over_a_sharded_checkpoint_leaves_no_stale_shards(tmp_path):
    """The index wins on load: shards of an earlier, larger save must not survive a single-file save."""
    tiny_model(seed=1).save_pretrained(tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    new = tiny_model(seed=2)
    new.save_pretrained(tmp_path, names="transformers")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    back = M1ForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(back.lm_head.weight, new.lm_head.weight)
    new.save_pretrained(tmp_path, max_shard_bytes=40_000)    # and the other way round
    assert "model.safetensors" not in os.listdir(tmp_path)
    assert torch.equal(M1ForCausalLM.from_pretrained(tmp_path).lm_head.weight, new.lm_head.weight)


def test_per_expert_conversion_agrees_with_the_checkpoint_layout(tmp_path):
    """convert_per_expert_state_dict (in memory) and the checkpoint loader (streaming) put the original
    per-expert weights in the same places; a wrong-shaped expert weight is named."""
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    converted = convert_per_expert_state_dict(original)
    ours = model.state_dict()
    for i in range(model.config.num_hidden_layers):
        for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            assert torch.equal(converted[f"model.layers.{i}.block_sparse_moe.{name}"], ours[f"model.layers.{i}.mlp.{name}"])
    original["model.layers.0.block_sparse_moe.experts.2.w2.weight"] = torch.zeros(64, 31)
    with pytest.raises(ValueError, match=r"experts\.2\.w2\.weight has shape \(64, 31\), expected \(64, 32\)"):
        convert_per_expert_state_dict(original)


# ------------------------------------------------------------------------------------------------------
# Model-level properties

def test_parameter_counts_of_the_real_model_on_meta():
    with torch.device("meta"):
        model = M1ForCausalLM(M1Config.preset("minimax-m1"))
    counts = model.parameter_counts()
    assert round(counts["total"] / 1e9, 2) == 456.09
    assert round(counts["active"] / 1e9, 2) == 45.94
    assert counts["total"] - counts["non_embedding"] == 2 * 200064 * 6144


def test_lm_head_fp32_and_tied_embeddings():
    model = tiny_model(lm_head_fp32=True).cast_parameters(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.float32
    tied = tiny_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_last_token_only_picks_each_rows_last_valid_token():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, lengths=[7, 3], last_token_only=True)
    assert torch.allclose(last[0], full[0, 6]) and torch.allclose(last[1], full[1, 2])


def test_forward_rejects_bad_input_ids():
    model = tiny_model()
    with pytest.raises(TypeError, match="input_ids must be a tensor"):
        model([[1, 2, 3]])
    with pytest.raises(TypeError, match="input_ids must hold int64 or int32"):
        model(torch.zeros(1, 3))
    for shape in [(0, 4), (2, 0), (5,), (1, 2, 3)]:
        with pytest.raises(ValueError, match=r"input_ids must be \[B, T\] with B, T >= 1"):
            model(torch.zeros(shape, dtype=torch.long))
    for bad in (128, -1, 10**6):       # vocab_size 128: used to be an IndexError inside the embedding
        ids = torch.tensor([[1, bad, 3]])
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size = 128\)"):
            model(ids)
        cache = model.new_cache(1, 8)
        with pytest.raises(ValueError, match="input_ids must lie in"):
            model(ids, cache=cache)
        with pytest.raises(ValueError, match="input_ids must lie in"):        # a CPU decode step is checked too
            model(ids[:, 1:2], cache=cache)
        assert cache.seq_lens.tolist() == [0]
    with torch.no_grad():
        model(torch.tensor([[0, 127]], dtype=torch.int32))


def test_forward_rejects_positions_past_max_position_embeddings():
    model = tiny_model(max_position_embeddings=16)
    ids = torch.randint(0, 128, (2, 17))
    with pytest.raises(ValueError, match="position 16 .* max_position_embeddings = 16"):
        model(ids)
    with torch.no_grad():
        model(ids[:, :16])
        cache = model.new_cache(2, 32)
        model(ids[:, :10], cache=cache)
        model(ids[:, 10:15], cache=cache, lengths=[5, 3])       # slot 1 stays behind at 13 tokens
        model(ids[:, 15:16], cache=cache)                       # slot 0 reaches position 15
        with pytest.raises(ValueError, match="position 16"):
            model(ids[:, 16:17], cache=cache)
        assert cache.seq_lens.tolist() == [16, 14]
        model(ids[1:, 16:17], cache=cache, slot_idx=[1])          # slot 1 may still go on


def test_gradients_flow_to_every_parameter():
    model = tiny_model().train()
    ids = torch.randint(0, 128, (2, 9))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # every expert is used by some of 18 tokens x top-2 of 4 with high probability; router and all matrices get grads
    assert not [n for n in no_grad if "experts" not in n], no_grad
