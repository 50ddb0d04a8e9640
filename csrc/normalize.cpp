// normalize_u8: uint8 images -> the float32 teacher input through a per-output-channel lookup table.
//
// A uint8 pixel has 256 values, so (v * scale - mean[c]) / std[c] is precomputed per channel in
// Python with the exact float32 operations of the formula; this pass is a gather, bit-identical to the
// NumPy path, and fuses the channel selection (RGB/BGR, grey -> 3 channels) and the NHWC -> NCHW move.
#include "kdpipe_native.h"

namespace kdpipe {

void normalize_u8_cpu(const uint8_t* images, int64_t b, int64_t hw, int64_t c_in, const float* lut,
                      const int32_t* src_channel, int64_t c_out, bool nchw, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < b; ++i) {
    const uint8_t* img = images + i * hw * c_in;
    float* dst = out + i * hw * c_out;
    for (int64_t c = 0; c < c_out; ++c) {
      const float* table = lut + c * 256;
      const uint8_t* src = img + src_channel[c];
      if (nchw) {
        float* plane = dst + c * hw;
        for (int64_t p = 0; p < hw; ++p) plane[p] = table[src[p * c_in]];
      } else {
        for (int64_t p = 0; p < hw; ++p) dst[p * c_out + c] = table[src[p * c_in]];
      }
    }
  }
}

}  // namespace kdpipe
