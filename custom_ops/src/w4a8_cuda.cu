// CUDA kernels of W4A8MatMul: int8 tensor cores (mma.sync m16n8k32 s8), 4-bit
// weights unpacked in registers.  Layouts are described in w4a8_cuda.h.
//
// Orientation: the weights are the mma's A operand (16 output columns n per
// m16 tile), the activations its B operand (8 tokens per n8 tile), so a decode
// step with M <= 8 wastes nothing on padding rows of the weights.
//
// Integer inner loop: a weight byte pair-of-nibbles x (stored XOR 0x88) gives
// two signed int8 operands with one AND (+ one shift): (x << 4) & 0xF0 = 16*(w-8)
// and x & 0xF0 = 16*(w_hi-8).  The int32 accumulator therefore holds
// 16 * sum q*(w-8); at each group end it is corrected for zero points
// (+ 16*(8-zp)*sum q, only when zero points are given), converted to float and
// multiplied by scale/16 (exact: powers of two), so the float result equals
// the contract's s * isum per group.  For groups <= 128 the accumulator starts
// at the bit pattern of 1.5*2^23, which makes int->float a single FADD instead
// of the slow I2F (|16*isum| < 2^22 there).
#include "w4a8_cuda.h"

#include <cuda_runtime.h>

#include "w4a8_cuda_wgmma.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace fptq {
namespace gpu {

namespace {

constexpr int kThreads = 256;
constexpr int kStages = 4;
constexpr int kActRowBytes = 144;  // 128 + 16 pad: conflict-free 16-byte reads of 8 rows x 4 lanes
constexpr int kStageW = 8 * 1024;
constexpr int PrefillSmem(int bm) { return kStages * (kStageW + bm * kActRowBytes); }
constexpr int kMagicI = 0x4B400000;  // bits of 12582912.0f = 1.5 * 2^23
constexpr float kMagicF = 12582912.0f;

__host__ __device__ inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::string LastError(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return {};
  return std::string("W4A8MatMul (CUDA): ") + what + ": " + cudaGetErrorString(e);
}

__device__ __forceinline__ void Mma(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t Lo(uint32_t x) { return (x << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t Hi(uint32_t x) { return x & 0xF0F0F0F0u; }

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, int src_bytes) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint4 LoadStream(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Programmatic dependent launch (Hopper): the decode kernel starts streaming its
// weights while the quantization kernel still runs, and waits for it only
// before reading the activations.  No-ops below sm_90.
__device__ __forceinline__ void GridDepWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void GridDepLaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------- packing

__global__ void PackWeightsKernel(Dims d, const uint8_t* __restrict__ B, uint8_t* __restrict__ Bp, int64_t total) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total) return;
  const int lane = idx & 31, h = (idx >> 5) & 1, tile = (idx >> 6) & 7;
  const int64_t kb = (idx >> 9) % d.nkb, blk = (idx >> 9) / d.nkb;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row_bytes = d.ng * (d.G / 2);
  uint32_t out[4];
#pragma unroll
  for (int cc = 0; cc < 2; ++cc) {
    const int c = 2 * h + cc;
    const int64_t kk = kb * 128 + 32 * c + 8 * t;  // padded-group coordinate of 8 k's
    const int64_t gi = kk / d.Gp, j0 = kk % d.Gp;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t n = blk * 128 + tile * 16 + g + 8 * rr;
      uint32_t word = 0x88888888u;  // weight 8 = zero after the XOR
      if (n < d.N && gi < d.ng && j0 < d.G) {
        const uint8_t* src = B + n * row_bytes + gi * (d.G / 2) + j0 / 2;
        word = static_cast<uint32_t>(src[0]) | (static_cast<uint32_t>(src[1]) << 8) |
               (static_cast<uint32_t>(src[2]) << 16) | (static_cast<uint32_t>(src[3]) << 24);
      }
      out[cc * 2 + rr] = word ^ 0x88888888u;
    }
  }
  reinterpret_cast<uint4*>(Bp)[idx] = make_uint4(out[0], out[1], out[2], out[3]);
}

__global__ void PackScalesKernel(Dims d, const float* __restrict__ scales, const uint8_t* __restrict__ zp,
                                 float* __restrict__ sc16, int8_t* __restrict__ zc) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= d.ng * d.Np) return;
  const int64_t gi = idx / d.Np, n = idx % d.Np;
  const bool in = n < d.N;
  sc16[idx] = in ? scales[n * d.ng + gi] * 0.0625f : 0.0f;
  if (zc != nullptr) zc[idx] = (in && zp != nullptr) ? static_cast<int8_t>(8 - (zp[n * d.ng + gi] & 15)) : 0;
}

// ---------------------------------------------------------------- activations

// One block per row.  Pass 1: max |a| (per_token), 16-byte loads, unrolled;
// pass 2: each thread quantizes 8-k chunks (two 16-byte loads when aligned) and
// writes them in kernel order.
constexpr int kQuantThreads = 512;

