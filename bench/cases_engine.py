"""The generation engine on the real-width 8-layer slice (7 lightning + 1 softmax layer, 4 experts top-2,
vocabulary 200064; 19.5 GB of bf16 weights): decode steps against their floor, the RL-shaped workload
against the pre-engine loop and `transformers`, and the prefix cache's time to first token.

(a) Decode step at B = 1, 8, 64, 256 and contexts 1K, 32K. B completions are placed in the engine at the
    given context without prefilling them (their lightning states and KV pages hold random values: the
    step's time does not depend on them). Two rows per shape: "ours[graph]" replays the decode CUDA graph
    (forward and LM head) and "ours[step]" is a whole engine step (inputs up, graph, sampling, stop
    checks, the host's read of the tokens and its bookkeeping). Floor: bytes a step must move over the
    copy bandwidth measured in the run: the weights a step can touch (attention, router, LM head, and of
    each MoE layer min(E, top_k * B) experts), the lightning states read and written (fp32), and the KV
    read (B x context tokens per softmax layer).
(b) Prefix cache: time to first token of a request whose 8K-token prefix is cached (an earlier request
    shared it) against the same request with the cache cleared.
(c) RL-shaped workload (printed by report()): 64 prompts of 256-2048 tokens (uniform), n = 8, up to
    RL_TOKENS new tokens (env M1_BENCH_RL_TOKENS, default 1024), temperature 1, with a set of stop tokens
    that ends about half the completions early: tokens/s, wall time, GPU memory high-water mark. The
    pre-engine static loop (bench/pre_engine_generate.py) and `transformers`' generate cannot run that
    workload in the time of a bench run, so all three run two smaller ones: "reduced", the 64 prompts once
    each (n = 1), 64 greedy tokens, no stop tokens (mostly prefill; times compare); and "sample", the first
    8 prompts with the workload's n = 8, temperature 1 and stop tokens, up to 256 new tokens (its mix of
    shared prompts and sampled decoding; generated tokens per second compare). Our engine is built (its
    cache sized, its graphs captured) before each run's clock starts, as a server or a trainer builds it
    once; the build time is reported beside it. Every implementation first generates 8 tokens for its
    first 16 rows, untimed, so that first-use compilation and tuning for the workload's shapes stays out of
    the clocks (the runs are what a trainer's repeated calls see). The baselines run in batches of 16
    left-padded rows, `transformers` with its eager attention (its SDPA path fails on this padding mask:
    see rl_workload).

Without a GPU everything runs the "tiny" preset on the CPU at small sizes: a smoke test, not speed.
"""

import dataclasses
import json
import math
import os
import random
import time

import torch

from m1_kernels.model import Engine, SamplingParams
from m1_kernels.model.scheduler import RUNNING, Completion, Request

from .cases_model import slice_models
from .harness import Case

_shared = {}   # the slice (ours and transformers sharing weights) and the decode engine, built once


def _sizes(device):
    if device.type == "cuda":
        return dict(batches=(1, 8, 64, 256), contexts=(1024, 32768), prefix=8192, suffix=64,
                    rl=dict(prompts=64, lengths=(256, 2048), n=8, tokens=int(os.environ.get("M1_BENCH_RL_TOKENS", 1024)),
                            reduced_tokens=64, sample_prompts=8, sample_tokens=256, baseline_batch=16,
                            warmup_tokens=8))
    return dict(batches=(1, 4), contexts=(64, 256), prefix=256, suffix=8,
                rl=dict(prompts=4, lengths=(16, 64), n=2, tokens=16, reduced_tokens=8, sample_prompts=2, sample_tokens=8,
                        baseline_batch=2, warmup_tokens=2))


def _models(device):
    if "models" not in _shared:
        _shared["models"] = slice_models(device, with_hf=True)
    return _shared["models"]


def _release():
    _shared.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------
# (a) decode steps

