// Lightning attention prefill forward on tensor cores (mma.sync m16n8k16, bf16/fp16, fp32 accumulate).
//
// Per head, state S [D, DV] fp32:  S_t = lambda S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t.
// A chunk of C = 64 tokens with decay lambda = exp(-s) and S the state before the chunk gives
//   o_i = scale * ( lambda^(i+1) q_i S  +  sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j )       (inter + intra)
//   S'  = lambda^L S + sum_j lambda^(L-1-j) k_j^T v_j                                       (L = chunk length)
// To fill the GPU at batch 1 every sequence is cut into segments processed in parallel, in three
// launches: (1) each segment's own decayed k^T v sum from a zero state, (2) a scan over each sequence's
// segments turning those sums into each segment's starting state (and the final state), (3) the chunk
// loop above from each segment's starting state, writing o. q, k and v are read 1.5 times on the
// whole (k and v twice per 64-column slice of the state); no per-chunk state ever reaches memory.
//
// Work split: a block of 4 warps owns (segment, head, 64 state columns). The column slices of one
// (segment, head) are adjacent in launch order, so they run together and the q and k tiles they all
// read come from DRAM once (the other slices hit L2). Warp w computes output rows
// 16w..16w+15 of each chunk and holds state rows w*D/4 .. (w+1)*D/4 - 1 in registers (mma accumulator
// layout, D/64 m-tiles of 16 rows). Chunks stream through two shared-memory stages (cp.async): the
// next chunk's loads are in flight while this one is computed.
// Decay factors are always exp of a non-positive number: they underflow to 0, never overflow.
//
// The backward runs these kernels on its adjoint recurrences (lightning_ops/cuda_backend.py): two of
// them walk time backwards (negative token strides) and scale each k^T v term by kv_scale instead of the
// output. With `adjoint` set, states sit one step later: the initial state enters at the first token
// undecayed (dS_{T-1} = dfinal + ...), and the final state is decayed once more (lambda dS_0, the
// gradient of the forward's initial state; an empty sequence passes its initial state through).
#include "common.h"
#include "lightning_prefill.h"

#include <stdexcept>
#include <string>

