// GroupNorm(+add, +scale/shift)+SiLU on CUDA: forward and backward.
//
// Maths: fastdiff/reference/blocks.py. Host contract: ../blocks.h. x is
// (N, C, S) with S = prod(spatial), G groups of D = C/G channels, group
// (n, g) has L = D*S elements, h = x + add[n, c]; statistics and all maths
// in fp32 (fp64 for fp64 x). Per (n, c) the op is one affine map + SiLU:
//     z = (x - m) alpha + beta,  m = mean - add, alpha = rstd w (1 + scale),
//                                beta = b (1 + scale) + shift
// (a "Coef4" {m, alpha, beta}): one subtract and one FMA per element. The
// backward uses the same map (xhat = (x - m) rstd, dz/dxhat = alpha / rstd).
//
// Every reduction has a fixed thread -> element map and a fixed combine
// order: results are bitwise reproducible run to run for the same shape,
// layout and pointer alignment (the vectorised path, taken for 16-byte
// aligned pointers, and the scalar path sum in different orders, so a
// misaligned view of the same values may differ in the last bits:
// tests/test_gpu_check.py::test_cuda_group_norm_alignment), no atomics, and nothing waits on
// the host (CUDA-graph capturable; workspaces come from the caching
// allocator). Statistics: pivot-shifted two-pass over values held in
// registers (exact for inputs offset by 1e3), Chan's parallel combine of
// (count, mean, M2) across threads, blocks and tiles.
//
// Traffic below: b = bytes per element, per group of L elements; the small
// (N, C) / (N, G) vectors and tables are ignored.
//
// FORWARD, NCHW (a group is L contiguous elements)
//   fwd_nchw_onchip  L b <= 64 KB: one block per (n, g), T = 32..1024 threads
//       (a multiple of 32 sized to L: 128x256x8x8 fp32 -> 32 threads, one warp,
//       no __syncthreads) each holding K packs of V elements (16 B accesses)
//       in registers; mean, exact variance, then y.          R L b + W L b.
//   split (larger groups): rows (n, c) cut into P chunks of CS elements
//       fwd_nchw_rowstats  grid N*C*P, Welford partial per chunk   R L b
//       fwd_finalize       warp per (n, g): combines D*P partials, writes
//                          mean, rstd and the per-(n, c) Coef4 table
//       fwd_nchw_rownorm   grid N*C*P, y from x and the table      R L b + W L b
// FORWARD, channels-last (a group is D channels, stride C, at each position)
//   fwd_nhwc_tile  block (C/V <= 512 columns, R rows): a thread owns V adjacent
//       channels of one group (V | D, loads of V channels are coalesced
//       across the row) and K rows per batch. Welford per thread, then rows
//       per column, then columns per group, in shared memory. If a whole
//       sample fits one block (<= 64 KB) the block finishes the statistics and
//       writes y from its registers:                           R L b + W L b.
//       Otherwise it writes (n, g, tile) partials -> fwd_finalize ->
//       fwd_nhwc_norm (channels fixed per thread: table read once).
//                                                              2R L b + W L b.
// BACKWARD: dz = dy silu'(z); per (n, c): A = sum dz, B = sum dz xhat,
// X = sum xhat; per group s1 = sum_c g A / L, s2 = sum_c g B / L with
// g = w (1 + scale); dx = alpha dz - rstd^2 s2 (x - m) - rstd s1;
// dadd = rstd (g A - S s1 - s2 X) (no pass over dx); dscale = w B + b A;
// dshift = A; dweight / dbias = sum_n (1 + scale) B / A.
//   bwd_nchw_onchip  L b <= 32 KB: one block per group (T <= 512) keeps x and
//       dy in registers, per-pack (A, B, X) in shared memory summed per channel
//       by warps, then all grads of the group and dx (dz recomputed: SiLU twice
//       beats holding it in registers).                  R 2 L b + W L b.
//   split: bwd_nchw_rowsums (row-chunk partials) -> bwd_group (block per
//       (n, g): channel sums, s1, s2, grads, dx table) -> bwd_nchw_rowdx.
//                                                       R 4 L b + W L b.
//   NHWC: bwd_nhwc_tile, fused like the forward when a sample fits
//       (R 2 L b + W L b), else partials -> bwd_group -> bwd_nhwc_dx.
//   bwd_reduce_wb: dweight / dbias, sum over n of (N, C) partials.
//
// Predicted (H100, ~3.0 TB/s measured copy): the one-pass paths move the
// minimum, so with >= 4 waves (batch >= 64 on the DDPM CIFAR shapes) they
// should sit at 85-90% of copy bandwidth; the split / tiled paths move 3/2
// (forward) or 5/3 (backward) of the minimum. Eager PyTorch's backward makes
// >= 4 passes (silu', scale, native_group_norm_backward's two), so the fused
// backward should be >= 1.5x it.
//
// Debug knob: FASTDIFF_GN_CUDA_FORCE_SPLIT=1 sends every shape through the
// split / multi-tile paths with the smallest chunks (tests cover them on
// small shapes).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../blocks.h"

// Dynamic shared memory of a kernel (a CPU emulation build predefines it).
#ifndef FD_GN_DYN_SMEM
#define FD_GN_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastdiff {
namespace {

template <typename scalar_t>
using gn_acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

template <int N>
using IntC = std::integral_constant<int, N>;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kTargetBlocks = 1024;     // split paths: ~4 waves of 256-thread blocks on 132 SMs
constexpr size_t kSmemLimit = 48 * 1024;    // dynamic + static shared memory, no opt-in needed
// Block size caps (= launch bounds): 1024 for the one-pass forward kernels
// (64 registers: their data is 16), 512 for everything channels-last that is
// not one-pass and for the backward (128 registers), 256 for row kernels.
constexpr int kFwdThreads = 1024, kBwdThreads = 512, kRowThreads = 256;

// ------------------------------------------------------------- packs -----
// V consecutive elements as one access (V * sizeof <= 16 B: LDG.128 at most).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> ld(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void st(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// Packs per thread: 64 bytes of one tensor (16 fp32 registers), at most 8
// packs (narrow packs: the per-pack bookkeeping would spill).
template <typename scalar_t, int V>
constexpr int kmax() {
  return 64 / (V * static_cast<int>(sizeof(scalar_t))) > 8 ? 8 : 64 / (V * static_cast<int>(sizeof(scalar_t)));
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(const T& v) {
  return static_cast<acc_t>(v);
}

// -------------------------------------------------------------- maths -----
__host__ __device__ __forceinline__ float gn_exp(float v) { return expf(v); }
__host__ __device__ __forceinline__ double gn_exp(double v) { return exp(v); }
__host__ __device__ __forceinline__ float gn_rsqrt(float v) { return 1.0f / sqrtf(v); }
__host__ __device__ __forceinline__ double gn_rsqrt(double v) { return 1.0 / sqrt(v); }

template <typename T>
__host__ __device__ __forceinline__ T gn_sigmoid(T z) {
  return T(1) / (T(1) + gn_exp(-z));
}

// Exact division by a runtime constant d (1 <= d <= 2^31) for n < 2^31 in
// three instructions (mul.hi, add, shift) instead of ~20: with s = ceil(log2 d)
// and m = floor(2^32 (2^s - d) / d) + 1, floor(n / d) = (hi32(n m) + n) >> s.
struct FastDiv {
  uint32_t m = 1, s = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t d) {
    while ((uint64_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(n, m);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
#endif
    return (hi + n) >> s;
  }
};

// (count, mean, M2) and Chan's combine; a zero-count side is the identity.
template <typename T>
struct Welford {
  T n, mean, m2;
};

template <typename T>
__host__ __device__ __forceinline__ Welford<T> wf_combine(const Welford<T>& a, const Welford<T>& b) {
  const T n = a.n + b.n;
  if (n == T(0)) return a;
  const T f = b.n / n;
  const T d = b.mean - a.mean;
  return Welford<T>{n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}

// Lane 0 gets the combine of the warp (tree over shfl_down; other lanes: junk).
template <typename T>
__device__ __forceinline__ Welford<T> wf_warp(Welford<T> w) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Welford<T> b{__shfl_down_sync(kFullMask, w.n, o), __shfl_down_sync(kFullMask, w.mean, o),
                       __shfl_down_sync(kFullMask, w.m2, o)};
    w = wf_combine(w, b);
  }
  return w;
}

// Butterfly: every lane ends with the same bits (each step adds the same two
// values, in either order).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Block sum (blockDim.x a multiple of 32), the same value in every thread.
// `buf` (32 entries) is written once: each call needs its own buffer.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* buf) {
  v = warp_sum(v);
  const int nw = static_cast<int>(blockDim.x) >> 5;
  if (nw == 1) return v;  // one warp: no barrier at all
  if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
  __syncthreads();
  T s = T(0);
  for (int i = 0; i < nw; ++i) s += buf[i];
  return s;
}

// Statistics of h(k, j) for packs k < kv, lanes j < V: two passes over
// registers around a pivot (the first value), so a large common offset
// cancels exactly instead of swamping the sums.
template <typename acc_t, int K, int V, typename H>
__device__ __forceinline__ Welford<acc_t> two_pass(const int kv, const H& h) {
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  if (kv <= 0) return w;
  const acc_t pivot = h(0, 0);
  acc_t s = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k < kv) {
#pragma unroll
      for (int j = 0; j < V; ++j) s += h(k, j) - pivot;
    }
  }
  w.n = static_cast<acc_t>(kv * V);
  w.mean = pivot + s / w.n;
  acc_t q = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k < kv) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t d = h(k, j) - w.mean;
        q += d * d;
      }
    }
  }
  w.m2 = q;
  return w;
}

