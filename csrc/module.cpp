// The Python module fastdiff._C. Importing it runs the static
// TORCH_LIBRARY_IMPL registrations of the CPU (and CUDA) kernels; the module
// itself exposes build information and, when CUDA was compiled, the CUDA
// entry points directly so benchmarks and tests can pick a backend.
#include <torch/extension.h>

#include "blocks.h"
#include "host.h"
#include "multistep.h"
#include "cpu/isa.h"

#ifdef FASTDIFF_WITH_CUDA
namespace fastdiff {
std::tuple<int64_t, double, double> box_muller_radius_check_cuda(int64_t start, int64_t n, int64_t device);
}
#endif

namespace {

std::vector<std::string> cuda_archs() {
#ifdef FASTDIFF_CUDA_ARCHS
  std::vector<std::string> out;
  std::string s = FASTDIFF_CUDA_ARCHS, cur;
  for (char ch : s) {
    if (ch == ';' || ch == ',' || ch == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += ch;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
#else
  return {};
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff C++/CUDA kernels (operators are registered in the fastdiff torch.library namespace)";
#ifdef FASTDIFF_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("q_sample_cuda", &fastdiff::q_sample_cuda);
  m.def("q_sample_rng_cuda", &fastdiff::q_sample_rng_cuda);
  m.def("diffusion_loss_cuda", &fastdiff::diffusion_loss_cuda);
  m.def("diffusion_loss_backward_cuda", &fastdiff::diffusion_loss_backward_cuda);
  m.def("ddpm_step_cuda", &fastdiff::ddpm_step_cuda);
  m.def("ddim_step_cuda", &fastdiff::ddim_step_cuda);
  m.def("group_norm_act_cuda", &fastdiff::group_norm_act_cuda);
  m.def("group_norm_act_backward_cuda", &fastdiff::group_norm_act_backward_cuda);
  m.def("multistep_step_cuda", &fastdiff::multistep_step_cuda);
  // test hook (tests/test_gpu_check.py): Box-Muller radius over a range of uniform words
  m.def("box_muller_radius_check_cuda", &fastdiff::box_muller_radius_check_cuda);
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = cuda_archs();
  m.attr("built_with_torch") = FASTDIFF_TORCH_VERSION;
  // the CPU kernels' instruction set in this process (cpu/isa.h; FASTDIFF_CPU_ISA=baseline)
  m.def("cpu_isa", [] {
    return std::string(fastdiff::cpu_use_avx2_fma() ? "avx2+fma" : (fastdiff::cpu_use_avx2() ? "avx2" : "baseline"));
  });
}
