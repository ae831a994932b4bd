"""The generation engine on the CPU (tiny model, torch backend; the Triton sampler under the interpreter):
greedy output against greedy decoding by full recomputation, shared prompts, continuous batching with
fewer slots than completions, chunked prefill, prefix-cache hits, seeded sampling, stop conditions, weight
updates, the command line and input errors."""

import numpy as np
import pytest
import torch

from m1_kernels.dispatch import backend_error
from m1_kernels.model import CompletionOutput, Engine, M1Config, M1ForCausalLM, RequestOutput, SamplingParams
from m1_kernels.model.generate import main as generate_main
from m1_kernels.model.sampling import filter_thresholds, gumbel_noise, row_keys, sample_torch

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(backend_error("triton", DEVICE) is not None, reason="triton backend unavailable here")


def tiny_model(seed=0, std=0.2, **changes):
    """The tiny preset with larger weights than the 0.02 init, so its distributions are peaked (no near-ties
    for greedy comparisons) and every layer matters."""
    torch.manual_seed(seed)
    model = M1ForCausalLM(M1Config.preset("tiny").replace(**changes), backend="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, std)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def small_engine(model, **kw):
    args = dict(max_num_seqs=8, max_model_len=96, page_size=4, prefix_block_size=8, max_num_batched_tokens=32)
    return Engine(model, **(args | kw))


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_greedy(model, prompt, steps):
    """Greedy decoding by recomputing the whole sequence at every step."""
    seq, tokens, logprobs = list(prompt), [], []
    for _ in range(steps):
        logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1].float(), dim=-1)
        t = int(logp.argmax())
        tokens.append(t)
        logprobs.append(logp[t].item())
        seq.append(t)
    return tokens, logprobs


@torch.no_grad()
def full_logprobs(model, prompt, tokens):
    """log_softmax of one full forward at the positions that produced `tokens`."""
    logp = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), dim=-1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def assert_idle(engine):
    """Nothing leaks: every slot free, no reservation, every page free or held by the prefix cache only."""
    s, b = engine.scheduler, engine.blocks
    assert not s.running and not s.waiting and not s.prefilling
    assert sorted(s.free_slots) == list(range(engine.max_num_seqs))
    assert b.reserved == 0
    assert b.available() == b.num_pages
    held = {p for e in b.entries.values() for p in e.pages}
    assert all(b.ref[p] == (1 if p in held else 0) for p in range(b.num_pages))


# ------------------------------------------------------------------------------------------------------
# Greedy output = greedy by full recomputation

@pytest.mark.parametrize("max_num_seqs, budget, prefix", [(8, 32, True), (3, 8, False), (2, 5, True)],
                         ids=["roomy", "few-slots-chunked", "two-slots-tiny-chunks"])
def test_greedy_matches_full_recomputation(model, max_num_seqs, budget, prefix):
    prompts = prompts_of([1, 6, 17, 40, 9])
    engine = small_engine(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          enable_prefix_caching=prefix)
    outs = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=6))
    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = full_greedy(model, prompt, 6)
        assert len(out.outputs) == 2
        for c in out.outputs:
            assert c.token_ids == tokens and c.finish_reason == "length"
            np.testing.assert_allclose(c.logprobs, logprobs, atol=1e-5, rtol=0)
    assert engine.stats["prefill_tokens"] == sum(map(len, prompts))        # each prompt prefilled once for n = 2
    assert_idle(engine)


def test_continuous_batching_interleaves_prefill_with_decode(model):
    """A long prompt arriving while others decode is prefilled in chunks while their decode continues."""
    prompts = prompts_of([3, 4, 80])
    engine = small_engine(model, max_num_seqs=2, max_num_batched_tokens=8)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == full_greedy(model, prompt, 12)[0]
    # the 80-token prompt needs 10 chunks of 8: they overlap the other completions' decode steps
    assert engine.stats["steps"] < 12 + 10 + 12


# ------------------------------------------------------------------------------------------------------
# Sampling

def test_sampled_logprobs_are_the_models_own(model):
    prompts = prompts_of([5, 23])
    engine = small_engine(model)
    for params in (SamplingParams(n=3, temperature=1.3, max_tokens=7, seed=1),
                   SamplingParams(n=3, temperature=0.7, top_k=5, top_p=0.8, max_tokens=7, seed=2)):
        outs = engine.generate(prompts, params)
        for prompt, out in zip(prompts, outs):
            assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "the n samples must differ"
            for c in out.outputs:
                np.testing.assert_allclose(c.logprobs, full_logprobs(model, prompt, c.token_ids), atol=1e-5, rtol=0)


