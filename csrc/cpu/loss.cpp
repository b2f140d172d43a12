// CPU kernels of the fused diffusion loss (fastdiff::diffusion_loss) and of
// its recomputing backward (fastdiff::diffusion_loss_backward).
//
//   d_j    = model_output_j - target_j      target: eps | x0 | sqrt(abar) eps - sqrt(1 - abar) x0
//   loss_n = w_n / M * sum_j d_j^2          (float64 per-sample sums)
//   grad_j = 2 w_n / M * d_j                (forward with need_grad: the stored gradient)
//   dout_j = 2 w_n g_n / M * d_j            (backward: g_n the incoming per-sample gradient)
//
// Only the inputs the target needs are read (epsilon: model_output + noise;
// sample: model_output + x0; v: all three), and with a key the noise is
// regenerated chunk by chunk by the vectorised Philox generator (noise_cpu.h).
//
// The float32 body is a branch-free loop over blocks of kBlk elements with
// kLanes float32 partial sums per block, added into a float64 total after
// each block (each float32 partial sums kBlk / kLanes = 16 squares, so the
// float32 rounding stays ~1e-6 relative, whatever M is). It is compiled for the
// baseline and for AVX2 (no FMA: both builds round every operation alike),
// picked by cpu/isa.h. float16/bfloat16/float64 take the generic loop.
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
constexpr int64_t kLossChunk = 16384;  // elements per parallel work item (within one sample)
constexpr int kLanes = 16;             // float32 partial sums per block (two AVX2 registers)
constexpr int kBlk = 256;              // elements per block, then the partials go into float64

enum LossMode : int { kSumGrad = 0, kSumOnly = 1, kGradOnly = 2 };

// One chunk of float32 data. e: the noise (stored or regenerated), x: x0;
// either may be null when the target does not need it. Returns the chunk's
// sum of d^2 (0 in kGradOnly mode) and writes g = gs * d unless kSumOnly.
template <int TGT, int MODE>
FD_INLINE double loss_f32_body(const float* __restrict__ o, const float* __restrict__ x,
                               const float* __restrict__ e, float* __restrict__ g, int64_t len, float a, float b,
                               float gs, float poison) {
  double total = 0.0;
  for (int64_t j0 = 0; j0 < len; j0 += kBlk) {
    const int64_t m = std::min<int64_t>(kBlk, len - j0);
    float acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
    const int64_t full = m / kLanes * kLanes;
    for (int64_t q = 0; q < full; q += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const int64_t j = j0 + q + l;
        const float tgt = TGT == kEpsilon ? e[j] : (TGT == kSample ? x[j] : a * e[j] - b * x[j]);
        const float d = o[j] - tgt + poison;
        if (MODE != kGradOnly) acc[l] += d * d;
        if (MODE != kSumOnly) g[j] = gs * d;
      }
    }
    for (int64_t q = full; q < m; ++q) {  // tail of the last block
      const int64_t j = j0 + q;
      const float tgt = TGT == kEpsilon ? e[j] : (TGT == kSample ? x[j] : a * e[j] - b * x[j]);
      const float d = o[j] - tgt + poison;
      if (MODE != kGradOnly) acc[q - full] += d * d;
      if (MODE != kSumOnly) g[j] = gs * d;
    }
    if (MODE != kGradOnly) {
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += static_cast<double>(acc[l]);
      total += s;
    }
  }
  return total;
}

#define FD_LOSS_ARGS                                                                                       \
  const float* __restrict__ o, const float* __restrict__ x, const float* __restrict__ e, float* __restrict__ g, \
      int64_t len, float a, float b, float gs, float poison
#if FD_X86_DISPATCH
template <int TGT, int MODE>
FD_TARGET_AVX2 double loss_f32_avx2(FD_LOSS_ARGS) {
  return loss_f32_body<TGT, MODE>(o, x, e, g, len, a, b, gs, poison);
}
#endif
template <int TGT, int MODE>
__attribute__((noinline)) double loss_f32_base(FD_LOSS_ARGS) {
  return loss_f32_body<TGT, MODE>(o, x, e, g, len, a, b, gs, poison);
}
template <int TGT, int MODE>
double loss_f32_isa(FD_LOSS_ARGS) {
#if FD_X86_DISPATCH
  if (cpu_use_avx2()) return loss_f32_avx2<TGT, MODE>(o, x, e, g, len, a, b, gs, poison);
#endif
  return loss_f32_base<TGT, MODE>(o, x, e, g, len, a, b, gs, poison);
}
template <int MODE>
double loss_f32(int64_t target, FD_LOSS_ARGS) {
  if (target == kEpsilon) return loss_f32_isa<kEpsilon, MODE>(o, x, e, g, len, a, b, gs, poison);
  if (target == kSample) return loss_f32_isa<kSample, MODE>(o, x, e, g, len, a, b, gs, poison);
  return loss_f32_isa<kVPrediction, MODE>(o, x, e, g, len, a, b, gs, poison);
}
#undef FD_LOSS_ARGS