__global__ void __launch_bounds__(kQuantThreads)
    QuantizeKernel(Dims d, const float* __restrict__ A, bool per_token, const float* __restrict__ act_scale,
                   int8_t* __restrict__ qA, float* __restrict__ sa, int* __restrict__ qsum16,
                   float* __restrict__ Yz) {
  extern __shared__ int s_qsum[];
  __shared__ float s_red[32];
  GridDepLaunchDependents();
  if (Yz != nullptr) {  // the streaming decode kernel accumulates its split-K partial sums into Y
    float* y = Yz + static_cast<int64_t>(blockIdx.x) * d.N;
    const int N = static_cast<int>(d.N);
    if ((N & 3) == 0) {
      for (int i = threadIdx.x; i < N / 4; i += kQuantThreads) reinterpret_cast<float4*>(y)[i] = make_float4(0, 0, 0, 0);
    } else {
      for (int i = threadIdx.x; i < N; i += kQuantThreads) y[i] = 0.0f;
    }
  }
  const int K = static_cast<int>(d.K), G = static_cast<int>(d.G), Gp = static_cast<int>(d.Gp);
  const int ng = static_cast<int>(d.ng);
  const int64_t row = blockIdx.x;
  const float* a = A + row * d.K;
  const int tid = threadIdx.x;
  const bool vec = (K % 4) == 0;  // rows 16-byte aligned
  float s;
  if (per_token) {
    float m0 = 0.0f, m1 = 0.0f;
    if (vec) {
      const float4* a4 = reinterpret_cast<const float4*>(a);
      const int n4 = K / 4;
#pragma unroll 4
      for (int i = tid; i < n4; i += kQuantThreads) {
        const float4 v = __ldg(a4 + i);
        m0 = fmaxf(m0, fmaxf(fabsf(v.x), fabsf(v.y)));
        m1 = fmaxf(m1, fmaxf(fabsf(v.z), fabsf(v.w)));
      }
    } else {
#pragma unroll 4
      for (int k = tid; k < K; k += kQuantThreads) m0 = fmaxf(m0, fabsf(__ldg(a + k)));
    }
    float m = fmaxf(m0, m1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((tid & 31) == 0) s_red[tid >> 5] = m;
    __syncthreads();
    if (tid < 32) {
      m = tid < kQuantThreads / 32 ? s_red[tid] : 0.0f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (tid == 0) s_red[0] = m;
    }
    __syncthreads();
    m = s_red[0];
    s = (m == 0.0f) ? 1.0f : __fdiv_rn(m, 127.0f);
  } else {
    s = __ldg(act_scale);
  }
  const int lo = per_token ? -127 : -128;
  if (qsum16 != nullptr) {
    for (int gi = tid; gi < ng; gi += kQuantThreads) s_qsum[gi] = 0;
    __syncthreads();
  }
  const int nchunks = static_cast<int>(d.Kq / 8);
  uint2* out = reinterpret_cast<uint2*>(qA + row * d.Kq);
#pragma unroll 2
  for (int p = tid; p < nchunks; p += kQuantThreads) {
    const int kb = p >> 4, r = p & 15, t = r >> 2, c = r & 3;
    const int kk = kb * 128 + 32 * c + 8 * t;
    const int gi = kk / Gp, j0 = kk - gi * Gp;
    const int k0 = gi * G + j0;
    float x[8];
    if (vec && gi < ng && j0 + 8 <= G && k0 + 8 <= K) {
      const float4 v0 = __ldg(reinterpret_cast<const float4*>(a + k0));
      const float4 v1 = __ldg(reinterpret_cast<const float4*>(a + k0 + 4));
      x[0] = v0.x, x[1] = v0.y, x[2] = v0.z, x[3] = v0.w, x[4] = v1.x, x[5] = v1.y, x[6] = v1.z, x[7] = v1.w;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = (gi < ng && j0 + e < G && k0 + e < K) ? __ldg(a + k0 + e) : 0.0f;
    }
    uint32_t ev = 0, od = 0;
    int sum = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      int q = __float2int_rn(__fdiv_rn(x[e], s));
      q = min(max(q, lo), 127);
      sum += q;
      const uint32_t b = static_cast<uint32_t>(q) & 0xFFu;
      if (e & 1) {
        od |= b << (8 * (e >> 1));
      } else {
        ev |= b << (8 * (e >> 1));
      }
    }
    out[p] = make_uint2(ev, od);
    if (qsum16 != nullptr && gi < ng && sum != 0) atomicAdd(&s_qsum[gi], sum);
  }
  if (tid == 0) sa[row] = s;
  if (qsum16 != nullptr) {
    __syncthreads();
    for (int gi = tid; gi < ng; gi += kQuantThreads) qsum16[row * ng + gi] = 16 * s_qsum[gi];
  }
}

// ---------------------------------------------------------------- decode (M <= 16)
// Block: one tile of 16 weight columns, 8 warps splitting K (aligned to groups),
// reduced through shared memory.  Weights streamed once, 4 k-blocks in flight per warp.