def test_seed_reproduces_samples_whatever_is_batched(model):
    target = prompts_of([11])[0]
    others = prompts_of([4, 30, 2], seed=5)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=7)
    alone = small_engine(model).generate([target], params)[0]
    crowded = small_engine(model, max_num_seqs=3, max_num_batched_tokens=6).generate(
        [others[0], target, others[1], others[2]], params)[1]
    assert [c.token_ids for c in crowded.outputs] == [c.token_ids for c in alone.outputs]
    np.testing.assert_allclose([c.logprobs for c in crowded.outputs], [c.logprobs for c in alone.outputs], atol=1e-5)
    other_seed = small_engine(model).generate([target], SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=8))
    assert [c.token_ids for c in other_seed[0].outputs] != [c.token_ids for c in alone.outputs]


def test_identical_prompts_in_one_call_draw_differently(model):
    prompt = prompts_of([6])[0]
    outs = small_engine(model).generate([prompt, prompt], SamplingParams(temperature=1.0, max_tokens=8, seed=3))
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_unseeded_sampling_follows_torch_manual_seed(model):
    prompts = prompts_of([6, 9])
    params = SamplingParams(temperature=1.0, max_tokens=6)
    torch.manual_seed(123)
    a = small_engine(model).generate(prompts, params)
    torch.manual_seed(123)
    b = small_engine(model).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_gumbel_race_draws_from_the_tempered_distribution():
    V, R = 6, 40000
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -3.0]])
    keys = torch.from_numpy(row_keys(np.arange(R), np.full(R, 17)))
    rows = torch.zeros(R, dtype=torch.int64)
    temperature = 0.8
    inv = torch.full((R,), 1 / temperature)
    tokens, logprobs = sample_torch(logits, rows, inv, torch.full((R,), float("-inf")), keys)
    freq = torch.bincount(tokens, minlength=V).double() / R
    expected = torch.softmax(logits[0].double() / temperature, -1)
    assert (freq - expected).abs().max() < 4 * (expected * (1 - expected) / R).sqrt().max()
    assert torch.allclose(logprobs, torch.log_softmax(logits[0], -1)[tokens])
    # the uniforms behind the race: mean 1/2, no key/vocabulary structure
    u = torch.exp(-torch.exp(-gumbel_noise(keys[:2000], 512).double()))
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


def test_top_k_and_top_p_thresholds():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    probs = torch.softmax(logits[0], -1)                      # 0.64, 0.24, ...: top_p 0.7 keeps two tokens
    assert probs[1] < 0.7 < probs[1] + probs[2]
    rows, one = torch.zeros(4, dtype=torch.int64), torch.ones(4)
    top_k = torch.tensor([2, 0, 0, 1])
    top_p = torch.tensor([1.0, 0.7, 0.5, 0.7])
    floor = filter_thresholds(logits, rows, one, top_k, top_p, kmax=2, any_top_p=True)
    assert floor.tolist() == [2.0, 2.0, 3.0, 3.0]
    R = 3000
    keys = torch.from_numpy(row_keys(np.arange(R), np.zeros(R)))
    for k, p, allowed in ((2, 1.0, {1, 2}), (0, 0.7, {1, 2}), (0, 0.5, {1})):
        f = filter_thresholds(logits, torch.zeros(R, dtype=torch.int64), torch.ones(R), torch.full((R,), k),
                              torch.full((R,), p), kmax=k, any_top_p=p < 1)
        tokens, _ = sample_torch(logits, torch.zeros(R, dtype=torch.int64), torch.ones(R), f, keys)
        assert set(tokens.tolist()) == allowed


