// CPU driver for W4A8MatMul: ISA selection, scale/zero-point packing,
// activation quantization into scratch, and the parallel tiling of M x N.
#include "w4a8_cpu.h"

#if defined(FPTQ_HAVE_X86_KERNELS)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace fptq {
namespace cpu {

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvxVnni: return "avxvnni";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAvx512Vnni512: return "avx512vnni512";
    case Isa::kAmx: return "amx";
  }
  return "?";
}

const char* KernelPath(Isa isa, int64_t M) {
  return (isa == Isa::kAmx && M < kAmxMinRows) ? IsaName(Isa::kAvx512Vnni512) : IsaName(isa);
}

int PanelWidth(Isa isa) { return (isa == Isa::kAvx512Vnni512 || isa == Isa::kAmx) ? kPanelZmm : kPanel; }

namespace {
#if defined(FPTQ_HAVE_AMX)
// CPUID.(EAX=7, ECX=0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
bool CpuHasAmxInt8() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return ((d >> 24) & 1) && ((d >> 25) & 1);
}
#endif
}  // namespace

bool IsaSupported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(FPTQ_HAVE_X86_KERNELS)
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvxVnni:
#if defined(FPTQ_HAVE_AVXVNNI)
      return IsaSupported(Isa::kAvx2) && __builtin_cpu_supports("avxvnni");
#else
      return false;
#endif
    case Isa::kAvx512Vnni:
      return IsaSupported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
    case Isa::kAvx512Vnni512: return IsaSupported(Isa::kAvx512Vnni);
    case Isa::kAmx:
#if defined(FPTQ_HAVE_AMX)
      return IsaSupported(Isa::kAvx512Vnni512) && CpuHasAmxInt8() && detail::AmxGranted();
#else
      return false;
#endif
#endif
    default: return false;
  }
}

Isa SelectIsa() {
  if (const char* env = std::getenv("FPTQ_OPS_ISA")) {
    for (Isa isa : kAllIsas) {
      if (std::strcmp(env, IsaName(isa)) == 0 && IsaSupported(isa)) return isa;
    }
  }
  // AMX tiles for prefill (with the zmm kernels for decode), else the 512-bit
  // kernels (twice the columns per instruction of VEX AVX-VNNI, which comes next).
  const Isa order[] = {Isa::kAmx, Isa::kAvx512Vnni512, Isa::kAvxVnni, Isa::kAvx512Vnni, Isa::kAvx2, Isa::kScalar};
  for (Isa isa : order) {
    if (IsaSupported(isa)) return isa;
  }
  return Isa::kScalar;
}

std::string PackQParams(Isa isa, const W4A8Attrs& attrs, const float* scales, const uint8_t* zero_points,
                        PackedQParams* out) {
  const int64_t N = attrs.N, ng = attrs.n_groups(), P = PanelWidth(isa);
  out->panel = P;
  out->n_groups = ng;
  out->n_panels = (N + P - 1) / P;
  out->scales.assign(static_cast<size_t>(out->n_panels * ng * P), 0.0f);
  out->zp.assign(out->scales.size(), 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t base = (n / P) * ng * P + n % P;
    for (int64_t g = 0; g < ng; ++g) {
      out->scales[base + g * P] = scales[n * ng + g];
      uint8_t z = zero_points ? zero_points[n * ng + g] : kDefaultZeroPoint;
      if (z > 15) {
        return "W4A8MatMul: zero_points must be in 0..15, got " + std::to_string(z) + " at [" + std::to_string(n) +
               ", " + std::to_string(g) + "]";
      }
      out->zp[base + g * P] = z;
    }
  }
  return {};
}

void PackWeightsPanels(Isa isa, const W4A8Attrs& attrs, const uint8_t* B, std::vector<uint8_t>* out) {
  const int64_t N = attrs.N, G = attrs.group_size, ng = attrs.n_groups(), P = PanelWidth(isa);
  const int64_t row_bytes = ng * G / 2;  // bytes of one column in B
  const int64_t k_blocks = ng * G / 8;   // blocks of 8 k-elements (4 bytes of B, 4P packed bytes)
  const int64_t n_panels = (N + P - 1) / P;
  out->assign(static_cast<size_t>(n_panels * k_blocks * 4 * P), 0);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* src = B + n * row_bytes;
    uint8_t* dst = out->data() + (n / P) * k_blocks * 4 * P + 4 * (n % P);
    for (int64_t kb = 0; kb < k_blocks; ++kb, src += 4, dst += 4 * P) {
      // src bytes hold element pairs (k, k+1), (k+2, k+3), (k+4, k+5), (k+6, k+7);
      // dst byte i holds elements k+i (low) and k+4+i (high).
      dst[0] = static_cast<uint8_t>((src[0] & 0x0F) | (src[2] << 4));
      dst[1] = static_cast<uint8_t>((src[0] >> 4) | (src[2] & 0xF0));
      dst[2] = static_cast<uint8_t>((src[1] & 0x0F) | (src[3] << 4));
      dst[3] = static_cast<uint8_t>((src[1] >> 4) | (src[3] & 0xF0));
    }
  }
}