template <int NTOK, bool ZP, bool SMALLG>
__global__ void __launch_bounds__(kThreads, 2) DecodeKernel(Dims d, int M, const int8_t* __restrict__ qA,
                                                            const float* __restrict__ sa,
                                                            const int* __restrict__ qsum16, Packed w,
                                                            const float* __restrict__ bias, float* __restrict__ Y) {
  __shared__ float red[8][16][16];
  const int tile16 = blockIdx.x;
  const int blk = tile16 >> 3, tin = tile16 & 7;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nkb = static_cast<int>(d.nkb), Gp = static_cast<int>(d.Gp), Np = static_cast<int>(d.Np);
  const int ng = static_cast<int>(d.ng), Kq = static_cast<int>(d.Kq);
  const int U = SMALLG ? 1 : Gp / 128;  // k-blocks per group
  const int nu = nkb / U;
  const int kbA = (warp * nu / 8) * U, kbB = ((warp + 1) * nu / 8) * U;
  const int n0 = tile16 * 16 + g, n1 = n0 + 8;

  int acc[NTOK][4];
  float yf[NTOK][4];
#pragma unroll
  for (int j = 0; j < NTOK; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0, yf[j][r] = 0.0f;

  const uint8_t* wbase = w.Bp + (static_cast<int64_t>(blk) * nkb * 8 + tin) * 1024 + lane * 16;
  auto flush = [&](int gi, float s0, float s1, int z0, int z1) {
#pragma unroll
    for (int j = 0; j < NTOK; ++j) {
      int qs0 = 0, qs1 = 0;
      if (ZP) {
        const int ta = j * 8 + 2 * t, tb = ta + 1;
        qs0 = ta < M ? __ldg(qsum16 + ta * ng + gi) : 0;
        qs1 = tb < M ? __ldg(qsum16 + tb * ng + gi) : 0;
      }
      yf[j][0] += s0 * static_cast<float>(acc[j][0] + z0 * qs0);
      yf[j][1] += s0 * static_cast<float>(acc[j][1] + z0 * qs1);
      yf[j][2] += s1 * static_cast<float>(acc[j][2] + z1 * qs0);
      yf[j][3] += s1 * static_cast<float>(acc[j][3] + z1 * qs1);
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[j][r] = 0;
    }
  };

  constexpr int KB = NTOK == 1 ? 4 : 2;  // k-blocks in flight per warp
  for (int kb = kbA; kb < kbB; kb += KB) {
    uint4 wv[KB][2], av[KB][NTOK][2];
    float s0[KB], s1[KB];
    int z0[KB], z1[KB];
#pragma unroll
    for (int u = 0; u < KB; ++u) {
      const bool ok = kb + u < kbB;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        wv[u][h] = ok ? LoadStream(wbase + static_cast<int64_t>(kb + u) * 8192 + h * 512) : make_uint4(0, 0, 0, 0);
      if (!SMALLG) {  // this k-block's group: prefetch its scales with the weights
        const int gi = ok ? (kb + u) / U : 0;
        s0[u] = __ldg(w.sc16 + gi * Np + n0), s1[u] = __ldg(w.sc16 + gi * Np + n1);
        z0[u] = ZP ? __ldg(w.zc + gi * Np + n0) : 0, z1[u] = ZP ? __ldg(w.zc + gi * Np + n1) : 0;
      }
    }
    GridDepWait();  // activations are written by the quantization kernel
#pragma unroll
    for (int u = 0; u < KB; ++u) {
      const bool ok = kb + u < kbB;
#pragma unroll
      for (int j = 0; j < NTOK; ++j) {
        const int tok = j * 8 + g;
#pragma unroll
        for (int h = 0; h < 2; ++h)
          av[u][j][h] = (ok && tok < M) ? __ldg(reinterpret_cast<const uint4*>(qA + static_cast<int64_t>(tok) * Kq +
                                                                              (kb + u) * 128 + t * 32 + h * 16))
                                        : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < KB; ++u) {
      if (kb + u >= kbB) break;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint4& wq = wv[u][c >> 1];
        const uint32_t xg = (c & 1) ? wq.z : wq.x, xg8 = (c & 1) ? wq.w : wq.y;
        const uint32_t a0 = Lo(xg), a1 = Lo(xg8), a2 = Hi(xg), a3 = Hi(xg8);
#pragma unroll
        for (int j = 0; j < NTOK; ++j) {
          const uint4& b = av[u][j][c >> 1];
          Mma(acc[j], a0, a1, a2, a3, (c & 1) ? b.z : b.x, (c & 1) ? b.w : b.y);
        }
        if (SMALLG) {
          const int kend = (kb + u) * 128 + (c + 1) * 32;
          if (kend % Gp == 0) {
            const int gi = (kend - 1) / Gp;
            if (gi < ng) {
              flush(gi, __ldg(w.sc16 + gi * Np + n0), __ldg(w.sc16 + gi * Np + n1),
                    ZP ? __ldg(w.zc + gi * Np + n0) : 0, ZP ? __ldg(w.zc + gi * Np + n1) : 0);
            } else {
#pragma unroll
              for (int j = 0; j < NTOK; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) acc[j][r] = 0;
            }
          }
        }
      }
      if (!SMALLG && ((kb + u + 1) % U) == 0) flush((kb + u) / U, s0[u], s1[u], z0[u], z1[u]);
    }
  }
  // (a warp's range always ends on a group boundary, so everything is flushed)
  GridDepWait();
#pragma unroll
  for (int j = 0; j < NTOK; ++j) {
    red[warp][g][j * 8 + 2 * t] = yf[j][0];
    red[warp][g][j * 8 + 2 * t + 1] = yf[j][1];
    red[warp][g + 8][j * 8 + 2 * t] = yf[j][2];
    red[warp][g + 8][j * 8 + 2 * t + 1] = yf[j][3];
  }
  __syncthreads();
  const int row = threadIdx.x & 15, tok = threadIdx.x >> 4;
  const int n = tile16 * 16 + row;
  if (tok < M && tok < NTOK * 8 && n < d.N) {
    float sum = 0.0f;
#pragma unroll
    for (int q = 0; q < 8; ++q) sum += red[q][row][tok];
    Y[static_cast<int64_t>(tok) * d.N + n] = sa[tok] * sum + (bias != nullptr ? bias[n] : 0.0f);
  }
}

// ---------------------------------------------------------------- prefill (large M)
// Block tile: 128 weight columns x 128 tokens, k-blocks of 128 through a 3-stage
// cp.async pipeline.  8 warps as 2 (columns) x 4 (tokens), warp tile 64 x 32:
// 4 x 4 mma tiles, 64 int32 + 64 float accumulators per thread.  Optional
// split-K over blockIdx.z (atomicAdd into a zeroed Y).

template <int MI, bool ZP, bool MAGIC, bool SMALLG>
__global__ void __launch_bounds__(kThreads, MI == 4 ? 1 : 2)
    PrefillKernel(Dims d, int M, const int8_t* __restrict__ qA, const float* __restrict__ sa,
                  const int* __restrict__ qsum16, Packed w, const float* __restrict__ bias, float* __restrict__ Y,
                  int splits) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int blk = blockIdx.x;
  // warp tile: MI m16 tiles (16 MI weight columns) x 32 tokens; WN x WM warps; block 128 x BM
  constexpr int WN = 128 / (16 * MI), BM = 32 * (8 / WN);
  const int m0 = blockIdx.y * BM;
  const int z = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wn = warp % WN, wm = warp / WN;
  const int nkb = static_cast<int>(d.nkb), Gp = static_cast<int>(d.Gp), Np = static_cast<int>(d.Np);
  const int ng = static_cast<int>(d.ng), Kq = static_cast<int>(d.Kq);
  const int U = SMALLG ? 1 : Gp / 128;  // k-blocks per group
  const int nu = nkb / U;
  const int kbA = (z * nu / splits) * U, kbB = ((z + 1) * nu / splits) * U;
  const int ncol = blk * 128 + wn * 16 * MI + g;  // + 16 i (+ 8)
  const int tok0 = m0 + wm * 32 + 2 * t;      // + 8 j (+ 1)

  int acc[MI][4][4];
  float yf[MI][4][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = MAGIC ? kMagicI : 0, yf[i][j][r] = 0.0f;

  const uint8_t* wsrc = w.Bp + static_cast<int64_t>(blk) * nkb * kStageW;
  constexpr int kStage = kStageW + BM * kActRowBytes;
  auto sW = [&](int st) { return smem + st * kStage; };
  auto sA = [&](int st) { return smem + st * kStage + kStageW; };
  auto load_stage = [&](int st, int kb) {
    uint8_t* dw = sW(st);
    const uint8_t* src = wsrc + static_cast<int64_t>(kb) * kStageW;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + kThreads * i;
      CpAsync16(dw + idx * 16, src + idx * 16, 16);
    }
    uint8_t* da = sA(st);
#pragma unroll
    for (int i = 0; i < MI; ++i) {
      const int idx = tid + kThreads * i;
      const int r = idx >> 3, ch = idx & 7;
      const int tok = m0 + r;
      const int8_t* src_a = qA + static_cast<int64_t>(tok < M ? tok : 0) * Kq + kb * 128 + ch * 16;
      CpAsync16(da + r * kActRowBytes + ch * 16, src_a, tok < M ? 16 : 0);
    }
  };

  // per-group quantization parameters of this thread's rows/tokens (prefetched for large groups)
  float sc[MI][2];
  int zz[MI][2], qs[4][2];
  auto load_q = [&](int gi) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sc[i][r] = __ldg(w.sc16 + gi * Np + ncol + i * 16 + r * 8);
        if (ZP) zz[i][r] = __ldg(w.zc + gi * Np + ncol + i * 16 + r * 8);
      }
    if (ZP) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int tok = min(tok0 + 8 * j + e, M - 1);
          qs[j][e] = __ldg(qsum16 + tok * ng + gi);
        }
    }
  };
  auto apply = [&]() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          int v = acc[i][j][r];
          if (ZP) v += zz[i][r >> 1] * qs[j][r & 1];
          const float f = MAGIC ? (__int_as_float(v) - kMagicF) : static_cast<float>(v);
          yf[i][j][r] = fmaf(sc[i][r >> 1], f, yf[i][j][r]);
          acc[i][j][r] = MAGIC ? kMagicI : 0;
        }
  };
  auto reset = [&]() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = MAGIC ? kMagicI : 0;
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (kbA + s < kbB) load_stage(s, kbA + s);
    CpAsyncCommit();
  }
  int st = 0, st_load = kStages - 1;
  for (int kb = kbA; kb < kbB; ++kb) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    if (kb + kStages - 1 < kbB) load_stage(st_load, kb + kStages - 1);
    CpAsyncCommit();
    if (!SMALLG && (kb % U) == 0) load_q(kb / U);  // consumed at the group's last k-block
    const uint8_t* W = sW(st);
    const uint8_t* Ab = sA(st);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 wa[MI], bb[4];
