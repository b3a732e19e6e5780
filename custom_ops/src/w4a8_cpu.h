// CPU implementation of W4A8MatMul (see include/fptq/w4a8_contract.h).
// Independent of ONNX Runtime: the ORT glue (ort_w4a8_op.cpp) validates
// inputs and hands raw pointers plus a parallel-for callback to W4A8Compute.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fptq/w4a8_contract.h"

namespace fptq {
namespace cpu {

// avx512vnni: EVEX vpdpbusd on 256-bit registers (8-column panels);
// avx512vnni512: zmm vpdpbusd on 16-column panels;
// amx: AMX-INT8 tiles (tdpbssd) for M >= kAmxMinRows, the avx512vnni512 kernels below.
enum class Isa : int { kScalar = 0, kAvx2, kAvxVnni, kAvx512Vnni, kAvx512Vnni512, kAmx };
constexpr Isa kAllIsas[] = {Isa::kScalar,     Isa::kAvx2,           Isa::kAvxVnni,
                            Isa::kAvx512Vnni, Isa::kAvx512Vnni512, Isa::kAmx};

const char* IsaName(Isa isa);
// Compiled in and supported by this CPU/OS (amx: also granted by the kernel,
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), requested on the first query).
bool IsaSupported(Isa isa);
// Best supported ISA; env FPTQ_OPS_ISA=<IsaName> forces one (if the forced one
// is unsupported, the best supported one is used).
Isa SelectIsa();

// Columns are processed in panels of PanelWidth(isa) (8, or 16 for the 512-bit
// kernels); scales and zero points are re-laid out once per weight as
// [n_panels][n_groups][panel] (pad columns: 0).
constexpr int kPanel = 8;
constexpr int kPanelZmm = 16;
int PanelWidth(Isa isa);

// The amx ISA runs its tile kernel from this many rows on (fewer rows: zmm kernels).
constexpr int64_t kAmxMinRows = 16;
// Name of the kernel that W4A8Compute(isa, ...) runs for M rows (for benchmarks).
const char* KernelPath(Isa isa, int64_t M);

struct PackedQParams {
  int64_t panel = kPanel;
  int64_t n_panels = 0;
  int64_t n_groups = 0;
  std::vector<float> scales;
  std::vector<uint8_t> zp;
};

// Weights re-laid out for the SIMD kernels, once per weight: per panel of P =
// PanelWidth(isa) columns, per group, per block of 8 k-elements, 4P bytes: bytes
// 4c..4c+3 hold column c's elements k..k+3 (low nibbles) and k+4..k+7 (high
// nibbles).  So one 4P-byte load gives P columns x 4 elements (low) and the next
// 4 (high), and a 4-byte activation broadcast dots all P columns at once (no
// horizontal sums).  The low / high nibbles of a 64-byte block (P = 16) are also
// exactly two rows of an AMX B tile (K/4 rows of 16 columns x 4 bytes).
// Pad columns are 0.  Size: n_panels * n_groups * G/2 * P bytes.
void PackWeightsPanels(Isa isa, const W4A8Attrs& attrs, const uint8_t* B, std::vector<uint8_t>* out);

// scales: [N, n_groups]; zero_points: [N, n_groups] or nullptr (all 8).
// Returns "" or an error message (zero point out of 0..15).
std::string PackQParams(Isa isa, const W4A8Attrs& attrs, const float* scales, const uint8_t* zero_points,
                        PackedQParams* out);

// Parallel-for supplied by the caller (ORT's intra-op pool); fn(data, i) for
// i in [0, total), any order, possibly concurrently.  run == nullptr: serial.
struct Parallel {
  void (*run)(void* runner, void (*fn)(void*, size_t), size_t total, void* data) = nullptr;
  void* runner = nullptr;
  void For(void (*fn)(void*, size_t), size_t total, void* data) const;
};

struct W4A8Problem {
  W4A8Attrs attrs;
  int64_t M = 0;
  const float* A = nullptr;       // [M, K]
  const uint8_t* B = nullptr;     // [N, n_groups, G/2]
  const uint8_t* B_packed = nullptr;  // PackWeightsPanels(isa, B), or nullptr (packed per call if needed)
  const PackedQParams* qp = nullptr;
  float act_scale = 1.0f;         // used when act_mode == static
  const float* bias = nullptr;    // [N] or nullptr
  float* Y = nullptr;             // [M, N]
};

void W4A8Compute(Isa isa, const W4A8Problem& problem, const Parallel& parallel);

// ---- internal interface between the driver and the per-ISA kernels ----
namespace detail {

struct QuantArgs {
  const float* A;
  int64_t K, Kq, G;         // Kq: padded row length of q (n_groups * G rounded up to 64), zero filled
  int64_t qsum_stride;
  bool per_token;
  float act_scale;
  int8_t* q;                // [M, Kq]
  int32_t* qsum;            // [M, qsum_stride]
  float* sa;                // [M]
};

struct TileArgs {
  int64_t K, N, G, n_groups, Kq, qsum_stride;
  const uint8_t* B;         // contract layout (scalar tile)
  const uint8_t* B_packed;  // PackWeightsPanels layout (SIMD tiles)
  const PackedQParams* qp;
  const int8_t* q;
  const int32_t* qsum;
  const float* sa;
  const float* bias;
  float* Y;
  // gemm only: q in AMX A-tile order, [q rows / 32][Kq / 64][32 rows][64 bytes]
  // (each 16 x 64 tile contiguous), laid out once per call by the driver.
  const int8_t* q_tiles;
};

// Blocks of 8 k-elements of group g that hold weights: G/8, fewer for a ragged last
// group (K = 576, G = 128: 8 of its 16).  The rest are padding (zero activations),
// so the SIMD tiles skip them: 10% of the work and of a decode step's weight reads there.
inline int64_t GroupBlocks(const TileArgs& a, int64_t g) {
  return g + 1 < a.n_groups ? a.G / 8 : (a.K - g * a.G + 7) / 8;
}

using QuantizeRowsFn = void (*)(const QuantArgs&, int64_t r0, int64_t r1);
// Rows [r0, r1) x panels [p0, p1).
using TileFn = void (*)(const TileArgs&, int64_t r0, int64_t r1, int64_t p0, int64_t p1);

struct IsaKernels {
  QuantizeRowsFn quantize;
  TileFn tile;
  bool needs_packed_b;     // tile reads TileArgs::B_packed
  int panel;               // PanelWidth of the packed layouts it reads
  // Optional cache-blocked GEMM tile for M >= kAmxMinRows (AMX): called with row
  // blocks starting at multiples of 32, reads TileArgs::q_tiles (q zero padded to a
  // multiple of 32 rows).
  TileFn gemm;
};

IsaKernels ScalarKernels();
bool NeedsPackedWeights(Isa isa);
#if defined(FPTQ_HAVE_X86_KERNELS)
IsaKernels Avx2Kernels();
IsaKernels AvxVnniKernels();     // valid only if FPTQ_HAVE_AVXVNNI
IsaKernels Avx512VnniKernels();
IsaKernels Avx512Vnni512Kernels();  // w4a8_kernels_avx512.cpp
#if defined(FPTQ_HAVE_AMX)
IsaKernels AmxKernels();            // w4a8_kernels_amx.cpp
bool AmxGranted();                  // the Linux permission request succeeded (asked once)
#endif
#endif

}  // namespace detail
}  // namespace cpu
}  // namespace fptq
