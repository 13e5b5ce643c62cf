// Torch-facing entry points of the CUDA backend (adapter_cuda_binding.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastadapter {

// Returns {y [N, d] in x's dtype, z [N, r] fp32}.
std::vector<at::Tensor> adapter_forward_cuda(const at::Tensor& x, const at::Tensor& w_down,
                                             const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                             const c10::optional<at::Tensor>& b_up,
                                             const c10::optional<at::Tensor>& residual, int64_t activation,
                                             double scaling, bool residual_is_x);

// Returns {dx, dw_down, db_down, dw_up, db_up} (fp32 weight gradients), undefined where not needed.
std::vector<at::Tensor> adapter_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z,
                                              const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                                              const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                                              int64_t activation, double scaling, bool residual_is_x,
                                              std::vector<bool> needs);

}  // namespace fastadapter