#pragma unroll
      for (int i = 0; i < MI; ++i)
        wa[i] = *reinterpret_cast<const uint4*>(W + (wn * MI + i) * 1024 + h * 512 + lane * 16);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        bb[j] = *reinterpret_cast<const uint4*>(Ab + (wm * 32 + j * 8 + g) * kActRowBytes + t * 32 + h * 16);
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
#pragma unroll
        for (int i = 0; i < MI; ++i) {
          const uint32_t xg = cc ? wa[i].z : wa[i].x, xg8 = cc ? wa[i].w : wa[i].y;
          const uint32_t a0 = Lo(xg), a1 = Lo(xg8), a2 = Hi(xg), a3 = Hi(xg8);
#pragma unroll
          for (int j = 0; j < 4; ++j) Mma(acc[i][j], a0, a1, a2, a3, cc ? bb[j].z : bb[j].x, cc ? bb[j].w : bb[j].y);
        }
        if (SMALLG) {
          const int c = 2 * h + cc;
          if (((c + 1) * 32) % Gp == 0) {
            const int gi = (kb * 128 + c * 32) / Gp;
            if (gi < ng) {
              load_q(gi);
              apply();
            } else {
              reset();
            }
          }
        }
      }
    }
    if (!SMALLG && ((kb + 1) % U) == 0) apply();
    st = (st + 1 == kStages) ? 0 : st + 1;
    st_load = (st_load + 1 == kStages) ? 0 : st_load + 1;
  }
  CpAsyncWait<0>();

#pragma unroll
  for (int i = 0; i < MI; ++i) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int n = ncol + i * 16 + (r < 2 ? 0 : 8);
      if (n >= d.N) continue;
      const float bv = (bias != nullptr && z == 0) ? __ldg(bias + n) : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tok = tok0 + j * 8 + (r & 1);
        if (tok >= M) continue;
        const float v = __ldg(sa + tok) * yf[i][j][r] + bv;
        float* dst = Y + static_cast<int64_t>(tok) * d.N + n;
        if (splits > 1) {
          atomicAdd(dst, v);
        } else {
          *dst = v;
        }
      }
    }
  }
}

template <int MI, bool ZP, bool MAGIC, bool SMALLG>
std::string LaunchPrefill(const Problem& p, const int8_t* qA, const float* sa, const int* qsum16, void* stream) {
  constexpr int BM = 32 * (8 / (128 / (16 * MI)));
  constexpr int smem = PrefillSmem(BM);
  static bool attr_set = false;  // per instantiation; setting it twice is harmless
  if (!attr_set) {
    cudaFuncSetAttribute(PrefillKernel<MI, ZP, MAGIC, SMALLG>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    attr_set = true;
  }
  const Dims& d = p.d;
  const int64_t gx = d.Np / 128, gy = (p.M + BM - 1) / BM;
  const int64_t U = d.Gp > 128 ? d.Gp / 128 : 1;
  const int64_t nu = d.nkb / U;
  int splits = p.force_splits;
  if (splits <= 0) {
    const int64_t blocks = gx * gy;
    const int slots = std::max(1, SmCount()) * (MI == 4 ? 1 : 2);
    splits = blocks >= slots ? 1 : static_cast<int>(std::min<int64_t>((slots + blocks - 1) / blocks, 8));
  }
  splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(splits, nu)));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (splits > 1) cudaMemsetAsync(p.Y, 0, static_cast<size_t>(p.M) * d.N * sizeof(float), s);
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
  PrefillKernel<MI, ZP, MAGIC, SMALLG><<<grid, kThreads, smem, s>>>(d, static_cast<int>(p.M), qA, sa, qsum16, p.w,
                                                                    p.bias, p.Y, splits);
  return LastError("prefill kernel");
}

template <int MI>
std::string Prefill(const Problem& p, const int8_t* qA, const float* sa, const int* qsum16, void* stream) {
  const Dims& d = p.d;
  const bool zp = p.w.zc != nullptr;
  if (d.Gp < 128) {
    return zp ? LaunchPrefill<MI, true, true, true>(p, qA, sa, qsum16, stream)
              : LaunchPrefill<MI, false, true, true>(p, qA, sa, qsum16, stream);
  }
  if (d.Gp == 128) {
    return zp ? LaunchPrefill<MI, true, true, false>(p, qA, sa, qsum16, stream)
              : LaunchPrefill<MI, false, true, false>(p, qA, sa, qsum16, stream);
  }
  return zp ? LaunchPrefill<MI, true, false, false>(p, qA, sa, qsum16, stream)
            : LaunchPrefill<MI, false, false, false>(p, qA, sa, qsum16, stream);
}

