// MoE grouped GEMM entries: kernel choice, argument checks, the zero fills that CUTLASS does not do,
// and the SwiGLU between the two expert GEMMs. The CUTLASS kernels themselves are instantiated in
// grouped_gemm_sm90_{bf16,fp16}.cu from grouped_gemm_sm90_kernels.cuh.
//
// Tile choice (M1: hidden 6144, expert FFN 9216, E = 32 top-2; TP shard F = 1152; EP shard 4 experts):
// with R rows per expert the expert GEMMs do 2R FLOPs per weight byte, so below ~230 rows per expert
// (H100: ~700 TFLOP/s over ~3 TB/s) they stream weights and above it they are tensor-bound. Up to 128
// rows per expert on average the 64-row ping-pong tile streams the weights with the least wasted
// tensor work; above it the 128x256 cooperative tile runs at the dense rate.
#include "common.h"
#include "grouped_gemm_sm90.h"
#include "grouped_gemm_sm90_kernels.h"

#include <cutlass/numeric_types.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace m1 {
namespace {

using grouped_detail::Kernel;
using grouped_detail::Launch;

int sm_count(int device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device < 0) throw std::invalid_argument("grouped_gemm: device must be a CUDA device index");
  if (static_cast<size_t>(device) >= cache.size()) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int count = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("grouped_gemm: cannot query CUDA device ") + std::to_string(device) +
                               ": " + cudaGetErrorString(err));
    }
    cache[device] = count;
  }
  return cache[device];
}

void check_dtype(int dtype) {
  if (dtype != static_cast<int>(DType::kBFloat16) && dtype != static_cast<int>(DType::kFloat16)) {
    throw std::invalid_argument("grouped_gemm: dtype must be float16 or bfloat16");
  }
}

// TMA needs 16-byte aligned base addresses and row strides; 16-bit elements: multiples of 8.
void check_aligned(const char* name, const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    throw std::invalid_argument(std::string("grouped_gemm: ") + name + " must be 16-byte aligned");
  }
}
void check_multiple_of_8(const char* name, int64_t v) {
  if (v <= 0 || v % 8 != 0) {
    throw std::invalid_argument(std::string("grouped_gemm: ") + name + " must be a positive multiple of 8, got " +
                                std::to_string(v));
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
  }
}

// Rows of Y that no group covers ([0, offsets[0]) and [offsets[E], rows)) are zeros, as in a loop
// over the experts that starts from a zero output. n % 8 == 0, so 16-byte stores.
__global__ void zero_uncovered_rows_kernel(uint4* y, const int* offsets, int64_t groups, int64_t rows,
                                           int64_t vecs_per_row) {
  const int64_t first = min(max(static_cast<int64_t>(offsets[0]), int64_t(0)), rows);
  const int64_t last = min(max(static_cast<int64_t>(offsets[groups]), first), rows);
  const int64_t uncovered = (first + rows - last) * vecs_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < uncovered;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / vecs_per_row;
    const int64_t row = r < first ? r : last + (r - first);
    y[row * vecs_per_row + i % vecs_per_row] = make_uint4(0, 0, 0, 0);
  }
}

// Weight gradient of an expert without rows: zeros (CUTLASS skips the group, see the .cuh).
__global__ void zero_empty_groups_kernel(uint4* out, const int* offsets, int64_t rows, int64_t vecs_per_group) {
  const int e = blockIdx.y;
  const int64_t start = min(max(static_cast<int64_t>(offsets[e]), int64_t(0)), rows);
  const int64_t end = min(max(static_cast<int64_t>(offsets[e + 1]), start), rows);
  if (end > start) return;
  uint4* dst = out + e * vecs_per_group;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vecs_per_group;
       i += int64_t(gridDim.x) * blockDim.x) {
    dst[i] = make_uint4(0, 0, 0, 0);
  }
}

unsigned grid_for(int64_t vecs, int64_t max_blocks, int threads) {
  const int64_t blocks = (vecs + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, max_blocks)));
}

void run_typed(int dtype, const Launch& launch) {
  if (dtype == static_cast<int>(DType::kBFloat16)) {
    grouped_detail::run<cutlass::bfloat16_t>(launch);
  } else {
    grouped_detail::run<cutlass::half_t>(launch);
  }
}

