"""Test harness: Triton interpreter on CPU machines, hypothesis profiles, the `gpu` marker.

- Without CUDA, TRITON_INTERPRET=1 is set before anything imports triton, so Triton kernels run on
  CPU tensors (small shapes).
- `@pytest.mark.gpu` tests skip without CUDA; with M1_REQUIRE_GPU=1 a missing GPU fails the whole run,
  so a GPU run cannot silently skip.
- Hypothesis profiles: `ci` (CPU, few examples) and `gpu` (more examples, real shapes allowed);
  chosen by HYPOTHESIS_PROFILE, default `gpu` when CUDA is visible, else `ci`. Deadlines are off:
  the first call of a kernel compiles it.
- Autotuned Triton kernels run their first config (M1_TRITON_CONFIG=0, unless set): tuning every new
  shape the property tests draw would spend minutes compiling and timing configs; the
  `test_every_autotune_config_*` GPU tests run each config.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("M1_TRITON_CONFIG", "0")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("gpu", max_examples=int(os.environ.get("M1_HYPOTHESIS_EXAMPLES", "15")), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))

REQUIRE_GPU = os.environ.get("M1_REQUIRE_GPU", "0") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one unless M1_REQUIRE_GPU=1)")
    # Used by pytest-xdist's --dist loadgroup (the GPU run): tests needing tens of GB share one worker.
    config.addinivalue_line("markers", "xdist_group(name): run in one pytest-xdist worker under --dist loadgroup")
    # A bare `-n N` means --dist load, which ignores the groups: on one GPU the large tests then run side by
    # side and fail with out-of-memory errors. Groups are always honoured.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"
    if REQUIRE_GPU and not torch.cuda.is_available():
        raise pytest.UsageError("M1_REQUIRE_GPU=1 but torch sees no CUDA GPU")


@pytest.fixture(autouse=True)
def _return_cached_gpu_memory():
    """Under pytest-xdist the workers share one GPU: a worker's caching allocator would keep a large
    test's peak reserved (tens of GB) and starve the others, so each test hands its cache back."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
