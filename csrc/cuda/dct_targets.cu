// CUDA dct_targets: the same float64 separable transforms as csrc/dct_targets.cpp, a block per sample.
// Workspace: the basis tables (written once per call by a small kernel) and per-sample scratch.
#include "../kdpipe_native.h"
#include "common.cuh"

namespace kdpipe {
namespace {

using cuda_detail::kMaxBlock;

// cos_m/sin_m (n, n) as in the CPU code; sin_m is unused for DCT-II.
__global__ void basis_kernel(long long n, int dct2, double* cos_m, double* sin_m) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * n) return;
  const long long k = idx / n, i = idx % n;
  if (dct2) {
    const double scale = sqrt((k == 0 ? 1.0 : 2.0) / static_cast<double>(n));
    cos_m[idx] = scale * cospi(static_cast<double>((2 * i + 1) * k) / (2.0 * n));
  } else {
    double sv, cv;
    sincospi(2.0 * static_cast<double>((k * i) % n) / static_cast<double>(n), &sv, &cv);
    cos_m[idx] = cv;
    sin_m[idx] = sv;
  }
}

__global__ void dct_kernel(const float* __restrict__ maps, long long h, long long w, int variant,
                           const double* __restrict__ ch, const double* __restrict__ sh,
                           const double* __restrict__ cw, const double* __restrict__ sw, double* __restrict__ scratch,
                           float* __restrict__ out) {
  __shared__ double red[kMaxBlock];
  const long long s = blockIdx.x;
  const long long hw = h * w;
  const bool dft = variant != static_cast<int>(DctVariant::Dct2);
  const float* a = maps + s * hw;
  double* tc = scratch + s * 3 * hw;
  double* ts = tc + hw;
  double* r = ts + hw;

  double part = 0.0;
  for (long long p = threadIdx.x; p < hw; p += blockDim.x) part += a[p];
  const double mean = cuda_detail::block_reduce(part, red, cuda_detail::Sum{}) / static_cast<double>(hw);

  for (long long idx = threadIdx.x; idx < hw; idx += blockDim.x) {  // tc = Ch A0, ts = Sh A0
    const long long k = idx / w, j = idx % w;
    double vc = 0.0, vs = 0.0;
    for (long long i = 0; i < h; ++i) {
      const double v = static_cast<double>(a[i * w + j]) - mean;
      vc += ch[k * h + i] * v;
      if (dft) vs += sh[k * h + i] * v;
    }
    tc[idx] = vc;
    ts[idx] = vs;
  }
  __syncthreads();

  double lo = 1e300, hi = -1e300;
  for (long long idx = threadIdx.x; idx < hw; idx += blockDim.x) {  // r = tc Cw^T - ts Sw^T
    const long long k = idx / w, l = idx % w;
    double v = 0.0;
    for (long long j = 0; j < w; ++j) {
      v += tc[k * w + j] * cw[l * w + j];
      if (dft) v -= ts[k * w + j] * sw[l * w + j];
    }
    if (variant == static_cast<int>(DctVariant::DftAbs)) v = fabs(v);
    r[idx] = v;
    lo = fmin(lo, v);
    hi = fmax(hi, v);
  }
  lo = cuda_detail::block_reduce(lo, red, cuda_detail::Min{});
  hi = cuda_detail::block_reduce(hi, red, cuda_detail::Max{});
  const double den = variant == static_cast<int>(DctVariant::DftAbs) ? hi : hi - lo;
  const bool ok = fabs(den) > kDctEps;
  for (long long idx = threadIdx.x; idx < hw; idx += blockDim.x)
    out[s * hw + idx] = ok ? static_cast<float>((r[idx] - lo) / den) : 0.0f;
}

}  // namespace

size_t cuda_dct_workspace_bytes(int64_t n, int64_t h, int64_t w) {
  return static_cast<size_t>(2 * h * h + 2 * w * w + 3 * n * h * w) * sizeof(double);
}

void cuda_dct_targets(uintptr_t maps, int64_t n, int64_t h, int64_t w, DctVariant variant, uintptr_t out,
                      uintptr_t workspace, int device, uintptr_t stream) {
  const char* op = "cuda_dct_targets";
  if (n < 0 || h <= 0 || w <= 0) throw std::invalid_argument("cuda_dct_targets: sizes must be positive");
  if (n == 0) return;
  cuda_detail::use_device(device, op);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  auto* ws = reinterpret_cast<double*>(workspace);
  double* ch = ws;
  double* sh = ch + h * h;
  double* cw = sh + h * h;
  double* sw = cw + w * w;
  double* scratch = sw + w * w;
  const int dct2 = variant == DctVariant::Dct2 ? 1 : 0;
  basis_kernel<<<static_cast<unsigned>((h * h + 255) / 256), 256, 0, st>>>(h, dct2, ch, sh);
  basis_kernel<<<static_cast<unsigned>((w * w + 255) / 256), 256, 0, st>>>(w, dct2, cw, sw);
  cuda_detail::check(cudaGetLastError(), op, "kernel launch");
  dct_kernel<<<static_cast<unsigned>(n), kMaxBlock, 0, st>>>(reinterpret_cast<const float*>(maps), h, w,
                                                            static_cast<int>(variant), ch, sh, cw, sw, scratch,
                                                            reinterpret_cast<float*>(out));
  cuda_detail::check(cudaGetLastError(), op, "kernel launch");
}

}  // namespace kdpipe
