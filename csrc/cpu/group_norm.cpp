// CPU kernels of GroupNorm(x + add) * weight + bias, * (1 + scale) + shift,
// then SiLU, forward and backward. The maths is in
// fastdiff/reference/blocks.py, the host contract in csrc/blocks.h.
//
// Memory plan: each input is read from DRAM once per pass that cannot be
// avoided; the other passes hit L1/L2.
//  - NCHW: one (n, g) group at a time. The group is contiguous and small
//    (2-64 KB in U-Nets): two statistics passes (the first over an
//    eighth of the group) and the normalising pass
//    all read it from cache, and the next group is prefetched while this
//    one is normalised (float32 on AVX2 + FMA: a pipelined loop with an
//    intrinsics SiLU, see fwd_nchw_f32_fast; the forward's chunks of
//    groups come from a shared counter, see run_groups). The backward
//    keeps silu'(z) dy of the group in a float buffer for its dx pass.
//  - NHWC: rows of C channels. Per-channel statistics over blocks of rows
//    (two-pass inside an L1-sized block, blocks merged exactly by Chan's
//    formula), folded into group statistics, then a second sweep
//    normalises. Whole samples per task when there are enough samples for
//    the threads, else spatial tiles in two parallel phases.
// Statistics: float sums over short runs, then double; the second pass is
// centred on the first pass's mean and corrected by its residual sum, and
// x - mean is formed as (x - hi) - lo with hi + lo = mean in double, so an
// input offset of 1e3 costs no accuracy. float64 data runs the same code in
// double. fp16/bf16 are converted with branch-free bit arithmetic, so every
// loop vectorises; the kernels are compiled once more for AVX2 + FMA.
// Parameter gradients are reduced over n in a fixed order: deterministic
// for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "../blocks.h"
#include "isa.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(FASTDIFF_NO_TARGET_CLONES)
// Every kernel is compiled twice: for the baseline and for AVX2 + FMA,
// picked at run time by CPU feature (not by CPU model, so AMD gets it too).
// FMA roughly halves the SiLU polynomial, which is what bounds the forward
// once the data is in cache; target_clones("avx2") alone would leave it out.
#define FD_GN_X86 1
#define FD_AVX2_FMA __attribute__((target("avx2,fma")))
#include <immintrin.h>
#else
#define FD_GN_X86 0
#define FD_AVX2_FMA
#endif

#ifndef FD_INLINE
#if defined(__GNUC__)
// Inlined into the AVX2 clone too (GCC does not otherwise inline a
// default-target helper there, which leaves the loop scalar).
#define FD_INLINE inline __attribute__((always_inline))
#else
#define FD_INLINE inline
#endif
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The per-channel arrays of a loop never overlap; GCC cannot see it through
// the pointers computed from GnP (it would need > 10 runtime alias checks
// and then leaves the loop scalar).
#define FD_IVDEP _Pragma("GCC ivdep")
#else
#define FD_IVDEP
#endif

// Float sums over a run of <= kFlush elements, vectorised as an OpenMP SIMD
// reduction (the only way to let the compiler reorder a float sum without
// -ffast-math); the runs are then added in double.
#define FD_PRAGMA(x) _Pragma(#x)
#ifdef _OPENMP
#define FD_SIMD_SUM(...) FD_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define FD_SIMD_SUM(...)
#endif