def step_bytes(config, B, context, elem=2) -> float:
    """Bytes one decode step of B rows at `context` must move (see the module docstring)."""
    h, H, D, Hkv = config.hidden_size, config.num_attention_heads, config.head_dim, config.num_key_value_heads
    n_lin, n_full = len(config.linear_layers), len(config.full_layers)
    experts = min(config.num_local_experts, config.num_experts_per_tok * B)
    weights = (n_lin * 5 * h * H * D + n_full * (2 * h * H * D + 2 * h * Hkv * D)
               + config.num_hidden_layers * (h * config.num_local_experts + experts * 3 * h * config.intermediate_size)
               + h * config.vocab_size) * elem
    states = B * n_lin * H * D * D * 4 * 2
    kv = B * n_full * context * 2 * Hkv * D * elem
    return weights + states + kv


def _decode_engine(device, sizes):
    if "decode_engine" not in _shared:
        model = _models(device)["hybrid"]
        longest = max(sizes["contexts"]) + 1024
        B = max(sizes["batches"])
        engine = Engine(model, max_num_seqs=B, max_model_len=longest, num_pages=B * math.ceil(longest / 16),
                        enable_prefix_caching=False, max_num_batched_tokens=1024, cuda_graph_sizes=sizes["batches"])
        with torch.no_grad():                  # random keys/values and states: decode time does not depend on them
            for pages in (*engine.cache.keys.values(), *engine.cache.values.values()):
                pages.normal_()
        _shared["decode_engine"] = engine
    return _shared["decode_engine"]


def place_running(engine, B, context):
    """Make B completions run in `engine` at `context` cached tokens without prefilling them (the previous
    ones are dropped). Their states are random; the next step decodes token `context` of each."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    engine._in_flight = None                  # the previous case's last step is done and its tokens unneeded
    sched, blocks = engine.scheduler, engine.blocks
    for c in list(sched.running):
        blocks.decref(c.pages)
        blocks.reserved -= c.reserved
        sched.free_slots.append(c.slot)
        sched.running.remove(c)
    params = SamplingParams(temperature=1.0, max_tokens=engine.max_model_len)
    P = engine.page_size
    for b in range(B):
        request = Request(b, [0] * context, params, [b], engine.max_model_len - context, state=RUNNING)
        slot = sched.free_slots.pop()
        need = math.ceil(engine.max_model_len / P)
        blocks.reserved += need
        pages = [blocks.allocate() for _ in range(math.ceil((context + 1) / P))]
        for i, page in enumerate(pages):
            sched.device_ops.append(("table", slot, i, page))
        c = Completion(request, 0, slot, pages, context, b, need - len(pages), tokens=[1])
        request.completions = [c]
        sched.running.append(c)
    engine._run_device_ops()
    with torch.no_grad():
        for state in engine.cache.lightning_states.values():
            state.normal_(0.0, 0.05)


def decode_case(device, sizes, B, context):
    def make():
        engine = _decode_engine(device, sizes)
        place_running(engine, B, context)
        with torch.no_grad():
            engine._decode(engine.scheduler.running)      # fills the decode buffers for the graph rows
        return {"engine": engine}

    def graph(inputs):
        engine = inputs["engine"]
        with torch.no_grad():
            if engine._graphs:
                engine._graphs[next(b for b in engine.buckets if b >= B)][0].replay()
            else:
                engine._decode_forward(B)

    def step(inputs):
        inputs["engine"]._advance()          # launches a step and reads the one before: the steady state

    config = _models(device)["hybrid"].config
    elem = 2 if device.type == "cuda" else 4
    return Case("engine decode step", f"slice decode B{B} ctx {context}", make,
                {"ours[graph]": graph, "ours[step]": step}, bytes=step_bytes(config, B, context, elem), max_sets=1,
                params=dict(B=B, context=context))


# ------------------------------------------------------------------------------------------------------
# (b) prefix cache: time to first token

def ttft_case(device, sizes):
    prefix_len, suffix_len = sizes["prefix"], sizes["suffix"]

    def make():
        _shared.pop("decode_engine", None)         # the decode cases are done: their cache goes
        model = _models(device)["hybrid"]
        V = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prefix = torch.randint(0, V, (prefix_len,), generator=g).tolist()
        prompts = [prefix + torch.randint(0, V, (suffix_len,), generator=g).tolist() for _ in range(2)]
        length = prefix_len + suffix_len + 8
        engine = Engine(model, max_num_seqs=4, max_model_len=length, num_pages=8 * math.ceil(length / 16),
                        max_num_batched_tokens=prefix_len, prefix_block_size=256 if device.type == "cuda" else 32,
                        max_prefix_snapshots=4)
        first = SamplingParams(temperature=0.0, max_tokens=1)
        engine.generate(prompts[:1], first)      # caches the prefix (a snapshot at its end)
        return {"engine": engine, "prompt": prompts[1], "params": first}

    def cached(inputs):
        inputs["engine"].generate([inputs["prompt"]], inputs["params"])

    def uncached(inputs):
        inputs["engine"].blocks.clear()           # (host bookkeeping only)
        inputs["engine"].generate([inputs["prompt"]], inputs["params"])

    # the harness times every call of the first impl, then of the second: the cached calls all hit
    return Case("engine prefix cache", f"slice TTFT prefix {prefix_len} + {suffix_len}", make,
                {"ours[cached prefix]": cached, "prefix cache cleared": uncached}, max_sets=1,
                params=dict(prefix=prefix_len, suffix=suffix_len))


def cases(device):
    sizes = _sizes(device)
    return ([decode_case(device, sizes, B, ctx) for ctx in sizes["contexts"] for B in sizes["batches"]]
            + [ttft_case(device, sizes)])


# ------------------------------------------------------------------------------------------------------
# (c) the RL-shaped workload, run by report()

def _rl_prompts(V, count, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def _measure(device, fn):
    """(result, seconds, peak GiB allocated during fn)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return out, seconds, peak


