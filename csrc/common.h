// Shared by the CPU (.cpp) and CUDA (.cu) kernels of fastdiff.
//
// Everything here that runs per element or per sample is FD_HD (host and
// device), so the two backends evaluate exactly the same formulas; they only
// differ in how they walk memory. The maths is stated in
// fastdiff/reference/diffusion.py and fastdiff/reference/noise.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdiff {

// ---------------------------------------------------------------- enums ----
// Integer codes used in the operator schemas (mirrored in fastdiff/ops/_codes.py).
enum Prediction : int64_t { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum Variance : int64_t {
  kFixedSmall = 0, kFixedSmallLog = 1, kFixedLarge = 2, kFixedLargeLog = 3, kLearned = 4, kLearnedRange = 5
};

// --------------------------------------------------------------- Philox ----
// Philox4x32-10 (Salmon et al., SC'11). Counter (c0..c3), key (k0, k1).
struct U4 { uint32_t x, y, z, w; };

FD_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

FD_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c.x, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c.z, hi1, lo1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The key tensor [seed, offset] split into 32-bit words.
struct PhiloxKey { uint32_t s_lo, s_hi, o_lo, o_hi; };

FD_HD PhiloxKey make_key(int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  return PhiloxKey{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), static_cast<uint32_t>(o),
                   static_cast<uint32_t>(o >> 32)};
}

// The four uint32 words of group g (elements 4g .. 4g+3 of the stream).
FD_HD U4 philox_group(const PhiloxKey& k, uint64_t g) {
  return philox4x32_10(U4{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), k.o_lo, k.o_hi}, k.s_lo, k.s_hi);
}

// ln(u) for float32 u in [2^-33, 1], exactly 0 at u = 1 and < 0 below it:
// exponent split, mantissa folded into [sqrt(1/2), sqrt(2)), then 2 atanh(s)
// as a series (|s| <= 0.1716, truncation error < 1e-9). The formula of the
// CPU generator (cpu/noise_cpu.h) and of the Triton one (_philox.py
// _log_unit). The GPU must not use __logf (lg2.approx.f32): for u just
// below 1 its absolute error (~2^-22) exceeds |ln u| = 2^-24..2^-23, the
// result can be >= 0 and sqrt(-2 ln u) NaN or wrong in about 3.6e-7 of draws.
FD_HD float log_unit(float u) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(u);
#else
  uint32_t bits;
  std::memcpy(&bits, &u, 4);
#endif
  const uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;  // mantissa as a float in [1, 2)
  const int32_t big = static_cast<int32_t>(mbits > 0x3FB504F3u);  // m > sqrt(2)
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + big;
  const uint32_t mb = mbits - (static_cast<uint32_t>(big) << 23);  // halve m when big
#if defined(__CUDA_ARCH__)
  const float m = __uint_as_float(mb);
  const float s = __fdiv_rn(m - 1.0f, m + 1.0f);  // IEEE division whatever the compile flags
#else
  float m;
  std::memcpy(&m, &mb, 4);
  const float s = (m - 1.0f) / (m + 1.0f);
#endif
  const float s2 = s * s;
  const float p = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  return static_cast<float>(e) * 0.69314718f + 2.0f * s * p;
}

// Box-Muller on two words: u in (0, 1], angle 2*pi*v. Writes two normals.
FD_HD void box_muller(uint32_t a, uint32_t b, float& z0, float& z1) {
  const float u = static_cast<float>(a) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
#if defined(__CUDA_ARCH__)
  const float r = __fsqrt_rn(-2.0f * log_unit(u));  // argument >= 0 (exactly 0 at u = 1)
  float s, c;
  // sincospif(x) = (sin(pi x), cos(pi x)); its range reduction is exact.
  sincospif(static_cast<float>(b) * 4.6566128730773926e-10f, &s, &c);
#else
  const float r = std::sqrt(-2.0f * std::log(u));
  const float th = static_cast<float>(b) * 2.3283064365386963e-10f * 6.283185307179586f;
  const float s = std::sin(th), c = std::cos(th);
#endif
  z0 = r * c;
  z1 = r * s;
}

FD_HD void normal4(const PhiloxKey& k, uint64_t g, float z[4]) {
  const U4 w = philox_group(k, g);
  box_muller(w.x, w.y, z[0], z[1]);
  box_muller(w.z, w.w, z[2], z[3]);
}

// ------------------------------------------------- per-sample coefficients --
// Computed once per sample (per block / per chunk) in float64 from the abar
// table, then used per element in float32 (float64 for double tensors).
// `valid` is false when t (or t_prev) is out of range: kernels then write NaN,
// never read outside the table.

FD_HD bool t_in_range(int64_t t, int64_t T) { return t >= 0 && t < T; }

struct QCoef {  // q_sample / loss
  double a, b;  // sqrt(abar_t), sqrt(1 - abar_t)
  bool valid;
};

