// Python binding of the extension. The operator itself (schema, fake kernel, autograd)
// is registered once in Python (fastadapter/ops/adapter.py); these functions are the
// implementations it dispatches to for backend="cpp" (and "cuda" when built with CUDA).
#include <torch/extension.h>

#include "adapter_cpu.h"
#include "adapter_layernorm_cpu.h"
#include "adapter_rmsnorm_cpu.h"
#include "cpu_activation.h"
#include "cpu_residual_gemm.h"
#include "mixed_adapter_cpu.h"

#ifdef FASTADAPTER_WITH_CUDA
#include "adapter_cuda_binding.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastadapter C++/CUDA extension";
  m.def("adapter_forward_cpu", &fastadapter::adapter_forward_cpu);
  m.def("adapter_backward_cpu", &fastadapter::adapter_backward_cpu);
  m.def("adapter_layernorm_forward_cpu", &fastadapter::adapter_layernorm_forward_cpu);
  m.def("layernorm_backward_input_cpu", &fastadapter::layernorm_backward_input_cpu);
  m.def("adapter_layernorm_backward_cpu", &fastadapter::adapter_layernorm_backward_cpu);
  m.def("adapter_rmsnorm_forward_cpu", &fastadapter::adapter_rmsnorm_forward_cpu);
  m.def("adapter_rmsnorm_backward_cpu", &fastadapter::adapter_rmsnorm_backward_cpu);
  m.def("mixed_adapter_forward_cpu", &fastadapter::mixed_adapter_forward_cpu);
  m.def("mixed_adapter_backward_cpu", &fastadapter::mixed_adapter_backward_cpu);
  m.def("avx512_kernels", []() {
    return std::vector<bool>{fastadapter::avx512_kernels_available(), fastadapter::activation_avx512_available()};
  }, "whether the cpp backend runs [the one-pass up-projection, the activation passes] with AVX-512 here");
  m.def("set_avx512_kernels_enabled", &fastadapter::set_avx512_kernels_enabled,
        "turn the cpp backend's AVX-512 kernels on or off (off: the AVX2 kernel where on, else ATen ops); returns the "
        "previous setting");
  m.def("avx2_kernels", []() {
    return std::vector<bool>{fastadapter::avx2_kernels_available(), fastadapter::activation_avx2_available()};
  }, "whether the cpp backend runs [its products, the activation passes] with AVX2 here (where AVX-512 is off or "
     "absent; the products with row maps always)");
  m.def("set_avx2_kernels_enabled", &fastadapter::set_avx2_kernels_enabled,
        "turn the cpp backend's AVX2 kernel on or off; returns the previous setting");
  m.def("weight_grad_cpu", [](const at::Tensor& a, const at::Tensor& b, double s, bool transposed) -> c10::optional<at::Tensor> {
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "weight_grad_cpu: a [N, m] and b [N, d]");
    TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "weight_grad_cpu: fp32 operands");
    at::Tensor out;
    if (!fastadapter::weight_grad_out(out, a, b, s, transposed)) return c10::nullopt;
    return out;
  }, "s * a^T b (or its transpose) by the weight-gradient kernel (AVX-512 or AVX2); None where it does not run (a kernel test hook)");
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