namespace fastdiff {
namespace {

constexpr int64_t kFlush = 512;     // elements summed in float before the sum moves to double
constexpr int64_t kRun = 256;       // the same for the vector accumulators of the statistics passes
constexpr int64_t kSumRows = 16;    // the same for the per-channel sums of the NHWC backward (in rows)
constexpr int64_t kMinWork = 32768; // elements per thread below which a tensor stays on one thread
constexpr int64_t kMaxDzScratch = 1 << 19;  // NHWC backward: largest sample whose dz is kept (2 MB fp32)

// ------------------------------------------------------- element types ----
FD_INLINE float bits_f(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
FD_INLINE uint32_t f_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// c ? a : b through integer masks. A float select can be turned into a
// branch around the arithmetic feeding it (FP ops may trap, so they are not
// speculated), which stops the loop from vectorising; and/or cannot.
FD_INLINE uint32_t sel_u(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}
FD_INLINE float sel(bool c, float a, float b) { return bits_f(sel_u(c, f_bits(a), f_bits(b))); }
FD_INLINE double sel(bool c, double a, double b) { return c ? a : b; }

// float16 <-> float32 by integer arithmetic and selects (no table, no
// branch), exact and round-to-nearest-even like c10::Half.
FD_INLINE float half_to_float(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const uint32_t e = h & 0x7C00u;
  uint32_t u = sel_u(e == 0x7C00u, em | 0x7F800000u, em + (112u << 23));  // inf / NaN keep their payload
  // subnormals from the integer mantissa (no subnormal float arithmetic,
  // so this stays exact when denormals are flushed)
  u = sel_u(e == 0u, f_bits(static_cast<float>(h & 0x3FFu) * 5.9604644775390625e-8f /* 2^-24 */), u);
  return bits_f(u | (static_cast<uint32_t>(h & 0x8000u) << 16));
}
FD_INLINE uint16_t float_to_half(float f) {
  const uint32_t b = f_bits(f);
  const uint32_t sign = (b >> 16) & 0x8000u, u = b & 0x7FFFFFFFu;
  const uint32_t norm = (u - (112u << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
  // below 2^-14: adding 0.5 leaves the value in units of 2^-24 (the fp16
  // subnormal step) in the mantissa, rounded to nearest even by the FPU
  const uint32_t sub = f_bits(bits_f(u) + 0.5f) - 0x3F000000u;
  uint32_t h = sel_u(u < 0x38800000u, sub, norm);
  h = sel_u(u >= 0x477FF000u, 0x7C00u, h);  // rounds to >= 65520: inf
  h = sel_u(u > 0x7F800000u, 0x7E00u, h);   // NaN
  return static_cast<uint16_t>(h | sign);
}
FD_INLINE float bf16_to_float(uint16_t h) { return bits_f(static_cast<uint32_t>(h) << 16); }
FD_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t b = f_bits(f);
  const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((b & 0x7FFFFFFFu) > 0x7F800000u ? ((b >> 16) | 0x40u) : r);
}

// How a kernel reads and writes one storage type: raw element, compute type T.
struct IoF32 {
  using raw = float;
  using T = float;
  static constexpr bool kWide = false;
  static FD_INLINE float load(float v) { return v; }
  static FD_INLINE float store(float v) { return v; }
};
struct IoF64 {
  using raw = double;
  using T = double;
  static constexpr bool kWide = false;
  static FD_INLINE double load(double v) { return v; }
  static FD_INLINE double store(double v) { return v; }
};
struct IoF16 {
  using raw = uint16_t;
  using T = float;
  static constexpr bool kWide = true;
  static FD_INLINE float load(uint16_t v) { return half_to_float(v); }
  static FD_INLINE uint16_t store(float v) { return float_to_half(v); }
};
struct IoBF16 {
  using raw = uint16_t;
  using T = float;
  static constexpr bool kWide = true;
  static FD_INLINE float load(uint16_t v) { return bf16_to_float(v); }
  static FD_INLINE uint16_t store(float v) { return float_to_bf16(v); }
};
template <typename T>
using IoPlain = typename std::conditional<std::is_same<T, double>::value, IoF64, IoF32>::type;

// ----------------------------------------------------------------- SiLU ----
// exp(t) for t <= 0 in float: t = k ln2 + r with |r| <= ln2/2 (Cody-Waite),
// exp(r) by a degree-6 polynomial (relative-error minimax fit, 0.2 ulp with
// float coefficients) in Estrin form for a short dependency chain, 2^k
// added straight into the exponent bits. Below t = -86.5 the result is
// flushed to 0 (exp < 3e-38 there; above it 2^k stays a normal number, and
// the garbage computed for smaller t is discarded). Branch-free, so the
// loops around it vectorise. Error <= 2 ulp.
FD_INLINE float exp_nonpos(float t) {
  // 1.5 * 2^23 + round(t / ln2): k sits in the low mantissa bits of j
  const float j = t * 1.44269504088896341f + 12582912.0f;
  const float kf = j - 12582912.0f;
  const float r = (t - kf * 0.693145751953125f) - kf * 1.42860682030941723e-6f;
  const float r2 = r * r;
  const float lo = (1.0f + r) + r2 * (0.49999991059303284f + r * 0.16666407883167267f);
  const float hi = (0.04166821762919426f + r * 0.0083757434040308f) + r2 * 0.0013840249739587307f;
  const float p = lo + (r2 * r2) * hi;
  // (bits of j) << 23 == k << 23: the 1.5 * 2^23 offset has no bits left there
  const uint32_t e = f_bits(p) + (f_bits(j) << 23);
  return bits_f(sel_u(t < -86.5f, 0u, e));
}
FD_INLINE double exp_nonpos(double t) { return std::exp(t); }
FD_INLINE float neg_abs(float z) { return bits_f(f_bits(z) | 0x80000000u); }
FD_INLINE double neg_abs(double z) { return -std::fabs(z); }

// silu(z) = z sigmoid(z), sigmoid from e = exp(-|z|) <= 1 (never overflows).
template <typename T>
FD_INLINE T silu(T z) {
  const T e = exp_nonpos(neg_abs(z));
  return z * sel(z >= T(0), T(1), e) / (T(1) + e);
}
// silu'(z) = s (1 + z (1 - s)), with 1 - s also from e (no cancellation).
template <typename T>
FD_INLINE T dsilu(T z) {
  const T e = exp_nonpos(neg_abs(z));
  const T inv = T(1) / (T(1) + e);
  const bool pos = z >= T(0);
  const T s = sel(pos, T(1), e) * inv, sc = sel(pos, e, T(1)) * inv;
  return s * (T(1) + z * sc);
}

// --------------------------------------------------------------- params ----
// Per-(n, c) coefficient arrays (each N*C of T) used by the normalising
// passes: forward {hi, lo, a, b}: y = act(((x - hi) - lo) a + b) where
// hi + lo = mean - add splits the offset so x - offset is exact for any
// mean; backward {hi, lo, rs, za, zb, P, Q, Tt}: xhat = ((x - hi) - lo) rs,
// z = xhat za + zb, dx = P dz - Q xhat - Tt.
enum { kHi = 0, kLo, kA, kB };
enum { kRs = 2, kZa, kZb, kP, kQ, kTt, kNumBwdCoef };

struct GnP {
  const void* x = nullptr;
  void* y = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  const void *w = nullptr, *b = nullptr, *add = nullptr, *scale = nullptr, *shift = nullptr;
  void* mean = nullptr;  // (N, G) of T
  void* rstd = nullptr;
  void* dadd = nullptr;  // (N, C) of T, backward
  double* A = nullptr;   // (N, C) backward sums sum dz, sum dz xhat
  double* B = nullptr;
  void* coef = nullptr;  // coefficient arrays, see above
  int64_t N = 0, C = 0, S = 0, G = 0, D = 0;
  int64_t tiles = 1, tile_rows = 0, block = 1;
  double eps = 0.0;
  bool silu = false;
};

// Scratch that every kernel writes before reading (no zero fill).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

template <typename T>
FD_INLINE T* coef_row(const GnP& p, int k, int64_t n) {
  return static_cast<T*>(p.coef) + (k * p.N + n) * p.C;
}
template <typename T>
FD_INLINE double vget(const void* v, int64_t i, double dflt) {
  return v ? static_cast<double>(static_cast<const T*>(v)[i]) : dflt;
}
// hi + lo = m - add[c] for the D channels from c0 (add row `ad` may be null)
template <typename T>
FD_INLINE void split_offsets(double m, const T* ad, int64_t D, T* hi, T* lo) {
  for (int64_t d = 0; d < D; ++d) {
    const double o = m - (ad ? static_cast<double>(ad[d]) : 0.0);
    hi[d] = static_cast<T>(o);
    lo[d] = static_cast<T>(o - static_cast<double>(hi[d]));
  }
}
// a = rstd weight (1 + scale), b = bias (1 + scale) + shift for channels c0..c0+D
template <typename T>
FD_INLINE void affine(const GnP& p, int64_t n, int64_t c0, int64_t D, double rstd, T* a, T* b) {
  for (int64_t d = 0; d < D; ++d) {
    const int64_t c = c0 + d, nc = n * p.C + c;
    const double s1 = 1.0 + vget<T>(p.scale, nc, 0.0);
    a[d] = static_cast<T>(rstd * vget<T>(p.w, c, 1.0) * s1);
    b[d] = static_cast<T>(vget<T>(p.b, c, 0.0) * s1 + vget<T>(p.shift, nc, 0.0));
  }
}

// ------------------------------------------------------ forward, NCHW ----
// A 32-byte GCC vector of T (two SSE registers in the baseline build).
template <typename T>
struct Vec32 {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int kW = 32 / sizeof(T);
};
// (by reference: a 32-byte vector passed by value trips the AVX ABI warning)
template <typename V, typename T>
FD_INLINE void vload(V& v, const T* p) {
  std::memcpy(&v, p, sizeof v);
}
// acc (4 doubles) += the lanes of v, widened: moves a float sum to double
// without a horizontal reduction.
typedef double Vd4 __attribute__((vector_size(32)));
template <typename V>
FD_INLINE void widen_add(Vd4& acc, const V& v) {
  if constexpr (sizeof(v[0]) == 4) {
    typedef float V4f __attribute__((vector_size(16)));
    V4f lo, hi;
    std::memcpy(&lo, &v, 16);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 16, 16);
    acc += __builtin_convertvector(lo, Vd4) + __builtin_convertvector(hi, Vd4);
  } else {
    acc += v;
  }
}

// Sums of d = (p - hi[r]) - lo[r] (and of d^2) over `rows` rows of S
// values. The vector accumulators run across rows (a per-row reduction
// would cost as much as the row when S is small) and are widened into
// double every kRun elements (float sums of 1e3 terms would cost ~1e-6 of
// relative accuracy); row tails go to scalar sums. Two accumulators per
// sum hide the add latency (the data is in L1 after the first pass).
template <typename T, bool kSq>
FD_INLINE void group_sums(const T* __restrict__ p, int64_t rows, int64_t S, const T* hi, const T* lo, double& s1,
                          double& s2) {
  using V = typename Vec32<T>::type;
  constexpr int W = Vec32<T>::kW;
  V a0 = {}, a1 = {}, q0 = {}, q1 = {};
  Vd4 da = {}, dq = {};
  T ta = T(0), tq = T(0);
  int64_t cnt = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ v = p + r * S;
    const T h = hi[r], o = lo[r];
    int64_t j = 0;
    for (; j + 2 * W <= S; j += 2 * W) {
      V d0, d1;
      vload(d0, v + j);
      vload(d1, v + j + W);
      d0 = (d0 - h) - o;
      d1 = (d1 - h) - o;
      a0 += d0;
      a1 += d1;
      if (kSq) {
        q0 += d0 * d0;
        q1 += d1 * d1;
      }
      if ((cnt += 2 * W) >= kRun) {
        widen_add(da, a0 + a1);
        if (kSq) widen_add(dq, q0 + q1);
        a0 = a1 = q0 = q1 = V{};
        cnt = 0;
      }
    }
    for (; j + W <= S; j += W) {
      V d;
      vload(d, v + j);
      d = (d - h) - o;
      a0 += d;
      if (kSq) q0 += d * d;
      cnt += W;
    }
    for (; j < S; ++j) {
      const T d = (v[j] - h) - o;
      ta += d;
      if (kSq) tq += d * d;
    }
    if (S % W != 0 && r % 16 == 15) {  // keep the tail sums short too
      da[0] += static_cast<double>(ta);
      dq[0] += static_cast<double>(tq);
      ta = tq = T(0);
    }
  }
  widen_add(da, a0 + a1);
  widen_add(dq, q0 + q1);
  s1 = (da[0] + da[2]) + (da[1] + da[3]) + static_cast<double>(ta);
  s2 = kSq ? (dq[0] + dq[2]) + (dq[1] + dq[3]) + static_cast<double>(tq) : 0.0;
}

// Asks for bytes [p, p + n) to be brought into L2 (prefetches never fault,
// and the address is formed as an integer, so p + n may lie past the data).
FD_INLINE void prefetch_l2(const void* p, int64_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (int64_t o = 0; o < n; o += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a + static_cast<uintptr_t>(o)), 0, 2);
}

template <class In, class Out, bool kSilu, typename T>
FD_INLINE void norm_row(const typename In::raw* __restrict__ x, typename Out::raw* __restrict__ y, int64_t S, T h,
                        T o, T a, T b) {
  for (int64_t j = 0; j < S; ++j) {
    T z = ((In::load(x[j]) - h) - o) * a + b;
    if (kSilu) z = silu(z);
    y[j] = Out::store(z);
  }
}

#if FD_GN_X86
// float32 rows y = act((x - h) a + c) for the AVX2 + FMA build, written with
// intrinsics: the auto-vectorised silu above spends ~30 vector operations
// per 8 values, this one ~21 (the SiLU arithmetic, not memory, bounds the
// forward once a group is in cache). Same exp reduction and polynomial as
// exp_nonpos (Horner instead of Estrin: the loop has ILP to spare); t is
// clamped at -87 instead of flushing (exp(-87) = 1.6e-38, so silu(z) for
// z < -87 is |z| 1.6e-38 instead of a smaller tiny number); the sigmoid's
// sign choice reads the sign bit of z directly (blendv). c = b - lo a folds
// the low part of the offset into the bias (done in double by the caller).
FD_AVX2_FMA FD_INLINE __m256 silu8(__m256 z) {
  const __m256 t = _mm256_max_ps(_mm256_or_ps(z, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(-87.0f));
  const __m256 j = _mm256_fmadd_ps(t, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(12582912.0f));
  const __m256 kf = _mm256_sub_ps(j, _mm256_set1_ps(12582912.0f));
  __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.693145751953125f), t);
  r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(1.42860682030941723e-6f), r);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(0.0013840249739587307f), r, _mm256_set1_ps(0.0083757434040308f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.04166821762919426f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.16666407883167267f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.49999991059303284f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
  const __m256 e =
      _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(q), _mm256_slli_epi32(_mm256_castps_si256(j), 23)));
  // z >= 0: z / (1 + e); z < 0: z e / (1 + e)
  const __m256 num = _mm256_mul_ps(z, _mm256_blendv_ps(_mm256_set1_ps(1.0f), e, z));
  return _mm256_div_ps(num, _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
}

