// Internal interface between the grouped GEMM entry (grouped_gemm_sm90.cu) and the CUTLASS kernel
// instantiations (grouped_gemm_sm90_bf16.cu, grouped_gemm_sm90_fp16.cu: one translation unit per
// dtype so that the two compile in parallel). Light on purpose: no CUTLASS headers here.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace m1 {
namespace grouped_detail {

// One compiled CUTLASS kernel per entry (per dtype). Layout names follow the GEMM D = A B^T with
// A [M, K] and B [N, K] as CUTLASS sees them.
enum class Kernel : int {
  kNkLarge = 0,  // A K-major (X rows), B K-major (W_e [N, K]); cooperative 128x256x64, no cluster
  kNkSmall = 1,  // same layouts; ping-pong 64x128x128, no cluster (decode-sized groups)
  kKnLarge = 2,  // A K-major, B N-major (W_e [K, N]); cooperative 128x256x64, no cluster
  kWgrad = 3,    // A M-major (P_e^T), B N-major (Q_e^T), K = tokens of the group; ping-pong 128x128x64
  kNkGated = 4,  // as kNkLarge with the epilogue D = silu(C) * acc, C = the gate GEMM's output
};

// What the setup kernel needs to fill the per-group arrays on the device, and what the launch needs.
// Forward kernels: a = X (row stride a_ld), b = W (expert stride b_expert_stride, row stride b_ld),
// d = Y [num_rows, n], problem (rows_e, n, k). Wgrad: a = P, b = Q (row strides a_ld, b_ld),
// d = out [groups, n, k] with n = R and k = C, problem (R, C, rows_e). kNkGated also reads
// c = the gate output [num_rows, n] (null for the other kernels).
struct Launch {
  Kernel kernel;
  const void* a; int64_t a_ld;
  const void* b; int64_t b_expert_stride; int64_t b_ld;
  const void* c;
  void* d;
  const int* offsets;
  int64_t num_rows, n, k, groups;
  void* workspace; int64_t workspace_bytes;
  int device, sm_count;
  cudaStream_t stream;
};

// Per-group argument arrays at the start of the workspace, each 16-byte aligned: problem shapes
// (3 x int32), then A, B, C, D pointers and A, B, C, D leading dimensions (8 bytes each). The CUTLASS
// part follows at a 256-byte boundary.
inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
inline size_t group_array_bytes(int64_t groups) {
  const size_t g = static_cast<size_t>(groups);
  return align_up(align_up(g * 12, 16) + 8 * align_up(g * 8, 16), 256);
}

// Bytes of CUTLASS workspace (TMA descriptors, one set per SM) of the largest kernel of dtype T.
template <class T> size_t cutlass_workspace_bytes(int sm_count);

// Fills the group arrays on the device from the offsets and launches the kernel; throws
// std::runtime_error naming the failing CUTLASS step.
template <class T> void run(const Launch& launch);

}  // namespace grouped_detail
}  // namespace m1
