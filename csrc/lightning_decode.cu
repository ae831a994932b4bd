// Lightning attention decode step: one token per sequence, fp32 state updated in place.
//
//   S[slot, h] = lambda_h * S[slot, h] + k^T v        o = scale * q S[slot, h]
//
// Memory-bound: every state element is read once and written once (8 bytes per element), q/k/v/o are
// noise. Two kernels:
// - the streaming kernel (default where its inputs allow): a persistent grid; each block walks its
//   (row, head) items in chunks of rows that the bulk copy engine moves between HBM and a ring of
//   shared-memory stages, so loads for the next chunks are in flight while this chunk is updated and
//   the previous one is stored. The SM never waits between blocks and stores never hold registers.
// - the register kernel (unaligned q/k/v, sweeps): one block per (row, head, column slice); each thread
//   issues all its 16-byte state loads before the first use, updates, stores and exits.
// Columns are independent, rows are summed into o inside one block: no cross-block reduction. No host
// synchronisation: padding (slot < 0) and bad slots are handled on the device.
#include "common.h"
#include "lightning_decode.h"

#include <stdexcept>
#include <string>

namespace m1 {
namespace {

// One block per (row b, head h, slice of COLS state columns): load, update, store, exit. Each thread
// owns one 16-byte column group and ROWS rows (row_group + i * ROW_GROUPS). MIN_BLOCKS resident blocks
// per SM cap the registers (each thread's ROWS float4 of state must stay in registers, not spill).
template <typename T, int D, int DV, int COLS, int THREADS, int MIN_BLOCKS, bool EVICT_FIRST>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) lightning_decode_kernel(LightningDecodeArgs a) {
  constexpr int COL_THREADS = COLS / 4;               // one float4 of columns per thread
  constexpr int ROW_GROUPS = THREADS / COL_THREADS;   // rows processed in parallel
  constexpr int ROWS = D / ROW_GROUPS;                // rows per thread
  constexpr int WARPS = THREADS / 32;
  static_assert(THREADS % COL_THREADS == 0 && D % ROW_GROUPS == 0 && COL_THREADS <= 32, "bad tiling");

  const int bh = blockIdx.x;
  const int b = bh / a.num_heads;
  const int h = bh - b * a.num_heads;
  const int col_thread = threadIdx.x % COL_THREADS;
  const int row_group = threadIdx.x / COL_THREADS;
  const int col = blockIdx.y * COLS + col_thread * 4;

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

  const T* q = static_cast<const T*>(a.q) + int64_t(b) * a.q_stride_b + int64_t(h) * a.q_stride_h;
  const T* k = static_cast<const T*>(a.k) + int64_t(b) * a.k_stride_b + int64_t(h) * a.k_stride_h;
  const T* v = static_cast<const T*>(a.v) + int64_t(b) * a.v_stride_b + int64_t(h) * a.v_stride_h;
  float4* state = reinterpret_cast<float4*>(static_cast<float*>(a.state) +
                                            (int64_t(slot) * a.num_heads + h) * (int64_t(D) * DV) + col);

  // All state loads first: ROWS independent 16-byte loads in flight per thread. EVICT_FIRST marks them
  // (and the stores) as touched once.
  float4 s[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    float4* p = &state[(row_group + i * ROW_GROUPS) * (DV / 4)];
    s[i] = EVICT_FIRST ? __ldcs(p) : *p;
  }

  const float decay = __expf(-static_cast<const float*>(a.slope)[h]);
  float vv[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) vv[j] = to_float(v[col + j]);

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = row_group + i * ROW_GROUPS;
    const float ki = to_float(k[row]);
    const float qi = to_float(q[row]);
    s[i].x = fmaf(decay, s[i].x, ki * vv[0]);
    s[i].y = fmaf(decay, s[i].y, ki * vv[1]);
    s[i].z = fmaf(decay, s[i].z, ki * vv[2]);
    s[i].w = fmaf(decay, s[i].w, ki * vv[3]);
    acc[0] = fmaf(qi, s[i].x, acc[0]);
    acc[1] = fmaf(qi, s[i].y, acc[1]);
    acc[2] = fmaf(qi, s[i].z, acc[2]);
    acc[3] = fmaf(qi, s[i].w, acc[3]);
    if constexpr (EVICT_FIRST) {
      __stcs(&state[row * (DV / 4)], s[i]);
    } else {
      state[row * (DV / 4)] = s[i];
    }
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

template <typename T, int D, int DV, int COLS, int THREADS, int MIN_BLOCKS = 1, bool EVICT_FIRST = true>
cudaError_t launch(const LightningDecodeArgs& a) {
  const dim3 grid(static_cast<unsigned>(a.batch * a.num_heads), DV / COLS);
  lightning_decode_kernel<T, D, DV, COLS, THREADS, MIN_BLOCKS, EVICT_FIRST>
      <<<grid, THREADS, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a);
  return cudaGetLastError();
}

// ---- Streaming kernel: bulk copies through a ring of shared-memory stages ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void barrier_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

// The one arrival of a stage's barrier: it completes once `bytes` more have landed.
__device__ __forceinline__ void barrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

template <bool EVICT_FIRST>
__device__ __forceinline__ void bulk_load_once(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                               uint64_t policy) {
  if constexpr (!EVICT_FIRST) return bulk_load(dst, src, bytes, bar);
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
}

template <bool EVICT_FIRST>
__device__ __forceinline__ void bulk_store_once(void* dst, const void* src, uint32_t bytes, uint64_t policy) {
  if constexpr (EVICT_FIRST) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group.L2::cache_hint [%0], [%1], %2, %3;" ::"l"(dst),
                 "r"(smem_addr(src)), "r"(bytes), "l"(policy)
                 : "memory");
  } else {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_addr(src)),
                 "r"(bytes)
                 : "memory");
  }
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Wait until at most N bulk stores of this thread still read shared memory.
template <int N>
__device__ __forceinline__ void bulk_stores_read_wait() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void bulk_stores_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Ordinary shared-memory writes become visible to the copy engine (which stores them next).
__device__ __forceinline__ void fence_shared_to_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// One stage: CHUNK_ROWS consecutive state rows (contiguous in HBM) and the q, k, v entries they need.
template <typename T, int DV, int CHUNK_ROWS>
struct StreamStage {
  float4 state[CHUNK_ROWS * DV / 4];
  T q[CHUNK_ROWS];
  T k[CHUNK_ROWS];
  T v[DV];
  static constexpr uint32_t kStateBytes = CHUNK_ROWS * DV * sizeof(float);
  static constexpr uint32_t kBytes = kStateBytes + (2 * CHUNK_ROWS + DV) * sizeof(T);
  static_assert(CHUNK_ROWS * sizeof(T) % 16 == 0 && DV * sizeof(T) % 16 == 0, "bulk copies move 16-byte units");
};

