// Mixed adapters on the CPU: one stable sort of index groups the rows by adapter; each
// adapter's rows are gathered once (a parallel memcpy per row), run through the fused
// adapter kernels of adapter_cpu.cpp (whose GEMMs need the rows contiguous), and scattered
// back once. The loop over the adapters is here, in C++; an adapter no row uses costs
// nothing.
//   forward:  y[rows(-1)] = R[rows(-1)] (or 0); y[rows(a)] = adapter_a(x[rows(a)], R[rows(a)])
//   backward: dx[rows(a)] = adapter_a'(dy[rows(a)]); dx[rows(-1)] = dy (residual x) or 0;
//             the weight gradients of adapter a from its rows alone.
// A batch whose index is already grouped (each adapter's rows contiguous, in order) is
// run on views, with no gather or scatter.

#include "mixed_adapter_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "adapter_cpu.h"

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
  TORCH_CHECK(needs.size() == 5, "fastadapter cpp: needs must have 5 flags");
  const bool need_dx = needs[0], need_dwd = needs[1], need_dbd = needs[2] && b_down.has_value();
  const bool need_dwu = needs[3], need_dbu = needs[4] && b_up.has_value();
  const int64_t adapters = w_down.size(0);
  const auto acc = z.scalar_type();
  const auto fopt = x.options().dtype(acc);
  const Groups g = group_rows(index, adapters);
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
