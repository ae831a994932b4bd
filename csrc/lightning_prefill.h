// Host entry of the lightning prefill forward (lightning_prefill.cu).
#pragma once

#include <cstdint>

namespace m1 {

// Tokens per chunk and state columns per block of the kernels; the host cuts segments into whole chunks
// and counts a segment's blocks in value tiles (the binding exports both to Python).
constexpr int kLightningPrefillChunk = 64;
constexpr int kLightningPrefillValueTile = 64;

// Tokens are addressed as (row b, position t): element offset b * stride_b + t * stride_t + h * stride_h
// (unit stride in the last dim). Plain batches use b = sequence; packed varlen batches use b = 0 and
// t = the packed position. The host splits every sequence into segments (a work table of int32 rows
// {b, t_start, length, sequence}) and lists each sequence's segments ({first segment, count}), so the
// three kernels need no device-side search and no host synchronisation beyond building the table.
// Token strides may be negative: the backward walks time backwards from a pointer at the last token.
struct LightningPrefillArgs {
  const void* q; const void* k; const void* v; void* o;
  int64_t q_stride_b, q_stride_t, q_stride_h;
  int64_t k_stride_b, k_stride_t, k_stride_h;
  int64_t v_stride_b, v_stride_t, v_stride_h;
  int64_t o_stride_b, o_stride_t, o_stride_h;
  const void* slope;            // [H] fp32 rates
  const void* initial_state;    // [N, H, D, DV] fp32 or null; with slot_idx: the slot cache [S, H, D, DV]
  void* final_state;            // [N, H, D, DV] fp32, or null when not asked for (ignored with slot_idx)
  const void* slot_idx;         // [N] int32 or null: sequence n starts from and ends in cache slot
                                // slot_idx[n], in place; a negative slot gives zeros and keeps the cache
  void* segment_states;         // [num_segments, H, D, DV] fp32 workspace
  const void* segments;         // [num_segments, 4] int32: b, t_start, length, sequence
  const void* sequences;        // [N, 2] int32: first segment, segment count
  int64_t num_segments, num_sequences, num_heads, head_dim, value_dim;
  int dtype;
  float scale;                  // multiplies o
  float kv_scale;               // multiplies every k^T v term (states and scores); 1 in the forward
  int adjoint;                  // states one step later (the backward's reverse passes, lightning_prefill.cu)
  uintptr_t stream;
};

void lightning_prefill_forward(const LightningPrefillArgs& args);

}  // namespace m1
