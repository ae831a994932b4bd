// Lightning attention decode step: one token per sequence, fp32 state updated in place.
//
//   S[slot, h] = lambda_h * S[slot, h] + k^T v        o = scale * q S[slot, h]
//
// Memory-bound: every state element is read once and written once (8 bytes per element), q/k/v/o are
// noise. A block owns one (row b, head h, slice of COLS state columns); columns are independent, so the
// slices need no cross-block reduction. Each thread owns one 16-byte column group and D/ROW_GROUPS
// rows, and issues all its state loads before the first use so enough bytes are in flight to saturate
// HBM even at batch 16. No host synchronisation: padding (slot < 0), bad slots and bad rates are handled on
// device.
#include "common.h"
#include "lightning_decode.h"

#include <stdexcept>
#include <string>

namespace m1 {
namespace {

// State cache policy: streaming (evict-first) loads and stores, streaming stores only, or none. Each
// element is touched once per step; which is faster depends on the tiling and the batch (bench/NOTES.md).
enum class Cache { kStream, kStreamStores, kNone };

template <Cache C>
__device__ __forceinline__ float4 load_state(const float4* p) {
  if constexpr (C == Cache::kStream) return __ldcs(p);
  else return *p;
}

template <Cache C>
__device__ __forceinline__ void store_state(float4* p, float4 x) {
  if constexpr (C == Cache::kNone) *p = x;
  else __stcs(p, x);
}

// One block per (row b, head h, slice of COLS state columns): load, update, store, exit. Each thread
// owns one 16-byte column group and ROWS rows (row_group + i * ROW_GROUPS). MIN_BLOCKS resident blocks
// per SM cap the registers (each thread's ROWS float4 of state must stay in registers, not spill).
template <typename T, int D, int DV, int COLS, int THREADS, int MIN_BLOCKS, Cache C>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) lightning_decode_kernel(LightningDecodeArgs a) {
  constexpr int COL_THREADS = COLS / 4;               // one float4 of columns per thread
  constexpr int ROW_GROUPS = THREADS / COL_THREADS;   // rows processed in parallel
  constexpr int ROWS = D / ROW_GROUPS;                // rows per thread
  constexpr int WARPS = THREADS / 32;
  static_assert(THREADS % COL_THREADS == 0 && D % ROW_GROUPS == 0 && COL_THREADS <= 32, "bad tiling");

  // Launch order is column slice, then head, then row: the blocks resident at one time stream whole rows
  // of the cache (num_heads * D * DV contiguous floats each), not slices D * DV floats apart.
  constexpr int SLICES = DV / COLS;
  const int bh = blockIdx.x / SLICES;
  const int b = bh / a.num_heads;
  const int h = bh - b * a.num_heads;
  const int col_thread = threadIdx.x % COL_THREADS;
  const int row_group = threadIdx.x / COL_THREADS;
  const int col = (blockIdx.x % SLICES) * COLS + col_thread * 4;

  T* out = static_cast<T*>(a.out) + (int64_t(b) * a.num_heads + h) * DV + col;
  const int slot = static_cast<const int*>(a.slot_idx)[b];
  if (slot < 0 || slot >= a.num_slots) {
    // Padding row: zeros. Out-of-range slot: NaN, so the bug is loud (checking on the host would sync).
    const float fill = slot < 0 ? 0.f : __int_as_float(0x7fc00000);
    if (row_group == 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = from_float<T>(fill);
    }
    return;
  }

  const T* __restrict__ q = static_cast<const T*>(a.q) + int64_t(b) * a.q_stride_b + int64_t(h) * a.q_stride_h;
  const T* __restrict__ k = static_cast<const T*>(a.k) + int64_t(b) * a.k_stride_b + int64_t(h) * a.k_stride_h;
  const T* __restrict__ v = static_cast<const T*>(a.v) + int64_t(b) * a.v_stride_b + int64_t(h) * a.v_stride_h;
  float4* __restrict__ state = reinterpret_cast<float4*>(
      static_cast<float*>(a.state) + (int64_t(slot) * a.num_heads + h) * (int64_t(D) * DV) + col);

  // All loads before the first store: ROWS independent 16-byte state loads in flight per thread, then q
  // and k into shared memory and this thread's v.
  // Loaded inside the update loop instead, each row's q/k load would wait for the previous row's store
  // (the compiler cannot prove they do not alias): a chain of ROWS cache round trips per block.
  float4 s[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) s[i] = load_state<C>(&state[(row_group + i * ROW_GROUPS) * (DV / 4)]);
  __shared__ float qk[2][D];
  for (int d = threadIdx.x; d < D; d += THREADS) {
    qk[0][d] = to_float(q[d]);
    qk[1][d] = to_float(k[d]);
  }
  float vv[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) vv[j] = to_float(v[col + j]);
  // A negative or non-finite rate (not checked on the host: that would synchronise) makes this head NaN.
  const float rate = static_cast<const float*>(a.slope)[h];
  const float decay = rate >= 0.f && rate <= 3.402823466e38f ? __expf(-rate) : __int_as_float(0x7fc00000);
  __syncthreads();

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = row_group + i * ROW_GROUPS;
    const float qi = qk[0][row], ki = qk[1][row];
    s[i].x = fmaf(decay, s[i].x, ki * vv[0]);
    s[i].y = fmaf(decay, s[i].y, ki * vv[1]);
    s[i].z = fmaf(decay, s[i].z, ki * vv[2]);
    s[i].w = fmaf(decay, s[i].w, ki * vv[3]);
    acc[0] = fmaf(qi, s[i].x, acc[0]);
    acc[1] = fmaf(qi, s[i].y, acc[1]);
    acc[2] = fmaf(qi, s[i].z, acc[2]);
    acc[3] = fmaf(qi, s[i].w, acc[3]);
    store_state<C>(&state[row * (DV / 4)], s[i]);
  }