void Parallel::For(void (*fn)(void*, size_t), size_t total, void* data) const {
  if (run != nullptr && total > 1) {
    run(runner, fn, total, data);
  } else {
    for (size_t i = 0; i < total; ++i) fn(data, i);
  }
}

#ifndef FPTQ_SERIAL_WORK
#define FPTQ_SERIAL_WORK (int64_t{1} << 20)  // multiply-adds below which one thread does it all
#endif

namespace {

using detail::IsaKernels;

IsaKernels KernelsFor(Isa isa) {
  switch (isa) {
#if defined(FPTQ_HAVE_X86_KERNELS)
    case Isa::kAvx2: return detail::Avx2Kernels();
#if defined(FPTQ_HAVE_AVXVNNI)
    case Isa::kAvxVnni: return detail::AvxVnniKernels();
#endif
    case Isa::kAvx512Vnni: return detail::Avx512VnniKernels();
    case Isa::kAvx512Vnni512: return detail::Avx512Vnni512Kernels();
#if defined(FPTQ_HAVE_AMX)
    case Isa::kAmx: return detail::AmxKernels();
#endif
#endif
    default: return detail::ScalarKernels();
  }
}

}  // namespace

namespace detail {
bool NeedsPackedWeights(Isa isa) { return KernelsFor(isa).needs_packed_b; }
}  // namespace detail

namespace {

struct QuantJob {
  const detail::QuantArgs* args;
  detail::QuantizeRowsFn fn;
  int64_t M, rows_per_task;
  static void Run(void* p, size_t i) {
    auto* j = static_cast<QuantJob*>(p);
    const int64_t r0 = static_cast<int64_t>(i) * j->rows_per_task;
    j->fn(*j->args, r0, std::min(j->M, r0 + j->rows_per_task));
  }
};

// Copies 32-row blocks of q (rows Kq bytes apart) into AMX A-tile order.
struct TileOrderJob {
  const int8_t* q;
  int8_t* qt;
  int64_t Kq;
  static void Run(void* p, size_t i) {
    auto* j = static_cast<TileOrderJob*>(p);
    const int64_t rb = static_cast<int64_t>(i) * 32;
    int8_t* dst = j->qt + rb * j->Kq;
    for (int64_t c = 0; c < j->Kq; c += 64) {
      for (int64_t r = 0; r < 32; ++r, dst += 64) std::memcpy(dst, j->q + (rb + r) * j->Kq + c, 64);
    }
  }
};

struct TileJob {
  const detail::TileArgs* args;
  detail::TileFn fn;
  int64_t M, n_panels, row_block, panel_block, n_panel_blocks;
  static void Run(void* p, size_t i) {
    auto* j = static_cast<TileJob*>(p);
    const int64_t rb = static_cast<int64_t>(i) / j->n_panel_blocks;
    const int64_t pb = static_cast<int64_t>(i) % j->n_panel_blocks;
    const int64_t r0 = rb * j->row_block, p0 = pb * j->panel_block;
    j->fn(*j->args, r0, std::min(j->M, r0 + j->row_block), p0, std::min(j->n_panels, p0 + j->panel_block));
  }
};

}  // namespace