template <bool kSilu>
FD_AVX2_FMA __attribute__((noinline)) void norm_rows_f32_avx2(const float* __restrict__ x, float* __restrict__ y,
                                                              int64_t D, int64_t S, const float* hi,
                                                              const float* ca, const float* cc, const float* pfx,
                                                              const float* pfy) {
  for (int64_t d = 0; d < D; ++d) {
    const float* __restrict__ xr = x + d * S;
    float* __restrict__ yr = y + d * S;
    const __m256 H = _mm256_set1_ps(hi[d]), A = _mm256_set1_ps(ca[d]), Cc = _mm256_set1_ps(cc[d]);
    int64_t j = 0;
    for (; j + 16 <= S; j += 16) {  // two vectors per step: independent chains for the out-of-order core
      // one cache line each of the prefetch streams per line processed
      // (prefetches never fault: the addresses may lie past the data)
      __builtin_prefetch(pfx + d * S + j, 0, 2);
      __builtin_prefetch(pfy + d * S + j, 1, 2);
      __m256 z0 = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + j), H), A, Cc);
      __m256 z1 = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + j + 8), H), A, Cc);
      if (kSilu) {
        z0 = silu8(z0);
        z1 = silu8(z1);
      }
      _mm256_storeu_ps(yr + j, z0);
      _mm256_storeu_ps(yr + j + 8, z1);
    }
    for (; j + 8 <= S; j += 8) {
      __m256 z = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + j), H), A, Cc);
      if (kSilu) z = silu8(z);
      _mm256_storeu_ps(yr + j, z);
    }
    if (j < S) {  // the last < 8 values through a zero-padded vector
      alignas(32) float tmp[8] = {};
      for (int64_t k = j; k < S; ++k) tmp[k - j] = xr[k];
      __m256 z = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_load_ps(tmp), H), A, Cc);
      if (kSilu) z = silu8(z);
      _mm256_store_ps(tmp, z);
      for (int64_t k = j; k < S; ++k) yr[k] = tmp[k - j];
    }
  }
}
#endif

// Statistics of group i (its values `src`, in T) and the coefficients of
// its normalising pass: writes mean/rstd, hi/lo (hi + lo = mean - add) and
// a, b per channel.
template <typename T>
FD_INLINE void group_stats(const GnP& p, int64_t i, const T* src, T* hi, T* lo, T* ca, T* cb) {
  const int64_t C = p.C, S = p.S, G = p.G, D = p.D, M = D * S;
  const int64_t n = i / G, c0 = (i % G) * D;
  const T* ad = p.add ? static_cast<const T*>(p.add) + n * C + c0 : nullptr;
  // pass 1: a rough mean from the first eighth of the group (whole rows
  // when there is an add: at least one row), summed around its first
  // value. The mean of any s of the M values lies within
  // sqrt((M - s) / s) <= sqrt(7) standard deviations of the group's mean,
  // so pass 2's sums of squares exceed M var by at most 8x: the centring
  // still removes any offset, at 1/8 of the cost of a full pass.
  const double k0 = static_cast<double>(src[0]) + (ad ? static_cast<double>(ad[0]) : 0.0);
  split_offsets(k0, ad, D, hi, lo);
  double s1, s2;
  int64_t sub;
  if (ad) {
    const int64_t rows = std::min(D, (D + 7) / 8);
    group_sums<T, false>(src, rows, S, hi, lo, s1, s2);
    sub = rows * S;
  } else {  // one offset for every row: the group is one contiguous run
    sub = (M + 7) / 8;
    group_sums<T, false>(src, 1, sub, hi, lo, s1, s2);
  }
  const double m1 = k0 + s1 / static_cast<double>(sub);
  // pass 2: centred on it; the residual sum corrects mean and variance
  split_offsets(m1, ad, D, hi, lo);
  group_sums<T, true>(src, D, S, hi, lo, s1, s2);
  const double dm = s1 / static_cast<double>(M);
  const double mean = m1 + dm, var = std::max(s2 / static_cast<double>(M) - dm * dm, 0.0);
  const double rstd = 1.0 / std::sqrt(var + p.eps);
  static_cast<T*>(p.mean)[i] = static_cast<T>(mean);
  static_cast<T*>(p.rstd)[i] = static_cast<T>(rstd);
  split_offsets(mean, ad, D, hi, lo);
  affine(p, n, c0, D, rstd, ca, cb);
}