// SwiGLU, 8 outputs per thread: one 16-byte load of gate, one of up, one 16-byte store.
template <typename T>
__global__ void swiglu_kernel(const T* gate_up, int64_t in_row_stride, T* out, int64_t rows, int64_t f) {
  const int64_t vecs_per_row = f / 8;
  const int64_t total = rows * vecs_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / vecs_per_row;
    const int64_t col = (i - row * vecs_per_row) * 8;
    const T* in = gate_up + row * in_row_stride + col;
    const uint4 g4 = *reinterpret_cast<const uint4*>(in);
    const uint4 u4 = *reinterpret_cast<const uint4*>(in + f);
    const T* g = reinterpret_cast<const T*>(&g4);
    const T* u = reinterpret_cast<const T*>(&u4);
    uint4 o4;
    T* o = reinterpret_cast<T*>(&o4);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float gj = to_float(g[j]);
      o[j] = from_float<T>(gj / (1.f + __expf(-gj)) * to_float(u[j]));
    }
    *reinterpret_cast<uint4*>(out + row * f + col) = o4;
  }
}

// Calls fn with a null pointer of the element type of `dtype` (bf16 or fp16, already checked).
template <class Fn>
void with_element_type(int dtype, Fn&& fn) {
  if (dtype == static_cast<int>(DType::kBFloat16)) {
    fn(static_cast<__nv_bfloat16*>(nullptr));
  } else {
    fn(static_cast<__half*>(nullptr));
  }
}

// d[gate | up] of h = silu(gate) * up from dh (the GEMM's bf16/fp16 output), fp32 math:
// d_gate = dh * up * s * (1 + gate * (1 - s)), d_up = dh * gate * s with s = sigmoid(gate).
template <class T>
__global__ void swiglu_backward_kernel(const T* dh, const T* gate_up, int64_t in_row_stride, T* out, int64_t rows,
                                       int64_t f) {
  const int64_t vecs_per_row = f / 8;
  const int64_t total = rows * vecs_per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / vecs_per_row;
    const int64_t col = (i - row * vecs_per_row) * 8;
    const T* in = gate_up + row * in_row_stride + col;
    const uint4 g4 = *reinterpret_cast<const uint4*>(in);
    const uint4 u4 = *reinterpret_cast<const uint4*>(in + f);
    const uint4 d4 = *reinterpret_cast<const uint4*>(dh + row * f + col);
    const T* g = reinterpret_cast<const T*>(&g4);
    const T* u = reinterpret_cast<const T*>(&u4);
    const T* d = reinterpret_cast<const T*>(&d4);
    uint4 dg4, du4;
    T* dg = reinterpret_cast<T*>(&dg4);
    T* du = reinterpret_cast<T*>(&du4);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float gj = to_float(g[j]), dj = to_float(d[j]);
      const float sig = 1.f / (1.f + __expf(-gj));
      dg[j] = from_float<T>(dj * to_float(u[j]) * sig * (1.f + gj * (1.f - sig)));
      du[j] = from_float<T>(dj * gj * sig);
    }
    T* o = out + row * 2 * f + col;
    *reinterpret_cast<uint4*>(o) = dg4;
    *reinterpret_cast<uint4*>(o + f) = du4;
  }
}

}  // namespace

size_t grouped_gemm_workspace_size(int64_t num_experts, int device) {
  if (num_experts <= 0) throw std::invalid_argument("grouped_gemm: num_experts must be positive");
  const int sms = sm_count(device);
  return grouped_detail::group_array_bytes(num_experts) +
         std::max(grouped_detail::cutlass_workspace_bytes<cutlass::bfloat16_t>(sms),
                  grouped_detail::cutlass_workspace_bytes<cutlass::half_t>(sms));
}

