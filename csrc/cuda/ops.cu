// CUDA kernels of the fastdiff operators.
//
// Every op is a memory-bound pass over tensors laid out like the primary one
// (dense, batch-major: sample n owns flat elements [n*M, (n+1)*M)). One
// kernel template (`sample_kernel`) walks that layout for all five ops; an
// "Op" functor supplies the per-sample coefficients and the per-element
// maths, which come from common.h so the CPU and CUDA backends agree.
//
// Work split: a block handles one chunk of one sample ("item"). Within the
// sample, elements are processed in Philox groups of 4 (group g = flat index
// / 4, one Philox call gives its 4 normals). A sample need not start on a
// multiple of 4, so the <= 3 leading and <= 3 trailing elements that share a
// group with a neighbouring sample go through a scalar path in chunk 0.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../host.h"

namespace fastdiff {
namespace {

constexpr int kMaxThreads = 256;       // threads per block (fewer for tiny samples)
constexpr int64_t kTargetItems = 2048; // ~2 waves of 256-thread blocks on a 132-SM H100
constexpr int kMaxIters = 8;           // max unrolled iterations per block: amortises per-sample set-up

// Groups per thread per loop iteration: all their loads are issued before any
// maths, for memory-level parallelism; sized so the loaded values take about
// 32 registers (more would spill under the 64/80-register launch bounds).
constexpr int unroll_for(int elem_bytes, int n_in) {
  const int u = 32 / (elem_bytes * n_in);
  return u < 1 ? 1 : (u > 4 ? 4 : u);
}

template <typename scalar_t>
using acc_type_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// ------------------------------------------------------- vector memory ----
// Four consecutive elements as one access: 16 B for fp32 (LDG.128), 8 B for
// fp16/bf16, 2 x 16 B for fp64. `vec` is false when some pointer is not
// aligned to min(16, 4*sizeof) bytes; then four scalar accesses are used.
// Group starts are multiples of 4 elements, so an aligned base pointer makes
// every group access aligned.
template <typename scalar_t>
__device__ __forceinline__ void load4(const scalar_t* __restrict__ p, bool vec, scalar_t (&v)[4]) {
  if (vec) {
    if constexpr (sizeof(scalar_t) == 2) {
      const uint2 r = *reinterpret_cast<const uint2*>(p);
      memcpy(&v[0], &r, 8);
    } else if constexpr (sizeof(scalar_t) == 4) {
      const uint4 r = *reinterpret_cast<const uint4*>(p);
      memcpy(&v[0], &r, 16);
    } else {
      const uint4 r0 = reinterpret_cast<const uint4*>(p)[0];
      const uint4 r1 = reinterpret_cast<const uint4*>(p)[1];
      memcpy(&v[0], &r0, 16);
      memcpy(&v[2], &r1, 16);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = p[j];
  }
}

template <typename scalar_t>
__device__ __forceinline__ void store4(scalar_t* __restrict__ p, bool vec, const scalar_t (&v)[4]) {
  if (vec) {
    if constexpr (sizeof(scalar_t) == 2) {
      uint2 r;
      memcpy(&r, &v[0], 8);
      *reinterpret_cast<uint2*>(p) = r;
    } else if constexpr (sizeof(scalar_t) == 4) {
      uint4 r;
      memcpy(&r, &v[0], 16);
      *reinterpret_cast<uint4*>(p) = r;
    } else {
      uint4 r0, r1;
      memcpy(&r0, &v[0], 16);
      memcpy(&r1, &v[2], 16);
      reinterpret_cast<uint4*>(p)[0] = r0;
      reinterpret_cast<uint4*>(p)[1] = r1;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) p[j] = v[j];
  }
}

__device__ __forceinline__ float pick_lane(const float (&z)[4], int lane) {
  // selects instead of z[lane]: a dynamic index would put z in local memory
  return lane == 0 ? z[0] : (lane == 1 ? z[1] : (lane == 2 ? z[2] : z[3]));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------ the engine --
// Op interface (all members device-callable, Op passed by value as a kernel
// argument):
//   scalar_t, acc_t, Coef (trivial type), kIn, kOut, kRng, kReduce,
//   kSharedCoef, kUnroll, kMinBlocks (launch bound: 4 caps registers at 64, 3 at 80)
//   in[kIn] / out[kOut]  stream pointers (nullptr: input reads 0 / output skipped)
//   key                  int64 [seed, offset] on the device (kRng only)
//   Coef coef(n)         per-sample coefficients (float64 maths of common.h)
//   bool wants_z(c)      does this sample need the noise stream?
//   apply(c, x, z, y, red)  one element: inputs x, normal z -> outputs y, red += loss term
//   finish(n, chunk, chunks, sum)  (kReduce) the block's sum of `red`
template <typename Op, typename index_t>
__global__ void __launch_bounds__(kMaxThreads, Op::kMinBlocks)
    sample_kernel(const Op op, const index_t M, const index_t chunks, const index_t cg, const int64_t items,
                  const bool vec) {
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  using Coef = typename Op::Coef;
  constexpr int kIn = Op::kIn, kOut = Op::kOut, U = Op::kUnroll;
  const index_t tid = static_cast<index_t>(threadIdx.x), nt = static_cast<index_t>(blockDim.x);

  // Two buffers indexed by item parity: one __syncthreads per item suffices,
  // since buffer p is rewritten only after every thread passed the next barrier.
  __shared__ Coef coef_buf[2];
  __shared__ acc_t red_buf[2][kMaxThreads / 32];

  PhiloxKey key{};
  if constexpr (Op::kRng) key = make_key(op.key[0], op.key[1]);  // read on the device: no host sync

  int parity = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, parity ^= 1) {
    const index_t n = static_cast<index_t>(item / chunks);
    const index_t ch = static_cast<index_t>(item - static_cast<int64_t>(n) * chunks);

    Coef c;
    if constexpr (Op::kSharedCoef) {
      // heavy float64 set-up (divisions, logs): one thread computes, the block shares it
      if (tid == 0) coef_buf[parity] = op.coef(n);
      __syncthreads();
      c = coef_buf[parity];
    } else {
      c = op.coef(n);  // cheap (two sqrt): redundant per thread beats a barrier
    }
    const bool use_z = Op::kRng && op.wants_z(c);  // e.g. DDPM at t = 0 skips the generator
    acc_t red = acc_t(0);

    const index_t s = n * M, e = s + M;
    const index_t gs = (s + 3) >> 2;  // first group fully inside the sample
    const index_t ge = e >> 2;        // one past the last such group

    // ---- scalar head / tail (chunk 0 only): elements sharing a group with a neighbour
    if (ch == 0) {
      const index_t h_end = (gs << 2) < e ? (gs << 2) : e;
      const index_t t_beg = (ge << 2) > h_end ? (ge << 2) : h_end;
      const index_t nh = h_end - s, cnt = nh + (e - t_beg);
      for (index_t k = tid; k < cnt; k += nt) {
        const index_t i = k < nh ? s + k : t_beg + (k - nh);
        float z = 0.0f;
        if (use_z) {
          float z4[4];
          normal4(key, static_cast<uint64_t>(i >> 2), z4);
          z = pick_lane(z4, static_cast<int>(i & 3));
        }
        acc_t x[kIn], y[kOut];
#pragma unroll
        for (int q = 0; q < kIn; ++q) x[q] = op.in[q] ? static_cast<acc_t>(op.in[q][i]) : acc_t(0);
        op.apply(c, x, z, y, red);
#pragma unroll
        for (int q = 0; q < kOut; ++q)
          if (op.out[q]) op.out[q][i] = static_cast<scalar_t>(y[q]);
      }
    }

    // ---- vectorised body: full groups [g0, g1) of this chunk
    const index_t g0 = gs + ch * cg;
    const index_t g1 = (g0 + cg) < ge ? (g0 + cg) : ge;
    for (index_t gb = g0; gb < g1; gb += static_cast<index_t>(U) * nt) {
      // all loads of U groups first: U independent requests in flight per thread
      scalar_t v[U][kIn][4];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const index_t g = gb + static_cast<index_t>(u) * nt + tid;  // consecutive threads, consecutive groups: coalesced
        if (g < g1) {
#pragma unroll
          for (int q = 0; q < kIn; ++q)
            if (op.in[q]) load4(op.in[q] + (g << 2), vec, v[u][q]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const index_t g = gb + static_cast<index_t>(u) * nt + tid;
        if (g < g1) {
          float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          if (use_z) normal4(key, static_cast<uint64_t>(g), z);  // one Philox call: 4 normals
          scalar_t o[kOut][4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc_t x[kIn], y[kOut];
#pragma unroll
            for (int q = 0; q < kIn; ++q) x[q] = op.in[q] ? static_cast<acc_t>(v[u][q][j]) : acc_t(0);
            op.apply(c, x, z[j], y, red);
#pragma unroll
            for (int q = 0; q < kOut; ++q) o[q][j] = static_cast<scalar_t>(y[q]);
          }
#pragma unroll
          for (int q = 0; q < kOut; ++q)
            if (op.out[q]) store4(op.out[q] + (g << 2), vec, o[q]);
        }
      }
    }

    if constexpr (Op::kReduce) {
      // deterministic block sum: fixed thread -> element map, fixed shuffle tree
      red = warp_sum(red);
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
      if (lane == 0) red_buf[parity][warp] = red;
      __syncthreads();
      if (warp == 0) {
        acc_t r = lane < nwarps ? red_buf[parity][lane] : acc_t(0);
        r = warp_sum(r);
        if (lane == 0) op.finish(n, ch, chunks, r);
      }
    }
  }
}

// ------------------------------------------------------------------- ops --
template <typename acc_t>
__device__ __forceinline__ acc_t nan_if(bool invalid, acc_t v) {
  return invalid ? fd_nan<acc_t>() : v;
}

// x_t = a x0 + b eps; in = {x0, noise}, out = {x_t, noise_out}
template <typename scalar_t_, bool kRng_>
struct QSampleOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_type_t<scalar_t>;
  static constexpr int kIn = 2, kOut = 2, kUnroll = unroll_for(sizeof(scalar_t), kIn);
  static constexpr bool kRng = kRng_, kReduce = false, kSharedCoef = false;
  static constexpr int kMinBlocks = 4;  // >= 50% occupancy
  struct Coef {
    acc_t a, b;
  };
  const scalar_t* in[kIn];
  scalar_t* out[kOut];
  const int64_t* key;
  const int64_t* t;
  const double* abar;
  int64_t T;

  __device__ __forceinline__ Coef coef(int64_t n) const {
    const QCoef q = q_coef(abar, T, t[n]);
    return Coef{nan_if(!q.valid, static_cast<acc_t>(q.a)), nan_if(!q.valid, static_cast<acc_t>(q.b))};
  }
  __device__ __forceinline__ bool wants_z(const Coef&) const { return true; }
  __device__ __forceinline__ void apply(const Coef& c, const acc_t (&x)[kIn], float z, acc_t (&y)[kOut],
                                        acc_t&) const {
    const acc_t eps = kRng ? static_cast<acc_t>(z) : x[1];
    y[0] = c.a * x[0] + c.b * eps;
    y[1] = eps;  // stored only when the noise is returned
  }
  __device__ __forceinline__ void finish(int64_t, int64_t, int64_t, acc_t) const {}
};

// per-sample MSE against eps / x0 / v and its gradient; in = {out, x0, noise}, out = {grad}.
// An input the target does not need is null (not read). kBwd_: the recomputing
// backward (grad_loss[n] folded into the gradient scale, no reduction).
template <typename scalar_t_, bool kRng_, bool kBwd_ = false>
struct LossOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_type_t<scalar_t>;
  static constexpr int kIn = 3, kOut = 1, kUnroll = unroll_for(sizeof(scalar_t), kIn);
  static constexpr bool kRng = kRng_, kReduce = !kBwd_, kSharedCoef = false;
  static constexpr int kMinBlocks = 4;
  struct Coef {
    acc_t a, b, gscale, poison;
  };
  const scalar_t* in[kIn];
  scalar_t* out[kOut];
  const int64_t* key;
  const int64_t* t;
  const double* abar;
  int64_t T;
  const float* weight;
  acc_t* partial;  // [N, chunks] block sums, when chunks > 1
  acc_t* loss;     // (N,), written directly when chunks == 1
  const acc_t* grad_loss;  // (N,) incoming per-sample gradient (kBwd_ only)
  int64_t M;
  int64_t target;

  __device__ __forceinline__ Coef coef(int64_t n) const {
    const QCoef q = q_coef(abar, T, t[n]);
    Coef c;
    c.a = nan_if(!q.valid, static_cast<acc_t>(q.a));
    c.b = nan_if(!q.valid, static_cast<acc_t>(q.b));
    double gs = 2.0 * static_cast<double>(weight[n]) / static_cast<double>(M);
    if constexpr (kBwd_) gs *= static_cast<double>(grad_loss[n]);
    c.gscale = static_cast<acc_t>(gs);
    c.poison = q.valid ? acc_t(0) : fd_nan<acc_t>();  // invalid t: NaN loss and grad
    return c;
  }
  __device__ __forceinline__ bool wants_z(const Coef&) const { return target != kSample; }
  __device__ __forceinline__ void apply(const Coef& c, const acc_t (&x)[kIn], float z, acc_t (&y)[kOut],
                                        acc_t& red) const {
    const acc_t eps = kRng ? static_cast<acc_t>(z) : x[2];
    const acc_t x0 = x[1];
    const acc_t tgt = target == kEpsilon ? eps : (target == kSample ? x0 : c.a * eps - c.b * x0);
    const acc_t d = x[0] - tgt + c.poison;
    red += d * d;
    y[0] = c.gscale * d;
  }
  __device__ __forceinline__ void finish(int64_t n, int64_t ch, int64_t chunks, acc_t sum) const {
    if constexpr (kBwd_) return;
    if (chunks == 1)  // one block per sample: skip the finalize kernel
      loss[n] = static_cast<acc_t>(static_cast<double>(weight[n]) * static_cast<double>(sum) /
                                   static_cast<double>(M));
    else
      partial[n * chunks + ch] = sum;
  }
};

// Sums each sample's block partials in a fixed order (deterministic), scales by w / M.
template <typename acc_t>
__global__ void loss_finalize_kernel(const acc_t* __restrict__ partial, const float* __restrict__ weight,
                                     acc_t* __restrict__ loss, int64_t N, int64_t chunks, int64_t M) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += static_cast<double>(partial[n * chunks + c]);
  loss[n] = static_cast<acc_t>(static_cast<double>(weight[n]) * s / static_cast<double>(M));
}

// Per-sample data shared by both reverse steps.
template <typename acc_t>
struct StepBlockCoef {
  acc_t sab, s1m, cx0, cxt, std, th;
  acc_t gf;  // classifier-free guidance rescale factor of the sample (1 without rescale)
  acc_t log_small, log_large;  // learned_range end points, already rounded as ddpm_elem_std rounds them
  bool valid, add_noise;
};

template <typename acc_t>
__device__ __forceinline__ StepBlockCoef<acc_t> step_block_coef(const StepCoef& sc, const float* thresh, int64_t n,
                                                                bool noise_source) {
  StepBlockCoef<acc_t> c;
  c.sab = static_cast<acc_t>(sc.sqrt_ab);
  c.s1m = static_cast<acc_t>(sc.sqrt_1m_ab);
  c.cx0 = static_cast<acc_t>(sc.c_x0);
  c.cxt = static_cast<acc_t>(sc.c_xt);
  c.std = static_cast<acc_t>(sc.std);
  c.th = thresh ? static_cast<acc_t>(thresh[n]) : acc_t(0);
  c.gf = acc_t(1);
  c.log_small = static_cast<acc_t>(sc.log_small);
  c.log_large = static_cast<acc_t>(sc.log_large);
  c.valid = sc.valid;
  c.add_noise = sc.valid && sc.noise_on && noise_source;
  return c;
}

// Classifier-free guidance: the model output the step uses, f * (c + (w - 1)(c - u)),
// from the conditional c and unconditional u read in the same sweep.
template <typename acc_t>
__device__ __forceinline__ acc_t guided_output(bool guided, acc_t c, acc_t u, acc_t gw, acc_t gf) {
  return guided ? (c + gw * (c - u)) * gf : c;
}

// Ancestral DDPM step; in = {model_output, sample, model_var, noise, uncond_output}, out = {prev, x0_hat}
template <typename scalar_t_, bool kRng_>
struct DdpmOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_type_t<scalar_t>;
  static constexpr int kIn = 5, kOut = 2, kUnroll = unroll_for(sizeof(scalar_t), kIn);
  static constexpr bool kRng = kRng_, kReduce = false, kSharedCoef = true;
  static constexpr int kMinBlocks = 3;  // more live state: 80 registers avoid spills, 37.5% occupancy is plenty
  using Coef = StepBlockCoef<acc_t>;
  const scalar_t* in[kIn];
  scalar_t* out[kOut];
  const int64_t* key;
  const int64_t* t;
  const int64_t* t_prev;
  const double* abar;
  const float* thresh;
  int64_t T;
  int64_t pred, var_type;
  acc_t clip;
  acc_t gw;             // guidance_scale - 1
  const double* gfac;   // per-sample rescale factor, or null

