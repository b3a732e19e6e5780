// 512-bit AVX-512 VNNI kernels (ISA "avx512vnni512"): zmm vpdpbusd over
// 16-column panels (PackWeightsPanels with P = 16: one 64-byte load = 16 columns
// x 8 k-elements), so every instruction does twice the columns of the 256-bit
// variants.  The layout needs no shuffles to unpack: the low nibbles of a block
// are already 16 columns x 4 consecutive k (vpdpbusd's operand order) and the
// high nibbles the next 4, so unpacking is one AND and one shift + AND.
// Decode (M <= 2) streams 4 panels at once with software prefetch (memory bound);
// more rows reuse each unpacked block for up to 6 rows.  Activation quantization
// is the avx512vnni one (w4a8_kernels_x86.inc).  The functions carry the target
// attribute, so nothing here runs on CPUs without AVX-512.
#include "w4a8_cpu.h"

#if defined(FPTQ_HAVE_X86_KERNELS)

#include <immintrin.h>

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* (GCC PR 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>

#define FPTQ_TGT512 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

namespace fptq {
namespace cpu {
namespace detail {
namespace zmm {

constexpr int kP = kPanelZmm;
// Bytes ahead of the current weight load to prefetch (a group of 128 of one panel is 1 KiB).
constexpr int64_t kPrefetchAhead = 1024;

FPTQ_TGT512 static inline __m512i Broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// y = s_a * facc + bias for one row and one 16-column panel (the last one may be partial).
FPTQ_TGT512 static inline void StorePanel(const TileArgs& a, int64_t row, int64_t p, __m512 facc) {
  const int64_t n0 = p * kP;
  const int64_t nn = std::min<int64_t>(kP, a.N - n0);
  float* out = a.Y + row * a.N + n0;
  if (nn == kP) {
    const __m512 bias = a.bias ? _mm512_loadu_ps(a.bias + n0) : _mm512_setzero_ps();
    _mm512_storeu_ps(out, _mm512_fmadd_ps(facc, _mm512_set1_ps(a.sa[row]), bias));
    return;
  }
  alignas(64) float buf[kP] = {};  // partial panel: no access past the end of bias / Y
  if (a.bias) std::copy(a.bias + n0, a.bias + n0 + nn, buf);
  _mm512_store_ps(buf, _mm512_fmadd_ps(facc, _mm512_set1_ps(a.sa[row]), _mm512_load_ps(buf)));
  std::copy(buf, buf + nn, out);
}

// R rows x P panels starting at row r0, panel p: per group, integer dots of the
// 16 columns of each panel (lane c = column c), zero-point correction with the
// row's group sum of q, then facc += scale * isum.
template <int R, int P>
FPTQ_TGT512 static void TileRows(const TileArgs& a, int64_t r0, int64_t p) {
  const int64_t G = a.G, ng = a.n_groups;
  const int64_t panel_bytes = ng * G * 8;  // ng * G/8 blocks of 64 bytes
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const uint8_t* wp[P];
  const float* sc[P];
  const uint8_t* zp[P];
  for (int i = 0; i < P; ++i) {
    wp[i] = a.B_packed + (p + i) * panel_bytes;
    sc[i] = a.qp->scales.data() + (p + i) * ng * kP;
    zp[i] = a.qp->zp.data() + (p + i) * ng * kP;
  }
  const int8_t* qr[R];
  const int32_t* qs[R];
  for (int r = 0; r < R; ++r) {
    qr[r] = a.q + (r0 + r) * a.Kq;
    qs[r] = a.qsum + (r0 + r) * a.qsum_stride;
  }
  __m512 facc[P][R];
  for (int i = 0; i < P; ++i)
    for (int r = 0; r < R; ++r) facc[i][r] = _mm512_setzero_ps();

  // Split low/high accumulators (two vpdpbusd chains) while registers allow.
  constexpr bool kSplit = R * P <= 4;
  for (int64_t g = 0; g < ng; ++g) {
    __m512i acc[P][R], acc_hi[P][kSplit ? R : 1];
    for (int i = 0; i < P; ++i)
      for (int r = 0; r < R; ++r) {
        acc[i][r] = _mm512_setzero_si512();
        if constexpr (kSplit) acc_hi[i][r] = _mm512_setzero_si512();
      }
    const uint8_t* wg[P];
    for (int i = 0; i < P; ++i) wg[i] = wp[i] + g * G * 8;
    const int64_t blocks = GroupBlocks(a, g);
    for (int64_t t = 0; t < blocks; ++t) {
      __m512i lo[P], hi[P];
      for (int i = 0; i < P; ++i) {
        const uint8_t* src = wg[i] + 64 * t;
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchAhead), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(src);
        lo[i] = _mm512_and_si512(v, m4);
        hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* qk = qr[r] + g * G + 8 * t;
        const __m512i ql = Broadcast4(qk), qh = Broadcast4(qk + 4);
        for (int i = 0; i < P; ++i) {
          if constexpr (kSplit) {
            acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], lo[i], ql);
            acc_hi[i][r] = _mm512_dpbusd_epi32(acc_hi[i][r], hi[i], qh);
          } else {
            acc[i][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[i][r], lo[i], ql), hi[i], qh);
          }
        }
      }
    }
    for (int i = 0; i < P; ++i) {
      const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp[i] + g * kP)));
      const __m512 s = _mm512_loadu_ps(sc[i] + g * kP);
      for (int r = 0; r < R; ++r) {
        __m512i isum = acc[i][r];
        if constexpr (kSplit) isum = _mm512_add_epi32(isum, acc_hi[i][r]);
        isum = _mm512_sub_epi32(isum, _mm512_mullo_epi32(z, _mm512_set1_epi32(qs[r][g])));
        facc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, facc[i][r]);
      }
    }
  }
  for (int i = 0; i < P; ++i)
    for (int r = 0; r < R; ++r) StorePanel(a, r0 + r, p + i, facc[i][r]);
}