// PDL needs compute capability >= 9.0; FPTQ_OPS_CUDA_PDL=0 turns it off.
bool UsePdl() {
  static int use = -1;
  if (use < 0) {
    int dev = 0, major = 0;
    const char* e = std::getenv("FPTQ_OPS_CUDA_PDL");
    use = (cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 &&
           !(e != nullptr && e[0] == '0'))
              ? 1
              : 0;
    cudaGetLastError();
  }
  return use == 1;
}

template <int NTOK, bool ZP>
std::string LaunchDecode(const Problem& p, const int8_t* qA, const float* sa, const int* qsum16, void* stream) {
  const Dims& d = p.d;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(d.Np / 16));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = UsePdl() ? 1 : 0;
  const int M = static_cast<int>(p.M);
  if (d.Gp < 128) {
    cudaLaunchKernelEx(&cfg, DecodeKernel<NTOK, ZP, true>, d, M, qA, sa, qsum16, p.w, p.bias, p.Y);
  } else {
    cudaLaunchKernelEx(&cfg, DecodeKernel<NTOK, ZP, false>, d, M, qA, sa, qsum16, p.w, p.bias, p.Y);
  }
  return LastError("decode kernel");
}


// ---------------------------------------------------------------- streaming decode (M <= 16), v5
// Persistent: one block per SM, the (column block, k-block) grid flattened
// column-block-major and cut into equal contiguous ranges (aligned to groups),
// one per block.  A producer warp fills a ring of stages with 1-D bulk copies
// (cp.async.bulk, the TMA engine; one 8 KiB copy per k-block + the group scales),
// full/empty mbarriers per stage; it runs ahead of griddepcontrol.wait, i.e. the
// weights stream while the quantization kernel still runs.  16 consumer warps:
// warp w owns the 16 columns of tile w % 8 and every other k-block (w / 8 = k-block
// parity), so no reduction inside the block; each warp's partial sums of a column
// block go to Y with one atomicAdd per output (Y is zeroed by the quantization
// kernel).  The block's activations (int8, its whole k-range, M rows) are staged
// once in shared memory after griddepcontrol.wait.
constexpr int kDecStagesDefault = 12;
constexpr int kWarpStage = 1024 + 256 + 64;  // weights (2 halves x 32 lanes x 16 B), sc16 x 4 groups, zc x 4
constexpr int kDecStage = 8 * kWarpStage;
constexpr int kDecActRow = 144;
constexpr int kMaxSmem = 232448;  // 227 KiB opt-in (sm_90; sm_80: 163 KiB, checked at launch)

struct StreamPlan {
  int P = 0, U = 1, span = 0;
  int64_t T = 0;
  size_t smem = 0, act_off = 0, sa_off = 0, qs_off = 0;
};

StreamPlan PlanStream(const Dims& d, int64_t M, bool zp, int kDecStages) {
  StreamPlan sp;
  sp.U = d.Gp < 128 ? 1 : static_cast<int>(d.Gp / 128);
  const int64_t nu = d.nkb / sp.U;
  sp.T = d.Np / 128 * nu;
  sp.P = static_cast<int>(std::min<int64_t>(std::max(1, SmCount()), sp.T));
  const int64_t upc = (sp.T + sp.P - 1) / sp.P;
  sp.span = static_cast<int>(std::min<int64_t>(upc * sp.U, d.nkb));
  auto al = [](size_t x) { return (x + 15) / 16 * 16; };
  sp.act_off = static_cast<size_t>(kDecStages) * kDecStage;
  sp.sa_off = sp.act_off + al(static_cast<size_t>(sp.span) * M * kDecActRow);
  sp.qs_off = sp.sa_off + al(static_cast<size_t>(M) * sizeof(float));
  sp.smem = sp.qs_off + (zp ? al(static_cast<size_t>(sp.span) * 4 * M * sizeof(int)) : 0);
  return sp;
}

// Largest dynamic shared memory per block of the current device (cached).
int MaxSmemOptin() {
  static int cached = -1;
  if (cached < 0) {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    cached = std::min(n, kMaxSmem);
  }
  return cached;
}


constexpr int kTmaStage = 8192 + 2048 + 512;  // weights [8 tiles][1 KiB], sc16 [4][128], zc [4][128]
constexpr int kTmaConsumers = 2 * kThreads;  // 16 warps
constexpr int kTmaThreads = kTmaConsumers + 32;

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void MbarFenceInit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SmemAddr(bar)) : "memory");
#endif
}
__device__ __forceinline__ void MbarExpectTx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "LAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\n"
      "bra LAB_WAIT;\n"
      "DONE:\n"
      "}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
#endif
}
__device__ __forceinline__ void BulkCopy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   SmemAddr(dst)),
               "l"(src), "r"(bytes), "r"(SmemAddr(bar))
               : "memory");
#endif
}

StreamPlan PlanTma(const Dims& d, int64_t M, bool zp, int S) {
  StreamPlan sp = PlanStream(d, M, zp, S);
  const size_t shift = static_cast<size_t>(S) * (kTmaStage - kDecStage);
  sp.act_off += shift, sp.sa_off += shift, sp.qs_off += shift, sp.smem += shift;
  sp.smem = (sp.smem + 15) / 16 * 16 + 2 * S * sizeof(uint64_t);  // full/empty barriers at the end
  return sp;
}