template <class Io, bool kSilu>
FD_INLINE void fwd_nchw(const GnP& p, int64_t i0, int64_t i1) {
  using T = typename Io::T;
  using R = typename Io::raw;
  const int64_t C = p.C, S = p.S, G = p.G, D = p.D, M = D * S;
  const auto buf = scratch<T>(Io::kWide ? M : 0);
  const auto co = scratch<T>(4 * D);
  T *hi = co.get(), *lo = hi + D, *ca = lo + D, *cb = ca + D;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = i / G, c0 = (i % G) * D;
    const R* xg = static_cast<const R*>(p.x) + (n * C + c0) * S;
    R* yg = static_cast<R*>(p.y) + (n * C + c0) * S;
    const T* src;
    if constexpr (Io::kWide) {  // convert once; the three passes read floats from L1/L2
      T* __restrict__ f = buf.get();
      for (int64_t j = 0; j < M; ++j) f[j] = Io::load(xg[j]);
      src = f;
    } else {
      src = xg;
    }
    group_stats<T>(p, i, src, hi, lo, ca, cb);
    // pass 3: normalise. The next group (contiguous after this one) is
    // fetched while this one is normalised, so its first pass does not wait on memory
    const int64_t rb = S * static_cast<int64_t>(sizeof(R));
    for (int64_t d = 0; d < D; ++d) {
      if (i + 1 < i1) prefetch_l2(xg + M + d * S, rb);
      norm_row<IoPlain<T>, Io, kSilu>(src + d * S, yg + d * S, S, hi[d], lo[d], ca[d], cb[d]);
    }
  }
}

#if FD_GN_X86
// Group i's statistics into the slot c = {hi, lo, a, c}, with c = b - lo a:
// the low part of the offset folded into the bias, in double. (A function
// with the target attribute, not a lambda: a lambda's body would be
// compiled for the baseline instruction set.)
FD_AVX2_FMA FD_INLINE void fwd_stats_f32(const GnP& p, int64_t i, float* c) {
  const int64_t D = p.D;
  group_stats<float>(p, i, static_cast<const float*>(p.x) + i * D * p.S, c, c + D, c + 2 * D, c + 3 * D);
  for (int64_t d = 0; d < D; ++d)
    c[3 * D + d] = static_cast<float>(static_cast<double>(c[3 * D + d]) -
                                      static_cast<double>(c[D + d]) * static_cast<double>(c[2 * D + d]));
}

// float32 NCHW forward of the AVX2 + FMA build, software-pipelined: the
// statistics of group i + 1 are computed before group i is normalised.
// A group's statistics end in a serial chain (reductions, sqrt, the
// coefficients) that would otherwise stall the core; issued ahead of the
// independent normalising pass, the out-of-order core overlaps the two.
// Groups are contiguous: x of group i + 2 and y of group i + 1 are
// prefetched while group i is normalised, one line of each per line
// processed (the output's read-for-ownership misses would otherwise stall
// the stores; a burst of a whole group's prefetches at once stalls on the
// miss buffers instead).
template <bool kSilu>
FD_AVX2_FMA void fwd_nchw_f32_fast(const GnP& p, int64_t i0, int64_t i1) {
  const int64_t S = p.S, D = p.D, M = D * S;
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  const auto co = scratch<float>(8 * D);  // two slots of {hi, lo, a, c}, for groups i and i + 1
  fwd_stats_f32(p, i0, co.get() + (i0 & 1) * 4 * D);
  for (int64_t i = i0; i < i1; ++i) {
    if (i + 1 < i1) fwd_stats_f32(p, i + 1, co.get() + ((i + 1) & 1) * 4 * D);
    const float* c = co.get() + (i & 1) * 4 * D;
    norm_rows_f32_avx2<kSilu>(x + i * M, y + i * M, D, S, c, c + 2 * D, c + 3 * D, x + (i + 2) * M, y + (i + 1) * M);
  }
}
#else
template <bool kSilu>
void fwd_nchw_f32_fast(const GnP& p, int64_t i0, int64_t i1) {  // (never called: no AVX2 build here)
  fwd_nchw<IoF32, kSilu>(p, i0, i1);
}
#endif

// ------------------------------------------------------ forward, NHWC ----
// Per-channel (mean, M2) of x over rows [s0, s1) of sample n, in double.
template <class Io>
FD_INLINE void nhwc_stats(const GnP& p, int64_t n, int64_t s0, int64_t s1, double* __restrict__ cm,
                          double* __restrict__ cq, typename Io::T* ws) {
  using T = typename Io::T;
  using R = typename Io::raw;
  const int64_t C = p.C;
  const R* x = static_cast<const R*>(p.x) + n * p.S * C;
  T* __restrict__ bs = ws;
  T* __restrict__ bm = ws + C;
  T* __restrict__ bq = ws + 2 * C;
  FD_IVDEP
  for (int64_t c = 0; c < C; ++c) cm[c] = cq[c] = 0.0;
  int64_t cnt = 0;
  for (int64_t r0 = s0; r0 < s1; r0 += p.block) {
    const int64_t nb = std::min(p.block, s1 - r0);
    const R* __restrict__ xb = x + r0 * C;
    // two passes over the block (in L1): its mean, then sums around it
    FD_IVDEP
    for (int64_t c = 0; c < C; ++c) bs[c] = Io::load(xb[c]);
    for (int64_t r = 1; r < nb; ++r)
      FD_IVDEP
      for (int64_t c = 0; c < C; ++c) bs[c] += Io::load(xb[r * C + c]);
    const T inv = T(1) / static_cast<T>(nb);
    FD_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      bm[c] = bs[c] * inv;
      bs[c] = bq[c] = T(0);
    }
    for (int64_t r = 0; r < nb; ++r)
      FD_IVDEP
      for (int64_t c = 0; c < C; ++c) {
        const T d = Io::load(xb[r * C + c]) - bm[c];
        bs[c] += d;
        bq[c] += d * d;
      }
    // merge into the running per-channel statistics (Chan et al.)
    const double nbd = static_cast<double>(nb), fb = nbd / static_cast<double>(cnt + nb);
    const double fc = static_cast<double>(cnt) * fb;
    FD_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const double e = static_cast<double>(bs[c]) / nbd;
      const double mb = static_cast<double>(bm[c]) + e;
      const double qb = std::max(static_cast<double>(bq[c]) - static_cast<double>(bs[c]) * e, 0.0);
      const double delta = mb - cm[c];
      cm[c] += delta * fb;
      cq[c] += qb + delta * delta * fc;
    }
    cnt += nb;
  }
}

// Group statistics of sample n from per-channel (mean, M2) over all S rows;
// writes mean/rstd and the forward coefficients of sample n.
template <typename T>
FD_INLINE void finish_fwd_sample(const GnP& p, int64_t n, const double* cm, const double* cq) {
  const int64_t C = p.C, D = p.D, S = p.S;
  const T* ad = p.add ? static_cast<const T*>(p.add) + n * C : nullptr;
  T *hi = coef_row<T>(p, kHi, n), *lo = coef_row<T>(p, kLo, n);
  T *ca = coef_row<T>(p, kA, n), *cb = coef_row<T>(p, kB, n);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t c0 = g * D;
    double sm = 0.0;
    for (int64_t c = c0; c < c0 + D; ++c) sm += cm[c] + (ad ? static_cast<double>(ad[c]) : 0.0);
    const double mean = sm / static_cast<double>(D);
    double q = 0.0;
    for (int64_t c = c0; c < c0 + D; ++c) {
      const double dd = cm[c] + (ad ? static_cast<double>(ad[c]) : 0.0) - mean;
      q += cq[c] + static_cast<double>(S) * dd * dd;
    }
    const double rstd = 1.0 / std::sqrt(q / static_cast<double>(D * S) + p.eps);
    static_cast<T*>(p.mean)[n * p.G + g] = static_cast<T>(mean);
    static_cast<T*>(p.rstd)[n * p.G + g] = static_cast<T>(rstd);
    split_offsets(mean, ad ? ad + c0 : nullptr, D, hi + c0, lo + c0);
    affine(p, n, c0, D, rstd, ca + c0, cb + c0);
  }
}