@needs_triton
def test_triton_sampler_matches_torch():
    from m1_kernels.model.sampling_triton import sample_triton
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20000, generator=g) * 3        # three pieces of the Triton sampler, the last one partial
    logits[1, [100, 9000, 19999]] = 50.0                        # a greedy row's maximum in three pieces: the first wins
    logits = logits.to(DEVICE)
    rows = torch.tensor([0, 1, 2, 2, 1, 0], device=DEVICE)
    inv_temp = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 1.0], device=DEVICE)
    keys = torch.from_numpy(row_keys([11, 12, 13, 14, 15, 16], [3, 3, 4, 9, 1, 2])).to(DEVICE)
    floor = filter_thresholds(logits, rows, inv_temp, torch.tensor([0, 0, 0, 40, 0, 0], device=DEVICE),
                              torch.tensor([1.0, 1.0, 1.0, 1.0, 0.6, 1.0], device=DEVICE), kmax=40, any_top_p=True)
    expected = sample_torch(logits, rows, inv_temp, floor, keys)
    table = torch.stack([rows, keys, rows], dim=1)                # strided per-row vectors, as the engine passes
    got = sample_triton(logits, table[:, 0], inv_temp, floor, table[:, 1])
    assert torch.equal(got[0], expected[0])
    assert torch.allclose(got[1], expected[1], atol=1e-5, rtol=0)
    assert int(got[0][1]) == int(logits[1].argmax()) == 100        # temperature 0: greedy


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's CPU run; tests/test_engine_gpu.py covers the GPU")
def test_triton_kernels_under_the_interpreter(model):
    """The engine on the Triton backends (lightning slots, paged attention, sampler) gives the torch path's
    tokens and log-probabilities. (The MoE stays on torch: its interpreted kernels take most of a minute
    and have their own tests.)"""
    triton_model = M1ForCausalLM(model.config, backend="triton").eval()
    triton_model.load_state_dict(model.state_dict())
    for layer in triton_model.model.layers:
        layer.mlp.backend = "torch"
    prompts = prompts_of([5, 11])
    params = [SamplingParams(n=2, temperature=0.0, max_tokens=2), SamplingParams(temperature=1.0, max_tokens=2, seed=4)]
    got = small_engine(triton_model, sampler_backend="triton").generate(prompts, params)
    expected = small_engine(model).generate(prompts, params)
    for a, b in zip(got, expected):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        np.testing.assert_allclose([c.logprobs for c in a.outputs], [c.logprobs for c in b.outputs], atol=1e-4)


def test_decode_step_ops_do_not_grow_with_the_batch(model):
    """The decode forward (the body of a CUDA graph) runs the same ops at every batch size: nothing loops
    over rows (a per-row op would make a step's time grow by a launch sequence per row)."""
    from torch.profiler import ProfilerActivity, profile
    engine = small_engine(model)
    counts = []
    for b in (1, 8):
        engine._dec_slot[:b] = torch.arange(b)
        engine._dec_pos[:b] = 3                                   # token 3: each slot's first page, its own
        engine.cache.block_tables[:b, 0] = torch.arange(b, dtype=torch.int32)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            engine._decode_forward(b)
        counts.append({e.key: e.count for e in prof.key_averages() if not e.key.startswith(
            ("aten::as_strided", "aten::view", "aten::to", "aten::copy_", "aten::fill_", "aten::resolve"))})
    assert counts[0] == counts[1]


def test_decode_step_projections_are_single_matrix_products():
    """No linear layer of a decode step runs as a batched product: with frozen weights, torch's matmul runs a
    transposed [B, 1, hidden] view as B matrix-vector products, each reading the whole weight (33 ms of a 38 ms
    step at B = 64 on the H200)."""
    from torch.profiler import ProfilerActivity, profile
    engine = small_engine(tiny_model().requires_grad_(False))
    b = 4
    engine._dec_slot[:b] = torch.arange(b)
    engine._dec_pos[:b] = 3
    engine.cache.block_tables[:b, 0] = torch.arange(b, dtype=torch.int32)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        engine._decode_forward(b)

    def batched(event):
        return event.name == "aten::bmm" or any(batched(c) for c in event.cpu_children)
    linear = [e for e in prof.events() if e.name == "aten::linear"]
    assert linear and not [e.input_shapes[0] for e in linear if batched(e)]


# ------------------------------------------------------------------------------------------------------
# Stops, limits, waiting for memory

