// The one pybind11 module of the package: every kernel entry, taking device pointers, shapes, strides
// and the CUDA stream as integers (no libtorch, docs/design.md). Every argument is keyword-only, and the
// enums (DType, GroupedGemmTile) are defined once in C++ and exported here, so Python names what it
// passes and never writes a code. Python wrappers in lightning_ops/ and moe_ops/ validate inputs before
// calling in here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <array>
#include <cstdint>

#include "common.h"
#include "grouped_gemm_sm90.h"
#include "lightning_decode.h"
#include "lightning_prefill.h"

namespace py = pybind11;

namespace {

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
int code(m1::DType d) { return static_cast<int>(d); }

using Strides2 = std::array<int64_t, 2>;  // (batch row, head)
using Strides3 = std::array<int64_t, 3>;  // (batch row, token, head)

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later queries start clean
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "CUDA kernels of minimax-m1-kernels (framework-agnostic: raw pointers as integers, keyword arguments)";
  m.attr("compiled_archs") = M1_CUDA_ARCHS;

  py::enum_<m1::DType>(m, "DType", "Element type of the q/k/v or x/w operands (fp32 states are implied).")
      .value("float32", m1::DType::kFloat32)
      .value("float16", m1::DType::kFloat16)
      .value("bfloat16", m1::DType::kBFloat16);
  py::enum_<m1::GroupedGemmTile>(m, "GroupedGemmTile", "Tile configuration of the grouped GEMM (grouped_gemm_sm90.h).")
      .value("auto", m1::GroupedGemmTile::kAuto)
      .value("large", m1::GroupedGemmTile::kLarge)
      .value("small", m1::GroupedGemmTile::kSmall);
  m.attr("GROUPED_GEMM_SMALL_TILE_MAX_ROWS_PER_EXPERT") = m1::kGroupedGemmSmallTileMaxRowsPerExpert;
  m.attr("LIGHTNING_PREFILL_CHUNK") = m1::kLightningPrefillChunk;
  m.attr("LIGHTNING_PREFILL_VALUE_TILE") = m1::kLightningPrefillValueTile;

  m.def("device_count", &device_count, "CUDA devices visible to the statically linked runtime");

  m.def(
      "lightning_decode",
      [](uintptr_t q, uintptr_t k, uintptr_t v, Strides2 q_strides, Strides2 k_strides, Strides2 v_strides,
         uintptr_t slope, uintptr_t state, uintptr_t slot_idx, uintptr_t out, int64_t batch, int64_t num_heads,
         int64_t head_dim, int64_t value_dim, int64_t num_slots, m1::DType dtype, double scale, uintptr_t stream,
         int variant) {
        m1::LightningDecodeArgs a{cptr(q), cptr(k), cptr(v), q_strides[0], q_strides[1], k_strides[0],
                                  k_strides[1], v_strides[0], v_strides[1], cptr(slope), mptr(state),
                                  cptr(slot_idx), mptr(out), batch, num_heads, head_dim, value_dim, num_slots,
                                  code(dtype), static_cast<float>(scale), stream, variant};
        m1::lightning_decode(a);
      },
      py::kw_only(), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_strides"), py::arg("k_strides"),
      py::arg("v_strides"), py::arg("slope"), py::arg("state"), py::arg("slot_idx"), py::arg("out"),
      py::arg("batch"), py::arg("num_heads"), py::arg("head_dim"), py::arg("value_dim"), py::arg("num_slots"),
      py::arg("dtype"), py::arg("scale"), py::arg("stream"), py::arg("variant") = 0,
      "One lightning-attention decode step; updates state in place (see lightning_decode.h). `variant` is a "
      "tuning knob for bench/sweep_decode.py and its test only: 1..12 force a tiling, 0 (production) picks it.");

