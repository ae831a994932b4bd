"""`pytest bench --benchmark-only`: the cases of `python -m m1_kernels.bench`, through pytest-benchmark."""

import pytest
import torch

from m1_kernels.bench.__main__ import collect_cases
from m1_kernels.bench.harness import make_input_sets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = collect_cases(DEVICE)
PARAMS = [pytest.param(case, label, id=f"{case.group}|{case.name}|{label}")
          for case in CASES for label in case.impls]


@pytest.mark.parametrize("case, label", PARAMS)
def test_case(benchmark, case, label):
    sets = make_input_sets(case)
    fn = case.impls[label]
    step = iter(range(1 << 62))

    def call():
        fn(sets[next(step) % len(sets)])
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(case.params, impl=label, bytes=case.bytes, flops=case.flops)
    benchmark.pedantic(call, warmup_rounds=2, rounds=10 if DEVICE.type == "cuda" else 3)
