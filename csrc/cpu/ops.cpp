// CPU kernels of the fastdiff operators: at::parallel_for over fixed chunks
// of one sample each, per-sample coefficients in float64 (common.h), the
// per-element maths in float (double for float64 tensors).
//
// The noise stream (Philox4x32-10 + Box-Muller, defined in
// fastdiff/reference/noise.py) is the expensive part on a CPU; its
// vectorised generator lives in noise_cpu.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../host.h"
#include "noise_cpu.h"

namespace fastdiff {
namespace {

using cpu_noise::fill_normal;
constexpr int64_t kChunk = 16384;  // elements per parallel work item (within one sample)

PhiloxKey read_key(const at::Tensor& key) {
  const int64_t* kp = key.data_ptr<int64_t>();
  return make_key(kp[0], kp[1]);
}

// Runs f(n, lo, hi, item) over every chunk of every sample, in parallel.
template <typename F>
void for_each_chunk(int64_t N, int64_t M, const F& f) {
  if (N == 0 || M == 0) return;
  const int64_t per = (M + kChunk - 1) / kChunk;
  // at least ~64K elements per thread: small tensors stay on the calling
  // thread instead of waking the pool for microseconds of work
  const int64_t grain = std::max<int64_t>(1, 65536 / std::min(M, kChunk));
  at::parallel_for(0, N * per, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / per, c = i % per;
      const int64_t lo = c * kChunk;
      f(n, lo, std::min(M, lo + kChunk), i);
    }
  });
}

template <typename scalar_t>
using acc_type_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// Per-thread scratch for one chunk of noise.
struct NoiseBuf {
  std::vector<float> z;
  float* get() {
    if (z.empty()) z.resize(kChunk);
    return z.data();
  }
};

}  // namespace

// ------------------------------------------------------------- q_sample ---
static std::tuple<at::Tensor, at::Tensor> q_sample_impl(const at::Tensor& x0_in, const at::Tensor& t,
                                                        const at::Tensor& abar, const at::Tensor* noise_in,
                                                        const at::Tensor* key, bool return_noise) {
  check_common(x0_in, "x0", t, abar);
  const at::Tensor x0 = canonical(x0_in);
  at::Tensor noise;
  if (noise_in) {
    check_same_like(*noise_in, x0_in, "noise", "x0");
    noise = match_layout(*noise_in, x0);
  }
  if (key) check_key(*key, x0_in);
  at::Tensor out = at::empty_like(x0);
  at::Tensor noise_out = return_noise ? at::empty_like(x0) : at::empty({0}, x0.options());
  const int64_t N = x0.size(0), M = per_sample(x0), T = abar.size(0);
  const at::Tensor tc = t.contiguous(), ac = abar.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const double* ap = ac.data_ptr<double>();
  const PhiloxKey k = key ? read_key(key->contiguous()) : PhiloxKey{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "fastdiff_q_sample_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* xp = x0.data_ptr<scalar_t>();
    const scalar_t* np = noise_in ? noise.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* zp = return_noise ? noise_out.data_ptr<scalar_t>() : nullptr;
    for_each_chunk(N, M, [&](int64_t n, int64_t lo, int64_t hi, int64_t) {
      const QCoef c = q_coef(ap, T, tp[n]);
      const acc_t a = c.valid ? acc_t(c.a) : fd_nan<acc_t>(), b = c.valid ? acc_t(c.b) : fd_nan<acc_t>();
      const int64_t base = n * M;
      if (np) {
        for (int64_t j = base + lo; j < base + hi; ++j)
          op[j] = static_cast<scalar_t>(a * static_cast<acc_t>(xp[j]) + b * static_cast<acc_t>(np[j]));
        return;
      }
      thread_local NoiseBuf buf;
      float* z = buf.get();
      fill_normal(k, static_cast<uint64_t>(base + lo), hi - lo, z);
      for (int64_t j = 0; j < hi - lo; ++j)
        op[base + lo + j] = static_cast<scalar_t>(a * static_cast<acc_t>(xp[base + lo + j]) + b * acc_t(z[j]));
      if (zp)
        for (int64_t j = 0; j < hi - lo; ++j) zp[base + lo + j] = static_cast<scalar_t>(z[j]);
    });
  });
  return {out, noise_out};
}

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar, const at::Tensor& noise) {
  return std::get<0>(q_sample_impl(x0, t, abar, &noise, nullptr, false));
}

std::tuple<at::Tensor, at::Tensor> q_sample_rng_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                    const at::Tensor& abar, const at::Tensor& key,
                                                    bool return_noise) {
  return q_sample_impl(x0, t, abar, nullptr, &key, return_noise);
}

