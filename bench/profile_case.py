"""Where one call of a bench case spends its time, host against device: for every implementation of the cases
whose 'group name' contains an --only string, after warm-up calls, the wall time of a call, the time its
kernels and copies keep the GPU busy, the kernels by GPU time and the host calls by their own time.

    python -m m1_kernels.bench.profile_case --only "fwd+bwd B1 H64 D128 T2048"

A call whose GPU-busy share is low is bound by its host work (Python, launches, synchronisations): the bench
times such a call as it runs alone, while inside a model the host runs ahead of the device and its work
overlaps other layers' kernels.
"""

import argparse
import json
import os
import re
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .__main__ import collect_cases
from .harness import make_input_sets

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_ms(prof) -> float:
    """Milliseconds in which the device ran at least one kernel or copy (the union of their intervals)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in DEVICE_CATEGORIES)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return busy / 1e3


def profile_call(fn, inputs, calls=5, top=12):
    for _ in range(3):
        fn(inputs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(inputs)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(inputs)
        torch.cuda.synchronize()
    busy = busy_ms(prof) / calls
    print(f"  wall {wall:.3f} ms per call, GPU busy {busy:.3f} ms ({busy / wall:.0%})")
    kernel_table(prof, calls, top)
    host_table(prof, calls, top)


def short_name(name, width=80):
    """A kernel's name in at most `width` characters: without the namespaces of PyTorch's templates and, if still
    longer, as its head and the functors its template names (what tells elementwise kernels apart)."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "c10::", "std::"):
        name = name.replace(noise, "")
    if len(name) <= width:
        return name
    functors = dict.fromkeys(re.findall(r"\w*(?:Functor|_functor|Op\b|_kernel_cuda)\w*", name))
    short = f"{name.split('<', 1)[0]}<{', '.join(functors)}>"
    return short if functors and len(short) <= width else name[:width - 2] + ".."


def kernel_table(prof, calls=1, top=12):
    """The kernels by GPU time: per call of what was profiled `calls` times, and their share."""
    kernels = sorted((e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"),
                     key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels) or 1.0
    print(f"  {'kernel':<80} {'calls':>6} {'ms/call':>9} {'share':>6}")
    for e in kernels[:top]:
        print(f"  {short_name(e.key):<80} {e.count / calls:>6.0f} {e.device_time_total / calls / 1e3:>9.3f} "
              f"{e.device_time_total / total:>6.1%}")


def host_table(prof, calls=1, top=12):
    """The host calls by their own time (children excluded), per call."""
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    print(f"  {'host call':<80} {'calls':>6} {'self ms/call':>12}")
    for e in host[:top]:
        print(f"  {e.key[:80]:<80} {e.count / calls:>6.0f} {e.self_cpu_time_total / calls / 1e3:>12.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", required=True, help="'group name' substring (repeatable)")
    parser.add_argument("--impl", action="append", help="only implementations whose label contains this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_case needs a CUDA device")
    device = torch.device("cuda")
    cases = collect_cases(device, args.only)
    if not cases:
        raise SystemExit(f"no case matches --only {' / '.join(args.only)}")
    for case in cases:
        inputs = make_input_sets(case)[0]
        for label, fn in case.impls.items():
            if args.impl and not any(i in label for i in args.impl):
                continue
            print(f"\n{case.group}: {case.name} -- {label}")
            try:
                profile_call(fn, inputs)
            except Exception as exc:      # a peer that cannot run this shape is reported, not fatal
                print(f"  error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
