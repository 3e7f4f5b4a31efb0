// The CPU's fused multiply-add throughput on one thread, measured: the yardstick the kernel benchmark divides the
// fused ops' GFLOP/s by. 14 independent accumulator chains, enough to cover the FMA latency on the cores we run
// on, with the vector width of the instruction set the kernels use (cpu_isa.h).
#include <chrono>

#include "cpu_isa.h"
#include "ops.h"

namespace esvit {
namespace {

#define ESVIT_PEAK_LOOP(BYTES)                                                         \
  typedef float Vec __attribute__((vector_size(BYTES)));                               \
  constexpr int kChains = 14;                                                          \
  Vec acc[kChains];                                                                    \
  for (int i = 0; i < kChains; ++i) acc[i] = Vec{} + 0.001f * i;                       \
  const Vec a = Vec{} + 0.9999f, b = Vec{} + 0.0001f;                                  \
  const auto start = std::chrono::steady_clock::now();                                 \
  double elapsed = 0;                                                                  \
  long rounds = 0;                                                                     \
  while (elapsed < seconds) {                                                          \
    for (long it = 0; it < (1L << 20); ++it)                                           \
      _Pragma("GCC unroll 14") for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * a + b; \
    rounds += 1L << 20;                                                                \
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); \
  }                                                                                    \
  float sink = 0;                                                                      \
  for (int i = 0; i < kChains; ++i) sink += acc[i][0];                                 \
  asm volatile("" : : "r"(sink)); /* keeps the chains alive */                         \
  return rounds * kChains * (BYTES / 4) * 2.0 / elapsed / 1e9;

double peak_base(double seconds) { ESVIT_PEAK_LOOP(32) }
#ifdef ESVIT_HAVE_AVX512
ESVIT_AVX512_TARGET double peak_avx512(double seconds) { ESVIT_PEAK_LOOP(64) }
#endif

}  // namespace

double cpu_fma_peak_gflops(double seconds) {
#ifdef ESVIT_HAVE_AVX512
  if (cpu_isa() == CpuIsa::avx512) return peak_avx512(seconds);
#endif
  return peak_base(seconds);
}

}  // namespace esvit
