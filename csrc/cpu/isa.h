// Which instruction set the CPU kernels use, chosen once per process.
//
// The hot CPU loops (noise generator, float32 step body, GroupNorm) are
// compiled twice: for the x86-64 baseline and for AVX2 (+FMA for GroupNorm).
// The AVX2 build runs when the CPU has the features (checked by feature, not
// by model, so AMD gets it too) unless the environment says otherwise:
//
//   FASTDIFF_CPU_ISA=baseline   use the baseline build even on an AVX2 CPU
//
// so the path that CPUs without AVX2 take can be tested on any machine
// (tests/test_cpu_isa.py runs the kernels both ways in subprocesses).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(FASTDIFF_NO_TARGET_CLONES)
#define FD_X86_DISPATCH 1
#else
#define FD_X86_DISPATCH 0
#endif

namespace fastdiff {

// True unless FASTDIFF_CPU_ISA asks for the baseline build.
inline bool cpu_isa_env_allows_avx2() {
  static const bool ok = [] {
    const char* e = std::getenv("FASTDIFF_CPU_ISA");
    return !(e != nullptr && (std::strcmp(e, "baseline") == 0 || std::strcmp(e, "default") == 0));
  }();
  return ok;
}

// AVX2 kernels (noise generator, float32 step body).
inline bool cpu_use_avx2() {
#if FD_X86_DISPATCH
  static const bool ok = __builtin_cpu_supports("avx2") && cpu_isa_env_allows_avx2();
  return ok;
#else
  return false;
#endif
}

// AVX2 + FMA kernels (GroupNorm).
inline bool cpu_use_avx2_fma() {
#if FD_X86_DISPATCH
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_isa_env_allows_avx2();
  return ok;
#else
  return false;
#endif
}

}  // namespace fastdiff
