// Mixed adapters on the CPU: one stable counting sort of index groups the rows by adapter
// (rows of index -1 first); the loop over the adapters is here, in C++, and an adapter no
// row uses costs nothing.
//   forward:  y[rows(-1)] = R[rows(-1)] (or 0); y[rows(a)] = adapter_a(x[rows(a)], R[rows(a)])
//   backward: dx[rows(a)] = adapter_a'(dy[rows(a)]); dx[rows(-1)] = dy (residual x) or 0;
//             the weight gradients of adapter a from its rows alone.
// For fp32 x where the row kernel of cpu_residual_gemm.h runs (AVX2 on; its products at the
// AVX-512 width where that is on too), its four products read
// and write the rows in place through row maps (z = x W_d^T + b_d and da = dy W_u gather
// their rows of x and dy, y and dx read R or dy and write their rows where they belong),
// and the activation passes run once over all grouped rows: the forward copies no row; the
// backward gathers each adapter's rows of dy (for the db_up sum and dW_up), and the
// weight-gradient kernel of cpu_weight_grad.h reads x's rows through the map (MKL, where
// that kernel does not run, reads gathered rows of x). Elsewhere each adapter's rows are
// gathered (a parallel memcpy per row), run through the adapter kernels of adapter_cpu.cpp
// and scattered back. A batch whose index is already grouped (each adapter's rows
// contiguous, in order) runs on views either way.
#include "mixed_adapter_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "adapter_cpu.h"
#include "cpu_activation.h"
#include "cpu_residual_gemm.h"
#include "cpu_weight_grad.h"

#include <cstring>
#include <vector>

namespace fastadapter {
namespace {

struct Groups {
  at::Tensor order;             // [N] int64: the rows, grouped by adapter (-1 first)
  std::vector<int64_t> offset;  // A + 2 entries: group g (g = index + 1) is [offset[g], offset[g + 1])
  bool identity = false;        // order is 0..N-1: every group is a contiguous slice
};

Groups group_rows(const at::Tensor& index, int64_t adapters) {
  Groups g;
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t n = idx.numel();
  const int64_t* p = idx.data_ptr<int64_t>();
  std::vector<int64_t> count(adapters + 1, 0);
  bool sorted = true;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = p[i];
    TORCH_CHECK(k >= -1 && k < adapters, "fastadapter cpp: index holds ", k, ", outside [-1, ", adapters, ")");
    ++count[k + 1];
    if (i > 0 && k < p[i - 1]) sorted = false;
  }
  g.offset.assign(adapters + 2, 0);
  for (int64_t a = 0; a <= adapters; ++a) g.offset[a + 1] = g.offset[a] + count[a];
  g.identity = sorted;
  g.order = at::empty({n}, idx.options());
  int64_t* o = g.order.data_ptr<int64_t>();
  if (sorted) {
    for (int64_t i = 0; i < n; ++i) o[i] = i;
  } else {  // a counting sort, stable
    std::vector<int64_t> next(g.offset.begin(), g.offset.end() - 1);
    for (int64_t i = 0; i < n; ++i) o[next[p[i] + 1]++] = i;
  }
  return g;
}

// Whole rows copied in parallel, one memcpy each: ATen's index_copy_ moves them at about
// half the bandwidth here, and it is on every forward and backward.
constexpr int64_t kRowGrain = 64;

// rows [begin, end) of the grouped order, of t: a view where the order is the identity
at::Tensor gather(const Groups& g, const at::Tensor& t, int64_t begin, int64_t end) {
  if (g.identity) return t.narrow(0, begin, end - begin);
  const at::Tensor idx = g.order.narrow(0, begin, end - begin);
  if (t.stride(1) != 1) return t.index_select(0, idx);
  const int64_t n = end - begin, row_bytes = t.size(1) * t.element_size(), stride = t.stride(0) * t.element_size();
  at::Tensor out = at::empty({n, t.size(1)}, t.options());
  const int64_t* p = idx.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(t.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(dst + i * row_bytes, src + p[i] * stride, row_bytes);
  });
  return out;
}

