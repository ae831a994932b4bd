"""Comparison helpers: float64 references, the "within 2x of same-precision PyTorch" rule, NaN fills."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m1_kernels.dispatch import backend_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Absolute floors added to the 2x rule, by dtype: they absorb rounding on outputs near zero.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def max_err(x, ref):
    return (x.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() if x.numel() else 0.0


def assert_within_2x(name, out, ref64, baseline, atol=None, factor=2.0):
    """FlashAttention's rule: error of `out` against the float64 reference stays within `factor` x the
    error of `baseline` (the plain PyTorch path in the same precision), plus a small absolute floor."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten element or overflow)"
    atol = ATOL.get(out.dtype, 1e-5) if atol is None else atol
    err, base = max_err(out, ref64), max_err(baseline, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    assert err <= factor * base + atol * max(1.0, scale), (
        f"{name}: max error {err:.3e} > {factor} x baseline {base:.3e} + {atol:.0e} (ref max {scale:.3e})")


def assert_close64(name, out, ref64, rtol):
    """Plain relative check against a float64 reference, scaled by the reference's magnitude."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1.0
    err = max_err(out, ref64)
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:.0e} x {scale:.3e}"


@contextlib.contextmanager
def nan_filled_outputs():
    """Every torch.empty* inside fills floats with NaN (ints with their max), so an output element a
    kernel forgot to write fails the comparison instead of passing by luck."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


class dispatched_custom_ops(TorchDispatchMode):
    """`with dispatched_custom_ops() as calls:` records the names of the project's custom ops (namespace
    m1_ops) dispatched inside the block; every op still runs."""

    def __enter__(self):
        self.names = []
        super().__enter__()
        return self.names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "m1_ops":
            self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def randn(*shape, dtype=torch.float32, device=DEVICE, scale=1.0, generator=None):
    return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(device=device, dtype=dtype)


def require_backend(backend, implemented):
    """Skip unless `backend` is implemented for the op and can run on this machine; returns it."""
    if backend not in implemented:
        pytest.skip(f"{backend} backend not implemented for this op")
    why = backend_error(backend, DEVICE)
    if why:
        pytest.skip(why)
    return backend
