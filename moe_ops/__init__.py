"""Mixture-of-Experts ops: routing, permutation, grouped GEMM, weighted combine, the fused layer."""

from .backends import BACKENDS
from .layer import SparseMoE
from .ops import fused_moe, grouped_gemm, permute, route, unpermute

__all__ = ["BACKENDS", "fused_moe", "grouped_gemm", "permute", "route", "unpermute", "SparseMoE"]
