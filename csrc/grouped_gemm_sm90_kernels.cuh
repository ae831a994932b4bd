// CUTLASS 3.x sm90a grouped (ptr-array) GEMMs of the MoE experts, templated on the element type and
// instantiated once per dtype by grouped_gemm_sm90_{bf16,fp16}.cu.
//
// The groups (experts) are described entirely on the device: a small setup kernel turns the routing
// offsets into per-group problem sizes, operand pointers and strides, and CUTLASS runs with no host
// problem shapes (GroupProblemShape with a null host pointer). Its persistent group tile scheduler
// then launches one CTA per SM and walks the groups' tiles on the device, and the producer warp
// rewrites the TMA descriptors in shared memory whenever a CTA moves to another group. Nothing
// reads device memory on the host, so a launch never synchronises and can be captured in a graph.
//
// Empty groups: the scheduler gives a group with M = 0 no tiles. A group with K = 0 would get tiles
// whose mainloop never runs and whose accumulators are never zeroed, so the weight-gradient setup
// turns K = 0 into M = 0 and the entry zero-fills those outputs itself.
#pragma once

// Device asserts inside CUTLASS compile to calls that serialise the wgmma pipeline (ptxas C7510).
#ifndef NDEBUG
#define NDEBUG
#endif

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "grouped_gemm_sm90_kernels.h"

namespace m1 {
namespace grouped_detail {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using GroupShape = ProblemShape::UnderlyingProblemShape;

// Cooperative: two consumer warpgroups share one 128x256 tile, the tile shape that reaches ~90% of
// the dense rate on H100 for K-major bf16. No cluster: a 2x1 cluster (torch._grouped_mm's choice,
// multicasting the weight tile to two row tiles) pairs every expert's odd last row tile with an
// all-padding tile that still runs the whole mainloop, ~20% extra tiles at 8192 tokens (~4.5 row
// tiles per expert); 1x2 would do the same to the odd column counts of the TP shard (N 2304). Measured on
// the H200 at M1 shapes (bench/NOTES.md, session 14), forward pair at 8192 tokens: this tile 9.39 ms,
// cooperative 2x1 10.20, 1x2 9.70, ping-pong 128x128 10.53; fused_moe forward+backward 30.6 ms against
// 31.3-37.1 for the others. The "kn" GEMMs (dH, dX) with the other tiles were within the noise or slower.
struct LargeTile {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

// Decode: a few rows per expert, so the GEMM streams the weights. 64-row tiles (the wgmma minimum)
// waste the least tensor work, two warpgroups alternate tiles (ping-pong) so one's epilogue hides
// under the other's loads, and no cluster: a 2x1 cluster would round one real row tile up to two.
struct SmallTile {
  using TileShape = cute::Shape<cute::_64, cute::_128, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// Weight gradients: each group's reduction is only its rows (512 at 8192 tokens, E32 top-2). Ping-pong gives
// each consumer warpgroup a 128x128 tile of its own: one's epilogue runs under the other's MMAs. Measured on
// the H200 at M1 shapes against the cooperative 128x256 tile: dW_down 3.50 -> 3.20 ms, dW_gate_up
// 7.68 -> 6.71 ms. 2x1 and 1x2 clusters, a 128-deep K tile and wider epilogue subtiles gained nothing
// (bench/NOTES.md, session 17): the mainloop itself runs at ~0.78 of the dense rate (the marginal rate from
// 512 to 1024 rows per expert), and fill and store cost only ~0.3 ms of 3.3 (dW_down, 8192 tokens).
struct WgradTile {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

// Plain epilogue: D = acc (alpha 1; ElementC void skips the source load entirely).
template <class T>
struct PlainEpilogue {
  using ElementC = void;
  using Fusion = cutlass::epilogue::fusion::LinearCombination<T, float>;
};

// SwiGLU epilogue of the up projection: D = silu(C) * acc with C the gate projection of the same rows,
// so h never needs the [M, 2F] pre-activation round trip through memory. The EVT is evaluated in fp32.
template <class T>
struct GatedEpilogue {
  using ElementC = T;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, T, float, kRound>,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::SiLu, float, float, kRound>,
          cutlass::epilogue::fusion::Sm90SrcFetch<T>>,
      cutlass::epilogue::fusion::Sm90AccFetch>;
};

template <class T, class LayoutA, class LayoutB, class Tile, class Epilogue = PlainEpilogue<T>>
struct GroupedGemm {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<T>::value;  // 16-byte TMA rows
  static constexpr bool kHasSource = !cute::is_void_v<typename Epilogue::ElementC>;
  using LayoutD = cutlass::layout::RowMajor;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Tile::TileShape, typename Tile::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      typename Epilogue::ElementC, LayoutD*, kAlignment, T, LayoutD*, kAlignment,
      typename Tile::EpilogueSchedule, typename Epilogue::Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      T, LayoutA*, kAlignment, T, LayoutB*, kAlignment, float,
      typename Tile::TileShape, typename Tile::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Tile::MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;