struct LossBuf {  // per-thread scratch for one chunk of regenerated noise
  std::vector<float> z;
  float* get() {
    if (z.empty()) z.resize(kLossChunk);
    return z.data();
  }
};

template <typename scalar_t>
using loss_acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// The tensors one call reads, in x0's layout, checked.
struct LossArgs {
  at::Tensor x0, out, noise;
  PhiloxKey key{};
  bool from_key = false;
};

LossArgs prepare_loss(const at::Tensor& model_output, const at::Tensor& x0_in, const at::Tensor& t,
                      const at::Tensor& abar, const c10::optional<at::Tensor>& noise_in,
                      const c10::optional<at::Tensor>& key, const at::Tensor& weight, int64_t target) {
  check_loss(model_output, x0_in, t, abar, noise_in, key, weight, target);
  LossArgs a;
  a.x0 = canonical(x0_in);
  a.out = match_layout(model_output, a.x0);
  if (noise_in) {
    if (target != kSample) a.noise = match_layout(*noise_in, a.x0);  // the x0 target never reads the noise
  } else {
    const at::Tensor kc = key->contiguous();
    const int64_t* kp = kc.data_ptr<int64_t>();
    a.key = make_key(kp[0], kp[1]);
    a.from_key = true;
  }
  return a;
}

