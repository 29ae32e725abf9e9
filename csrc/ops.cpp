// Schemas of every barber op, declared once. Backend files (csrc/cpu/*.cpp,
// csrc/cuda/*.cu) only register implementations with TORCH_LIBRARY_IMPL.
//
// Semantics are defined by barber/reference.py; the ranking rule ("higher score
// first, ties -> lower column index first") lives in csrc/core/order.h.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace barber {

std::string build_info() {
  std::string info = "cpu";
#ifdef BARBER_WITH_CUDA
  info += ",cuda";
#ifdef BARBER_CUDA_VERSION
  info += BARBER_CUDA_VERSION;
#endif
#endif
  return info;
}

}  // namespace barber

TORCH_LIBRARY(barber, m) {
  // The fakes (meta kernels) of these ops are registered by importing barber.ops; torch checks that
  // they come from there, and an op traced without them says to import it.
  m.set_python_module("barber.ops");
  // What this build contains, e.g. "cpu" or "cpu,cuda13.0".
  m.def("_build_info() -> str", &barber::build_info);
  // Keep the k best entries of every row: bool mask [R, C].
  m.def("topk_mask(Tensor scores, int k) -> Tensor");
  // In every group of m consecutive columns keep the n best: bool mask [R, C].
  m.def("nm_mask(Tensor scores, int n, int m) -> Tensor");
  // LLM-Barber rebuild of `mask` by `scores`, per row (m > 0: N:M variant).
  m.def("rebuild_mask(Tensor scores, Tensor mask, float ratio, int m=0) -> Tensor");
  // 2:4 compression in PyTorch's CUTLASS (sm80) layout: (values [R, C/2], meta).
  m.def("pack_24(Tensor dense) -> (Tensor, Tensor)");
  // Inverse of pack_24: dense [R, C] with exact zeros at pruned positions.
  m.def("unpack_24(Tensor values, Tensor meta) -> Tensor");
  // Bool mask [R, C] -> uint8 [R, ceil(C/8)], bit j of byte b = column 8b+j.
  m.def("pack_bitmask(Tensor mask) -> Tensor");
  // Inverse of pack_bitmask for `cols` columns.
  m.def("unpack_bitmask(Tensor bits, int cols) -> Tensor");
}

// An importable module with no Python functions: importing barber._C loads the
// library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
