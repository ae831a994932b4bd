// Lightning attention decode step: one token per sequence, fp32 state updated in place.
//
//   S[slot, h] = lambda_h * S[slot, h] + k^T v        o = scale * q S[slot, h]
//
// Memory-bound: every state element is read once and written once (8 bytes per element), q/k/v/o are
// noise. A block owns one (row b, head h, slice of COLS state columns); columns are independent, so the
// slices need no cross-block reduction. Each thread owns one 16-byte column group and D/ROW_GROUPS
// rows, and issues all its state loads before the first use so enough bytes are in flight to saturate
// HBM even at batch 16. No host synchronisation: padding (slot < 0) and bad slots are handled on device.
#include "common.h"
#include "lightning_decode.h"

#include <stdexcept>
#include <string>

namespace m1 {
namespace {

// One (row b, head h, slice of COLS state columns) in the registers of a THREADS-thread block: each
// thread owns one 16-byte column group and ROWS rows (row_group + i * ROW_GROUPS).
template <typename T, int D, int DV, int COLS, int THREADS>
struct DecodeTile {
  static constexpr int COL_THREADS = COLS / 4;               // one float4 of columns per thread
  static constexpr int ROW_GROUPS = THREADS / COL_THREADS;   // rows processed in parallel
  static constexpr int ROWS = D / ROW_GROUPS;                // rows per thread
  static constexpr int WARPS = THREADS / 32;
  static_assert(THREADS % COL_THREADS == 0 && D % ROW_GROUPS == 0 && COL_THREADS <= 32, "bad tiling");

  float4 s[ROWS];
  float q[ROWS], k[ROWS], v[4];
  int b, h, col, slot;

  __device__ __forceinline__ bool valid(const LightningDecodeArgs& a) const { return slot >= 0 && slot < a.num_slots; }

  __device__ __forceinline__ float4* state_ptr(const LightningDecodeArgs& a) const {
    return reinterpret_cast<float4*>(static_cast<float*>(a.state) + (int64_t(slot) * a.num_heads + h) * (int64_t(D) * DV) +
                                     col);
  }

  // Issue every load of item bh (= b * num_heads + h) for column slice col_block: the state first, all
  // ROWS 16-byte loads in flight per thread (evict-first: each element is touched once), then q, k, v.
  __device__ __forceinline__ void load(const LightningDecodeArgs& a, int64_t bh, int col_block) {
    b = static_cast<int>(bh / a.num_heads);
    h = static_cast<int>(bh - int64_t(b) * a.num_heads);
    const int row_group = threadIdx.x / COL_THREADS;
    col = col_block * COLS + (threadIdx.x % COL_THREADS) * 4;
    slot = static_cast<const int*>(a.slot_idx)[b];
    if (!valid(a)) return;
    const float4* state = state_ptr(a);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) s[i] = __ldcs(&state[(row_group + i * ROW_GROUPS) * (DV / 4)]);
    const T* qp = static_cast<const T*>(a.q) + int64_t(b) * a.q_stride_b + int64_t(h) * a.q_stride_h;
    const T* kp = static_cast<const T*>(a.k) + int64_t(b) * a.k_stride_b + int64_t(h) * a.k_stride_h;
    const T* vp = static_cast<const T*>(a.v) + int64_t(b) * a.v_stride_b + int64_t(h) * a.v_stride_h;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      q[i] = to_float(qp[row_group + i * ROW_GROUPS]);
      k[i] = to_float(kp[row_group + i * ROW_GROUPS]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = to_float(vp[col + j]);
  }