// diffusion_loss and its backward: cpu/loss.cpp

// --------------------------------------------------------- reverse steps ---
// float32 fast path of one chunk: a few simple passes (x0_hat, clip,
// combine, noise), each a branch-free loop the compiler vectorises, in an
// AVX2 clone. The chunk (<= 64 KB per array) stays in L2 between passes.
// The generic loop below handles the other dtypes and the learned variances.
namespace {
struct F32Step {
  float sab, s1m, cx0, cxt, sd, clip, th;
  int64_t pred;
  bool ddim, use_clipped;
  float gw, gf;  // guidance: w - 1 and the rescale factor (used when u is given)
  bool has_gf;
};

// With guidance (u != null) the first pass reads both predictions, forms the
// guided output g = f * (c + (w - 1)(c - u)) and x0_hat from it; where a later
// pass needs the model output again, g is kept in the chunk scratch `gbuf`
// (in cache), which then stands for it.
FD_INLINE void step_chunk_f32_body(const F32Step& p, const float* __restrict__ c, const float* __restrict__ u,
                                   float* __restrict__ gbuf, const float* __restrict__ x,
                                   const float* __restrict__ z, float* __restrict__ prev,
                                   float* __restrict__ x0, int64_t n) {
  const float* __restrict__ o = c;
  if (u) {
    // g = f (c + (w - 1)(c - u)) and x0_hat from it in one pass (f = 1 without rescale: x * 1 is exact);
    // g is kept in gbuf only where a later pass reads the model output again (DDIM, unless use_clipped)
    const float gw = p.gw, gf = p.has_gf ? p.gf : 1.0f;
    const bool keep = p.ddim && !p.use_clipped;
#define FD_G(j) ((c[j] + gw * (c[j] - u[j])) * gf)
    if (p.pred == kEpsilon) {
      const float inv = 1.0f / p.sab;
      if (keep) {
        for (int64_t j = 0; j < n; ++j) {
          const float g = FD_G(j);
          gbuf[j] = g;
          x0[j] = (x[j] - p.s1m * g) * inv;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) x0[j] = (x[j] - p.s1m * FD_G(j)) * inv;
      }
    } else if (p.pred == kSample) {
      if (keep) {
        for (int64_t j = 0; j < n; ++j) x0[j] = gbuf[j] = FD_G(j);
      } else {
        for (int64_t j = 0; j < n; ++j) x0[j] = FD_G(j);
      }
    } else {
      if (keep) {
        for (int64_t j = 0; j < n; ++j) {
          const float g = FD_G(j);
          gbuf[j] = g;
          x0[j] = p.sab * x[j] - p.s1m * g;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) x0[j] = p.sab * x[j] - p.s1m * FD_G(j);
      }
    }
#undef FD_G
    o = gbuf;
  } else if (p.pred == kEpsilon) {
    const float inv = 1.0f / p.sab;
    for (int64_t j = 0; j < n; ++j) x0[j] = (x[j] - p.s1m * o[j]) * inv;
  } else if (p.pred == kSample) {
    for (int64_t j = 0; j < n; ++j) x0[j] = o[j];
  } else {
    for (int64_t j = 0; j < n; ++j) x0[j] = p.sab * x[j] - p.s1m * o[j];
  }
  if (p.th > 0.0f) {  // dynamic threshold: clamp to [-s, s], then / s (NaN passes through)
    const float inv = 1.0f / p.th;
    for (int64_t j = 0; j < n; ++j) x0[j] = std::min(std::max(x0[j], -p.th), p.th) * inv;
  } else if (p.clip > 0.0f) {
    for (int64_t j = 0; j < n; ++j) x0[j] = std::min(std::max(x0[j], -p.clip), p.clip);
  }
  if (!p.ddim) {
    for (int64_t j = 0; j < n; ++j) prev[j] = p.cx0 * x0[j] + p.cxt * x[j];
  } else {
    const float inv = 1.0f / p.s1m;
    if (p.use_clipped) {
      for (int64_t j = 0; j < n; ++j) prev[j] = p.cx0 * x0[j] + p.cxt * ((x[j] - p.sab * x0[j]) * inv);
    } else if (p.pred == kEpsilon) {
      for (int64_t j = 0; j < n; ++j) prev[j] = p.cx0 * x0[j] + p.cxt * o[j];
    } else if (p.pred == kSample) {
      for (int64_t j = 0; j < n; ++j) prev[j] = p.cx0 * x0[j] + p.cxt * ((x[j] - p.sab * o[j]) * inv);
    } else {
      for (int64_t j = 0; j < n; ++j) prev[j] = p.cx0 * x0[j] + p.cxt * (p.sab * o[j] + p.s1m * x[j]);
    }
  }
  if (z)
    for (int64_t j = 0; j < n; ++j) prev[j] += p.sd * z[j];
}

#define FD_STEP_ARGS                                                                                          \
  const F32Step p, const float* __restrict__ o, const float* __restrict__ u, float* __restrict__ g,            \
      const float* __restrict__ x, const float* __restrict__ z, float* __restrict__ prev, float* __restrict__ x0, \
      int64_t n
#if FD_X86_DISPATCH
FD_TARGET_AVX2 void step_chunk_f32_avx2(FD_STEP_ARGS) { step_chunk_f32_body(p, o, u, g, x, z, prev, x0, n); }
#endif
__attribute__((noinline)) void step_chunk_f32_base(FD_STEP_ARGS) {
  step_chunk_f32_body(p, o, u, g, x, z, prev, x0, n);
}
// The AVX2 or the baseline build (cpu/isa.h).
inline void step_chunk_f32(FD_STEP_ARGS) {
#if FD_X86_DISPATCH
  if (cpu_use_avx2()) return step_chunk_f32_avx2(p, o, u, g, x, z, prev, x0, n);
#endif
  step_chunk_f32_base(p, o, u, g, x, z, prev, x0, n);
}
#undef FD_STEP_ARGS
}  // namespace

