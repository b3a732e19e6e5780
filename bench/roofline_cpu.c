/* What this CPU allows any int8 x int4 kernel, measured (bench/roofline.py compiles and loads it).
 *
 * fptq_roofline_vnni_macs: int8 multiply-adds per second of zmm vpdpbusd, 16 independent
 *   accumulator chains per thread (enough to hide its latency), on `threads` threads at once.
 *   A GEMM whose peer runs the same instruction (DynamicQuantizeMatMul on an AVX-512 VNNI CPU
 *   without AMX) cannot be beaten by more than peer_ms / (M K N / this).
 * fptq_roofline_read_bytes: bytes per second of a read of `bytes` (split over `threads` threads)
 *   that starts cache-cold (a 256 MiB buffer is written first), best of `reps`.  A decode step
 *   (M = 1) must read every weight byte once, so this bounds every kernel at M = 1.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TGT __attribute__((target("avx512f,avx512bw,avx512vnni")))

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef struct {
  long iters;
  const char* buf;
  size_t bytes;
  pthread_barrier_t* start;
  double seconds;
  int sink;
} Job;

#define DP(i) a##i = _mm512_dpbusd_epi32(a##i, x, y)
TGT static void* vnni_job(void* p) {
  Job* j = (Job*)p;
  /* distinct starts, or the compiler merges the identical chains into one */
  __m512i a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1), a2 = _mm512_set1_epi32(2);
  __m512i a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5);
  __m512i a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7), a8 = _mm512_set1_epi32(8);
  __m512i a9 = _mm512_set1_epi32(9), a10 = _mm512_set1_epi32(10), a11 = _mm512_set1_epi32(11);
  __m512i a12 = _mm512_set1_epi32(12), a13 = _mm512_set1_epi32(13), a14 = _mm512_set1_epi32(14);
  __m512i a15 = _mm512_set1_epi32(15);
  __m512i x = _mm512_set1_epi32(0x01020304), y = _mm512_set1_epi32(0x05060708);
  pthread_barrier_wait(j->start);
  double t = now_s();
  for (long it = 0; it < j->iters; ++it) {
    DP(0); DP(1); DP(2); DP(3); DP(4); DP(5); DP(6); DP(7);
    DP(8); DP(9); DP(10); DP(11); DP(12); DP(13); DP(14); DP(15);
    __asm__ volatile("" : "+v"(x), "+v"(y)); /* keep the loop from being folded */
  }
  j->seconds = now_s() - t;
  __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                               _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)),
                                           _mm512_add_epi32(_mm512_add_epi32(a12, a13), _mm512_add_epi32(a14, a15))));
  j->sink = _mm512_reduce_add_epi32(s);
  return NULL;
}

TGT static void* read_job(void* p) {
  Job* j = (Job*)p;
  __m512i acc = _mm512_setzero_si512();
  pthread_barrier_wait(j->start);
  double t = now_s();
  for (size_t i = 0; i + 256 <= j->bytes; i += 256) {
    acc = _mm512_xor_si512(acc, _mm512_load_si512(j->buf + i));
    acc = _mm512_xor_si512(acc, _mm512_load_si512(j->buf + i + 64));
    acc = _mm512_xor_si512(acc, _mm512_load_si512(j->buf + i + 128));
    acc = _mm512_xor_si512(acc, _mm512_load_si512(j->buf + i + 192));
  }
  j->seconds = now_s() - t;
  j->sink = _mm512_reduce_add_epi32(acc);
  return NULL;
}

/* Runs fn on `threads` (1..64) threads released together; returns the slowest thread's seconds. */
static double run_threads(void* (*fn)(void*), Job* jobs, int threads) {
  pthread_barrier_t start;
  pthread_t tid[64];
  if (pthread_barrier_init(&start, NULL, (unsigned)threads) != 0) abort();
  for (int i = 0; i < threads; ++i) {
    jobs[i].start = &start;
    if (pthread_create(&tid[i], NULL, fn, &jobs[i]) != 0) abort();
  }
  double worst = 0.0;
  for (int i = 0; i < threads; ++i) {
    pthread_join(tid[i], NULL);
    if (jobs[i].seconds > worst) worst = jobs[i].seconds;
  }
  pthread_barrier_destroy(&start);
  return worst;
}

double fptq_roofline_vnni_macs(int threads, long iters) {
  Job jobs[64] = {0};
  if (threads < 1 || threads > 64) return -1.0;
  for (int i = 0; i < threads; ++i) jobs[i].iters = iters;
  return (double)iters * 16 * 64 * threads / run_threads(vnni_job, jobs, threads);
}

double fptq_roofline_read_bytes(size_t bytes, int threads, int reps) {
  const size_t evict_bytes = (size_t)256 << 20;
  const size_t per = threads >= 1 ? (bytes / (size_t)threads + 255) / 256 * 256 : 0;
  char* buf = aligned_alloc(64, per * (size_t)(threads >= 1 ? threads : 1) + 64);
  char* evict = aligned_alloc(64, evict_bytes);
  double best = -1.0;
  if (threads >= 1 && threads <= 64 && buf != NULL && evict != NULL) {
    memset(buf, 1, per * (size_t)threads);
    for (int r = 0; r < reps; ++r) {
      for (size_t i = 0; i < evict_bytes; i += 64) evict[i] = (char)(evict[i] + 1);
      Job jobs[64] = {0};
      for (int i = 0; i < threads; ++i) {
        jobs[i].buf = buf + per * (size_t)i;
        jobs[i].bytes = per;
      }
      const double rate = (double)(per * (size_t)threads) / run_threads(read_job, jobs, threads);
      if (rate > best) best = rate;
    }
  }
  free(buf);
  free(evict);
  return best;
}
