"""Where a decode step of the engine spends its time: the kernels of one step on the real-width slice, by
GPU time, at each batch asked for (the engine decode cases' setup: bench/cases_engine.py).

    python -m m1_kernels.bench.profile_engine --batch 1 64 --context 1024

Prints, per batch, the replayed CUDA graph's time and the eager step's kernels (name, calls, total and
share of the step); with --trace DIR also writes a Chrome trace per batch.
"""

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from . import cases_engine


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
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in kernels)
    graph = f"{graph_ms:.3f} ms" if graph_ms is not None else "no graph"
    print(f"\nB={B} (bucket {bucket}) context {context}: graph replay {graph}, eager {eager_ms:.3f} ms, "
          f"kernel time {total / 1e3:.3f} ms")
    print(f"{'kernel':<90} {'calls':>6} {'total ms':>9} {'share':>6}")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:top]:
        print(f"{e.key[:90]:<90} {e.count:>6} {e.device_time_total / 1e3:>9.3f} {e.device_time_total / total:>6.1%}")
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, f"decode-B{B}-ctx{context}.json"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--trace", help="folder for Chrome traces")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_engine needs a CUDA device")
    device = torch.device("cuda")
    sizes = dict(cases_engine._sizes(device), batches=tuple(sorted(set(args.batch))),
                 contexts=(args.context,))
    engine = cases_engine._decode_engine(device, sizes)
    for B in args.batch:
        profile_step(engine, B, args.context, args.trace)


if __name__ == "__main__":
    main()
