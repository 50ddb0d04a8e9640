// crop_resize_u8: the bilinear crop + resize of kdpipe/data/transforms.py, bit-identical to its NumPy form.
//
// Python computes the per-image source rows/columns and float32 weights (flips included); this pass
// gathers and blends with the same float32 operations in the same order: each product rounded, then
// each sum (horizontal first, then vertical), then floor(v + 0.5) and a clip to 0..255. The file is
// compiled with -ffp-contract=off so that no multiply-add is fused into one rounding.
#include "kdpipe_native.h"

namespace kdpipe {

namespace {

// floor(v + 0.5) clipped to 0..255, as an integer conversion: for v + 0.5 >= 0 truncation is floor,
// and below 0 both clip to 0, so the result is the same byte; std::floor is a libm call without SSE4.1.
inline uint8_t round_clip(float v) {
  const int iv = static_cast<int>(v + 0.5f);
  return static_cast<uint8_t>(iv < 0 ? 0 : (iv > 255 ? 255 : iv));
}

// One image; C > 0 fixes the channel count at compile time (1 and 3), C == 0 reads it from c.
template <int C>
void crop_resize_one(const uint8_t* img, int64_t w, int64_t c_rt, const int64_t* ya, const int64_t* yb,
                     const float* wy0, const float* wy1, const int64_t* xa, const int64_t* xb, const float* wx0,
                     const float* wx1, int64_t size, uint8_t* dst) {
  const int64_t c = C > 0 ? C : c_rt;
  for (int64_t i = 0; i < size; ++i) {
    const uint8_t* row_a = img + ya[i] * w * c;
    const uint8_t* row_b = img + yb[i] * w * c;
    const float v0 = wy0[i], v1 = wy1[i];
    uint8_t* out = dst + i * size * c;
    for (int64_t j = 0; j < size; ++j) {
      const int64_t ca = xa[j] * c, cb = xb[j] * c;
      const float u0 = wx0[j], u1 = wx1[j];
      for (int64_t k = 0; k < c; ++k) {
        const float top = static_cast<float>(row_a[ca + k]) * u0 + static_cast<float>(row_a[cb + k]) * u1;
        const float bottom = static_cast<float>(row_b[ca + k]) * u0 + static_cast<float>(row_b[cb + k]) * u1;
        out[j * c + k] = round_clip(top * v0 + bottom * v1);
      }
    }
  }
}

}  // namespace

void crop_resize_u8_cpu(const uint8_t* images, int64_t b, int64_t h, int64_t w, int64_t c, const int64_t* ya,
                        const int64_t* yb, const float* wy0, const float* wy1, const int64_t* xa,
                        const int64_t* xb, const float* wx0, const float* wx1, int64_t size, uint8_t* out,
                        int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t n = 0; n < b; ++n) {
    const uint8_t* img = images + n * h * w * c;
    const int64_t o = n * size;  // offset of this image's rows/columns in the (b, size) index arrays
    uint8_t* dst = out + n * size * size * c;
    const auto run = c == 3 ? crop_resize_one<3> : (c == 1 ? crop_resize_one<1> : crop_resize_one<0>);
    run(img, w, c, ya + o, yb + o, wy0 + o, wy1 + o, xa + o, xb + o, wx0 + o, wx1 + o, size, dst);
  }
}

}  // namespace kdpipe
