// tap_targets: one pass over an activation gives the attention map l2n(mean_c(x^2)) and mean_hw(x).
//
// Accuracy: squares and sums are accumulated in float32 over short runs (vector lanes, blocks of
// kPlaneBlock elements, chunks of kChannelChunk channels / kPixelChunk pixels) and the runs are
// combined in float64, so results match a float64 reference to ~1e-6 relative without paying
// float64 arithmetic in the streaming loops.
#include <algorithm>
#include <cmath>
#include <vector>

#include "half.h"
#include "kdpipe_native.h"

namespace kdpipe {
namespace {

constexpr int64_t kPlaneBlock = 512;   // elements summed in float before joining the float64 total
constexpr int64_t kChannelChunk = 32;  // NCHW: planes accumulated in float before the float64 flush
constexpr int64_t kPixelChunk = 32;    // NHWC: pixels accumulated in float before the float64 flush

// acc[i] += v*v over one (n, c) plane of float32; returns the plane sum of v.
double accumulate_plane(const float* plane, int64_t hw, float* acc) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < hw; b0 += kPlaneBlock) {
    const int64_t b1 = std::min(hw, b0 + kPlaneBlock);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = b0; i < b1; ++i) {
      const float v = plane[i];
      acc[i] += v * v;
      s += v;
    }
    total += s;
  }
  return total;
}

// float16 planes are converted a block at a time into an L1-resident buffer, then accumulated.
double accumulate_plane(const uint16_t* plane, int64_t hw, float* acc) {
  float buf[kPlaneBlock];
  double total = 0.0;
  for (int64_t b0 = 0; b0 < hw; b0 += kPlaneBlock) {
    const int64_t len = std::min(kPlaneBlock, hw - b0);
    halves_to_floats(plane + b0, buf, len);
    total += accumulate_plane(buf, len, acc + b0);
  }
  return total;
}

// acc[c] += v over one pixel's channel row of float32; returns the sum of v*v.
float accumulate_pixel(const float* row, int64_t c, float* acc) {
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < c; ++i) {
    const float v = row[i];
    acc[i] += v;
    sq += v * v;
  }
  return sq;
}

float accumulate_pixel(const uint16_t* row, int64_t c, float* acc) {
  float buf[kPlaneBlock];
  float sq = 0.0f;
  for (int64_t b0 = 0; b0 < c; b0 += kPlaneBlock) {
    const int64_t len = std::min(kPlaneBlock, c - b0);
    halves_to_floats(row + b0, buf, len);
    sq += accumulate_pixel(buf, len, acc + b0);
  }
  return sq;
}

// Work is split into n * blocks items (a sample's channel block or pixel block) so that small
// batches still use every thread. The split depends on the shape only, never on the thread count,
// so results are bit-identical for any number of threads.
constexpr int64_t kTargetItems = 32;

int64_t blocks_per_sample(int64_t n, int64_t extent, int64_t min_block) {
  if (n >= kTargetItems) return 1;
  const int64_t want = (kTargetItems + n - 1) / n;
  return std::max<int64_t>(1, std::min(want, extent / min_block));
}

// at[s, :] = m / max(||m||, eps) where m = map_sum(s, p) / divisor.
template <class MapSum>
void normalise_maps(int64_t n, int64_t hw, double divisor, MapSum map_sum, float* at, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t s = 0; s < n; ++s) {
    double sq = 0.0;
    for (int64_t p = 0; p < hw; ++p) {
      const double m = map_sum(s, p) / divisor;
      sq += m * m;
    }
    const double scale = 1.0 / (divisor * std::max(std::sqrt(sq), kAtEps));
    for (int64_t p = 0; p < hw; ++p) at[s * hw + p] = static_cast<float>(map_sum(s, p) * scale);
  }
}