def test_stop_tokens_end_completions_and_are_kept(model):
    prompts = prompts_of([5, 2])
    engine = small_engine(model)
    free = engine.generate(prompts, GREEDY)
    stop = free[0].outputs[0].token_ids[2]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[stop]))
    assert outs[0].outputs[0].token_ids == free[0].outputs[0].token_ids[:3]
    assert outs[0].outputs[0].finish_reason == "stop"
    other = free[1].outputs[0].token_ids
    end = other.index(stop) + 1 if stop in other else 6
    assert outs[1].outputs[0].token_ids == other[:end]
    assert_idle(engine)


def test_repetition_stop(model):
    engine = small_engine(model)
    out = engine.generate([[1, 2]], SamplingParams(temperature=0.0, max_tokens=10, repetition_stop=(4, 0.0)))
    assert out[0].outputs[0].finish_reason == "repetition" and len(out[0].outputs[0].token_ids) == 4
    out = engine.generate([[1, 2]], SamplingParams(temperature=0.0, max_tokens=10, repetition_stop=(2, 0.999999)))
    assert out[0].outputs[0].finish_reason == "length" and len(out[0].outputs[0].token_ids) == 10
    # the count restarts in a reused slot: a second completion in the same slot needs its own 4 tokens
    out = small_engine(model, max_num_seqs=1).generate(
        [[1, 2], [3]], SamplingParams(temperature=0.0, max_tokens=10, repetition_stop=(4, 0.0)))
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]


def test_max_model_len_caps_completions(model):
    engine = small_engine(model, max_model_len=20)
    out = engine.generate([prompts_of([17])[0]], SamplingParams(temperature=0.0, max_tokens=10))
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].outputs[0].finish_reason == "length"


def test_requests_wait_for_pages(model):
    """With pages for about two requests at a time, the others wait; the results do not change."""
    prompts = prompts_of([9, 14, 5, 21, 3])
    params = SamplingParams(n=2, temperature=0.0, max_tokens=5)
    roomy = small_engine(model).generate(prompts, params)
    tight = small_engine(model, num_pages=16, enable_prefix_caching=False)
    got = tight.generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in roomy]
    assert_idle(tight)


def test_an_interrupted_call_leaves_the_engine_usable(model, monkeypatch):
    engine = small_engine(model)
    prompts = prompts_of([12, 30, 4])
    draw, calls = engine._draw, []

    def failing(groups):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return draw(groups)
    monkeypatch.setattr(engine, "_draw", failing)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompts, GREEDY)
    monkeypatch.undo()
    assert_idle(engine)
    for prompt, out in zip(prompts, engine.generate(prompts, GREEDY)):
        assert out.outputs[0].token_ids == full_greedy(model, prompt, 6)[0]


# ------------------------------------------------------------------------------------------------------
# Prefix cache

def test_prefix_cache_hits_give_the_same_tokens_and_logprobs(model):
    system = prompts_of([27], seed=3)[0]                      # 3 blocks of 8 and 3 tokens
    prompts = [system + p for p in prompts_of([2, 7, 12], seed=4)]
    params = [SamplingParams(temperature=0.0, max_tokens=6), SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=5),
              SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, seed=6)]
    reference = small_engine(model, enable_prefix_caching=False).generate(prompts, params)
    engine = small_engine(model)
    first = engine.generate(prompts[:1], params[:1])
    assert engine.stats["cached_tokens"] == 0
    again = engine.generate(prompts, params)
    assert engine.stats["cached_tokens"] >= 24 * 3               # every prompt found the system prompt's blocks
    for outs in (first, again):
        for out, ref in zip(outs, reference):
            assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
            for c, r in zip(out.outputs, ref.outputs):
                np.testing.assert_allclose(c.logprobs, r.logprobs, atol=1e-5, rtol=0)
    assert_idle(engine)


def test_prefix_cache_multi_turn_history(model):
    """Turn 2 sends turn 1's prompt, its answer and a new message: turn 1's blocks are not prefilled again."""
    engine = small_engine(model)
    turn1 = prompts_of([30], seed=9)[0]
    answer = engine.generate([turn1], GREEDY)[0].outputs[0].token_ids
    turn2 = turn1 + answer + prompts_of([5], seed=10)[0]
    before = engine.stats["prefill_tokens"]
    out = engine.generate([turn2], GREEDY)[0].outputs[0]
    assert engine.stats["prefill_tokens"] - before <= len(turn2) - 24
    assert out.token_ids == full_greedy(model, turn2, 6)[0]