  __device__ __forceinline__ Coef coef(int64_t n) const {
    Coef c = step_block_coef<acc_t>(ddpm_coef(abar, T, t[n], t_prev[n], var_type), thresh, n,
                                    kRng || in[3] != nullptr);
    if (gfac) c.gf = static_cast<acc_t>(gfac[n]);
    return c;
  }
  __device__ __forceinline__ bool wants_z(const Coef& c) const { return c.add_noise; }
  __device__ __forceinline__ void apply(const Coef& c, const acc_t (&x)[kIn], float z, acc_t (&y)[kOut],
                                        acc_t&) const {
    if (!c.valid) {
      y[0] = y[1] = fd_nan<acc_t>();
      return;
    }
    const acc_t o = guided_output<acc_t>(in[4] != nullptr, x[0], x[4], gw, c.gf), xv = x[1];
    const acc_t x0 = clip_x0<acc_t>(predict_x0<acc_t>(o, xv, c.sab, c.s1m, pred), clip, c.th);
    acc_t r = c.cx0 * x0 + c.cxt * xv;
    if (c.add_noise) {
      const acc_t eps = kRng ? static_cast<acc_t>(z) : x[3];
      acc_t sd = c.std;  // fixed types: the per-sample std (what ddpm_elem_std returns for them)
      if (var_type >= kLearned) {
        // acc_t -> double -> acc_t is exact, so this is ddpm_elem_std on the float64 coefficients
        StepCoef sc{};
        sc.log_small = static_cast<double>(c.log_small);
        sc.log_large = static_cast<double>(c.log_large);
        sd = ddpm_elem_std<acc_t>(sc, var_type, x[2]);
      }
      r += sd * eps;
    }
    y[0] = r;
    y[1] = x0;
  }
  __device__ __forceinline__ void finish(int64_t, int64_t, int64_t, acc_t) const {}
};