// ------------------------------------------------- arguments and maps -----
template <typename acc_t>
struct GnVecs {
  const acc_t* w;  // (C,) or nullptr
  const acc_t* b;
  const acc_t* add;  // (N, C) or nullptr
  const acc_t* scale;
  const acc_t* shift;
};

struct GnShape {
  int64_t N, C, S, G, D;
};

template <typename acc_t>
struct alignas(4 * sizeof(acc_t)) Coef4 {
  acc_t m, alpha, beta, pad;
};

template <typename acc_t>
__host__ __device__ __forceinline__ Coef4<acc_t> chan_coef(const GnVecs<acc_t>& v, int64_t C, int64_t n, int64_t c,
                                                          acc_t mean, acc_t rstd) {
  const int64_t nc = n * C + c;
  const acc_t w = v.w ? v.w[c] : acc_t(1);
  const acc_t b = v.b ? v.b[c] : acc_t(0);
  const acc_t sc1 = v.scale ? acc_t(1) + v.scale[nc] : acc_t(1);
  const acc_t sh = v.shift ? v.shift[nc] : acc_t(0);
  Coef4<acc_t> r;
  r.m = v.add ? mean - v.add[nc] : mean;
  r.alpha = rstd * w * sc1;
  r.beta = b * sc1 + sh;
  r.pad = acc_t(0);
  return r;
}

template <typename acc_t>
__host__ __device__ __forceinline__ acc_t gn_fwd_elem(acc_t x, const Coef4<acc_t>& k, bool silu) {
  const acc_t z = (x - k.m) * k.alpha + k.beta;
  return silu ? z * gn_sigmoid(z) : z;
}

// dL/dz from dy, with d = x - m.
template <typename acc_t>
__host__ __device__ __forceinline__ acc_t gn_dz(acc_t d, acc_t dy, const Coef4<acc_t>& k, bool silu) {
  if (!silu) return dy;
  const acc_t z = d * k.alpha + k.beta;
  const acc_t s = gn_sigmoid(z);
  return dy * s * (acc_t(1) + z * (acc_t(1) - s));
}

template <typename scalar_t>
struct FwdArgs {
  using acc_t = gn_acc_t<scalar_t>;
  const scalar_t* x;
  scalar_t* y;
  GnVecs<acc_t> v;
  acc_t* mean;  // (N, G)
  acc_t* rstd;
  GnShape sh;
  acc_t eps;
  bool silu;
};

template <typename acc_t>
struct BwdOut {
  GnVecs<acc_t> v;
  const acc_t* mean;  // (N, G)
  const acc_t* rstd;
  acc_t* dadd;  // (N, C) or nullptr
  acc_t* dscale;
  acc_t* dshift;
  acc_t* pw;  // (N, C) partials of dweight / dbias, or nullptr
  acc_t* pb;
  GnShape sh;
};

template <typename scalar_t>
struct BwdArgs {
  using acc_t = gn_acc_t<scalar_t>;
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* dx;
  BwdOut<acc_t> o;
  bool silu;
};

template <typename acc_t>
struct Sums3 {
  acc_t a, b, x;  // sum dz, sum dz xhat, sum xhat
};

// The per-(n, c) gradients that need no group sums (written when `write`);
// returns g = w (1 + scale) = dz/dxhat.
template <typename acc_t>
__device__ __forceinline__ acc_t bwd_chan(const BwdOut<acc_t>& o, int64_t n, int64_t c, acc_t A, acc_t B,
                                          bool write) {
  const int64_t nc = n * o.sh.C + c;
  const acc_t w = o.v.w ? o.v.w[c] : acc_t(1);
  const acc_t sc1 = o.v.scale ? acc_t(1) + o.v.scale[nc] : acc_t(1);
  if (write) {
    const acc_t b = o.v.b ? o.v.b[c] : acc_t(0);
    if (o.dshift) o.dshift[nc] = A;
    if (o.dscale) o.dscale[nc] = w * B + b * A;
    if (o.pw) o.pw[nc] = sc1 * B;
    if (o.pb) o.pb[nc] = sc1 * A;
  }
  return w * sc1;
}

// The group's backward reductions for a block that owns group (n, g)
// (blockDim.x a multiple of 32). chan_sum(cl) gives this lane's share of the
// (A, B, X) sums of local channel cl; warp w handles channels w, w + nw, ...
// Writes the per-(n, c) grads and returns s1, s2 in every thread.
template <typename acc_t, typename ChanSum>
__device__ __forceinline__ void bwd_group(const BwdOut<acc_t>& o, int64_t n, int64_t g, acc_t rstd,
                                          const ChanSum& chan_sum, acc_t (&red)[2][32], acc_t& s1, acc_t& s2) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = static_cast<int>(blockDim.x) >> 5;
  const int64_t D = o.sh.D;
  acc_t p1 = acc_t(0), p2 = acc_t(0);
  for (int64_t cl = warp; cl < D; cl += nw) {
    const Sums3<acc_t> s = chan_sum(cl);
    const acc_t A = warp_sum(s.a), B = warp_sum(s.b);
    const acc_t gc = bwd_chan(o, n, g * D + cl, A, B, lane == 0);
    p1 += gc * A;
    p2 += gc * B;
  }
  if (lane == 0) {
    red[0][warp] = p1;
    red[1][warp] = p2;
  }
  __syncthreads();
  acc_t t1 = acc_t(0), t2 = acc_t(0);
  for (int i = 0; i < nw; ++i) {
    t1 += red[0][i];
    t2 += red[1][i];
  }
  const acc_t L = static_cast<acc_t>(D * o.sh.S);
  s1 = t1 / L;
  s2 = t2 / L;
  if (o.dadd) {  // rare: recompute the channel sums rather than keep D of them
    for (int64_t cl = warp; cl < D; cl += nw) {
      const Sums3<acc_t> s = chan_sum(cl);
      const acc_t A = warp_sum(s.a), X = warp_sum(s.x);
      const int64_t c = g * D + cl;
      const acc_t gc = bwd_chan(o, n, c, A, acc_t(0), false);
      if (lane == 0)
        o.dadd[n * o.sh.C + c] = rstd * (gc * A - static_cast<acc_t>(o.sh.S) * s1 - s2 * X);
    }
  }
}