// out[order[begin + i]] = rows[i]; out is contiguous
void scatter(const Groups& g, at::Tensor& out, int64_t begin, int64_t end, const at::Tensor& rows) {
  if (g.identity) {
    out.narrow(0, begin, end - begin).copy_(rows);
    return;
  }
  TORCH_INTERNAL_ASSERT(out.is_contiguous());
  const at::Tensor src_rows = rows.to(out.scalar_type()).contiguous();
  const int64_t n = end - begin, row_bytes = out.size(1) * out.element_size();
  const int64_t* p = g.order.data_ptr<int64_t>() + begin;
  const char* src = static_cast<const char*>(src_rows.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(dst + p[i] * row_bytes, src + i * row_bytes, row_bytes);
  });
}

c10::optional<at::Tensor> slice(const c10::optional<at::Tensor>& t, int64_t a) {
  if (!t) return c10::nullopt;
  return t->select(0, a);
}


// ---------------------------------------------------------------------------- row maps

// Whether the row kernel runs the four products of fp32 x [N, d] through row maps here.
bool mapped(const at::Tensor& x, const c10::optional<at::Tensor>& residual, bool residual_is_x, int64_t r) {
  const bool res_ok = residual_is_x || !residual || residual->scalar_type() == at::kFloat;
  return x.scalar_type() == at::kFloat && res_ok && residual_gemm_available(true) && r >= kResidualGemmMin &&
         x.size(1) >= kResidualGemmMin;
}

// The rows [begin, end) of the grouped order of a tensor with row stride ld: its base and
// row map (none where the order is the identity: the rows are then base + (begin + i) * ld).
template <typename T>
struct Mapped {
  T* base;
  const int64_t* map;
};

template <typename T>
Mapped<T> rows_at(const Groups& g, T* p, int64_t ld, int64_t begin) {
  if (g.identity) return {p ? p + begin * ld : nullptr, nullptr};
  return {p, g.order.data_ptr<int64_t>() + begin};
}

// out rows [begin, end) of the grouped order: the rows of src (null: zeros), both unit columns
void copy_rows(const Groups& g, int64_t begin, int64_t end, const float* src, int64_t lds, float* out, int64_t ldo,
               int64_t d) {
  const int64_t* p = g.identity ? nullptr : g.order.data_ptr<int64_t>();
  at::parallel_for(begin, end, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t row = p ? p[i] : i;
      if (src) std::memcpy(out + row * ldo, src + row * lds, d * sizeof(float));
      else std::memset(out + row * ldo, 0, d * sizeof(float));
    }
  });
}

void run(const ResidualGemm& gemm) {
  TORCH_INTERNAL_ASSERT(residual_gemm(gemm), "fastadapter cpp: the row kernel did not run a mapped product");
}

