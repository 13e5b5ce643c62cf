// CPU implementation of the fused adapter (adapter_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastadapter {

// Same order as fastadapter.activations.ACTIVATIONS.
enum class Activation : int64_t { Relu = 0, Gelu = 1, GeluTanh = 2, Silu = 3, Tanh = 4, Identity = 5 };
inline const char* const kActivationNames[] = {"relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"};

// Returns {y [N, d] in x's dtype, z [N, r] fp32 (fp64 for double x)}.
std::vector<at::Tensor> adapter_forward_cpu(const at::Tensor& x, const at::Tensor& w_down,
                                            const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                            const c10::optional<at::Tensor>& b_up,
                                            const c10::optional<at::Tensor>& residual, int64_t activation,
                                            double scaling, bool residual_is_x);

// The five gradient flags of an adapter backward, in order dx, dW_down, db_down, dW_up,
// db_up (a bias's only where it exists), and whether dz is needed (for dx, dW_down or
// db_down); refuses a list that is not five flags long.
struct BackwardNeeds {
  bool dx, dwd, dbd, dwu, dbu, dz;
};

inline BackwardNeeds backward_needs(const std::vector<bool>& needs, bool has_b_down, bool has_b_up) {
  TORCH_CHECK(needs.size() == 5, "fastadapter cpp: needs must have 5 flags");
  const bool dx = needs[0], dwd = needs[1], dbd = needs[2] && has_b_down;
  return {dx, dwd, dbd, needs[3], needs[4] && has_b_up, dx || dwd || dbd};
}

// Returns {dx, dw_down, db_down, dw_up, db_up}; an undefined tensor where not needed.
// Weight gradients are in the accumulation dtype; the caller casts them.
std::vector<at::Tensor> adapter_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z,
                                             const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                                             const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                                             int64_t activation, double scaling, bool residual_is_x,
                                             std::vector<bool> needs);

// The same from da = dy @ W_up already formed (fp32 [N, r], contiguous; it becomes dz in
// place), for a caller that forms it in a pass of its own (the site op's backward,
// adapter_layernorm_cpu.cpp, forms dy there too). dy and x are fp32.
std::vector<at::Tensor> adapter_backward_from_da_cpu(at::Tensor da, const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& z, const at::Tensor& w_down,
                                                     const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                     const c10::optional<at::Tensor>& b_up, int64_t activation,
                                                     double scaling, bool residual_is_x, std::vector<bool> needs);

// The rest from dz = s * da * act'(z) already formed ([N, r] in the accumulation dtype;
// undefined where no gradient needs it) and a = act(z) (undefined: formed here where
// dW_up is needed): the bias sums, the weight gradients and dx, as needs asks.
std::vector<at::Tensor> adapter_backward_from_dz_cpu(at::Tensor dz, at::Tensor a, const at::Tensor& dy,
                                                     const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
                                                     const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                     const c10::optional<at::Tensor>& b_up, int64_t activation,
                                                     double scaling, bool residual_is_x, std::vector<bool> needs);

// out = s * a^T b ([m, d], a [N, m] and b [N, d] fp32), or its transpose, by the kernel of
// cpu_weight_grad.h: false where it cannot run here (not fp32, neither AVX-512 nor AVX2 on,
// m or d below 8), and out is left alone for the caller's ATen GEMM.
bool weight_grad_out(at::Tensor& out, at::Tensor a, at::Tensor b, double s, bool transposed);

// Operands for the kernels of cpu_residual_gemm.h, shared by the cpp ops: t itself where
// its columns are unit-strided, else a contiguous copy; an optional tensor as contiguous fp32.
inline at::Tensor unit_columns(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

inline c10::optional<at::Tensor> fp32(const c10::optional<at::Tensor>& t) {
  if (!t) return c10::nullopt;
  return t->to(at::kFloat).contiguous();
}

}  // namespace fastadapter
