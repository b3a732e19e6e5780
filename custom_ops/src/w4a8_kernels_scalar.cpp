// Portable scalar kernels: activation quantization and the int8 x int4 tile.
// They are the fallback on non-x86 / pre-AVX2 CPUs (FPTQ_OPS_ISA=scalar forces
// them) and read B in the contract layout directly (no re-layout).
#include <algorithm>
#include <cmath>

#include "w4a8_cpu.h"

namespace fptq {
namespace cpu {
namespace detail {
namespace {

// Quantize one value; clamping before the conversion also maps NaN to lo.
inline int32_t QuantizeOne(float x, float s, float lo, float hi) {
  float v = std::nearbyint(x / s);  // round half to even (default rounding mode)
  v = std::fmin(std::fmax(v, lo), hi);
  return static_cast<int32_t>(v);
}

void QuantizeRowsScalar(const QuantArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.A + r * a.K;
    float s = a.act_scale, lo = -128.0f, hi = 127.0f;
    if (a.per_token) {
      float m = 0.0f;
      for (int64_t k = 0; k < a.K; ++k) m = std::max(m, std::fabs(x[k]));
      s = m == 0.0f ? 1.0f : m / 127.0f;
      lo = -127.0f;
    }
    a.sa[r] = s;
    int8_t* q = a.q + r * a.Kq;
    int32_t* qsum = a.qsum + r * a.qsum_stride;
    std::fill(qsum, qsum + a.qsum_stride, 0);
    for (int64_t k0 = 0; k0 < a.Kq; k0 += 64) {
      int32_t t[64];
      for (int i = 0; i < 64; ++i) {
        const int64_t k = k0 + i;
        t[i] = k < a.K ? QuantizeOne(x[k], s, lo, hi) : 0;
        qsum[k / a.G] += t[i];
      }
      for (int i = 0; i < 64; ++i) q[k0 + i] = static_cast<int8_t>(t[i]);
    }
  }
}

void TileScalar(const TileArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  const int64_t half_g = a.G / 2;
  const int64_t row_bytes = a.n_groups * half_g;
  for (int64_t p = p0; p < p1; ++p) {
    const float* sc = a.qp->scales.data() + p * a.n_groups * kPanel;
    const uint8_t* zp = a.qp->zp.data() + p * a.n_groups * kPanel;
    const int64_t n_end = std::min<int64_t>((p + 1) * kPanel, a.N);
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* q = a.q + r * a.Kq;
      const int32_t* qsum = a.qsum + r * a.qsum_stride;
      for (int64_t n = p * kPanel; n < n_end; ++n) {
        const int64_t c = n - p * kPanel;
        const uint8_t* w = a.B + n * row_bytes;
        float acc = 0.0f;
        for (int64_t g = 0; g < a.n_groups; ++g) {
          const uint8_t* wg = w + g * half_g;
          const int8_t* qg = q + g * a.G;
          int32_t s = 0;
          for (int64_t j = 0; j < half_g; ++j) {
            s += qg[2 * j] * static_cast<int32_t>(wg[j] & 0x0F) + qg[2 * j + 1] * static_cast<int32_t>(wg[j] >> 4);
          }
          const int32_t isum = s - static_cast<int32_t>(zp[g * kPanel + c]) * qsum[g];
          acc += sc[g * kPanel + c] * static_cast<float>(isum);
        }
        a.Y[r * a.N + n] = acc * a.sa[r] + (a.bias ? a.bias[n] : 0.0f);
      }
    }
  }
}

}  // namespace

IsaKernels ScalarKernels() { return IsaKernels{QuantizeRowsScalar, TileScalar, false, kPanel, nullptr}; }

}  // namespace detail
}  // namespace cpu
}  // namespace fptq