// =============================================================== forward ==
// One block per group (n, g); the group (L = D S contiguous elements) lives in
// registers: pack ci = k T + t of thread t, channel = ci / (S / V).
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kFwdThreads) fwd_nchw_onchip(const FwdArgs<scalar_t> a, const FastDiv pack_chan) {
  using acc_t = gn_acc_t<scalar_t>;
  __shared__ acc_t red[2][32];
  const int t = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / a.sh.G, g = ng - n * a.sh.G;
  const int64_t L = a.sh.D * a.sh.S;
  const int npack = static_cast<int>(L / V);
  const int64_t c0 = g * a.sh.D;  // first channel of the group
  const scalar_t* xg = a.x + ng * L;

  Pack<scalar_t, V> buf[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int ci = k * T + t;
    if (ci < npack) buf[k] = ld<scalar_t, V>(xg + static_cast<int64_t>(ci) * V);
  }
  int cl[K];
  acc_t addv[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int ci = k * T + t;
    cl[k] = ci < npack ? static_cast<int>(pack_chan.div(static_cast<uint32_t>(ci))) : 0;
    addv[k] = (a.v.add && ci < npack) ? a.v.add[n * a.sh.C + c0 + cl[k]] : acc_t(0);
  }
  const acc_t pivot = to_acc<acc_t>(xg[0]) + (a.v.add ? a.v.add[n * a.sh.C + c0] : acc_t(0));
  acc_t s = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k * T + t < npack) {
#pragma unroll
      for (int j = 0; j < V; ++j) s += (to_acc<acc_t>(buf[k].v[j]) + addv[k]) - pivot;
    }
  }
  const acc_t mean = pivot + block_sum(s, red[0]) / static_cast<acc_t>(L);
  acc_t q = acc_t(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k * T + t < npack) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t d = (to_acc<acc_t>(buf[k].v[j]) + addv[k]) - mean;
        q += d * d;
      }
    }
  }
  const acc_t rstd = gn_rsqrt(block_sum(q, red[1]) / static_cast<acc_t>(L) + a.eps);
  if (t == 0) {
    a.mean[ng] = mean;
    a.rstd[ng] = rstd;
  }
  scalar_t* yg = a.y + ng * L;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int ci = k * T + t;
    if (ci < npack) {
      const Coef4<acc_t> cf = chan_coef(a.v, a.sh.C, n, c0 + cl[k], mean, rstd);
      Pack<scalar_t, V> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(gn_fwd_elem(to_acc<acc_t>(buf[k].v[j]), cf, a.silu));
      st<scalar_t, V>(yg + static_cast<int64_t>(ci) * V, o);
    }
  }
}

// Split path, pass 1: block `item` = row (n, c) * P + chunk; Welford partial of
// the chunk's CS elements (the last chunk of a row may be shorter).
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kRowThreads)
    fwd_nchw_rowstats(const FwdArgs<scalar_t> a, const int64_t P, const int64_t CS,
                      Welford<gn_acc_t<scalar_t>>* __restrict__ part) {
  using acc_t = gn_acc_t<scalar_t>;
  __shared__ Welford<acc_t> sw[kRowThreads / 32];
  const int t = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int64_t item = blockIdx.x;
  const int64_t row = item / P, s0 = (item - row * P) * CS;
  const int64_t len = std::min<int64_t>(CS, a.sh.S - s0);
  const scalar_t* xr = a.x + row * a.sh.S + s0;
  const acc_t addc = a.v.add ? a.v.add[row] : acc_t(0);  // row = n C + c indexes (N, C)
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t off = 0; off < len; off += static_cast<int64_t>(T) * V * K) {
    Pack<scalar_t, V> buf[K];
    int kv = 0;  // valid packs form a prefix
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = off + (static_cast<int64_t>(k) * T + t) * V;
      if (e < len) {
        buf[k] = ld<scalar_t, V>(xr + e);
        kv = k + 1;
      }
    }
    w = wf_combine(w, two_pass<acc_t, K, V>(kv, [&](int k, int j) { return to_acc<acc_t>(buf[k].v[j]) + addc; }));
  }
  w = wf_warp(w);
  if ((t & 31) == 0) sw[t >> 5] = w;
  __syncthreads();
  if (t == 0) {
    Welford<acc_t> r = sw[0];
    for (int i = 1; i < (T >> 5); ++i) r = wf_combine(r, sw[i]);
    part[item] = r;
  }
}

// Warp per group: combines its Q partials (part[ng Q + q]) in a fixed order,
// writes mean / rstd and the group's D rows of the Coef4 table.
template <typename acc_t>
__global__ void __launch_bounds__(128)
    fwd_finalize(const Welford<acc_t>* __restrict__ part, const int64_t Q, const GnVecs<acc_t> v, const GnShape sh,
                 const acc_t eps, acc_t* __restrict__ mean, acc_t* __restrict__ rstd, Coef4<acc_t>* __restrict__ coef) {
  const int lane = threadIdx.x & 31;
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (ng >= sh.N * sh.G) return;  // whole warps leave; no block barrier below
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t q = lane; q < Q; q += 32) w = wf_combine(w, part[ng * Q + q]);
  w = wf_warp(w);
  const acc_t m = __shfl_sync(kFullMask, w.mean, 0);
  const acc_t m2 = __shfl_sync(kFullMask, w.m2, 0);
  const acc_t r = gn_rsqrt(m2 / static_cast<acc_t>(sh.D * sh.S) + eps);
  if (lane == 0) {
    mean[ng] = m;
    rstd[ng] = r;
  }
  const int64_t n = ng / sh.G, c0 = (ng - n * sh.G) * sh.D;
  for (int64_t cl = lane; cl < sh.D; cl += 32) coef[n * sh.C + c0 + cl] = chan_coef(v, sh.C, n, c0 + cl, m, r);
}

// Split path, pass 2: y of one row chunk from the row's Coef4.
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kRowThreads)
    fwd_nchw_rownorm(const FwdArgs<scalar_t> a, const int64_t P, const int64_t CS,
                     const Coef4<gn_acc_t<scalar_t>>* __restrict__ coef) {
  using acc_t = gn_acc_t<scalar_t>;
  const int t = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int64_t item = blockIdx.x;
  const int64_t row = item / P, s0 = (item - row * P) * CS;
  const int64_t len = std::min<int64_t>(CS, a.sh.S - s0);
  const Coef4<acc_t> cf = coef[row];
  const scalar_t* xr = a.x + row * a.sh.S + s0;
  scalar_t* yr = a.y + row * a.sh.S + s0;
  for (int64_t off = 0; off < len; off += static_cast<int64_t>(T) * V * K) {
    Pack<scalar_t, V> buf[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {  // all loads first: K requests in flight per thread
      const int64_t e = off + (static_cast<int64_t>(k) * T + t) * V;
      if (e < len) buf[k] = ld<scalar_t, V>(xr + e);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = off + (static_cast<int64_t>(k) * T + t) * V;
      if (e < len) {
        Pack<scalar_t, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(gn_fwd_elem(to_acc<acc_t>(buf[k].v[j]), cf, a.silu));
        st<scalar_t, V>(yr + e, o);
      }
    }
  }
}

// Channels-last statistics over a tile of RT rows of one sample: block
// (Cv = C/V, R), thread (cx, ry) owns channels [cx V, cx V + V) (one group,
// V | D) and rows tile*RT + (b K + k) R + ry. Dynamic smem: (T + G) Welford.
// fused (P == 1, nbatch == 1, the block holds the whole sample): finishes the
// statistics and writes y from registers; else writes part[(n G + g) P + tile].
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kFwdThreads)
    fwd_nhwc_tile(const FwdArgs<scalar_t> a, const int64_t P, const int64_t RT, const int nbatch, const bool fused,
                  Welford<gn_acc_t<scalar_t>>* __restrict__ part) {
  using acc_t = gn_acc_t<scalar_t>;
  FD_GN_DYN_SMEM(smem);
  const int Cv = static_cast<int>(blockDim.x), R = static_cast<int>(blockDim.y);
  const int cx = static_cast<int>(threadIdx.x), ry = static_cast<int>(threadIdx.y);
  const int tid = ry * Cv + cx, T = Cv * R;
  Welford<acc_t>* sw = reinterpret_cast<Welford<acc_t>*>(smem);  // [T]
  Welford<acc_t>* gw = sw + T;                                    // [G]
  const int64_t C = a.sh.C, S = a.sh.S;
  const int64_t n = blockIdx.x / P, tile = blockIdx.x - n * P;
  const int64_t c0 = static_cast<int64_t>(cx) * V;
  const int G = static_cast<int>(a.sh.G), dv = static_cast<int>(a.sh.D / V);
  acc_t addv[V];
#pragma unroll
  for (int j = 0; j < V; ++j) addv[j] = a.v.add ? a.v.add[n * C + c0 + j] : acc_t(0);
  const int64_t sb = tile * RT, se = std::min<int64_t>(S, sb + RT);
  const scalar_t* xn = a.x + n * S * C + c0;

  Pack<scalar_t, V> buf[K];
  int kv = 0;
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  for (int b = 0; b < nbatch; ++b) {
    kv = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s = sb + (static_cast<int64_t>(b) * K + k) * R + ry;
      if (s < se) {
        buf[k] = ld<scalar_t, V>(xn + s * C);
        kv = k + 1;
      }
    }
    w = wf_combine(w, two_pass<acc_t, K, V>(kv, [&](int k, int j) { return to_acc<acc_t>(buf[k].v[j]) + addv[j]; }));
  }
  sw[tid] = w;
  __syncthreads();
  if (ry == 0) {  // column cx over the R rows; only this thread touches column cx
    Welford<acc_t> c = sw[cx];
    for (int r = 1; r < R; ++r) c = wf_combine(c, sw[r * Cv + cx]);
    sw[cx] = c;
  }
  __syncthreads();
  if (tid < G) {  // G <= Cv <= T since V | D
    Welford<acc_t> c = sw[tid * dv];
    for (int i = 1; i < dv; ++i) c = wf_combine(c, sw[tid * dv + i]);
    gw[tid] = c;
  }
  __syncthreads();
  if (!fused) {
    if (tid < G) part[(n * G + tid) * P + tile] = gw[tid];
    return;
  }
  const acc_t L = static_cast<acc_t>(a.sh.D * S);
  if (tid < G) {
    a.mean[n * G + tid] = gw[tid].mean;
    a.rstd[n * G + tid] = gn_rsqrt(gw[tid].m2 / L + a.eps);
  }
  const int64_t g = c0 / a.sh.D;
  const acc_t mean = gw[g].mean, rstd = gn_rsqrt(gw[g].m2 / L + a.eps);
  Coef4<acc_t> cf[V];
