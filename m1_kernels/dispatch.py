"""Backend selection (docs/design.md, "Backends"): explicit `backend=` > the family's variable (M1_MOE_BACKEND,
M1_LIGHTNING_BACKEND) > `M1_OPS_BACKEND` > fastest verified here.

Every public op has up to three backends with one signature: "cuda" (csrc extension), "triton" and
"torch" (plain PyTorch, runs anywhere). A backend that is asked for and cannot run raises; nothing
falls back silently.
"""

import contextlib
import dataclasses
import functools
import os
from typing import Callable, Mapping, Sequence

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
    """Why the backend kind `backend` ("cuda", "triton", "torch") cannot run on `device` (None when it can)."""
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


@dataclasses.dataclass(frozen=True, eq=False)
class Backend:
    """One row of an op family's backend table (`lightning_ops.BACKENDS`, `moe_ops.BACKENDS`).

    The table is the one place that says what each backend runs: `impl` is its module (imported
    statically, so a reader can follow a call to its kernel; None where the import failed, e.g. triton
    not installed, which `backend_error` then reports). The text fields are what the README's generated
    table shows: where it runs, which dtypes it takes, its limits. `borrows` maps a part of the family
    (e.g. "backward") to the name of the backend whose code runs that part for this one; a borrowing
    backend is available only where its lenders are. `custom_ops`: its functions run inside the
    family's torch.library custom ops (fake tensors, registered autograd, opcheck); False for plain
    PyTorch, called directly (autograd and torch.compile trace through it). `unsupported(op, **call)`
    says why this backend cannot take one call of `op` (None when it can); resolve_backend asks it.
    """

    name: str
    impl: object
    runs_on: str
    dtypes: tuple
    limits: str = ""
    borrows: Mapping[str, str] = dataclasses.field(default_factory=dict)
    custom_ops: bool = True
    unsupported: Callable[..., str | None] = lambda op, **call: None

    def device_error(self, device: torch.device) -> str | None:
        """Why this backend cannot run on `device` (its own kind, then each backend it borrows from)."""
        for name in (self.name, *self.borrows.values()):
            why = backend_error(name, device)
            if why is not None:
                return why if name == self.name else f"it borrows from {name!r}, and {why}"
        return None


def available_backends(backends: Sequence[Backend], device: torch.device) -> list[Backend]:
    """The rows of `backends` that can run on `device` (in their order)."""
    return [row for row in backends if row.device_error(device) is None]


def resolve_backend(op: str, requested: str | None, backends: Sequence[Backend], device: torch.device, *,
                    family_var: str | None = None, **call) -> Backend:
    """Pick the backend row for one call of `op`.

    `backends` are the rows of the op's family table that implement `op`, in its default order
    (fastest first as measured on Hopper, bench/results). The default is the first that can run on
    `device` and take this call (`row.unsupported(op, **call)`); CPU tensors default to "torch" (the
    Triton interpreter is for tests, not for speed). A requested backend (argument, else the family's
    environment variable `family_var`, e.g. M1_MOE_BACKEND, else M1_OPS_BACKEND) that is unknown, not
    implemented for `op` or cannot take the call raises ValueError; one that cannot run here raises
    RuntimeError. Nothing is substituted.
    """
    source = "backend="
    for var in (family_var, ENV_VAR):
        if requested is None and var is not None:
            requested, source = os.environ.get(var) or None, var + "="
    if requested is None:
        candidates = [r for r in backends if r.name == "torch"] if device.type != "cuda" else backends
        for row in candidates:
            if row.device_error(device) is None and row.unsupported(op, **call) is None:
                return row
        raise RuntimeError(f"{op}: no backend can run this call on {device}")  # unreachable: torch always can
    if requested not in BACKENDS:
        raise ValueError(f"{op}: {source}{requested!r} is not a backend; choose one of {BACKENDS}")
    by_name = {r.name: r for r in backends}
    if requested not in by_name:
        raise ValueError(f"{op}: {source}{requested!r} is not implemented for this op (it has {list(by_name)})")
    row = by_name[requested]
    why = row.device_error(device)
    if why is not None:
        raise RuntimeError(f"{op}: {source}{requested!r} is unavailable: {why}")
    why = row.unsupported(op, **call)
    if why is not None:
        raise ValueError(f"{op}: {why}")
    return row


def backend_table_markdown(title: str, backends, op_backends: Mapping[str, Sequence] | None = None) -> str:
    """The README's table of one op family, generated from its `BACKENDS` (so it cannot drift);
    `op_backends` (op -> its rows in default order) adds the default order of each op."""
    dtype_names = lambda dts: ", ".join(str(d).removeprefix("torch.") for d in dts)  # noqa: E731
    borrowed = lambda b: "; ".join(f"{part}: `{lender}`" for part, lender in b.borrows.items())  # noqa: E731
    lines = [f"**{title}**", "",
             "| backend | runs on | dtypes | limits | borrows |", "| --- | --- | --- | --- | --- |"]
    for b in backends:
        lines.append(f"| `{b.name}` | {b.runs_on} | {dtype_names(b.dtypes)} | {b.limits or '-'} | "
                     f"{borrowed(b) or '-'} |")
    if op_backends:
        lines += ["", "Default order (the first that can run the call is used): " + "; ".join(
            f"`{op}`: " + " > ".join(f"`{b.name}`" for b in rows) for op, rows in op_backends.items()) + "."]
    return "\n".join(lines)


@functools.cache
def _rows_by_name(backends: tuple) -> dict:
    return {b.name: b for b in backends}


def part_impl(backends, name: str, part: str | None = None):
    """The module that runs `part` of backend `name` in a family's table: its own, unless its row says
    it borrows that part from another backend."""
    rows = _rows_by_name(tuple(backends))
    row = rows[name]
    return rows[row.borrows.get(part, row.name)].impl


def run_backend(row: Backend, custom_op, body, *args, eager=None):
    """Kernel backends run inside the op's torch.library custom op; plain-PyTorch backends run its body
    directly (autograd and torch.compile trace through them). `eager`, a function with the custom op's
    arguments that runs the op's body under the op's autograd formula (an autograd.Function's apply),
    serves kernel backends outside torch.compile: the custom op's dispatch costs host time on every call
    (bench/NOTES.md, sessions 15 and 17)."""
    if not row.custom_ops:
        return body(*args, row.name)
    if eager is not None and not torch.compiler.is_compiling():
        return eager(*args, row.name)
    return custom_op(*args, row.name)
