"""The model on the GPU with the kernel backends (default dispatch: Triton / CUDA), in bf16.

Rule (docs/design.md, "Numerics", at model level): against the fp32 torch-backend forward of the same weights, the
bf16 kernel path's error stays within 2x the error of the bf16 torch-backend path, plus a small floor.
Errors are relative Frobenius norms over all logits (one bf16 routing flip moves a few logits a lot;
the norm weighs it against the whole output instead of failing on it).
"""

import pytest
import torch

from m1_kernels.model import M1Config, M1ForCausalLM, replace_hf_modules
from m1_kernels.model.config import FULL, LINEAR
from m1_kernels.model.hf import transformers_config

pytestmark = pytest.mark.gpu

# GPU-friendly small shapes (head dims the kernels tile well) and one layer pair at real M1 widths.
SMALL = M1Config(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, rotary_dim=32, intermediate_size=128, num_local_experts=4,
                 num_experts_per_tok=2, layer_types=[LINEAR, LINEAR, LINEAR, FULL])
REAL_WIDTH = M1Config.preset("minimax-m1").replace(vocab_size=1024, num_hidden_layers=2,
                                                   layer_types=[LINEAR, FULL], num_local_experts=4)


def frobenius(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def models(config, seed=0):
    """(fp32 torch-backend reference, bf16 torch-backend baseline, bf16 default-backend model), same weights."""
    torch.manual_seed(seed)
    with torch.device("cuda"):
        ref = M1ForCausalLM(config, backend="torch").eval()
    state = ref.state_dict()
    out = []
    for backend in ("torch", None):
        with torch.device("cuda"):
            m = M1ForCausalLM(config, backend=backend).eval()
        m.load_state_dict(state)
        out.append(m.cast_parameters(torch.bfloat16))
    return ref, *out


def assert_within_2x(name, out, ref, baseline, floor=2e-3):
    err, base = frobenius(out, ref), frobenius(baseline, ref)
    assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 x bf16 torch baseline {base:.3e} + {floor}"


@pytest.mark.parametrize("config", [SMALL, REAL_WIDTH], ids=["small", "real-width"])
def test_forward_bf16_kernels(config):
    ref, baseline, ours = models(config)
    ids = torch.randint(0, config.vocab_size, (2, 300), device="cuda")
    with torch.no_grad():
        assert_within_2x("logits", ours(ids), ref(ids), baseline(ids))


@pytest.mark.parametrize("config", [SMALL, REAL_WIDTH], ids=["small", "real-width"])
def test_prefill_then_decode_bf16_kernels(config):
    ref, baseline, ours = models(config, seed=1)
    lengths = [300, 129, 200]
    ids = torch.randint(0, config.vocab_size, (3, max(lengths)), device="cuda")
    with torch.no_grad():
        full = ref(ids)
        results = []
        for model in (baseline, ours):
            cache = model.new_cache(3, 320)
            prompt = [257, 64, 1]
            first = model(ids, cache=cache, lengths=prompt)
            got = torch.zeros_like(full)
            for b, n in enumerate(prompt):
                got[b, :n] = first[b, :n].float()
            while True:
                rows = [b for b in range(3) if int(cache.seq_lens[b]) < lengths[b]]
                if not rows:
                    break
                pos = [int(cache.seq_lens[b]) for b in rows]
                step = model(torch.stack([ids[b, p] for b, p in zip(rows, pos)])[:, None], cache=cache, slot_idx=rows)
                for j, (b, p) in enumerate(zip(rows, pos)):
                    got[b, p] = step[j, 0].float()
            results.append(torch.cat([got[b, :n] for b, n in enumerate(lengths)]))
        expected = torch.cat([full[b, :n] for b, n in enumerate(lengths)])
        assert_within_2x("prefill+decode logits", results[1], expected, results[0])


def test_generation_bf16_kernels():
    from m1_kernels.model import SamplingParams
    _, _, ours = models(SMALL, seed=2)
    outs = ours.generate([[1, 2, 3], [4] * 40], SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=0))
    assert [len(o.outputs[0].token_ids) for o in outs] == [16, 16]
    assert all(lp <= 0 for o in outs for lp in o.outputs[0].logprobs)


def test_replace_hf_modules_bf16_kernels():
    from transformers import MiniMaxForCausalLM
    hf_cfg = transformers_config(SMALL.replace(rotary_dim=SMALL.head_dim))
    torch.manual_seed(3)
    with torch.device("cuda"):
        hf32 = MiniMaxForCausalLM(hf_cfg).eval()
        hf16 = MiniMaxForCausalLM(hf_cfg).eval()
    hf16.load_state_dict(hf32.state_dict())
    hf16.to(torch.bfloat16)
    ids = torch.randint(0, SMALL.vocab_size, (2, 300), device="cuda")
    with torch.no_grad():
        ref = hf32(ids).logits
        before = hf16(ids).logits
        replace_hf_modules(hf16)
        after = hf16(ids).logits
    assert_within_2x("transformers bf16 after replace_hf_modules", after, ref, before)


def test_checkpoint_loads_onto_the_gpu_in_bf16(tmp_path):
    ref, _, _ = models(SMALL, seed=4)
    ref.save_pretrained(tmp_path, max_shard_bytes=1 << 20)
    loaded = M1ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(ref.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a.bfloat16(), b), name


def test_out_of_range_token_ids_raise_before_any_kernel():
    """On the GPU the range check costs one synchronisation; without it the embedding's device-side assert
    would poison the CUDA context of the whole process."""
    _, _, ours = models(SMALL, seed=5)
    ids = torch.randint(0, SMALL.vocab_size, (2, 64), device="cuda")
    ids[1, 7] = SMALL.vocab_size
    with pytest.raises(ValueError, match="input_ids must lie in"):
        ours(ids)
    ids[1, 7] = 0
    with torch.no_grad():
        assert torch.isfinite(ours(ids)).all()     # the context is intact
