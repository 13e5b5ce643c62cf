// Fused adapter on the CPU.
//
// On CPUs the adapter's GEMMs are compute-bound (about r FLOP per byte is above a CPU's
// ridge point), so fusion saves element-wise passes, allocations and saved tensors, and
// the rest is GEMM speed. On CPUs with AVX-512 or AVX2 the four products with an N x r
// or N x d output run in the register-tiled kernels of cpu_residual_gemm.h with their
// epilogues (MKL is slow at N x 64 outputs), the N x r element-wise work in the passes
// of cpu_activation.h, and the two weight-gradient reductions over N in the kernel of
// cpu_weight_grad.h:
//   forward:  z = x W_d^T + b_d; a = act(z);
//             y = R + s * (a W_u^T + b_u) in one pass over y.
//   backward: da = dy W_u; one pass for a and dz = s * da * act'(z);
//             db_d = sum(dz); dW_u = s * dy^T a; db_u = s * sum(dy); dW_d = dz^T x
//             (the bias sums by ATen, as the reference backend forms them; the weight
//             gradients by the kernel of cpu_weight_grad.h, else MKL);
//             dx = dy + dz W_d in one pass over dx.
// Elsewhere (neither kernel, float64) the same steps run as ATen ops, y and dx formed by
// writing R (or dy) first and letting the GEMM accumulate into it.
// For fp32 x nothing of size N x d is written besides y (forward) and dx (backward);
// half-precision x is widened to fp32 first.
//
// Numerics follow the reference backend: GEMM operands are rounded to x's dtype and
// multiplied in fp32 (fp64 for double x); z stays fp32; `a` is rounded to x's dtype
// before the up-projection; y = R + s * (a @ W_up.T + b_up) is rounded once.

#include "adapter_cpu.h"

#include <ATen/ATen.h>

#include "cpu_activation.h"
#include "cpu_residual_gemm.h"
#include "cpu_weight_grad.h"

#include <vector>

namespace fastadapter {
namespace {

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// t rounded to x's dtype, then widened to the accumulation dtype.
at::Tensor operand(const at::Tensor& t, at::ScalarType dtype, at::ScalarType acc) {
  return t.to(dtype).to(acc);
}

void round_to(at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() != dtype) t.copy_(t.to(dtype));
}

// out = res + s * (a @ b + c) by the one-pass kernel of cpu_residual_gemm.h, where b is a
// [k, d] view with any strides; res and c may be undefined. False when it cannot run here
// (neither AVX-512 nor AVX2, float64, a with strided columns), and the caller takes the
// ATen path.
bool residual_gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::Tensor res,
                       double s) {
  if (out.scalar_type() != at::kFloat || a.stride(1) != 1 || !residual_gemm_available(false)) return false;
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && (!c.defined() || c.is_contiguous()));
  if (res.defined() && res.stride(1) != 1) res = res.contiguous();
  ResidualGemm g{out.size(0), out.size(1), a.size(1),
                 a.data_ptr<float>(), a.stride(0),
                 b.data_ptr<float>(), b.stride(0), b.stride(1),
                 res.defined() ? res.data_ptr<float>() : nullptr, res.defined() ? res.stride(0) : 0,
                 c.defined() ? c.data_ptr<float>() : nullptr, static_cast<float>(s),
                 out.data_ptr<float>(), out.stride(0)};
  return residual_gemm(g);
}

}  // namespace

bool weight_grad_out(at::Tensor& out, at::Tensor a, at::Tensor b, double s, bool transposed) {
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat) return false;
  const int64_t n = a.size(0), m = a.size(1), d = b.size(1);
  if (a.stride(1) != 1) a = a.contiguous();
  if (b.stride(1) != 1) b = b.contiguous();
  at::Tensor o = at::empty(transposed ? at::IntArrayRef{d, m} : at::IntArrayRef{m, d}, a.options());
  WeightGrad g{n, m, d, a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), b.stride(0), static_cast<float>(s),
               o.data_ptr<float>(), transposed};
  if (!weight_grad(g)) return false;
  out = o;
  return true;
}

