// Hopper prefill path of W4A8MatMul (w4a8_cuda_wgmma.cu): int8 wgmma fed by TMA bulk copies.
// Internal to the CUDA kernels (called from gpu::Run); layouts on top of w4a8_cuda.h's:
//   Mp = round_up(M, kWgBM)
//   qT   int8  [Mp / kWgBM][nkb][4 k32 steps c][2 halves h][kWgBM / 8 row groups][8 rows][16 B]
//        wgmma's K-major core matrices, no swizzle: byte 4t + i of half h of step c, row m, holds the
//        quantized activation at k = 32c + 8t + 2i + h of the k-block (the pairing of Lo/Hi nibbles with
//        the packed weights' A fragments).  Rows >= M are never written (their outputs are not stored).
//   sa   float [M]
//   qsT  int32 [ng][Mp]  16 * sum of the row's q over the group (zero points only)
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "w4a8_cuda.h"

namespace fptq {
namespace gpu {

constexpr int kWgBM = 128;  // tokens per tile (wgmma N)

// The current device is compute capability 9.0 (the kernel is built for sm_90a only).
bool WgmmaUsable();
size_t WgmmaWorkspaceBytes(const Dims& d, int64_t M, bool has_zp);
// Quantizes A into the tiled layout and runs the wgmma kernel; path (a force_path value): 7 the whole
// matmul, 9 the quantization only (benchmark breakdown).
std::string RunWgmma(const Problem& p, int path, void* stream);

}  // namespace gpu
}  // namespace fptq