template <typename T, int DV, int CHUNK_ROWS, int STAGES, int THREADS>
struct StreamSmem {
  StreamStage<T, DV, CHUNK_ROWS> stages[STAGES];
  float4 partial[2][THREADS / 32][DV / 4];  // per-warp output sums, double-buffered over items
  uint64_t full[STAGES];
};

// Persistent: block i owns items (row b, head h) i, i + gridDim.x, ...; every item is D / CHUNK_ROWS
// chunks. Thread 0 keeps STAGES - 1 chunks of loads in flight; all threads update the chunk that has
// landed in place in shared memory, then thread 0 stores it back with one bulk copy and refills the
// stage freed one step earlier (its store has finished reading shared memory by then).
template <typename T, int D, int DV, int CHUNK_ROWS, int STAGES, int THREADS, bool EVICT_FIRST>
__global__ void __launch_bounds__(THREADS) lightning_decode_streaming_kernel(LightningDecodeArgs a) {
  using Stage = StreamStage<T, DV, CHUNK_ROWS>;
  using Smem = StreamSmem<T, DV, CHUNK_ROWS, STAGES, THREADS>;
  constexpr int CHUNKS = D / CHUNK_ROWS;
  constexpr int COL_THREADS = DV / 4;
  constexpr int ROW_GROUPS = THREADS / COL_THREADS;
  constexpr int ROWS = CHUNK_ROWS / ROW_GROUPS;  // rows per thread per chunk
  static_assert(D % CHUNK_ROWS == 0 && CHUNK_ROWS % ROW_GROUPS == 0 && COL_THREADS <= 32 && THREADS >= DV,
                "bad tiling");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int* slot_idx = static_cast<const int*>(a.slot_idx);
  const int heads = static_cast<int>(a.num_heads);
  const int items = static_cast<int>(a.batch) * heads;
  const int num_slots = static_cast<int>(a.num_slots);
  float* state = static_cast<float*>(a.state);
  auto valid = [&](int item) {
    const int slot = slot_idx[item / heads];
    return slot >= 0 && slot < num_slots;
  };
  auto state_chunk = [&](int item, int chunk) {
    const int slot = slot_idx[item / heads];
    return state + ((int64_t(slot) * heads + item % heads) * D + chunk * CHUNK_ROWS) * int64_t(DV);
  };

  // Producer (thread 0): the next chunk to load, walking the same valid items as the consumers.
  int next_item = blockIdx.x, next_chunk = 0;
  uint64_t policy = 0;
  auto skip_padding = [&] {
    while (next_item < items && !valid(next_item)) next_item += gridDim.x;
  };
  auto load_next = [&](int stage) {
    const int b = next_item / heads, h = next_item % heads, row = next_chunk * CHUNK_ROWS;
    Stage& st = sm.stages[stage];
    barrier_expect_bytes(&sm.full[stage], Stage::kBytes);
    bulk_load_once<EVICT_FIRST>(st.state, state_chunk(next_item, next_chunk), Stage::kStateBytes, &sm.full[stage], policy);
    const T* q = static_cast<const T*>(a.q) + b * a.q_stride_b + h * a.q_stride_h;
    const T* k = static_cast<const T*>(a.k) + b * a.k_stride_b + h * a.k_stride_h;
    const T* v = static_cast<const T*>(a.v) + b * a.v_stride_b + h * a.v_stride_h;
    bulk_load(st.q, q + row, CHUNK_ROWS * sizeof(T), &sm.full[stage]);
    bulk_load(st.k, k + row, CHUNK_ROWS * sizeof(T), &sm.full[stage]);
    bulk_load(st.v, v, DV * sizeof(T), &sm.full[stage]);
    if (++next_chunk == CHUNKS) {
      next_chunk = 0;
      next_item += gridDim.x;
      skip_padding();
    }
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) barrier_init(&sm.full[s]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    policy = evict_first_policy();
    skip_padding();
    for (int s = 0; s < STAGES - 1 && next_item < items; ++s) load_next(s);
  }
  __syncthreads();

  const int col_thread = threadIdx.x % COL_THREADS;
  const int row_group = threadIdx.x / COL_THREADS;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int consumed = 0, finished = 0;  // chunks and valid items this block has processed
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int b = item / heads, h = item % heads;
    T* out = static_cast<T*>(a.out) + int64_t(item) * DV;
    if (!valid(item)) {
      // Padding row: zeros. Out-of-range slot: NaN, so the bug is loud (checking on the host would sync).
      if (threadIdx.x < DV) out[threadIdx.x] = from_float<T>(slot_idx[b] < 0 ? 0.f : __int_as_float(0x7fc00000));
      continue;
    }
    const float decay = __expf(-static_cast<const float*>(a.slope)[h]);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int chunk = 0; chunk < CHUNKS; ++chunk, ++consumed) {
      const int stage = consumed % STAGES;
      Stage& st = sm.stages[stage];
      barrier_wait(&sm.full[stage], (consumed / STAGES) & 1);
      float vv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) vv[j] = to_float(st.v[col_thread * 4 + j]);
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        const int r = row_group + i * ROW_GROUPS;
        float4 s = st.state[r * COL_THREADS + col_thread];
        const float ki = to_float(st.k[r]), qi = to_float(st.q[r]);
        s.x = fmaf(decay, s.x, ki * vv[0]);
        s.y = fmaf(decay, s.y, ki * vv[1]);
        s.z = fmaf(decay, s.z, ki * vv[2]);
        s.w = fmaf(decay, s.w, ki * vv[3]);
        acc[0] = fmaf(qi, s.x, acc[0]);
        acc[1] = fmaf(qi, s.y, acc[1]);
        acc[2] = fmaf(qi, s.z, acc[2]);
        acc[3] = fmaf(qi, s.w, acc[3]);
        st.state[r * COL_THREADS + col_thread] = s;
      }
      fence_shared_to_async();
      const bool last = chunk == CHUNKS - 1;
      if (last) {  // this thread's rows are summed: reduce over the row groups of the warp
#pragma unroll
        for (int offset = COL_THREADS; offset < 32; offset *= 2) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], offset);
        }
        if (lane < COL_THREADS) sm.partial[finished & 1][warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        bulk_store_once<EVICT_FIRST>(state_chunk(item, chunk), st.state, Stage::kStateBytes, policy);
        if (next_item < items) {
          bulk_stores_read_wait<1>();  // the stage stored one step ago is free again
          load_next((consumed + STAGES - 1) % STAGES);
        }
      }
      if (last && threadIdx.x < COL_THREADS) {
        float4 total = sm.partial[finished & 1][0][threadIdx.x];
#pragma unroll
        for (int w = 1; w < THREADS / 32; ++w) {
          const float4 p = sm.partial[finished & 1][w][threadIdx.x];
          total.x += p.x; total.y += p.y; total.z += p.z; total.w += p.w;
        }
        T* o = out + threadIdx.x * 4;
        o[0] = from_float<T>(a.scale * total.x);
        o[1] = from_float<T>(a.scale * total.y);
        o[2] = from_float<T>(a.scale * total.z);
        o[3] = from_float<T>(a.scale * total.w);
      }
    }
    ++finished;
  }
  if (threadIdx.x == 0) bulk_stores_wait_all();  // shared memory must outlive the stores reading it
}

