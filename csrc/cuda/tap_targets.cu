// CUDA tap_targets: attention map l2n(mean_c(x^2)) (N,H,W) and pooled mean_hw(x) (N,C), one read of x.
//
// Kernel 1 reads x once. NCHW: a thread per pixel walks the channels (coalesced along HW), keeps
// its sum of squares, and each warp writes its per-channel partial sum of x. NHWC: a block per
// group of pixels, threads along C (coalesced), per-warp partial squares per pixel in shared memory.
// Kernel 2, a block per sample, adds the partial sums in a fixed order (deterministic: no atomics)
// and L2-normalises the map in place.
#include <algorithm>

#include "../kdpipe_native.h"
#include "common.cuh"

namespace kdpipe {
namespace {

using cuda_detail::kMaxBlock;
using cuda_detail::kWarp;

constexpr int kPixelsPerGroup = 32;  // NHWC: pixels per block

struct TapPlan {
  int block;        // threads per block of kernel 1
  long long tiles;  // kernel 1 blocks per sample
  long long rows;   // partial-sum rows per sample (each c floats)
};

TapPlan plan_tap(long long c, long long hw, bool nhwc) {
  TapPlan p{};
  const long long extent = nhwc ? c : hw;  // what the threads of a block span
  p.block = static_cast<int>(std::min<long long>(kMaxBlock, (extent + kWarp - 1) / kWarp * kWarp));
  if (nhwc) {
    p.tiles = (hw + kPixelsPerGroup - 1) / kPixelsPerGroup;
    p.rows = p.tiles;
  } else {
    p.tiles = (hw + p.block - 1) / p.block;
    p.rows = p.tiles * (p.block / kWarp);
  }
  return p;
}

template <class T>
__global__ void tap_nchw_kernel(const T* __restrict__ x, long long c, long long hw, long long rows,
                                float* __restrict__ maps, float* __restrict__ partial) {
  const long long s = blockIdx.y;
  const long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const T* xs = x + s * c * hw;
  float* prow = partial + (s * rows + static_cast<long long>(blockIdx.x) * (blockDim.x / kWarp) + warp) * c;
  float sq = 0.0f;
  for (long long ch = 0; ch < c; ++ch) {  // same trip count in every lane: shuffles stay converged
    const float v = p < hw ? cuda_detail::load(xs, ch * hw + p) : 0.0f;
    sq += v * v;
    const float sum = cuda_detail::warp_sum(v);
    if (lane == 0) prow[ch] = sum;
  }
  if (p < hw) maps[s * hw + p] = sq;
}

template <class T>
__global__ void tap_nhwc_kernel(const T* __restrict__ x, long long c, long long hw, float* __restrict__ maps,
                                float* __restrict__ partial) {
  __shared__ float sq[kMaxBlock / kWarp][kPixelsPerGroup];
  const long long s = blockIdx.y;
  const long long p0 = static_cast<long long>(blockIdx.x) * kPixelsPerGroup;
  const int np = static_cast<int>(hw - p0 < kPixelsPerGroup ? hw - p0 : kPixelsPerGroup);
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  for (int i = lane; i < kPixelsPerGroup; i += kWarp) sq[warp][i] = 0.0f;
  __syncwarp();
  float* prow = partial + (s * gridDim.x + blockIdx.x) * c;
  for (long long base = 0; base < c; base += blockDim.x) {  // uniform trip count across the block
    const long long ch = base + threadIdx.x;
    const bool valid = ch < c;
    float acc = 0.0f;
    for (int i = 0; i < np; ++i) {
      const float v = valid ? cuda_detail::load(x, ((s * hw) + p0 + i) * c + ch) : 0.0f;
      acc += v;
      const float w = cuda_detail::warp_sum(v * v);
      if (lane == 0) sq[warp][i] += w;
    }
    if (valid) prow[ch] = acc;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < np) {
    float m = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) m += sq[w][threadIdx.x];
    maps[s * hw + p0 + threadIdx.x] = m;
  }
}

// One block (kMaxBlock threads) per sample: pooled from the partial rows, map normalised in place.
__global__ void tap_finish_kernel(long long c, long long hw, long long rows, const float* __restrict__ partial,
                                  float* __restrict__ at, float* __restrict__ pooled) {
  __shared__ double scratch[kMaxBlock];
  const long long s = blockIdx.x;
  for (long long ch = threadIdx.x; ch < c; ch += blockDim.x) {
    double sum = 0.0;
    for (long long r = 0; r < rows; ++r) sum += partial[(s * rows + r) * c + ch];
    pooled[s * c + ch] = static_cast<float>(sum / static_cast<double>(hw));
  }
  float* m = at + s * hw;
  double sq = 0.0;
  for (long long p = threadIdx.x; p < hw; p += blockDim.x) {
    const double v = m[p] / static_cast<double>(c);
    sq += v * v;
  }
  const double norm = sqrt(cuda_detail::block_reduce(sq, scratch, cuda_detail::Sum{}));
  const double scale = 1.0 / (static_cast<double>(c) * fmax(norm, kAtEps));
  for (long long p = threadIdx.x; p < hw; p += blockDim.x) m[p] = static_cast<float>(m[p] * scale);
}

}  // namespace

size_t cuda_tap_workspace_bytes(int64_t n, int64_t c, int64_t hw, bool nhwc) {
  const TapPlan p = plan_tap(c, hw, nhwc);
  return static_cast<size_t>(n * p.rows * c) * sizeof(float);
}

void cuda_tap_targets(uintptr_t x, int64_t n, int64_t c, int64_t h, int64_t w, int channel_axis, bool is_half,
                      uintptr_t at, uintptr_t pooled, uintptr_t workspace, int device, uintptr_t stream) {
  const char* op = "cuda_tap_targets";
  if (channel_axis != 1 && channel_axis != 3)
    throw std::invalid_argument("cuda_tap_targets: channel_axis must be 1 or 3");
  if (n < 0 || c <= 0 || h <= 0 || w <= 0) throw std::invalid_argument("cuda_tap_targets: sizes must be positive");
  if (n == 0) return;
  if (n > 65535) throw std::invalid_argument("cuda_tap_targets: at most 65535 samples per call");
  cuda_detail::use_device(device, op);
  const bool nhwc = channel_axis == 3;
  const long long hw = h * w;
  const TapPlan p = plan_tap(c, hw, nhwc);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  auto* at_p = reinterpret_cast<float*>(at);
  auto* part = reinterpret_cast<float*>(workspace);
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(n));
  if (is_half) {
    const auto* xp = reinterpret_cast<const __half*>(x);
    if (nhwc) {
      tap_nhwc_kernel<<<grid, p.block, 0, st>>>(xp, c, hw, at_p, part);
    } else {
      tap_nchw_kernel<<<grid, p.block, 0, st>>>(xp, c, hw, p.rows, at_p, part);
    }
  } else {
    const auto* xp = reinterpret_cast<const float*>(x);
    if (nhwc) {
      tap_nhwc_kernel<<<grid, p.block, 0, st>>>(xp, c, hw, at_p, part);
    } else {
      tap_nchw_kernel<<<grid, p.block, 0, st>>>(xp, c, hw, p.rows, at_p, part);
    }
  }
  cuda_detail::check(cudaGetLastError(), op, "kernel launch");
  tap_finish_kernel<<<static_cast<unsigned>(n), kMaxBlock, 0, st>>>(c, hw, p.rows, part, at_p,
                                                                    reinterpret_cast<float*>(pooled));
  cuda_detail::check(cudaGetLastError(), op, "kernel launch");
}

}  // namespace kdpipe