def rl_workload(device) -> dict:
    """Run (c); returns its figures."""
    sizes = _sizes(device)["rl"]
    models = _models(device)
    ours, hf = models["hybrid"], models["hf"]
    config = ours.config
    V = config.vocab_size
    prompts = _rl_prompts(V, sizes["prompts"], sizes["lengths"])
    N = sizes["tokens"]
    # Stop tokens: a spread-out set holding 0.7 / N of a uniform distribution's mass, so that about half of
    # the completions of a random model stop before N tokens ((1 - 0.7 / N)^N ~ 0.5).
    count = max(1, round(0.7 * V / N))
    stops = list(range(0, V, V // count))[:count]
    weights_gib = sum(p.numel() * p.element_size() for p in ours.parameters()) / 2**30
    longest = sizes["lengths"][1] + N
    results = {"workload": dict(prompts=len(prompts), prompt_lengths=sizes["lengths"], n=sizes["n"], max_tokens=N,
                                stop_tokens=len(stops), prompt_tokens=sum(map(len, prompts))),
               "weights_GiB": weights_gib}

    warm_tokens, rows = sizes["warmup_tokens"], sizes["baseline_batch"]

    def warmed(first, run):
        """_measure(run) after an untimed first(): each implementation generates warm_tokens tokens for its
        first batch of rows before its clock starts, so that the kernels' first-use compilation and tuning
        for the workload's shapes stay out of every implementation's time alike."""
        first()
        return _measure(device, run)

    def run_engine(batch, params, max_len, seqs):
        """(outputs, seconds, peak GiB, build seconds). The engine is built (cache sized, graphs captured)
        before the clock starts, as a server or a trainer builds it once for many generate calls, and warmed
        up as every implementation is."""
        t0 = time.perf_counter()
        engine = Engine(ours, max_num_seqs=seqs, max_model_len=max_len,
                        num_pages=seqs * math.ceil(max_len / 16) + 64 * 16)
        build = time.perf_counter() - t0

        def first():
            engine.generate(batch[:max(1, rows // params.n)], dataclasses.replace(params, max_tokens=warm_tokens))
            engine.update_weights(ours)     # the engine's own model: only drops the prefix cache the warm-up filled
        return (*warmed(first, lambda: engine.generate(batch, params)), build)

    full = SamplingParams(n=sizes["n"], temperature=1.0, max_tokens=N, stop_token_ids=stops, seed=0)
    outs, seconds, peak, build = run_engine(prompts, full, longest, 256 if device.type == "cuda" else 8)
    lengths = [len(c.token_ids) for o in outs for c in o.outputs]
    reasons = [c.finish_reason for o in outs for c in o.outputs]
    results["full"] = dict(seconds=seconds, tokens=sum(lengths), tokens_per_s=sum(lengths) / seconds, peak_GiB=peak,
                           engine_build_s=build, mean_length=sum(lengths) / len(lengths),
                           finish_reasons={r: reasons.count(r) for r in sorted(set(reasons))})

    # The baselines against ours on two workloads they can finish in a bench run:
    # "reduced": every prompt once, a few greedy tokens (mostly prefill; every implementation makes the same
    #   number of tokens, so times compare);
    # "sample": the first prompts with the full workload's n, temperature and stop tokens, fewer new tokens
    #   (its mix of shared prompts and sampled decoding; the baselines decode the n copies of a prompt as
    #   separate rows, which is how they run it). Completions differ, so generated tokens per second compare.
    reduced_tokens, sample_tokens, n = sizes["reduced_tokens"], sizes["sample_tokens"], sizes["n"]
    sample_prompts = prompts[:sizes["sample_prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=reduced_tokens)
    sampled = SamplingParams(n=n, temperature=1.0, max_tokens=sample_tokens, stop_token_ids=stops, seed=0)
    comparisons = {"reduced": {}, "sample": {}}
    _, seconds, peak, build = run_engine(prompts, greedy, sizes["lengths"][1] + reduced_tokens, min(256, len(prompts)))
    comparisons["reduced"]["ours"] = dict(seconds=seconds, peak_GiB=peak, tokens=len(prompts) * reduced_tokens,
                                          engine_build_s=build)
    outs, seconds, peak, build = run_engine(sample_prompts, sampled, sizes["lengths"][1] + sample_tokens,
                                            len(sample_prompts) * n)
    comparisons["sample"]["ours"] = dict(seconds=seconds, peak_GiB=peak, engine_build_s=build,
                                         tokens=sum(len(c.token_ids) for o in outs for c in o.outputs))

    # The baselines take rows in batches of `baseline_batch`: in one batch of 64 padded to 2048 tokens the
    # pre-engine loop's masked attention would materialise 64 GiB of scores.
    def batches(rows):
        return [rows[i:i + sizes["baseline_batch"]] for i in range(0, len(rows), sizes["baseline_batch"])]
    reduced_rows, sample_rows = batches(prompts), batches([p for p in sample_prompts for _ in range(n)])

    from .pre_engine_generate import generate as pre_engine_generate
    _, seconds, peak = warmed(lambda: pre_engine_generate(ours, reduced_rows[0], max_new_tokens=warm_tokens),
                              lambda: [pre_engine_generate(ours, g, max_new_tokens=reduced_tokens) for g in reduced_rows])
    comparisons["reduced"]["pre-engine loop"] = dict(seconds=seconds, peak_GiB=peak,
                                                     tokens=len(prompts) * reduced_tokens)
    rng = torch.Generator(device).manual_seed(0)
    sample_kw = dict(temperature=1.0, stop_tokens=stops, generator=rng)
    outs, seconds, peak = warmed(
        lambda: pre_engine_generate(ours, sample_rows[0], max_new_tokens=warm_tokens, **sample_kw),
        lambda: [pre_engine_generate(ours, g, max_new_tokens=sample_tokens, **sample_kw) for g in sample_rows])
    comparisons["sample"]["pre-engine loop"] = dict(seconds=seconds, peak_GiB=peak,
                                                    tokens=sum(len(t) for out in outs for t in out.tokens))

    def hf_generate(group, **kwargs):
        """Generated tokens of `group` (left-padded, as transformers generates), each row up to and with its
        first stop token when the stop tokens end rows (eos_token_id)."""
        width = max(map(len, group))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(group):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            new = hf.generate(ids.to(device), attention_mask=mask.to(device), pad_token_id=0, **kwargs)[:, width:]
        if "eos_token_id" not in kwargs:
            return new.numel()
        stopped = torch.isin(new, torch.tensor(kwargs["eos_token_id"], device=new.device))
        first = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new.shape[1])
        return int(first.sum())

    # transformers' eager attention: its SDPA path fails with this padding mask on the H200 (torch 2.11). The
    # cuDNN backend it picks stops with "misaligned address" ("mha_graph.execute ... is_good()" under
    # CUDA_LAUNCH_BLOCKING=1); the memory-efficient one rejects the mask ("last dimension must be contiguous").
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    hf_greedy = dict(do_sample=False)
    hf_sample = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=stops)
    runs = {"reduced": (reduced_rows, reduced_tokens, hf_greedy), "sample": (sample_rows, sample_tokens, hf_sample)}
    try:
        for name, (groups, tokens, kw) in runs.items():
            try:
                counts, seconds, peak = warmed(
                    lambda: hf_generate(groups[0], max_new_tokens=warm_tokens, **kw),
                    lambda: [hf_generate(g, max_new_tokens=tokens, min_new_tokens=0 if "eos_token_id" in kw else tokens,
                                         **kw) for g in groups])
                comparisons[name]["transformers"] = dict(seconds=seconds, peak_GiB=peak, tokens=sum(counts))
            except Exception as exc:      # reported, not fatal
                comparisons[name]["transformers"] = dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    finally:
        hf.set_attn_implementation(previous)
    for runs_of in comparisons.values():
        for r in runs_of.values():
            if "seconds" in r:
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                r["ours_speedup"] = runs_of["ours"]["tokens_per_s"] / r["tokens_per_s"]
    results["reduced"] = dict(workload=dict(prompts=len(prompts), n=1, max_tokens=reduced_tokens, greedy=True,
                                            baseline_batch=sizes["baseline_batch"]), **comparisons["reduced"])
    results["sample"] = dict(workload=dict(prompts=len(sample_prompts), n=n, max_tokens=sample_tokens,
                                           temperature=1.0, stop_tokens=len(stops),
                                           baseline_batch=sizes["baseline_batch"]), **comparisons["sample"])
    return results


# ------------------------------------------------------------------------------------------------------
# Report

def report(rows, device, stem) -> list[str]:
    """Decode floor fractions, the TTFT ratio, and the RL workload (run here, only when the engine cases
    ran). With a stem (plots on), writes <stem>-engine.json and <stem>-engine_decode.png."""
    decode = [r for r in rows if r["group"] == "engine decode step" and "median_ms" in r]
    ttft = [r for r in rows if r["group"] == "engine prefix cache" and "median_ms" in r]
    if not decode and not ttft:
        return []
    written = []
    if decode:
        print("\n(a) engine decode step on the slice: time and fraction of the floor "
              "(weights touched + lightning states r/w + KV read, at the measured copy bandwidth)")
        print(f"{'B':>5} {'context':>8} {'floor ms':>9} {'graph ms':>9} {'of floor':>9} {'step ms':>9} {'of floor':>9}")
        by = {}
        for r in decode:
            by.setdefault((r["params"]["B"], r["params"]["context"]), {})[r["impl"]] = r
        for (B, ctx), impls in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            g, s = impls.get("ours[graph]", {}), impls.get("ours[step]", {})
            fl = g.get("floor_ms") or s.get("floor_ms")
            fmt = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
            print(f"{B:>5} {ctx:>8} {fmt(fl, '9.3f')} {fmt(g.get('median_ms'), '9.3f')} "
                  f"{fmt(g.get('fraction_of_floor'), '9.3f')} {fmt(s.get('median_ms'), '9.3f')} "
                  f"{fmt(s.get('fraction_of_floor'), '9.3f')}")
    if ttft:
        t = {r["impl"]: r["median_ms"] for r in ttft}
        cached, uncached = t.get("ours[cached prefix]"), t.get("prefix cache cleared")
        if cached and uncached:
            print(f"\n(b) time to first token, {ttft[0]['case']}: cached prefix {cached:.1f} ms, uncached "
                  f"{uncached:.1f} ms ({uncached / cached:.1f}x)")
    print("\n(c) RL-shaped workload (running it now)", flush=True)
    _shared.pop("decode_engine", None)
    rl = rl_workload(device)
    w, f = rl["workload"], rl["full"]
    print(f"  {w['prompts']} prompts of {w['prompt_lengths'][0]}-{w['prompt_lengths'][1]} tokens, n = {w['n']}, up "
          f"to {w['max_tokens']} new tokens, {w['stop_tokens']} stop tokens, temperature 1")
    peak = f"; {f['peak_GiB']:.1f} GiB peak ({rl['weights_GiB']:.1f} GiB weights)" if f["peak_GiB"] else ""
    print(f"  ours: {f['tokens']} tokens in {f['seconds']:.1f} s = {f['tokens_per_s']:.0f} tokens/s; mean length "
          f"{f['mean_length']:.0f}; finish {f['finish_reasons']}{peak}; engine built in {f['engine_build_s']:.1f} s "
          "before the clock started")
    red, smp = rl["reduced"]["workload"], rl["sample"]["workload"]
    titles = {"reduced": f"reduced workload ({red['prompts']} prompts, n = 1, {red['max_tokens']} greedy tokens, no "
                         "stop tokens)",
              "sample": f"RL-shaped sample ({smp['prompts']} prompts, n = {smp['n']}, up to {smp['max_tokens']} tokens "
                        f"at temperature 1, {smp['stop_tokens']} stop tokens)"}
    for key, title in titles.items():
        print(f"  {title}:")
        for name in ("ours", "pre-engine loop", "transformers"):
            r = rl[key].get(name, {})
            if "error" in r:
                print(f"    {name:<16} error: {r['error']}")
            elif r:
                mem = f", peak {r['peak_GiB']:.1f} GiB" if r["peak_GiB"] else ""
                build = f" (+ {r['engine_build_s']:.1f} s engine build)" if "engine_build_s" in r else ""
                print(f"    {name:<16} {r['tokens']:>7} tokens in {r['seconds']:8.2f} s {r['tokens_per_s']:8.0f} "
                      f"tokens/s{mem}   ours is {r['ours_speedup']:.2f}x faster{build}")
    if device.type != "cuda":
        print("\n(no GPU: the engine bench ran the tiny preset on the CPU; it says nothing about GPU speed)")
    if stem:
        with open(stem + "-engine.json", "w") as fh:
            json.dump({"decode": [{k: r.get(k) for k in ("case", "impl", "median_ms", "floor_ms", "fraction_of_floor",
                                                          "params")} for r in decode],
                       "ttft": [{k: r.get(k) for k in ("case", "impl", "median_ms")} for r in ttft], "rl": rl},
                      fh, indent=1)
        written.append(stem + "-engine.json")
        if decode:
            written += [p for p in (_plot(decode, stem + "-engine_decode.png"),) if p]
    _release()
    return written


def _plot(decode, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    contexts = sorted({r["params"]["context"] for r in decode})
    for impl, marker in (("ours[graph]", "o"), ("ours[step]", "s")):
        for ctx in contexts:
            pts = sorted((r["params"]["B"], r.get("fraction_of_floor") or math.nan) for r in decode
                         if r["impl"] == impl and r["params"]["context"] == ctx)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{impl} ctx {ctx}")
    ax.set(xscale="log", xlabel="batch (completions per step)", ylabel="fraction of the floor",
           title="engine decode step on the M1 slice", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
