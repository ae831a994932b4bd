"""Backend selection (docs/design.md, "Backends"): explicit `backend=` > `M1_OPS_BACKEND` > fastest verified here.

Every public op has up to three backends with one signature: "cuda" (csrc extension), "triton" and
"torch" (plain PyTorch, runs anywhere). A backend that is asked for and cannot run raises; nothing
falls back silently.
"""

import contextlib
import dataclasses
import functools
import os
from typing import Callable

import torch

from .extension import cuda_extension_error

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "M1_OPS_BACKEND"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_prune(prune=None):
    """`early_config_prune` for `triton.autotune`: the kernel's own pruning (if any), then, when
    M1_TRITON_CONFIG=i is set, only the i-th config it keeps (the last if fewer), untimed. Each new
    autotune key otherwise compiles and times every config: the GPU property tests, which draw dozens
    of small shapes, pin config 0, and one GPU test per op family runs every index."""
    def pruned(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune else configs
        forced = os.environ.get("M1_TRITON_CONFIG", "")
        return kept if forced == "" else [kept[min(int(forced), len(kept) - 1)]]
    return pruned


@contextlib.contextmanager
def triton_config(index, kernels):
    """Run the autotuned Triton `kernels` with the `index`-th config their pruning keeps
    (M1_TRITON_CONFIG, see autotune_prune); their per-shape choices are forgotten before and after."""
    previous = os.environ.get("M1_TRITON_CONFIG")
    os.environ["M1_TRITON_CONFIG"] = str(index)
    for kernel in kernels:
        kernel.cache.clear()
    try:
        yield
    finally:
        for kernel in kernels:
            kernel.cache.clear()
        if previous is None:
            del os.environ["M1_TRITON_CONFIG"]
        else:
            os.environ["M1_TRITON_CONFIG"] = previous


def backend_error(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        why = _triton_import_error()
        if why is None and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            why = f"the Triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
        return why
    if backend == "cuda":
        return cuda_extension_error(device)
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


def available_backends(implemented, device: torch.device) -> list[str]:
    return [b for b in implemented if backend_error(b, device) is None]


def resolve_backend(op: str, requested: str | None, implemented, device: torch.device,
                    unsupported=lambda backend: None) -> str:
    """Pick the backend for one call of `op`.

    `implemented` lists the backends that `op` has, fastest first as measured on Hopper (see
    bench/results); the default is the first of them that can run on `device` and take this call's
    arguments (`unsupported(backend)` says why not, e.g. a head dim without a kernel). CPU tensors
    default to "torch" (the Triton interpreter is for tests, not for speed). A requested backend that
    cannot take the arguments raises ValueError.
    """
    source = "backend="
    if requested is None:
        requested, source = os.environ.get(ENV_VAR) or None, ENV_VAR + "="
    if requested is None:
        if device.type != "cuda":
            return "torch"
        for backend in implemented:
            if backend_error(backend, device) is None and unsupported(backend) is None:
                return backend
        raise RuntimeError(f"{op}: no backend can run on {device}")  # unreachable: torch always can
    if requested not in BACKENDS:
        raise ValueError(f"{op}: {source}{requested!r} is not a backend; choose one of {BACKENDS}")
    if requested not in implemented:
        raise ValueError(f"{op}: {source}{requested!r} is not implemented for this op (it has {list(implemented)})")
    why = backend_error(requested, device)
    if why is not None:
        raise RuntimeError(f"{op}: {source}{requested!r} is unavailable: {why}")
    why = unsupported(requested)
    if why is not None:
        raise ValueError(f"{op}: {why}")
    return requested


@dataclasses.dataclass(frozen=True)
class Backend:
    """One row of an op family's backend table (`lightning_ops.BACKENDS`, `moe_ops.BACKENDS`).

    The table is the one place that says what each backend runs: `impl` is its module (imported
    statically, so a reader can follow a call to its kernel); the other fields say, in words that the
    README's generated table shows, where it runs, which dtypes and sizes it takes and which of the
    family's parts run another backend's code. `unsupported(**call)` says why this backend cannot take
    one call's arguments (None when it can); resolve_backend asks it.
    """

    name: str
    impl: object
    runs_on: str
    dtypes: tuple
    limits: str = ""
    borrows: str = ""
    unsupported: Callable[..., str | None] = lambda **call: None


def backend_table_markdown(title: str, backends) -> str:
    """The README's table of one op family, generated from its `BACKENDS` (so it cannot drift)."""
    dtype_names = lambda dts: ", ".join(str(d).removeprefix("torch.") for d in dts)  # noqa: E731
    lines = [f"**{title}** (default order first)", "",
             "| backend | runs on | dtypes | limits | borrows |", "| --- | --- | --- | --- | --- |"]
    for b in backends:
        lines.append(f"| `{b.name}` | {b.runs_on} | {dtype_names(b.dtypes)} | {b.limits or '-'} | {b.borrows or '-'} |")
    return "\n".join(lines)