// Per-device cache of a launch property that needs a driver query.
template <typename Query>
int cached_per_device(int (&cache)[64], Query query) {
  int device = 0;
  cudaGetDevice(&device);
  if (device >= 64) return query();
  if (cache[device] == 0) cache[device] = query();
  return cache[device];
}

// The persistent grid: as many resident blocks as fit, then trimmed so every block gets the same
// number of items (to one), since all blocks share HBM and finish together only when balanced.
template <typename T, int D, int DV, int CHUNK_ROWS, int STAGES, bool EVICT_FIRST = true, int THREADS = 256>
cudaError_t launch_streaming(const LightningDecodeArgs& a) {
  constexpr size_t smem = sizeof(StreamSmem<T, DV, CHUNK_ROWS, STAGES, THREADS>);
  auto kernel = lightning_decode_streaming_kernel<T, D, DV, CHUNK_ROWS, STAGES, THREADS, EVICT_FIRST>;
  static int resident_cache[64], sm_cache[64];
  const int resident = cached_per_device(resident_cache, [&] {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem);
    return per_sm;
  });
  const int sms = cached_per_device(sm_cache, [] {
    int device = 0, count = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    return count;
  });
  if (resident == 0) return cudaErrorInvalidConfiguration;
  const int64_t items = a.batch * a.num_heads;
  const int64_t per_block = (items + int64_t(sms) * resident - 1) / (int64_t(sms) * resident);
  const dim3 grid(static_cast<unsigned>((items + per_block - 1) / per_block));
  kernel<<<grid, THREADS, smem, reinterpret_cast<cudaStream_t>(a.stream)>>>(a);
  return cudaGetLastError();
}