template <int NTOK, bool ZP, bool SMALLG, int S>
__global__ void __launch_bounds__(kTmaThreads, 1)
    TmaDecodeKernel(Dims d, int M, const int8_t* __restrict__ qA, const float* __restrict__ sa,
                    const int* __restrict__ qsum16, Packed w, const float* __restrict__ bias, float* __restrict__ Y,
                    int P, int64_t T, int act_off, int sa_off, int qs_off, int bar_off) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + bar_off);
  uint64_t* empty = full + S;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nkb = static_cast<int>(d.nkb), Gp = static_cast<int>(d.Gp), Np = static_cast<int>(d.Np);
  const int ng = static_cast<int>(d.ng), Kq = static_cast<int>(d.Kq), N = static_cast<int>(d.N);
  const int U = SMALLG ? 1 : Gp / 128;
  const int gpk = SMALLG ? 128 / Gp : 1;
  const int64_t u0 = blockIdx.x * T / P, u1 = (blockIdx.x + 1) * T / P;
  const int64_t L0 = u0 * U;
  const int nk = static_cast<int>((u1 - u0) * U);
  const int cb0 = static_cast<int>(L0 / nkb), kb0 = static_cast<int>(L0 - static_cast<int64_t>(cb0) * nkb);
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) MbarInit(full + s, 1), MbarInit(empty + s, 8);
    MbarFenceInit();
  }
  __syncthreads();

  if (warp == 16) {  // producer: never touches the activations, so it runs ahead of griddepcontrol.wait
    if (lane == 0) {
      int kb = kb0, cb = cb0;
      for (int i = 0; i < nk; ++i) {
        const int s = i % S;
        if (i >= S) MbarWait(empty + s, ((i / S) - 1) & 1);
        uint8_t* st = smem + s * kTmaStage;
        int nq = 0;
        bool qv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int gi = SMALLG ? kb * gpk + q : kb / U;
          qv[q] = q < gpk && gi < ng;  // (groups > 128: every k-block flushes its partial group)
          nq += qv[q];
        }
        MbarExpectTx(full + s, 8192 + nq * (512 + (ZP ? 128 : 0)));
        BulkCopy(st, w.Bp + (static_cast<int64_t>(cb) * nkb + kb) * 8192, 8192, full + s);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (!qv[q]) continue;
          const int gi = SMALLG ? kb * gpk + q : kb / U;
          BulkCopy(st + 8192 + q * 512, w.sc16 + static_cast<int64_t>(gi) * Np + cb * 128, 512, full + s);
          if (ZP) BulkCopy(st + 10240 + q * 128, w.zc + static_cast<int64_t>(gi) * Np + cb * 128, 128, full + s);
        }
        if (++kb == nkb) kb = 0, ++cb;
      }
    }
    return;
  }

  GridDepWait();
  const int used = min(nk, nkb);
  uint8_t* act = smem + act_off;
  float* s_sa = reinterpret_cast<float*>(smem + sa_off);
  int* s_qs = reinterpret_cast<int*>(smem + qs_off);
  {
    const int per_slot = M * 8;
    const int total = used * per_slot;
#pragma unroll 4
    for (int idx = threadIdx.x; idx < total; idx += kTmaConsumers) {
      const int slot = idx / per_slot, rem = idx - slot * per_slot, tok = rem >> 3, ch = rem & 7;
      int kb = kb0 + slot;
      if (kb >= nkb) kb -= nkb;
      *reinterpret_cast<uint4*>(act + (slot * M + tok) * kDecActRow + ch * 16) =
          __ldg(reinterpret_cast<const uint4*>(qA + static_cast<int64_t>(tok) * Kq + kb * 128 + ch * 16));
    }
    if (threadIdx.x < M) s_sa[threadIdx.x] = __ldg(sa + threadIdx.x);
    if (ZP) {
      for (int idx = threadIdx.x; idx < used * 4 * M; idx += kTmaConsumers) {
        const int slot = idx / (4 * M), rem = idx - slot * 4 * M, q = rem / M, tok = rem - q * M;
        int kb = kb0 + slot;
        if (kb >= nkb) kb -= nkb;
        const int gi = SMALLG ? kb * gpk + q : kb / U;
        s_qs[idx] = (q < gpk && gi < ng) ? __ldg(qsum16 + tok * ng + gi) : 0;
      }
    }
  }
  asm volatile("bar.sync 1, %0;\n" ::"n"(kTmaConsumers) : "memory");  // consumers only

  const int tile = warp & 7, par = warp >> 3;
  int acc[2][NTOK][4];  // two independent chains (odd / even k32 steps), added at the flush
  float yf[NTOK][4];
#pragma unroll
  for (int j = 0; j < NTOK; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[0][j][r] = acc[1][j][r] = 0, yf[j][r] = 0.0f;

  // zp_now: add the zero-point term (once per group: at its last k-block)
  auto flush = [&](const uint8_t* st, int slot, int q, bool zp_now) {
    const float* sc = reinterpret_cast<const float*>(st + 8192 + q * 512) + tile * 16;
    const float s0 = sc[g], s1 = sc[g + 8];
    int z0 = 0, z1 = 0;
    if (ZP && zp_now) {
      const int8_t* zq = reinterpret_cast<const int8_t*>(st + 10240 + q * 128) + tile * 16;
      z0 = zq[g], z1 = zq[g + 8];
    }
#pragma unroll
    for (int j = 0; j < NTOK; ++j) {
      int qs0 = 0, qs1 = 0;
      if (ZP && zp_now) {
        const int ta = j * 8 + 2 * t, tb = ta + 1;
        qs0 = ta < M ? s_qs[(slot * 4 + q) * M + ta] : 0;
        qs1 = tb < M ? s_qs[(slot * 4 + q) * M + tb] : 0;
      }
      yf[j][0] += s0 * static_cast<float>(acc[0][j][0] + acc[1][j][0] + z0 * qs0);
      yf[j][1] += s0 * static_cast<float>(acc[0][j][1] + acc[1][j][1] + z0 * qs1);
      yf[j][2] += s1 * static_cast<float>(acc[0][j][2] + acc[1][j][2] + z1 * qs0);
      yf[j][3] += s1 * static_cast<float>(acc[0][j][3] + acc[1][j][3] + z1 * qs1);
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[0][j][r] = acc[1][j][r] = 0;
    }
  };

  int kb = kb0 + par, cb = cb0, slot = par;
  while (kb >= nkb) kb -= nkb, ++cb;
  while (slot >= nkb) slot -= nkb;
  bool has_k0 = false;  // this warp's part of the column block holds k-block 0: it adds the bias
  for (int i = par; i < nk; i += 2) {
    const int s = i % S;
    MbarWait(full + s, (i / S) & 1);
    const uint8_t* st = smem + s * kTmaStage;
    const uint4 wv0 = *reinterpret_cast<const uint4*>(st + tile * 1024 + lane * 16);
    const uint4 wv1 = *reinterpret_cast<const uint4*>(st + tile * 1024 + 512 + lane * 16);
    uint4 av[NTOK][2];
#pragma unroll
    for (int j = 0; j < NTOK; ++j) {
      const int tok = j * 8 + g;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        av[j][h] = tok < M ? *reinterpret_cast<const uint4*>(act + (slot * M + tok) * kDecActRow + t * 32 + h * 16)
                           : make_uint4(0, 0, 0, 0);
    }
    has_k0 |= kb == 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint4& wq = c < 2 ? wv0 : wv1;
      const uint32_t xg = (c & 1) ? wq.z : wq.x, xg8 = (c & 1) ? wq.w : wq.y;
      const uint32_t a0 = Lo(xg), a1 = Lo(xg8), a2 = Hi(xg), a3 = Hi(xg8);
#pragma unroll
      for (int j = 0; j < NTOK; ++j) {
        const uint4& b = av[j][c >> 1];
        Mma(acc[c & 1][j], a0, a1, a2, a3, (c & 1) ? b.z : b.x, (c & 1) ? b.w : b.y);
      }
      if (SMALLG && ((c + 1) * 32) % Gp == 0) {
        const int q = ((c + 1) * 32) / Gp - 1;
        if (kb * gpk + q < ng) {
          flush(st, slot, q, true);
        } else {
#pragma unroll
          for (int j = 0; j < NTOK; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[0][j][r] = acc[1][j][r] = 0;
        }
      }
    }
    if (!SMALLG) flush(st, slot, 0, (kb + 1) % U == 0);
    __syncwarp();
    if (lane == 0) MbarArrive(empty + s);  // this warp is done with stage s
    if (kb + 2 >= nkb || i + 2 >= nk) {  // this warp's last k-block of column block cb
#pragma unroll
      for (int j = 0; j < NTOK; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int tok = j * 8 + 2 * t + (r & 1);
          const int n = cb * 128 + tile * 16 + g + 8 * (r >> 1);
          if (tok < M && n < N)
            atomicAdd(Y + static_cast<int64_t>(tok) * N + n,
                      s_sa[tok] * yf[j][r] + ((has_k0 && bias != nullptr) ? __ldg(bias + n) : 0.0f));
          yf[j][r] = 0.0f;
        }
      has_k0 = false;
    }
    kb += 2, slot += 2;
    while (kb >= nkb) kb -= nkb, ++cb;
    while (slot >= nkb) slot -= nkb;
  }
}

