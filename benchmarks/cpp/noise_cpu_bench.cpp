// Micro-benchmark of the CPU noise generator (csrc/cpu/noise_cpu.h), single
// thread, independent of torch: ns per normal. Build and run:
//   g++ -O3 -fno-math-errno -std=c++17 -I csrc benchmarks/cpp/noise_cpu_bench.cpp -o /tmp/nb && /tmp/nb
#include <chrono>
#include <cstdio>
#include <vector>

#include "cpu/noise_cpu.h"

int main() {
#ifndef NB_LOG2
#define NB_LOG2 22
#endif
  const int64_t n = int64_t(1) << NB_LOG2;
  std::vector<float> out(16384);
  const fastdiff::PhiloxKey k = fastdiff::make_key(1234, 5);
  double best = 1e30, sum = 0;
  for (int rep = 0; rep < 7; ++rep) {
    auto a = std::chrono::steady_clock::now();
    for (int64_t p = 0; p < n; p += 16384) fastdiff::cpu_noise::fill_normal(k, p, 16384, out.data());
    auto b = std::chrono::steady_clock::now();
    const double ns = std::chrono::duration<double, std::nano>(b - a).count() / n;
    best = ns < best ? ns : best;
    for (float v : out) sum += v;
  }
  std::printf("fill_normal: %.2f ns/normal (best of 7, %lld normals), checksum %.3f\n", best, (long long)n, sum);
  return 0;
}
