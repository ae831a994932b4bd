"""Benchmark harness: ceilings, timing, the report table, JSON and plots.

A `Case` is one shape of one op with several implementations: ours (one row each backend) and peers.
Times are medians over many calls timed with CUDA events after a warm-up, cycling through several
input sets so that repeated calls do not hit L2. Each row gets a floor from the two ceilings measured
in the same run: bytes / copy bandwidth (memory-bound ops) or FLOPs / dense bf16 matmul rate.
"""

import dataclasses
import json
import math
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

import torch

L2_BYTES = 64 << 20  # more than any Hopper L2: input sets beyond this total rotate out of cache


@dataclasses.dataclass
class Case:
    """One benchmark case.

    group: the plot it belongs to ("lightning prefill", "moe", ...).
    name: the shape, as printed.
    make_inputs: builds one input set (called until the sets exceed L2 or `max_sets`).
    impls: label -> fn(inputs); labels "ours[<backend>]" are ours, every other label is a peer.
    bytes: bytes that must move (each input read once, each output written once), or None.
    flops: arithmetic that must happen, or None. The floor uses whichever bound is larger.
    """
    group: str
    name: str
    make_inputs: Callable[[], Any]
    impls: dict[str, Callable[[Any], Any]]
    bytes: float | None = None
    flops: float | None = None
    max_sets: int = 4
    params: dict = dataclasses.field(default_factory=dict)
    # Time replays of a CUDA graph holding several calls (cycling the input sets), per call: how servers
    # run decode-sized kernels (a step's graph holds hundreds of kernels, so the graph launch is paid
    # once per step, not per kernel); their eager time is the Python launch cost rather than the kernel.
    cuda_graph: bool = False


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def make_input_sets(case: Case) -> list:
    sets = [case.make_inputs()]
    while len(sets) < case.max_sets and _tensor_bytes(sets) < 2 * L2_BYTES:
        sets.append(case.make_inputs())
    return sets


