// pybind11 bindings of kdpipe._native. Each op lives in its own file; this file only binds them.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "kdpipe native target ops (C++/OpenMP, optional CUDA)";
#ifdef KDPIPE_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