#pragma unroll
  for (int j = 0; j < V; ++j) cf[j] = chan_coef(a.v, C, n, c0 + j, mean, rstd);
  scalar_t* yn = a.y + n * S * C + c0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k < kv) {
      const int64_t s = sb + static_cast<int64_t>(k) * R + ry;
      Pack<scalar_t, V> o;
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(gn_fwd_elem(to_acc<acc_t>(buf[k].v[j]), cf[j], a.silu));
      st<scalar_t, V>(yn + s * C, o);
    }
  }
}

// Channels-last y from the Coef4 table; same tiling as fwd_nhwc_tile.
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kBwdThreads)
    fwd_nhwc_norm(const FwdArgs<scalar_t> a, const int64_t P, const int64_t RT, const int nbatch,
                  const Coef4<gn_acc_t<scalar_t>>* __restrict__ coef) {
  using acc_t = gn_acc_t<scalar_t>;
  const int R = static_cast<int>(blockDim.y), ry = static_cast<int>(threadIdx.y);
  const int64_t C = a.sh.C, S = a.sh.S;
  const int64_t n = blockIdx.x / P, tile = blockIdx.x - n * P;
  const int64_t c0 = static_cast<int64_t>(threadIdx.x) * V;
  Coef4<acc_t> cf[V];
#pragma unroll
  for (int j = 0; j < V; ++j) cf[j] = coef[n * C + c0 + j];
  const int64_t sb = tile * RT, se = std::min<int64_t>(S, sb + RT);
  const scalar_t* xn = a.x + n * S * C + c0;
  scalar_t* yn = a.y + n * S * C + c0;
  for (int b = 0; b < nbatch; ++b) {
    Pack<scalar_t, V> buf[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s = sb + (static_cast<int64_t>(b) * K + k) * R + ry;
      if (s < se) buf[k] = ld<scalar_t, V>(xn + s * C);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s = sb + (static_cast<int64_t>(b) * K + k) * R + ry;
      if (s < se) {
        Pack<scalar_t, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(gn_fwd_elem(to_acc<acc_t>(buf[k].v[j]), cf[j], a.silu));
        st<scalar_t, V>(yn + s * C, o);
      }
    }
  }
}

// ============================================================== backward ==
// dx of one pack from x, dy and the per-lane Coef4 (cf[j * cstride]):
// dx = alpha dz - a2 (x - m) + a3.
template <typename scalar_t, int V>
__device__ __forceinline__ Pack<scalar_t, V> bwd_dx_pack(const Pack<scalar_t, V>& xb, const Pack<scalar_t, V>& gb,
                                                         const Coef4<gn_acc_t<scalar_t>>* cf, int cstride,
                                                         gn_acc_t<scalar_t> a2, gn_acc_t<scalar_t> a3, bool silu) {
  using acc_t = gn_acc_t<scalar_t>;
  Pack<scalar_t, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const Coef4<acc_t>& k = cf[j * cstride];
    const acc_t d = to_acc<acc_t>(xb.v[j]) - k.m;
    r.v[j] = static_cast<scalar_t>(k.alpha * gn_dz(d, to_acc<acc_t>(gb.v[j]), k, silu) - a2 * d + a3);
  }
  return r;
}

// One block per group, x and dy in registers (pack ci = k T + t). Dynamic
// smem: (A, B, X) of every pack, [L / V][3]; channel cl owns packs
// [cl S/V, (cl + 1) S/V).
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kBwdThreads) bwd_nchw_onchip(const BwdArgs<scalar_t> a, const FastDiv pack_chan) {
  using acc_t = gn_acc_t<scalar_t>;
  __shared__ acc_t red[2][32];
  FD_GN_DYN_SMEM(smem);
  acc_t* ent = reinterpret_cast<acc_t*>(smem);
  const BwdOut<acc_t>& o = a.o;
  const int t = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x), lane = t & 31;
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / o.sh.G, g = ng - n * o.sh.G;
  const int64_t L = o.sh.D * o.sh.S;
  const int npack = static_cast<int>(L / V);
  const int64_t c0 = g * o.sh.D;
  const acc_t mean = o.mean[ng], rstd = o.rstd[ng];

  Pack<scalar_t, V> xb[K], gb[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int ci = k * T + t;
    if (ci < npack) {
      xb[k] = ld<scalar_t, V>(a.x + ng * L + static_cast<int64_t>(ci) * V);
      gb[k] = ld<scalar_t, V>(a.dy + ng * L + static_cast<int64_t>(ci) * V);
    }
  }
  int cl[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int ci = k * T + t;
    cl[k] = 0;
    if (ci < npack) {
      cl[k] = static_cast<int>(pack_chan.div(static_cast<uint32_t>(ci)));
      const Coef4<acc_t> cf = chan_coef(o.v, o.sh.C, n, c0 + cl[k], mean, rstd);
      acc_t sa = acc_t(0), sb = acc_t(0), sx = acc_t(0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t d = to_acc<acc_t>(xb[k].v[j]) - cf.m;
        const acc_t xh = d * rstd;
        const acc_t dz = gn_dz(d, to_acc<acc_t>(gb[k].v[j]), cf, a.silu);
        sa += dz;
        sb += dz * xh;
        sx += xh;
      }
      ent[3 * ci] = sa;
      ent[3 * ci + 1] = sb;
      ent[3 * ci + 2] = sx;
    }
  }
  __syncthreads();
  const int SV = static_cast<int>(o.sh.S / V);
  auto chan_sum = [&](int64_t c) -> Sums3<acc_t> {
    Sums3<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
    const int e = static_cast<int>(c + 1) * SV;
    for (int i = static_cast<int>(c) * SV + lane; i < e; i += 32) {
      s.a += ent[3 * i];
      s.b += ent[3 * i + 1];
      s.x += ent[3 * i + 2];
    }
    return s;
  };
  acc_t s1, s2;
  bwd_group(o, n, g, rstd, chan_sum, red, s1, s2);
  const acc_t a2 = rstd * rstd * s2, a3 = -rstd * s1;
#pragma unroll
  for (int k = 0; k < K; ++k) {  // dz is recomputed (SiLU again): cheaper than keeping it in registers
    const int ci = k * T + t;
    if (ci < npack) {
      const Coef4<acc_t> cf = chan_coef(o.v, o.sh.C, n, c0 + cl[k], mean, rstd);
      st<scalar_t, V>(a.dx + ng * L + static_cast<int64_t>(ci) * V,
                      bwd_dx_pack<scalar_t, V>(xb[k], gb[k], &cf, 0, a2, a3, a.silu));
    }
  }
}