std::vector<at::Tensor> forward_mapped(const Groups& g, const at::Tensor& x_in, const at::Tensor& w_down,
                                       const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                       const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& residual,
                                       int64_t activation, double scaling, bool residual_is_x) {
  const at::Tensor x = unit_columns(x_in);
  const int64_t n = x.size(0), d = x.size(1), adapters = w_down.size(0), r = w_down.size(1);
  const at::Tensor wd = w_down.to(at::kFloat).contiguous(), wu = w_up.to(at::kFloat).contiguous();
  const auto bd = fp32(b_down), bu = fp32(b_up);
  const at::Tensor res = residual_is_x ? x : (residual ? unit_columns(residual->to(at::kFloat)) : at::Tensor());
  at::Tensor y = at::empty({n, d}, x.options());
  at::Tensor z = at::zeros({n, r}, x.options());  // the rows of index -1 stay zero
  at::Tensor a = at::empty({n, r}, x.options());
  const float* res_p = res.defined() ? res.data_ptr<float>() : nullptr;
  const int64_t ldr = res.defined() ? res.stride(0) : 0;
  copy_rows(g, 0, g.offset[1], res_p, ldr, y.data_ptr<float>(), d, d);
  // adapter by adapter, so that its rows of x, read by both products, are still in cache
  // for the second
  for (int64_t k = 0; k < adapters; ++k) {
    const int64_t begin = g.offset[k + 1], end = g.offset[k + 2], rows = end - begin;
    if (rows == 0) continue;
    // z = x W_d^T + b_d, x's rows through the map
    const auto xs = rows_at<const float>(g, x.data_ptr<float>(), x.stride(0), begin);
    ResidualGemm down{rows, r, d, xs.base, x.stride(0), wd.data_ptr<float>() + k * r * d, 1, d, nullptr, 0,
                      bd ? bd->data_ptr<float>() + k * r : nullptr, 1.0f, z.data_ptr<float>() + begin * r, r};
    down.a_rows = xs.map;
    run(down);
    // a = act(z)
    float* ap = a.data_ptr<float>() + begin * r;
    if (!activation_forward_pass(rows, r, z.data_ptr<float>() + begin * r, r, ap, r, activation)) {
      at::Tensor a_k = a.narrow(0, begin, rows);
      activation_out_aten(a_k, z.narrow(0, begin, rows), activation);
    }
    // y = R + s * (a W_u^T + b_u), R's and y's rows through the map
    const auto rs = rows_at<const float>(g, res_p, ldr, begin);
    const auto ys = rows_at<float>(g, y.data_ptr<float>(), d, begin);
    ResidualGemm up{rows, d, r, ap, r, wu.data_ptr<float>() + k * d * r, 1, r, res_p ? rs.base : nullptr, ldr,
                    bu ? bu->data_ptr<float>() + k * d : nullptr, static_cast<float>(scaling), ys.base, d};
    up.r_rows = res_p ? rs.map : nullptr;
    up.out_rows = ys.map;
    run(up);
  }
  return {y, z};
}

