// Host entries of the Hopper grouped GEMM for the MoE expert GEMMs (grouped_gemm_sm90.cu).
#pragma once

#include <cstddef>
#include <cstdint>

namespace m1 {

// Tile configurations compiled into the extension (see grouped_gemm_sm90.cu for the reasoning).
enum class GroupedGemmTile : int {
  kAuto = -1,   // pick from the average rows per expert
  kLarge = 0,   // cooperative 128x256x64, no cluster: prefill / training sized groups
  kSmall = 1,   // ping-pong 64x128x128, no cluster: decode sized groups (weight streaming)
};

// kAuto takes the small tile up to this many rows per expert on average (exported to Python by the
// binding as GROUPED_GEMM_SMALL_TILE_MAX_ROWS_PER_EXPERT).
constexpr int64_t kGroupedGemmSmallTileMaxRowsPerExpert = 128;

// Y[r] = X[r] @ W_e^T (weight_k_major: W_e is [N, K], layout "nk") or X[r] @ W_e (W_e is [K, N],
// layout "kn") for every row r in offsets[e] <= r < offsets[e+1]. With `gate` (a contiguous
// [num_rows, N] tensor, layout "nk" only, large tile) the result is silu(gate[r]) * (X[r] @ W_e^T): the
// up projection of SwiGLU with its activation fused into the epilogue. Rows outside [offsets[0],
// offsets[E]) are written as zeros. Offsets live on the device and are clamped to [0, num_rows]
// there, so a bad offset cannot make the kernel touch memory outside X or Y.
// Pointers, the strides in elements and the base addresses must be 16-byte aligned (TMA).
struct GroupedGemmArgs {
  const void* x; int64_t x_row_stride;                          // [num_rows, K], unit column stride
  const void* w; int64_t w_expert_stride; int64_t w_row_stride; // [E, N, K] or [E, K, N]
  const void* gate;                                             // null, or contiguous [num_rows, N]
  void* y;                                                      // contiguous [num_rows, N]
  const void* offsets;                                          // int32 [E + 1], device
  int64_t num_rows, n, k, num_experts;
  int weight_k_major;
  int dtype;                                                    // m1::DType: fp16 or bf16
  int tile;                                                     // GroupedGemmTile
  int device;
  void* workspace; int64_t workspace_bytes;
  uintptr_t stream;
};

// out_e = P_e^T Q_e, P_e = P[offsets[e]:offsets[e+1]] ([T_e, R]), Q_e likewise ([T_e, C]): the weight
// gradient of the grouped GEMM (layout "nk": P = dY, Q = X; layout "kn": P = X, Q = dY).
// Experts without rows get out_e = 0.
struct GroupedWgradArgs {
  const void* p; int64_t p_row_stride;                          // [num_rows, R]
  const void* q; int64_t q_row_stride;                          // [num_rows, C]
  void* out;                                                    // contiguous [E, R, C]
  const void* offsets;                                          // int32 [E + 1], device
  int64_t num_rows, r, c, num_experts;
  int dtype;
  int device;
  void* workspace; int64_t workspace_bytes;
  uintptr_t stream;
};

// Bytes of caller-allocated device workspace that grouped_gemm / grouped_gemm_wgrad need for
// `num_experts` groups on `device` (per-group problem sizes, pointers, strides, TMA descriptors).
size_t grouped_gemm_workspace_size(int64_t num_experts, int device);

void grouped_gemm(const GroupedGemmArgs& args);
void grouped_gemm_wgrad(const GroupedWgradArgs& args);

// out[m, f] = silu(gate_up[m, f]) * gate_up[m, F + f]: the SwiGLU between the two expert GEMMs
// (gate columns first, as transformers' gate_up_proj). gate_up is [rows, 2F] with row stride
// `in_row_stride`, out is contiguous [rows, F]; F % 8 == 0 and 16-byte aligned rows.
void swiglu(const void* gate_up, int64_t in_row_stride, void* out, int64_t rows, int64_t f, int dtype,
            uintptr_t stream);

// out = [d_gate | d_up] [rows, 2F] (contiguous) of h = silu(gate) * up, from dh [rows, F] (contiguous) and
// gate_up as for swiglu; fp32 math, F % 8 == 0 and 16-byte aligned rows.
void swiglu_backward(const void* dh, const void* gate_up, int64_t in_row_stride, void* out, int64_t rows, int64_t f,
                     int dtype, uintptr_t stream);

}  // namespace m1