template <class Io, bool kSilu>
FD_INLINE void nhwc_norm(const GnP& p, int64_t n, int64_t s0, int64_t s1) {
  using T = typename Io::T;
  using R = typename Io::raw;
  const int64_t C = p.C;
  const T* __restrict__ hi = coef_row<T>(p, kHi, n);
  const T* __restrict__ lo = coef_row<T>(p, kLo, n);
  const T* __restrict__ ca = coef_row<T>(p, kA, n);
  const T* __restrict__ cb = coef_row<T>(p, kB, n);
  const R* __restrict__ x = static_cast<const R*>(p.x) + n * p.S * C;
  R* __restrict__ y = static_cast<R*>(p.y) + n * p.S * C;
  for (int64_t r = s0; r < s1; ++r)
    FD_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      T z = ((Io::load(x[r * C + c]) - hi[c]) - lo[c]) * ca[c] + cb[c];
      if (kSilu) z = silu(z);
      y[r * C + c] = Io::store(z);
    }
}

// ----------------------------------------------------- backward, NCHW ----
// One channel row: stores dz, returns sum dz, sum dz xhat, sum xhat.
template <class Io, bool kSilu, bool kX, typename T>
FD_INLINE void bwd_row_sums(const typename Io::raw* __restrict__ x, const typename Io::raw* __restrict__ dy,
                            T* __restrict__ dz, int64_t S, T h, T o, T rs, T za, T zb, double& A, double& B,
                            double& X) {
  A = B = X = 0.0;
  for (int64_t j0 = 0; j0 < S; j0 += kFlush) {
    const int64_t j1 = std::min(S, j0 + kFlush);
    T a = T(0), b = T(0), xs = T(0);
    FD_SIMD_SUM(a, b, xs)
    for (int64_t j = j0; j < j1; ++j) {
      const T xh = ((Io::load(x[j]) - h) - o) * rs;
      T g = Io::load(dy[j]);
      if (kSilu) g *= dsilu(xh * za + zb);
      dz[j] = g;
      a += g;
      b += g * xh;
      if (kX) xs += xh;
    }
    A += static_cast<double>(a);
    B += static_cast<double>(b);
    X += static_cast<double>(xs);
  }
}

template <class Io, typename T>
FD_INLINE void bwd_row_dx(const typename Io::raw* __restrict__ x, const T* __restrict__ dz,
                          typename Io::raw* __restrict__ dx, int64_t S, T h, T o, T rs, T P, T Q, T Tt) {
  for (int64_t j = 0; j < S; ++j) {
    const T xh = ((Io::load(x[j]) - h) - o) * rs;
    dx[j] = Io::store(P * dz[j] - Q * xh - Tt);
  }
}

// Per group of sample n: s1 = mean(g dz), s2 = mean(g dz xhat) from the
// per-channel sums; fills P, Q, Tt for the dx pass and writes A, B, dadd.
template <typename T>
FD_INLINE void finish_bwd_group(const GnP& p, int64_t n, int64_t g, const double* A, const double* B,
                                const double* X, T* P, T* Q, T* Tt) {
  const int64_t C = p.C, D = p.D, c0 = g * D;
  const double M = static_cast<double>(D * p.S);
  double s1 = 0.0, s2 = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double gc = vget<T>(p.w, c0 + d, 1.0) * (1.0 + vget<T>(p.scale, n * C + c0 + d, 0.0));
    s1 += gc * A[d];
    s2 += gc * B[d];
  }
  s1 /= M;
  s2 /= M;
  const double rs = static_cast<double>(static_cast<const T*>(p.rstd)[n * p.G + g]);
  for (int64_t d = 0; d < D; ++d) {
    const int64_t nc = n * C + c0 + d;
    const double gc = vget<T>(p.w, c0 + d, 1.0) * (1.0 + vget<T>(p.scale, nc, 0.0));
    P[d] = static_cast<T>(rs * gc);
    Q[d] = static_cast<T>(rs * s2);
    Tt[d] = static_cast<T>(rs * s1);
    p.A[nc] = A[d];
    p.B[nc] = B[d];
    // d add = sum_s dx = rs (g A - S s1 - s2 sum_s xhat): no extra pass over dx
    if (p.dadd)
      static_cast<T*>(p.dadd)[nc] = static_cast<T>(rs * (gc * A[d] - static_cast<double>(p.S) * s1 - s2 * X[d]));
  }
}

template <class Io, bool kSilu, bool kX>
FD_INLINE void bwd_nchw(const GnP& p, int64_t i0, int64_t i1) {
  using T = typename Io::T;
  using R = typename Io::raw;
  const int64_t C = p.C, S = p.S, G = p.G, D = p.D, M = D * S;
  const auto dzb = scratch<T>(M), co = scratch<T>(3 * D);
  const auto acc = scratch<double>(3 * D);
  T *dz = dzb.get(), *P = co.get(), *Q = P + D, *Tt = Q + D;
  double *A = acc.get(), *B = A + D, *X = B + D;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = i / G, g = i % G, c0 = g * D, base = (n * C + c0) * S;
    const R* x = static_cast<const R*>(p.x) + base;
    const R* dy = static_cast<const R*>(p.dy) + base;
    R* dx = static_cast<R*>(p.dx) + base;
    const T *hi = coef_row<T>(p, kHi, n) + c0, *lo = coef_row<T>(p, kLo, n) + c0;
    const T *rs = coef_row<T>(p, kRs, n) + c0, *za = coef_row<T>(p, kZa, n) + c0, *zb = coef_row<T>(p, kZb, n) + c0;
    for (int64_t d = 0; d < D; ++d)
      bwd_row_sums<Io, kSilu, kX>(x + d * S, dy + d * S, dz + d * S, S, hi[d], lo[d], rs[d], za[d], zb[d], A[d],
                                  B[d], X[d]);
    finish_bwd_group<T>(p, n, g, A, B, X, P, Q, Tt);
    // (no prefetch of the next group here: with two input streams it
    // measured slower than leaving it to the hardware)
    for (int64_t d = 0; d < D; ++d)
      bwd_row_dx<Io>(x + d * S, dz + d * S, dx + d * S, S, hi[d], lo[d], rs[d], P[d], Q[d], Tt[d]);
  }
}

// ----------------------------------------------------- backward, NHWC ----
// Per-channel sums A, B, X over rows [s0, s1) of sample n (float over
// kSumRows rows, double across them); with kDz also dz into dzs (rows from s0),
// so that the dx pass does not evaluate silu' again.
template <class Io, bool kSilu, bool kX, bool kDz>
FD_INLINE void nhwc_bwd_sums(const GnP& p, int64_t n, int64_t s0, int64_t s1, double* __restrict__ A,
                             double* __restrict__ B, double* __restrict__ X, typename Io::T* ws,
                             typename Io::T* __restrict__ dzs) {
  using T = typename Io::T;
  using R = typename Io::raw;
  const int64_t C = p.C;
  const T* __restrict__ hi = coef_row<T>(p, kHi, n);
  const T* __restrict__ lo = coef_row<T>(p, kLo, n);
  const T* __restrict__ rs = coef_row<T>(p, kRs, n);
  const T* __restrict__ za = coef_row<T>(p, kZa, n);
  const T* __restrict__ zb = coef_row<T>(p, kZb, n);
  const R* __restrict__ x = static_cast<const R*>(p.x) + n * p.S * C;
  const R* __restrict__ dy = static_cast<const R*>(p.dy) + n * p.S * C;
  T* __restrict__ a = ws;
  T* __restrict__ b = ws + C;
  T* __restrict__ xs = ws + 2 * C;
  FD_IVDEP
  for (int64_t c = 0; c < C; ++c) A[c] = B[c] = X[c] = 0.0;
  for (int64_t r0 = s0; r0 < s1; r0 += kSumRows) {
    const int64_t r1 = std::min(s1, r0 + kSumRows);
    FD_IVDEP
    for (int64_t c = 0; c < C; ++c) a[c] = b[c] = xs[c] = T(0);
    for (int64_t r = r0; r < r1; ++r)
      FD_IVDEP
      for (int64_t c = 0; c < C; ++c) {
        const T xh = ((Io::load(x[r * C + c]) - hi[c]) - lo[c]) * rs[c];
        T g = Io::load(dy[r * C + c]);
        if (kSilu) g *= dsilu(xh * za[c] + zb[c]);
        if (kDz) dzs[(r - s0) * C + c] = g;
        a[c] += g;
        b[c] += g * xh;
        if (kX) xs[c] += xh;
      }
    FD_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      A[c] += static_cast<double>(a[c]);
      B[c] += static_cast<double>(b[c]);
      if (kX) X[c] += static_cast<double>(xs[c]);
    }
  }
}