  m.def(
      "lightning_prefill_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, Strides3 q_strides, Strides3 k_strides,
         Strides3 v_strides, Strides3 o_strides, uintptr_t slope, uintptr_t initial_state, uintptr_t final_state,
         uintptr_t slot_idx, uintptr_t segment_states, uintptr_t segments, uintptr_t sequences,
         int64_t num_segments, int64_t num_sequences, int64_t num_heads, int64_t head_dim, int64_t value_dim,
         m1::DType dtype, double scale, double kv_scale, bool adjoint, uintptr_t stream) {
        m1::LightningPrefillArgs a{cptr(q), cptr(k), cptr(v), mptr(o),
                                   q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1],
                                   k_strides[2], v_strides[0], v_strides[1], v_strides[2], o_strides[0],
                                   o_strides[1], o_strides[2], cptr(slope), cptr(initial_state),
                                   mptr(final_state), cptr(slot_idx), mptr(segment_states), cptr(segments),
                                   cptr(sequences), num_segments, num_sequences, num_heads, head_dim, value_dim,
                                   code(dtype), static_cast<float>(scale), static_cast<float>(kv_scale),
                                   adjoint ? 1 : 0, stream};
        m1::lightning_prefill_forward(a);
      },
      py::kw_only(), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("q_strides"),
      py::arg("k_strides"), py::arg("v_strides"), py::arg("o_strides"), py::arg("slope"), py::arg("initial_state"),
      py::arg("final_state"), py::arg("slot_idx"), py::arg("segment_states"), py::arg("segments"),
      py::arg("sequences"), py::arg("num_segments"), py::arg("num_sequences"), py::arg("num_heads"),
      py::arg("head_dim"), py::arg("value_dim"), py::arg("dtype"), py::arg("scale"), py::arg("kv_scale"),
      py::arg("adjoint"), py::arg("stream"),
      "Lightning-attention prefill over a segment table (see lightning_prefill.h); the backward runs it on its "
      "adjoint recurrences (kv_scale, adjoint, negative token strides).");

  m.def("grouped_gemm_workspace_size", &m1::grouped_gemm_workspace_size, py::kw_only(), py::arg("num_experts"),
        py::arg("device"),
        "Bytes of device workspace grouped_gemm / grouped_gemm_wgrad need (see grouped_gemm_sm90.h).");
  m.def(
      "grouped_gemm",
      [](uintptr_t x, int64_t x_row_stride, uintptr_t w, int64_t w_expert_stride, int64_t w_row_stride,
         uintptr_t gate, uintptr_t y, uintptr_t offsets, int64_t num_rows, int64_t n, int64_t k, int64_t num_experts,
         bool weight_k_major, m1::DType dtype, m1::GroupedGemmTile tile, int device, uintptr_t workspace,
         int64_t workspace_bytes, uintptr_t stream) {
        m1::GroupedGemmArgs a{cptr(x), x_row_stride, cptr(w), w_expert_stride, w_row_stride, cptr(gate), mptr(y),
                              cptr(offsets), num_rows, n, k, num_experts, weight_k_major ? 1 : 0, code(dtype),
                              static_cast<int>(tile), device, mptr(workspace), workspace_bytes, stream};
        m1::grouped_gemm(a);
      },
      py::kw_only(), py::arg("x"), py::arg("x_row_stride"), py::arg("w"), py::arg("w_expert_stride"),
      py::arg("w_row_stride"), py::arg("gate"), py::arg("y"), py::arg("offsets"), py::arg("num_rows"), py::arg("n"),
      py::arg("k"), py::arg("num_experts"), py::arg("weight_k_major"), py::arg("dtype"), py::arg("tile"),
      py::arg("device"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "MoE grouped GEMM (CUTLASS sm90a): Y rows of expert e = X rows @ W_e^T ('nk') or @ W_e ('kn'); with a "
      "gate pointer, silu(gate) * (X rows @ W_e^T).");
  m.def(
      "grouped_gemm_wgrad",
      [](uintptr_t p, int64_t p_row_stride, uintptr_t q, int64_t q_row_stride, uintptr_t out, uintptr_t offsets,
         int64_t num_rows, int64_t r, int64_t c, int64_t num_experts, m1::DType dtype, int device, uintptr_t workspace,
         int64_t workspace_bytes, uintptr_t stream) {
        m1::GroupedWgradArgs a{cptr(p), p_row_stride, cptr(q), q_row_stride, mptr(out), cptr(offsets), num_rows, r,
                               c, num_experts, code(dtype), device, mptr(workspace), workspace_bytes, stream};
        m1::grouped_gemm_wgrad(a);
      },
      py::kw_only(), py::arg("p"), py::arg("p_row_stride"), py::arg("q"), py::arg("q_row_stride"), py::arg("out"),
      py::arg("offsets"), py::arg("num_rows"), py::arg("r"), py::arg("c"), py::arg("num_experts"), py::arg("dtype"),
      py::arg("device"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Weight gradient of the grouped GEMM: out_e = P_e^T Q_e over the rows of expert e (zeros when empty).");
  m.def(
      "swiglu",
      [](uintptr_t gate_up, int64_t in_row_stride, uintptr_t out, int64_t rows, int64_t f, m1::DType dtype,
         uintptr_t stream) { m1::swiglu(cptr(gate_up), in_row_stride, mptr(out), rows, f, code(dtype), stream); },
      py::kw_only(), py::arg("gate_up"), py::arg("in_row_stride"), py::arg("out"), py::arg("rows"), py::arg("f"),
      py::arg("dtype"), py::arg("stream"), "out = silu(gate_up[:, :F]) * gate_up[:, F:] (16-byte vectors).");
  m.def(
      "swiglu_backward",
      [](uintptr_t dh, uintptr_t gate_up, int64_t in_row_stride, uintptr_t out, int64_t rows, int64_t f,
         m1::DType dtype, uintptr_t stream) {
        m1::swiglu_backward(cptr(dh), cptr(gate_up), in_row_stride, mptr(out), rows, f, code(dtype), stream);
      },
      py::kw_only(), py::arg("dh"), py::arg("gate_up"), py::arg("in_row_stride"), py::arg("out"), py::arg("rows"),
      py::arg("f"), py::arg("dtype"), py::arg("stream"),
      "out = [d_gate | d_up] of silu(gate) * up from dh and gate_up = [gate | up] (16-byte vectors).");
}