  // Each grouped stride has exactly one run-time mode (the leading dimension); the setup kernel
  // writes it as one int64 per group, so the stride types must be exactly that.
  static_assert(sizeof(StrideA) == sizeof(int64_t) && sizeof(StrideB) == sizeof(int64_t) &&
                sizeof(StrideC) == sizeof(int64_t) && sizeof(StrideD) == sizeof(int64_t),
                "grouped strides must hold one int64");

  static typename Gemm::Arguments arguments(int groups, GroupShape* shapes, const T** ptr_a, int64_t* lda,
                                            const T** ptr_b, int64_t* ldb, const T** ptr_c, int64_t* ldc,
                                            T** ptr_d, int64_t* ldd, int device, int sm_count) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {groups, shapes, nullptr},  // no host problem shapes: the scheduler reads the device array
        {reinterpret_cast<const typename Gemm::ElementA**>(ptr_a),
         reinterpret_cast<StrideA*>(lda),
         reinterpret_cast<const typename Gemm::ElementB**>(ptr_b),
         reinterpret_cast<StrideB*>(ldb)},
        {{},
         kHasSource ? reinterpret_cast<const typename Gemm::ElementC**>(ptr_c) : nullptr,
         kHasSource ? reinterpret_cast<StrideC*>(ldc) : nullptr,
         reinterpret_cast<typename Gemm::ElementD**>(ptr_d),
         reinterpret_cast<StrideD*>(ldd)},
        hw};
    if constexpr (!kHasSource) {
      args.epilogue.thread.alpha = 1.0f;
      args.epilogue.thread.beta = 0.0f;
    }
    return args;
  }

  static size_t workspace_bytes(int sm_count) {
    auto args = arguments(1, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                          sm_count);
    return Gemm::get_workspace_size(args);
  }