// DDIM step; in = {model_output, sample, noise, uncond_output}, out = {prev, x0_hat}
template <typename scalar_t_, bool kRng_>
struct DdimOp {
  using scalar_t = scalar_t_;
  using acc_t = acc_type_t<scalar_t>;
  static constexpr int kIn = 4, kOut = 2, kUnroll = unroll_for(sizeof(scalar_t), kIn);
  static constexpr bool kRng = kRng_, kReduce = false, kSharedCoef = true;
  static constexpr int kMinBlocks = 3;  // more live state: 80 registers avoid spills, 37.5% occupancy is plenty
  using Coef = StepBlockCoef<acc_t>;
  const scalar_t* in[kIn];
  scalar_t* out[kOut];
  const int64_t* key;
  const int64_t* t;
  const int64_t* t_prev;
  const double* abar;
  const float* thresh;
  int64_t T;
  int64_t pred;
  acc_t clip;
  double eta, final_ab;
  bool use_clipped;
  acc_t gw;             // guidance_scale - 1
  const double* gfac;   // per-sample rescale factor, or null

  __device__ __forceinline__ Coef coef(int64_t n) const {
    Coef c = step_block_coef<acc_t>(ddim_coef(abar, T, t[n], t_prev[n], eta, final_ab), thresh, n,
                                    kRng || in[2] != nullptr);
    if (gfac) c.gf = static_cast<acc_t>(gfac[n]);
    return c;
  }
  __device__ __forceinline__ bool wants_z(const Coef& c) const { return c.add_noise; }
  __device__ __forceinline__ void apply(const Coef& c, const acc_t (&x)[kIn], float z, acc_t (&y)[kOut],
                                        acc_t&) const {
    if (!c.valid) {
      y[0] = y[1] = fd_nan<acc_t>();
      return;
    }
    const acc_t o = guided_output<acc_t>(in[3] != nullptr, x[0], x[3], gw, c.gf), xv = x[1];
    acc_t eps = pred == kEpsilon ? o : (pred == kSample ? (xv - c.sab * o) / c.s1m : c.sab * o + c.s1m * xv);
    const acc_t x0 = clip_x0<acc_t>(predict_x0<acc_t>(o, xv, c.sab, c.s1m, pred), clip, c.th);
    if (use_clipped) eps = (xv - c.sab * x0) / c.s1m;
    acc_t r = c.cx0 * x0 + c.cxt * eps;
    if (c.add_noise) r += c.std * (kRng ? static_cast<acc_t>(z) : x[2]);
    y[0] = r;
    y[1] = x0;
  }
  __device__ __forceinline__ void finish(int64_t, int64_t, int64_t, acc_t) const {}
};