namespace m1 {
namespace {

constexpr int kChunk = kLightningPrefillChunk;  // tokens per chunk
constexpr int kBV = kLightningPrefillValueTile;  // state columns per block
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;       // 16 bytes of padding per shared-memory row: conflict-free ldmatrix

template <int D>
constexpr int kStateTiles = D / (16 * kWarps);  // 16-row m-tiles of state per warp

// Dynamic shared memory (16-bit elements): two stages of chunk tiles, so that the next chunk's loads
// are in flight while this one is computed, then the output kernel's bf16/fp16 copy of the state.
// The sums kernel needs only k and v: its stages are [k, v], the output kernel's [k, v, q].
template <int D>
struct Smem {
  static constexpr int kQKStride = D + kPad;
  static constexpr int kVStride = kBV + kPad;
  static constexpr int kK = 0;                                  // offsets inside a stage
  static constexpr int kV = kK + kChunk * kQKStride;
  static constexpr int kQ = kV + kChunk * kVStride;
  static constexpr int kSumsStage = kQ;                         // stage size without q
  static constexpr int kOutputStage = kQ + kChunk * kQKStride;  // stage size with q
  static constexpr int kS = 2 * kOutputStage;                   // [D][kBV], after the output kernel's stages
  static constexpr int kSumsBytes = 2 * kSumsStage * 2;
  static constexpr int kOutputBytes = (kS + D * kVStride) * 2;
};

// ------------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  // src-size 0 zero-fills the 16 bytes: rows past the end of a sequence read as zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t x);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t x) {
  return __half22float2(*reinterpret_cast<__half2*>(&x));
}

template <typename T>
__device__ __forceinline__ uint32_t scale2(uint32_t x, float lo, float hi) {
  const float2 f = unpack2<T>(x);
  return pack2<T>(f.x * lo, f.y * hi);
}

// ------------------------------------------------------------------------------------------------
// Tiles

struct Segment {
  int b, t_start, length, seq;
};

// Copies `kChunk` rows of `cols` elements (from `base`, row stride `stride_t`) into a padded tile;
// rows >= `valid` are zero-filled.
template <typename T>
__device__ __forceinline__ void load_tile(T* tile, int tile_stride, const T* base, int64_t stride_t, int cols,
                                          int valid) {
  const int vecs_per_row = cols / 8;
  for (int i = threadIdx.x; i < kChunk * vecs_per_row; i += kThreads) {
    const int r = i / vecs_per_row;
    const int c = (i % vecs_per_row) * 8;
    const bool ok = r < valid;
    cp_async_16(tile + r * tile_stride + c, base + (ok ? r : 0) * stride_t + c, ok);
  }
}

// S <- state_decay S + kv_scale K^T diag(lambda^(L-1-j)) V for the chunk in shared memory (state_decay is
// lambda^L, or lambda^(L-1) where an undecayed initial state is S); this warp holds state rows w*D/4.. as
// S[m-tile][n-tile][4] in mma accumulator layout.
template <typename T, int D>
__device__ __forceinline__ void update_state(float (&S)[kStateTiles<D>][8][4], const T* k_tile, const T* v_tile,
                                             int length, float rate, float state_decay, float kv_scale) {
  using L = Smem<D>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int mt = 0; mt < kStateTiles<D>; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) S[mt][nt][i] *= state_decay;

#pragma unroll
  for (int kk = 0; kk < kChunk / 16; ++kk) {
    // Key decay of the four tokens this thread's A fragment holds (zero past the chunk's end).
    const int tok = kk * 16 + (lane % 4) * 2;
    float kd[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int t = tok + (j & 1) + (j >> 1) * 8;
      kd[j] = t < length ? kv_scale * __expf(-rate * (length - 1 - t)) : 0.f;
    }
    uint32_t a[2][4];
#pragma unroll
    for (int mt = 0; mt < kStateTiles<D>; ++mt) {
      // A = K^T (rows: state rows d, cols: tokens), read transposed from the [token][d] tile.
      ldsm_x4_trans(a[mt], k_tile + (kk * 16 + (lane % 8) + (lane >> 4) * 8) * L::kQKStride + (D / 4) * warp +
                               16 * mt + ((lane >> 3) & 1) * 8);
      a[mt][0] = scale2<T>(a[mt][0], kd[0], kd[1]);
      a[mt][1] = scale2<T>(a[mt][1], kd[0], kd[1]);
      a[mt][2] = scale2<T>(a[mt][2], kd[2], kd[3]);
      a[mt][3] = scale2<T>(a[mt][3], kd[2], kd[3]);
    }
#pragma unroll
    for (int np = 0; np < kBV / 16; ++np) {
      uint32_t b[4];  // B = V (rows: tokens, cols: state columns), transposed load of the [token][c] tile
      ldsm_x4_trans(b, v_tile + (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * L::kVStride + np * 16 +
                           (lane >> 4) * 8);
#pragma unroll
      for (int mt = 0; mt < kStateTiles<D>; ++mt) {
        mma16816<T>(S[mt][2 * np], a[mt], b[0], b[1]);
        mma16816<T>(S[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Element (mt, nt, i) of this thread's state fragment sits at row w*D/4 + 16mt + lane/4 + 8*(i >= 2),
// column 8nt + 2*(lane%4) + (i & 1) of the block's [D][kBV] slice.
template <int D>
__device__ __forceinline__ int64_t state_offset(int mt, int nt, int half, int64_t row_stride) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  return int64_t((D / 4) * warp + 16 * mt + lane / 4 + 8 * half) * row_stride + 8 * nt + 2 * (lane % 4);
}

// The sums and output kernels' grid: x = (segment, column slice) with the slices innermost, y = head.
struct BlockWork {
  int segment, head, col0;
};

__device__ __forceinline__ BlockWork block_work(const LightningPrefillArgs& a) {
  const int slices = static_cast<int>(a.value_dim / kBV);
  return {static_cast<int>(blockIdx.x) / slices, static_cast<int>(blockIdx.y),
          static_cast<int>(blockIdx.x) % slices * kBV};
}

// ------------------------------------------------------------------------------------------------
// Kernels

// (1) Each segment's decayed k^T v sum from a zero state -> segment_states[segment] (all but each
// sequence's last segment when no final state is written).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) segment_sums_kernel(LightningPrefillArgs a) {
  using L = Smem<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const BlockWork w = block_work(a);
  const Segment seg = reinterpret_cast<const Segment*>(a.segments)[w.segment];
  if (a.final_state == nullptr && a.slot_idx == nullptr) {
    // No final state asked for: the last segment's sum would only feed it (the scan skips it too).
    const int2 range = reinterpret_cast<const int2*>(a.sequences)[seg.seq];
    if (w.segment == range.x + range.y - 1) return;
  }
  const int h = w.head, col0 = w.col0;
  const float rate = static_cast<const float*>(a.slope)[h];
  const T* k = static_cast<const T*>(a.k) + seg.b * a.k_stride_b + int64_t(seg.t_start) * a.k_stride_t + h * a.k_stride_h;
  const T* v = static_cast<const T*>(a.v) + seg.b * a.v_stride_b + int64_t(seg.t_start) * a.v_stride_t +
               h * a.v_stride_h + col0;

  auto load_chunk = [&](int c0, T* stage) {
    const int len = min(kChunk, seg.length - c0);
    load_tile(stage + L::kK, L::kQKStride, k + c0 * a.k_stride_t, a.k_stride_t, D, len);
    load_tile(stage + L::kV, L::kVStride, v + c0 * a.v_stride_t, a.v_stride_t, kBV, len);
  };
  float S[kStateTiles<D>][8][4] = {};
  load_chunk(0, smem);
  cp_async_commit();
  for (int c0 = 0, stage = 0; c0 < seg.length; c0 += kChunk, stage ^= 1) {
    const int len = min(kChunk, seg.length - c0);
    if (c0 + kChunk < seg.length) load_chunk(c0 + kChunk, smem + (stage ^ 1) * L::kSumsStage);
    cp_async_commit();  // an empty group after the last chunk keeps the count below uniform
    cp_async_wait<1>();
    __syncthreads();
    T* tiles = smem + stage * L::kSumsStage;
    update_state<T, D>(S, tiles + L::kK, tiles + L::kV, len, rate, __expf(-rate * len), a.kv_scale);
    __syncthreads();    // the next iteration's loads overwrite this stage
  }
  float* out = static_cast<float*>(a.segment_states) +
               ((int64_t(w.segment) * a.num_heads + h) * D) * a.value_dim + col0;
#pragma unroll
  for (int mt = 0; mt < kStateTiles<D>; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        *reinterpret_cast<float2*>(out + state_offset<D>(mt, nt, half, a.value_dim)) =
            make_float2(S[mt][nt][2 * half], S[mt][nt][2 * half + 1]);
}

// (2) Per (sequence, head, block of 1024 state elements): the starting state of every segment (in place
// over its sum) and the final state. Elements are independent: each thread walks one float4 through the
// sequence's segments with the next sum already in flight, so the walk is a chain of decays, not of
// memory round trips. Without a final state the last segment's sum was never computed and is not read.
template <int D>
__global__ void __launch_bounds__(256) segment_scan_kernel(LightningPrefillArgs a) {
  const int n = blockIdx.x, h = blockIdx.y;
  const int64_t size = int64_t(D) * a.value_dim;
  const int64_t i = int64_t(blockIdx.z) * blockDim.x + threadIdx.x;  // this thread's float4 of the state
  if (i >= size / 4) return;
  const int2 range = reinterpret_cast<const int2*>(a.sequences)[n];
  const Segment* segs = reinterpret_cast<const Segment*>(a.segments);
  const float rate = static_cast<const float*>(a.slope)[h];
  // With a slot cache the sequence reads and writes its slot (the same elements, by the same thread).
  const int slot = a.slot_idx ? static_cast<const int*>(a.slot_idx)[n] : n;
  const bool from_cache = a.slot_idx != nullptr;
  if (from_cache && slot < 0) return;  // padding sequence: its outputs are zeros, the cache is untouched
  const bool needs_final = from_cache || a.final_state != nullptr;
  const int64_t offset = (int64_t(slot) * a.num_heads + h) * size;
  const float4* init =
      a.initial_state ? reinterpret_cast<const float4*>(static_cast<const float*>(a.initial_state) + offset) + i
                      : nullptr;
  auto sum_at = [&](int g) {
    return reinterpret_cast<float4*>(static_cast<float*>(a.segment_states) + (int64_t(g) * a.num_heads + h) * size) + i;
  };
  const int end = range.x + range.y;
  const int sums_end = needs_final ? end : end - 1;  // segments whose sums exist
  float4 run = init ? *init : make_float4(0.f, 0.f, 0.f, 0.f);
  float4 next = range.x < sums_end ? *sum_at(range.x) : make_float4(0.f, 0.f, 0.f, 0.f);
  for (int g = range.x; g < end; ++g) {
    const float4 sum = next;
    if (g + 1 < sums_end) next = *sum_at(g + 1);
    *sum_at(g) = run;
    if (g < sums_end) {
      // An adjoint initial state has one step less of decay in the first segment.
      const int steps = segs[g].length - (g == range.x && a.adjoint ? 1 : 0);
      const float decay = __expf(-rate * steps);
      run = make_float4(fmaf(decay, run.x, sum.x), fmaf(decay, run.y, sum.y), fmaf(decay, run.z, sum.z),
                        fmaf(decay, run.w, sum.w));
    }
  }
  if (a.adjoint && range.y > 0) {  // ... and the final state one step more
    const float decay = __expf(-rate);
    run = make_float4(decay * run.x, decay * run.y, decay * run.z, decay * run.w);
  }
  if (needs_final) {
    float* final_state = static_cast<float*>(from_cache ? const_cast<void*>(a.initial_state) : a.final_state);
    reinterpret_cast<float4*>(final_state + offset)[i] = run;
  }
}

// (3) The chunk loop from each segment's starting state, writing o.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) segment_output_kernel(LightningPrefillArgs a) {
  using L = Smem<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  T* s_tile = smem + L::kS;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const BlockWork w = block_work(a);
  const Segment seg = reinterpret_cast<const Segment*>(a.segments)[w.segment];
  const int h = w.head, col0 = w.col0;
  const float rate = static_cast<const float*>(a.slope)[h];
  const T* q = static_cast<const T*>(a.q) + seg.b * a.q_stride_b + int64_t(seg.t_start) * a.q_stride_t + h * a.q_stride_h;
  const T* k = static_cast<const T*>(a.k) + seg.b * a.k_stride_b + int64_t(seg.t_start) * a.k_stride_t + h * a.k_stride_h;
  const T* v = static_cast<const T*>(a.v) + seg.b * a.v_stride_b + int64_t(seg.t_start) * a.v_stride_t +
               h * a.v_stride_h + col0;
  T* o = static_cast<T*>(a.o) + seg.b * a.o_stride_b + int64_t(seg.t_start) * a.o_stride_t + h * a.o_stride_h + col0;
  if (a.slot_idx && static_cast<const int*>(a.slot_idx)[seg.seq] < 0) {  // padding sequence: zeros
    for (int i = threadIdx.x; i < seg.length * (kBV / 2); i += kThreads) {
      const int r = i / (kBV / 2), c = 2 * (i % (kBV / 2));
      *reinterpret_cast<uint32_t*>(o + r * a.o_stride_t + c) = 0u;
    }
    return;
  }

  float S[kStateTiles<D>][8][4];
  const float* start = static_cast<const float*>(a.segment_states) +
                       ((int64_t(w.segment) * a.num_heads + h) * D) * a.value_dim + col0;
#pragma unroll
  for (int mt = 0; mt < kStateTiles<D>; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float2 s = *reinterpret_cast<const float2*>(start + state_offset<D>(mt, nt, half, a.value_dim));
        S[mt][nt][2 * half] = s.x;
        S[mt][nt][2 * half + 1] = s.y;
      }

  const int row_lo = 16 * warp + lane / 4, row_hi = row_lo + 8;   // this thread's output rows in a chunk
  // An adjoint initial state decays one step less than a state carried into a chunk (in the sequence's
  // first chunk only).
  const bool starts_undecayed =
      a.adjoint && reinterpret_cast<const int2*>(a.sequences)[seg.seq].x == w.segment;

  auto load_chunk = [&](int c0, T* stage) {
    const int len = min(kChunk, seg.length - c0);
    load_tile(stage + L::kK, L::kQKStride, k + c0 * a.k_stride_t, a.k_stride_t, D, len);
    load_tile(stage + L::kV, L::kVStride, v + c0 * a.v_stride_t, a.v_stride_t, kBV, len);
    load_tile(stage + L::kQ, L::kQKStride, q + c0 * a.q_stride_t, a.q_stride_t, D, len);
  };
  load_chunk(0, smem);
  cp_async_commit();
  for (int c0 = 0, stage = 0; c0 < seg.length; c0 += kChunk, stage ^= 1) {
    const int len = min(kChunk, seg.length - c0);
    if (c0 + kChunk < seg.length) load_chunk(c0 + kChunk, smem + (stage ^ 1) * L::kOutputStage);
    cp_async_commit();  // an empty group after the last chunk keeps the count below uniform
    const int skipped_step = starts_undecayed && c0 == 0 ? 1 : 0;
    const float q_decay_lo = __expf(-rate * (row_lo + 1 - skipped_step));
    const float q_decay_hi = __expf(-rate * (row_hi + 1 - skipped_step));
    const T* q_tile = smem + stage * L::kOutputStage + L::kQ;
    const T* k_tile = smem + stage * L::kOutputStage + L::kK;
    const T* v_tile = smem + stage * L::kOutputStage + L::kV;
    // The state before this chunk, rounded to the input type, is the B operand of q S.
#pragma unroll
    for (int mt = 0; mt < kStateTiles<D>; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          *reinterpret_cast<uint32_t*>(s_tile + state_offset<D>(mt, nt, half, L::kVStride)) =
              pack2<T>(S[mt][nt][2 * half], S[mt][nt][2 * half + 1]);
    cp_async_wait<1>();  // this chunk's tiles have landed; the next chunk's stay in flight
    __syncthreads();

    float O[8][4] = {}, P[8][4] = {};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t aq[4];
      ldsm_x4(aq, q_tile + (16 * warp + (lane % 16)) * L::kQKStride + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < kBV / 16; ++np) {  // inter: q S
        uint32_t b[4];
        ldsm_x4_trans(b, s_tile + (ks * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * L::kVStride + np * 16 +
                             (lane >> 4) * 8);
        mma16816<T>(O[2 * np], aq, b[0], b[1]);
        mma16816<T>(O[2 * np + 1], aq, b[2], b[3]);
      }
#pragma unroll
      for (int np = 0; np < kChunk / 16; ++np) {  // scores q k^T, only key tiles at or before these rows
        if (np > warp) continue;
        uint32_t b[4];
        ldsm_x4(b, k_tile + (np * 16 + (lane % 8) + (lane >> 4) * 8) * L::kQKStride + ks * 16 +
                       ((lane >> 3) & 1) * 8);
        mma16816<T>(P[2 * np], aq, b[0], b[1]);
        mma16816<T>(P[2 * np + 1], aq, b[2], b[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      O[nt][0] *= q_decay_lo; O[nt][1] *= q_decay_lo;
      O[nt][2] *= q_decay_hi; O[nt][3] *= q_decay_hi;
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // causal decay mask lambda^(row - col), zero above the diagonal
        const int row = i < 2 ? row_lo : row_hi;
        const int col = 8 * nt + 2 * (lane % 4) + (i & 1);
        P[nt][i] = col <= row ? P[nt][i] * a.kv_scale * __expf(-rate * (row - col)) : 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {  // intra: (masked scores) v; scores stay in registers
      if (kk > warp) continue;
      const uint32_t ap[4] = {pack2<T>(P[2 * kk][0], P[2 * kk][1]), pack2<T>(P[2 * kk][2], P[2 * kk][3]),
                              pack2<T>(P[2 * kk + 1][0], P[2 * kk + 1][1]),
                              pack2<T>(P[2 * kk + 1][2], P[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < kBV / 16; ++np) {
        uint32_t b[4];
        ldsm_x4_trans(b, v_tile + (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * L::kVStride + np * 16 +
                             (lane >> 4) * 8);
        mma16816<T>(O[2 * np], ap, b[0], b[1]);
        mma16816<T>(O[2 * np + 1], ap, b[2], b[3]);
      }
    }
    T* o_chunk = o + c0 * a.o_stride_t;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int col = 8 * nt + 2 * (lane % 4);
      if (row_lo < len)
        *reinterpret_cast<uint32_t*>(o_chunk + row_lo * a.o_stride_t + col) =
            pack2<T>(a.scale * O[nt][0], a.scale * O[nt][1]);
      if (row_hi < len)
        *reinterpret_cast<uint32_t*>(o_chunk + row_hi * a.o_stride_t + col) =
            pack2<T>(a.scale * O[nt][2], a.scale * O[nt][3]);
    }
    update_state<T, D>(S, k_tile, v_tile, len, rate, __expf(-rate * (len - skipped_step)), a.kv_scale);
    __syncthreads();  // the next iteration's loads overwrite this stage, its state copy overwrites s_tile
  }
}

template <typename T, int D>
void launch(const LightningPrefillArgs& a) {
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  constexpr int sums_smem = Smem<D>::kSumsBytes, output_smem = Smem<D>::kOutputBytes;
  const dim3 grid(static_cast<unsigned>(a.num_segments * (a.value_dim / kBV)), static_cast<unsigned>(a.num_heads));
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("lightning_prefill_forward: ") + what + ": " + cudaGetErrorString(err));
  };
  if (a.num_segments > 0) {
    check(cudaFuncSetAttribute(segment_sums_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, sums_smem),
          "shared memory attribute");
    check(cudaFuncSetAttribute(segment_output_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               output_smem),
          "shared memory attribute");
    segment_sums_kernel<T, D><<<grid, kThreads, sums_smem, stream>>>(a);
    check(cudaGetLastError(), "segment sums launch");
  }
  if (a.num_sequences > 0) {
    const unsigned element_blocks = static_cast<unsigned>((D * a.value_dim / 4 + 255) / 256);
    segment_scan_kernel<D><<<dim3(static_cast<unsigned>(a.num_sequences), static_cast<unsigned>(a.num_heads),
                                  element_blocks),
                             256, 0, stream>>>(a);
    check(cudaGetLastError(), "segment scan launch");
  }
  if (a.num_segments > 0) {
    segment_output_kernel<T, D><<<grid, kThreads, output_smem, stream>>>(a);
    check(cudaGetLastError(), "segment output launch");
  }
}

template <typename T>
void dispatch_dims(const LightningPrefillArgs& a) {
  if (a.value_dim % kBV != 0) {
    throw std::invalid_argument("lightning_prefill_forward: value_dim must be a multiple of " + std::to_string(kBV));
  }
  if (a.head_dim == 128) return launch<T, 128>(a);
  if (a.head_dim == 64) return launch<T, 64>(a);
  throw std::invalid_argument("lightning_prefill_forward: head_dim must be 64 or 128");
}

}  // namespace

void lightning_prefill_forward(const LightningPrefillArgs& a) {
  switch (static_cast<DType>(a.dtype)) {
    case DType::kFloat16: return dispatch_dims<__half>(a);
    case DType::kBFloat16: return dispatch_dims<__nv_bfloat16>(a);
    default: throw std::invalid_argument("lightning_prefill_forward: inputs must be bf16 or fp16");
  }
}

}  // namespace m1
