// bf16 instantiation of the MoE grouped GEMM kernels (see grouped_gemm_sm90_kernels.cuh).
#include "grouped_gemm_sm90_kernels.cuh"

M1_INSTANTIATE_GROUPED_GEMM(cutlass::bfloat16_t)
