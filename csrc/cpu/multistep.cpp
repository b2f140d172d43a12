// CPU kernel of fastdiff::multistep_step (see csrc/multistep.h and
// fastdiff/reference/multistep.py for the maths).
//
// The coefficient row is read once per call on the host and every term whose
// coefficient is exactly 0 is dropped before the loop, so a DPM-Solver++(2M)
// step reads sample, model_output and one history slot, and writes prev and
// one history slot: 5 passes of the tensor, in one sweep. Work is split with
// at::parallel_for into chunks inside one sample (the dynamic threshold is
// per sample); each chunk runs a few simple, branch-free loops over
// scratch rows that stay in L1/L2 (double for float32/float64 data, float for
// float16/bfloat16), which the compiler vectorises (an AVX2 clone for float32).
//
// In-kernel noise: step i draws the fastdiff Philox stream of the key
// [seed, offset + i] at the working layout's memory positions.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../multistep.h"
#include "noise_cpu.h"

namespace fastdiff {
namespace {

constexpr int64_t kMsChunk = 4096;  // elements per work item: 3 scratch rows of 32 KB (double)

template <typename scalar_t, typename state_t>
struct MsPtrs {
  const scalar_t* x;
  const scalar_t* m;
  const scalar_t* u;       // the unconditional output (guidance), or null
  const scalar_t* noise;   // a given noise tensor, or null
  const state_t* h[3];     // H[1..3] (null when unused)
  const state_t* last;     // last_sample (null when not read)
  scalar_t* prev;
  scalar_t* x0;            // return_x0 output, or null
  state_t* hist_w;         // history slot i mod K to push into, or null
  state_t* last_w;         // last_sample to push into, or null
};

// out (+)= c * in over n elements; `first` starts the sum.
template <typename acc_t, typename T>
FD_INLINE void ms_term(acc_t* __restrict__ out, acc_t c, const T* __restrict__ in, int64_t n, bool& first) {
  if (first) {
    for (int64_t j = 0; j < n; ++j) out[j] = c * static_cast<acc_t>(in[j]);
    first = false;
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] += c * static_cast<acc_t>(in[j]);
  }
}

template <typename acc_t>
FD_INLINE void ms_finish(acc_t* __restrict__ out, int64_t n, bool first) {
  if (first)
    for (int64_t j = 0; j < n; ++j) out[j] = acc_t(0);
}

// One chunk of n elements. x0b, xcb, pb: acc_t scratch of n; z: in-kernel noise (or null).
// With guidance (p.u set) the model output is first combined into gb:
// g = f * (c + (w - 1)(c - u)) (gw = w - 1, gf = f), which then stands for
// model_output in every term that reads it.
template <typename scalar_t, typename state_t, typename acc_t>
FD_INLINE void ms_chunk(const MsRow<acc_t>& c, const MsPtrs<scalar_t, state_t>& p, const float* z, acc_t s,
                        acc_t clip, acc_t* __restrict__ x0b, acc_t* __restrict__ xcb, acc_t* __restrict__ pb,
                        acc_t* __restrict__ gb, acc_t gw, acc_t gf, bool has_gf, int64_t n) {
  if (p.u) {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t cj = static_cast<acc_t>(p.m[j]);
      gb[j] = cj + gw * (cj - static_cast<acc_t>(p.u[j]));
    }
    if (has_gf)
      for (int64_t j = 0; j < n; ++j) gb[j] *= gf;
  }
  // x0 = c_x * sample + c_m * model_output, then threshold / clip
  bool first = true;
  if (c.use_cx) ms_term(x0b, c.cx, p.x, n, first);
  if (c.use_cm) {
    if (p.u) ms_term(x0b, c.cm, gb, n, first);
    else ms_term(x0b, c.cm, p.m, n, first);
  }
  ms_finish(x0b, n, first);
  if (s > acc_t(0)) {
    const acc_t inv = acc_t(1) / s;
    for (int64_t j = 0; j < n; ++j) x0b[j] = std::min(std::max(x0b[j], -s), s) * inv;
  } else if (clip > acc_t(0)) {
    for (int64_t j = 0; j < n; ++j) x0b[j] = std::min(std::max(x0b[j], -clip), clip);
  }
  // xc (UniPC's corrected sample)
  if (c.u_on) {
    first = true;
    if (c.use_ulast) ms_term(xcb, c.ulast, p.last, n, first);
    if (c.use_ux0) ms_term(xcb, c.ux0, x0b, n, first);
    for (int k = 0; k < 3; ++k)
      if (c.use_uh[k]) ms_term(xcb, c.uh[k], p.h[k], n, first);
    ms_finish(xcb, n, first);
  }
  // prev
  first = true;
  if (c.use_ax) {
    if (c.u_on) ms_term(pb, c.ax, xcb, n, first);
    else ms_term(pb, c.ax, p.x, n, first);
  }
  if (c.use_am) {
    if (p.u) ms_term(pb, c.am, gb, n, first);
    else ms_term(pb, c.am, p.m, n, first);
  }
  if (c.use_ax0) ms_term(pb, c.ax0, x0b, n, first);
  for (int k = 0; k < 3; ++k)
    if (c.use_ah[k]) ms_term(pb, c.ah[k], p.h[k], n, first);
  if (c.use_az) {
    if (z) ms_term(pb, c.az, z, n, first);
    else ms_term(pb, c.az, p.noise, n, first);
  }
  ms_finish(pb, n, first);
  // stores (all reads of history / last_sample for these elements are done)
  for (int64_t j = 0; j < n; ++j) p.prev[j] = static_cast<scalar_t>(pb[j]);
  if (p.x0)
    for (int64_t j = 0; j < n; ++j) p.x0[j] = static_cast<scalar_t>(x0b[j]);
  if (p.hist_w)
    for (int64_t j = 0; j < n; ++j) p.hist_w[j] = static_cast<state_t>(x0b[j]);
  if (p.last_w) {
    if (c.u_on) {
      for (int64_t j = 0; j < n; ++j) p.last_w[j] = static_cast<state_t>(xcb[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) p.last_w[j] = static_cast<state_t>(p.x[j]);
    }
  }
}

// The float32 instance, compiled for AVX2 and for the baseline; cpu/isa.h
// picks one per process (FASTDIFF_CPU_ISA=baseline forces the baseline).
#define FD_MS_ARGS                                                                                      \
  const MsRow<double>&c, const MsPtrs<float, float>&p, const float *z, double s, double clip, double *x0b, \
      double *xcb, double *pb, double *gb, double gw, double gf, bool has_gf, int64_t n
#define FD_MS_PASS c, p, z, s, clip, x0b, xcb, pb, gb, gw, gf, has_gf, n
#if FD_X86_DISPATCH
FD_TARGET_AVX2 void ms_chunk_f32_avx2(FD_MS_ARGS) { ms_chunk<float, float, double>(FD_MS_PASS); }
#endif
__attribute__((noinline)) void ms_chunk_f32_base(FD_MS_ARGS) { ms_chunk<float, float, double>(FD_MS_PASS); }
inline void ms_chunk_f32(FD_MS_ARGS) {
#if FD_X86_DISPATCH
  if (cpu_use_avx2()) return ms_chunk_f32_avx2(FD_MS_PASS);
#endif
  ms_chunk_f32_base(FD_MS_PASS);
}
#undef FD_MS_PASS

template <typename T>
T* ms_offset(T* base, int64_t off) { return base ? base + off : nullptr; }

template <typename scalar_t, typename state_t>
void ms_run(const MsArgs& a, at::Tensor& history, at::Tensor& last_sample, const double* r, int64_t i,
            const PhiloxKey& key, bool draw, double clip_range, at::Tensor& prev, at::Tensor& x0_out,
            bool return_x0, double guidance_scale) {
  // float32 data is combined in float64: the tables' coefficients can be large with opposite signs (UniPC,
  // 3M), so rounding them to float32 costs accuracy, and this memory-bound loop has cycles to spare.
  // float16/bfloat16 data use float32 (their storage rounding dominates).
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value ||
                                              std::is_same<scalar_t, float>::value, double, float>::type;
  const MsRow<acc_t> c = ms_decode_row<acc_t>(r, a.K);
  const int64_t K = a.K, N = a.x.size(0), M = per_sample(a.x);
  const int64_t hstride = K > 0 ? history.stride(0) : 0;
  state_t* hbase = K > 0 ? history.data_ptr<state_t>() : nullptr;
  MsPtrs<scalar_t, state_t> base{};
  base.x = a.x.data_ptr<scalar_t>();
  base.m = a.m.data_ptr<scalar_t>();
  // the model output is read only by the c_m / a_m terms: without them the guidance pass is skipped
  const bool guided = a.u.defined() && (c.use_cm || c.use_am);
  base.u = guided ? a.u.data_ptr<scalar_t>() : nullptr;
  const double* gfp = (guided && a.gfac.defined()) ? a.gfac.data_ptr<double>() : nullptr;
  const acc_t gw = acc_t(guidance_scale - 1.0);
  base.noise = (a.noise.defined() && c.use_az) ? a.noise.data_ptr<scalar_t>() : nullptr;
  for (int k = 0; k < 3; ++k) {
    const bool used = c.use_uh[k] || c.use_ah[k];
    base.h[k] = used ? hbase + (((i - (k + 1)) % K + K) % K) * hstride : nullptr;
  }
  base.last = (a.kept && c.use_ulast) ? last_sample.data_ptr<state_t>() : nullptr;
  base.prev = prev.data_ptr<scalar_t>();
  base.x0 = return_x0 ? x0_out.data_ptr<scalar_t>() : nullptr;
  base.hist_w = (c.push && K > 0) ? hbase + (i % K) * hstride : nullptr;
  base.last_w = (c.push && a.kept) ? last_sample.data_ptr<state_t>() : nullptr;
  const float* thp = a.thresh.defined() ? a.thresh.data_ptr<float>() : nullptr;
  const bool noise_in_kernel = draw && c.use_az;
  if (N == 0 || M == 0) return;
  const int64_t per = (M + kMsChunk - 1) / kMsChunk;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(M, kMsChunk));
  at::parallel_for(0, N * per, grain, [&](int64_t b, int64_t e) {
    thread_local std::vector<acc_t> scratch;
    thread_local std::vector<float> zbuf;
    if (scratch.size() < static_cast<size_t>(4 * kMsChunk)) scratch.resize(4 * kMsChunk);
    if (noise_in_kernel && zbuf.size() < static_cast<size_t>(kMsChunk)) zbuf.resize(kMsChunk);
    acc_t* x0b = scratch.data();
    acc_t* xcb = x0b + kMsChunk;
    acc_t* pb = xcb + kMsChunk;
    acc_t* gb = pb + kMsChunk;  // the guided model output (guidance only)
    for (int64_t it = b; it < e; ++it) {
      const int64_t n = it / per, lo = (it % per) * kMsChunk, hi = std::min(M, lo + kMsChunk);
      const int64_t off = n * M + lo, len = hi - lo;
      MsPtrs<scalar_t, state_t> p = base;
      p.x += off;
      p.m += off;
      p.u = ms_offset(p.u, off);
      p.noise = ms_offset(p.noise, off);
      for (int k = 0; k < 3; ++k) p.h[k] = ms_offset(p.h[k], off);
      p.last = ms_offset(p.last, off);
      p.prev += off;
      p.x0 = ms_offset(p.x0, off);
      p.hist_w = ms_offset(p.hist_w, off);
      p.last_w = ms_offset(p.last_w, off);
      const float* z = nullptr;
      if (noise_in_kernel) {
        cpu_noise::fill_normal(key, static_cast<uint64_t>(off), len, zbuf.data());
        z = zbuf.data();
      }
      const acc_t s = thp ? acc_t(thp[n]) : acc_t(0);
      const acc_t gf = gfp ? acc_t(gfp[n]) : acc_t(1);
      if constexpr (std::is_same<scalar_t, float>::value && std::is_same<state_t, float>::value) {
        ms_chunk_f32(c, p, z, s, acc_t(clip_range), x0b, xcb, pb, gb, gw, gf, gfp != nullptr, len);
      } else {
        ms_chunk<scalar_t, state_t, acc_t>(c, p, z, s, acc_t(clip_range), x0b, xcb, pb, gb, gw, gf, gfp != nullptr,
                                           len);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multistep_step_cpu(
    const at::Tensor& model_output, const at::Tensor& sample, at::Tensor& history, at::Tensor& last_sample,
    const at::Tensor& coeffs, at::Tensor& step_index, const c10::optional<at::Tensor>& noise,
    const c10::optional<at::Tensor>& key, const c10::optional<at::Tensor>& thresh, double clip_range,
    bool return_x0, const c10::optional<at::Tensor>& uncond_output, double guidance_scale,
    const c10::optional<at::Tensor>& guidance_factor) {
  const MsArgs a = ms_prepare(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh,
                              clip_range, uncond_output, guidance_scale, guidance_factor);
  int64_t* ip = step_index.data_ptr<int64_t>();
  const int64_t i = *ip, n_rows = coeffs.size(0);
  TORCH_CHECK_VALUE(i >= 0 && i < n_rows, "fastdiff: step_index=", i, " is outside the coefficient table's rows [0, ",
                    n_rows, ")");
  // the row, read once (coeffs may be a strided view)
  double r[kMsNCoef];
  const auto ca = coeffs.accessor<double, 2>();
  for (int col = 0; col < kMsNCoef; ++col) r[col] = ca[i][col];
  const char* bad = ms_row_problem(r, a.K, a.kept, a.noise.defined() || a.key.defined());
  TORCH_CHECK_VALUE(bad == nullptr, "fastdiff: coeffs row ", i, ": ", bad ? bad : "");
  PhiloxKey k{};
  if (a.key.defined()) {
    const int64_t* kp = a.key.data_ptr<int64_t>();
    k = make_key(kp[0], static_cast<int64_t>(static_cast<uint64_t>(kp[1]) + static_cast<uint64_t>(i)));
  }
  at::Tensor prev = ms_empty(a, sample.scalar_type());
  at::Tensor x0_out = return_x0 ? ms_empty(a, sample.scalar_type()) : at::empty({0}, sample.options());
  const bool f32_state = a.K > 0 ? history.scalar_type() == at::kFloat
                                 : (a.kept ? last_sample.scalar_type() == at::kFloat : false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "fastdiff_multistep_cpu", [&] {
    if (f32_state && !std::is_same<scalar_t, float>::value) {
      ms_run<scalar_t, float>(a, history, last_sample, r, i, k, a.key.defined(), clip_range, prev, x0_out,
                              return_x0, guidance_scale);
    } else {
      ms_run<scalar_t, scalar_t>(a, history, last_sample, r, i, k, a.key.defined(), clip_range, prev, x0_out,
                                 return_x0, guidance_scale);
    }
  });
  *ip = i + 1;
  return {prev, x0_out};
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("multistep_step", &multistep_step_cpu); }

}  // namespace fastdiff