// ------------------------------------------------------------------ host --
struct Plan {
  int threads;
  int64_t cg;      // full groups per chunk
  int64_t chunks;  // chunks per sample
  int64_t items;   // N * chunks
  unsigned grid;
};

// Depends only on (N, M, unroll), not on the device, so the loss's
// reduction order (hence its rounding) is the same on every GPU.
Plan make_plan(int64_t N, int64_t M, int unroll) {
  Plan p;
  const int64_t full = M / 4;  // most full groups a sample can hold
  p.threads = 32;
  while (p.threads < kMaxThreads && p.threads < full) p.threads *= 2;  // tiny samples: small blocks
  const int64_t want_chunks = std::max<int64_t>(1, (kTargetItems + N - 1) / N);
  int64_t cg = (full + want_chunks - 1) / want_chunks;
  cg = (cg + p.threads - 1) / p.threads * p.threads;  // whole groups-per-thread rounds
  cg = std::min<int64_t>(std::max<int64_t>(cg, p.threads), static_cast<int64_t>(p.threads) * unroll * kMaxIters);
  p.cg = cg;
  p.chunks = std::max<int64_t>(1, (full + cg - 1) / cg);
  p.items = N * p.chunks;
  p.grid = static_cast<unsigned>(std::min<int64_t>(p.items, std::numeric_limits<int32_t>::max()));
  return p;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename Op>
bool op_aligned(const Op& op) {
  using scalar_t = typename Op::scalar_t;
  constexpr size_t need = 4 * sizeof(scalar_t) < 16 ? 4 * sizeof(scalar_t) : 16;
  for (int q = 0; q < Op::kIn; ++q)
    if (op.in[q] && !aligned(op.in[q], need)) return false;
  for (int q = 0; q < Op::kOut; ++q)
    if (op.out[q] && !aligned(op.out[q], need)) return false;
  return true;
}

// 32-bit index arithmetic (cheaper address maths) unless the tensor is too big for it.
bool use_int32(int64_t numel) { return numel < (int64_t{1} << 31) - (int64_t{1} << 20); }

template <typename Op>
void launch(const Op& op, int64_t N, int64_t M, const Plan& p, cudaStream_t stream) {
  const bool vec = op_aligned(op);
  if (use_int32(N * M)) {
    sample_kernel<Op, int32_t><<<p.grid, p.threads, 0, stream>>>(
        op, static_cast<int32_t>(M), static_cast<int32_t>(p.chunks), static_cast<int32_t>(p.cg), p.items, vec);
  } else {
    sample_kernel<Op, int64_t><<<p.grid, p.threads, 0, stream>>>(op, M, p.chunks, p.cg, p.items, vec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The dispatcher only routes CUDA tensors here; the direct fastdiff._C.*_cuda entry points need the check.
void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda(), "fastdiff: ", name, " must be a CUDA tensor for the CUDA kernels, got ", x.device());
}

template <typename T>
const T* ptr_or_null(const at::Tensor& x) {
  return x.defined() && x.numel() > 0 ? x.data_ptr<T>() : nullptr;
}

}  // namespace

// ------------------------------------------------------------- q_sample ---
static std::tuple<at::Tensor, at::Tensor> q_sample_impl(const at::Tensor& x0_in, const at::Tensor& t,
                                                        const at::Tensor& abar, const at::Tensor* noise_in,
                                                        const at::Tensor* key_in, bool return_noise) {
  check_cuda(x0_in, "x0");
  check_common(x0_in, "x0", t, abar);
  if (noise_in) check_same_like(*noise_in, x0_in, "noise", "x0");
  if (key_in) check_key(*key_in, x0_in);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = canonical(x0_in);
  const at::Tensor noise = noise_in ? match_layout(*noise_in, x0) : at::Tensor();
  const at::Tensor key = key_in ? key_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(x0);
  at::Tensor noise_out = return_noise ? at::empty_like(x0) : at::empty({0}, x0.options());
  const int64_t N = x0.size(0), M = per_sample(x0);
  if (x0.numel() == 0) return {out, noise_out};
  const at::Tensor tc = t.contiguous(), ac = abar.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x0.scalar_type(),
                                  "fastdiff_q_sample_cuda", [&] {
    auto fill = [&](auto& op) {
      op.in[0] = x0.data_ptr<scalar_t>();
      op.in[1] = ptr_or_null<scalar_t>(noise);
      op.out[0] = out.data_ptr<scalar_t>();
      op.out[1] = return_noise ? noise_out.data_ptr<scalar_t>() : nullptr;
      op.key = key.defined() ? key.data_ptr<int64_t>() : nullptr;
      op.t = tc.data_ptr<int64_t>();
      op.abar = ac.data_ptr<double>();
      op.T = ac.size(0);
    };
    if (key_in) {
      QSampleOp<scalar_t, true> op;
      fill(op);
      launch(op, N, M, make_plan(N, M, op.kUnroll), stream);
    } else {
      QSampleOp<scalar_t, false> op;
      fill(op);
      launch(op, N, M, make_plan(N, M, op.kUnroll), stream);
    }
  });
  return {out, noise_out};
}

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,
                         const at::Tensor& noise) {
  return std::get<0>(q_sample_impl(x0, t, abar, &noise, nullptr, false));
}