  // Sum the partial outputs over row groups: first inside the warp, then across warps.
#pragma unroll
  for (int offset = COL_THREADS; offset < 32; offset *= 2) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], offset);
  }
  __shared__ float4 partial[WARPS][COL_THREADS];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane < COL_THREADS) partial[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  if (threadIdx.x < COL_THREADS) {
    float4 total = partial[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) {
      const float4 p = partial[w][threadIdx.x];
      total.x += p.x; total.y += p.y; total.z += p.z; total.w += p.w;
    }
    out[0] = from_float<T>(a.scale * total.x);
    out[1] = from_float<T>(a.scale * total.y);
    out[2] = from_float<T>(a.scale * total.z);
    out[3] = from_float<T>(a.scale * total.w);
  }
}

template <typename T, int D, int DV, int COLS, int THREADS, int MIN_BLOCKS = 1, Cache C = Cache::kStream>
cudaError_t launch(const LightningDecodeArgs& a) {
  const unsigned grid = static_cast<unsigned>(a.batch * a.num_heads * (DV / COLS));
  lightning_decode_kernel<T, D, DV, COLS, THREADS, MIN_BLOCKS, C>
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
      case 6: return launch<T, D, DV, 128, 256>(a);
      case 7: return launch<T, D, DV, 128, 1024>(a);
      case 8: return launch<T, D, DV, 128, 512, 2>(a);
      case 9: return launch<T, D, DV, 128, 512, 2, Cache::kStreamStores>(a);
      case 10: return launch<T, D, DV, 64, 512, 2, Cache::kStreamStores>(a);
      case 11: return launch<T, D, DV, 64, 256, 4, Cache::kStreamStores>(a);
      case 12: return launch<T, D, DV, 64, 256, 4, Cache::kNone>(a);
      default: break;
    }
  }
  // 64-column slices (half a D = 128 row) x 512 threads, 2 blocks per SM, streaming loads and stores,
  // launched in memory order: best or tied-best at every H64 batch, B16 to B256, in the session-5 sweep
  // (bench/NOTES.md).
  return launch<T, D, DV, 64, 512, 2>(a);
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