template <class T>
void tap_nchw(const T* x, int64_t n, int64_t c, int64_t hw, float* at, float* pooled, int threads) {
  const int64_t want = blocks_per_sample(n, c, 16);
  const int64_t per_block = (c + want - 1) / want;
  const int64_t blocks = (c + per_block - 1) / per_block;
  std::vector<double> part(static_cast<size_t>(n * blocks * hw));  // per item: sum_c x^2 per pixel
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(static_cast<size_t>(hw));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n * blocks; ++item) {
      const int64_t s = item / blocks;
      const int64_t c0 = (item % blocks) * per_block;
      const int64_t c1 = std::min(c, c0 + per_block);
      double* tot = part.data() + item * hw;
      std::fill(tot, tot + hw, 0.0);
      for (int64_t k0 = c0; k0 < c1; k0 += kChannelChunk) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t ch = k0; ch < std::min(c1, k0 + kChannelChunk); ++ch) {
          const double sum = accumulate_plane(x + (s * c + ch) * hw, hw, acc.data());
          pooled[s * c + ch] = static_cast<float>(sum / static_cast<double>(hw));
        }
        for (int64_t p = 0; p < hw; ++p) tot[p] += acc[static_cast<size_t>(p)];
      }
    }
  }
  auto map_sum = [&](int64_t s, int64_t p) {
    double m = 0.0;
    for (int64_t b = 0; b < blocks; ++b) m += part[static_cast<size_t>((s * blocks + b) * hw + p)];
    return m;
  };
  normalise_maps(n, hw, static_cast<double>(c), map_sum, at, threads);
}

template <class T>
void tap_nhwc(const T* x, int64_t n, int64_t c, int64_t hw, float* at, float* pooled, int threads) {
  const int64_t want = blocks_per_sample(n, hw, 16);
  const int64_t per_block = (hw + want - 1) / want;
  const int64_t blocks = (hw + per_block - 1) / per_block;
  std::vector<double> part(static_cast<size_t>(n * blocks * c));  // per item: sum_hw x per channel
  std::vector<float> maps(static_cast<size_t>(n * hw));            // sum_c x^2 per pixel
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(static_cast<size_t>(c));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n * blocks; ++item) {
      const int64_t s = item / blocks;
      const int64_t p0 = (item % blocks) * per_block;
      const int64_t p1 = std::min(hw, p0 + per_block);
      double* tot = part.data() + item * c;
      std::fill(tot, tot + c, 0.0);
      for (int64_t q0 = p0; q0 < p1; q0 += kPixelChunk) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t p = q0; p < std::min(p1, q0 + kPixelChunk); ++p) {
          maps[static_cast<size_t>(s * hw + p)] = accumulate_pixel(x + (s * hw + p) * c, c, acc.data());
        }
        for (int64_t ch = 0; ch < c; ++ch) tot[ch] += acc[static_cast<size_t>(ch)];
      }
    }
#pragma omp for schedule(static)
    for (int64_t sc = 0; sc < n * c; ++sc) {
      const int64_t s = sc / c;
      double sum = 0.0;
      for (int64_t b = 0; b < blocks; ++b) sum += part[static_cast<size_t>((s * blocks + b) * c + sc % c)];
      pooled[sc] = static_cast<float>(sum / static_cast<double>(hw));
    }
  }
  auto map_sum = [&](int64_t s, int64_t p) { return static_cast<double>(maps[static_cast<size_t>(s * hw + p)]); };
  normalise_maps(n, hw, static_cast<double>(c), map_sum, at, threads);
}

}  // namespace

void tap_targets_cpu(const void* x, bool is_half, bool nhwc, int64_t n, int64_t c, int64_t hw, float* at,
                     float* pooled, int threads) {
  threads = std::max(1, threads);
  if (n == 0) return;
  if (is_half) {
    const auto* p = static_cast<const uint16_t*>(x);
    nhwc ? tap_nhwc(p, n, c, hw, at, pooled, threads) : tap_nchw(p, n, c, hw, at, pooled, threads);
  } else {
    const auto* p = static_cast<const float*>(x);
    nhwc ? tap_nhwc(p, n, c, hw, at, pooled, threads) : tap_nchw(p, n, c, hw, at, pooled, threads);
  }
}

}  // namespace kdpipe
