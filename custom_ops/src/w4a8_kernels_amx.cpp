// AMX-INT8 GEMM tile for prefill (ISA "amx", M >= kAmxMinRows; fewer rows use
// the avx512vnni512 kernels).  A task (<= 256 rows x a few panels of 16 columns,
// sized by the driver so that its unpacked weights stay in L2) unpacks its int4
// weights once, for all K, into int8 AMX B tiles (w - zero point, so tdpbssd
// gives the contract's isum directly).  The driver lays the quantized
// activations out once per call in A-tile order (rows zero padded to a multiple
// of 32; each 16 x 64 tile contiguous).  Per 32-row block, per K chunk of whole
// groups (its A tiles kept in L1 for all column pairs), per 32-column pair it
// runs 2 x 2 tdpbssd tiles along the chunk, the C tiles staying in registers
// within a group.  At each group end
// the int32 tiles are stored and folded into the block's float accumulators:
// acc = fma(float(isum_g), scale_g, acc) in group order, then y = fma(acc, s_a,
// bias) -- the same float operations as the zmm kernels.
// Linux requires a per-process permission for the tile data state
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it the ISA is
// reported unsupported and the driver uses the next one.
#include "w4a8_cpu.h"

#if defined(FPTQ_HAVE_AMX)

#include <immintrin.h>

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* (GCC PR 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstring>
#include <vector>

#define FPTQ_TGT_AMX __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni,amx-tile,amx-int8")))

namespace fptq {
namespace cpu {
namespace detail {

bool AmxGranted() {
#if defined(__linux__)
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

namespace amx {

constexpr int kP = kPanelZmm;
constexpr int64_t kTileInts = 256;  // 16 x 16 int32 per C tile

// Tiles 0-3: C (16 rows x 16 int32), 4-5: A (16 rows x kstep int8), 6-7: B (kstep/4 rows x 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

template <typename T>
static T* Align64(std::vector<T>* v, size_t n) {
  if (v->size() < n + 64) v->resize(n + 64);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v->data()) + 63) & ~uintptr_t{63});
}

// wbuf[panel][k / 4][16 columns x 4 bytes] = w - zp, all K, panels [p0, p1).
FPTQ_TGT_AMX static void UnpackWeights(const TileArgs& a, int64_t p0, int64_t p1, int8_t* wbuf) {
  const int64_t G = a.G, ng = a.n_groups, Kp = ng * G, panel_bytes = Kp * 8;
  const __m512i m4 = _mm512_set1_epi8(0x0F), rep = _mm512_set1_epi32(0x01010101);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* src = a.B_packed + p * panel_bytes;
    int8_t* dst = wbuf + (p - p0) * Kp * 16;
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* z = a.qp->zp.data() + (p * ng + g) * kP;
      const __m512i zpv =
          _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))), rep);
      for (int64_t t = 0; t < G / 8; ++t, src += 64, dst += 128) {
        const __m512i v = _mm512_loadu_si512(src);
        _mm512_store_si512(dst, _mm512_sub_epi8(_mm512_and_si512(v, m4), zpv));
        _mm512_store_si512(dst + 64, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), zpv));
      }
    }
  }
}

// Stores the C tiles to cbuf and zeroes them for the next group.
FPTQ_TGT_AMX static inline void StoreAndZeroC(int32_t* cbuf) {
  _tile_stored(0, cbuf + 0 * kTileInts, 64);
  _tile_stored(1, cbuf + 1 * kTileInts, 64);
  _tile_stored(2, cbuf + 2 * kTileInts, 64);
  _tile_stored(3, cbuf + 3 * kTileInts, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Writes y = fma(acc, s_a, bias) for one row of one 16-column panel (the last may be partial).
FPTQ_TGT_AMX static inline void StoreRow(const TileArgs& a, int64_t row, int64_t n0, __m512 acc, __m512 bias) {
  const int64_t nn = std::min<int64_t>(kP, a.N - n0);
  acc = _mm512_fmadd_ps(acc, _mm512_set1_ps(a.sa[row]), bias);
  float* y = a.Y + row * a.N + n0;
  if (nn == kP) {
    _mm512_storeu_ps(y, acc);
  } else {  // partial panel: no store past the end of the row
    alignas(64) float part[kP];
    _mm512_store_ps(part, acc);
    std::copy(part, part + nn, y);
  }
}

// Folds group g's int32 sums cbuf (rows rb..rb+31, panels p, p+1) into the float
// accumulators facc[32 rows][row stride fs] (panel p's 16 columns, then p+1's; a
// pad panel p+1 >= p1 has zero sums and is never stored); after the last group
// writes Y.
FPTQ_TGT_AMX static void FoldGroup(const TileArgs& a, int64_t rb, int64_t r1, int64_t p, int64_t p1, int64_t g,
                                   const int32_t* cbuf, float* facc, int64_t fs) {
  const bool first = g == 0, last = g == a.n_groups - 1, has1 = p + 1 < p1;
  const float* sc = a.qp->scales.data() + (p * a.n_groups + g) * kP;
  const __m512 s0 = _mm512_loadu_ps(sc);
  const __m512 s1 = has1 ? _mm512_loadu_ps(sc + a.n_groups * kP) : _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  const int64_t rows = std::min<int64_t>(32, r1 - rb);
  for (int i = 0; i < 2 && 16 * i < rows; ++i) {
    const int32_t* c0 = cbuf + (2 * i) * kTileInts;  // tile 2i + j = A tile i x B tile j
    const int32_t* c1 = c0 + kTileInts;
    float* f = facc + 16 * i * fs;
    const int64_t n = std::min<int64_t>(16, rows - 16 * i);
    if (!last) {
      for (int64_t r = 0; r < n; ++r, c0 += 16, c1 += 16, f += fs) {
        const __m512 a0 = first ? zero : _mm512_load_ps(f), a1 = first ? zero : _mm512_load_ps(f + 16);
        _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c0)), s0, a0));
        _mm512_store_ps(f + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c1)), s1, a1));
      }
      continue;
    }
    alignas(64) float bias[2][kP] = {};
    for (int j = 0; j < (has1 ? 2 : 1) && a.bias; ++j) {
      const int64_t n0 = (p + j) * kP;
      std::copy(a.bias + n0, a.bias + n0 + std::min<int64_t>(kP, a.N - n0), bias[j]);
    }
    const __m512 b0 = _mm512_load_ps(bias[0]), b1 = _mm512_load_ps(bias[1]);
    for (int64_t r = 0; r < n; ++r, c0 += 16, c1 += 16, f += fs) {
      const int64_t row = rb + 16 * i + r;
      const __m512 a0 = first ? zero : _mm512_load_ps(f);
      StoreRow(a, row, p * kP, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c0)), s0, a0), b0);
      if (has1) {
        const __m512 a1 = first ? zero : _mm512_load_ps(f + 16);
        StoreRow(a, row, (p + 1) * kP, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c1)), s1, a1), b1);
      }
    }
  }
}

