"""Access to the compiled CUDA extension `m1_kernels._cuda` (built by setup.py when nvcc is found).

The extension takes raw device pointers and keyword arguments only; these helpers turn tensors into
what it expects. Its enums (DType, GroupedGemmTile) are defined once, in csrc/, and exported by the
binding: Python refers to their members by name and never writes a code.
"""

import functools

import torch

@functools.cache
def _load():
    try:
        from . import _cuda
    except ImportError as exc:
        return None, (f"the CUDA extension m1_kernels._cuda is not built ({exc}); reinstall on a machine with "
                      "nvcc (pip install --no-build-isolation -e .) or use backend='triton'/'torch'")
    return _cuda, None


def cuda_extension_error(device: torch.device | None = None) -> str | None:
    """Why the CUDA backend cannot run on `device` (None when it can). Cached: it is on the hot path."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _device_error(device)


@functools.cache
def _device_error(device: torch.device | None) -> str | None:
    ext, why = _load()
    if ext is None:
        return why
    if not torch.cuda.is_available():
        return "the CUDA backend needs a CUDA GPU and none is visible to PyTorch"
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got tensors on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    built = [a.rstrip("a") for a in ext.compiled_archs.split(";")]
    if f"{major}{minor}" not in built:
        return (f"the CUDA extension was built for sm_{ext.compiled_archs} but this GPU is sm_{major}{minor}; "
                "rebuild with M1_CUDA_ARCHS")
    return None


def cuda_extension(device: torch.device | None = None):
    """The extension module, or a RuntimeError saying why it cannot serve `device`."""
    why = cuda_extension_error(device)
    if why is not None:
        raise RuntimeError(why)
    return _load()[0]


def kernel_dtype(dtype: torch.dtype):
    """The extension's DType member for a torch dtype, matched by name (torch.bfloat16 -> DType.bfloat16)."""
    return getattr(_load()[0].DType, str(dtype).removeprefix("torch."))


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