  // S = lambda S + k^T v, stored back (streaming), and o = scale * q S summed over the block's rows
  // into out. partial: WARPS x COL_THREADS float4 of shared memory.
  // Padding rows (slot < 0) write zeros, out-of-range slots NaN (checking on the host would sync).
  __device__ __forceinline__ void update_and_store(const LightningDecodeArgs& a, float4* partial) {
    T* out = static_cast<T*>(a.out) + (int64_t(b) * a.num_heads + h) * DV + col;
    const int row_group = threadIdx.x / COL_THREADS;
    if (!valid(a)) {
      const float fill = slot < 0 ? 0.f : __int_as_float(0x7fc00000);
      if (row_group == 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = from_float<T>(fill);
      }
      return;
    }
    const float decay = __expf(-static_cast<const float*>(a.slope)[h]);
    float4* state = state_ptr(a);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      s[i].x = fmaf(decay, s[i].x, k[i] * v[0]);
      s[i].y = fmaf(decay, s[i].y, k[i] * v[1]);
      s[i].z = fmaf(decay, s[i].z, k[i] * v[2]);
      s[i].w = fmaf(decay, s[i].w, k[i] * v[3]);
      acc[0] = fmaf(q[i], s[i].x, acc[0]);
      acc[1] = fmaf(q[i], s[i].y, acc[1]);
      acc[2] = fmaf(q[i], s[i].z, acc[2]);
      acc[3] = fmaf(q[i], s[i].w, acc[3]);
      __stcs(&state[(row_group + i * ROW_GROUPS) * (DV / 4)], s[i]);  // streaming: not re-read by this step
    }
    // Sum the partial outputs over row groups: first inside the warp, then across warps.
#pragma unroll
    for (int offset = COL_THREADS; offset < 32; offset *= 2) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], offset);
    }
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (lane < COL_THREADS) partial[warp * COL_THREADS + lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    __syncthreads();
    if (threadIdx.x < COL_THREADS) {
      float4 total = partial[threadIdx.x];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) {
        const float4 p = partial[w * COL_THREADS + threadIdx.x];
        total.x += p.x; total.y += p.y; total.z += p.z; total.w += p.w;
      }
      out[0] = from_float<T>(a.scale * total.x);
      out[1] = from_float<T>(a.scale * total.y);
      out[2] = from_float<T>(a.scale * total.z);
      out[3] = from_float<T>(a.scale * total.w);
    }
  }
};

// One block per (row, head) x column slice: load, update, store, exit. MIN_BLOCKS resident blocks per
// SM cap the registers (each thread's ROWS float4 of state must stay in registers, not spill).
template <typename T, int D, int DV, int COLS, int THREADS, int MIN_BLOCKS>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) lightning_decode_kernel(LightningDecodeArgs a) {
  using Tile = DecodeTile<T, D, DV, COLS, THREADS>;
  __shared__ float4 partial[Tile::WARPS * Tile::COL_THREADS];
  Tile tile;
  tile.load(a, blockIdx.x, blockIdx.y);
  tile.update_and_store(a, partial);
}

template <typename T, int D, int DV, int COLS, int THREADS, int MIN_BLOCKS = 1>
cudaError_t launch(const LightningDecodeArgs& a) {
  const dim3 grid(static_cast<unsigned>(a.batch * a.num_heads), DV / COLS);
  lightning_decode_kernel<T, D, DV, COLS, THREADS, MIN_BLOCKS>
      <<<grid, THREADS, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a);
  return cudaGetLastError();
}

// Tiling (state columns per block, threads per block). a.variant > 0 forces one (benchmark sweeps);
// 0 picks the measured default for the shape.
template <typename T, int D, int DV>
cudaError_t launch(const LightningDecodeArgs& a) {
  if constexpr (D == 128 && DV == 128) {
    switch (a.variant) {
      case 1: return launch<T, D, DV, 64, 128>(a);
      case 2: return launch<T, D, DV, 32, 128>(a);
      case 3: return launch<T, D, DV, 128, 256, 2>(a);
      case 4: return launch<T, D, DV, 64, 256>(a);
      case 5: return launch<T, D, DV, 32, 256>(a);
      case 6: return launch<T, D, DV, 128, 512, 2>(a);
      case 7: return launch<T, D, DV, 128, 1024>(a);
      case 8: return launch<T, D, DV, 64, 512, 2>(a);
      default: break;
    }
  }
  // Whole state rows per block, 256 threads, 2 blocks per SM: best or tied-best in the H100 sweep at
  // every B, H; on the H200 the wider variants 6-8 are within run-to-run spread of it (bench/NOTES.md).
  return launch<T, D, DV, DV, 256, 2>(a);
}

template <typename T>
cudaError_t dispatch_dims(const LightningDecodeArgs& a) {
  if (a.head_dim == 128 && a.value_dim == 128) return launch<T, 128, 128>(a);
  if (a.head_dim == 64 && a.value_dim == 64) return launch<T, 64, 64>(a);
  if (a.head_dim == 128 && a.value_dim == 64) return launch<T, 128, 64>(a);
  if (a.head_dim == 64 && a.value_dim == 128) return launch<T, 64, 128>(a);
  throw std::invalid_argument("lightning_decode: head_dim and value_dim must be 64 or 128");
}

}  // namespace

void lightning_decode(const LightningDecodeArgs& a) {
  if (a.batch == 0) return;
  cudaError_t err;
  switch (static_cast<DType>(a.dtype)) {
    case DType::kFloat32: err = dispatch_dims<float>(a); break;
    case DType::kFloat16: err = dispatch_dims<__half>(a); break;
    case DType::kBFloat16: err = dispatch_dims<__nv_bfloat16>(a); break;
    default: throw std::invalid_argument("lightning_decode: unsupported dtype code");
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lightning_decode: CUDA launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace m1
