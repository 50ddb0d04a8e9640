// IEEE binary16 / bfloat16 <-> float32 bit conversions, portable (no F16C needed), inline.
#pragma once

#include <cstdint>
#include <cstring>

namespace kdpipe {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Exact: shifting exponent+mantissa into place and multiplying by 2^112 rebiases normals and
// subnormals alike; inf/NaN get the all-ones exponent. Branch-free, so loops vectorise.
inline float half_to_float(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const float scaled = bits_f32(em) * 0x1p112f;
  const uint32_t mag = (h & 0x7c00u) == 0x7c00u ? (em | 0x7f800000u) : f32_bits(scaled);
  return bits_f32(mag | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// Round to nearest even, the way NumPy's float32 -> float16 cast does it, NaN payloads included
// (top 10 significand bits kept, forced non-zero so a NaN stays a NaN).
inline uint16_t float_to_half(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) {
    if (a == 0x7f800000u) return sign | 0x7c00u;
    uint16_t r = static_cast<uint16_t>(0x7c00u + ((a & 0x007fffffu) >> 13));
    if (r == 0x7c00u) ++r;
    return sign | r;
  }
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                        // below 2^-14: half subnormal or zero
    if (a <= 0x33000000u) return sign;          // <= 2^-25 rounds (ties to even) to zero
    const uint32_t m = (a & 0x007fffffu) | 0x00800000u;
    const uint32_t shift = 126u - (a >> 23);    // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3ffu);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry correctly bumps the exponent
  return static_cast<uint16_t>(sign | r);
}

// Round to nearest even on the top 16 bits; every NaN becomes the canonical quiet NaN 0x7fc0.
inline uint16_t float_to_bfloat16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace kdpipe

namespace kdpipe {
// Bulk versions (half.cpp): F16C when available at run time, bit-identical to the functions above.
void halves_to_floats(const uint16_t* src, float* dst, int64_t count);
void floats_to_halves(const float* src, uint16_t* dst, int64_t count);
}  // namespace kdpipe