template <typename T>
FD_INLINE void finish_bwd_sample(const GnP& p, int64_t n, const double* A, const double* B, const double* X) {
  T *P = coef_row<T>(p, kP, n), *Q = coef_row<T>(p, kQ, n), *Tt = coef_row<T>(p, kTt, n);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t c0 = g * p.D;
    finish_bwd_group<T>(p, n, g, A + c0, B + c0, X + c0, P + c0, Q + c0, Tt + c0);
  }
}

// dx rows [s0, s1) of sample n, with dz from dzs (kDz) or recomputed.
template <class Io, bool kSilu, bool kDz>
FD_INLINE void nhwc_bwd_dx(const GnP& p, int64_t n, int64_t s0, int64_t s1, const typename Io::T* __restrict__ dzs) {
  using T = typename Io::T;
  using R = typename Io::raw;
  const int64_t C = p.C;
  const T* __restrict__ hi = coef_row<T>(p, kHi, n);
  const T* __restrict__ lo = coef_row<T>(p, kLo, n);
  const T* __restrict__ rs = coef_row<T>(p, kRs, n);
  const T* __restrict__ za = coef_row<T>(p, kZa, n);
  const T* __restrict__ zb = coef_row<T>(p, kZb, n);
  const T* __restrict__ P = coef_row<T>(p, kP, n);
  const T* __restrict__ Q = coef_row<T>(p, kQ, n);
  const T* __restrict__ Tt = coef_row<T>(p, kTt, n);
  const R* __restrict__ x = static_cast<const R*>(p.x) + n * p.S * C;
  const R* __restrict__ dy = static_cast<const R*>(p.dy) + n * p.S * C;
  R* __restrict__ dx = static_cast<R*>(p.dx) + n * p.S * C;
  for (int64_t r = s0; r < s1; ++r)
    FD_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const T xh = ((Io::load(x[r * C + c]) - hi[c]) - lo[c]) * rs[c];
      T g;
      if (kDz) {
        g = dzs[(r - s0) * C + c];
      } else {
        g = Io::load(dy[r * C + c]);
        if (kSilu) g *= dsilu(xh * za[c] + zb[c]);
      }
      dx[r * C + c] = Io::store(P[c] * g - Q[c] * xh - Tt[c]);
    }
}

// ------------------------------------------- the compiled entry points ----
// One non-template function per (kernel, storage type, instruction set);
// the flags pick a fully specialised loop inside it. NCHW kernels take a
// range of (n, g) groups, NHWC kernels a range of rows of one sample.
struct GnKernels {
  void (*fwd_nchw)(const GnP&, int64_t, int64_t);
  void (*nhwc_stats)(const GnP&, int64_t, int64_t, int64_t, double*, double*);
  void (*nhwc_norm)(const GnP&, int64_t, int64_t, int64_t);
  void (*bwd_nchw)(const GnP&, int64_t, int64_t);
  void (*nhwc_bwd_sums)(const GnP&, int64_t, int64_t, int64_t, double*, double*, double*, void*);
  void (*nhwc_bwd_dx)(const GnP&, int64_t, int64_t, int64_t, const void*);
};

#define FD_GN_KERNELS(IO, TAG, ATTR, AVX)                                                                          \
  ATTR void fwd_nchw_##TAG(const GnP& p, int64_t i0, int64_t i1) {                                              \
    if constexpr (AVX && std::is_same<IO, IoF32>::value)                                                        \
      p.silu ? fwd_nchw_f32_fast<true>(p, i0, i1) : fwd_nchw_f32_fast<false>(p, i0, i1);                        \
    else                                                                                                        \
      p.silu ? fwd_nchw<IO, true>(p, i0, i1) : fwd_nchw<IO, false>(p, i0, i1);                                  \
  }                                                                                                             \
  ATTR void nhwc_stats_##TAG(const GnP& p, int64_t n, int64_t s0, int64_t s1, double* cm, double* cq) {         \
    std::vector<IO::T> ws(static_cast<size_t>(3 * p.C));                                                       \
    nhwc_stats<IO>(p, n, s0, s1, cm, cq, ws.data());                                                            \
  }                                                                                                             \
  ATTR void nhwc_norm_##TAG(const GnP& p, int64_t n, int64_t s0, int64_t s1) {                                  \
    p.silu ? nhwc_norm<IO, true>(p, n, s0, s1) : nhwc_norm<IO, false>(p, n, s0, s1);                            \
  }                                                                                                             \
  ATTR void bwd_nchw_##TAG(const GnP& p, int64_t i0, int64_t i1) {                                              \
    if (p.add)                                                                                                  \
      p.silu ? bwd_nchw<IO, true, true>(p, i0, i1) : bwd_nchw<IO, false, true>(p, i0, i1);                      \
    else                                                                                                        \
      p.silu ? bwd_nchw<IO, true, false>(p, i0, i1) : bwd_nchw<IO, false, false>(p, i0, i1);                    \
  }                                                                                                             \
  ATTR void nhwc_bwd_sums_##TAG(const GnP& p, int64_t n, int64_t s0, int64_t s1, double* A, double* B,          \
                                double* X, void* dz) {                                                          \
    std::vector<IO::T> ws(static_cast<size_t>(3 * p.C));                                                        \
    IO::T* d = static_cast<IO::T*>(dz);                                                                         \
    if (p.add) {                                                                                                \
      if (!p.silu) nhwc_bwd_sums<IO, false, true, false>(p, n, s0, s1, A, B, X, ws.data(), d);                  \
      else if (d) nhwc_bwd_sums<IO, true, true, true>(p, n, s0, s1, A, B, X, ws.data(), d);                     \
      else nhwc_bwd_sums<IO, true, true, false>(p, n, s0, s1, A, B, X, ws.data(), d);                           \
    } else {                                                                                                    \
      if (!p.silu) nhwc_bwd_sums<IO, false, false, false>(p, n, s0, s1, A, B, X, ws.data(), d);                 \
      else if (d) nhwc_bwd_sums<IO, true, false, true>(p, n, s0, s1, A, B, X, ws.data(), d);                    \
      else nhwc_bwd_sums<IO, true, false, false>(p, n, s0, s1, A, B, X, ws.data(), d);                          \
    }                                                                                                           \
  }                                                                                                             \
  ATTR void nhwc_bwd_dx_##TAG(const GnP& p, int64_t n, int64_t s0, int64_t s1, const void* dz) {               \
    const IO::T* d = static_cast<const IO::T*>(dz);                                                             \
    if (!p.silu) nhwc_bwd_dx<IO, false, false>(p, n, s0, s1, d);                                                \
    else if (d) nhwc_bwd_dx<IO, true, true>(p, n, s0, s1, d);                                                   \
    else nhwc_bwd_dx<IO, true, false>(p, n, s0, s1, d);                                                         \
  }                                                                                                             \
  const GnKernels kernels_##TAG{fwd_nchw_##TAG, nhwc_stats_##TAG, nhwc_norm_##TAG,                              \
                                bwd_nchw_##TAG, nhwc_bwd_sums_##TAG, nhwc_bwd_dx_##TAG};

