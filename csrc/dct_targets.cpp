// dct_targets: DCT-driven AT targets (López-Cifuentes et al. 2022) of small maps (N,H,W).
//
// Maps are small (8x8 .. 64x64), so the 2-D transforms are done as two dense matrix products
// rather than FFTs: Re FFT2(A) = C_h A C_w^T - S_h A S_w^T (cos/sin matrices), DCT-II = M_h A M_w^T.
// Everything runs in float64; only the normalised target is rounded to float32.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kdpipe_native.h"

namespace kdpipe {
namespace {

struct Basis {
  std::vector<double> cos_m;  // (n, n) row k: cos(2 pi k i / n), or the orthonormal DCT-II matrix
  std::vector<double> sin_m;  // (n, n) row k: sin(2 pi k i / n); empty for DCT-II
};

Basis make_basis(int64_t n, DctVariant variant) {
  const double pi = std::acos(-1.0);
  Basis b;
  b.cos_m.resize(static_cast<size_t>(n * n));
  if (variant == DctVariant::Dct2) {
    for (int64_t k = 0; k < n; ++k) {
      const double scale = std::sqrt((k == 0 ? 1.0 : 2.0) / static_cast<double>(n));
      for (int64_t i = 0; i < n; ++i)
        b.cos_m[k * n + i] = scale * std::cos(pi * static_cast<double>((2 * i + 1) * k) / (2.0 * n));
    }
    return b;
  }
  b.sin_m.resize(static_cast<size_t>(n * n));
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      // (k*i mod n) keeps the angle in [0, 2 pi) so large k*i loses no precision.
      const double angle = 2.0 * pi * static_cast<double>((k * i) % n) / static_cast<double>(n);
      b.cos_m[k * n + i] = std::cos(angle);
      b.sin_m[k * n + i] = std::sin(angle);
    }
  }
  return b;
}

Basis transposed(Basis b, int64_t n) {
  for (auto* m : {&b.cos_m, &b.sin_m}) {
    if (m->empty()) continue;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i + 1; j < n; ++j) std::swap((*m)[i * n + j], (*m)[j * n + i]);
  }
  return b;
}

// t (h, w) = m (h, h) @ a (h, w)
void left_multiply(const double* m, const double* a, int64_t h, int64_t w, double* t) {
  std::fill(t, t + h * w, 0.0);
  for (int64_t k = 0; k < h; ++k) {
    double* row = t + k * w;
    for (int64_t i = 0; i < h; ++i) {
      const double mk = m[k * h + i];
      const double* arow = a + i * w;
      for (int64_t j = 0; j < w; ++j) row[j] += mk * arow[j];
    }
  }
}

}  // namespace

bool parse_dct_variant(const char* name, DctVariant* out) {
  if (std::strcmp(name, "dft-abs") == 0) {
    *out = DctVariant::DftAbs;
  } else if (std::strcmp(name, "dft") == 0) {
    *out = DctVariant::Dft;
  } else if (std::strcmp(name, "dct2") == 0) {
    *out = DctVariant::Dct2;
  } else {
    return false;
  }
  return true;
}

void dct_targets_cpu(const float* maps, int64_t n, int64_t h, int64_t w, DctVariant variant, float* out,
                     int threads) {
  if (n == 0) return;
  const Basis bh = make_basis(h, variant);
  const Basis bw_t = transposed(make_basis(w, variant), w);
  const bool dft = variant != DctVariant::Dct2;
  const int64_t hw = h * w;
#pragma omp parallel num_threads(std::max(1, threads))
  {
    std::vector<double> a0(static_cast<size_t>(hw)), tc(static_cast<size_t>(hw)), ts(static_cast<size_t>(hw));
    std::vector<double> r(static_cast<size_t>(hw));
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      const float* a = maps + s * hw;
      double mean = 0.0;
      for (int64_t p = 0; p < hw; ++p) mean += a[p];
      mean /= static_cast<double>(hw);
      for (int64_t p = 0; p < hw; ++p) a0[p] = static_cast<double>(a[p]) - mean;
      left_multiply(bh.cos_m.data(), a0.data(), h, w, tc.data());
      if (dft) left_multiply(bh.sin_m.data(), a0.data(), h, w, ts.data());
      // r = tc Cw^T (- ts Sw^T), as row updates r[k, :] += tc[k, j] * Cw^T[j, :] so the inner loop vectorises
      std::fill(r.begin(), r.end(), 0.0);
      for (int64_t k = 0; k < h; ++k) {
        double* rk = r.data() + k * w;
        for (int64_t j = 0; j < w; ++j) {
          const double c = tc[k * w + j];
          const double* cwt = bw_t.cos_m.data() + j * w;
          for (int64_t l = 0; l < w; ++l) rk[l] += c * cwt[l];
          if (dft) {
            const double sn = ts[k * w + j];
            const double* swt = bw_t.sin_m.data() + j * w;
            for (int64_t l = 0; l < w; ++l) rk[l] -= sn * swt[l];
          }
        }
        if (variant == DctVariant::DftAbs)
          for (int64_t l = 0; l < w; ++l) rk[l] = std::fabs(rk[l]);
      }
      const auto [lo_it, hi_it] = std::minmax_element(r.begin(), r.end());
      const double lo = *lo_it;
      const double den = variant == DctVariant::DftAbs ? *hi_it : *hi_it - lo;
      float* o = out + s * hw;
      if (std::fabs(den) > kDctEps) {
        for (int64_t p = 0; p < hw; ++p) o[p] = static_cast<float>((r[p] - lo) / den);
      } else {
        std::fill(o, o + hw, 0.0f);  // a constant map: no structure to normalise, never NaN
      }
    }
  }
}

}  // namespace kdpipe