// Split path, pass 1: (A, B, X) of one row chunk -> part[(row P + chunk) 3 + q].
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kRowThreads)
    bwd_nchw_rowsums(const BwdArgs<scalar_t> a, const int64_t P, const int64_t CS, gn_acc_t<scalar_t>* __restrict__ part) {
  using acc_t = gn_acc_t<scalar_t>;
  __shared__ acc_t sm[3][kRowThreads / 32];
  const BwdOut<acc_t>& o = a.o;
  const int t = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int64_t item = blockIdx.x;
  const int64_t row = item / P, s0 = (item - row * P) * CS;
  const int64_t len = std::min<int64_t>(CS, o.sh.S - s0);
  const int64_t n = row / o.sh.C, c = row - n * o.sh.C, ng = n * o.sh.G + c / o.sh.D;
  const acc_t rstd = o.rstd[ng];
  const Coef4<acc_t> cf = chan_coef(o.v, o.sh.C, n, c, o.mean[ng], rstd);
  const scalar_t* xr = a.x + row * o.sh.S + s0;
  const scalar_t* gr = a.dy + row * o.sh.S + s0;
  acc_t sa = acc_t(0), sb = acc_t(0), sx = acc_t(0);
  for (int64_t off = 0; off < len; off += static_cast<int64_t>(T) * V * K) {
    Pack<scalar_t, V> xb[K], gb[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = off + (static_cast<int64_t>(k) * T + t) * V;
      if (e < len) {
        xb[k] = ld<scalar_t, V>(xr + e);
        gb[k] = ld<scalar_t, V>(gr + e);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = off + (static_cast<int64_t>(k) * T + t) * V;
      if (e < len) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t d = to_acc<acc_t>(xb[k].v[j]) - cf.m;
          const acc_t xh = d * rstd;
          const acc_t z = gn_dz(d, to_acc<acc_t>(gb[k].v[j]), cf, a.silu);
          sa += z;
          sb += z * xh;
          sx += xh;
        }
      }
    }
  }
  sa = warp_sum(sa);
  sb = warp_sum(sb);
  sx = warp_sum(sx);
  if ((t & 31) == 0) {
    sm[0][t >> 5] = sa;
    sm[1][t >> 5] = sb;
    sm[2][t >> 5] = sx;
  }
  __syncthreads();
  if (t == 0) {
    acc_t r[3] = {acc_t(0), acc_t(0), acc_t(0)};
    for (int i = 0; i < (T >> 5); ++i)
      for (int q = 0; q < 3; ++q) r[q] += sm[q][i];
    for (int q = 0; q < 3; ++q) part[3 * item + q] = r[q];
  }
}

// Block per group (n, g): channel sums of the P partials per channel
// (part[((n C + c) P + p) 3 + q]), the group's grads, the Coef4 table of its
// channels and the group's dx coefficients gcoef[3 ng] = (rstd, rstd^2 s2, -rstd s1).
template <typename acc_t>
__global__ void __launch_bounds__(128)
    bwd_group_kernel(const BwdOut<acc_t> o, const acc_t* __restrict__ part, const int64_t P,
                     Coef4<acc_t>* __restrict__ coef, acc_t* __restrict__ gcoef) {
  __shared__ acc_t red[2][32];
  const int lane = threadIdx.x & 31;
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / o.sh.G, g = ng - n * o.sh.G, c0 = g * o.sh.D;
  const acc_t mean = o.mean[ng], rstd = o.rstd[ng];
  auto chan_sum = [&](int64_t cl) -> Sums3<acc_t> {
    const acc_t* p = part + (n * o.sh.C + c0 + cl) * P * 3;
    Sums3<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = lane; i < P; i += 32) {
      s.a += p[3 * i];
      s.b += p[3 * i + 1];
      s.x += p[3 * i + 2];
    }
    return s;
  };
  acc_t s1, s2;
  bwd_group(o, n, g, rstd, chan_sum, red, s1, s2);
  for (int64_t cl = threadIdx.x; cl < o.sh.D; cl += blockDim.x)
    coef[n * o.sh.C + c0 + cl] = chan_coef(o.v, o.sh.C, n, c0 + cl, mean, rstd);
  if (threadIdx.x == 0) {
    gcoef[3 * ng] = rstd;
    gcoef[3 * ng + 1] = rstd * rstd * s2;
    gcoef[3 * ng + 2] = -rstd * s1;
  }
}

// Split path, pass 3: dx of one row chunk from the row's Coef4 and its group's gcoef.
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kRowThreads)
    bwd_nchw_rowdx(const BwdArgs<scalar_t> a, const int64_t P, const int64_t CS,
                   const Coef4<gn_acc_t<scalar_t>>* __restrict__ coef, const gn_acc_t<scalar_t>* __restrict__ gcoef) {
  using acc_t = gn_acc_t<scalar_t>;
  const BwdOut<acc_t>& o = a.o;
  const int t = static_cast<int>(threadIdx.x), T = static_cast<int>(blockDim.x);
  const int64_t item = blockIdx.x;
  const int64_t row = item / P, s0 = (item - row * P) * CS;
  const int64_t len = std::min<int64_t>(CS, o.sh.S - s0);
  const int64_t n = row / o.sh.C, c = row - n * o.sh.C, ng = n * o.sh.G + c / o.sh.D;
  const Coef4<acc_t> cf = coef[row];
  const acc_t a2 = gcoef[3 * ng + 1], a3 = gcoef[3 * ng + 2];
  const int64_t base = row * o.sh.S + s0;
  for (int64_t off = 0; off < len; off += static_cast<int64_t>(T) * V * K) {
    Pack<scalar_t, V> xb[K], gb[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = off + (static_cast<int64_t>(k) * T + t) * V;
      if (e < len) {
        xb[k] = ld<scalar_t, V>(a.x + base + e);
        gb[k] = ld<scalar_t, V>(a.dy + base + e);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t e = off + (static_cast<int64_t>(k) * T + t) * V;
      if (e < len) st<scalar_t, V>(a.dx + base + e, bwd_dx_pack<scalar_t, V>(xb[k], gb[k], &cf, 0, a2, a3, a.silu));
    }
  }
}

// Channels-last backward over a tile (same thread map as fwd_nhwc_tile).
// Dynamic smem: [T][3] staging, then when fused [C][3] channel sums and [G][2]
// (s1, s2). fused: the whole sample is in this block (P == 1, nbatch == 1):
// all grads and dx from registers. Else: part[((n C + c) P + tile) 3 + q].
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kBwdThreads)
    bwd_nhwc_tile(const BwdArgs<scalar_t> a, const int64_t P, const int64_t RT, const int nbatch, const bool fused,
                  gn_acc_t<scalar_t>* __restrict__ part) {
  using acc_t = gn_acc_t<scalar_t>;
  FD_GN_DYN_SMEM(smem);
  const BwdOut<acc_t>& o = a.o;
  const int Cv = static_cast<int>(blockDim.x), R = static_cast<int>(blockDim.y);
  const int cx = static_cast<int>(threadIdx.x), ry = static_cast<int>(threadIdx.y);
  const int tid = ry * Cv + cx, T = Cv * R;
  const int64_t C = o.sh.C, S = o.sh.S, D = o.sh.D;
  const int G = static_cast<int>(o.sh.G);
  acc_t* stg = reinterpret_cast<acc_t*>(smem);  // [T][3]
  acc_t* csum = stg + 3 * T;                     // [C][3]  (fused)
  acc_t* gs = csum + 3 * C;                      // [G][2]  (fused)
  const int64_t n = blockIdx.x / P, tile = blockIdx.x - n * P;
  const int64_t c0 = static_cast<int64_t>(cx) * V, g = c0 / D, ng = n * G + g;
  const acc_t rstd = o.rstd[ng];
  Coef4<acc_t> cf[V];
#pragma unroll
  for (int j = 0; j < V; ++j) cf[j] = chan_coef(o.v, C, n, c0 + j, o.mean[ng], rstd);
  const int64_t sb = tile * RT, se = std::min<int64_t>(S, sb + RT);
  const int64_t nbase = n * S * C + c0;

  acc_t sa[V], sbb[V], sx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) sa[j] = sbb[j] = sx[j] = acc_t(0);
  Pack<scalar_t, V> xb[K], gb[K];
  int kv = 0;
  for (int b = 0; b < nbatch; ++b) {
    kv = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s = sb + (static_cast<int64_t>(b) * K + k) * R + ry;
      if (s < se) {
        xb[k] = ld<scalar_t, V>(a.x + nbase + s * C);
        gb[k] = ld<scalar_t, V>(a.dy + nbase + s * C);
        kv = k + 1;
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < kv) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t d = to_acc<acc_t>(xb[k].v[j]) - cf[j].m;
          const acc_t xh = d * rstd;
          const acc_t dz = gn_dz(d, to_acc<acc_t>(gb[k].v[j]), cf[j], a.silu);
          sa[j] += dz;
          sbb[j] += dz * xh;
          sx[j] += xh;
        }
      }
    }
  }
  // column sums over the R rows, one lane j at a time through [T][3]