template <int NTOK, bool ZP, bool SMALLG, int S>
std::string LaunchTma(const Problem& p, const StreamPlan& sp, const int8_t* qA, const float* sa, const int* qsum16,
                      void* stream) {
  static bool attr_set = false;
  if (!attr_set) {
    cudaFuncSetAttribute(TmaDecodeKernel<NTOK, ZP, SMALLG, S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         MaxSmemOptin());
    cudaGetLastError();
    attr_set = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(sp.P));
  cfg.blockDim = dim3(kTmaThreads);
  cfg.dynamicSmemBytes = sp.smem;
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = UsePdl() ? 1 : 0;
  const int bar_off = static_cast<int>(sp.smem - 2 * S * sizeof(uint64_t));
  cudaLaunchKernelEx(&cfg, TmaDecodeKernel<NTOK, ZP, SMALLG, S>, p.d, static_cast<int>(p.M), qA, sa, qsum16, p.w,
                     p.bias, p.Y, sp.P, sp.T, static_cast<int>(sp.act_off), static_cast<int>(sp.sa_off),
                     static_cast<int>(sp.qs_off), bar_off);
  return LastError("TMA decode kernel");
}

template <int NTOK, bool ZP>
std::string Tma(const Problem& p, const StreamPlan& sp, const int8_t* qA, const float* sa, const int* qsum16,
                void* stream, int S) {
  if (S == 6) return p.d.Gp < 128 ? LaunchTma<NTOK, ZP, true, 6>(p, sp, qA, sa, qsum16, stream)
                                  : LaunchTma<NTOK, ZP, false, 6>(p, sp, qA, sa, qsum16, stream);
  return p.d.Gp < 128 ? LaunchTma<NTOK, ZP, true, 12>(p, sp, qA, sa, qsum16, stream)
                      : LaunchTma<NTOK, ZP, false, 12>(p, sp, qA, sa, qsum16, stream);
}

// Read-only probe (benchmark ceiling): streams the packed weights with 16-byte loads.
__global__ void __launch_bounds__(256) ReadProbeKernel(const uint4* __restrict__ p, int64_t n, float* out) {
  uint32_t x = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = LoadStream(reinterpret_cast<const uint8_t*>(p + i + u * stride));
#pragma unroll
    for (int u = 0; u < 4; ++u) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = LoadStream(reinterpret_cast<const uint8_t*>(p + i));
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x9E3779B9u) out[0] = 1.0f;
}

// Probe variant: every block streams its own contiguous chunk (like the persistent decode kernels).
__global__ void __launch_bounds__(256) ReadProbeBlockedKernel(const uint4* __restrict__ p, int64_t n, float* out) {
  uint32_t x = 0;
  const int64_t b0 = blockIdx.x * n / gridDim.x, b1 = (blockIdx.x + 1) * n / gridDim.x;
  const int stride = blockDim.x;
  int64_t i = b0 + threadIdx.x;
  for (; i + 3 * stride < b1; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = LoadStream(reinterpret_cast<const uint8_t*>(p + i + u * stride));
#pragma unroll
    for (int u = 0; u < 4; ++u) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < b1; i += stride) {
    const uint4 v = LoadStream(reinterpret_cast<const uint8_t*>(p + i));
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (x == 0x9E3779B9u) out[0] = 1.0f;
}

bool IsSm90() {
  static int v = -1;
  if (v < 0) {
    int dev = 0, major = 0;
    v = (cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9)
            ? 1
            : 0;
    cudaGetLastError();
  }
  return v == 1;
}

}  // namespace

Dims MakeDims(const W4A8Attrs& a) {
  Dims d;
  d.K = a.K;
  d.N = a.N;
  d.G = a.group_size;
  d.ng = a.n_groups();
  d.Gp = std::max<int64_t>(a.group_size, 32);
  d.Kq = RoundUp(d.ng * d.Gp, 128);
  d.nkb = d.Kq / 128;
  d.Np = RoundUp(d.N, 128);
  return d;
}

std::string Supported(const W4A8Attrs& a) {
  if (a.group_size > 65536) return "W4A8MatMul (CUDA): group_size > 65536 is not supported (int32 accumulator)";
  if (a.n_groups() > 12288) return "W4A8MatMul (CUDA): more than 12288 groups per row is not supported";
  return {};
}

size_t PackedWeightBytes(const Dims& d) { return static_cast<size_t>(d.Np) * d.Kq / 2; }
size_t PackedScaleBytes(const Dims& d) { return static_cast<size_t>(d.ng) * d.Np * sizeof(float); }
size_t PackedZpBytes(const Dims& d) { return static_cast<size_t>(d.ng) * d.Np; }

std::string PackWeights(const Dims& d, const uint8_t* B, const float* scales, const uint8_t* zero_points,
                        uint8_t* Bp, float* sc16, int8_t* zc, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t total = d.Np / 128 * d.nkb * 512;
  if (B != nullptr && Bp != nullptr)
    PackWeightsKernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, s>>>(d, B, Bp, total);
  if (scales != nullptr && sc16 != nullptr) {
    const int64_t n = d.ng * d.Np;
    PackScalesKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(d, scales, zero_points, sc16, zc);
  }
  return LastError("weight packing");
}

