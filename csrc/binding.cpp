// Python binding of the extension. The operator itself (schema, fake kernel, autograd)
// is registered once in Python (fastadapter/ops/adapter.py); these functions are the
// implementations it dispatches to for backend="cpp" (and "cuda" when built with CUDA).
#include <torch/extension.h>

#include "adapter_cpu.h"
#include "cpu_residual_gemm.h"

#ifdef FASTADAPTER_WITH_CUDA
#include "adapter_cuda_binding.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastadapter C++/CUDA extension";
  m.def("adapter_forward_cpu", &fastadapter::adapter_forward_cpu);
  m.def("adapter_backward_cpu", &fastadapter::adapter_backward_cpu);
  m.def("residual_gemm_available", &fastadapter::residual_gemm_available,
        "whether the cpp backend runs its up-projections with the AVX-512 one-pass kernel");
  m.def("set_residual_gemm_enabled", &fastadapter::set_residual_gemm_enabled,
        "turn the AVX-512 one-pass kernel on or off (off: ATen GEMMs); returns the previous setting");
  m.def("activation_names", []() {
    std::vector<std::string> names(std::begin(fastadapter::kActivationNames), std::end(fastadapter::kActivationNames));
    return names;
  });
#ifdef FASTADAPTER_WITH_CUDA
  m.def("adapter_forward_cuda", &fastadapter::adapter_forward_cuda);
  m.def("adapter_backward_cuda", &fastadapter::adapter_backward_cuda);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