#pragma unroll
  for (int j = 0; j < V; ++j) {
    stg[3 * tid] = sa[j];
    stg[3 * tid + 1] = sbb[j];
    stg[3 * tid + 2] = sx[j];
    __syncthreads();
    if (ry == 0) {
      acc_t r0 = acc_t(0), r1 = acc_t(0), r2 = acc_t(0);
      for (int r = 0; r < R; ++r) {
        const int i = 3 * (r * Cv + cx);
        r0 += stg[i];
        r1 += stg[i + 1];
        r2 += stg[i + 2];
      }
      const int64_t c = c0 + j;
      acc_t* dst = fused ? csum + 3 * c : part + ((n * C + c) * P + tile) * 3;
      dst[0] = r0;
      dst[1] = r1;
      dst[2] = r2;
    }
    __syncthreads();  // stg is rewritten for the next lane
  }
  if (!fused) return;

  const acc_t L = static_cast<acc_t>(D * S);
  if (tid < G) {  // s1, s2 of group tid, channels in order
    acc_t p1 = acc_t(0), p2 = acc_t(0);
    for (int64_t cl = 0; cl < D; ++cl) {
      const int64_t c = tid * D + cl, nc = n * C + c;
      const acc_t gc = (o.v.w ? o.v.w[c] : acc_t(1)) * (o.v.scale ? acc_t(1) + o.v.scale[nc] : acc_t(1));
      p1 += gc * csum[3 * c];
      p2 += gc * csum[3 * c + 1];
    }
    gs[2 * tid] = p1 / L;
    gs[2 * tid + 1] = p2 / L;
  }
  __syncthreads();
  for (int64_t c = tid; c < C; c += T) {
    const acc_t A = csum[3 * c], B = csum[3 * c + 1];
    const acc_t gc = bwd_chan(o, n, c, A, B, true);
    if (o.dadd) {
      const int64_t gg = c / D;
      o.dadd[n * C + c] = o.rstd[n * G + gg] *
                          (gc * A - static_cast<acc_t>(S) * gs[2 * gg] - gs[2 * gg + 1] * csum[3 * c + 2]);
    }
  }
  const acc_t a2 = rstd * rstd * gs[2 * g + 1], a3 = -rstd * gs[2 * g];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k < kv) {
      const int64_t s = sb + static_cast<int64_t>(k) * R + ry;
      st<scalar_t, V>(a.dx + nbase + s * C, bwd_dx_pack<scalar_t, V>(xb[k], gb[k], cf, 1, a2, a3, a.silu));
    }
  }
}

// Channels-last dx from the Coef4 table and gcoef; same tiling as bwd_nhwc_tile.
template <typename scalar_t, int V, int K>
__global__ void __launch_bounds__(kBwdThreads)
    bwd_nhwc_dx(const BwdArgs<scalar_t> a, const int64_t P, const int64_t RT, const int nbatch,
                const Coef4<gn_acc_t<scalar_t>>* __restrict__ coef, const gn_acc_t<scalar_t>* __restrict__ gcoef) {
  using acc_t = gn_acc_t<scalar_t>;
  const BwdOut<acc_t>& o = a.o;
  const int R = static_cast<int>(blockDim.y), ry = static_cast<int>(threadIdx.y);
  const int64_t C = o.sh.C, S = o.sh.S;
  const int64_t n = blockIdx.x / P, tile = blockIdx.x - n * P;
  const int64_t c0 = static_cast<int64_t>(threadIdx.x) * V, ng = n * o.sh.G + c0 / o.sh.D;
  Coef4<acc_t> cf[V];
#pragma unroll
  for (int j = 0; j < V; ++j) cf[j] = coef[n * C + c0 + j];
  const acc_t a2 = gcoef[3 * ng + 1], a3 = gcoef[3 * ng + 2];
  const int64_t sb = tile * RT, se = std::min<int64_t>(S, sb + RT);
  const int64_t nbase = n * S * C + c0;
  for (int b = 0; b < nbatch; ++b) {
    Pack<scalar_t, V> xb[K], gb[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s = sb + (static_cast<int64_t>(b) * K + k) * R + ry;
      if (s < se) {
        xb[k] = ld<scalar_t, V>(a.x + nbase + s * C);
        gb[k] = ld<scalar_t, V>(a.dy + nbase + s * C);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t s = sb + (static_cast<int64_t>(b) * K + k) * R + ry;
      if (s < se) st<scalar_t, V>(a.dx + nbase + s * C, bwd_dx_pack<scalar_t, V>(xb[k], gb[k], cf, 1, a2, a3, a.silu));
    }
  }
}

// dweight[c] = sum_n pw[n, c], dbias likewise; block (32 channels, 8 slices
// of n), slices combined in order.
template <typename acc_t>
__global__ void __launch_bounds__(256)
    bwd_reduce_wb(const acc_t* __restrict__ pw, const acc_t* __restrict__ pb, acc_t* __restrict__ dw,
                  acc_t* __restrict__ db, const int64_t N, const int64_t C) {
  __shared__ acc_t sw[8][32], sbs[8][32];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  acc_t w = acc_t(0), b = acc_t(0);
  if (c < C) {
    for (int64_t n = ty; n < N; n += 8) {
      if (pw) w += pw[n * C + c];
      if (pb) b += pb[n * C + c];
    }
  }
  sw[ty][tx] = w;
  sbs[ty][tx] = b;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int i = 1; i < 8; ++i) {
      w += sw[i][tx];
      b += sbs[i][tx];
    }
    if (dw) dw[c] = w;
    if (db) db[c] = b;
  }
}

// ================================================================== host ==
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0; }

bool force_split() {
  const char* e = std::getenv("FASTDIFF_GN_CUDA_FORCE_SPLIT");
  return e != nullptr && e[0] == '1';
}

template <typename... KP, typename... A>
void launch(void (*kernel)(KP...), int64_t grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  TORCH_CHECK(grid >= 1 && grid <= std::numeric_limits<int32_t>::max(), "fastdiff: group_norm grid of ", grid,
              " blocks is out of range");
  TORCH_CHECK(smem <= kSmemLimit, "fastdiff: group_norm kernel needs ", smem, " B of shared memory");
  kernel<<<static_cast<unsigned>(grid), block, smem, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The widest V (elements per access) with V | `divides`, V sizeof <= 16 B and
// every pointer aligned to V sizeof.
template <typename scalar_t>
int pick_vec(int64_t divides, std::initializer_list<const void*> ptrs) {
  for (int V = 16 / static_cast<int>(sizeof(scalar_t)); V > 1; V >>= 1) {
    bool ok = divides % V == 0;
    for (const void* p : ptrs) ok = ok && aligned(p, V * static_cast<int64_t>(sizeof(scalar_t)));
    if (ok) return V;
  }
  return 1;
}

// Calls f(IntC<V>()) for a runtime V in {1, 2, 4, 8} (V sizeof <= 16).
template <typename scalar_t, typename F>
void dispatch_vec(int V, F&& f) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(scalar_t));
  if constexpr (kMax >= 8) {
    if (V == 8) return f(IntC<8>());
  }
  if constexpr (kMax >= 4) {
    if (V == 4) return f(IntC<4>());
  }
  if (V == 2) return f(IntC<2>());
  f(IntC<1>());
}

// NCHW kernels are built for the widest V and for V = 1 only (odd S, unaligned views).
template <typename scalar_t, typename F>
void dispatch_vec_nchw(bool wide, F&& f) {
  if (wide)
    f(IntC<16 / static_cast<int>(sizeof(scalar_t))>());
  else
    f(IntC<1>());
}

// On-chip kernels: K in {KM/4, KM/2, KM}.
template <int KM, typename F>
void dispatch_k(int K, F&& f) {
  if (K <= KM / 4)
    f(IntC<KM / 4>());
  else if (K <= KM / 2)
    f(IntC<KM / 2>());
  else
    f(IntC<KM>());
}

// On-chip block: the fewest threads (a multiple of 32, <= max_threads) with
// K <= KM packs each; K rounded up to KM/4, KM/2 or KM.
struct OnchipPlan {
  bool ok;
  int T, K;
};

OnchipPlan onchip_plan(int64_t L, int V, int KM, int max_threads) {
  OnchipPlan p{false, 32, KM};
  if (L > static_cast<int64_t>(max_threads) * KM * V) return p;
  p.T = static_cast<int>(std::max<int64_t>(32, round_up(ceil_div(L, static_cast<int64_t>(KM) * V), 32)));
  const int64_t need = ceil_div(L, static_cast<int64_t>(p.T) * V);
  p.K = need <= KM / 4 ? KM / 4 : (need <= KM / 2 ? KM / 2 : KM);
  p.ok = true;
  return p;
}

