// The adapter site on the CPU (adapter_layernorm_cpu.cpp): LN(h + r + s·f(u)), fp32, with
// the residual adds and the LayerNorm in the epilogue of the AVX2 kernel of
// cpu_residual_gemm.h.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu_residual_gemm.h"

namespace fastadapter {

// The decoder site (adapter_rmsnorm_cpu.cpp) runs on the same pieces:
// whether the fused site kernels run for h (fp32, the AVX2 kernel, r and d >= 8);
bool site_kernels_run_here(const at::Tensor& h, int64_t r);

// z = down's product, a = act(z) into up's A, then up's product (its epilogue and row
// hooks as the caller set them), tile by tile where the activation rows run, else in three
// passes; down.out is z [n, r] and up.a is a [n, r], both contiguous;
void site_forward_products(ResidualGemm& down, ResidualGemm& up, int64_t activation);

// where db_up is wanted, the zeroed per-tile column sums [tiles, d] that a backward
// prologue adds its rows of dv into (undefined otherwise);
at::Tensor tile_sums_buffer(int64_t n, int64_t d, bool wanted, const at::TensorOptions& options);

// and the adapter backward from dv (fp32 [N, d], contiguous), whose rows `prologue(ctx,
// row0, row1)` forms tile by tile (and adds into col_sums) right before the da = dv W_up
// product reads them: dz and du = (dv) + dz W_d chained after it where du is needed, then
// the rest of the adapter backward with dy = dv and x = u. Returns {dv, du, dw_down,
// db_down, dw_up, db_up} (undefined where not needed). Only where site_kernels_run_here(u,
// r) and some gradient needs dz.
std::vector<at::Tensor> site_adapter_backward_cpu(void (*prologue)(void* ctx, int64_t row0, int64_t row1), void* ctx,
                                                  const at::Tensor& dv, const at::Tensor& col_sums, const at::Tensor& u,
                                                  const at::Tensor& z, const at::Tensor& w_down,
                                                  const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                  const c10::optional<at::Tensor>& b_up, int64_t activation,
                                                  double scaling, bool residual_is_x, std::vector<bool> needs);

// placement: 0 houlsby (u = h), 1 parallel (u = r), 2 pfeiffer (u = LN(h + r), the sum
// and its LayerNorm by ATen first). Returns {out, z, v, mean, rstd, mean_t, rstd_t}, v the
// LayerNorm's input (fp32, kept for the backward), mean / rstd its row statistics, and
// mean_t / rstd_t those of h + r (pfeiffer; empty otherwise); or an empty list where it
// cannot run (not fp32, no AVX2 kernel, r or d below 8), and the caller composes ATen ops.
std::vector<at::Tensor> adapter_layernorm_forward_cpu(const at::Tensor& h, const at::Tensor& r, const at::Tensor& w_down,
                                                      const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                      const c10::optional<at::Tensor>& b_up,
                                                      const c10::optional<at::Tensor>& ln_weight,
                                                      const c10::optional<at::Tensor>& ln_bias, int64_t placement,
                                                      double eps, int64_t activation, double scaling);

// The LayerNorm backward to its input, dv = rstd * (g - mean(g) - x̂ * mean(g * x̂)) with
// g = dout * w and x̂ = (v - mean) * rstd, in one pass over the rows of dout and v (fp32);
// an undefined tensor where the AVX2 kernels do not run here.
at::Tensor layernorm_backward_input_cpu(const at::Tensor& dout, const at::Tensor& v, const at::Tensor& mean,
                                        const at::Tensor& rstd, const c10::optional<at::Tensor>& ln_weight);

// The site's backward where the LayerNorm is frozen, from dout to the adapter's grads:
// dv (as layernorm_backward_input_cpu) formed tile by tile in the prologue of the
// da = dv W_up product, which reads those rows from cache while the next tile's dout and
// v stream in, each tile's column sums of dv too (db_up = s * their sum, in tile order: not
// a pass of its own over dv); where du is needed, dz and du = (dv) + dz W_d in the same
// tiles right after; then the rest of the adapter backward (adapter_cpu.h) with dy = dv
// and x = u.
// Returns {dv, du, dw_down, db_down, dw_up, db_up} (undefined where not needed), or an
// empty list where it does not run (not fp32, no AVX2 kernel, r or d below 8, or no
// gradient that needs da), and the caller forms dv and calls the adapter backward.
std::vector<at::Tensor> adapter_layernorm_backward_cpu(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& z,
                                                       const at::Tensor& v, const at::Tensor& mean,
                                                       const at::Tensor& rstd, const at::Tensor& w_down,
                                                       const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                       const c10::optional<at::Tensor>& b_up,
                                                       const c10::optional<at::Tensor>& ln_weight, int64_t activation,
                                                       double scaling, bool residual_is_x, std::vector<bool> needs);

}  // namespace fastadapter
