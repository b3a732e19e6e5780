// The W4A8MatMul operator contract, stated once.  Every backend (the CPU
// kernels in src/, a CUDA kernel later) implements exactly this; the Python
// reference `fptq_onnx.custom_ops.reference_w4a8_matmul` defines the numerics.
//
// Operator: domain "fptq", type "W4A8MatMul", since version 1.
//
// Inputs
//   0 A            float32 [..., K]   any leading dims, M = product of them (M may be 0)
//   1 B            uint8   [N, n_groups, G/2], n_groups = ceil(K/G).  Packed 4-bit
//                  weights: row n, element k in group g = k/G at j = k%G is in byte
//                  j/2, low nibble for even j, high nibble for odd j.  Unused nibbles
//                  of a ragged last group hold the zero point.  (= MatMulNBits B.)
//   2 scales       float32 [N, n_groups]
//   3 zero_points  optional uint8 [N, n_groups], values 0..15; absent => all 8
//   4 act_scale    optional float32 scalar ([] or [1]); required for act_mode "static"
//   5 bias         optional float32 [N]
// Attributes: K int, N int (each in 1..kMaxDim), group_size int (G, power of two
//             in 16..2^20; need not divide K: the last group may be ragged),
//             act_mode string "static" | "per_token".
// Output: Y float32 [..., N].
//
// Rejected with an error status (at session creation for constant initializers,
// else at run): any attribute outside the above, any input of another dtype or
// shape, zero points outside 0..15, non-finite scales, a non-finite or
// non-positive act_scale.  Not rejected (it would cost a pass over A per call):
// NaN/inf in A; a row holding one gets unspecified values in its own output row
// only, every other row is exact, and nothing is read or written out of bounds.
//
// Numerics
//   static:    q = clip(rint_half_even(a / act_scale), -128, 127), s_a = act_scale
//   per_token: m = max|a_row|, s_a = m / 127 (1 if m == 0),
//              q = clip(rint_half_even(a / s_a), -127, 127)
//   isum_g = sum_{k in g} q[k] * (w[n,k] - zp[n,g])                (exact int32)
//   y[n]   = s_a * sum_g scales[n,g] * isum_g + bias[n]             (float32)
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

namespace fptq {

constexpr const char* kDomain = "fptq";
constexpr const char* kW4A8OpType = "W4A8MatMul";

enum W4A8Input : int { kInA = 0, kInB, kInScales, kInZeroPoints, kInActScale, kInBias, kNumInputs };

enum class ActMode { kStatic, kPerToken };

constexpr int kDefaultZeroPoint = 8;

// Bound on K and N: keeps every derived size (n_groups * G, N * n_groups * G / 2,
// the padded row length of the quantized activations) far from int64 overflow.
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGroupSize = int64_t{1} << 20;  // isum_g = G * 128 * 15 must fit int32

struct W4A8Attrs {
  int64_t K = 0;
  int64_t N = 0;
  int64_t group_size = 0;
  ActMode act_mode = ActMode::kStatic;

  int64_t n_groups() const { return (K + group_size - 1) / group_size; }
  int64_t bytes_per_group() const { return group_size / 2; }
};

// Parses and checks the attributes; returns an empty string when valid, else
// a one-line message naming the problem.
inline std::string ValidateW4A8Attrs(int64_t K, int64_t N, int64_t group_size, const std::string& act_mode,
                                     W4A8Attrs* out) {
  if (K <= 0 || K > kMaxDim)
    return "W4A8MatMul: attribute K must be in 1.." + std::to_string(kMaxDim) + ", got " + std::to_string(K);
  if (N <= 0 || N > kMaxDim)
    return "W4A8MatMul: attribute N must be in 1.." + std::to_string(kMaxDim) + ", got " + std::to_string(N);
  if (group_size < 16 || (group_size & (group_size - 1)) != 0 || group_size > kMaxGroupSize)
    return "W4A8MatMul: attribute group_size must be a power of two >= 16 and <= " + std::to_string(kMaxGroupSize) +
           ", got " + std::to_string(group_size);
  ActMode mode;
  if (act_mode == "static") {
    mode = ActMode::kStatic;
  } else if (act_mode == "per_token") {
    mode = ActMode::kPerToken;
  } else {
    return "W4A8MatMul: unknown act_mode '" + act_mode + "' (expected 'static' or 'per_token')";
  }
  if (out) {
    out->K = K;
    out->N = N;
    out->group_size = group_size;
    out->act_mode = mode;
  }
  return {};
}

// Scales [N, n_groups] must be finite (a NaN or inf scale would silently poison
// its output column); returns "" or a message naming the first bad entry.
inline std::string ValidateScales(const float* scales, int64_t N, int64_t n_groups) {
  for (int64_t i = 0; i < N * n_groups; ++i) {
    if (!std::isfinite(scales[i])) {
      return "W4A8MatMul: input 'scales' must be finite, got " + std::to_string(scales[i]) + " at [" +
             std::to_string(i / n_groups) + ", " + std::to_string(i % n_groups) + "]";
    }
  }
  return {};
}

}  // namespace fptq
