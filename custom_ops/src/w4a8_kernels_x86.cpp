// x86 SIMD variants of the W4A8 kernels (AVX2, AVX-VNNI, AVX512-VNNI).
// Each variant is the same code (w4a8_kernels_x86.inc) compiled with a
// per-function target attribute; the driver picks one at run time.
#include "w4a8_cpu.h"

#if defined(FPTQ_HAVE_X86_KERNELS)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

// ---- AVX2 + FMA: u8 x s8 -> s16 pairs (maddubs; 2*15*128 fits), s16 sums -> s32 (madd).
#define FPTQ_NS avx2
#define FPTQ_TGT __attribute__((target("avx2,fma")))
#define FPTQ_VNNI 0
#include "w4a8_kernels_x86.inc"
#undef FPTQ_NS
#undef FPTQ_TGT
#undef FPTQ_VNNI
#undef FPTQ_DPBUSD

#if defined(FPTQ_HAVE_AVXVNNI)
// ---- AVX-VNNI (VEX vpdpbusd): u8 x s8, 4 products summed into each s32 lane.
#define FPTQ_NS avxvnni
#define FPTQ_TGT __attribute__((target("avx2,fma,avxvnni")))
#define FPTQ_VNNI 1
#define FPTQ_DPBUSD(acc, u8, s8) _mm256_dpbusd_avx_epi32((acc), (u8), (s8))
#include "w4a8_kernels_x86.inc"
#undef FPTQ_NS
#undef FPTQ_TGT
#undef FPTQ_VNNI
#undef FPTQ_DPBUSD
#endif

// ---- AVX512-VNNI with AVX512VL (EVEX vpdpbusd on 256-bit registers).
#define FPTQ_NS avx512vnni
#define FPTQ_TGT __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))
#define FPTQ_VNNI 1
#define FPTQ_DPBUSD(acc, u8, s8) _mm256_dpbusd_epi32((acc), (u8), (s8))
#include "w4a8_kernels_x86.inc"
#undef FPTQ_NS
#undef FPTQ_TGT
#undef FPTQ_VNNI
#undef FPTQ_DPBUSD

namespace fptq {
namespace cpu {
namespace detail {

IsaKernels Avx2Kernels() { return IsaKernels{avx2::QuantizeRows, avx2::Tile, true, kPanel, nullptr}; }
#if defined(FPTQ_HAVE_AVXVNNI)
IsaKernels AvxVnniKernels() { return IsaKernels{avxvnni::QuantizeRows, avxvnni::Tile, true, kPanel, nullptr}; }
#endif
IsaKernels Avx512VnniKernels() { return IsaKernels{avx512vnni::QuantizeRows, avx512vnni::Tile, true, kPanel, nullptr}; }

}  // namespace detail
}  // namespace cpu
}  // namespace fptq

#endif  // FPTQ_HAVE_X86_KERNELS