FD_HD QCoef q_coef(const double* abar, int64_t T, int64_t t) {
  QCoef c{0.0, 0.0, t_in_range(t, T)};
  if (c.valid) {
    const double ab = abar[t];
    c.a = sqrt(ab);
    c.b = sqrt(1.0 - ab);
  }
  return c;
}

struct StepCoef {
  double sqrt_ab, sqrt_1m_ab;  // of abar_t
  double c_x0, c_xt;           // DDPM posterior-mean coefficients / DDIM: sqrt(abar_prev), direction coef
  double std;                  // noise std (fixed variance types, DDIM)
  double log_small, log_large; // learned_range end points (log beta_tilde, log beta')
  bool noise_on;               // DDPM: t > 0; DDIM: eta > 0
  bool valid;
};

FD_HD StepCoef ddpm_coef(const double* abar, int64_t T, int64_t t, int64_t t_prev, int64_t var_type) {
  StepCoef c{};
  c.valid = t_in_range(t, T) && (t_prev == -1 || t_in_range(t_prev, T)) && t_prev < t;
  if (!c.valid) return c;
  const double ab_t = abar[t];
  const double ab_p = t_prev >= 0 ? abar[t_prev] : 1.0;
  const double beta = 1.0 - ab_t / ab_p;  // beta'_t, exact for respaced chains
  c.sqrt_ab = sqrt(ab_t);
  c.sqrt_1m_ab = sqrt(1.0 - ab_t);
  c.c_x0 = sqrt(ab_p) * beta / (1.0 - ab_t);
  c.c_xt = sqrt(1.0 - beta) * (1.0 - ab_p) / (1.0 - ab_t);
  double small = (1.0 - ab_p) / (1.0 - ab_t) * beta;
  if (small < 1e-20) small = 1e-20;
  c.log_small = log(small);
  c.log_large = log(beta);
  c.std = (var_type == kFixedLarge || var_type == kFixedLargeLog) ? sqrt(beta) : sqrt(small);
  c.noise_on = t > 0;
  return c;
}

FD_HD StepCoef ddim_coef(const double* abar, int64_t T, int64_t t, int64_t t_prev, double eta, double final_ab) {
  StepCoef c{};
  c.valid = t_in_range(t, T) && (t_prev == -1 || t_in_range(t_prev, T)) && t_prev < t;
  if (!c.valid) return c;
  const double ab_t = abar[t];
  const double ab_p = t_prev >= 0 ? abar[t_prev] : final_ab;
  const double var = (1.0 - ab_p) / (1.0 - ab_t) * (1.0 - ab_t / ab_p);
  c.sqrt_ab = sqrt(ab_t);
  c.sqrt_1m_ab = sqrt(1.0 - ab_t);
  c.std = eta * sqrt(var > 0.0 ? var : 0.0);
  c.c_x0 = sqrt(ab_p);
  const double d = 1.0 - ab_p - c.std * c.std;
  c.c_xt = sqrt(d > 0.0 ? d : 0.0);  // coefficient of eps ("direction pointing to x_t")
  c.noise_on = eta > 0.0;
  return c;
}

// ------------------------------------------------------ per-element maths --
// acc_t is float for fp32/fp16/bf16 tensors and double for float64 tensors.

template <typename acc_t>
FD_HD acc_t fd_nan() { return static_cast<acc_t>(NAN); }

template <typename acc_t>
FD_HD acc_t predict_x0(acc_t out, acc_t x, acc_t sqrt_ab, acc_t sqrt_1m_ab, int64_t pred) {
  if (pred == kEpsilon) return (x - sqrt_1m_ab * out) / sqrt_ab;
  if (pred == kSample) return out;
  return sqrt_ab * x - sqrt_1m_ab * out;  // v_prediction
}

// Clip (clip_range > 0) or dynamic threshold (s > 0) of x0_hat. NaN passes through.
template <typename acc_t>
FD_HD acc_t clip_x0(acc_t x0, acc_t clip_range, acc_t s) {
  if (s > acc_t(0)) {
    x0 = x0 < -s ? -s : (x0 > s ? s : x0);
    return x0 / s;
  }
  if (clip_range > acc_t(0)) return x0 < -clip_range ? -clip_range : (x0 > clip_range ? clip_range : x0);
  return x0;
}

// Noise std of one DDPM element for the learned variance types.
template <typename acc_t>
FD_HD acc_t ddpm_elem_std(const StepCoef& c, int64_t var_type, acc_t model_var) {
  if (var_type == kLearned) return sqrt(model_var);
  if (var_type == kLearnedRange) {
    const acc_t frac = (model_var + acc_t(1)) * acc_t(0.5);
    return exp(acc_t(0.5) * (frac * acc_t(c.log_large) + (acc_t(1) - frac) * acc_t(c.log_small)));
  }
  return acc_t(c.std);
}

}  // namespace fastdiff
