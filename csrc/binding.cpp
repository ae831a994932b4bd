// The one pybind11 module of the package: every kernel entry, taking device pointers, shapes, strides,
// dtype codes and the CUDA stream as integers (no libtorch, DESIGN.md §2). Python wrappers in
// lightning_ops/ and moe_ops/ validate inputs before calling in here.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include "lightning_decode.h"

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
}