FD_GN_KERNELS(IoF32, f32, , false)
FD_GN_KERNELS(IoF16, f16, , false)
FD_GN_KERNELS(IoBF16, bf16, , false)
FD_GN_KERNELS(IoF64, f64, , false)
#if FD_GN_X86
FD_GN_KERNELS(IoF32, f32_avx2, FD_AVX2_FMA, true)
FD_GN_KERNELS(IoF16, f16_avx2, FD_AVX2_FMA, true)
FD_GN_KERNELS(IoBF16, bf16_avx2, FD_AVX2_FMA, true)
#endif
#undef FD_GN_KERNELS

bool cpu_has_avx2_fma() {
#if FD_GN_X86
  return cpu_use_avx2_fma();  // cpu/isa.h: by CPU feature, FASTDIFF_CPU_ISA=baseline turns it off
#else
  return false;
#endif
}

template <typename scalar_t>
const GnKernels& kernels_for() {
  // float64 is not a speed target: one baseline build
  if constexpr (std::is_same<scalar_t, double>::value) return kernels_f64;
#if FD_GN_X86
  const bool fast = cpu_has_avx2_fma();
  if constexpr (std::is_same<scalar_t, float>::value) return fast ? kernels_f32_avx2 : kernels_f32;
  else if constexpr (std::is_same<scalar_t, at::Half>::value) return fast ? kernels_f16_avx2 : kernels_f16;
  else return fast ? kernels_bf16_avx2 : kernels_bf16;
#else
  if constexpr (std::is_same<scalar_t, float>::value) return kernels_f32;
  else if constexpr (std::is_same<scalar_t, at::Half>::value) return kernels_f16;
  else return kernels_bf16;
#endif
}

// ------------------------------------------------------------ host side ----
void fill_inputs(GnP& p, const GnArgs& a) {
  p.x = a.x.data_ptr();
  p.w = a.w.defined() ? a.w.data_ptr() : nullptr;
  p.b = a.b.defined() ? a.b.data_ptr() : nullptr;
  p.add = a.add.defined() ? a.add.data_ptr() : nullptr;
  p.scale = a.scale.defined() ? a.scale.data_ptr() : nullptr;
  p.shift = a.shift.defined() ? a.shift.data_ptr() : nullptr;
  p.N = a.N;
  p.C = a.C;
  p.S = a.S;
  p.G = a.G;
  p.D = a.D;
  p.block = std::max<int64_t>(1, std::min<int64_t>(a.S, std::max<int64_t>(4, std::min<int64_t>(64, 4096 / a.C))));
}

// NHWC: whole samples per task, unless that leaves threads idle (fewer
// samples than threads, or a lopsided split); then spatial tiles of
// whole blocks, about four per thread.
bool use_tiles(GnP& p) {
  const int64_t nt = at::get_num_threads(), N = p.N;
  const int64_t busy = (N + nt - 1) / nt * nt;  // thread slots the sample split uses
  if (nt <= 1 || N * p.C * p.S < 2 * kMinWork || 5 * N >= 4 * busy || p.S < 2 * p.block) return false;
  const int64_t want = (4 * nt + N - 1) / N;
  const int64_t tiles = std::min(want, p.S / p.block);
  p.tile_rows = (p.S + tiles - 1) / tiles;
  p.tiles = (p.S + p.tile_rows - 1) / p.tile_rows;
  return p.tiles > 1;
}

int64_t grain_for(int64_t per_item) { return std::max<int64_t>(1, kMinWork / std::max<int64_t>(per_item, 1)); }

// fn(b, e) over [0, items) of `per_item` elements each, in chunks of about
// kMinWork / 4 elements handed out from a shared counter: on a machine
// shared with other processes a thread that is descheduled for a while
// leaves its chunks to the others instead of holding up the whole call (a
// static split waits for its last slice). One thread below 2 kMinWork.
template <class F>
void run_groups(int64_t items, int64_t per_item, const F& fn) {
  const int64_t work = items * std::max<int64_t>(per_item, 1);
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), work / kMinWork);
  if (nt <= 1 || at::in_parallel_region()) {
    fn(0, items);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, kMinWork / 4 / std::max<int64_t>(per_item, 1));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
      if (b >= items) break;
      fn(b, std::min(items, b + chunk));
    }
  });
}

// Rows [s0, s1) of tile t of sample n (tile mode), or the whole sample.
struct Tile {
  int64_t n, s0, s1;
};
Tile tile_of(const GnP& p, int64_t i) {
  const int64_t n = i / p.tiles, s0 = std::min(p.S, (i % p.tiles) * p.tile_rows);
  return {n, s0, std::min(p.S, s0 + p.tile_rows)};
}

template <typename T>
void forward_impl(GnP& p, const GnKernels& k, bool channels_last) {
  const int64_t C = p.C;
  if (!channels_last) {
    run_groups(p.N * p.G, p.D * p.S, [&](int64_t b, int64_t e) { k.fwd_nchw(p, b, e); });
    return;
  }
  const auto coef = scratch<T>(4 * p.N * C);
  p.coef = coef.get();
  if (!use_tiles(p)) {  // statistics and normalisation of a sample back to back: the second read hits L2/L3
    at::parallel_for(0, p.N, grain_for(C * p.S), [&](int64_t b, int64_t e) {
      std::vector<double> st(static_cast<size_t>(2 * C));
      for (int64_t n = b; n < e; ++n) {
        k.nhwc_stats(p, n, 0, p.S, st.data(), st.data() + C);
        finish_fwd_sample<T>(p, n, st.data(), st.data() + C);
        k.nhwc_norm(p, n, 0, p.S);
      }
    });
    return;
  }
  const int64_t items = p.N * p.tiles;
  std::vector<double> part(static_cast<size_t>(items * 2 * C));
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Tile t = tile_of(p, i);
      k.nhwc_stats(p, t.n, t.s0, t.s1, part.data() + i * 2 * C, part.data() + i * 2 * C + C);
    }
  });
  // merge the tiles of each sample (fixed order, Chan's formula), then finish
  std::vector<double> st(static_cast<size_t>(2 * C));
  for (int64_t n = 0; n < p.N; ++n) {
    double *cm = st.data(), *cq = cm + C;
    int64_t cnt = 0;
    for (int64_t c = 0; c < C; ++c) cm[c] = cq[c] = 0.0;
    for (int64_t i = n * p.tiles; i < (n + 1) * p.tiles; ++i) {
      const Tile t = tile_of(p, i);
      const int64_t rows = t.s1 - t.s0;
      if (rows <= 0) continue;
      const double* pm = part.data() + i * 2 * C;
      const double fb = static_cast<double>(rows) / static_cast<double>(cnt + rows), fc = cnt * fb;
      for (int64_t c = 0; c < C; ++c) {
        const double delta = pm[c] - cm[c];
        cm[c] += delta * fb;
        cq[c] += pm[C + c] + delta * delta * fc;
      }
      cnt += rows;
    }
    finish_fwd_sample<T>(p, n, cm, cq);
  }
  // same items, same static split: each thread normalises the tiles it just read
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Tile t = tile_of(p, i);
      k.nhwc_norm(p, t.n, t.s0, t.s1);
    }
  });
}

