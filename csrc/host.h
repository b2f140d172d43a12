// Host-side helpers shared by the CPU and CUDA operator implementations:
// argument checks (typed: TORCH_CHECK_TYPE -> TypeError for a wrong dtype,
// TORCH_CHECK_VALUE -> ValueError for a wrong shape/device/value; the public
// Python functions rely on them instead of repeating them, and
// fastdiff/ops/_kernel_checks.py states the same checks, with the same
// messages, for the Triton and reference kernels), layout
// canonicalisation, and the declarations of every backend entry point.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>

#include "common.h"

namespace fastdiff {

// A tensor the kernels can walk as one flat array whose memory order keeps
// each sample contiguous: dense, non-overlapping, batch dimension outermost.
inline bool is_batch_major_dense(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense()) return false;
  if (x.dim() == 0 || x.size(0) <= 1 || x.numel() == 0) return true;
  return x.stride(0) == x.numel() / x.size(0);
}

// The primary tensor (x0 or sample) as the kernels need it.
inline at::Tensor canonical(const at::Tensor& x) { return is_batch_major_dense(x) ? x : x.contiguous(); }

// `x` with exactly the strides of `ref` (ref canonical), copying only if needed.
inline at::Tensor match_layout(const at::Tensor& x, const at::Tensor& ref) {
  if (x.strides() == ref.strides() && x.is_non_overlapping_and_dense()) return x;
  at::Tensor out = at::empty_like(ref, x.options());
  out.copy_(x);
  return out;
}

inline void check_same_like(const at::Tensor& x, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(x.sizes() == ref.sizes(), "fastdiff: ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
              ", got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == ref.scalar_type(), "fastdiff: ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == ref.device(), "fastdiff: ", name, " must be on ", ref.device(), ", got ", x.device());
}

inline void check_common(const at::Tensor& x, const char* name, const at::Tensor& t, const at::Tensor& abar) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastdiff: ", name, " must have a batch dimension");
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "fastdiff: ", name,
              " must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), "fastdiff: t must have shape (", x.size(0), ",), got ",
              t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "fastdiff: t must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "fastdiff: t must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(abar.dim() == 1 && abar.size(0) >= 1, "fastdiff: alphas_cumprod must be a non-empty 1-D table");
  TORCH_CHECK_TYPE(abar.scalar_type() == at::kDouble, "fastdiff: alphas_cumprod must be float64, got ",
              abar.scalar_type());
  TORCH_CHECK_VALUE(abar.device() == x.device(), "fastdiff: alphas_cumprod must be on ", x.device(), ", got ",
              abar.device());
}

inline void check_key(const at::Tensor& key, const at::Tensor& x) {
  TORCH_CHECK_TYPE(key.dim() == 1 && key.size(0) == 2 && key.scalar_type() == at::kLong,
              "fastdiff: key must be an int64 tensor of shape (2,) ([seed, offset]), got ", key.scalar_type(), " ",
              key.sizes());
  TORCH_CHECK_VALUE(key.device() == x.device(), "fastdiff: key must be on ", x.device(), ", got ", key.device());
}

inline void check_per_sample_f32(const at::Tensor& v, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(0) && v.scalar_type() == at::kFloat, "fastdiff: ", name,
              " must be a float32 tensor of shape (", x.size(0), ",), got ", v.scalar_type(), " ", v.sizes());
  TORCH_CHECK_VALUE(v.device() == x.device(), "fastdiff: ", name, " must be on ", x.device(), ", got ", v.device());
}

// Per-sample element count of a batch-major tensor.
inline int64_t per_sample(const at::Tensor& x) { return x.size(0) == 0 ? 0 : x.numel() / x.size(0); }

// ------------------------------------------------------------ entry points --
// Same signatures on every device; see fastdiff/ops/_schemas.py.
#define FD_DECLARE(dev)                                                                                              \
  at::Tensor q_sample_##dev(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,                      \
                            const at::Tensor& noise);                                                                \
  std::tuple<at::Tensor, at::Tensor> q_sample_rng_##dev(const at::Tensor& x0, const at::Tensor& t,                 \
                                                        const at::Tensor& abar, const at::Tensor& key,               \
                                                        bool return_noise);                                          \
  std::tuple<at::Tensor, at::Tensor> diffusion_loss_##dev(                                                           \
      const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,           \
      const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& key, const at::Tensor& weight,      \
      int64_t target, bool need_grad);                                                                               \
  std::tuple<at::Tensor, at::Tensor> ddpm_step_##dev(                                                                \
      const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& t, const at::Tensor& t_prev,     \
      const at::Tensor& abar, const c10::optional<at::Tensor>& model_var, const c10::optional<at::Tensor>& noise, \
      const c10::optional<at::Tensor>& key, const c10::optional<at::Tensor>& thresh, int64_t prediction_type,      \
      int64_t variance_type, double clip_range, const c10::optional<at::Tensor>& uncond_output,                   \
      double guidance_scale, const c10::optional<at::Tensor>& guidance_factor);                                      \
  std::tuple<at::Tensor, at::Tensor> ddim_step_##dev(                                                                \
      const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& t, const at::Tensor& t_prev,     \
      const at::Tensor& abar, const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& key,        \
      const c10::optional<at::Tensor>& thresh, int64_t prediction_type, double clip_range, double eta,             \
      double final_alpha_cumprod, bool use_clipped_model_output, const c10::optional<at::Tensor>& uncond_output,   \
      double guidance_scale, const c10::optional<at::Tensor>& guidance_factor);

FD_DECLARE(cpu)
FD_DECLARE(cuda)
#undef FD_DECLARE

