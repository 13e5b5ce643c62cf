// Torch binding of the CUDA kernels: checks, allocation, the current stream, and the
// fixed-order reduction of the per-group weight-gradient partials.
#include "adapter_cuda_binding.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "adapter_cuda.h"

#include <algorithm>

namespace fastadapter {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default: TORCH_CHECK(false, "fastadapter cuda: unsupported dtype ", t.scalar_type());
  }
  return cuda::DType::F32;
}

// Weights as the kernels read them: contiguous, all in one dtype (x's dtype or fp32).
at::Tensor weight(const at::Tensor& w, at::ScalarType dtype) {
  return w.to(dtype).contiguous();
}

at::ScalarType weight_dtype(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up) {
  return (w_down.scalar_type() == at::kFloat || w_up.scalar_type() == at::kFloat) ? at::kFloat : x.scalar_type();
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastadapter cuda: ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

std::vector<at::Tensor> adapter_forward_cuda(const at::Tensor& x, const at::Tensor& w_down,
                                             const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                             const c10::optional<at::Tensor>& b_up,
                                             const c10::optional<at::Tensor>& residual, int64_t activation,
                                             double scaling, bool residual_is_x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "fastadapter cuda: x must be a 2-D CUDA tensor");
  const int64_t n = x.size(0), d = x.size(1), r = w_down.size(0);
  TORCH_CHECK(r <= cuda::kMaxBottleneck, "fastadapter cuda: bottleneck sizes up to ", cuda::kMaxBottleneck);
  c10::cuda::CUDAGuard guard(x.device());
  const auto wdt = weight_dtype(x, w_down, w_up);
  const at::Tensor wd = weight(w_down, wdt), wu = weight(w_up, wdt);
  const at::Tensor bd = b_down ? weight(*b_down, wdt) : at::Tensor();
  const at::Tensor bu = b_up ? weight(*b_up, wdt) : at::Tensor();
  const at::Tensor res = residual ? residual->to(x.scalar_type()) : at::Tensor();
  at::Tensor y = at::empty({n, d}, x.options());
  at::Tensor z = at::empty({n, r}, x.options().dtype(at::kFloat));

  cuda::ForwardArgs a{};
  a.x = x.data_ptr();
  a.w_down = wd.data_ptr();
  a.b_down = bd.defined() ? bd.data_ptr() : nullptr;
  a.w_up = wu.data_ptr();
  a.b_up = bu.defined() ? bu.data_ptr() : nullptr;
  a.res = res.defined() ? res.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.z = z.data_ptr<float>();
  a.n = n; a.d = d; a.r = r;
  a.sxm = x.stride(0); a.sxd = x.stride(1);
  a.srm = res.defined() ? res.stride(0) : 0; a.srd = res.defined() ? res.stride(1) : 0;
  a.x_dtype = dtype_of(x); a.w_dtype = dtype_of(wd);
  a.activation = static_cast<int>(activation);
  a.scaling = static_cast<float>(scaling);
  a.residual_is_x = residual_is_x;
  check(cuda::adapter_forward(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()), "forward");
  return {y, z};
}

std::vector<at::Tensor> adapter_backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& z,
                                              const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                                              const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                                              int64_t activation, double scaling, bool residual_is_x,
                                              std::vector<bool> needs) {
  TORCH_CHECK(needs.size() == 5, "fastadapter cuda: needs must have 5 flags");
  const bool need_dx = needs[0], need_dwd = needs[1], need_dbd = needs[2] && b_down.has_value();
  const bool need_dwu = needs[3], need_dbu = needs[4] && b_up.has_value();
  const int64_t n = x.size(0), d = x.size(1), r = w_down.size(0);
  c10::cuda::CUDAGuard guard(x.device());
  const auto wdt = weight_dtype(x, w_down, w_up);
  const at::Tensor wd = weight(w_down, wdt), wu = weight(w_up, wdt);
  const at::Tensor g = dy.to(x.scalar_type());
  const auto f32 = x.options().dtype(at::kFloat);

  // enough row groups x column blocks to fill the GPU
  const int64_t col_blocks = (d + 255) / 256;
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()), "device query");
  int64_t groups = std::max<int64_t>(1, std::min<int64_t>(n, (4 * sms + col_blocks - 1) / col_blocks));
  const int64_t rows_per_group = std::max<int64_t>(1, (n + groups - 1) / groups);
  groups = std::max<int64_t>(1, (n + rows_per_group - 1) / rows_per_group);

  const bool need_dz = need_dx || need_dwd || need_dbd;
  at::Tensor dz = need_dz ? at::empty({n, r}, f32) : at::Tensor();
  at::Tensor dx = need_dx ? at::empty({n, d}, x.options()) : at::Tensor();
  at::Tensor dwd_p = need_dwd ? at::empty({groups, r, d}, f32) : at::Tensor();
  at::Tensor dwu_p = need_dwu ? at::empty({groups, d, r}, f32) : at::Tensor();
  at::Tensor dbu_p = need_dbu ? at::empty({groups, d}, f32) : at::Tensor();

  if (n > 0) {
    cuda::BackwardArgs a{};
    a.dy = g.data_ptr();
    a.x = x.data_ptr();
    a.z = z.data_ptr<float>();
    a.w_down = wd.data_ptr();
    a.w_up = wu.data_ptr();
    a.dz = need_dz ? dz.data_ptr<float>() : nullptr;
    a.dx = need_dx ? dx.data_ptr() : nullptr;
    a.dwd_partial = need_dwd ? dwd_p.data_ptr<float>() : nullptr;
    a.dwu_partial = need_dwu ? dwu_p.data_ptr<float>() : nullptr;
    a.dbu_partial = need_dbu ? dbu_p.data_ptr<float>() : nullptr;
    a.n = n; a.d = d; a.r = r;
    a.sdm = g.stride(0); a.sdd = g.stride(1); a.sxm = x.stride(0); a.sxd = x.stride(1);
    a.rows_per_group = rows_per_group; a.groups = groups;
    a.x_dtype = dtype_of(x); a.w_dtype = dtype_of(wd);
    a.activation = static_cast<int>(activation);
    a.scaling = static_cast<float>(scaling);
    a.residual_is_x = residual_is_x;
    a.need_dz = need_dz;
    check(cuda::adapter_backward(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()), "backward");
  }
  // fixed-order sums over the row groups: deterministic
  at::Tensor dwd = need_dwd ? (n > 0 ? dwd_p.sum(0) : at::zeros({r, d}, f32)) : at::Tensor();
  at::Tensor dwu = need_dwu ? (n > 0 ? dwu_p.sum(0).mul_(scaling) : at::zeros({d, r}, f32)) : at::Tensor();
  at::Tensor dbu = need_dbu ? (n > 0 ? dbu_p.sum(0).mul_(scaling) : at::zeros({d}, f32)) : at::Tensor();
  at::Tensor dbd = need_dbd ? (n > 0 ? dz.sum(0) : at::zeros({r}, f32)) : at::Tensor();
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace fastadapter
