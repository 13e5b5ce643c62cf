// Fused adapter on the CPU.
//
// On CPUs the adapter's GEMMs are compute-bound (about r FLOP per byte is above a CPU's
// ridge point), so what fusion can save here is the element-wise passes, allocations and
// saved tensors, not GEMM work. On the 2-core development machine (fp32, N=4096, d=768,
// r=64) whole-matrix GEMMs threaded by MKL ran the forward about 1.3x faster than
// single-threaded per-tile GEMMs in parallel row tiles, so the products are whole-matrix
// ATen GEMMs and every element-wise step is fused into one parallel pass over rows:
//   forward:  z = x W_d^T + b_d (GEMM, bias in the GEMM); a = act(z); y = a W_u^T (GEMM);
//             one pass  y = R + s * (y + b_u).
//   backward: [dW_u | db_u] = s * dy^T [a | 1] (one GEMM: the ones column sums dy);
//             da = dy W_u; dz = s * da * act'(z); db_d = sum(dz); dW_d = dz^T x;
//             dx = dz W_d, then one pass dx += dy when the residual is x.
// For fp32 x nothing of size N x d is written besides y (forward) and dx (backward);
// half-precision x is widened to fp32 first.
//
// Numerics follow the reference backend: GEMM operands are rounded to x's dtype and
// multiplied in fp32 (fp64 for double x); z stays fp32; `a` is rounded to x's dtype
// before the up-projection; y = R + s * (a @ W_up.T + b_up) is rounded once.

#include "adapter_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fastadapter {
namespace {

// Minimum rows per parallel task of the element-wise passes.
constexpr int64_t kGrainRows = 64;

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

void activation_out(at::Tensor& a, const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::Relu: at::relu_out(a, z); break;  // NaN passes, like torch.relu
    case Activation::Gelu: at::gelu_out(a, z, "none"); break;
    case Activation::GeluTanh: at::gelu_out(a, z, "tanh"); break;
    case Activation::Silu: at::silu_out(a, z); break;
    case Activation::Tanh: at::tanh_out(a, z); break;
    case Activation::Identity: a.copy_(z); break;
  }
}

// grad * act'(z)
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::Relu: return at::threshold_backward(grad, z, 0);
    case Activation::Gelu: return at::gelu_backward(grad, z, "none");
    case Activation::GeluTanh: return at::gelu_backward(grad, z, "tanh");
    case Activation::Silu: return at::silu_backward(grad, z);
    case Activation::Tanh: return at::tanh_backward(grad, at::tanh(z));
    case Activation::Identity: return grad;
  }
  return grad;
}

// y = R + s * (y + b) over a [m, d] tile with unit column stride; R and b may be undefined.
template <typename T>
void epilogue_loop(T* y, int64_t ys, const T* res, int64_t rs, const T* b, T s, int64_t m, int64_t d) {
  for (int64_t i = 0; i < m; ++i) {
    T* yr = y + i * ys;
    const T* rr = res ? res + i * rs : nullptr;
    if (b && rr) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = rr[j] + s * (yr[j] + b[j]);
    } else if (b) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = s * (yr[j] + b[j]);
    } else if (rr) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = rr[j] + s * yr[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = s * yr[j];
    }
  }
}

void epilogue(at::Tensor& y, const at::Tensor& res, const at::Tensor& b, double s) {
  const bool res_ok = !res.defined() || res.stride(1) == 1;
  if (y.stride(1) != 1 || !res_ok) {  // rare layouts: ATen ops
    if (b.defined()) y.add_(b);
    y.mul_(s);
    if (res.defined()) y.add_(res);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fastadapter_epilogue", [&] {
    epilogue_loop<scalar_t>(y.data_ptr<scalar_t>(), y.stride(0), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
                            res.defined() ? res.stride(0) : 0, b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                            static_cast<scalar_t>(s), y.size(0), y.size(1));
  });
}

}  // namespace