// Split NCHW: rows of S elements in P chunks of CS = nbatch * T V K elements.
struct RowPlan {
  int T;
  int64_t P, CS;
};

RowPlan row_plan(int64_t rows, int64_t S, int V, int K, bool split_debug) {
  RowPlan p;
  p.T = split_debug ? 32
                    : static_cast<int>(std::min<int64_t>(kRowThreads, round_up(ceil_div(S, static_cast<int64_t>(V) * K), 32)));
  const int64_t batch = static_cast<int64_t>(p.T) * V * K;
  const int64_t nb = ceil_div(S, batch);
  int64_t P = split_debug ? nb : std::min<int64_t>(nb, std::max<int64_t>(1, ceil_div(kTargetBlocks, rows)));
  const int64_t nbatch = ceil_div(nb, P);
  p.P = ceil_div(nb, nbatch);
  p.CS = nbatch * batch;
  return p;
}

// Channels-last tiles: block (Cv, R), K rows per thread per batch, tiles of
// RT = nbatch R K rows, P tiles per sample.
struct TilePlan {
  bool fused;
  int R, nbatch;
  int64_t P, RT;
};

TilePlan tile_plan(int64_t N, int64_t S, int Cv, int K, int max_threads, bool split_debug) {
  TilePlan p;
  const int64_t Rf = ceil_div(S, K);  // rows per sweep that hold the whole sample
  if (!split_debug && Cv * Rf <= max_threads) {
    p.fused = true;
    p.R = static_cast<int>(Rf);
    p.nbatch = 1;
    p.P = 1;
    p.RT = S;
    return p;
  }
  p.fused = false;
  p.R = split_debug ? 1 : std::max(1, 256 / Cv);
  const int64_t rb = static_cast<int64_t>(p.R) * K;
  const int64_t nb = ceil_div(S, rb);
  const int64_t P = split_debug ? nb : std::min<int64_t>(nb, std::max<int64_t>(1, ceil_div(kTargetBlocks, N)));
  p.nbatch = static_cast<int>(ceil_div(nb, P));
  p.P = ceil_div(nb, p.nbatch);
  p.RT = p.nbatch * rb;
  return p;
}

void gn_check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "fastdiff: x must be a CUDA tensor for the CUDA kernels, got ", x.device());
}

template <typename acc_t>
GnVecs<acc_t> vecs_of(const GnArgs& a) {
  return GnVecs<acc_t>{ptr_or_null<acc_t>(a.w), ptr_or_null<acc_t>(a.b), ptr_or_null<acc_t>(a.add),
                       ptr_or_null<acc_t>(a.scale), ptr_or_null<acc_t>(a.shift)};
}

GnArgs as_nchw(const GnArgs& a) {
  GnArgs b = a;
  b.x = a.x.contiguous();
  b.channels_last = false;
  return b;
}

// ------------------------------------------------------------- forward ---
template <typename scalar_t>
void forward_impl(const GnArgs& ga, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, double eps, bool silu) {
  using acc_t = gn_acc_t<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool dbg = force_split();
  const int64_t N = ga.N, C = ga.C, S = ga.S, G = ga.G, D = ga.D;
  const auto sopt = ga.x.options().dtype(gn_stat_type(ga.x));

  FwdArgs<scalar_t> a;
  a.x = ga.x.data_ptr<scalar_t>();
  a.y = y.data_ptr<scalar_t>();
  a.v = vecs_of<acc_t>(ga);
  a.mean = mean.data_ptr<acc_t>();
  a.rstd = rstd.data_ptr<acc_t>();
  a.sh = GnShape{N, C, S, G, D};
  a.eps = static_cast<acc_t>(eps);
  a.silu = silu;

  auto finalize = [&](const at::Tensor& part, int64_t Q, at::Tensor& coef) {
    launch(fwd_finalize<acc_t>, ceil_div(N * G, 4), dim3(128), 0, stream,
           reinterpret_cast<const Welford<acc_t>*>(part.data_ptr<acc_t>()), Q, a.v, a.sh, a.eps, a.mean, a.rstd,
           reinterpret_cast<Coef4<acc_t>*>(coef.data_ptr<acc_t>()));
  };

  if (!ga.channels_last) {
    constexpr int Vw = 16 / static_cast<int>(sizeof(scalar_t));
    const bool wide = S % Vw == 0 && aligned(a.x, 16) && aligned(a.y, 16);
    dispatch_vec_nchw<scalar_t>(wide, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      constexpr int KM = kmax<scalar_t, V>();
      const OnchipPlan op = onchip_plan(D * S, V, KM, kFwdThreads);
      if (op.ok && !dbg) {
        dispatch_k<KM>(op.K, [&](auto kc) {
          constexpr int K = decltype(kc)::value;
          launch(fwd_nchw_onchip<scalar_t, V, K>, N * G, dim3(op.T), 0, stream, a,
                 FastDiv(static_cast<uint32_t>(S / V)));
        });
        return;
      }
      const RowPlan rp = row_plan(N * C, S, V, KM, dbg);
      at::Tensor part = at::empty({N * C * rp.P * 3}, sopt);
      at::Tensor coef = at::empty({N * C * 4}, sopt);
      launch(fwd_nchw_rowstats<scalar_t, V, KM>, N * C * rp.P, dim3(rp.T), 0, stream, a, rp.P, rp.CS,
             reinterpret_cast<Welford<acc_t>*>(part.data_ptr<acc_t>()));
      finalize(part, D * rp.P, coef);
      launch(fwd_nchw_rownorm<scalar_t, V, KM>, N * C * rp.P, dim3(rp.T), 0, stream, a, rp.P, rp.CS,
             reinterpret_cast<const Coef4<acc_t>*>(coef.data_ptr<acc_t>()));
    });
    return;
  }

  const int V = pick_vec<scalar_t>(D, {a.x, a.y});
  const int64_t Cv = C / V;
  if (Cv > kBwdThreads) {  // very wide rows (fwd_nhwc_norm takes <= 512 threads): compute in NCHW, copy back
    const GnArgs b = as_nchw(ga);
    at::Tensor yc = at::empty_like(b.x);
    forward_impl<scalar_t>(b, yc, mean, rstd, eps, silu);
    y.copy_(yc);
    return;
  }
  dispatch_vec<scalar_t>(V, [&](auto vc) {
    constexpr int Vc = decltype(vc)::value;
    constexpr int K = kmax<scalar_t, Vc>();
    const TilePlan tp = tile_plan(N, S, static_cast<int>(Cv), K, kFwdThreads, dbg);
    const int64_t T = Cv * tp.R;
    const size_t smem = static_cast<size_t>(T + G) * sizeof(Welford<acc_t>);
    at::Tensor part = tp.fused ? at::Tensor() : at::empty({N * G * tp.P * 3}, sopt);
    launch(fwd_nhwc_tile<scalar_t, Vc, K>, N * tp.P, dim3(static_cast<unsigned>(Cv), tp.R), smem, stream, a, tp.P,
           tp.RT, tp.nbatch, tp.fused,
           tp.fused ? static_cast<Welford<acc_t>*>(nullptr) : reinterpret_cast<Welford<acc_t>*>(part.data_ptr<acc_t>()));
    if (tp.fused) return;
    at::Tensor coef = at::empty({N * C * 4}, sopt);
    finalize(part, tp.P, coef);
    launch(fwd_nhwc_norm<scalar_t, Vc, K>, N * tp.P, dim3(static_cast<unsigned>(Cv), tp.R), 0, stream, a, tp.P,
           tp.RT, tp.nbatch, reinterpret_cast<const Coef4<acc_t>*>(coef.data_ptr<acc_t>()));
  });
}