void grouped_gemm(const GroupedGemmArgs& a) {
  check_dtype(a.dtype);
  if (a.num_experts <= 0) throw std::invalid_argument("grouped_gemm: num_experts must be positive");
  check_multiple_of_8("n (output columns)", a.n);
  check_multiple_of_8("k (reduction length)", a.k);
  check_multiple_of_8("x row stride", a.x_row_stride);
  check_multiple_of_8("weight row stride", a.w_row_stride);
  if (a.w_expert_stride % 8 != 0) {
    throw std::invalid_argument("grouped_gemm: weight expert stride must be a multiple of 8");
  }
  check_aligned("x", a.x);
  check_aligned("weight", a.w);
  check_aligned("y", a.y);
  check_aligned("workspace", a.workspace);
  if (a.gate != nullptr) {
    check_aligned("gate", a.gate);
    if (!a.weight_k_major) {
      throw std::invalid_argument("grouped_gemm: gate (fused SwiGLU) needs weight layout 'nk'");
    }
  }
  if (a.num_rows == 0) return;
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);

  const int64_t vecs_per_row = a.n / 8;
  zero_uncovered_rows_kernel<<<grid_for(a.num_rows * vecs_per_row, 264, 256), 256, 0, stream>>>(
      static_cast<uint4*>(a.y), static_cast<const int*>(a.offsets), a.num_experts, a.num_rows, vecs_per_row);
  check_launch("grouped_gemm: zero fill");

  Kernel kernel;
  if (a.gate != nullptr) {
    kernel = Kernel::kNkGated;  // compiled with the large tile only (the fusion pays off at prefill)
  } else if (!a.weight_k_major) {
    kernel = Kernel::kKnLarge;  // layout "kn" (and the dX of "nk") ships one tile
  } else if (a.tile == static_cast<int>(GroupedGemmTile::kAuto)) {
    kernel = a.num_rows <= kGroupedGemmSmallTileMaxRowsPerExpert * a.num_experts ? Kernel::kNkSmall
                                                                                 : Kernel::kNkLarge;
  } else if (a.tile == static_cast<int>(GroupedGemmTile::kSmall)) {
    kernel = Kernel::kNkSmall;
  } else if (a.tile == static_cast<int>(GroupedGemmTile::kLarge)) {
    kernel = Kernel::kNkLarge;
  } else {
    throw std::invalid_argument("grouped_gemm: tile must be -1 (auto), 0 (large) or 1 (small)");
  }
  const Launch launch{kernel, a.x, a.x_row_stride, a.w, a.w_expert_stride, a.w_row_stride, a.gate, a.y,
                      static_cast<const int*>(a.offsets), a.num_rows, a.n, a.k, a.num_experts,
                      a.workspace, a.workspace_bytes, a.device, sm_count(a.device), stream};
  run_typed(a.dtype, launch);
}

void grouped_gemm_wgrad(const GroupedWgradArgs& a) {
  check_dtype(a.dtype);
  if (a.num_experts <= 0) throw std::invalid_argument("grouped_gemm: num_experts must be positive");
  if (a.num_experts > 65535) throw std::invalid_argument("grouped_gemm: at most 65535 experts");
  check_multiple_of_8("r (gradient rows)", a.r);
  check_multiple_of_8("c (gradient columns)", a.c);
  check_multiple_of_8("p row stride", a.p_row_stride);
  check_multiple_of_8("q row stride", a.q_row_stride);
  check_aligned("p", a.p);
  check_aligned("q", a.q);
  check_aligned("out", a.out);
  check_aligned("workspace", a.workspace);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);

  const int64_t vecs_per_group = a.r * a.c / 8;
  const dim3 grid(grid_for(vecs_per_group, 16, 256), static_cast<unsigned>(a.num_experts));
  zero_empty_groups_kernel<<<grid, 256, 0, stream>>>(static_cast<uint4*>(a.out), static_cast<const int*>(a.offsets),
                                                     a.num_rows, vecs_per_group);
  check_launch("grouped_gemm_wgrad: zero fill");
  if (a.num_rows == 0) return;

  const Launch launch{Kernel::kWgrad, a.p, a.p_row_stride, a.q, 0, a.q_row_stride, nullptr, a.out,
                      static_cast<const int*>(a.offsets), a.num_rows, a.r, a.c, a.num_experts,
                      a.workspace, a.workspace_bytes, a.device, sm_count(a.device), stream};
  run_typed(a.dtype, launch);
}

void swiglu(const void* gate_up, int64_t in_row_stride, void* out, int64_t rows, int64_t f, int dtype,
            uintptr_t stream) {
  check_dtype(dtype);
  check_multiple_of_8("f (SwiGLU width)", f);
  check_multiple_of_8("gate_up row stride", in_row_stride);
  check_aligned("gate_up", gate_up);
  check_aligned("out", out);
  if (rows == 0) return;
  const unsigned blocks = grid_for(rows * (f / 8), 4096, 256);
  with_element_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    swiglu_kernel<T><<<blocks, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(gate_up), in_row_stride, static_cast<T*>(out), rows, f);
  });
  check_launch("swiglu");
}

void swiglu_backward(const void* dh, const void* gate_up, int64_t in_row_stride, void* out, int64_t rows, int64_t f,
                     int dtype, uintptr_t stream) {
  check_dtype(dtype);
  check_multiple_of_8("f (SwiGLU width)", f);
  check_multiple_of_8("gate_up row stride", in_row_stride);
  check_aligned("dh", dh);
  check_aligned("gate_up", gate_up);
  check_aligned("out", out);
  if (rows == 0) return;
  const unsigned blocks = grid_for(rows * (f / 8), 4096, 256);
  with_element_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    swiglu_backward_kernel<T><<<blocks, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(dh), static_cast<const T*>(gate_up), in_row_stride, static_cast<T*>(out), rows, f);
  });
  check_launch("swiglu_backward");
}

}  // namespace m1
