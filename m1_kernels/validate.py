"""Input checks shared by the public ops: each raises TypeError/ValueError naming the argument."""

import torch
from torch.utils.weak import WeakIdKeyDictionary

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name, t, *, ndim=None, dtypes=None, device=None, unit_last_stride=False, contiguous=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if unit_last_stride and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")


def check_shape(name, t, expected, what=""):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{what}, got {tuple(t.shape)}")


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured: value checks that read device memory must not run."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def can_read_values(device: torch.device) -> bool:
    """Whether a check may read tensor values on the host: not while torch.compile traces (it would
    break the graph) nor while a CUDA graph is captured."""
    return not torch.compiler.is_compiling() and not capturing(device)


# Device tensors read on the host, with their in-place version then: {tensor: (version, values)}.
_HOST_VALUES = WeakIdKeyDictionary()


def host_values(t: torch.Tensor) -> tuple:
    """t's values as a tuple on the host, read once per device tensor and in-place version: the checks and
    the kernels' tables that need the same values (cu_seqlens) share one host-device synchronisation.
    CPU tensors are read on every call (nothing to save)."""
    if t.device.type == "cpu":
        return tuple(t.tolist())
    version, values = _HOST_VALUES.get(t, (None, None))
    if version != t._version:
        version, values = t._version, tuple(t.tolist())
        _HOST_VALUES[t] = (version, values)
    return values
