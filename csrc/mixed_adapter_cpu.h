// CPU implementation of the mixed-adapter op (mixed_adapter_cpu.cpp): row i of x through
// adapter index[i] of stacked weights, -1 for none.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastadapter {

// Returns {y [N, d] in x's dtype, z [N, r] fp32 (fp64 for double x) with its rows grouped
// by adapter: the rows of index -1 first (zeros), then adapter 0's, 1's, ... each in
// their order in x (a stable sort of index)}.
std::vector<at::Tensor> mixed_adapter_forward_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& w_down,
                                                  const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                  const c10::optional<at::Tensor>& b_up,
                                                  const c10::optional<at::Tensor>& residual, int64_t activation,
                                                  double scaling, bool residual_is_x);

// Returns {dx, dw_down [A, r, d], db_down [A, r], dw_up [A, d, r], db_up [A, d]} (zeros for
// an adapter no row uses); an undefined tensor where not needed. z as the forward returns it.
std::vector<at::Tensor> mixed_adapter_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index,
                                                   const at::Tensor& z, const at::Tensor& w_down,
                                                   const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                   const c10::optional<at::Tensor>& b_up, int64_t activation,
                                                   double scaling, bool residual_is_x, std::vector<bool> needs);

}  // namespace fastadapter
