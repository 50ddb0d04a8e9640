// Stand-ins for the CUDA entry points when the module is built without a CUDA toolkit.
#include <stdexcept>

#include "kdpipe_native.h"

#ifndef KDPIPE_WITH_CUDA
namespace kdpipe {
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("kdpipe._native was built without CUDA: rebuild with a CUDA toolkit (KDPIPE_CUDA=ON)");
}
}  // namespace

int cuda_device_count() { return 0; }
size_t cuda_tap_workspace_bytes(int64_t, int64_t, int64_t, bool) { return 0; }
size_t cuda_dct_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }
void cuda_tap_targets(uintptr_t, int64_t, int64_t, int64_t, int64_t, int, bool, uintptr_t, uintptr_t, uintptr_t,
                      int, uintptr_t) {
  no_cuda();
}
void cuda_dct_targets(uintptr_t, int64_t, int64_t, int64_t, DctVariant, uintptr_t, uintptr_t, int, uintptr_t) {
  no_cuda();
}
}  // namespace kdpipe
#endif