// ------------------------------------------------------------ backward ---
template <typename scalar_t>
void backward_impl(const GnArgs& ga, const at::Tensor& dy, at::Tensor& dx, const at::Tensor& mean,
                   const at::Tensor& rstd, const at::Tensor& dadd, const at::Tensor& dscale, const at::Tensor& dshift,
                   const at::Tensor& pw, const at::Tensor& pb, bool silu) {
  using acc_t = gn_acc_t<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool dbg = force_split();
  const int64_t N = ga.N, C = ga.C, S = ga.S, G = ga.G, D = ga.D;
  const auto sopt = ga.x.options().dtype(gn_stat_type(ga.x));

  BwdArgs<scalar_t> a;
  a.x = ga.x.data_ptr<scalar_t>();
  a.dy = dy.data_ptr<scalar_t>();
  a.dx = dx.data_ptr<scalar_t>();
  a.o.v = vecs_of<acc_t>(ga);
  a.o.mean = mean.data_ptr<acc_t>();
  a.o.rstd = rstd.data_ptr<acc_t>();
  a.o.dadd = ptr_or_null<acc_t>(dadd);
  a.o.dscale = ptr_or_null<acc_t>(dscale);
  a.o.dshift = ptr_or_null<acc_t>(dshift);
  a.o.pw = ptr_or_null<acc_t>(pw);
  a.o.pb = ptr_or_null<acc_t>(pb);
  a.o.sh = GnShape{N, C, S, G, D};
  a.silu = silu;

  // partials (N C P 3) -> group kernel: grads + dx tables
  auto group = [&](const at::Tensor& part, int64_t P, at::Tensor& coef, at::Tensor& gcoef) {
    launch(bwd_group_kernel<acc_t>, N * G, dim3(128), 0, stream, a.o, part.data_ptr<acc_t>(), P,
           reinterpret_cast<Coef4<acc_t>*>(coef.data_ptr<acc_t>()), gcoef.data_ptr<acc_t>());
  };

  if (!ga.channels_last) {
    constexpr int Vw = 16 / static_cast<int>(sizeof(scalar_t));
    const bool wide = S % Vw == 0 && aligned(a.x, 16) && aligned(a.dy, 16) && aligned(a.dx, 16);
    dispatch_vec_nchw<scalar_t>(wide, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      constexpr int KM = kmax<scalar_t, V>();
      const OnchipPlan op = onchip_plan(D * S, V, KM, kBwdThreads);
      const size_t smem = static_cast<size_t>(D * S / V) * 3 * sizeof(acc_t);
      if (op.ok && !dbg && smem + 64 * sizeof(acc_t) <= kSmemLimit) {
        dispatch_k<KM>(op.K, [&](auto kc) {
          constexpr int K = decltype(kc)::value;
          launch(bwd_nchw_onchip<scalar_t, V, K>, N * G, dim3(op.T), smem, stream, a,
                 FastDiv(static_cast<uint32_t>(S / V)));
        });
        return;
      }
      const RowPlan rp = row_plan(N * C, S, V, KM, dbg);
      at::Tensor part = at::empty({N * C * rp.P * 3}, sopt);
      at::Tensor coef = at::empty({N * C * 4}, sopt);
      at::Tensor gcoef = at::empty({N * G * 3}, sopt);
      launch(bwd_nchw_rowsums<scalar_t, V, KM>, N * C * rp.P, dim3(rp.T), 0, stream, a, rp.P, rp.CS,
             part.data_ptr<acc_t>());
      group(part, rp.P, coef, gcoef);
      launch(bwd_nchw_rowdx<scalar_t, V, KM>, N * C * rp.P, dim3(rp.T), 0, stream, a, rp.P, rp.CS,
             reinterpret_cast<const Coef4<acc_t>*>(coef.data_ptr<acc_t>()), gcoef.data_ptr<acc_t>());
    });
    return;
  }

  const int V = pick_vec<scalar_t>(D, {a.x, a.dy, a.dx});
  const int64_t Cv = C / V;
  bool nhwc_ok = Cv <= kBwdThreads;
  dispatch_vec<scalar_t>(V, [&](auto vc) {
    constexpr int Vc = decltype(vc)::value;
    constexpr int K = kmax<scalar_t, Vc>();
    if (!nhwc_ok) return;
    TilePlan tp = tile_plan(N, S, static_cast<int>(Cv), K, kBwdThreads, dbg);
    if (tp.fused && static_cast<size_t>(3 * Cv * tp.R + 3 * C + 2 * G) * sizeof(acc_t) > kSmemLimit)
      tp = tile_plan(N, S, static_cast<int>(Cv), K, 0, dbg);  // channel sums do not fit: tiles
    const int64_t T = Cv * tp.R;
    const size_t smem = static_cast<size_t>(3 * T + (tp.fused ? 3 * C + 2 * G : 0)) * sizeof(acc_t);
    if (smem > kSmemLimit) {
      nhwc_ok = false;
      return;
    }
    at::Tensor part = tp.fused ? at::Tensor() : at::empty({N * C * tp.P * 3}, sopt);
    launch(bwd_nhwc_tile<scalar_t, Vc, K>, N * tp.P, dim3(static_cast<unsigned>(Cv), tp.R), smem, stream, a, tp.P,
           tp.RT, tp.nbatch, tp.fused, tp.fused ? static_cast<acc_t*>(nullptr) : part.data_ptr<acc_t>());
    if (tp.fused) return;
    at::Tensor coef = at::empty({N * C * 4}, sopt);
    at::Tensor gcoef = at::empty({N * G * 3}, sopt);
    group(part, tp.P, coef, gcoef);
    launch(bwd_nhwc_dx<scalar_t, Vc, K>, N * tp.P, dim3(static_cast<unsigned>(Cv), tp.R), 0, stream, a, tp.P,
           tp.RT, tp.nbatch, reinterpret_cast<const Coef4<acc_t>*>(coef.data_ptr<acc_t>()), gcoef.data_ptr<acc_t>());
  });
  if (!nhwc_ok) {  // very wide rows: compute in NCHW, copy dx back
    const GnArgs b = as_nchw(ga);
    at::Tensor dxc = at::empty_like(b.x);
    backward_impl<scalar_t>(b, dy.contiguous(), dxc, mean, rstd, dadd, dscale, dshift, pw, pb, silu);
    dx.copy_(dxc);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& add, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu) {
  gn_check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const GnArgs a = prepare_gn(x, weight, bias, add, scale, shift, groups);
  at::Tensor y = gn_empty_like(a.x);
  const auto sopt = a.x.options().dtype(gn_stat_type(a.x));
  at::Tensor mean = at::empty({a.N, a.G}, sopt);
  at::Tensor rstd = at::empty({a.N, a.G}, sopt);
  if (a.N == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.x.scalar_type(),
                                  "fastdiff_group_norm_act_cuda",
                                  [&] { forward_impl<scalar_t>(a, y, mean, rstd, eps, silu); });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t groups, bool silu) {
  gn_check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const GnArgs a = prepare_gn(x, weight, bias, add, scale, shift, groups);
  const at::Tensor dy = gn_prepare_backward(a, grad_y, mean, rstd);
  const auto sopt = a.x.options().dtype(gn_stat_type(a.x));
  at::Tensor dx = gn_empty_like(a.x);
  at::Tensor dweight = a.w.defined() ? at::empty({a.C}, sopt) : gn_no_grad(a.x);
  at::Tensor dbias = a.b.defined() ? at::empty({a.C}, sopt) : gn_no_grad(a.x);
  at::Tensor dadd = a.add.defined() ? at::empty({a.N, a.C}, sopt) : gn_no_grad(a.x);
  at::Tensor dscale = a.scale.defined() ? at::empty({a.N, a.C}, sopt) : gn_no_grad(a.x);
  at::Tensor dshift = a.shift.defined() ? at::empty({a.N, a.C}, sopt) : gn_no_grad(a.x);
  if (a.N == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias, dadd, dscale, dshift};
  }
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor pw = a.w.defined() ? at::empty({a.N, a.C}, sopt) : at::Tensor();
  at::Tensor pb = a.b.defined() ? at::empty({a.N, a.C}, sopt) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.x.scalar_type(),
                                  "fastdiff_group_norm_act_backward_cuda", [&] {
    using acc_t = gn_acc_t<scalar_t>;
    backward_impl<scalar_t>(a, dy, dx, mc, rc, a.add.defined() ? dadd : at::Tensor(),
                            a.scale.defined() ? dscale : at::Tensor(), a.shift.defined() ? dshift : at::Tensor(), pw,
                            pb, silu);
    if (pw.defined() || pb.defined()) {
      launch(bwd_reduce_wb<acc_t>, ceil_div(a.C, 32), dim3(32, 8), 0, c10::cuda::getCurrentCUDAStream(),
             ptr_or_null<acc_t>(pw), ptr_or_null<acc_t>(pb), pw.defined() ? dweight.data_ptr<acc_t>() : nullptr,
             pb.defined() ? dbias.data_ptr<acc_t>() : nullptr, a.N, a.C);
    }
  });
  return {dx, dweight, dbias, dadd, dscale, dshift};
}

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("group_norm_act", &group_norm_act_cuda);
  m.impl("group_norm_act_backward", &group_norm_act_backward_cuda);
}

}  // namespace fastdiff