// The recomputation coefficients of groups [g0, g1) of sample n from the
// saved statistics. Filled inside the tasks that use them: one parallel
// region per call is cheaper than two on a busy machine.
template <typename T>
void fill_bwd_coef(const GnP& p, int64_t n, int64_t g0, int64_t g1) {
  const int64_t D = p.D;
  const T* ad = p.add ? static_cast<const T*>(p.add) + n * p.C : nullptr;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t c0 = g * D;
    const double mean = static_cast<double>(static_cast<const T*>(p.mean)[n * p.G + g]);
    const T rs = static_cast<const T*>(p.rstd)[n * p.G + g];
    split_offsets(mean, ad ? ad + c0 : nullptr, D, coef_row<T>(p, kHi, n) + c0, coef_row<T>(p, kLo, n) + c0);
    for (int64_t c = c0; c < c0 + D; ++c) coef_row<T>(p, kRs, n)[c] = rs;
    affine(p, n, c0, D, 1.0, coef_row<T>(p, kZa, n) + c0, coef_row<T>(p, kZb, n) + c0);
  }
}

template <typename T>
void backward_impl(GnP& p, const GnKernels& k, bool channels_last) {
  const int64_t N = p.N, C = p.C, D = p.D;
  const auto coef = scratch<T>(kNumBwdCoef * N * C);
  p.coef = coef.get();
  if (!channels_last) {
    at::parallel_for(0, N * p.G, grain_for(D * p.S), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e;) {  // the coefficient rows of the groups in [b, e)
        const int64_t n = i / p.G, g1 = std::min(p.G, e - n * p.G);
        fill_bwd_coef<T>(p, n, i % p.G, g1);
        i = n * p.G + g1;
      }
      k.bwd_nchw(p, b, e);
    });
    return;
  }
  if (!use_tiles(p)) {
    // keep silu'(z) dz of the sample for the dx pass while that stays in cache
    const bool keep_dz = p.silu && C * p.S <= kMaxDzScratch;
    at::parallel_for(0, N, grain_for(C * p.S), [&](int64_t b, int64_t e) {
      std::vector<double> acc(static_cast<size_t>(3 * C));
      const auto dz = scratch<T>(keep_dz ? C * p.S : 0);
      void* dzp = keep_dz ? dz.get() : nullptr;
      for (int64_t n = b; n < e; ++n) {
        fill_bwd_coef<T>(p, n, 0, p.G);
        k.nhwc_bwd_sums(p, n, 0, p.S, acc.data(), acc.data() + C, acc.data() + 2 * C, dzp);
        finish_bwd_sample<T>(p, n, acc.data(), acc.data() + C, acc.data() + 2 * C);
        k.nhwc_bwd_dx(p, n, 0, p.S, dzp);
      }
    });
    return;
  }
  for (int64_t n = 0; n < N; ++n) fill_bwd_coef<T>(p, n, 0, p.G);  // few samples in tile mode
  const int64_t items = N * p.tiles;
  std::vector<double> part(static_cast<size_t>(items * 3 * C));
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Tile t = tile_of(p, i);
      double* pa = part.data() + i * 3 * C;
      k.nhwc_bwd_sums(p, t.n, t.s0, t.s1, pa, pa + C, pa + 2 * C, nullptr);
    }
  });
  std::vector<double> acc(static_cast<size_t>(3 * C));
  for (int64_t n = 0; n < N; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t i = n * p.tiles; i < (n + 1) * p.tiles; ++i) {  // fixed order: deterministic
      const double* pa = part.data() + i * 3 * C;
      for (int64_t j = 0; j < 3 * C; ++j) acc[j] += pa[j];
    }
    finish_bwd_sample<T>(p, n, acc.data(), acc.data() + C, acc.data() + 2 * C);
  }
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Tile t = tile_of(p, i);
      k.nhwc_bwd_dx(p, t.n, t.s0, t.s1, nullptr);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& add, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu) {
  const GnArgs a = prepare_gn(x, weight, bias, add, scale, shift, groups);
  at::Tensor y = gn_empty_like(a.x);
  const auto sopt = a.x.options().dtype(gn_stat_type(a.x));
  at::Tensor mean = at::empty({a.N, a.G}, sopt), rstd = at::empty({a.N, a.G}, sopt);
  if (a.N == 0) return {y, mean, rstd};
  GnP p;
  fill_inputs(p, a);
  p.y = y.data_ptr();
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.eps = eps;
  p.silu = silu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "fastdiff_group_norm_act_cpu", [&] {
    using T = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
    forward_impl<T>(p, kernels_for<scalar_t>(), a.channels_last);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t groups, bool silu) {
  const GnArgs a = prepare_gn(x, weight, bias, add, scale, shift, groups);
  const at::Tensor gy = gn_prepare_backward(a, grad_y, mean, rstd);
  const auto sopt = a.x.options().dtype(gn_stat_type(a.x));
  const int64_t N = a.N, C = a.C;
  at::Tensor dx = gn_empty_like(a.x);
  at::Tensor dw = a.w.defined() ? at::empty({C}, sopt) : gn_no_grad(a.x);
  at::Tensor db = a.b.defined() ? at::empty({C}, sopt) : gn_no_grad(a.x);
  at::Tensor dadd = a.add.defined() ? at::empty({N, C}, sopt) : gn_no_grad(a.x);
  at::Tensor dscale = a.scale.defined() ? at::empty({N, C}, sopt) : gn_no_grad(a.x);
  at::Tensor dshift = a.shift.defined() ? at::empty({N, C}, sopt) : gn_no_grad(a.x);
  if (N == 0) {
    dw.zero_();  // sums over an empty batch
    db.zero_();
    return {dx, dw, db, dadd, dscale, dshift};
  }
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const auto A = scratch<double>(N * C), B = scratch<double>(N * C);
  GnP p;
  fill_inputs(p, a);
  p.dy = gy.data_ptr();
  p.dx = dx.data_ptr();
  p.mean = const_cast<void*>(mc.data_ptr());
  p.rstd = const_cast<void*>(rc.data_ptr());
  p.dadd = a.add.defined() ? dadd.data_ptr() : nullptr;
  p.A = A.get();
  p.B = B.get();
  p.silu = silu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "fastdiff_group_norm_act_backward_cpu",
                                  [&] {
    using T = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
    backward_impl<T>(p, kernels_for<scalar_t>(), a.channels_last);
    // per-channel vector gradients: each channel reduces over n in a fixed
    // order (deterministic for any thread count)
    const T* sc = p.scale ? static_cast<const T*>(p.scale) : nullptr;
    T* dwp = a.w.defined() ? dw.data_ptr<T>() : nullptr;
    T* dbp = a.b.defined() ? db.data_ptr<T>() : nullptr;
    T* dsc = a.scale.defined() ? dscale.data_ptr<T>() : nullptr;
    T* dsh = a.shift.defined() ? dshift.data_ptr<T>() : nullptr;
    const double* Ap = A.get();
    const double* Bp = B.get();
    // (a parallel region only when this is big enough to be worth waking threads for)
    at::parallel_for(0, C, std::max<int64_t>(1, 8 * kMinWork / std::max<int64_t>(N, 1)), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const double wc = vget<T>(p.w, c, 1.0), bc = vget<T>(p.b, c, 0.0);
        double sw = 0.0, sb = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t nc = n * C + c;
          const double s1 = 1.0 + (sc ? static_cast<double>(sc[nc]) : 0.0);
          sw += s1 * Bp[nc];
          sb += s1 * Ap[nc];
          if (dsc) dsc[nc] = static_cast<T>(wc * Bp[nc] + bc * Ap[nc]);
          if (dsh) dsh[nc] = static_cast<T>(Ap[nc]);
        }
        if (dwp) dwp[c] = static_cast<T>(sw);
        if (dbp) dbp[c] = static_cast<T>(sb);
      }
    });
  });
  return {dx, dw, db, dadd, dscale, dshift};
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("group_norm_act", &group_norm_act_cpu);
  m.impl("group_norm_act_backward", &group_norm_act_backward_cpu);
}

}  // namespace fastdiff