std::vector<at::Tensor> adapter_forward_cpu(const at::Tensor& x, const at::Tensor& w_down,
                                            const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                            const c10::optional<at::Tensor>& b_up,
                                            const c10::optional<at::Tensor>& residual, int64_t activation,
                                            double scaling, bool residual_is_x) {
  TORCH_CHECK(x.dim() == 2, "fastadapter cpp: x must be 2-D [N, d]");
  TORCH_CHECK(x.device().is_cpu(), "fastadapter cpp: x must be a CPU tensor");
  const int64_t n = x.size(0), d = x.size(1), r = w_down.size(0);
  const auto dt = x.scalar_type();
  const auto acc = acc_type(dt);
  const bool widen = dt != acc;
  auto fopt = x.options().dtype(acc);

  at::Tensor z = at::empty({n, r}, fopt);
  if (n == 0) return {at::empty({n, d}, x.options()), z};
  const at::Tensor xa = widen ? x.to(acc) : x;
  const at::Tensor wd_t = operand(w_down, dt, acc).t();
  const at::Tensor wu_t = operand(w_up, dt, acc).t();
  const at::Tensor bu = b_up ? b_up->to(acc).contiguous() : at::Tensor();

  const at::Tensor bd = b_down ? b_down->to(acc).contiguous() : at::Tensor();
  if (residual_gemm_out(z, xa, wd_t, bd, at::Tensor(), 1.0)) {
    // z = x W_d^T + b_d by the same kernel: MKL is slow at N x 64 outputs
  } else if (bd.defined()) {
    at::addmm_out(z, bd, xa, wd_t);
  } else {
    at::mm_out(z, xa, wd_t);
  }
  at::Tensor a = at::empty({n, r}, fopt);
  if (acc != at::kFloat ||
      !activation_forward_pass(n, r, z.data_ptr<float>(), z.stride(0), a.data_ptr<float>(), a.stride(0), activation))
    activation_out_aten(a, z, activation);
  if (widen) round_to(a, dt);
  // y = R + s * (a W_u^T + b_u) in one pass; on the ATen path R + s * b_u is written
  // first and the GEMM accumulates s * a W_u^T into it
  const at::Tensor res = residual_is_x ? xa : (residual ? residual->to(acc) : at::Tensor());
  at::Tensor y = at::empty({n, d}, fopt);
  if (residual_gemm_out(y, a, wu_t, bu, res, scaling)) {
    // done in one pass
  } else if (res.defined()) {
    if (bu.defined()) at::add_out(y, res, bu, scaling);
    else y.copy_(res);
    y.addmm_(a, wu_t, 1.0, scaling);
  } else if (bu.defined()) {
    at::addmm_out(y, bu, a, wu_t, scaling, scaling);
  } else {
    at::addmm_out(y, y, a, wu_t, 0.0, scaling);
  }
  return {widen ? y.to(dt) : y, z};
}

std::vector<at::Tensor> adapter_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z,
                                             const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                                             const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                                             int64_t activation, double scaling, bool residual_is_x,
                                             std::vector<bool> needs) {
  return adapter_backward_from_da_cpu(at::Tensor(), dy, x, z, w_down, b_down, w_up, b_up, activation, scaling,
                                      residual_is_x, std::move(needs));
}

