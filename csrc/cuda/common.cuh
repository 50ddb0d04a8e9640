// Helpers shared by the CUDA op files: error checks, device selection, loads, block reductions.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace kdpipe {
namespace cuda_detail {

constexpr int kWarp = 32;
constexpr int kMaxBlock = 256;

inline void check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    throw std::runtime_error(std::string(op) + ": " + what + " failed: " + cudaGetErrorString(err));
  }
}

// Throws a clear error when there is no driver / GPU, instead of letting a launch fail obscurely.
inline void use_device(int device, const char* op) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw std::runtime_error(std::string(op) + ": no usable CUDA device (" +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices visible") + ")");
  }
  if (device < 0 || device >= count)
    throw std::runtime_error(std::string(op) + ": device " + std::to_string(device) + " out of range (" +
                             std::to_string(count) + " visible)");
  check(cudaSetDevice(device), op, "cudaSetDevice");
}

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, long long i) { return __half2float(p[i]); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // complete in lane 0
}

struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Min {
  __device__ double operator()(double a, double b) const { return a < b ? a : b; }
};
struct Max {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};

// Deterministic tree reduction over the block; every thread gets the result. blockDim.x must be a
// power of two <= kMaxBlock; scratch holds kMaxBlock doubles. Ends with a barrier.
template <class Op>
__device__ double block_reduce(double v, double* scratch, Op op) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + stride]);
    __syncthreads();
  }
  const double r = scratch[0];
  __syncthreads();
  return r;
}

}  // namespace cuda_detail
}  // namespace kdpipe