// The bulk copy engine needs 16-byte aligned addresses: q/k/v rows and strides must allow it.
template <typename T>
bool streaming_allowed(const LightningDecodeArgs& a) {
  auto aligned = [](const void* p, int64_t stride_b, int64_t stride_h) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride_b * sizeof(T) % 16 == 0 &&
           stride_h * sizeof(T) % 16 == 0;
  };
  return aligned(a.q, a.q_stride_b, a.q_stride_h) && aligned(a.k, a.k_stride_b, a.k_stride_h) &&
         aligned(a.v, a.v_stride_b, a.v_stride_h) && a.batch * a.num_heads < (int64_t(1) << 31);
}

// a.variant > 0 forces one kernel and tiling (benchmark sweeps): 1-8 the register kernel (state
// columns per block, threads), 9-12 the streaming kernel (rows per chunk, stages). 0 picks the default.
template <typename T, int D, int DV>
cudaError_t launch(const LightningDecodeArgs& a) {
  const bool streaming = streaming_allowed<T>(a);
  if constexpr (D == 128 && DV == 128) {
    if ((a.variant >= 9 && a.variant <= 12 || a.variant >= 15) && !streaming) {
      throw std::invalid_argument("lightning_decode: variants 9-12 need 16-byte aligned q/k/v rows");
    }
    switch (a.variant) {
      case 1: return launch<T, D, DV, 64, 128>(a);
      case 2: return launch<T, D, DV, 32, 128>(a);
      case 3: return launch<T, D, DV, 128, 256, 2>(a);
      case 4: return launch<T, D, DV, 64, 256>(a);
      case 5: return launch<T, D, DV, 32, 256>(a);
      case 6: return launch<T, D, DV, 128, 512, 2>(a);
      case 7: return launch<T, D, DV, 128, 1024>(a);
      case 8: return launch<T, D, DV, 64, 512, 2>(a);
      case 9: return launch_streaming<T, D, DV, 16, 8>(a);
      case 10: return launch_streaming<T, D, DV, 64, 3>(a);
      case 11: return launch_streaming<T, D, DV, 32, 6>(a);
      case 12: return launch_streaming<T, D, DV, 32, 3>(a);
      case 13: return launch<T, D, DV, 128, 512, 2, false>(a);
      case 14: return launch<T, D, DV, 128, 256, 2, false>(a);
      case 15: return launch_streaming<T, D, DV, 32, 4, false>(a);
      case 16: return launch_streaming<T, D, DV, 32, 6, false>(a);
      default: break;
    }
  }
  // Streaming: 32-row chunks, 4 stages (16 KB each at DV 128; 3 blocks per SM). Otherwise whole state
  // rows per block, 256 threads, 2 blocks per SM (bench/NOTES.md has the sweeps).
  if (streaming) return launch_streaming<T, D, DV, 32, 4>(a);
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
