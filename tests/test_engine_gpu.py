"""The engine on the GPU in bf16 with the default (Triton / CUDA) kernels.

bf16 steps do not reproduce a full forward bit for bit, so generated sequences are checked teacher-forced:
the fp32 torch-backend model recomputes the log-probabilities of the engine's tokens, and the engine's
error against it must stay within 2x the error of the bf16 torch-backend model (plus a small floor); a
greedy token must be the fp32 model's argmax wherever the fp32 model's top-2 margin is clearly larger
than the bf16 baseline's error there. The CUDA-graph path must equal the eager path bit for bit (same
kernels, same shapes).
"""

import pytest
import torch

from m1_kernels.model import Engine, M1Config, M1ForCausalLM, SamplingParams
from m1_kernels.model.config import FULL, LINEAR
from m1_kernels.model.lm_head import lm_head_logits

pytestmark = pytest.mark.gpu

SMALL = M1Config(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, rotary_dim=32, intermediate_size=128, num_local_experts=4,
                 num_experts_per_tok=2, layer_types=[LINEAR, LINEAR, LINEAR, FULL])
PAGES = 1024   # fixed cache sizes: the default takes most of the GPU, which pytest-xdist workers share
REAL_WIDTH = M1Config.preset("minimax-m1").replace(vocab_size=1024, num_hidden_layers=2,
                                                   layer_types=[LINEAR, FULL], num_local_experts=4)


def models(config, seed=0):
    """(fp32 torch-backend reference, bf16 torch-backend baseline, bf16 default-backend model), same weights."""
    torch.manual_seed(seed)
    with torch.device("cuda"):
        ref = M1ForCausalLM(config, backend="torch").eval()
        with torch.no_grad():
            for p in ref.parameters():
                if p.ndim > 1:
                    p.normal_(0.0, 0.05 if config.hidden_size < 1024 else 0.02)
    out = []
    for backend in ("torch", None):
        with torch.device("cuda"):
            m = M1ForCausalLM(config, backend=backend).eval()
        m.load_state_dict(ref.state_dict())
        out.append(m.cast_parameters(torch.bfloat16))
    return ref, *out


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def teacher_forced(model, prompt, tokens):
    """Log-probabilities [len(tokens), V] (fp32-accurate head) of one full forward over prompt + tokens."""
    hidden = model.model(torch.tensor([prompt + tokens], device="cuda"))[0, len(prompt) - 1:-1]
    return torch.log_softmax(lm_head_logits(hidden, model.lm_head.weight), dim=-1)


def check_against_reference(outs, prompts, ref, baseline, greedy, floor=2e-3):
    errors, base_errors = [], []
    for prompt, out in zip(prompts, outs):
        for c in out.outputs:
            tokens = torch.tensor(c.token_ids, device="cuda")[:, None]
            exact = teacher_forced(ref, prompt, c.token_ids)
            base = teacher_forced(baseline, prompt, c.token_ids)
            got = torch.tensor(c.logprobs, device="cuda")
            errors.append((got - exact.gather(1, tokens)[:, 0]).abs().max())
            base_errors.append((base.gather(1, tokens) - exact.gather(1, tokens)).abs().max())
            if greedy:
                top2 = exact.topk(2, dim=-1).values
                clear = (top2[:, 0] - top2[:, 1]) > 5 * (base - exact).abs().amax(-1) + 1e-3
                assert torch.equal(tokens[:, 0][clear], exact.argmax(-1)[clear]), "greedy token differs where clear"
            break  # teacher-forcing every sample is slow at real width; the first one of each prompt suffices
    err, base = max(errors).item(), max(base_errors).item()
    assert err <= 2 * base + floor, f"engine log-prob error {err:.3e} > 2 x bf16 torch baseline {base:.3e} + {floor}"


@pytest.mark.parametrize("config", [SMALL, REAL_WIDTH], ids=["small", "real-width"])
def test_engine_bf16_against_the_fp32_model(config):
    ref, baseline, ours = models(config)
    prompts = prompts_of([1, 37, 300, 129], config.vocab_size)
    engine = Engine(ours, max_num_seqs=16, max_model_len=512, max_num_batched_tokens=256, prefix_block_size=64,
                    num_pages=PAGES)
    greedy = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=24))
    check_against_reference(greedy, prompts, ref, baseline, greedy=True)
    sampled = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, top_p=0.95, max_tokens=24, seed=0))
    check_against_reference(sampled, prompts, ref, baseline, greedy=False)
    assert all(len(c.token_ids) == 24 for o in sampled for c in o.outputs)


