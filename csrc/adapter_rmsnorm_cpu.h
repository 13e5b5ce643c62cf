// The decoder site on the CPU (adapter_rmsnorm_cpu.cpp): y = h + r + s·f(u) and the RMSNorm
// of y, fp32, with the residual adds and the norm in the epilogue of the AVX2 kernel of
// cpu_residual_gemm.h.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastadapter {

// placement: 0 houlsby (u = h), 1 parallel (u = r), 2 pfeiffer (u = h + r, the sum by ATen
// first). Returns {y, y_normed, z, rstd} (y_normed = w * y * rstd, rstd = 1/sqrt(mean(y^2)
// + eps) per row), or an empty list where it cannot run (not fp32, no AVX2 kernel, r or d
// below 8), and the caller composes the cpp adapter op and ATen ops.
std::vector<at::Tensor> adapter_rmsnorm_forward_cpu(const at::Tensor& h, const at::Tensor& r, const at::Tensor& w_down,
                                                    const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                    const c10::optional<at::Tensor>& b_up,
                                                    const c10::optional<at::Tensor>& norm_weight, int64_t placement,
                                                    double eps, int64_t activation, double scaling);

// The site's backward to the adapter: dv = dy + rstd * (g - y_hat * mean(g * y_hat)), g = dn * w
// and y_hat = y * rstd, formed tile by tile in the prologue of the da = dv W_up product (with
// db_up's per-tile sums), then dz and du = dv + dz W_d chained after it, then the rest of
// the adapter backward with x = u (site_adapter_backward_cpu, adapter_layernorm_cpu.h).
// dy may be empty (y reached the loss only through y_normed). Returns {dv, du, dw_down,
// db_down, dw_up, db_up} (undefined where not needed), or an empty list where it does not
// run (not fp32, no AVX2 kernel, r or d below 8, dn empty, or no gradient that needs da).
std::vector<at::Tensor> adapter_rmsnorm_backward_cpu(const at::Tensor& dy, const at::Tensor& dn, const at::Tensor& u,
                                                     const at::Tensor& y, const at::Tensor& z, const at::Tensor& rstd,
                                                     const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                                                     const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                                                     const c10::optional<at::Tensor>& norm_weight, int64_t activation,
                                                     double scaling, std::vector<bool> needs);

}  // namespace fastadapter