std::vector<at::Tensor> backward_mapped(const Groups& g, const at::Tensor& dy_in, const at::Tensor& x_in,
                                        const at::Tensor& z, const at::Tensor& w_down,
                                        const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                        const c10::optional<at::Tensor>& b_up, int64_t activation, double scaling,
                                        bool residual_is_x, const std::vector<bool>& needs) {
  const auto [need_dx, need_dwd, need_dbd, need_dwu, need_dbu, need_dz] =
      backward_needs(needs, b_down.has_value(), b_up.has_value());
  const at::Tensor dy = unit_columns(dy_in.to(at::kFloat)), x = unit_columns(x_in);
  const int64_t n = x.size(0), d = x.size(1), adapters = w_down.size(0), r = w_down.size(1);
  const at::Tensor wd = w_down.to(at::kFloat).contiguous(), wu = w_up.to(at::kFloat).contiguous();
  const auto opt = x.options();
  at::Tensor dx, dwd, dbd, dwu, dbu;
  if (need_dwd) dwd = at::zeros(w_down.sizes(), opt);
  if (need_dbd) dbd = at::zeros(b_down->sizes(), opt);
  if (need_dwu) dwu = at::zeros(w_up.sizes(), opt);
  if (need_dbu) dbu = at::zeros(b_up->sizes(), opt);
  if (need_dx) {
    dx = at::empty({n, d}, opt);
    copy_rows(g, 0, g.offset[1], residual_is_x ? dy.data_ptr<float>() : nullptr, dy.stride(0), dx.data_ptr<float>(), d, d);
  }
  at::Tensor da = need_dz ? at::empty({n, r}, opt) : at::Tensor();  // becomes dz in place
  at::Tensor a = need_dwu ? at::empty({n, r}, opt) : at::Tensor();
  const at::Tensor zc = z.contiguous();
  // adapter by adapter: its rows of dy are gathered once and read from cache by da, the
  // dW_up product, the db_up sum and dx's residual
  for (int64_t k = 0; k < adapters; ++k) {
    const int64_t begin = g.offset[k + 1], end = g.offset[k + 2], rows = end - begin;
    if (rows == 0 || !(need_dz || need_dwu || need_dbu)) continue;
    // dy's rows: gathered where the dW_up GEMM and the db_up sum need them contiguous,
    // else read through the map
    const bool gathered = need_dwu || need_dbu;
    const at::Tensor dyk = gathered ? gather(g, dy, begin, end) : at::Tensor();
    const auto dys = gathered ? Mapped<const float>{dyk.data_ptr<float>(), nullptr}
                              : rows_at<const float>(g, dy.data_ptr<float>(), dy.stride(0), begin);
    const int64_t lddy = gathered ? dyk.stride(0) : dy.stride(0);
    const at::Tensor zk = zc.narrow(0, begin, rows);
    at::Tensor dak = need_dz ? da.narrow(0, begin, rows) : at::Tensor();
    at::Tensor ak = need_dwu ? a.narrow(0, begin, rows) : at::Tensor();
    if (need_dz) {  // da = dy W_u
      ResidualGemm gemm{rows, r, d, dys.base, lddy, wu.data_ptr<float>() + k * d * r, r, 1, nullptr, 0, nullptr, 1.0f,
                        dak.data_ptr<float>(), r};
      gemm.a_rows = dys.map;
      run(gemm);
    }
    // a = act(z) and dz = s * da * act'(z) in one pass
    float* dap = need_dz ? dak.data_ptr<float>() : nullptr;
    if (!activation_backward_pass(rows, r, zk.data_ptr<float>(), r, dap, r, activation, static_cast<float>(scaling),
                                    need_dwu ? ak.data_ptr<float>() : nullptr, r, dap, r)) {
      if (need_dwu) activation_out_aten(ak, zk, activation);
      if (need_dz) {
        at::Tensor dz = activation_backward_aten(dak, zk, activation);
        if (scaling != 1.0) dz = dz.mul(scaling);
        if (!dz.is_same(dak)) dak.copy_(dz);
      }
    }
    if (need_dbd) dbd.select(0, k).copy_(dak.sum(0));
    if (need_dwu) {  // dW_u = s * dy^T a: the kernel of cpu_weight_grad.h, else MKL
      at::Tensor out = dwu.select(0, k);
      WeightGrad wg{rows, r, d, ak.data_ptr<float>(), r, dys.base, lddy, static_cast<float>(scaling),
                    out.data_ptr<float>(), true};
      wg.b_rows = dys.map;
      if (!weight_grad(wg)) {
        at::mm_out(out, dyk.t(), ak);
        if (scaling != 1.0) out.mul_(scaling);
      }
    }
    if (need_dbu) {
      at::Tensor out = dbu.select(0, k);
      at::sum_out(out, dyk, 0);
      if (scaling != 1.0) out.mul_(scaling);
    }
    if (need_dwd) {  // dW_d = dz^T x, x's rows through the map (MKL: gathered)
      at::Tensor out = dwd.select(0, k);
      const auto xs = rows_at<const float>(g, x.data_ptr<float>(), x.stride(0), begin);
      WeightGrad wg{rows, r, d, dak.data_ptr<float>(), r, xs.base, x.stride(0), 1.0f, out.data_ptr<float>(), false};
      wg.b_rows = xs.map;
      if (!weight_grad(wg)) at::mm_out(out, dak.t(), gather(g, x, begin, end));
    }
    if (need_dx) {  // dx = dy + dz W_d, dx's rows through the map
      const auto xs = rows_at<float>(g, dx.data_ptr<float>(), d, begin);
      ResidualGemm gemm{rows, d, r, dak.data_ptr<float>(), r, wd.data_ptr<float>() + k * r * d, d, 1,
                        residual_is_x ? dys.base : nullptr, lddy, nullptr, 1.0f, xs.base, d};
      gemm.r_rows = residual_is_x ? dys.map : nullptr;
      gemm.out_rows = xs.map;
      run(gemm);
    }
  }
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace

std::vector<at::Tensor> mixed_adapter_forward_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& w_down,
                                                  const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                  const c10::optional<at::Tensor>& b_up,
                                                  const c10::optional<at::Tensor>& residual, int64_t activation,
                                                  double scaling, bool residual_is_x) {
  TORCH_CHECK(x.dim() == 2 && index.dim() == 1 && index.size(0) == x.size(0),
              "fastadapter cpp: mixed adapter takes x [N, d] and index [N]");
  const int64_t n = x.size(0), adapters = w_down.size(0), r = w_down.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Groups g = group_rows(index, adapters);
  if (mapped(x, residual, residual_is_x, r))
    return forward_mapped(g, x, w_down, b_down, w_up, b_up, residual, activation, scaling, residual_is_x);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor z = at::zeros({n, r}, x.options().dtype(acc));
  if (g.offset[1] > 0) {  // rows with no adapter: their residual, or zeros
    const at::Tensor base = residual_is_x ? x : (residual ? *residual : at::Tensor());
    if (base.defined()) {
      scatter(g, y, 0, g.offset[1], gather(g, base, 0, g.offset[1]));
    } else {
      scatter(g, y, 0, g.offset[1], at::zeros({g.offset[1], x.size(1)}, x.options()));
    }
  }
  for (int64_t a = 0; a < adapters; ++a) {
    const int64_t begin = g.offset[a + 1], end = g.offset[a + 2];
    if (begin == end) continue;
    c10::optional<at::Tensor> res;
    if (!residual_is_x && residual) res = gather(g, *residual, begin, end);
    auto out = adapter_forward_cpu(gather(g, x, begin, end), w_down.select(0, a), slice(b_down, a), w_up.select(0, a),
                                   slice(b_up, a), res, activation, scaling, residual_is_x);
    scatter(g, y, begin, end, out[0]);
    z.narrow(0, begin, end - begin).copy_(out[1]);
  }
  return {y, z};
}

