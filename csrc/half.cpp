// Bulk float16 <-> float32 conversions: F16C instructions when the CPU has them (checked once at
// run time, so the wheel still runs on any x86-64), else the portable functions of half.h.
#include "half.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KDPIPE_X86 1
#endif

namespace kdpipe {

#ifdef KDPIPE_X86
namespace {

bool have_f16c() {
  static const bool ok = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return ok;
}

__attribute__((target("avx,f16c"))) void halves_to_floats_f16c(const uint16_t* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) dst[i] = half_to_float(src[i]);
}

// Hardware round-to-nearest-even; blocks holding a NaN are redone in software because F16C quiets
// NaNs while NumPy keeps their payload.
__attribute__((target("avx,f16c"))) void floats_to_halves_f16c(const float* src, uint16_t* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (int64_t j = i; j < i + 8; ++j) dst[j] = float_to_half(src[j]);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
  }
  for (; i < count; ++i) dst[i] = float_to_half(src[i]);
}

}  // namespace
#endif

void halves_to_floats(const uint16_t* src, float* dst, int64_t count) {
#ifdef KDPIPE_X86
  if (have_f16c()) return halves_to_floats_f16c(src, dst, count);
#endif
  for (int64_t i = 0; i < count; ++i) dst[i] = half_to_float(src[i]);
}

void floats_to_halves(const float* src, uint16_t* dst, int64_t count) {
#ifdef KDPIPE_X86
  if (have_f16c()) return floats_to_halves_f16c(src, dst, count);
#endif
  for (int64_t i = 0; i < count; ++i) dst[i] = float_to_half(src[i]);
}

}  // namespace kdpipe
