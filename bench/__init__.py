"""Micro-benchmarks of the ops against their peers; `python -m m1_kernels.bench` prints the report."""

# Modules that define `cases(device) -> list[Case]`; each area adds its own.
CASE_MODULES = ["m1_kernels.bench.cases_lightning", "m1_kernels.bench.cases_grouped_gemm_cuda", "m1_kernels.bench.cases_moe", "m1_kernels.bench.cases_model", "m1_kernels.bench.cases_trainer", "m1_kernels.bench.cases_engine", "m1_kernels.bench.cases_engine_kernels"]
