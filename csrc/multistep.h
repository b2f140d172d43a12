// The fused multistep-sampler step (fastdiff::multistep_step): host-side
// argument checks and layout shared by the CPU and CUDA kernels, and the
// per-row coefficient struct both evaluate. The maths is stated in
// fastdiff/reference/multistep.py; the Python checks (with the same rules)
// are in fastdiff/ops/_multistep_common.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>

#include "host.h"

namespace fastdiff {

constexpr int kMsNCoef = 16;
constexpr int kMsMaxHistory = 3;
// column indices of a coefficient row
enum MsCol : int {
  kCx = 0, kCm = 1, kUOn = 2, kULast = 3, kUX0 = 4, kUH1 = 5,  // u_h1..u_h3 = 5..7
  kAX = 8, kAM = 9, kAX0 = 10, kAH1 = 11,                       // a_h1..a_h3 = 11..13
  kAZ = 14, kPush = 15
};

// Why row r (16 doubles) cannot be applied, or nullptr. Mirrors
// fastdiff.reference.multistep.row_problem (the column named in the text).
FD_HD const char* ms_row_problem(const double* r, int64_t K, bool has_last, bool has_noise) {
  for (int c = 0; c < kMsNCoef; ++c)
    if (!(r[c] == r[c]) || r[c] == INFINITY || r[c] == -INFINITY) return "a coefficient is NaN or infinite";
  for (int j = static_cast<int>(K) + 1; j <= kMsMaxHistory; ++j)
    if (r[kUH1 + j - 1] != 0.0 || r[kAH1 + j - 1] != 0.0) return "a history coefficient uses an age beyond K";
  if (r[kUOn] != 0.0 && r[kULast] != 0.0 && !has_last) return "u_last needs last_sample, which is empty";
  if (r[kAZ] != 0.0 && !has_noise) return "a_z needs noise or key";
  if (r[kPush] != 0.0 && r[kPush] != 1.0) return "push must be 0 or 1";
  return nullptr;
}

// Row r as a kernel uses it, decoded once per call (CPU: on the host; CUDA: per
// block from shared memory): the coefficients in acc_t, and for each term whether
// it is read at all -- only when its float64 coefficient is not exactly 0, so a
// DPM-Solver++(2M) row reads one history slot and no last_sample. The u_* terms
// exist only when u_on; history ages beyond K never do.
template <typename acc_t>
struct MsRow {
  acc_t cx, cm, ulast, ux0, uh[kMsMaxHistory], ax, am, ax0, ah[kMsMaxHistory], az;
  bool use_cx, use_cm, use_ulast, use_ux0, use_uh[kMsMaxHistory], use_ax, use_am, use_ax0, use_ah[kMsMaxHistory],
      use_az, u_on, push;
};

template <typename acc_t>
FD_HD MsRow<acc_t> ms_decode_row(const double* r, int64_t K) {
  MsRow<acc_t> c{};
  c.u_on = r[kUOn] != 0.0;
  c.push = r[kPush] != 0.0;
  c.cx = acc_t(r[kCx]);
  c.use_cx = r[kCx] != 0.0;
  c.cm = acc_t(r[kCm]);
  c.use_cm = r[kCm] != 0.0;
  c.ulast = acc_t(r[kULast]);
  c.use_ulast = c.u_on && r[kULast] != 0.0;
  c.ux0 = acc_t(r[kUX0]);
  c.use_ux0 = c.u_on && r[kUX0] != 0.0;
  c.ax = acc_t(r[kAX]);
  c.use_ax = r[kAX] != 0.0;
  c.am = acc_t(r[kAM]);
  c.use_am = r[kAM] != 0.0;
  c.ax0 = acc_t(r[kAX0]);
  c.use_ax0 = r[kAX0] != 0.0;
  c.az = acc_t(r[kAZ]);
  c.use_az = r[kAZ] != 0.0;
  for (int k = 0; k < kMsMaxHistory; ++k) {
    c.uh[k] = acc_t(r[kUH1 + k]);
    c.use_uh[k] = k < K && c.u_on && r[kUH1 + k] != 0.0;
    c.ah[k] = acc_t(r[kAH1 + k]);
    c.use_ah[k] = k < K && r[kAH1 + k] != 0.0;
  }
  return c;
}

std::tuple<at::Tensor, at::Tensor> multistep_step_cpu(
    const at::Tensor& model_output, const at::Tensor& sample, at::Tensor& history, at::Tensor& last_sample,
    const at::Tensor& coeffs, at::Tensor& step_index, const c10::optional<at::Tensor>& noise,
    const c10::optional<at::Tensor>& key, const c10::optional<at::Tensor>& thresh, double clip_range,
    bool return_x0, const c10::optional<at::Tensor>& uncond_output, double guidance_scale,
    const c10::optional<at::Tensor>& guidance_factor);
std::tuple<at::Tensor, at::Tensor> multistep_step_cuda(
    const at::Tensor& model_output, const at::Tensor& sample, at::Tensor& history, at::Tensor& last_sample,
    const at::Tensor& coeffs, at::Tensor& step_index, const c10::optional<at::Tensor>& noise,
    const c10::optional<at::Tensor>& key, const c10::optional<at::Tensor>& thresh, double clip_range,
    bool return_x0, const c10::optional<at::Tensor>& uncond_output, double guidance_scale,
    const c10::optional<at::Tensor>& guidance_factor);

// The tensors a kernel reads, all in the working layout (see
// fastdiff/ops/_multistep_common.py): one history slot's strides, else
// last_sample's, else canonical(sample).
struct MsArgs {
  at::Tensor x, m, noise, key, thresh, layout;
  at::Tensor u, gfac;  // classifier-free guidance: unconditional output (working layout), float64 (N,) factor
  int64_t K = 0;
  bool kept = false;
};

inline MsArgs ms_prepare(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& history,
                         const at::Tensor& last_sample, const at::Tensor& coeffs, const at::Tensor& step_index,
                         const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& key,
                         const c10::optional<at::Tensor>& thresh, double clip_range,
                         const c10::optional<at::Tensor>& uncond = c10::nullopt, double guidance_scale = 1.0,
                         const c10::optional<at::Tensor>& gfac = c10::nullopt) {
  const auto st = sample.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   "fastdiff: sample must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK_VALUE(sample.dim() >= 1, "fastdiff: sample must have a batch dimension");
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), "fastdiff: model_output must have the shape of sample ",
                    sample.sizes(), ", got ", model_output.sizes());
  TORCH_CHECK_TYPE(model_output.scalar_type() == st, "fastdiff: model_output must have sample's dtype ", st,
                   ", got ", model_output.scalar_type());
  TORCH_CHECK_VALUE(model_output.device() == sample.device(), "fastdiff: model_output must be on ", sample.device());
  // history
  TORCH_CHECK_VALUE(history.dim() == sample.dim() + 1 && history.sizes().slice(1) == sample.sizes(),
                    "fastdiff: history must have shape (K, *sample.shape), got ", history.sizes());
  MsArgs a;
  a.K = history.size(0);
  TORCH_CHECK_VALUE(a.K >= 0 && a.K <= kMsMaxHistory, "fastdiff: history must hold K in 0..3 slots, got ", a.K);
  const auto hs = history.scalar_type();
  TORCH_CHECK_TYPE(hs == st || hs == at::kFloat, "fastdiff: history must be sample's dtype or float32, got ", hs);
  TORCH_CHECK_VALUE(history.device() == sample.device(), "fastdiff: history must be on ", sample.device());
  if (a.K > 0 && history.numel() > 0)
    TORCH_CHECK_VALUE(history.is_non_overlapping_and_dense() && is_batch_major_dense(history[0]),
                      "fastdiff: history must be dense with batch-major slots (it is updated in place)");
  // last_sample
  a.kept = last_sample.numel() > 0;
  if (a.kept) {
    TORCH_CHECK_VALUE(last_sample.sizes() == sample.sizes(), "fastdiff: last_sample must have sample's shape ",
                      sample.sizes(), " or be empty, got ", last_sample.sizes());
    TORCH_CHECK_TYPE(last_sample.scalar_type() == (a.K > 0 ? hs : last_sample.scalar_type()) &&
                         (last_sample.scalar_type() == st || last_sample.scalar_type() == at::kFloat),
                     "fastdiff: last_sample must have history's dtype (sample's dtype or float32), got ",
                     last_sample.scalar_type());
    TORCH_CHECK_VALUE(last_sample.device() == sample.device(), "fastdiff: last_sample must be on ", sample.device());
    TORCH_CHECK_VALUE(is_batch_major_dense(last_sample) && (a.K == 0 || last_sample.strides() == history[0].strides()),
                      "fastdiff: last_sample must be dense, batch-major and laid out like one history slot");
  }
  // coeffs, step_index
  TORCH_CHECK_TYPE(coeffs.scalar_type() == at::kDouble, "fastdiff: coeffs must be float64, got ",
                   coeffs.scalar_type());
  TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(1) == kMsNCoef && coeffs.size(0) >= 1,
                    "fastdiff: coeffs must have shape (n_rows >= 1, 16), got ", coeffs.sizes());
  TORCH_CHECK_VALUE(coeffs.device() == sample.device(), "fastdiff: coeffs must be on ", sample.device());
  TORCH_CHECK_TYPE(step_index.scalar_type() == at::kLong, "fastdiff: step_index must be int64, got ",
                   step_index.scalar_type());
  TORCH_CHECK_VALUE(step_index.dim() == 0, "fastdiff: step_index must be a 0-dim tensor, got shape ",
                    step_index.sizes());
  TORCH_CHECK_VALUE(step_index.device() == sample.device(), "fastdiff: step_index must be on ", sample.device());
  TORCH_CHECK_VALUE(!(noise.has_value() && key.has_value()), "fastdiff: pass noise or key, not both");
  TORCH_CHECK_VALUE(clip_range >= 0.0 && std::isfinite(clip_range), "fastdiff: clip_range must be finite and >= 0");
  // working layout
  if (a.K > 0) {
    a.layout = history[0];
  } else if (a.kept) {
    a.layout = last_sample;
  } else {
    a.layout = canonical(sample);
  }
  a.x = match_layout(sample, a.layout);
  a.m = match_layout(model_output, a.layout);
  check_guidance(model_output, uncond, guidance_scale, gfac);
  if (uncond.has_value()) {
    a.u = match_layout(*uncond, a.layout);
    if (gfac.has_value()) a.gfac = gfac->contiguous();
  }
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == sample.sizes(), "fastdiff: noise must have sample's shape");
    TORCH_CHECK_TYPE(noise->scalar_type() == st, "fastdiff: noise must have sample's dtype");
    TORCH_CHECK_VALUE(noise->device() == sample.device(), "fastdiff: noise must be on ", sample.device());
    a.noise = match_layout(*noise, a.layout);
  }
  if (key.has_value()) {
    TORCH_CHECK_TYPE(key->dim() == 1 && key->size(0) == 2 && key->scalar_type() == at::kLong,
                     "fastdiff: key must be an int64 tensor of shape (2,) ([seed, offset])");
    TORCH_CHECK_VALUE(key->device() == sample.device(), "fastdiff: key must be on ", sample.device());
    a.key = key->contiguous();
  }
  if (thresh.has_value()) {
    TORCH_CHECK_TYPE(thresh->scalar_type() == at::kFloat, "fastdiff: thresh must be float32");
    TORCH_CHECK_VALUE(thresh->dim() == 1 && thresh->size(0) == sample.size(0), "fastdiff: thresh must have shape (",
                      sample.size(0), ",)");
    TORCH_CHECK_VALUE(thresh->device() == sample.device(), "fastdiff: thresh must be on ", sample.device());
    a.thresh = thresh->contiguous();
  }
  return a;
}

// An uninitialised output with the working layout's shape and strides.
inline at::Tensor ms_empty(const MsArgs& a, at::ScalarType dtype) {
  return at::empty_strided(a.layout.sizes(), a.layout.strides(), a.layout.options().dtype(dtype));
}

}  // namespace fastdiff