std::vector<at::Tensor> mixed_adapter_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index,
                                                   const at::Tensor& z, const at::Tensor& w_down,
                                                   const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                   const c10::optional<at::Tensor>& b_up, int64_t activation,
                                                   double scaling, bool residual_is_x, std::vector<bool> needs) {
  const auto [need_dx, need_dwd, need_dbd, need_dwu, need_dbu, need_dz] =
      backward_needs(needs, b_down.has_value(), b_up.has_value());
  const int64_t adapters = w_down.size(0);
  const auto acc = z.scalar_type();
  const auto fopt = x.options().dtype(acc);
  const Groups g = group_rows(index, adapters);
  if (mapped(x, c10::nullopt, true, w_down.size(1)) && z.scalar_type() == at::kFloat)
    return backward_mapped(g, dy, x, z, w_down, b_down, w_up, b_up, activation, scaling, residual_is_x, needs);
  at::Tensor dx, dwd, dbd, dwu, dbu;
  if (need_dx) {
    dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    if (g.offset[1] > 0) {
      if (residual_is_x) {
        scatter(g, dx, 0, g.offset[1], gather(g, dy, 0, g.offset[1]));
      } else {
        scatter(g, dx, 0, g.offset[1], at::zeros({g.offset[1], x.size(1)}, x.options()));
      }
    }
  }
  if (need_dwd) dwd = at::zeros(w_down.sizes(), fopt);
  if (need_dbd) dbd = at::zeros(b_down->sizes(), fopt);
  if (need_dwu) dwu = at::zeros(w_up.sizes(), fopt);
  if (need_dbu) dbu = at::zeros(b_up->sizes(), fopt);
  for (int64_t a = 0; a < adapters; ++a) {
    const int64_t begin = g.offset[a + 1], end = g.offset[a + 2];
    if (begin == end) continue;
    auto grads = adapter_backward_cpu(gather(g, dy, begin, end), gather(g, x, begin, end), z.narrow(0, begin, end - begin),
                                      w_down.select(0, a), slice(b_down, a), w_up.select(0, a), slice(b_up, a), activation,
                                      scaling, residual_is_x, needs);
    if (need_dx) scatter(g, dx, begin, end, grads[0]);
    if (need_dwd) dwd.select(0, a).copy_(grads[1]);
    if (need_dbd) dbd.select(0, a).copy_(grads[2]);
    if (need_dwu) dwu.select(0, a).copy_(grads[3]);
    if (need_dbu) dbu.select(0, a).copy_(grads[4]);
  }
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace fastadapter