def test_one_snapshot_claimed_twice_in_a_step(model):
    """Two prompts finishing blocks in one step with room for one snapshot: the entry that keeps it holds
    its own prompt's state (the later claim wins on the device too)."""
    engine = small_engine(model, max_prefix_snapshots=1)
    a, b = prompts_of([19, 21], seed=30)
    engine.generate([a, b], GREEDY)
    owner = [e for e in engine.blocks.entries.values() if e.snapshot is not None]
    assert len(owner) == 1
    hit = (b if owner[0].name in engine.blocks.block_hashes(b) else a)[:16] + [5, 6, 7]
    assert engine.generate([hit], GREEDY)[0].outputs[0].token_ids == full_greedy(model, hit, 6)[0]
    assert engine.stats["cached_tokens"] == 16


def test_prefix_cache_eviction_under_page_pressure(model):
    """Cached blocks give their pages back when requests need them; snapshots are bounded."""
    engine = small_engine(model, num_pages=40, max_prefix_snapshots=2)
    for seed in range(6):
        outs = engine.generate(prompts_of([33, 20], seed=20 + seed), GREEDY)
        assert len(engine.blocks.entries) * engine.blocks.pages_per_block <= 40
        assert sum(e.snapshot is not None for e in engine.blocks.entries.values()) <= 2
    for prompt, out in zip(prompts_of([33, 20], seed=25), outs):
        assert out.outputs[0].token_ids == full_greedy(model, prompt, 6)[0]
    assert_idle(engine)


# ------------------------------------------------------------------------------------------------------
# Weights, convenience, command line

def test_update_weights_in_place_and_drops_the_prefix_cache():
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    prompts = prompts_of([20, 5])
    engine = small_engine(old)
    pointers = [p.data_ptr() for p in old.parameters()]
    engine.generate(prompts, GREEDY)
    assert engine.blocks.entries
    engine.update_weights(new)
    assert not engine.blocks.entries
    assert [p.data_ptr() for p in old.parameters()] == pointers
    got = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, got):
        assert out.outputs[0].token_ids == full_greedy(new, prompt, 6)[0]
    engine.update_weights(tiny_model(seed=1).state_dict())
    assert engine.generate(prompts[:1], GREEDY)[0].outputs[0].token_ids == full_greedy(old, prompts[0], 6)[0]
    with pytest.raises(ValueError, match="missing keys.*lm_head.weight"):
        engine.update_weights({k: v for k, v in new.state_dict().items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="model.norm.weight has shape"):
        engine.update_weights(new.state_dict() | {"model.norm.weight": torch.ones(3)})
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        engine.update_weights([1, 2])


def test_model_generate_is_a_one_off_engine(model):
    prompts = prompts_of([4, 13])
    outs = model.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=5))
    assert isinstance(outs[0], RequestOutput) and isinstance(outs[0].outputs[0], CompletionOutput)
    for prompt, out in zip(prompts, outs):
        assert [c.token_ids for c in out.outputs] == [full_greedy(model, prompt, 5)[0]] * 2