template <bool kDDIM>
static std::tuple<at::Tensor, at::Tensor> step_impl(const StepArgs& s, const at::Tensor& abar, int64_t pred,
                                                    int64_t var_type, double clip_range, double eta,
                                                    double final_ab, bool use_clipped, double guidance_scale) {
  const at::Tensor& x = s.x;
  at::Tensor prev = at::empty_like(x), x0_out = at::empty_like(x);
  const int64_t N = x.size(0), M = per_sample(x), T = abar.size(0);
  const at::Tensor ac = abar.contiguous();
  const int64_t* tp = s.t.data_ptr<int64_t>();
  const int64_t* pp = s.t_prev.data_ptr<int64_t>();
  const double* ap = ac.data_ptr<double>();
  const float* thp = s.thresh.defined() ? s.thresh.data_ptr<float>() : nullptr;
  const double* gfp = s.gfac.defined() ? s.gfac.data_ptr<double>() : nullptr;
  const bool rng = s.key.defined();
  const PhiloxKey k = rng ? read_key(s.key) : PhiloxKey{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastdiff_step_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = s.out.data_ptr<scalar_t>();
    const scalar_t* vp = s.var.defined() ? s.var.data_ptr<scalar_t>() : nullptr;
    const scalar_t* np = s.noise.defined() ? s.noise.data_ptr<scalar_t>() : nullptr;
    const scalar_t* up = s.uncond.defined() ? s.uncond.data_ptr<scalar_t>() : nullptr;
    const acc_t gw = acc_t(guidance_scale - 1.0);
    scalar_t* op = prev.data_ptr<scalar_t>();
    scalar_t* x0p = x0_out.data_ptr<scalar_t>();
    for_each_chunk(N, M, [&](int64_t n, int64_t lo, int64_t hi, int64_t) {
      const StepCoef c = kDDIM ? ddim_coef(ap, T, tp[n], pp[n], eta, final_ab) : ddpm_coef(ap, T, tp[n], pp[n], var_type);
      const int64_t base = n * M + lo;
      if (!c.valid) {
        for (int64_t j = 0; j < hi - lo; ++j) op[base + j] = x0p[base + j] = static_cast<scalar_t>(NAN);
        return;
      }
      const acc_t sab = acc_t(c.sqrt_ab), s1m = acc_t(c.sqrt_1m_ab), cx0 = acc_t(c.c_x0), cxt = acc_t(c.c_xt);
      const acc_t clip = acc_t(clip_range), th = thp ? acc_t(thp[n]) : acc_t(0);
      const bool add_noise = c.noise_on && (rng || np);
      float* z = nullptr;
      if (add_noise && rng) {
        thread_local NoiseBuf buf;
        z = buf.get();
        fill_normal(k, static_cast<uint64_t>(base), hi - lo, z);
      }
      const acc_t gf = gfp ? acc_t(gfp[n]) : acc_t(1);
      if constexpr (std::is_same<scalar_t, float>::value) {
        if (kDDIM || var_type < kLearned) {
          const F32Step p{float(sab), float(s1m), float(cx0), float(cxt), float(c.std), float(clip), float(th),
                          pred, kDDIM, use_clipped, float(gw), float(gf), gfp != nullptr};
          // (casts are no-ops: this branch only runs when scalar_t is float)
          const float* zz = !add_noise ? nullptr : (z ? z : reinterpret_cast<const float*>(np + base));
          float* g = nullptr;
          if (up) {
            thread_local NoiseBuf gbuf;  // the chunk's guided output
            g = gbuf.get();
          }
          step_chunk_f32(p, reinterpret_cast<const float*>(mp + base),
                         up ? reinterpret_cast<const float*>(up + base) : nullptr, g,
                         reinterpret_cast<const float*>(xp + base), zz, reinterpret_cast<float*>(op + base),
                         reinterpret_cast<float*>(x0p + base), hi - lo);
          return;
        }
      }
      for (int64_t j = 0; j < hi - lo; ++j) {
        acc_t o = static_cast<acc_t>(mp[base + j]);
        if (up) {  // classifier-free guidance: f * (c + (w - 1)(c - u))
          o = o + gw * (o - static_cast<acc_t>(up[base + j]));
          if (gfp) o = o * gf;
        }
        const acc_t xv = static_cast<acc_t>(xp[base + j]);
        const acc_t x0 = clip_x0<acc_t>(predict_x0<acc_t>(o, xv, sab, s1m, pred), clip, th);
        acc_t r;
        if (kDDIM) {
          acc_t eps = pred == kEpsilon ? o : (pred == kSample ? (xv - sab * o) / s1m : sab * o + s1m * xv);
          if (use_clipped) eps = (xv - sab * x0) / s1m;
          r = cx0 * x0 + cxt * eps;
          if (add_noise) r += acc_t(c.std) * (z ? acc_t(z[j]) : static_cast<acc_t>(np[base + j]));
        } else {
          r = cx0 * x0 + cxt * xv;
          if (add_noise) {
            const acc_t sd = ddpm_elem_std<acc_t>(c, var_type, vp ? static_cast<acc_t>(vp[base + j]) : acc_t(0));
            r += sd * (z ? acc_t(z[j]) : static_cast<acc_t>(np[base + j]));
          }
        }
        op[base + j] = static_cast<scalar_t>(r);
        x0p[base + j] = static_cast<scalar_t>(x0);
      }
    });
  });
  return {prev, x0_out};
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                 const at::Tensor& t, const at::Tensor& t_prev,
                                                 const at::Tensor& abar, const c10::optional<at::Tensor>& model_var,
                                                 const c10::optional<at::Tensor>& noise,
                                                 const c10::optional<at::Tensor>& key,
                                                 const c10::optional<at::Tensor>& thresh, int64_t prediction_type,
                                                 int64_t variance_type, double clip_range,
                                                 const c10::optional<at::Tensor>& uncond_output, double guidance_scale,
                                                 const c10::optional<at::Tensor>& guidance_factor) {
  TORCH_CHECK_VALUE(variance_type >= 0 && variance_type <= 5, "fastdiff: variance_type code must be in 0..5, got ",
              variance_type);
  TORCH_CHECK_VALUE(variance_type < kLearned || model_var.has_value(), "fastdiff: learned variance types need model_var");
  const StepArgs s = prepare_step(model_output, sample, t, t_prev, abar, model_var, noise, key, thresh,
                                  prediction_type, uncond_output, guidance_scale, guidance_factor);
  return step_impl<false>(s, abar, prediction_type, variance_type, clip_range, 0.0, 1.0, false, guidance_scale);
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                 const at::Tensor& t, const at::Tensor& t_prev,
                                                 const at::Tensor& abar, const c10::optional<at::Tensor>& noise,
                                                 const c10::optional<at::Tensor>& key,
                                                 const c10::optional<at::Tensor>& thresh, int64_t prediction_type,
                                                 double clip_range, double eta, double final_alpha_cumprod,
                                                 bool use_clipped_model_output,
                                                 const c10::optional<at::Tensor>& uncond_output, double guidance_scale,
                                                 const c10::optional<at::Tensor>& guidance_factor) {
  TORCH_CHECK_VALUE(eta >= 0.0, "fastdiff: eta must be >= 0, got ", eta);
  const StepArgs s = prepare_step(model_output, sample, t, t_prev, abar, c10::nullopt, noise, key, thresh,
                                  prediction_type, uncond_output, guidance_scale, guidance_factor);
  return step_impl<true>(s, abar, prediction_type, kFixedSmall, clip_range, eta, final_alpha_cumprod,
                         use_clipped_model_output, guidance_scale);
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("q_sample_rng", &q_sample_rng_cpu);
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
}

}  // namespace fastdiff