namespace {
struct WsLayout {
  size_t qA = 0, sa = 0, qsum = 0, total = 0;
};
WsLayout Layout(const Dims& d, int64_t M, bool has_zp) {
  auto al = [](size_t x) { return (x + 255) / 256 * 256; };
  WsLayout l;
  l.qA = 0;
  l.sa = al(static_cast<size_t>(M) * d.Kq);
  l.qsum = l.sa + al(static_cast<size_t>(M) * sizeof(float));
  l.total = l.qsum + (has_zp ? al(static_cast<size_t>(M) * d.ng * sizeof(int)) : 0);
  return l;
}
}  // namespace

size_t WorkspaceBytes(const Dims& d, int64_t M, bool has_zp) {
  return std::max(Layout(d, M, has_zp).total, WgmmaWorkspaceBytes(d, M, has_zp));
}

std::string CopyAsync(void* dst, const void* src, size_t bytes, void* stream) {
  if (cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)) != cudaSuccess)
    return LastError("copy");
  return {};
}

std::string Synchronize(void* stream) {
  if (cudaStreamSynchronize(static_cast<cudaStream_t>(stream)) != cudaSuccess) return LastError("synchronize");
  return {};
}

int SmCount() {
  static int cached = -1;
  if (cached < 0) {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    cached = n;
  }
  return cached;
}

int AutoPath(const Dims& d, int64_t M) {
  if (M <= 8) return 5;   // decode v4: as fast as v5 or faster at M <= 8 (CUDA_NOTES.md v5)
  if (M <= 16) return 1;  // decode v5 streaming (v4 where it cannot run)
  // wgmma from kWgmmaMinM rows on (CUDA_NOTES.md v6.1: faster than mma.sync at M = 128, 512, 2048, 4096 on
  // all five shapes, H200 2026-12-03; M = 17..127 not measured); group sizes 32 / 64 (a rescale every 1-2
  // k32 steps) were not timed and stay on mma.sync.  (The wgmma kernel's schedule: CUDA_NOTES.md v7.)
  if (M >= kWgmmaMinM && d.Gp >= 128 && WgmmaUsable()) return 7;
  return 4;  // mma.sync prefill, 128 x 64 tiles
}

std::string Run(const Problem& p, void* stream) {
  if (p.M <= 0) return {};
  const Dims& d = p.d;
  const bool zp = p.w.zc != nullptr;
  WsLayout l = Layout(d, p.M, zp);
  uint8_t* ws = static_cast<uint8_t*>(p.workspace);
  int8_t* qA = reinterpret_cast<int8_t*>(ws + l.qA);
  float* sa = reinterpret_cast<float*>(ws + l.sa);
  int* qsum16 = zp ? reinterpret_cast<int*>(ws + l.qsum) : nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // decode (M <= 16): 1 = v5 streaming kernel (sm_90, when its shared memory fits, else v4), 6 = v5 with 6
  // stages, 5 = the v4 kernel; 0 = auto.  8, 11, 12: read-only bandwidth probes (benchmark).
  if (p.force_path == 8) {  // read-only bandwidth probe over the packed weights (benchmark)
    const int64_t n16 = static_cast<int64_t>(PackedWeightBytes(d) / 16);
    ReadProbeKernel<<<std::max(1, SmCount()) * 8, 256, 0, s>>>(reinterpret_cast<const uint4*>(p.w.Bp), n16, p.Y);
    return LastError("read probe");
  }
  if (p.force_path == 11 || p.force_path == 12) {
    const int64_t n16 = static_cast<int64_t>(PackedWeightBytes(d) / 16);
    ReadProbeBlockedKernel<<<std::max(1, SmCount()) * (p.force_path == 11 ? 1 : 8), 256, 0, s>>>(
        reinterpret_cast<const uint4*>(p.w.Bp), n16, p.Y);
    return LastError("read probe");
  }
  const int path = p.force_path != 0 ? p.force_path : AutoPath(d, p.M);
  const bool decode = path == 1 || path == 5 || path == 6;
  const int S = path == 6 ? 6 : kDecStagesDefault;
  if (decode && p.M > 16) return "W4A8MatMul (CUDA): decode kernel needs M <= 16";
  if (path == 7 || path == 9) return RunWgmma(p, path, stream);
  StreamPlan sp;
  bool streaming = false;
  if ((path == 1 || path == 6) && IsSm90()) {
    sp = PlanTma(d, p.M, zp, S);
    streaming = sp.smem <= static_cast<size_t>(MaxSmemOptin());
  }
  QuantizeKernel<<<static_cast<unsigned>(p.M), kQuantThreads, zp ? static_cast<size_t>(d.ng) * sizeof(int) : 0, s>>>(
      d, p.A, p.per_token, p.act_scale, qA, sa, qsum16, streaming ? p.Y : nullptr);
  std::string err = LastError("activation quantization");
  if (!err.empty()) return err;
  if (path == 3) return {};  // activation quantization only (benchmark breakdown)
  if (decode) {
    if (streaming) {
      if (p.M <= 8) return zp ? Tma<1, true>(p, sp, qA, sa, qsum16, stream, S) : Tma<1, false>(p, sp, qA, sa, qsum16, stream, S);
      return zp ? Tma<2, true>(p, sp, qA, sa, qsum16, stream, S) : Tma<2, false>(p, sp, qA, sa, qsum16, stream, S);
    }
    if (p.M <= 8) return zp ? LaunchDecode<1, true>(p, qA, sa, qsum16, stream) : LaunchDecode<1, false>(p, qA, sa, qsum16, stream);
    return zp ? LaunchDecode<2, true>(p, qA, sa, qsum16, stream) : LaunchDecode<2, false>(p, qA, sa, qsum16, stream);
  }
  // mma.sync prefill: 128 x 128 block tiles, warp tile 64 x 32, 1 block per SM (path 2), else 128 x 64,
  // warp tile 32 x 32, 2 blocks per SM (path 4, the auto one)
  const int mi = path == 2 ? 4 : 2;
  return mi == 4 ? Prefill<4>(p, qA, sa, qsum16, stream) : Prefill<2>(p, qA, sa, qsum16, stream);
}

}  // namespace gpu
}  // namespace fptq
