// CUDA kernel of fastdiff::multistep_step (maths: fastdiff/reference/multistep.py;
// host checks and layout: csrc/multistep.h).
//
// Nothing is read on the host: each block loads step_index and its 16-double
// coefficient row into shared memory once, checks the row (ms_row_problem,
// the CPU kernel's rule), and every thread then walks Philox groups of 4
// consecutive elements of the flat working layout (so the in-kernel noise of
// group g is one Philox call, at the stream position the CPU kernel uses).
// Terms whose coefficient is exactly 0 are skipped by block-uniform branches
// (no memory traffic). A row that cannot be applied, or an index outside the
// table, gives NaN outputs and no write to history / last_sample; addresses
// are always formed from a clamped index.
//
// Advancing step_index: all blocks read it, so none of them may write it
// while others may still be starting. We increment it in a second
// <<<1, 1>>> launch on the same stream: stream order makes it run after every
// block of the main kernel, it needs no zero-initialised ticket counter (a
// "last block" ticket would, and a static one would race between streams),
// and it is one more node in a captured CUDA graph (well under 1 us).
//
// Compiled here, not yet run on a GPU (none was available when it was written).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../multistep.h"

namespace fastdiff {
namespace {

constexpr int kMsThreads = 256;

template <typename scalar_t, typename state_t>
struct MsKernelArgs {
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ m;
  const scalar_t* __restrict__ u;       // unconditional output (classifier-free guidance) or null
  const double* __restrict__ gfac;      // per-sample guidance-rescale factor or null
  const scalar_t* __restrict__ noise;
  const int64_t* __restrict__ key;
  const float* __restrict__ thresh;
  const double* __restrict__ coeffs;  // contiguous (n_rows, 16)
  const int64_t* __restrict__ step_index;
  state_t* hist;     // K slots, slot stride hstride (read and written: no __restrict__)
  state_t* last;     // last_sample or null
  scalar_t* __restrict__ prev;
  scalar_t* __restrict__ x0;  // or null
  int64_t numel, M, n_rows, hstride, K;
  double clip_d, guidance_scale;
  bool kept, has_noise_tensor, has_key;
};

template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kMsThreads) multistep_kernel(const MsKernelArgs<scalar_t, state_t> a) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  __shared__ double row[kMsNCoef];
  __shared__ int64_t s_i;
  __shared__ int s_ok;
  if (threadIdx.x == 0) {
    const int64_t i = *a.step_index;
    const bool in_range = i >= 0 && i < a.n_rows;
    const int64_t ic = in_range ? i : 0;
    for (int c = 0; c < kMsNCoef; ++c) row[c] = a.coeffs[ic * kMsNCoef + c];
    s_ok = in_range && ms_row_problem(row, a.K, a.kept, a.has_noise_tensor || a.has_key) == nullptr;
    s_i = ic;
  }
  __syncthreads();
  const int64_t i = s_i;
  const bool ok = s_ok != 0;
  const MsRow<acc_t> c = ms_decode_row<acc_t>(row, a.K);
  const acc_t cx = c.cx, cm = c.cm, ulast = c.ulast, ux0 = c.ux0, ax = c.ax, am = c.am, ax0 = c.ax0, az = c.az;
  const bool u_on = c.u_on, push = ok && c.push;
  const bool use_cx = c.use_cx, use_cm = c.use_cm, use_ux0 = c.use_ux0, use_ulast = a.kept && c.use_ulast;
  const bool use_ax = c.use_ax, use_am = c.use_am, use_ax0 = c.use_ax0, use_az = ok && c.use_az;
  const state_t* h[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) h[k] = k < a.K ? a.hist + (((i - (k + 1)) % a.K + a.K) % a.K) * a.hstride : nullptr;
  state_t* hw = (push && a.K > 0) ? a.hist + (i % a.K) * a.hstride : nullptr;
  PhiloxKey key{};
  if (a.has_key && use_az)
    key = make_key(a.key[0], static_cast<int64_t>(static_cast<uint64_t>(a.key[1]) + static_cast<uint64_t>(i)));
  const acc_t nan = fd_nan<acc_t>();
  const acc_t gw = acc_t(a.guidance_scale - 1.0);
  const int64_t groups = (a.numel + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (use_az && a.has_key) normal4(key, static_cast<uint64_t>(g), z);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = g * 4 + l;
      if (e >= a.numel) break;
      const acc_t xv = static_cast<acc_t>(a.x[e]);
      acc_t mv = (use_cm || use_am) ? static_cast<acc_t>(a.m[e]) : acc_t(0);
      if (a.u && (use_cm || use_am)) {  // guidance: f * (c + (w - 1)(c - u)), read in the same sweep
        mv = mv + gw * (mv - static_cast<acc_t>(a.u[e]));
        if (a.gfac) mv = mv * acc_t(a.gfac[e / a.M]);
      }
      acc_t x0 = (use_cx ? cx * xv : acc_t(0)) + (use_cm ? cm * mv : acc_t(0));
      const acc_t s = a.thresh ? acc_t(a.thresh[e / a.M]) : acc_t(0);
      x0 = clip_x0<acc_t>(x0, acc_t(a.clip_d), s);
      acc_t hv[3];
#pragma unroll
      for (int k = 0; k < 3; ++k) hv[k] = (c.use_uh[k] || c.use_ah[k]) ? static_cast<acc_t>(h[k][e]) : acc_t(0);
      acc_t xc = xv;
      if (u_on) {
        xc = (use_ulast ? ulast * static_cast<acc_t>(a.last[e]) : acc_t(0)) + (use_ux0 ? ux0 * x0 : acc_t(0));
#pragma unroll
        for (int k = 0; k < 3; ++k)
          if (c.use_uh[k]) xc += c.uh[k] * hv[k];
      }
      acc_t r = (use_ax ? ax * xc : acc_t(0)) + (use_am ? am * mv : acc_t(0)) + (use_ax0 ? ax0 * x0 : acc_t(0));
#pragma unroll
      for (int k = 0; k < 3; ++k)
        if (c.use_ah[k]) r += c.ah[k] * hv[k];
      if (use_az) r += az * (a.has_key ? acc_t(z[l]) : static_cast<acc_t>(a.noise[e]));
      a.prev[e] = static_cast<scalar_t>(ok ? r : nan);
      if (a.x0) a.x0[e] = static_cast<scalar_t>(ok ? x0 : nan);
      // the pushes come after this element's reads of history / last_sample
      if (hw) hw[e] = static_cast<state_t>(x0);
      if (push && a.kept) a.last[e] = static_cast<state_t>(xc);
    }
  }
}