void W4A8Compute(Isa isa, const W4A8Problem& pb, const Parallel& parallel) {
  const W4A8Attrs& at = pb.attrs;
  const int64_t M = pb.M;
  if (M <= 0) return;
  const IsaKernels kern = KernelsFor(isa);
  if (pb.qp->panel != kern.panel) std::abort();  // packed for another ISA: a driver bug
  const uint8_t* B_packed = pb.B_packed;
  std::vector<uint8_t> local_packed;
  if (kern.needs_packed_b && B_packed == nullptr) {  // weights not constant: re-lay out every call
    PackWeightsPanels(isa, at, pb.B, &local_packed);
    B_packed = local_packed.data();
  }
  const bool gemm = kern.gemm != nullptr && M >= kAmxMinRows;

  const int64_t G = at.group_size;
  const int64_t Kq = (at.n_groups() * G + 63) / 64 * 64;
  const int64_t qsum_stride = (Kq + G - 1) / G;
  // Per-call scratch (the kernel object is shared by concurrent Run calls).
  // The GEMM tiles read whole 32-row blocks of q: pad rows are zero.
  const int64_t q_rows = gemm ? (M + 31) / 32 * 32 : M;
  std::unique_ptr<int8_t[]> q(new int8_t[static_cast<size_t>(q_rows * Kq)]);
  if (q_rows > M) std::memset(q.get() + M * Kq, 0, static_cast<size_t>((q_rows - M) * Kq));
  std::unique_ptr<int32_t[]> qsum(new int32_t[static_cast<size_t>(M * qsum_stride)]);
  std::unique_ptr<float[]> sa(new float[static_cast<size_t>(M)]);

  detail::QuantArgs qa{pb.A, at.K, Kq, G, qsum_stride, at.act_mode == ActMode::kPerToken,
                       pb.act_scale, q.get(), qsum.get(), sa.get()};
  if (M * at.K >= (int64_t{1} << 16) && M >= 8) {
    QuantJob job{&qa, kern.quantize, M, 4};
    parallel.For(&QuantJob::Run, static_cast<size_t>((M + job.rows_per_task - 1) / job.rows_per_task), &job);
  } else {
    kern.quantize(qa, 0, M);
  }

  std::unique_ptr<int8_t[]> q_tiles;
  if (gemm) {  // 64-byte aligned (the A tile loads): over-allocate and round up
    q_tiles.reset(new int8_t[static_cast<size_t>(q_rows * Kq + 64)]);
  }
  int8_t* qt = gemm ? reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(q_tiles.get()) + 63) & ~uintptr_t{63})
                    : nullptr;
  if (gemm) {
    TileOrderJob tj{q.get(), qt, Kq};
    parallel.For(&TileOrderJob::Run, static_cast<size_t>(q_rows / 32), &tj);
  }

  detail::TileArgs ta{at.K, at.N, G, at.n_groups(), Kq, qsum_stride, pb.B, B_packed, pb.qp,
                      q.get(), qsum.get(), sa.get(), pb.bias, pb.Y, qt};
  const int64_t n_panels = pb.qp->n_panels;
  TileJob job{&ta, gemm ? kern.gemm : kern.tile, M, n_panels, 0, 0, 0};
  if (gemm) {
    // Cache blocks: an even number (2..8) of panels whose unpacked int8 weights
    // (K x 16 bytes per panel) fit ~768 KiB of L2, times as many rows as keep
    // >= 16 tasks (each task unpacks its weights once: more rows amortize that).
    const int64_t unpacked_panel = at.n_groups() * G * 16;
    const int64_t fit = std::max<int64_t>(2, std::min<int64_t>(8, (int64_t{768} << 10) / unpacked_panel)) / 2 * 2;
    job.panel_block = std::min<int64_t>(n_panels, fit);
    const int64_t n_pb = (n_panels + job.panel_block - 1) / job.panel_block;
    job.row_block = std::min<int64_t>((M + 31) / 32 * 32, 1024);
    while (job.row_block > 32 && n_pb * ((M + job.row_block - 1) / job.row_block) < 16)
      job.row_block = (job.row_block / 2 + 31) / 32 * 32;
  } else {
    job.row_block = std::min<int64_t>(M, 64);
    // Tasks of >= ~256K multiply-adds (pool dispatch costs ~microseconds), but at
    // least 8 panel blocks when N allows, for load balance; 16-column kernels
    // stream 4 panels at once for small M, so blocks of >= 4 panels.
    const int64_t panel_work = job.row_block * at.K * kern.panel;
    const int64_t max_block = std::max<int64_t>(kern.panel == kPanelZmm ? 4 : 1, (n_panels + 7) / 8);
    job.panel_block =
        std::min<int64_t>(max_block, std::max<int64_t>(1, ((int64_t{1} << 18) + panel_work - 1) / panel_work));
    if (kern.panel == kPanelZmm) job.panel_block = std::min(n_panels, (job.panel_block + 3) / 4 * 4);
  }
  job.n_panel_blocks = (n_panels + job.panel_block - 1) / job.panel_block;
  const int64_t n_row_blocks = (M + job.row_block - 1) / job.row_block;
  const size_t n_tasks = static_cast<size_t>(n_row_blocks * job.n_panel_blocks);
  if (M * at.K * at.N < FPTQ_SERIAL_WORK) {  // too small to pay for the thread pool
    for (size_t i = 0; i < n_tasks; ++i) TileJob::Run(&job, i);
  } else {
    parallel.For(&TileJob::Run, n_tasks, &job);
  }
}

}  // namespace cpu
}  // namespace fptq
