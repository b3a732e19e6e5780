// CUDA implementation of W4A8MatMul (see include/fptq/w4a8_contract.h).
// Independent of ONNX Runtime and of the CUDA headers: pointers are device
// pointers, `stream` is a cudaStream_t passed as void*.  Every function only
// enqueues work on `stream` (no host synchronisation) and returns "" or an
// error message (a launch error read with cudaGetLastError).
//
// Layouts (all built on the device by PackWeights / QuantizeActivations):
//   Gp = max(G, 32): a group of 16 is padded to 32 (pads: weight 8, act 0).
//   Kq = round_up(n_groups * Gp, 128), nkb = Kq / 128 (k-blocks),
//   Np = round_up(N, 128).
//   Bp      uint8 [Np/128][nkb][8 tiles of 16 cols][2 halves][32 lanes][16 B]
//           lane (g, t), mma c of the k-block (32 k each), half h = c/2:
//           bytes 8*(c%2) .. +8 = 4 bytes of column g, 4 bytes of column g+8,
//           each = the contract's bytes for k = 32c + 8t .. +8, XOR 0x88
//           (so that nibble << 4 is the signed int8 16*(w - 8)).
//   sc16    float [n_groups][Np]  scales / 16 (pad columns 0)
//   zc      int8  [n_groups][Np]  8 - zero_point (0 without zero points)
//   qA      int8  [M][Kq]  activations in kernel order: inside each k-block,
//           position 32t + 8c + j holds k = 32c + 8t + (j < 4 ? 2j : 2(j-4)+1)
//           (evens then odds of 8 consecutive k, matching the nibble unpack).
//   sa      float [M]      activation scale per row
//   qsum16  int32 [M][n_groups]  16 * sum of the row's q over the group (zero points only)
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "fptq/w4a8_contract.h"

namespace fptq {
namespace gpu {

struct Dims {
  int64_t K = 0, N = 0, G = 0, ng = 0;
  int64_t Gp = 0, Kq = 0, nkb = 0, Np = 0;
};
Dims MakeDims(const W4A8Attrs& attrs);
// "" when the CUDA kernels handle these attributes, else why not.
std::string Supported(const W4A8Attrs& attrs);

size_t PackedWeightBytes(const Dims& d);  // Bp
size_t PackedScaleBytes(const Dims& d);   // sc16
size_t PackedZpBytes(const Dims& d);      // zc

struct Packed {
  const uint8_t* Bp = nullptr;
  const float* sc16 = nullptr;
  const int8_t* zc = nullptr;  // nullptr: no zero points (all 8)
};

// B/scales/zero_points: contract layout, device memory (zero_points may be null).
std::string PackWeights(const Dims& d, const uint8_t* B, const float* scales, const uint8_t* zero_points,
                        uint8_t* Bp, float* sc16, int8_t* zc, void* stream);

// Scratch for one call with M rows: qA, sa, qsum16 (256-byte aligned pieces).
size_t WorkspaceBytes(const Dims& d, int64_t M, bool has_zp);

struct Problem {
  Dims d;
  int64_t M = 0;
  bool per_token = false;
  const float* A = nullptr;          // [M, K] device
  const float* act_scale = nullptr;  // device scalar (static mode)
  const float* bias = nullptr;       // [N] device or null
  Packed w;
  float* Y = nullptr;                // [M, N] device
  void* workspace = nullptr;         // WorkspaceBytes
  int force_path = 0;                // 0 auto, 1 decode kernel (M <= 16: the v5 streaming TMA kernel on
                                     // sm_90 when its shared memory fits, else v4), 5 the v4 decode kernel,
                                     // 6 v5 with 6 stages, 2 prefill 128x128 tiles, 4 prefill 128x64 tiles,
                                     // 3 quantize only, 7 the wgmma prefill kernel (sm_90a, any M),
                                     // 9 its tiled quantization only, 8/11/12 read-only bandwidth
                                     // probes (no result); 0: AutoPath
  int force_splits = 0;              // prefill split-K, both prefill kernels (0 auto)
};

// Auto rule (force_path 0), as a force_path value: 5 for M <= 8, 1 for M <= 16, 7 on sm_90 for
// M >= kWgmmaMinM (groups >= 128), else 4.  Measured crossovers in CUDA_NOTES.md v6 / v6.1.
constexpr int64_t kWgmmaMinM = 128;
int AutoPath(const Dims& d, int64_t M);

std::string Run(const Problem& p, void* stream);

// Helpers for the glue (which does not include the CUDA headers).
std::string CopyAsync(void* dst, const void* src, size_t bytes, void* stream);  // any direction (UVA)
std::string Synchronize(void* stream);

// Number of multiprocessors of the current device (cached), 0 on error.
int SmCount();

}  // namespace gpu
}  // namespace fptq