// Rows [r, r + n) (n <= 6) of one (P = 1) or two (P = 2) panels.
template <int P>
FPTQ_TGT512 static void RowsUpTo6(const TileArgs& a, int64_t r, int64_t n, int64_t p) {
  switch (n) {
    case 1: TileRows<1, P>(a, r, p); break;
    case 2: TileRows<2, P>(a, r, p); break;
    case 3: TileRows<3, P>(a, r, p); break;
    case 4: TileRows<4, P>(a, r, p); break;
    case 5: TileRows<5, P>(a, r, p); break;
    case 6: TileRows<6, P>(a, r, p); break;
    default: break;
  }
}

FPTQ_TGT512 static void Tile(const TileArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  if (r1 - r0 <= 2) {  // decode: 4 weight streams at once
    const bool two = r1 - r0 == 2;
    int64_t p = p0;
    for (; p + 4 <= p1; p += 4) {
      if (two) TileRows<2, 4>(a, r0, p); else TileRows<1, 4>(a, r0, p);
    }
    for (; p < p1; ++p) {
      if (two) TileRows<2, 1>(a, r0, p); else TileRows<1, 1>(a, r0, p);
    }
    return;
  }
  for (int64_t p = p0; p < p1; p += 2) {
    const bool pair = p + 1 < p1;
    for (int64_t r = r0; r < r1; r += 6) {
      const int64_t n = std::min<int64_t>(6, r1 - r);
      if (pair) RowsUpTo6<2>(a, r, n, p); else RowsUpTo6<1>(a, r, n, p);
    }
  }
}

}  // namespace zmm

IsaKernels Avx512Vnni512Kernels() {
  return IsaKernels{Avx512VnniKernels().quantize, zmm::Tile, true, kPanelZmm, nullptr};
}

}  // namespace detail
}  // namespace cpu
}  // namespace fptq

#endif  // FPTQ_HAVE_X86_KERNELS
