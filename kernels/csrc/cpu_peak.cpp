// The CPU's fused multiply-add throughput on one thread, measured: the yardstick the kernel benchmark divides the
// fused ops' GFLOP/s by. 14 independent accumulator chains of 8-float vectors, enough to cover the FMA latency
// on the cores we run on; compiled with the same flags as the kernels (-mavx2 -mfma on x86_64).
#include <chrono>

#include "ops.h"

namespace esvit {

double cpu_fma_peak_gflops(double seconds) {
  typedef float Vec __attribute__((vector_size(32)));
  constexpr int kChains = 14;
  Vec acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = Vec{} + 0.001f * i;
  const Vec a = Vec{} + 0.9999f, b = Vec{} + 0.0001f;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  long rounds = 0;
  while (elapsed < seconds) {
    for (long it = 0; it < (1L << 20); ++it)
#pragma GCC unroll 14
      for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * a + b;
    rounds += 1L << 20;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  float sink = 0;
  for (int i = 0; i < kChains; ++i) sink += acc[i][0];
  asm volatile("" : : "r"(sink));  // keeps the chains alive
  return rounds * kChains * 8 * 2.0 / elapsed / 1e9;
}

}  // namespace esvit
