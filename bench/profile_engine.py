"""Where a decode step of the engine spends its time: the kernels of one step on the real-width slice, by
GPU time, at each batch asked for (the engine decode cases' setup: bench/cases_engine.py).

    python -m m1_kernels.bench.profile_engine --batch 1 64 --context 1024 [--host]

Prints, per batch, the replayed CUDA graph's time and the eager step's kernels (name, calls, total and
share of the step); with --trace DIR also writes a Chrome trace per batch. --host profiles the whole step
instead (the engine's `_advance`, as the "ours[step]" bench case times it): wall time per step, the host's
time in each phase, the share of the step the GPU is busy, the host calls that cost most, and every call
that synchronises with the device (torch's sync debug mode). --generate N [--max-tokens M] profiles instead
engine.generate on the first N prompts of the RL workload (256-2048 tokens each), M greedy tokens each (M = 1:
the prefill; N = M = 64: the bench's reduced workload): time, GPU busy share, kernels.
"""

import argparse
import math
import os
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from m1_kernels.model import Engine, SamplingParams

from . import cases_engine
from .profile_case import busy_ms, host_table, kernel_table


def _time_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def profile_step(engine, B, context, trace_dir=None, top=25):
    cases_engine.place_running(engine, B, context)
    bucket = next(b for b in engine.buckets if b >= B)
    with torch.no_grad():
        engine._decode(engine.scheduler.running)
        graph_ms = _time_ms(engine._graphs[bucket][0].replay) if bucket in engine._graphs else None
        eager_ms = _time_ms(lambda: engine._decode_forward(bucket))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine._decode_forward(bucket)
            torch.cuda.synchronize()
    graph = f"{graph_ms:.3f} ms" if graph_ms is not None else "no graph"
    print(f"\nB={B} (bucket {bucket}) context {context}: graph replay {graph}, eager {eager_ms:.3f} ms")
    kernel_table(prof, top=top)
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, f"decode-B{B}-ctx{context}.json"))


def profile_host(engine, B, context, steps=40, top=15):
    cases_engine.place_running(engine, B, context)
    for _ in range(5):
        engine._advance()
    torch.cuda.synchronize()
    phases = {}

    def wrap(owner, name, label):
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0
        setattr(owner, name, timed)                 # an instance attribute over the method; deleted below
        return owner, name

    wrapped = [wrap(engine.scheduler, "schedule", "schedule"), wrap(engine, "_run_device_ops", "cache ops"),
               wrap(engine, "_decode", "decode launch"), wrap(engine, "_draw", "draw launch"),
               wrap(engine, "_collect", "collect (wait + book)")]
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine._advance()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    finally:
        for owner, name in wrapped:
            delattr(owner, name)
    print(f"\nB={B} context {context}: whole step {wall:.3f} ms (wall, {steps} steps); host time per step:")
    for label, seconds in phases.items():
        print(f"  {label:<24} {seconds / steps * 1e3:8.3f} ms")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                engine._advance()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync_calls = sorted({f"{w.filename}:{w.lineno}: {str(w.message)[:100]}" for w in caught
                         if "prototype" not in str(w.message)})      # not torch's notice about the mode itself
    print(f"  synchronising calls in 3 steps: {len(sync_calls) or 'none'}")
    for line in sync_calls:
        print(f"    {line}")

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine._advance()
        torch.cuda.synchronize()
    busy = busy_ms(prof) / 10
    print(f"  GPU busy {busy:.3f} ms per step ({busy / wall:.0%} of the step's wall time)")
    host_table(prof, 10, top)


def profile_generate(device, count, max_tokens, top=25):
    """engine.generate of the first `count` prompts of the RL workload, `max_tokens` greedy tokens each (1: the
    prefill alone; 64 prompts and 64 tokens: the bench's reduced workload), profiled: wall time, steps, prompt
    tokens per second, the GPU's busy share (what is left is host-bound) and the kernels by GPU time."""
    model = cases_engine._models(device)["hybrid"]
    lengths = cases_engine._sizes(device)["rl"]["lengths"]
    prompts = cases_engine._rl_prompts(model.config.vocab_size, 64, lengths)[:count]
    max_len = lengths[1] + max_tokens
    engine = Engine(model, max_num_seqs=count, max_model_len=max_len, enable_prefix_caching=False,
                    num_pages=count * math.ceil(max_len / 16) + 64 * 16)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    engine.generate(prompts, params)                      # compiles and tunes for these shapes
    steps = engine.stats["steps"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, params)
        torch.cuda.synchronize()
    tokens = sum(map(len, prompts))
    busy = busy_ms(prof)
    print(f"\ngenerate of {count} prompts ({tokens} prompt tokens), {max_tokens} tokens each: {steps} steps, "
          f"{wall:.1f} ms ({tokens / wall * 1e3:.0f} prompt tokens/s); GPU busy {busy:.1f} ms of the profiled "
          f"call ({busy / wall:.0%} of the unprofiled one)")
    kernel_table(prof, top=top)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--trace", help="folder for Chrome traces")
    parser.add_argument("--host", action="store_true", help="profile the whole step (host and device)")
    parser.add_argument("--generate", type=int, metavar="PROMPTS",
                        help="profile generate on this many of the RL workload's prompts instead")
    parser.add_argument("--max-tokens", type=int, default=1, help="greedy tokens per prompt for --generate")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_engine needs a CUDA device")
    device = torch.device("cuda")
    if args.generate:
        profile_generate(device, args.generate, args.max_tokens)
        return
    sizes = dict(cases_engine._sizes(device), batches=tuple(sorted(set(args.batch))),
                 contexts=(args.context,))
    engine = cases_engine._decode_engine(device, sizes)
    for B in args.batch:
        if args.host:
            profile_host(engine, B, args.context)
        else:
            profile_step(engine, B, args.context, args.trace)


if __name__ == "__main__":
    main()
