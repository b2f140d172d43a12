// Host-side contract of the GroupNorm(+add, +scale/shift)+SiLU operators,
// shared by the CPU (csrc/cpu/group_norm.cpp) and CUDA
// (csrc/cuda/group_norm.cu) kernels: argument checks, the layout rule
// (mirrors gn_* in fastdiff/ops/_layout.py) and the entry points. The maths
// is in fastdiff/reference/blocks.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastdiff {

// x (N, C, *spatial) is read NC* contiguous or channels-last (x.movedim(1,-1)
// contiguous, "NHWC"); anything else is made contiguous first.
inline bool gn_channels_last(const at::Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

inline at::Tensor gn_canonical(const at::Tensor& x) {
  return (x.is_contiguous() || gn_channels_last(x)) ? x : x.contiguous();
}

// Uninitialised, shaped like x, in the layout of canonical x `xc`.
inline at::Tensor gn_empty_like(const at::Tensor& xc) {
  if (gn_channels_last(xc)) {
    std::vector<int64_t> perm_shape;
    perm_shape.push_back(xc.size(0));
    for (int64_t d = 2; d < xc.dim(); ++d) perm_shape.push_back(xc.size(d));
    perm_shape.push_back(xc.size(1));
    return at::empty(perm_shape, xc.options()).movedim(-1, 1);
  }
  return at::empty(xc.sizes(), xc.options().memory_format(at::MemoryFormat::Contiguous));
}

inline at::ScalarType gn_stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Everything a GroupNorm kernel reads, checked and canonical. Absent
// optional vectors are undefined tensors. Sizes: N samples, C channels,
// S spatial positions per channel, G groups, D = C / G channels per group.
struct GnArgs {
  at::Tensor x, w, b, add, scale, shift;
  bool channels_last = false;
  int64_t N = 0, C = 0, S = 0, G = 0, D = 0;
};

inline at::Tensor gn_vector(const c10::optional<at::Tensor>& v, const at::Tensor& x, const char* name,
                            bool per_sample) {
  if (!v.has_value()) return at::Tensor();
  const auto& t = *v;
  TORCH_CHECK(t.scalar_type() == gn_stat_type(x), "fastdiff: ", name, " must be ", gn_stat_type(x), " (for ",
              x.scalar_type(), " x), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastdiff: ", name, " must be on ", x.device(), ", got ", t.device());
  if (per_sample) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "fastdiff: ", name,
                " must have shape (", x.size(0), ", ", x.size(1), "), got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "fastdiff: ", name, " must have shape (", x.size(1),
                ",), got ", t.sizes());
  }
  return t.contiguous();
}

inline GnArgs prepare_gn(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                         const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                         int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "fastdiff: x must have shape (N, C, *spatial), got ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "fastdiff: x must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "fastdiff: groups=", groups,
              " must be positive and divide the number of channels C=", x.size(1));
  GnArgs a;
  a.x = gn_canonical(x);
  a.channels_last = gn_channels_last(a.x);
  a.N = x.size(0);
  a.C = x.size(1);
  a.S = a.C == 0 || a.N == 0 ? 0 : x.numel() / (a.N * a.C);
  a.G = groups;
  a.D = a.C / groups;
  TORCH_CHECK(a.N == 0 || a.S * a.D > 0, "fastdiff: x has no elements per group (shape ", x.sizes(), ")");
  a.w = gn_vector(weight, x, "weight", false);
  a.b = gn_vector(bias, x, "bias", false);
  a.add = gn_vector(add, x, "add", true);
  a.scale = gn_vector(scale, x, "scale", true);
  a.shift = gn_vector(shift, x, "shift", true);
  return a;
}

// grad_y in x's canonical layout; mean/rstd (N, G) of the statistics dtype.
inline at::Tensor gn_prepare_backward(const GnArgs& a, const at::Tensor& grad_y, const at::Tensor& mean,
                                      const at::Tensor& rstd) {
  TORCH_CHECK(grad_y.sizes() == a.x.sizes() && grad_y.scalar_type() == a.x.scalar_type() &&
                  grad_y.device() == a.x.device(),
              "fastdiff: grad_y must match x (", a.x.scalar_type(), " ", a.x.sizes(), "), got ",
              grad_y.scalar_type(), " ", grad_y.sizes());
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->dim() == 2 && s->size(0) == a.N && s->size(1) == a.G && s->scalar_type() == gn_stat_type(a.x) &&
                    s->device() == a.x.device(),
                "fastdiff: mean and rstd must be ", gn_stat_type(a.x), " tensors of shape (", a.N, ", ", a.G,
                ") on ", a.x.device());
  }
  if (grad_y.strides() == a.x.strides()) return grad_y;
  at::Tensor g = gn_empty_like(a.x);
  g.copy_(grad_y);
  return g;
}

// The gradient of an absent optional vector: an empty tensor of the statistics dtype.
inline at::Tensor gn_no_grad(const at::Tensor& x) { return at::empty({0}, x.options().dtype(gn_stat_type(x))); }

#define FD_DECLARE_BLOCKS(dev)                                                                                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_##dev(                                             \
      const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,         \
      const c10::optional<at::Tensor>& add, const c10::optional<at::Tensor>& scale,                                 \
      const c10::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu);                                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_##dev( \
      const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,                       \
      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,                                  \
      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, const at::Tensor& mean,       \
      const at::Tensor& rstd, int64_t groups, bool silu);

FD_DECLARE_BLOCKS(cpu)
FD_DECLARE_BLOCKS(cuda)
#undef FD_DECLARE_BLOCKS

}  // namespace fastdiff
