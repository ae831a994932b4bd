"""Micro-benchmarks of the ops against their peers; `python -m bench` prints the report."""

# Modules that define `cases(device) -> list[Case]`; each area adds its own.
CASE_MODULES = ["bench.cases_lightning", "bench.cases_grouped_gemm_cuda", "bench.cases_moe", "bench.cases_model"]