__global__ void multistep_advance_kernel(int64_t* step_index) { *step_index += 1; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> multistep_step_cuda(
    const at::Tensor& model_output, const at::Tensor& sample, at::Tensor& history, at::Tensor& last_sample,
    const at::Tensor& coeffs, at::Tensor& step_index, const c10::optional<at::Tensor>& noise,
    const c10::optional<at::Tensor>& key, const c10::optional<at::Tensor>& thresh, double clip_range,
    bool return_x0, const c10::optional<at::Tensor>& uncond_output, double guidance_scale,
    const c10::optional<at::Tensor>& guidance_factor) {
  const MsArgs a = ms_prepare(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh,
                              clip_range, uncond_output, guidance_scale, guidance_factor);
  const c10::cuda::CUDAGuard guard(sample.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor prev = ms_empty(a, sample.scalar_type());
  at::Tensor x0_out = return_x0 ? ms_empty(a, sample.scalar_type()) : at::empty({0}, sample.options());
  const at::Tensor cf = coeffs.contiguous();
  const int64_t numel = a.x.numel();
  if (numel > 0) {
    const bool f32_state = a.K > 0 ? history.scalar_type() == at::kFloat
                                   : (a.kept ? last_sample.scalar_type() == at::kFloat : false);
    const int64_t groups = (numel + 3) / 4;
    int dev_sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev_sms, cudaDevAttrMultiProcessorCount, sample.device().index()));
    const int64_t blocks = std::min<int64_t>((groups + kMsThreads - 1) / kMsThreads, int64_t(dev_sms) * 16);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "fastdiff_multistep_cuda", [&] {
      auto launch = [&](auto state_tag) {
        using state_t = decltype(state_tag);
        MsKernelArgs<scalar_t, state_t> k{};
        k.x = a.x.data_ptr<scalar_t>();
        k.m = a.m.data_ptr<scalar_t>();
        k.u = a.u.defined() ? a.u.data_ptr<scalar_t>() : nullptr;
        k.gfac = a.gfac.defined() ? a.gfac.data_ptr<double>() : nullptr;
        k.guidance_scale = guidance_scale;
        k.noise = a.noise.defined() ? a.noise.data_ptr<scalar_t>() : nullptr;
        k.key = a.key.defined() ? a.key.data_ptr<int64_t>() : nullptr;
        k.thresh = a.thresh.defined() ? a.thresh.data_ptr<float>() : nullptr;
        k.coeffs = cf.data_ptr<double>();
        k.step_index = step_index.data_ptr<int64_t>();
        k.hist = a.K > 0 ? history.data_ptr<state_t>() : nullptr;
        k.last = a.kept ? last_sample.data_ptr<state_t>() : nullptr;
        k.prev = prev.data_ptr<scalar_t>();
        k.x0 = return_x0 ? x0_out.data_ptr<scalar_t>() : nullptr;
        k.numel = numel;
        k.M = per_sample(a.x);
        k.n_rows = cf.size(0);
        k.hstride = a.K > 0 ? history.stride(0) : 0;
        k.K = a.K;
        k.clip_d = clip_range;
        k.kept = a.kept;
        k.has_noise_tensor = a.noise.defined();
        k.has_key = a.key.defined();
        multistep_kernel<scalar_t, state_t><<<static_cast<unsigned>(blocks), kMsThreads, 0, stream>>>(k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (f32_state && !std::is_same<scalar_t, float>::value) {
        launch(float{});
      } else {
        launch(scalar_t{});
      }
    });
  }
  multistep_advance_kernel<<<1, 1, 0, stream>>>(step_index.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {prev, x0_out};
}

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("multistep_step", &multistep_step_cuda); }

}  // namespace fastdiff