std::tuple<at::Tensor, at::Tensor> q_sample_rng_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                     const at::Tensor& abar, const at::Tensor& key,
                                                     bool return_noise) {
  return q_sample_impl(x0, t, abar, nullptr, &key, return_noise);
}

// ------------------------------------------------------- diffusion_loss ---
// The loss's inputs as its kernels read them, shared by the forward and the
// backward: x0 canonical, model_output and noise in x0's layout, the small
// tensors contiguous (after check_cuda/check_loss; the device guard is the
// caller's).
namespace {
struct LossArgs {
  at::Tensor x0, out, noise, key, t, abar, weight;
  int64_t N = 0, M = 0;
};

LossArgs loss_args(const at::Tensor& model_output, const at::Tensor& x0_in, const at::Tensor& t,
                   const at::Tensor& abar, const c10::optional<at::Tensor>& noise_in,
                   const c10::optional<at::Tensor>& key_in, const at::Tensor& weight) {
  LossArgs a;
  a.x0 = canonical(x0_in);
  a.out = match_layout(model_output, a.x0);
  a.noise = noise_in ? match_layout(*noise_in, a.x0) : at::Tensor();
  a.key = key_in ? key_in->contiguous() : at::Tensor();
  a.t = t.contiguous();
  a.abar = abar.contiguous();
  a.weight = weight.contiguous();
  a.N = a.x0.size(0);
  a.M = per_sample(a.x0);
  return a;
}

// Points a LossOp at the shared inputs, reading only what the target needs;
// the caller sets its outputs (grad, partial, loss) and grad_loss.
template <typename scalar_t, typename Op>
void fill_loss_inputs(Op& op, const LossArgs& a, int64_t target) {
  op.in[0] = a.out.data_ptr<scalar_t>();
  op.in[1] = target == kEpsilon ? nullptr : a.x0.data_ptr<scalar_t>();
  op.in[2] = target == kSample ? nullptr : ptr_or_null<scalar_t>(a.noise);
  op.key = a.key.defined() ? a.key.data_ptr<int64_t>() : nullptr;
  op.t = a.t.data_ptr<int64_t>();
  op.abar = a.abar.data_ptr<double>();
  op.T = a.abar.size(0);
  op.weight = a.weight.data_ptr<float>();
  op.M = a.M;
  op.target = target;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> diffusion_loss_cuda(const at::Tensor& model_output, const at::Tensor& x0_in,
                                                       const at::Tensor& t, const at::Tensor& abar,
                                                       const c10::optional<at::Tensor>& noise_in,
                                                       const c10::optional<at::Tensor>& key_in,
                                                       const at::Tensor& weight, int64_t target, bool need_grad) {
  check_cuda(x0_in, "x0");
  check_loss(model_output, x0_in, t, abar, noise_in, key_in, weight, target);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const LossArgs a = loss_args(model_output, x0_in, t, abar, noise_in, key_in, weight);
  const int64_t N = a.N, M = a.M;
  // float64 losses for float64 inputs (gradcheck), float32 otherwise
  const bool f64 = a.x0.scalar_type() == at::kDouble;
  const auto loss_opts = a.x0.options().dtype(f64 ? at::kDouble : at::kFloat);
  at::Tensor grad = need_grad ? at::empty_like(a.x0) : at::empty({0}, a.x0.options());
  if (N == 0 || M == 0) return {at::zeros({N}, loss_opts), grad};
  at::Tensor loss = at::empty({N}, loss_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.x0.scalar_type(),
                                  "fastdiff_loss_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Plan plan = make_plan(N, M, LossOp<scalar_t, false>::kUnroll);
    at::Tensor partial;
    if (plan.chunks > 1) partial = at::empty({N, plan.chunks}, loss_opts);
    auto fill = [&](auto& op) {
      fill_loss_inputs<scalar_t>(op, a, target);
      op.out[0] = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
      op.partial = partial.defined() ? partial.data_ptr<acc_t>() : nullptr;
      op.loss = loss.data_ptr<acc_t>();
      op.grad_loss = nullptr;
    };
    if (key_in) {
      LossOp<scalar_t, true> op;
      fill(op);
      launch(op, N, M, plan, stream);
    } else {
      LossOp<scalar_t, false> op;
      fill(op);
      launch(op, N, M, plan, stream);
    }
    if (plan.chunks > 1) {
      const int threads = 128;
      const unsigned blocks = static_cast<unsigned>((N + threads - 1) / threads);
      loss_finalize_kernel<acc_t><<<blocks, threads, 0, stream>>>(partial.data_ptr<acc_t>(),
                                                                  a.weight.data_ptr<float>(),
                                                                  loss.data_ptr<acc_t>(), N, plan.chunks, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, grad};
}

at::Tensor diffusion_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& model_output,
                                        const at::Tensor& x0_in, const at::Tensor& t, const at::Tensor& abar,
                                        const c10::optional<at::Tensor>& noise_in,
                                        const c10::optional<at::Tensor>& key_in, const at::Tensor& weight,
                                        int64_t target) {
  check_cuda(x0_in, "x0");
  check_loss(model_output, x0_in, t, abar, noise_in, key_in, weight, target);
  check_loss_grad(grad_loss, x0_in);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const LossArgs a = loss_args(model_output, x0_in, t, abar, noise_in, key_in, weight);
  const int64_t N = a.N, M = a.M;
  at::Tensor grad = at::empty_like(a.x0);
  if (N == 0 || M == 0) return grad;
  const bool f64 = a.x0.scalar_type() == at::kDouble;
  // the incoming gradient in the accumulation type (a no-op for the float32 loss of float32/16 data)
  const at::Tensor gl = grad_loss.to(f64 ? at::kDouble : at::kFloat).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.x0.scalar_type(),
                                  "fastdiff_loss_bwd_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Plan plan = make_plan(N, M, LossOp<scalar_t, false, true>::kUnroll);
    auto fill = [&](auto& op) {
      fill_loss_inputs<scalar_t>(op, a, target);
      op.out[0] = grad.data_ptr<scalar_t>();
      op.partial = nullptr;
      op.loss = nullptr;
      op.grad_loss = gl.data_ptr<acc_t>();
    };
    if (key_in) {
      LossOp<scalar_t, true, true> op;
      fill(op);
      launch(op, N, M, plan, stream);
    } else {
      LossOp<scalar_t, false, true> op;
      fill(op);
      launch(op, N, M, plan, stream);
    }
  });
  return grad;
}

// --------------------------------------------------------- reverse steps ---
namespace {

template <typename Op>
void fill_step(Op& op, const StepArgs& s, const at::Tensor& ac, at::Tensor& prev, at::Tensor& x0_out) {
  using scalar_t = typename Op::scalar_t;
  op.in[0] = s.out.data_ptr<scalar_t>();
  op.in[1] = s.x.data_ptr<scalar_t>();
  op.out[0] = prev.data_ptr<scalar_t>();
  op.out[1] = x0_out.data_ptr<scalar_t>();
  op.key = s.key.defined() ? s.key.data_ptr<int64_t>() : nullptr;
  op.t = s.t.data_ptr<int64_t>();
  op.t_prev = s.t_prev.data_ptr<int64_t>();
  op.abar = ac.data_ptr<double>();
  op.thresh = s.thresh.defined() ? s.thresh.data_ptr<float>() : nullptr;
  op.T = ac.size(0);
  op.gfac = s.gfac.defined() ? s.gfac.data_ptr<double>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                  const at::Tensor& t, const at::Tensor& t_prev,
                                                  const at::Tensor& abar, const c10::optional<at::Tensor>& model_var,
                                                  const c10::optional<at::Tensor>& noise,
                                                  const c10::optional<at::Tensor>& key,
                                                  const c10::optional<at::Tensor>& thresh, int64_t prediction_type,
                                                  int64_t variance_type, double clip_range,
                                                  const c10::optional<at::Tensor>& uncond_output,
                                                  double guidance_scale,
                                                  const c10::optional<at::Tensor>& guidance_factor) {
  TORCH_CHECK_VALUE(variance_type >= 0 && variance_type <= 5, "fastdiff: variance_type code must be in 0..5, got ",
              variance_type);
  TORCH_CHECK_VALUE(variance_type < kLearned || model_var.has_value(), "fastdiff: learned variance types need model_var");
  check_cuda(sample, "sample");
  const c10::cuda::CUDAGuard guard(sample.device());
  const StepArgs s = prepare_step(model_output, sample, t, t_prev, abar, model_var, noise, key, thresh,
                                  prediction_type, uncond_output, guidance_scale, guidance_factor);
  at::Tensor prev = at::empty_like(s.x), x0_out = at::empty_like(s.x);
  const int64_t N = s.x.size(0), M = per_sample(s.x);
  if (s.x.numel() == 0) return {prev, x0_out};
  const at::Tensor ac = abar.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, s.x.scalar_type(),
                                  "fastdiff_ddpm_step_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto fill = [&](auto& op) {
      fill_step(op, s, ac, prev, x0_out);
      op.in[2] = ptr_or_null<scalar_t>(s.var);
      op.in[3] = ptr_or_null<scalar_t>(s.noise);
      op.in[4] = ptr_or_null<scalar_t>(s.uncond);
      op.gw = static_cast<acc_t>(guidance_scale - 1.0);
      op.pred = prediction_type;
      op.var_type = variance_type;
      op.clip = static_cast<acc_t>(clip_range);
    };
    if (s.key.defined()) {
      DdpmOp<scalar_t, true> op;
      fill(op);
      launch(op, N, M, make_plan(N, M, op.kUnroll), stream);
    } else {
      DdpmOp<scalar_t, false> op;
      fill(op);
      launch(op, N, M, make_plan(N, M, op.kUnroll), stream);
    }
  });
  return {prev, x0_out};
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                  const at::Tensor& t, const at::Tensor& t_prev,
                                                  const at::Tensor& abar, const c10::optional<at::Tensor>& noise,
                                                  const c10::optional<at::Tensor>& key,
                                                  const c10::optional<at::Tensor>& thresh, int64_t prediction_type,
                                                  double clip_range, double eta, double final_alpha_cumprod,
                                                  bool use_clipped_model_output,
                                                  const c10::optional<at::Tensor>& uncond_output,
                                                  double guidance_scale,
                                                  const c10::optional<at::Tensor>& guidance_factor) {
  TORCH_CHECK_VALUE(eta >= 0.0, "fastdiff: eta must be >= 0, got ", eta);
  check_cuda(sample, "sample");
  const c10::cuda::CUDAGuard guard(sample.device());
  const StepArgs s = prepare_step(model_output, sample, t, t_prev, abar, c10::nullopt, noise, key, thresh,
                                  prediction_type, uncond_output, guidance_scale, guidance_factor);
  at::Tensor prev = at::empty_like(s.x), x0_out = at::empty_like(s.x);
  const int64_t N = s.x.size(0), M = per_sample(s.x);
  if (s.x.numel() == 0) return {prev, x0_out};
  const at::Tensor ac = abar.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, s.x.scalar_type(),
                                  "fastdiff_ddim_step_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto fill = [&](auto& op) {
      fill_step(op, s, ac, prev, x0_out);
      op.in[2] = ptr_or_null<scalar_t>(s.noise);
      op.in[3] = ptr_or_null<scalar_t>(s.uncond);
      op.gw = static_cast<acc_t>(guidance_scale - 1.0);
      op.pred = prediction_type;
      op.clip = static_cast<acc_t>(clip_range);
      op.eta = eta;
      op.final_ab = final_alpha_cumprod;
      op.use_clipped = use_clipped_model_output;
    };
    if (s.key.defined()) {
      DdimOp<scalar_t, true> op;
      fill(op);
      launch(op, N, M, make_plan(N, M, op.kUnroll), stream);
    } else {
      DdimOp<scalar_t, false> op;
      fill(op);
      launch(op, N, M, make_plan(N, M, op.kUnroll), stream);
    }
  });
  return {prev, x0_out};
}

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("q_sample_rng", &q_sample_rng_cuda);
  m.impl("diffusion_loss", &diffusion_loss_cuda);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cuda);
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
}

}  // namespace fastdiff
