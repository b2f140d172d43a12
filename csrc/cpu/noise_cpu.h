// The CPU generator of the fastdiff noise stream (Philox4x32-10 +
// Box-Muller, defined in fastdiff/reference/noise.py), written so the
// compiler vectorises it: 64 Philox groups per block with the 32x32->64
// multiplies in plain loops, and a branch-free polynomial log / sin / cos.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"

#include "isa.h"

#if FD_X86_DISPATCH
// An AVX2 build next to the baseline one, chosen at run time by CPU feature
// (isa.h: not by CPU model, so AMD gets it too; FASTDIFF_CPU_ISA=baseline
// forces the baseline): a 3-4x faster noise generator without tying the
// build to the build machine. (target("avx2") without FMA: both builds
// round every operation alike.)
#define FD_TARGET_AVX2 __attribute__((target("avx2"), noinline))
#endif

#if defined(__GNUC__)
// Inlined into the AVX2 clone too (GCC will not inline a default-target
// function there otherwise, which left the Box-Muller loop scalar).
#define FD_INLINE inline __attribute__((always_inline))
#else
#define FD_INLINE inline
#endif

namespace fastdiff {
namespace cpu_noise {

constexpr int kGroups = 64;        // Philox groups generated per inner block (256 normals)

FD_INLINE float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
FD_INLINE uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// ln(u) for u in [2^-33, 1]: exponent split, mantissa folded into
// [sqrt(1/2), sqrt(2)), then 2 atanh(s) as a series (|s| <= 0.1716, error < 1e-9).
// Branch-free (integer 0/1 masks instead of selects) so the loop vectorises.
FD_INLINE float log_unit(float u) {
  const uint32_t bits = float_to_bits(u);
  const uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;  // mantissa as a float in [1, 2)
  const int32_t big = static_cast<int32_t>(mbits > 0x3FB504F3u);  // m > sqrt(2)
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + big;
  const float m = bits_to_float(mbits - (static_cast<uint32_t>(big) << 23));  // halve m when big
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float p = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  return static_cast<float>(e) * 0.69314718f + 2.0f * s * p;
}

// sin and cos of 2*pi*v for v in [0, 1): nearest quadrant, then Taylor
// polynomials on [-pi/4, pi/4] (truncation error < 2e-9). The quadrant swap
// and signs are arithmetic blends, again so that the loop vectorises.
FD_INLINE void sincos_2pi(float v, float& s_out, float& c_out) {
  const float x = v * 4.0f;                   // in [0, 4)
  const int qi = static_cast<int>(x + 0.5f);  // nearest quadrant (x >= 0: truncation = floor)
  const float p = (x - static_cast<float>(qi)) * 1.57079633f;
  const float p2 = p * p;
  const float sp =
      p * (1.0f + p2 * (-1.0f / 6 + p2 * (1.0f / 120 + p2 * (-1.0f / 5040 + p2 * (1.0f / 362880)))));
  const float cp =
      1.0f + p2 * (-0.5f + p2 * (1.0f / 24 + p2 * (-1.0f / 720 + p2 * (1.0f / 40320 + p2 * (-1.0f / 3628800)))));
  const float swap = static_cast<float>(qi & 1);
  const float sgn_s = 1.0f - 2.0f * static_cast<float>((qi >> 1) & 1);
  const float sgn_c = 1.0f - 2.0f * static_cast<float>(((qi + 1) >> 1) & 1);
  s_out = sgn_s * (sp + swap * (cp - sp));
  c_out = sgn_c * (cp + swap * (sp - cp));
}

// Normals 4*g0 .. 4*g0 + 4*G - 1 of the stream into z (G <= kGroups).
FD_INLINE void normal_block_body(const PhiloxKey k, uint64_t g0, int G, float* z) {
  uint32_t c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int i = 0; i < G; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(g);
    c1[i] = static_cast<uint32_t>(g >> 32);
    c2[i] = k.o_lo;
    c3[i] = k.o_hi;
  }
  uint32_t k0 = k.s_lo, k1 = k.s_hi;
  for (int r = 0; r < 10; ++r) {
    for (int i = 0; i < G; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[i];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(p1);
      c3[i] = static_cast<uint32_t>(p0);
      c0[i] = n0;
      c2[i] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int i = 0; i < G; ++i) {
    const float ua = static_cast<float>(c0[i]) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
    const float ub = static_cast<float>(c2[i]) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
    const float ra = std::sqrt(-2.0f * log_unit(ua));
    const float rb = std::sqrt(-2.0f * log_unit(ub));
    float sa, ca, sb, cb;
    sincos_2pi(static_cast<float>(c1[i]) * 2.3283064365386963e-10f, sa, ca);
    sincos_2pi(static_cast<float>(c3[i]) * 2.3283064365386963e-10f, sb, cb);
    z[4 * i + 0] = ra * ca;
    z[4 * i + 1] = ra * sa;
    z[4 * i + 2] = rb * cb;
    z[4 * i + 3] = rb * sb;
  }
}

#if FD_X86_DISPATCH
static FD_TARGET_AVX2 void normal_block_avx2(const PhiloxKey k, uint64_t g0, int G, float* z) {
  normal_block_body(k, g0, G, z);
}
#endif
static __attribute__((noinline)) void normal_block_base(const PhiloxKey k, uint64_t g0, int G, float* z) {
  normal_block_body(k, g0, G, z);
}
static inline void normal_block(const PhiloxKey k, uint64_t g0, int G, float* z) {
#if FD_X86_DISPATCH
  if (cpu_use_avx2()) return normal_block_avx2(k, g0, G, z);
#endif
  normal_block_base(k, g0, G, z);
}

// Normals for stream positions [start, start + n) into out (n <= kChunk).
static inline void fill_normal(const PhiloxKey& k, uint64_t start, int64_t n, float* out) {
  float z[4 * kGroups];
  uint64_t pos = start;
  const uint64_t end = start + static_cast<uint64_t>(n);
  while (pos < end) {
    const uint64_t g0 = pos / 4;
    const uint64_t groups_left = (end - g0 * 4 + 3) / 4;
    const int G = static_cast<int>(std::min<uint64_t>(groups_left, kGroups));
    normal_block(k, g0, G, z);
    const uint64_t blk_end = std::min<uint64_t>(end, (g0 + G) * 4);
    for (uint64_t p = pos; p < blk_end; ++p) out[p - start] = z[p - g0 * 4];
    pos = blk_end;
  }
}

}  // namespace cpu_noise
}  // namespace fastdiff