// The checks of diffusion_loss's inputs, for both devices and for the forward and
// the recomputing backward (fastdiff/ops/_kernel_checks.py check_loss mirrors them).
inline void check_loss(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& t,
                       const at::Tensor& abar, const c10::optional<at::Tensor>& noise,
                       const c10::optional<at::Tensor>& key, const at::Tensor& weight, int64_t target) {
  check_common(x0, "x0", t, abar);
  check_same_like(model_output, x0, "model_output", "x0");
  check_per_sample_f32(weight, x0, "weight");
  TORCH_CHECK_VALUE(noise.has_value() != key.has_value(), "fastdiff: diffusion_loss needs exactly one of noise, key");
  TORCH_CHECK_VALUE(target >= 0 && target <= 2, "fastdiff: target code must be 0, 1 or 2, got ", target);
  if (noise) check_same_like(*noise, x0, "noise", "x0");
  if (key) check_key(*key, x0);
}

// The recomputing backward of diffusion_loss (stored-gradient path: a multiply
// in Python, no op). grad_loss: the incoming gradient of the per-sample loss.
inline void check_loss_grad(const at::Tensor& g, const at::Tensor& x) {
  TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), "fastdiff: grad_loss must be a floating tensor, got ",
                   g.scalar_type());
  TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == x.size(0), "fastdiff: grad_loss must have shape (", x.size(0),
                    ",), got ", g.sizes());
  TORCH_CHECK_VALUE(g.device() == x.device(), "fastdiff: grad_loss must be on ", x.device(), ", got ", g.device());
}
at::Tensor diffusion_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& model_output,
                                       const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,
                                       const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& key,
                                       const at::Tensor& weight, int64_t target);
at::Tensor diffusion_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& model_output,
                                        const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,
                                        const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& key,
                                        const at::Tensor& weight, int64_t target);

// Validation + canonicalisation common to both devices. Each returns the
// tensors the kernel will read, already in the primary tensor's layout.
struct StepArgs {
  at::Tensor out, x, var, noise, key, thresh, t, t_prev;
  at::Tensor uncond, gfac;  // classifier-free guidance: unconditional output (sample's layout), float64 (N,) factor
};

// Checks of the guidance inputs of the step ops (uncond_output like model_output,
// a finite scale, guidance_factor float64 (N,)).
inline void check_guidance(const at::Tensor& model_output, const c10::optional<at::Tensor>& uncond,
                           double guidance_scale, const c10::optional<at::Tensor>& gfac) {
  if (uncond.has_value()) check_same_like(*uncond, model_output, "uncond_output", "model_output");
  TORCH_CHECK_VALUE(std::isfinite(guidance_scale), "fastdiff: guidance_scale must be finite, got ", guidance_scale);
  if (gfac.has_value()) {
    TORCH_CHECK_TYPE(gfac->scalar_type() == at::kDouble, "fastdiff: guidance_factor must be float64, got ",
                     gfac->scalar_type());
    TORCH_CHECK_VALUE(gfac->dim() == 1 && gfac->size(0) == model_output.size(0),
                      "fastdiff: guidance_factor must have shape (", model_output.size(0), ",), got ", gfac->sizes());
    TORCH_CHECK_VALUE(gfac->device() == model_output.device(), "fastdiff: guidance_factor must be on ",
                      model_output.device(), ", got ", gfac->device());
  }
}

inline StepArgs prepare_step(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& t,
                             const at::Tensor& t_prev, const at::Tensor& abar,
                             const c10::optional<at::Tensor>& model_var, const c10::optional<at::Tensor>& noise,
                             const c10::optional<at::Tensor>& key, const c10::optional<at::Tensor>& thresh,
                             int64_t prediction_type, const c10::optional<at::Tensor>& uncond = c10::nullopt,
                             double guidance_scale = 1.0, const c10::optional<at::Tensor>& gfac = c10::nullopt) {
  check_common(sample, "sample", t, abar);
  check_same_like(model_output, sample, "model_output", "sample");
  TORCH_CHECK_VALUE(t_prev.sizes() == t.sizes() && t_prev.scalar_type() == at::kLong && t_prev.device() == t.device(),
              "fastdiff: t_prev must be an int64 tensor like t");
  TORCH_CHECK_VALUE(prediction_type >= 0 && prediction_type <= 2, "fastdiff: prediction_type code must be 0, 1 or 2, got ",
              prediction_type);
  TORCH_CHECK_VALUE(!(noise.has_value() && key.has_value()), "fastdiff: pass noise or key, not both");
  StepArgs a;
  a.x = canonical(sample);
  a.out = match_layout(model_output, a.x);
  if (model_var.has_value()) {
    check_same_like(*model_var, sample, "model_var", "sample");
    a.var = match_layout(*model_var, a.x);
  }
  if (noise.has_value()) {
    check_same_like(*noise, sample, "noise", "sample");
    a.noise = match_layout(*noise, a.x);
  }
  if (key.has_value()) {
    check_key(*key, sample);
    a.key = key->contiguous();
  }
  if (thresh.has_value()) {
    check_per_sample_f32(*thresh, sample, "thresh");
    a.thresh = thresh->contiguous();
  }
  check_guidance(model_output, uncond, guidance_scale, gfac);
  if (uncond.has_value()) {
    a.uncond = match_layout(*uncond, a.x);
    if (gfac.has_value()) a.gfac = gfac->contiguous();
  }
  a.t = t.contiguous();
  a.t_prev = t_prev.contiguous();
  return a;
}

}  // namespace fastdiff
