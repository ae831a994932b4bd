// Host entry of the lightning decode kernel (lightning_decode.cu).
#pragma once

#include <cstdint>

namespace m1 {

// Raw-pointer arguments: the binding takes them as integers so no framework is linked (docs/design.md, "Backends").
// q/k/v are [B, H, D] with unit stride in the last dim; state is a contiguous [S, H, D, DV] fp32 cache;
// slot_idx is int32 [B]; out is a contiguous [B, H, DV] tensor of the input dtype.
struct LightningDecodeArgs {
  const void* q; const void* k; const void* v;
  int64_t q_stride_b, q_stride_h, k_stride_b, k_stride_h, v_stride_b, v_stride_h;
  const void* slope; void* state; const void* slot_idx; void* out;
  int64_t batch, num_heads, head_dim, value_dim, num_slots;
  int dtype;
  float scale;
  uintptr_t stream;
  int variant;  // 0: default; 1..12: a fixed tiling or cache policy, for benchmark sweeps (lightning_decode.cu)
};

void lightning_decode(const LightningDecodeArgs& args);

}  // namespace m1
