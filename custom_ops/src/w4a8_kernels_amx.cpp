// AMX-INT8 GEMM tile for prefill (ISA "amx", M >= kAmxMinRows; fewer rows use
// the avx512vnni512 kernels).  A task (<= 256 rows x <= 8 panels of 16 columns)
// walks K in blocks of kKc: it unpacks the block's int4 weights once into int8
// AMX B tiles (w - zero point, so tdpbssd gives the contract's isum directly),
// then for each 32-row x 32-column block runs 2 x 2 tdpbssd tiles over the
// block's K steps, reading A tiles straight from the quantized activations q
// (row stride Kq, rows zero padded to a multiple of 32 by the driver).  At each
// group end the int32 tiles are stored and folded into Y, which serves as the
// float accumulator: y = fma(float(isum_g), scale_g, y) in group order, then
// y = fma(y, s_a, bias) -- the same float operations as the zmm kernels.
// Groups longer than kKc carry their int32 tiles in memory between K blocks.
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
constexpr int64_t kKc = 256;        // K elements per unpacked weight block
constexpr int64_t kMaxPanels = 8;   // panels per task (the driver's panel_block)
constexpr int64_t kTileInts = 256;  // 16 x 16 int32 per C tile

// Tiles 0-3: C (16 rows x 16 int32), 4-5: A (16 rows x kstep int8), 6-7: B (kstep/4 rows x 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// wbuf[panel][k / 4][16 columns x 4 bytes] = w - zp for k in [k0, k1) of panels [p0, p1).
FPTQ_TGT_AMX static void UnpackWeights(const TileArgs& a, int64_t p0, int64_t p1, int64_t k0, int64_t k1,
                                       int8_t* wbuf) {
  const int64_t G = a.G, ng = a.n_groups, panel_bytes = ng * G * 8;
  const __m512i m4 = _mm512_set1_epi8(0x0F), rep = _mm512_set1_epi32(0x01010101);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* src = a.B_packed + p * panel_bytes + (k0 / 8) * 64;
    int8_t* dst = wbuf + (p - p0) * kKc * 16;
    __m512i zpv = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 8, src += 64, dst += 128) {
      if (k == k0 || k % G == 0) {
        const uint8_t* z = a.qp->zp.data() + (p * ng + k / G) * kP;
        zpv = _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))), rep);
      }
      const __m512i v = _mm512_loadu_si512(src);
      _mm512_store_si512(dst, _mm512_sub_epi8(_mm512_and_si512(v, m4), zpv));
      _mm512_store_si512(dst + 64, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), zpv));
    }
  }
}

// Folds group g's int32 tiles (rows rb..rb+31, panels p, p+1) into Y.
FPTQ_TGT_AMX static void GroupEpilogue(const TileArgs& a, int64_t rb, int64_t r1, int64_t p, int64_t p1, int64_t g,
                                       int32_t* cbuf) {
  _tile_stored(0, cbuf + 0 * kTileInts, 64);
  _tile_stored(1, cbuf + 1 * kTileInts, 64);
  _tile_stored(2, cbuf + 2 * kTileInts, 64);
  _tile_stored(3, cbuf + 3 * kTileInts, 64);
  const bool first = g == 0, last = g == a.n_groups - 1;
  for (int j = 0; j < 2 && p + j < p1; ++j) {
    const int64_t n0 = (p + j) * kP, nn = std::min<int64_t>(kP, a.N - n0);
    const __m512 s = _mm512_loadu_ps(a.qp->scales.data() + ((p + j) * a.n_groups + g) * kP);
    alignas(64) float bias[kP] = {};
    if (last && a.bias) std::copy(a.bias + n0, a.bias + n0 + nn, bias);
    const __m512 vb = _mm512_load_ps(bias);
    for (int i = 0; i < 2; ++i) {
      const int32_t* c = cbuf + (2 * i + j) * kTileInts;  // tile 2i + j = A tile i x B tile j
      for (int rr = 0; rr < 16; ++rr) {
        const int64_t row = rb + 16 * i + rr;
        if (row >= r1) break;
        const __m512 isum = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * rr));
        float* y = a.Y + row * a.N + n0;
        alignas(64) float part[kP] = {};
        if (nn < kP && !first) std::copy(y, y + nn, part);
        __m512 acc = first ? _mm512_setzero_ps() : (nn == kP ? _mm512_loadu_ps(y) : _mm512_load_ps(part));
        acc = _mm512_fmadd_ps(isum, s, acc);
        if (last) acc = _mm512_fmadd_ps(acc, _mm512_set1_ps(a.sa[row]), vb);
        if (nn == kP) {
          _mm512_storeu_ps(y, acc);
        } else {
          _mm512_store_ps(part, acc);
          std::copy(part, part + nn, y);
        }
      }
    }
  }
}

FPTQ_TGT_AMX static void GemmTile(const TileArgs& a, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  const int64_t G = a.G, Kp = a.n_groups * G, Kq = a.Kq;
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

  alignas(64) int8_t wbuf[kMaxPanels * kKc * 16];  // 32 KiB
  alignas(64) int32_t cbuf[4 * kTileInts];
  if ((p1 - p0) % 2) std::memset(wbuf + (p1 - p0) * kKc * 16, 0, kKc * 16);  // pad panel of an odd count: w = 0
  const bool carry = G > kKc;
  std::vector<int32_t> carried(carry ? static_cast<size_t>(n_msub * n_pairs * 4 * kTileInts) : 0);

  for (int64_t k0 = 0; k0 < Kp; k0 += kKc) {
    const int64_t k1 = std::min(k0 + kKc, Kp);
    UnpackWeights(a, p0, p1, k0, k1, wbuf);
    for (int64_t ms = 0; ms < n_msub; ++ms) {
      const int64_t rb = r0 + 32 * ms;
      const int8_t* q0 = a.q + rb * Kq;
      const int8_t* q1 = q0 + 16 * Kq;
      for (int64_t pr = 0; pr < n_pairs; ++pr) {
        const int8_t* b0 = wbuf + 2 * pr * kKc * 16;
        const int8_t* b1 = b0 + kKc * 16;
        int32_t* cc = carry ? carried.data() + (ms * n_pairs + pr) * 4 * kTileInts : nullptr;
        if (k0 % G != 0) {  // inside a group that began in an earlier K block
          _tile_loadd(0, cc + 0 * kTileInts, 64);
          _tile_loadd(1, cc + 1 * kTileInts, 64);
          _tile_loadd(2, cc + 2 * kTileInts, 64);
          _tile_loadd(3, cc + 3 * kTileInts, 64);
        } else {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        }
        for (int64_t k = k0; k < k1; k += kstep) {
          _tile_loadd(4, q0 + k, Kq);
          _tile_loadd(5, q1 + k, Kq);
          _tile_loadd(6, b0 + (k - k0) * 16, 64);
          _tile_loadd(7, b1 + (k - k0) * 16, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
          if ((k + kstep) % G == 0) {
            GroupEpilogue(a, rb, r1, p0 + 2 * pr, p1, (k + kstep) / G - 1, cbuf);
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          }
        }
        if (k1 % G != 0) {
          _tile_stored(0, cc + 0 * kTileInts, 64);
          _tile_stored(1, cc + 1 * kTileInts, 64);
          _tile_stored(2, cc + 2 * kTileInts, 64);
          _tile_stored(3, cc + 3 * kTileInts, 64);
        }
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