std::vector<at::Tensor> adapter_forward_cpu(const at::Tensor& x, const at::Tensor& w_down,
                                            const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                            const c10::optional<at::Tensor>& b_up,
                                            const c10::optional<at::Tensor>& residual, int64_t activation,
                                            double scaling, bool residual_is_x) {
  TORCH_CHECK(x.dim() == 2, "fastadapter cpp: x must be 2-D [N, d]");
  TORCH_CHECK(x.device().is_cpu(), "fastadapter cpp: x must be a CPU tensor");
  const auto act = static_cast<Activation>(activation);
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

  if (b_down) at::addmm_out(z, b_down->to(acc), xa, wd_t);
  else at::mm_out(z, xa, wd_t);
  at::Tensor a = at::empty({n, r}, fopt);
  activation_out(a, z, act);
  if (widen) round_to(a, dt);
  at::Tensor y = at::empty({n, d}, fopt);
  at::mm_out(y, a, wu_t);

  const at::Tensor res = residual_is_x ? xa : (residual ? residual->to(acc) : at::Tensor());
  at::parallel_for(0, n, kGrainRows, [&](int64_t i0, int64_t i1) {
    at::Tensor yt = y.narrow(0, i0, i1 - i0);
    epilogue(yt, res.defined() ? res.narrow(0, i0, i1 - i0) : res, bu, scaling);
  });
  return {widen ? y.to(dt) : y, z};
}

std::vector<at::Tensor> adapter_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z,
                                             const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                                             const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                                             int64_t activation, double scaling, bool residual_is_x,
                                             std::vector<bool> needs) {
  TORCH_CHECK(needs.size() == 5, "fastadapter cpp: needs must have 5 flags");
  const bool need_dx = needs[0], need_dwd = needs[1], need_dbd = needs[2] && b_down.has_value();
  const bool need_dwu = needs[3], need_dbu = needs[4] && b_up.has_value();
  const bool need_dz = need_dx || need_dwd || need_dbd;
  const auto act = static_cast<Activation>(activation);
  const int64_t n = x.size(0), d = x.size(1), r = w_down.size(0);
  const auto dt = x.scalar_type();
  const auto acc = acc_type(dt);
  const bool widen = dt != acc;
  auto fopt = x.options().dtype(acc);
  const at::Tensor g = dy.to(acc);

  at::Tensor dx, dwd, dbd, dwu, dbu;
  if (need_dwu || need_dbu) {
    // [dW_u | db_u] = s * dy^T [a | 1]: the ones column turns the bias sum into GEMM work
    at::Tensor a1 = at::empty({n, r + 1}, fopt);
    at::Tensor a = a1.narrow(1, 0, r);
    if (need_dwu) {
      at::Tensor tmp = at::empty({n, r}, fopt);  // some ATen activation out= kernels mishandle strided outputs
      activation_out(tmp, z, act);
      if (widen) round_to(tmp, dt);
      a.copy_(tmp);
    } else {
      a.zero_();
    }
    a1.select(1, r).fill_(1);
    at::Tensor out = at::mm(g.t(), need_dwu ? a1 : a1.narrow(1, r, 1)).mul_(scaling);  // [d, r + 1]
    if (need_dwu) dwu = out.narrow(1, 0, r).contiguous();
    if (need_dbu) dbu = out.select(1, out.size(1) - 1).contiguous();
  }
  if (need_dz) {
    at::Tensor da = at::mm(g, operand(w_up, dt, acc));  // [N, r]
    at::Tensor dz = activation_backward(da, z, act).mul_(scaling);
    if (need_dbd) dbd = dz.sum(0);
    if (widen) round_to(dz, dt);
    if (need_dwd) dwd = at::mm(dz.t(), widen ? x.to(acc) : x);
    if (need_dx) {
      dx = at::mm(dz, operand(w_down, dt, acc));
      if (residual_is_x) {
        at::parallel_for(0, n, kGrainRows, [&](int64_t i0, int64_t i1) {
          at::Tensor t = dx.narrow(0, i0, i1 - i0);
          epilogue(t, g.narrow(0, i0, i1 - i0), at::Tensor(), 1.0);
        });
      }
      if (widen) dx = dx.to(dt);
    }
  }
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace fastadapter