def test_command_line(capsys, tmp_path):
    generate_main(["--preset", "tiny", "--prompt", "1,2,3", "--prompt", "4", "--max-tokens", "3", "--n", "2",
                   "--device", "cpu"])
    text = capsys.readouterr().out
    assert "prompt [1, 2, 3] [1] ->" in text and "tokens/s" in text
    tiny_model().save_pretrained(tmp_path)
    generate_main(["--checkpoint", str(tmp_path), "--max-tokens", "2", "--temperature", "0.7", "--top-p", "0.9",
                   "--device", "cpu"])
    assert "prompt [1, 2, 3, 4] [0] ->" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "a,b"], "'a,b' is not a comma-separated list of token ids"),
    (["--preset", "huge"], "unknown preset 'huge'; choose one of"),
    (["--preset", "minimax-m1", "--device", "cpu"], r"preset 'minimax-m1' needs \d+\.\d GiB of float32 weights"),
    (["--temperature", "-1"], "temperature must be finite and >= 0"),
    (["--prompt", "1,999", "--device", "cpu"], r"prompts\[0\] holds token ids in \[1, 999\], outside \[0, vocab_size = 128\)"),
    (["--backend", "jax"], "invalid choice: 'jax'"),
])
def test_command_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        generate_main(argv)
    assert __import__("re").search(message, capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------------
# Input errors

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(n=0), ValueError, "SamplingParams.n must be >= 1"),
    (dict(n=2.0), TypeError, "SamplingParams.n must be an int"),
    (dict(temperature=-0.1), ValueError, "SamplingParams.temperature"),
    (dict(temperature=float("nan")), ValueError, "SamplingParams.temperature"),
    (dict(temperature="hot"), TypeError, "SamplingParams.temperature must be a number"),
    (dict(top_p=0.0), ValueError, "SamplingParams.top_p"),
    (dict(top_p=1.5), ValueError, "SamplingParams.top_p"),
    (dict(top_k=-1), ValueError, "SamplingParams.top_k"),
    (dict(max_tokens=0), ValueError, "SamplingParams.max_tokens"),
    (dict(stop_token_ids=5), TypeError, "SamplingParams.stop_token_ids"),
    (dict(stop_token_ids=[1, -2]), ValueError, "SamplingParams.stop_token_ids"),
    (dict(repetition_stop=(0, 0.5)), ValueError, "SamplingParams.repetition_stop"),
    (dict(repetition_stop=(3, 1.0)), ValueError, "SamplingParams.repetition_stop"),
    (dict(repetition_stop=3), TypeError, "SamplingParams.repetition_stop"),
    (dict(seed=-1), ValueError, "SamplingParams.seed"),
    (dict(seed=1.5), TypeError, "SamplingParams.seed"),
])
def test_bad_sampling_params(kwargs, error, message):
    with pytest.raises(error, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompts, error, message", [
    (torch.tensor([[1, 2]]), TypeError, "got a tensor"),
    ([1, 2, 3], TypeError, "flat list of ints"),
    ([], ValueError, "prompts is empty"),
    ([[1], []], ValueError, r"prompts\[1\] is empty"),
    ([[1], torch.tensor([2])], TypeError, r"prompts\[1\] must be a list"),
    ([[1, 2.5]], TypeError, r"prompts\[0\] must hold ints"),
    ([[1, True]], TypeError, r"prompts\[0\] must hold ints"),
    ([[1, [2]]], TypeError, r"prompts\[0\] must hold ints"),
    ([[2 ** 70]], TypeError, r"prompts\[0\] must hold ints"),
    ([[0, 128]], ValueError, r"prompts\[0\] holds token ids in \[0, 128\], outside \[0, vocab_size = 128\)"),
    ([[-1]], ValueError, r"outside \[0, vocab_size"),
    ([[1] * 96], ValueError, r"prompts\[0\] has 96 tokens; max_model_len = 96"),
    ("1,2", TypeError, "list of token-id lists"),
])
def test_bad_prompts(model, prompts, error, message):
    with pytest.raises(error, match=message):
        small_engine(model).generate(prompts, GREEDY)


def test_bad_engine_arguments_and_requests(model):
    with pytest.raises(ValueError, match="max_model_len = 5000 exceeds the config's max_position_embeddings = 4096"):
        Engine(model, max_model_len=5000)
    with pytest.raises(ValueError, match="prefix_block_size"):
        Engine(model, max_model_len=64, page_size=16, prefix_block_size=24)
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        Engine(model, max_num_seqs=0, max_model_len=64)
    with pytest.raises(TypeError, match="M1ForCausalLM"):
        Engine(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on a CUDA device"):
        Engine(model, max_model_len=64, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs .* GiB of lightning states"):
        Engine(model, max_model_len=64, cache_memory_bytes=1000)
    engine = small_engine(model, num_pages=10)
    with pytest.raises(ValueError, match=r"SamplingParams.n = 9 exceeds the engine's max_num_seqs = 8"):
        engine.generate([[1]], SamplingParams(n=9))
    with pytest.raises(ValueError, match=r"prompts\[0\] with n = 4 .* more than the engine's num_pages = 10"):
        engine.generate([[1] * 20], SamplingParams(n=4, max_tokens=30))
    with pytest.raises(ValueError, match="stop_token_ids \\[500\\] lie outside the vocabulary"):
        engine.generate([[1]], SamplingParams(stop_token_ids=[500]))
    with pytest.raises(ValueError, match="sampling_params lists 2 entries for 1 prompts"):
        engine.generate([[1]], [GREEDY, GREEDY])
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        engine.generate([[1]], {"temperature": 0})
    assert_idle(engine)
