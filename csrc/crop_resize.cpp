// crop_resize_u8: the bilinear crop + resize of kdpipe/data/transforms.py, bit-identical to its NumPy form.
//
// Python computes the per-image source rows/columns and float32 weights (flips included); this pass
// gathers and blends with the same float32 operations in the same order: each product rounded, then
// each sum (horizontal first, then vertical), then floor(v + 0.5) and a clip to 0..255. The file is
// compiled with -ffp-contract=off so that no multiply-add is fused into one rounding.
#include <cmath>

#include "kdpipe_native.h"

namespace kdpipe {

void crop_resize_u8_cpu(const uint8_t* images, int64_t b, int64_t h, int64_t w, int64_t c, const int64_t* ya,
                        const int64_t* yb, const float* wy0, const float* wy1, const int64_t* xa,
                        const int64_t* xb, const float* wx0, const float* wx1, int64_t size, uint8_t* out,
                        int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t n = 0; n < b; ++n) {
    const uint8_t* img = images + n * h * w * c;
    const int64_t o = n * size;  // offset of this image's rows/columns in the (b, size) index arrays
    uint8_t* dst = out + n * size * size * c;
    for (int64_t i = 0; i < size; ++i) {
      const uint8_t* row_a = img + ya[o + i] * w * c;
      const uint8_t* row_b = img + yb[o + i] * w * c;
      const float v0 = wy0[o + i], v1 = wy1[o + i];
      for (int64_t j = 0; j < size; ++j) {
        const int64_t ca = xa[o + j] * c, cb = xb[o + j] * c;
        const float u0 = wx0[o + j], u1 = wx1[o + j];
        for (int64_t k = 0; k < c; ++k) {
          const float top = static_cast<float>(row_a[ca + k]) * u0 + static_cast<float>(row_a[cb + k]) * u1;
          const float bottom = static_cast<float>(row_b[ca + k]) * u0 + static_cast<float>(row_b[cb + k]) * u1;
          float v = std::floor(top * v0 + bottom * v1 + 0.5f);
          v = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
          dst[(i * size + j) * c + k] = static_cast<uint8_t>(v);
        }
      }
    }
  }
}

}  // namespace kdpipe