def test_cuda_graphs_equal_eager():
    _, _, ours = models(SMALL, seed=1)
    prompts = prompts_of([3, 50, 200, 7, 90], SMALL.vocab_size, seed=1)
    params = [SamplingParams(n=2, temperature=0.0, max_tokens=20), SamplingParams(n=3, temperature=0.8, max_tokens=20, seed=1),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=20, seed=2),
              SamplingParams(n=2, temperature=1.2, top_p=0.9, max_tokens=20, seed=3),
              SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[7, 11])]
    results = []
    for graphs in (True, False):
        engine = Engine(ours, max_num_seqs=6, max_model_len=256, max_num_batched_tokens=64, cuda_graphs=graphs,
                        num_pages=PAGES)
        assert bool(engine._graphs) == graphs
        results.append(engine.generate(prompts, params))
    for a, b in zip(*results):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.logprobs for c in a.outputs] == [c.logprobs for c in b.outputs]
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs]


def test_same_call_same_output_and_prefix_cache_hits():
    ref, baseline, ours = models(SMALL, seed=2)
    system = prompts_of([320], SMALL.vocab_size, seed=3)[0]
    prompts = [system + p for p in prompts_of([5, 40, 17], SMALL.vocab_size, seed=4)]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=5)
    engine = Engine(ours, max_num_seqs=8, max_model_len=512, max_num_batched_tokens=128, prefix_block_size=64,
                    num_pages=PAGES)
    first = engine.generate(prompts[:1], params)
    second = engine.generate(prompts[:1], params)
    assert [c.token_ids for c in first[0].outputs] == [c.token_ids for c in second[0].outputs]
    before = engine.stats["prefill_tokens"]
    hit = engine.generate(prompts, params)
    assert engine.stats["cached_tokens"] >= 3 * 256
    assert engine.stats["prefill_tokens"] - before < sum(map(len, prompts)) - 2 * 256
    check_against_reference(hit, prompts, ref, baseline, greedy=False)


def test_triton_sampler_matches_torch_at_m1_vocabulary():
    from m1_kernels.model.sampling import filter_thresholds, row_keys, sample_torch
    from m1_kernels.model.sampling_triton import sample_triton
    g = torch.Generator(device="cuda").manual_seed(0)
    R, V = 64, 200064
    logits = torch.randn(R, V, device="cuda", generator=g) * 4
    rows = torch.arange(R, device="cuda")
    inv_temp = torch.rand(R, device="cuda", generator=g) * 2
    inv_temp[::7] = 0.0
    keys = torch.from_numpy(row_keys(range(R), range(R))).cuda()
    top_k = torch.where(rows % 3 == 0, 50, 0)
    top_p = torch.where(rows % 5 == 0, 0.9, 1.0)
    floor = filter_thresholds(logits, rows, inv_temp, top_k, top_p, kmax=50, any_top_p=True)
    expected = sample_torch(logits, rows, inv_temp, floor, keys)
    got = sample_triton(logits, rows, inv_temp, floor, keys)
    assert (got[0] == expected[0]).float().mean() == 1.0
    assert torch.allclose(got[1], expected[1], atol=1e-4, rtol=0)


def test_update_weights_keeps_the_graphs_valid():
    _, _, a = models(SMALL, seed=6)
    _, _, b = models(SMALL, seed=7)
    prompts = prompts_of([12, 60], SMALL.vocab_size, seed=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    engine = Engine(a, max_num_seqs=4, max_model_len=128, num_pages=PAGES)
    engine.generate(prompts, greedy)
    engine.update_weights(b.state_dict())
    fresh = Engine(b, max_num_seqs=4, max_model_len=128, num_pages=PAGES)
    assert [o.outputs[0].token_ids for o in engine.generate(prompts, greedy)] == \
        [o.outputs[0].token_ids for o in fresh.generate(prompts, greedy)]


def test_decode_steps_do_not_synchronise():
    """Once the prompts are in, a step's only wait is for the previous step's tokens (an event): a call that
    synchronises the stream (a copy from pageable memory, .item(), indexing with a list) makes the host wait
    for the step it has just launched, and host and device take turns instead of overlapping."""
    _, _, ours = models(SMALL, seed=6)
    engine = Engine(ours, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64, num_pages=PAGES)
    advance, steps = engine._advance, []

    def checked():
        # step 1 prefills both prompts; step 2 launches the first decode and reads step 1
        torch.cuda.set_sync_debug_mode("error" if len(steps) >= 2 else "default")
        try:
            return advance()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            steps.append(None)
    engine._advance = checked
    params = [SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=40, seed=7),
              SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[3], repetition_stop=(30, 0.99))]
    outs = engine.generate(prompts_of([40, 9], SMALL.vocab_size, seed=8), params)   # crosses 16-token pages
    assert len(steps) >= 30 and all(c.token_ids for o in outs for c in o.outputs)