def _graphed(fn, sets, min_calls=4):
    """One CUDA graph holding at least `min_calls` calls of fn, cycling through the input sets in order
    (warmed up outside the capture). Returns the replay and the number of calls it makes."""
    calls = [sets[i % len(sets)] for i in range(max(len(sets), min_calls))]
    for inputs in sets:
        fn(inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for inputs in calls:
            fn(inputs)
    return graph.replay, len(calls)


def time_fn(fn, sets, device, warmup=3, reps=None, budget_s=0.5, cuda_graph=False) -> dict:
    """Median and spread of per-call times in ms, cycling through the input sets."""
    calls_per_timing = 1
    if cuda_graph and device.type == "cuda":
        replay, calls_per_timing = _graphed(fn, sets)
        call, sets = (lambda _: replay()), [None]
    else:
        call = lambda i: fn(sets[i])  # noqa: E731
    for i in range(warmup):
        call(i % len(sets))
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        call(0)
        end.record()
        end.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        reps = reps or int(min(200, max(5, budget_s * 1e3 / once)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (s, e) in enumerate(events):
            s.record()
            call(i % len(sets))
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / calls_per_timing for s, e in events]
    else:
        t0 = time.perf_counter()
        call(0)
        once = max(time.perf_counter() - t0, 1e-6)
        reps = reps or int(min(20, max(3, budget_s / once)))
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            call(i % len(sets))
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10],
            "p90_ms": times[(9 * len(times)) // 10], "reps": len(times)}


def measure_ceilings(device) -> dict:
    """Copy bandwidth (bytes read + written per second) and dense bf16 matmul rate, measured now."""
    if device.type != "cuda":
        return {"copy_GBps": None, "matmul_TFLOPs": None, "note": "no GPU: no ceilings, no floors"}
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy = time_fn(lambda _: dst.copy_(src), [None], device, warmup=3, reps=20)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm = time_fn(lambda _: a @ b, [None], device, warmup=3, reps=20)
    return {"copy_GBps": 2 * n / (copy["median_ms"] * 1e-3) / 1e9,
            "matmul_TFLOPs": 2 * m ** 3 / (mm["median_ms"] * 1e-3) / 1e12}


def floor_ms(case: Case, ceilings: dict) -> tuple[float | None, str | None]:
    if ceilings.get("copy_GBps") is None:
        return None, None
    mem = case.bytes / (ceilings["copy_GBps"] * 1e9) * 1e3 if case.bytes else 0.0
    mat = case.flops / (ceilings["matmul_TFLOPs"] * 1e12) * 1e3 if case.flops else 0.0
    if not mem and not mat:
        return None, None
    return (mem, "memory") if mem >= mat else (mat, "matmul")


def tuned_configs() -> dict[str, dict[str, str]]:
    """The configs this package's autotuned Triton kernels have chosen so far: {module.kernel: {key: config}}."""
    autotuner = getattr(sys.modules.get("triton.runtime.autotuner"), "Autotuner", None)
    if autotuner is None:
        return {}
    out = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("m1_kernels.") or module is None:
            continue
        for attr, obj in list(vars(module).items()):
            if isinstance(obj, autotuner) and obj.cache:
                out[f"{name.removeprefix('m1_kernels.')}.{attr}"] = {str(k): str(c) for k, c in obj.cache.items()}
    return out


def _new_configs(before: dict, after: dict) -> dict:
    return {kernel: new for kernel, chosen in after.items()
            if (new := {k: c for k, c in chosen.items() if k not in before.get(kernel, {})})}


def run_case(case: Case, device, ceilings) -> list[dict]:
    """Time every implementation of a case; one result row per implementation. A row records the autotuner
    choices its implementation made ("tuned_configs"): a timing says little without the config behind it."""
    sets = make_input_sets(case)
    fl, bound = floor_ms(case, ceilings)
    rows = []
    for label, fn in case.impls.items():
        row = {"group": case.group, "case": case.name, "impl": label, "ours": label.startswith("ours"),
               "params": case.params, "floor_ms": fl, "bound": bound}
        configs_before = tuned_configs()
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row.update(time_fn(fn, sets, device, cuda_graph=case.cuda_graph))
            if device.type == "cuda":  # inputs included: what the call needs on top is peak - inputs
                row["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            if chosen := _new_configs(configs_before, tuned_configs()):
                row["tuned_configs"] = chosen
        except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            continue
        t = row["median_ms"] * 1e-3
        if case.bytes:
            row["GBps"] = case.bytes / t / 1e9
        if case.flops:
            row["TFLOPs"] = case.flops / t / 1e12
        if fl:
            row["fraction_of_floor"] = fl / row["median_ms"]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.synchronize()
    peers = {r["impl"]: r["median_ms"] for r in rows if not r["ours"] and "median_ms" in r}
    for r in rows:
        if r["ours"] and "median_ms" in r:
            r["speedup_vs"] = {p: t / r["median_ms"] for p, t in peers.items()}
    del sets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'case':<44} {'impl':<26} {'median ms':>10} {'GB/s':>8} {'TFLOP/s':>8} {'floor ms':>9} {'of floor':>8} "
              f"{'peak GiB':>8}  speed-up vs peers")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case'][:44]:<44} {r['impl'][:26]:<26} {'error: ' + r['error']}")
            continue
        fmt = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
        vs = ", ".join(f"{p} {s:.2f}x" for p, s in r.get("speedup_vs", {}).items())
        lines.append(f"{r['case'][:44]:<44} {r['impl'][:26]:<26} {r['median_ms']:>10.4f} {fmt(r.get('GBps'), '8.0f'):>8} "
                     f"{fmt(r.get('TFLOPs'), '8.1f'):>8} {fmt(r.get('floor_ms'), '9.4f'):>9} "
                     f"{fmt(r.get('fraction_of_floor'), '8.3f'):>8} {fmt(r.get('peak_mem_GiB'), '8.2f'):>8}  {vs}")
    return "\n".join(lines)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    return f"cpu-{platform.machine()}"


def environment(device) -> dict:
    env = {"torch": torch.__version__, "device": device_name(device), "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    return env


def plot(rows: list[dict], path_prefix: str) -> list[str]:
    """One bar chart per group: median time of every implementation per case (log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for group in dict.fromkeys(r["group"] for r in rows):
        sub = [r for r in rows if r["group"] == group and "median_ms" in r]
        cases = list(dict.fromkeys(r["case"] for r in sub))
        impls = list(dict.fromkeys(r["impl"] for r in sub))
        if not cases:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases) * max(1, len(impls)) / 2), 4.5))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, c in enumerate(cases):
                t = next((r["median_ms"] for r in sub if r["case"] == c and r["impl"] == impl), None)
                if t is not None:
                    xs.append(i + j * width)
                    ys.append(t)
            ax.bar(xs, ys, width, label=impl)
        floors = [next((r["floor_ms"] for r in sub if r["case"] == c), None) for c in cases]
        if any(f for f in floors):
            ax.scatter([i + 0.4 - width / 2 for i in range(len(cases))], [f or math.nan for f in floors],
                       marker="_", s=400, color="black", label="floor", zorder=3)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (lower is better)")
        ax.set_title(group)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{path_prefix}-{re.sub(r'[^A-Za-z0-9]+', '_', group).strip('_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_json(path, rows, ceilings, device, extra=None):
    with open(path, "w") as f:
        json.dump({"environment": environment(device), "ceilings": ceilings, "rows": rows, **(extra or {})},
                  f, indent=1, default=str)