std::vector<at::Tensor> adapter_backward_from_da_cpu(at::Tensor da, const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& z, const at::Tensor& w_down,
                                                     const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                     const c10::optional<at::Tensor>& b_up, int64_t activation,
                                                     double scaling, bool residual_is_x, std::vector<bool> needs) {
  const BackwardNeeds want = backward_needs(needs, b_down.has_value(), b_up.has_value());
  const bool need_dwu = want.dwu, need_dz = want.dz;
  const int64_t n = x.size(0), r = w_down.size(0);
  const auto dt = x.scalar_type();
  const auto acc = acc_type(dt);
  auto fopt = x.options().dtype(acc);
  const at::Tensor g = dy.to(acc);

  // da [N, r] = dy @ W_up, unless the caller formed it
  TORCH_INTERNAL_ASSERT(!da.defined() || (da.scalar_type() == at::kFloat && acc == at::kFloat && da.is_contiguous()));
  if (!need_dz) da = at::Tensor();
  if (need_dz && !da.defined()) {
    const at::Tensor wu = operand(w_up, dt, acc);
    da = at::empty({n, r}, fopt);
    if (!residual_gemm_out(da, g, wu, at::Tensor(), at::Tensor(), 1.0)) at::mm_out(da, g, wu);
  }
  at::Tensor a, dz;  // a = act(z) for dW_up; dz = s * da * act'(z)
  if (acc == at::kFloat && (need_dwu || need_dz)) {
    // one pass (AVX-512 or AVX2) over z and da for a and dz (in place of da)
    const at::Tensor zc = z.stride(1) == 1 ? z : z.contiguous();
    if (need_dwu) a = at::empty({n, r}, fopt);
    float* dap = need_dz ? da.data_ptr<float>() : nullptr;
    if (activation_backward_pass(n, r, zc.data_ptr<float>(), zc.stride(0), dap, need_dz ? da.stride(0) : 0, activation,
                                   static_cast<float>(scaling), need_dwu ? a.data_ptr<float>() : nullptr,
                                   need_dwu ? a.stride(0) : 0, dap, need_dz ? da.stride(0) : 0)) {
      if (need_dz) dz = da;
    } else {
      a = at::Tensor();
    }
  }
  if (need_dz && !dz.defined()) {
    dz = activation_backward_aten(da, z, activation);
    if (scaling != 1.0) dz.mul_(scaling);
  }
  return adapter_backward_from_dz_cpu(dz, a, g, x, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x,
                                      std::move(needs));
}

std::vector<at::Tensor> adapter_backward_from_dz_cpu(at::Tensor dz, at::Tensor a, const at::Tensor& dy,
                                                     const at::Tensor& x, const at::Tensor& z, const at::Tensor& w_down,
                                                     const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                     const c10::optional<at::Tensor>& b_up, int64_t activation,
                                                     double scaling, bool residual_is_x, std::vector<bool> needs) {
  const auto [need_dx, need_dwd, need_dbd, need_dwu, need_dbu, need_dz] =
      backward_needs(needs, b_down.has_value(), b_up.has_value());
  const int64_t n = x.size(0), d = x.size(1), r = w_down.size(0);
  const auto dt = x.scalar_type();
  const auto acc = acc_type(dt);
  const bool widen = dt != acc;
  auto fopt = x.options().dtype(acc);
  const at::Tensor g = dy.to(acc);
  TORCH_INTERNAL_ASSERT(!need_dz || dz.defined());

  at::Tensor dx, dwd, dbd, dwu, dbu;
  // The bias gradients are ATen's sums, as the reference backend (and eager autograd)
  // forms them, not a ones column of a GEMM: MKL sums those in an order of its own, which
  // on some CPUs loses several bits over a few thousand rows. The weight gradients are
  // the kernel of cpu_weight_grad.h where it runs (sums of 64 rows in registers, then the
  // blocks in order: as accurate as MKL's here), else one GEMM in the reference's
  // orientation.
  if (need_dbd) dbd = dz.sum(0);
  if (need_dz && widen) round_to(dz, dt);
  if (need_dwu) {
    if (!a.defined()) {
      a = at::empty({n, r}, fopt);
      activation_out_aten(a, z, activation);
    }
    if (widen) round_to(a, dt);
    if (!weight_grad_out(dwu, a, g, scaling, true)) {
      dwu = at::mm(g.t(), a);  // [d, r]
      if (scaling != 1.0) dwu.mul_(scaling);
    }
  }
  if (need_dbu) {
    dbu = g.sum(0);
    if (scaling != 1.0) dbu.mul_(scaling);
  }
  if (need_dz) {
    if (need_dwd) {
      const at::Tensor xa = widen ? x.to(acc) : x;
      if (!weight_grad_out(dwd, dz, xa, 1.0, false)) dwd = at::mm(dz.t(), xa);
    }
    if (need_dx) {
      const at::Tensor wd = operand(w_down, dt, acc);
      dx = at::empty({n, d}, fopt);
      if (residual_gemm_out(dx, dz, wd, at::Tensor(), residual_is_x ? g : at::Tensor(), 1.0)) {
        // dx = dy + dz @ W_down in one pass
      } else if (residual_is_x) {  // dy copied, the GEMM accumulates into it
        dx.copy_(g);
        dx.addmm_(dz, wd);
      } else {
        at::mm_out(dx, dz, wd);
      }
      if (widen) dx = dx.to(dt);
    }
  }
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace fastadapter
