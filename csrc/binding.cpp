// The one pybind11 module of the package: every kernel entry, taking device pointers, shapes, strides,
// dtype codes and the CUDA stream as integers (no libtorch, docs/design.md). Python wrappers in
// lightning_ops/ and moe_ops/ validate inputs before calling in here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <stdexcept>
#include <vector>

#include "grouped_gemm_sm90.h"
#include "lightning_decode.h"
#include "lightning_prefill.h"

namespace py = pybind11;

namespace {

const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

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
  m.doc() = "CUDA kernels of minimax-m1-kernels (framework-agnostic: raw pointers as integers)";
  m.attr("compiled_archs") = M1_CUDA_ARCHS;
  m.def("device_count", &device_count, "CUDA devices visible to the statically linked runtime");

  m.def(
      "lightning_decode",
      [](uintptr_t q, uintptr_t k, uintptr_t v, int64_t q_sb, int64_t q_sh, int64_t k_sb, int64_t k_sh,
         int64_t v_sb, int64_t v_sh, uintptr_t slope, uintptr_t state, uintptr_t slot_idx, uintptr_t out,
         int64_t batch, int64_t heads, int64_t head_dim, int64_t value_dim, int64_t num_slots, int dtype,
         double scale, uintptr_t stream, int variant) {
        m1::LightningDecodeArgs a{cptr(q), cptr(k), cptr(v), q_sb, q_sh, k_sb, k_sh, v_sb, v_sh,
                                  cptr(slope), mptr(state), cptr(slot_idx), mptr(out),
                                  batch, heads, head_dim, value_dim, num_slots, dtype,
                                  static_cast<float>(scale), stream, variant};
        m1::lightning_decode(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_stride_b"), py::arg("q_stride_h"),
      py::arg("k_stride_b"), py::arg("k_stride_h"), py::arg("v_stride_b"), py::arg("v_stride_h"),
      py::arg("slope"), py::arg("state"), py::arg("slot_idx"), py::arg("out"), py::arg("batch"),
      py::arg("num_heads"), py::arg("head_dim"), py::arg("value_dim"), py::arg("num_slots"),
      py::arg("dtype"), py::arg("scale"), py::arg("stream"), py::arg("variant") = 0,
      "One lightning-attention decode step; updates state in place (see lightning_decode.h).");

  m.def(
      "lightning_prefill_forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, const std::vector<int64_t>& strides,
         uintptr_t slope, uintptr_t initial_state, uintptr_t final_state, uintptr_t slot_idx,
         uintptr_t segment_states, uintptr_t segments, uintptr_t sequences, int64_t num_segments, int64_t num_sequences, int64_t heads,
         int64_t head_dim, int64_t value_dim, int dtype, double scale, uintptr_t stream) {
        if (strides.size() != 12) throw std::invalid_argument("strides: 12 values (b, t, h) for q, k, v, o");
        m1::LightningPrefillArgs a{cptr(q), cptr(k), cptr(v), mptr(o),
                                   strides[0], strides[1], strides[2], strides[3], strides[4], strides[5],
                                   strides[6], strides[7], strides[8], strides[9], strides[10], strides[11],
                                   cptr(slope), cptr(initial_state), mptr(final_state), cptr(slot_idx),
                                   mptr(segment_states),
                                   cptr(segments), cptr(sequences), num_segments, num_sequences, heads,
                                   head_dim, value_dim, dtype, static_cast<float>(scale), stream};
        m1::lightning_prefill_forward(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("strides"), py::arg("slope"),
      py::arg("initial_state"), py::arg("final_state"), py::arg("slot_idx"), py::arg("segment_states"),
      py::arg("segments"),
      py::arg("sequences"), py::arg("num_segments"), py::arg("num_sequences"), py::arg("num_heads"),
      py::arg("head_dim"), py::arg("value_dim"), py::arg("dtype"), py::arg("scale"), py::arg("stream"),
      "Lightning-attention prefill forward over a segment table (see lightning_prefill.h).");

  m.def("grouped_gemm_workspace_size", &m1::grouped_gemm_workspace_size, py::arg("num_experts"), py::arg("device"),
        "Bytes of device workspace grouped_gemm / grouped_gemm_wgrad need (see grouped_gemm_sm90.h).");
  m.def(
      "grouped_gemm",
      [](uintptr_t x, int64_t x_row_stride, uintptr_t w, int64_t w_expert_stride, int64_t w_row_stride,
         uintptr_t gate, uintptr_t y, uintptr_t offsets, int64_t num_rows, int64_t n, int64_t k, int64_t num_experts,
         bool weight_k_major, int dtype, int tile, int device, uintptr_t workspace, int64_t workspace_bytes,
         uintptr_t stream) {
        m1::GroupedGemmArgs a{cptr(x), x_row_stride, cptr(w), w_expert_stride, w_row_stride, cptr(gate), mptr(y),
                              cptr(offsets), num_rows, n, k, num_experts, weight_k_major ? 1 : 0, dtype, tile,
                              device, mptr(workspace), workspace_bytes, stream};
        m1::grouped_gemm(a);
      },
      py::arg("x"), py::arg("x_row_stride"), py::arg("w"), py::arg("w_expert_stride"), py::arg("w_row_stride"),
      py::arg("gate"), py::arg("y"), py::arg("offsets"), py::arg("num_rows"), py::arg("n"), py::arg("k"),
      py::arg("num_experts"), py::arg("weight_k_major"), py::arg("dtype"), py::arg("tile"), py::arg("device"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "MoE grouped GEMM (CUTLASS sm90a): Y rows of expert e = X rows @ W_e^T ('nk') or @ W_e ('kn'); with a "
      "gate pointer, silu(gate) * (X rows @ W_e^T).");
  m.def(
      "grouped_gemm_wgrad",
      [](uintptr_t p, int64_t p_row_stride, uintptr_t q, int64_t q_row_stride, uintptr_t out, uintptr_t offsets,
         int64_t num_rows, int64_t r, int64_t c, int64_t num_experts, int dtype, int device, uintptr_t workspace,
         int64_t workspace_bytes, uintptr_t stream) {
        m1::GroupedWgradArgs a{cptr(p), p_row_stride, cptr(q), q_row_stride, mptr(out), cptr(offsets), num_rows, r,
                               c, num_experts, dtype, device, mptr(workspace), workspace_bytes, stream};
        m1::grouped_gemm_wgrad(a);
      },
      py::arg("p"), py::arg("p_row_stride"), py::arg("q"), py::arg("q_row_stride"), py::arg("out"),
      py::arg("offsets"), py::arg("num_rows"), py::arg("r"), py::arg("c"), py::arg("num_experts"), py::arg("dtype"),
      py::arg("device"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      "Weight gradient of the grouped GEMM: out_e = P_e^T Q_e over the rows of expert e (zeros when empty).");
  m.def(
      "swiglu",
      [](uintptr_t gate_up, int64_t in_row_stride, uintptr_t out, int64_t rows, int64_t f, int dtype,
         uintptr_t stream) { m1::swiglu(cptr(gate_up), in_row_stride, mptr(out), rows, f, dtype, stream); },
      py::arg("gate_up"), py::arg("in_row_stride"), py::arg("out"), py::arg("rows"), py::arg("f"), py::arg("dtype"),
      py::arg("stream"), "out = silu(gate_up[:, :F]) * gate_up[:, F:] (16-byte vectors).");
}
