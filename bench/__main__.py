"""`python -m m1_kernels.bench`: measure the ceilings, time every case, print one table, write JSON and plots.

On a machine without a GPU it runs small shapes on the CPU paths (and says so); its figures are no
statement about GPU speed, so they go to bench/results-cpu/ (ignored by git), not to the tracked
bench/results/. Outside a checkout (an installed package) the default folder is ./m1_bench_results.
"""

import argparse
import importlib
import os
import sys
import time

import torch

from . import CASE_MODULES
from .harness import device_name, format_table, measure_ceilings, plot, run_case, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def collect_cases(device, only=None):
    cases = []
    for name in CASE_MODULES:
        cases += importlib.import_module(name).cases(device)
    if only:
        cases = [c for c in cases if any(o in f"{c.group} {c.name}" for o in only)]
    return cases


def default_out(device) -> str:
    """The tracked bench/results/ holds GPU measurements only; a checkout is recognised by that folder."""
    if not os.path.isdir(os.path.join(HERE, "results")):
        return os.path.abspath("m1_bench_results")
    return os.path.join(HERE, "results" if device.type == "cuda" else "results-cpu")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m m1_kernels.bench", description=__doc__)
    parser.add_argument("--only", action="append", help="run cases whose 'group name' contains this (repeatable)")
    parser.add_argument("--out", help="folder for <device>.json and plots (default: bench/results on a GPU, "
                        "bench/results-cpu without one; ./m1_bench_results outside a checkout)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # before the case modules import triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cases = collect_cases(device, args.only)
    if not cases:
        available = "\n".join(f"  {c.group}: {c.name}" for c in collect_cases(device))
        print(f"no case matches --only {' / '.join(args.only)} (matched against 'group name'); the cases on "
              f"{device.type}:\n{available}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        print("No CUDA GPU: running small shapes on the CPU paths (torch backend). "
              "These timings say nothing about GPU speed.\n", flush=True)
    ceilings = measure_ceilings(device)
    if ceilings.get("copy_GBps"):
        print(f"device {device_name(device)}: copy bandwidth {ceilings['copy_GBps']:.0f} GB/s, "
              f"dense bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s (measured now)\n", flush=True)
    out = args.out or default_out(device)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, device_name(device))
    rows = []
    for case in cases:
        print(f"  {time.strftime('%H:%M:%S')} {case.group}: {case.name}", file=sys.stderr, flush=True)
        case_rows = run_case(case, device, ceilings)
        rows += case_rows
        write_json(stem + ".json", rows, ceilings, device)  # after every case: a cut-off run keeps its rows
        # ... and its log the medians so far (the table below comes only at the end)
        print("    " + "; ".join(f"{r['impl']} " + (f"{r['median_ms']:.4f} ms" if "median_ms" in r else "error")
                                for r in case_rows), file=sys.stderr, flush=True)
        for r in case_rows:  # the autotuner's choices behind each time, when it made any in this case
            for kernel, chosen in r.get("tuned_configs", {}).items():
                for key, config in chosen.items():
                    print(f"      {r['impl']} {kernel} {key}: {config}", file=sys.stderr, flush=True)
    print(format_table(rows))
    print(f"\nwrote {stem}.json")
    if not args.no_plots:
        for path in plot(rows, stem):
            print(f"wrote {path}")
    # A case module may print a report of its own from the rows: report(rows, device, plot_stem or None).
    for name in CASE_MODULES:
        report = getattr(importlib.import_module(name), "report", None)
        if report is not None:
            for path in report(rows, device, None if args.no_plots else stem):
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
