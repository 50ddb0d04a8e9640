// cuda_device_count: safe on machines with no driver or no GPU (statically linked cudart).
#include <cuda_runtime.h>

#include "../kdpipe_native.h"

namespace kdpipe {

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace kdpipe