// The shared pass. gscale[n] = 2 w_n (g_n) / M in float64; partial[item]
// gets the chunk's sum of squares unless MODE == kGradOnly.
template <int MODE>
void loss_pass(const LossArgs& a, const at::Tensor& t, const at::Tensor& abar, int64_t target,
               const std::vector<double>& gscale, at::Tensor& grad, std::vector<double>& partial) {
  const at::Tensor& x0 = a.x0;
  const int64_t N = x0.size(0), M = per_sample(x0), T = abar.size(0);
  if (N == 0 || M == 0) return;
  const int64_t per = (M + kLossChunk - 1) / kLossChunk;
  const at::Tensor tc = t.contiguous(), ac = abar.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const double* ap = ac.data_ptr<double>();
  const bool need_x = target != kEpsilon, need_e = target != kSample;
  // at least ~64K elements per thread: small tensors stay on the calling thread
  const int64_t grain = std::max<int64_t>(1, 65536 / std::min(M, kLossChunk));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "fastdiff_loss_cpu", [&] {
    using acc_t = loss_acc_t<scalar_t>;
    const scalar_t* xp = need_x ? x0.data_ptr<scalar_t>() : nullptr;
    const scalar_t* mp = a.out.data_ptr<scalar_t>();
    const scalar_t* np = (need_e && !a.from_key) ? a.noise.data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = MODE != kSumOnly ? grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N * per, grain, [&](int64_t ib, int64_t ie) {
      for (int64_t item = ib; item < ie; ++item) {
        const int64_t n = item / per, lo = (item % per) * kLossChunk, hi = std::min(M, lo + kLossChunk);
        const int64_t base = n * M + lo, len = hi - lo;
        const QCoef c = q_coef(ap, T, tp[n]);
        const acc_t poison = c.valid ? acc_t(0) : fd_nan<acc_t>();  // invalid t: NaN loss and grad
        const float* z = nullptr;
        if (need_e && a.from_key) {
          thread_local LossBuf buf;
          float* zb = buf.get();
          fill_normal(a.key, static_cast<uint64_t>(base), len, zb);
          z = zb;
        }
        double sum = 0.0;
        if constexpr (std::is_same<scalar_t, float>::value) {
          // (the casts are no-ops: this branch only runs when scalar_t is float)
          const float* e = z ? z : (np ? reinterpret_cast<const float*>(np + base) : nullptr);
          sum = loss_f32<MODE>(target, reinterpret_cast<const float*>(mp + base),
                               xp ? reinterpret_cast<const float*>(xp + base) : nullptr, e,
                               gp ? reinterpret_cast<float*>(gp + base) : nullptr, len,
                               static_cast<float>(c.a), static_cast<float>(c.b),
                               static_cast<float>(gscale[static_cast<size_t>(n)]), poison);
        } else {
          const acc_t ca = acc_t(c.a), cb = acc_t(c.b), gs = acc_t(gscale[static_cast<size_t>(n)]);
          for (int64_t j = 0; j < len; ++j) {
            const acc_t eps = !need_e ? acc_t(0) : (z ? acc_t(z[j]) : static_cast<acc_t>(np[base + j]));
            const acc_t xv = need_x ? static_cast<acc_t>(xp[base + j]) : acc_t(0);
            const acc_t tgt = target == kEpsilon ? eps : (target == kSample ? xv : ca * eps - cb * xv);
            const acc_t d = static_cast<acc_t>(mp[base + j]) - tgt + poison;
            if (MODE != kGradOnly) sum += static_cast<double>(d * d);
            if (MODE != kSumOnly) gp[base + j] = static_cast<scalar_t>(gs * d);
          }
        }
        if (MODE != kGradOnly) partial[static_cast<size_t>(item)] = sum;
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> diffusion_loss_cpu(const at::Tensor& model_output, const at::Tensor& x0_in,
                                                      const at::Tensor& t, const at::Tensor& abar,
                                                      const c10::optional<at::Tensor>& noise_in,
                                                      const c10::optional<at::Tensor>& key,
                                                      const at::Tensor& weight, int64_t target, bool need_grad) {
  const LossArgs a = prepare_loss(model_output, x0_in, t, abar, noise_in, key, weight, target);
  const int64_t N = a.x0.size(0), M = per_sample(a.x0);
  at::Tensor grad = need_grad ? at::empty_like(a.x0) : at::empty({0}, a.x0.options());
  const int64_t per = M == 0 ? 0 : (M + kLossChunk - 1) / kLossChunk;
  std::vector<double> partial(static_cast<size_t>(N * per), 0.0), gscale(static_cast<size_t>(N));
  const float* wp = weight.contiguous().data_ptr<float>();  // (N,) float32, checked: contiguous() is a no-op
  for (int64_t n = 0; n < N; ++n)
    gscale[static_cast<size_t>(n)] = M == 0 ? 0.0 : 2.0 * static_cast<double>(wp[n]) / static_cast<double>(M);
  if (need_grad)
    loss_pass<kSumGrad>(a, t, abar, target, gscale, grad, partial);
  else
    loss_pass<kSumOnly>(a, t, abar, target, gscale, grad, partial);
  // float64 losses for float64 inputs (gradcheck), float32 otherwise
  const bool f64 = a.x0.scalar_type() == at::kDouble;
  at::Tensor loss = at::empty({N}, a.x0.options().dtype(f64 ? at::kDouble : at::kFloat));
  for (int64_t n = 0; n < N; ++n) {
    double s = 0.0;
    for (int64_t c = 0; c < per; ++c) s += partial[static_cast<size_t>(n * per + c)];
    const double v = M == 0 ? 0.0 : static_cast<double>(wp[n]) * s / static_cast<double>(M);
    if (f64) loss.data_ptr<double>()[n] = v; else loss.data_ptr<float>()[n] = static_cast<float>(v);
  }
  return {loss, grad};
}

at::Tensor diffusion_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& model_output,
                                       const at::Tensor& x0_in, const at::Tensor& t, const at::Tensor& abar,
                                       const c10::optional<at::Tensor>& noise_in,
                                       const c10::optional<at::Tensor>& key, const at::Tensor& weight,
                                       int64_t target) {
  const LossArgs a = prepare_loss(model_output, x0_in, t, abar, noise_in, key, weight, target);
  check_loss_grad(grad_loss, x0_in);
  const int64_t N = a.x0.size(0), M = per_sample(a.x0);
  at::Tensor grad = at::empty_like(a.x0);
  std::vector<double> partial, gscale(static_cast<size_t>(N));
  const at::Tensor wc = weight.contiguous(), gc = grad_loss.to(at::kDouble).contiguous();
  const float* wp = wc.data_ptr<float>();
  const double* gp = gc.data_ptr<double>();
  for (int64_t n = 0; n < N; ++n)
    gscale[static_cast<size_t>(n)] =
        M == 0 ? 0.0 : 2.0 * static_cast<double>(wp[n]) * gp[n] / static_cast<double>(M);
  loss_pass<kGradOnly>(a, t, abar, target, gscale, grad, partial);
  return grad;
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cpu);
}

}  // namespace fastdiff
