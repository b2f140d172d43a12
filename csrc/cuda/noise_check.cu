// A test hook, not an operator: Box-Muller's radius over a range of the
// uniform's input word, checked on the GPU against a float64 logarithm.
// tests/test_gpu_check.py sweeps all 2^32 words with it (about a second on an
// H100): no NaN, no positive log, and the radius within float32 rounding.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"

namespace fastdiff {
namespace {

// stats[0]: count of NaN radii or log_unit(u) > 0; stats[1]: max |r - r64| (float bits);
// stats[2]: max |r - r64| / max(1, r64) (float bits). Non-negative floats order like their bits.
__global__ void box_muller_radius_kernel(uint64_t start, uint64_t n, unsigned int* stats) {
  unsigned int bad = 0;
  float worst_abs = 0.0f, worst_rel = 0.0f;
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint32_t w = static_cast<uint32_t>(start + i);
    float z0, z1;
    box_muller(w, 0u, z0, z1);  // angle 0: z0 is the radius itself (cos 0 = 1 exactly)
    const float u = static_cast<float>(w) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
    const double r64 = sqrt(-2.0 * log(static_cast<double>(u)));
    if (!(z0 == z0) || log_unit(u) > 0.0f) ++bad;
    const float err = static_cast<float>(fabs(static_cast<double>(z0) - r64));
    worst_abs = fmaxf(worst_abs, err);
    worst_rel = fmaxf(worst_rel, static_cast<float>(err / fmax(1.0, r64)));
  }
  if (bad) atomicAdd(&stats[0], bad);
  atomicMax(&stats[1], __float_as_uint(worst_abs));
  atomicMax(&stats[2], __float_as_uint(worst_rel));
}

}  // namespace

// (bad count, max abs error, max relative error) over words [start, start + n) on `device`.
std::tuple<int64_t, double, double> box_muller_radius_check_cuda(int64_t start, int64_t n, int64_t device) {
  TORCH_CHECK(start >= 0 && n >= 0 && start + n <= (int64_t{1} << 32), "fastdiff: words must lie in [0, 2^32)");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  at::Tensor stats = at::zeros({3}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
  if (n > 0) {
    box_muller_radius_kernel<<<4096, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<uint64_t>(start), static_cast<uint64_t>(n), reinterpret_cast<unsigned int*>(stats.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor h = stats.cpu();
  const uint32_t* p = reinterpret_cast<const uint32_t*>(h.data_ptr<int>());
  float a, r;
  std::memcpy(&a, &p[1], 4);
  std::memcpy(&r, &p[2], 4);
  return {static_cast<int64_t>(p[0]), a, r};
}

}  // namespace fastdiff
