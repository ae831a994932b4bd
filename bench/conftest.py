"""Benchmarks run on the GPU when there is one; without it, on the CPU paths (Triton interpreted)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