  static void run(int groups, GroupShape* shapes, const T** ptr_a, int64_t* lda, const T** ptr_b,
                  int64_t* ldb, const T** ptr_c, int64_t* ldc, T** ptr_d, int64_t* ldd, void* workspace,
                  size_t workspace_size, int device, int sm_count, cudaStream_t stream) {
    auto args = arguments(groups, shapes, ptr_a, lda, ptr_b, ldb, ptr_c, ldc, ptr_d, ldd, device, sm_count);
    Gemm gemm;
    auto check = [](cutlass::Status status, const char* step) {
      if (status != cutlass::Status::kSuccess) {
        throw std::runtime_error(std::string("grouped_gemm: CUTLASS ") + step + " failed: " +
                                 cutlass::cutlassGetStatusString(status));
      }
    };
    if (Gemm::get_workspace_size(args) > workspace_size) {
      throw std::runtime_error("grouped_gemm: workspace too small (use grouped_gemm_workspace_size)");
    }
    check(gemm.can_implement(args), "can_implement");
    check(gemm.initialize(args, workspace, stream), "initialize");
    check(gemm.run(stream), "run");
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("grouped_gemm: kernel launch failed: ") + cudaGetErrorString(err));
    }
  }
};

template <class T>
using NkLarge = GroupedGemm<T, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, LargeTile>;
template <class T>
using NkSmall = GroupedGemm<T, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, SmallTile>;
template <class T>
using KnLarge = GroupedGemm<T, cutlass::layout::RowMajor, cutlass::layout::RowMajor, LargeTile>;
template <class T>
using Wgrad = GroupedGemm<T, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, WgradTile>;
template <class T>
using NkGated = GroupedGemm<T, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, LargeTile, GatedEpilogue<T>>;

// Where the per-group arrays live inside the caller's workspace.
template <class T>
struct GroupArrays {
  GroupShape* shapes;
  const T** ptr_a; const T** ptr_b; const T** ptr_c; T** ptr_d;
  int64_t* lda; int64_t* ldb; int64_t* ldc; int64_t* ldd;
  void* cutlass_workspace;
  size_t cutlass_bytes;
};

static_assert(sizeof(GroupShape) == 12, "group_array_bytes assumes 3 x int32 problem shapes");

template <class T>
GroupArrays<T> carve(const Launch& l) {
  static_assert(sizeof(T*) == 8, "group_array_bytes assumes 8-byte pointers");
  const size_t g = static_cast<size_t>(l.groups);
  char* base = static_cast<char*>(l.workspace);
  size_t offset = 0;
  auto take = [&](size_t bytes) { char* p = base + offset; offset = align_up(offset + bytes, 16); return p; };
  GroupArrays<T> arr;
  arr.shapes = reinterpret_cast<GroupShape*>(take(g * sizeof(GroupShape)));
  arr.ptr_a = reinterpret_cast<const T**>(take(g * sizeof(T*)));
  arr.ptr_b = reinterpret_cast<const T**>(take(g * sizeof(T*)));
  arr.ptr_c = reinterpret_cast<const T**>(take(g * sizeof(T*)));
  arr.ptr_d = reinterpret_cast<T**>(take(g * sizeof(T*)));
  arr.lda = reinterpret_cast<int64_t*>(take(g * sizeof(int64_t)));
  arr.ldb = reinterpret_cast<int64_t*>(take(g * sizeof(int64_t)));
  arr.ldc = reinterpret_cast<int64_t*>(take(g * sizeof(int64_t)));
  arr.ldd = reinterpret_cast<int64_t*>(take(g * sizeof(int64_t)));
  offset = group_array_bytes(l.groups);
  arr.cutlass_workspace = base + offset;
  arr.cutlass_bytes = static_cast<size_t>(l.workspace_bytes) - offset;
  return arr;
}

// Rows [start, end) of group e, clamped so that bad offsets cannot address memory outside the
// operands (they give wrong rows instead, which the Python validation rules out when not capturing).
__device__ __forceinline__ void group_rows(const int* offsets, int e, int64_t num_rows, int64_t& start,
                                           int64_t& end) {
  start = min(max(static_cast<int64_t>(offsets[e]), int64_t(0)), num_rows);
  end = min(max(static_cast<int64_t>(offsets[e + 1]), start), num_rows);
}

// Forward (and dX): group e multiplies rows [start, end) of X by W_e into the same rows of Y (and,
// gated, reads the same rows of C).
template <class T>
__global__ void setup_forward_kernel(GroupArrays<T> arr, Launch l) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= l.groups) return;
  int64_t start, end;
  group_rows(l.offsets, e, l.num_rows, start, end);
  arr.shapes[e] = cute::make_shape(static_cast<int>(end - start), static_cast<int>(l.n), static_cast<int>(l.k));
  arr.ptr_a[e] = static_cast<const T*>(l.a) + start * l.a_ld;
  arr.ptr_b[e] = static_cast<const T*>(l.b) + e * l.b_expert_stride;
  arr.ptr_c[e] = l.c != nullptr ? static_cast<const T*>(l.c) + start * l.n : nullptr;
  arr.ptr_d[e] = static_cast<T*>(l.d) + start * l.n;
  arr.lda[e] = l.a_ld;
  arr.ldb[e] = l.b_ld;
  arr.ldc[e] = l.n;
  arr.ldd[e] = l.n;
}