FPTQ_TGT_AMX static void GemmTile(const TileArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  const int64_t G = a.G, Kp = a.n_groups * G;
  const int64_t kstep = std::min<int64_t>(G, 64);
  const int64_t n_pairs = (p1 - p0 + 1) / 2, n_msub = (r1 - r0 + 31) / 32;

  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  for (int t = 4; t < 6; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = static_cast<uint16_t>(kstep);
  }
  for (int t = 6; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(kstep / 4);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);

  // The task's weights unpacked once for all K (per-thread scratch, reused by
  // later tasks; L2 sized by the driver's panel block), then per 32-row block and
  // per K chunk of whole groups (kc >= 256) its A tiles (L1), used by every
  // column pair; float accumulators of the 32-row block in L1.
  const int64_t kc = std::max<int64_t>(256, G), n_cols = 2 * n_pairs * kP;
  thread_local std::vector<int8_t> w_store;
  thread_local std::vector<float> f_store;
  int8_t* wbuf = Align64(&w_store, static_cast<size_t>(2 * n_pairs * Kp * 16));
  float* facc = Align64(&f_store, static_cast<size_t>(32 * n_cols));
  UnpackWeights(a, p0, p1, wbuf);
  if ((p1 - p0) % 2) std::memset(wbuf + (p1 - p0) * Kp * 16, 0, static_cast<size_t>(Kp * 16));  // pad panel: w = 0
  alignas(64) int32_t cbuf[2 * 4 * kTileInts];  // two groups' sums (double buffer)

  for (int64_t ms = 0; ms < n_msub; ++ms) {
    const int64_t rb = r0 + 32 * ms;
    const int8_t* qt = a.q_tiles + rb * a.Kq;  // the block's A tiles, [Kq / 64][32 rows][64]
    for (int64_t k0 = 0; k0 < Kp; k0 += kc) {
      const int64_t k1 = std::min(k0 + kc, Kp);
      for (int64_t pr = 0; pr < n_pairs; ++pr) {
        const int8_t* b0 = wbuf + 2 * pr * Kp * 16;
        const int8_t* b1 = b0 + Kp * 16;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        // A group's sums are folded into facc only after the next group's first
        // tdpbssd are issued, so the vector work overlaps the tile unit's.
        int64_t pending = -1;  // group whose sums wait in cbuf[pending % 2]
        const int64_t p = p0 + 2 * pr;
        float* fp = facc + 2 * pr * kP;
        for (int64_t k = k0; k < k1; k += kstep) {
          if (k % G == 0) {  // the group's scales, read by its fold (they fall out of L1 between row blocks)
            const float* sc = a.qp->scales.data() + (p * a.n_groups + k / G) * kP;
            _mm_prefetch(reinterpret_cast<const char*>(sc), _MM_HINT_T0);
            if (p + 1 < p1) _mm_prefetch(reinterpret_cast<const char*>(sc + a.n_groups * kP), _MM_HINT_T0);
          }
          const int8_t* at = qt + (k / 64) * 2048 + k % 64;  // kstep divides 64
          _tile_loadd(4, at, 64);
          _tile_loadd(5, at + 1024, 64);
          _tile_loadd(6, b0 + k * 16, 64);
          _tile_loadd(7, b1 + k * 16, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
          if (pending >= 0) {
            FoldGroup(a, rb, r1, p, p1, pending, cbuf + (pending % 2) * 4 * kTileInts, fp, n_cols);
            pending = -1;
          }
          if ((k + kstep) % G == 0) {
            pending = (k + kstep) / G - 1;
            StoreAndZeroC(cbuf + (pending % 2) * 4 * kTileInts);
          }
        }
        if (pending >= 0) FoldGroup(a, rb, r1, p, p1, pending, cbuf + (pending % 2) * 4 * kTileInts, fp, n_cols);
      }
    }
  }
  _tile_release();
}

}  // namespace amx

IsaKernels AmxKernels() {
  IsaKernels k = Avx512Vnni512Kernels();
  k.gemm = amx::GemmTile;
  return k;
}

}  // namespace detail
}  // namespace cpu
}  // namespace fptq

#endif  // FPTQ_HAVE_AMX
