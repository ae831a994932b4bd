"""Shared plumbing for the op packages: the CUDA extension, backend selection and input checks."""

from .dispatch import BACKENDS, available_backends, resolve_backend
from .extension import cuda_extension, cuda_extension_error

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "cuda_extension", "cuda_extension_error"]