// Weight gradient: group e is out_e [R, C] = P_e^T Q_e with K = rows of the group. A = P_e^T is
// M-major with K stride a_ld, B = Q_e^T is N-major with K stride b_ld. K = 0 becomes M = 0 (no tiles).
template <class T>
__global__ void setup_wgrad_kernel(GroupArrays<T> arr, Launch l) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= l.groups) return;
  int64_t start, end;
  group_rows(l.offsets, e, l.num_rows, start, end);
  const int tokens = static_cast<int>(end - start);
  arr.shapes[e] = cute::make_shape(tokens > 0 ? static_cast<int>(l.n) : 0, static_cast<int>(l.k), tokens);
  arr.ptr_a[e] = static_cast<const T*>(l.a) + start * l.a_ld;
  arr.ptr_b[e] = static_cast<const T*>(l.b) + start * l.b_ld;
  arr.ptr_c[e] = nullptr;
  arr.ptr_d[e] = static_cast<T*>(l.d) + e * l.n * l.k;
  arr.lda[e] = l.a_ld;
  arr.ldb[e] = l.b_ld;
  arr.ldc[e] = l.k;
  arr.ldd[e] = l.k;
}

template <class Config, class T>
void launch_config(const Launch& l, const GroupArrays<T>& arr) {
  Config::run(static_cast<int>(l.groups), arr.shapes, arr.ptr_a, arr.lda, arr.ptr_b, arr.ldb, arr.ptr_c, arr.ldc,
              arr.ptr_d, arr.ldd, arr.cutlass_workspace, arr.cutlass_bytes, l.device, l.sm_count, l.stream);
}

template <class T>
void run(const Launch& l) {
  if (l.workspace_bytes < static_cast<int64_t>(group_array_bytes(l.groups))) {
    throw std::runtime_error("grouped_gemm: workspace too small (use grouped_gemm_workspace_size)");
  }
  const GroupArrays<T> arr = carve<T>(l);
  const int threads = 128;
  const int blocks = static_cast<int>((l.groups + threads - 1) / threads);
  if (l.kernel == Kernel::kWgrad) {
    setup_wgrad_kernel<T><<<blocks, threads, 0, l.stream>>>(arr, l);
  } else {
    setup_forward_kernel<T><<<blocks, threads, 0, l.stream>>>(arr, l);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("grouped_gemm: setup kernel launch failed: ") + cudaGetErrorString(err));
  }
  switch (l.kernel) {
    case Kernel::kNkLarge: launch_config<NkLarge<T>>(l, arr); break;
    case Kernel::kNkSmall: launch_config<NkSmall<T>>(l, arr); break;
    case Kernel::kKnLarge: launch_config<KnLarge<T>>(l, arr); break;
    case Kernel::kWgrad: launch_config<Wgrad<T>>(l, arr); break;
    case Kernel::kNkGated: launch_config<NkGated<T>>(l, arr); break;
  }
}

template <class T>
size_t cutlass_workspace_bytes(int sm_count) {
  return std::max({NkLarge<T>::workspace_bytes(sm_count), NkSmall<T>::workspace_bytes(sm_count),
                   KnLarge<T>::workspace_bytes(sm_count), Wgrad<T>::workspace_bytes(sm_count),
                   NkGated<T>::workspace_bytes(sm_count)});
}

}  // namespace grouped_detail
}  // namespace m1

// Explicit instantiation of the two entry templates for one CUTLASS element type.
#define M1_INSTANTIATE_GROUPED_GEMM(T)                                                     \
  template size_t m1::grouped_detail::cutlass_workspace_bytes<T>(int sm_count);            \
  template void m1::grouped_detail::run<T>(const m1::grouped_detail::Launch& launch);
