// to_storage: float32 -> float16 / bfloat16 bits (round to nearest even), counting overflows.
#include <algorithm>

#include "half.h"
#include "kdpipe_native.h"

#ifdef KDPIPE_WITH_OPENMP
#include <omp.h>
#endif

namespace kdpipe {
namespace {

constexpr int64_t kParallelMin = 1 << 16;  // below this, threads cost more than they save
constexpr int64_t kBlock = 4096;           // elements per work item

int threads_for(int64_t count, int threads) { return count < kParallelMin ? 1 : std::max(1, threads); }

// Counts results equal to +-inf (exponent all ones, mantissa 0) whose input was finite.
int64_t count_overflow(const float* x, const uint16_t* r, int64_t count, uint16_t inf) {
  int64_t overflow = 0;
#pragma omp simd reduction(+ : overflow)
  for (int64_t i = 0; i < count; ++i) {
    const bool finite = (f32_bits(x[i]) & 0x7f800000u) != 0x7f800000u;
    overflow += static_cast<int64_t>(((r[i] & 0x7fffu) == inf) & finite);
  }
  return overflow;
}

}  // namespace

int64_t to_float16_cpu(const float* x, uint16_t* out, int64_t count, int threads) {
  int64_t overflow = 0;
#pragma omp parallel for schedule(static) reduction(+ : overflow) num_threads(threads_for(count, threads))
  for (int64_t b0 = 0; b0 < count; b0 += kBlock) {
    const int64_t len = std::min(kBlock, count - b0);
    floats_to_halves(x + b0, out + b0, len);
    overflow += count_overflow(x + b0, out + b0, len, 0x7c00u);
  }
  return overflow;
}

int64_t to_bfloat16_cpu(const float* x, uint16_t* out, int64_t count, int threads) {
  int64_t overflow = 0;
#pragma omp parallel for schedule(static) reduction(+ : overflow) num_threads(threads_for(count, threads))
  for (int64_t b0 = 0; b0 < count; b0 += kBlock) {
    const int64_t len = std::min(kBlock, count - b0);
    const float* xb = x + b0;
    uint16_t* ob = out + b0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {  // branch-free form of float_to_bfloat16, so it vectorises
      const uint32_t u = f32_bits(xb[i]);
      const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      ob[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
    }
    overflow += count_overflow(xb, ob, len, 0x7f80u);
  }
  return overflow;
}

int openmp_max_threads() {
#ifdef KDPIPE_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

}  // namespace kdpipe
