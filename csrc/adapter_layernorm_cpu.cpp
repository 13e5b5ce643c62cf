// The adapter site on the CPU, fp32 (see adapter_layernorm_cpu.h):
//   forward:  z = u W_d^T + b_d; a = act(z);
//             v = h + r + s * (a W_u^T + b_u) by the row kernel of cpu_residual_gemm.h
//             (AVX-512 products where they run, else AVX2; the row hooks here are AVX2)
//             with both residuals in its epilogue (t + s * (...) for pfeiffer), and as
//             each micro-row of 6 rows of v is final, still in L1, its LayerNorm: the
//             row statistics and out.
//             The three steps run tile by tile (24 rows: residual_gemm_chain), so the
//             epilogue reads u's rows (h for houlsby) from cache, not memory: one read of
//             h and r from memory; v and out written once each.
//   backward: where the LayerNorm is frozen, dv formed 24 rows at a time in the prologue
//             of the da = dv W_up product (the kernel's tiles), which reads them from
//             cache, and each tile's column sums of dv for db_up; where du is needed,
//             dz = s * da * act'(z) (and a) and du = dv + dz W_d follow tile by tile in
//             the same chain, reading dv's rows from cache; then the weight gradients
//             and db_down (adapter_backward_from_dz_cpu). Or dv in one pass over dout
//             and v (layernorm_backward_input_cpu) for the caller's adapter backward. A
//             trainable LayerNorm takes ATen's backward, which also forms its weight and
//             bias gradients.

#include "adapter_layernorm_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>

#include "adapter_cpu.h"
#include "cpu_avx2.h"
#include "cpu_activation.h"
#include "cpu_residual_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTADAPTER_HAVE_AVX2_ROWS 1
#include <immintrin.h>
#define FA_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTADAPTER_HAVE_AVX2_ROWS 0
#endif

namespace fastadapter {
namespace {

#if FASTADAPTER_HAVE_AVX2_ROWS

// The row sums below run four accumulators of 8 lanes (32 floats per step), not one: a
// single chain of adds or FMAs waits their latency on every vector of the row.

// sum of x[0, full), full a multiple of 8
FA_AVX2 inline float row_sum(const float* x, int64_t full) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t j = 0;
  for (; j + 32 <= full; j += 32) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + j));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + j + 8));
    s2 = _mm256_add_ps(s2, _mm256_loadu_ps(x + j + 16));
    s3 = _mm256_add_ps(s3, _mm256_loadu_ps(x + j + 24));
  }
  for (; j < full; j += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + j));
  return hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// sum of (x - mu)^2 over [0, full)
FA_AVX2 inline float row_sq(const float* x, int64_t full, __m256 vmu) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t j = 0;
  for (; j + 32 <= full; j += 32) {
    const __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(x + j), vmu), t1 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vmu);
    const __m256 t2 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 16), vmu), t3 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 24), vmu);
    s0 = _mm256_fmadd_ps(t0, t0, s0);
    s1 = _mm256_fmadd_ps(t1, t1, s1);
    s2 = _mm256_fmadd_ps(t2, t2, s2);
    s3 = _mm256_fmadd_ps(t3, t3, s3);
  }
  for (; j < full; j += 8) {
    const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(x + j), vmu);
    s0 = _mm256_fmadd_ps(t, t, s0);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// The LayerNorm of rows of v: the kernel's row hook.
struct LnRows {
  const float* v;
  int64_t ldv;
  const float* w;  // null: 1
  const float* b;  // null: 0
  float eps;
  int64_t d;
  float* out;
  float* mean;
  float* rstd;
};

FA_AVX2 void ln_rows(void* ctx, int64_t row0, int64_t row1) {
  const LnRows& c = *static_cast<const LnRows*>(ctx);
  const int64_t d = c.d, full = d - d % 8;
  for (int64_t i = row0; i < row1; ++i) {
    const float* x = c.v + i * c.ldv;
    float* o = c.out + i * d;
    float sum = row_sum(x, full);
    for (int64_t j = full; j < d; ++j) sum += x[j];
    const float mu = sum / static_cast<float>(d);
    const __m256 vmu = _mm256_set1_ps(mu);
    float var = row_sq(x, full, vmu);
    for (int64_t j = full; j < d; ++j) var += (x[j] - mu) * (x[j] - mu);
    const float rs = 1.0f / std::sqrt(var / static_cast<float>(d) + c.eps);
    const __m256 vrs = _mm256_set1_ps(rs);
    if (c.w && c.b) {
      for (int64_t j = 0; j < full; j += 8) {
        const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmu), vrs);
        _mm256_storeu_ps(o + j, _mm256_fmadd_ps(xh, _mm256_loadu_ps(c.w + j), _mm256_loadu_ps(c.b + j)));
      }
    } else {
      const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
      for (int64_t j = 0; j < full; j += 8) {
        const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmu), vrs);
        const __m256 w = c.w ? _mm256_loadu_ps(c.w + j) : one, b = c.b ? _mm256_loadu_ps(c.b + j) : zero;
        _mm256_storeu_ps(o + j, _mm256_fmadd_ps(xh, w, b));
      }
    }
    for (int64_t j = full; j < d; ++j) o[j] = (x[j] - mu) * rs * (c.w ? c.w[j] : 1.0f) + (c.b ? c.b[j] : 0.0f);
    c.mean[i] = mu;
    c.rstd[i] = rs;
  }
}

// sg += g * w and sgx += g * w * x̂ for 8 columns (w null: 1)
FA_AVX2 inline void ln_backward_sums(const float* g, const float* w, const float* x, __m256 vmu, __m256 vrs, __m256& sg,
                                     __m256& sgx) {
  const __m256 gw = w ? _mm256_mul_ps(_mm256_loadu_ps(g), _mm256_loadu_ps(w)) : _mm256_loadu_ps(g);
  const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x), vmu), vrs);
  sg = _mm256_add_ps(sg, gw);
  sgx = _mm256_fmadd_ps(gw, xh, sgx);
}

// dv for rows [row0, row1); with col_sums, each row of dv also added into the row of
// col_sums [N / kResidualGemmTileRows rounded up, d] of its tile
FA_AVX2 void ln_backward_rows(int64_t row0, int64_t row1, int64_t d, const float* dout, int64_t ldg, const float* v,
                              int64_t ldv, const float* mean, const float* rstd, const float* w, float* dv,
                              float* col_sums) {
  const int64_t full = d - d % 8;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = row0; i < row1; ++i) {
    const float *g = dout + i * ldg, *x = v + i * ldv;
    float* o = dv + i * d;
    float* cs = col_sums ? col_sums + (i / kResidualGemmTileRows) * d : nullptr;
    const float mu = mean[i], rs = rstd[i];
    const __m256 vmu = _mm256_set1_ps(mu), vrs = _mm256_set1_ps(rs);
    // sums of g = dout * w and of g * x̂, two accumulators each (see row_sum)
    __m256 sg0 = _mm256_setzero_ps(), sg1 = sg0, sgx0 = sg0, sgx1 = sg0;
    int64_t j = 0;
    for (; j + 16 <= full; j += 16) {
      ln_backward_sums(g + j, w ? w + j : nullptr, x + j, vmu, vrs, sg0, sgx0);
      ln_backward_sums(g + j + 8, w ? w + j + 8 : nullptr, x + j + 8, vmu, vrs, sg1, sgx1);
    }
    if (j < full) ln_backward_sums(g + j, w ? w + j : nullptr, x + j, vmu, vrs, sg0, sgx0);
    float a = hsum(_mm256_add_ps(sg0, sg1)), b = hsum(_mm256_add_ps(sgx0, sgx1));
    for (int64_t j = full; j < d; ++j) {
      const float gw = g[j] * (w ? w[j] : 1.0f);
      a += gw;
      b += gw * (x[j] - mu) * rs;
    }
    a /= static_cast<float>(d);
    b /= static_cast<float>(d);
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    for (int64_t j = 0; j < full; j += 8) {
      const __m256 gw = _mm256_mul_ps(_mm256_loadu_ps(g + j), w ? _mm256_loadu_ps(w + j) : one);
      const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vmu), vrs);
      const __m256 dvj = _mm256_mul_ps(vrs, _mm256_sub_ps(_mm256_sub_ps(gw, va), _mm256_mul_ps(xh, vb)));
      _mm256_storeu_ps(o + j, dvj);
      if (cs) _mm256_storeu_ps(cs + j, _mm256_add_ps(_mm256_loadu_ps(cs + j), dvj));
    }
    for (int64_t j = full; j < d; ++j) {
      const float gw = g[j] * (w ? w[j] : 1.0f);
      o[j] = rs * (gw - a - (x[j] - mu) * rs * b);
      if (cs) cs[j] += o[j];
    }
  }
}

// The LayerNorm backward of rows of dout: the da product's row prologue.
struct LnBackRows {
  const float* dout;
  int64_t ldg;
  const float* v;
  int64_t ldv;
  const float* mean;
  const float* rstd;
  const float* w;  // null: 1
  int64_t d;
  float* dv;
  float* col_sums;  // null: none; else per tile of the product, the sums of its rows of dv
};

void ln_backward_hook(void* ctx, int64_t row0, int64_t row1) {
  const LnBackRows& c = *static_cast<const LnBackRows*>(ctx);
  ln_backward_rows(row0, row1, c.d, c.dout, c.ldg, c.v, c.ldv, c.mean, c.rstd, c.w, c.dv, c.col_sums);
}

// s times the column sums of the tiles' sums, in tile order, in double: db_up
at::Tensor tile_sums_total(const at::Tensor& col_sums, double s) {
  const int64_t tiles = col_sums.size(0), d = col_sums.size(1);
  std::vector<double> total(d, 0.0);
  const float* p = col_sums.data_ptr<float>();
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t j = 0; j < d; ++j) total[j] += p[t * d + j];
  at::Tensor out = at::empty({d}, col_sums.options());
  float* o = out.data_ptr<float>();
  for (int64_t j = 0; j < d; ++j) o[j] = static_cast<float>(s * total[j]);
  return out;
}

#endif  // FASTADAPTER_HAVE_AVX2_ROWS

// a = act(z) for rows of the bottleneck: the forward chain's step between its products.
struct ActRows {
  int64_t r;
  const float* z;
  float* a;
  int64_t act;
};

void act_rows_hook(void* ctx, int64_t row0, int64_t row1) {
  const ActRows& c = *static_cast<const ActRows*>(ctx);
  activation_forward_rows(row0, row1, c.r, c.z, c.r, c.a, c.r, c.act);
}

// a = act(z) (a may be null) and dz = s * da * act'(z) in place of da, for rows of the
// bottleneck: the backward chain's step between its products.
struct ActBackRows {
  int64_t r;
  const float* z;
  float* da;
  float* a;
  int64_t act;
  float s;
};

void act_back_rows_hook(void* ctx, int64_t row0, int64_t row1) {
  const ActBackRows& c = *static_cast<const ActBackRows*>(ctx);
  activation_backward_rows(row0, row1, c.r, c.z, c.r, c.da, c.r, c.act, c.s, c.a, c.r, c.da, c.r);
}

}  // namespace

bool site_kernels_run_here(const at::Tensor& h, int64_t r) {
  return FASTADAPTER_HAVE_AVX2_ROWS && h.scalar_type() == at::kFloat && residual_gemm_available(true) &&
         r >= kResidualGemmMin && h.size(1) >= kResidualGemmMin;
}

void site_forward_products(ResidualGemm& down, ResidualGemm& up, int64_t activation) {
  const int64_t rk = down.d;
  ActRows act{rk, down.out, const_cast<float*>(up.a), activation};
  if (!activation_rows_available(rk) || !residual_gemm_chain(down, act_rows_hook, &act, up)) {
    TORCH_INTERNAL_ASSERT(residual_gemm(down));
    if (!activation_forward_pass(down.n, rk, down.out, rk, const_cast<float*>(up.a), rk, activation)) {
      at::Tensor z = at::from_blob(down.out, {down.n, rk}), a = at::from_blob(const_cast<float*>(up.a), {down.n, rk});
      activation_out_aten(a, z, activation);
    }
    TORCH_INTERNAL_ASSERT(residual_gemm(up));
  }
}

at::Tensor tile_sums_buffer(int64_t n, int64_t d, bool wanted, const at::TensorOptions& options) {
  if (!wanted) return at::Tensor();
  return at::zeros({(n + kResidualGemmTileRows - 1) / kResidualGemmTileRows, d}, options);
}

std::vector<at::Tensor> site_adapter_backward_cpu(void (*prologue)(void* ctx, int64_t row0, int64_t row1), void* ctx,
                                                  const at::Tensor& dv, const at::Tensor& col_sums, const at::Tensor& u,
                                                  const at::Tensor& z, const at::Tensor& w_down,
                                                  const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                  const c10::optional<at::Tensor>& b_up, int64_t activation,
                                                  double scaling, bool residual_is_x, std::vector<bool> needs) {
  const BackwardNeeds want = backward_needs(needs, b_down.has_value(), b_up.has_value());
  const int64_t n = dv.size(0), d = dv.size(1), rk = w_down.size(0);
  TORCH_CHECK(want.dz && site_kernels_run_here(u, rk), "fastadapter cpp: site_adapter_backward_cpu does not run here");
#if FASTADAPTER_HAVE_AVX2_ROWS
  const at::Tensor wu = w_up.to(at::kFloat).contiguous();
  at::Tensor da = at::empty({n, rk}, dv.options());
  // db_up = s * sum(dv) from the prologue's sums of each tile's rows, formed while they are
  // in cache, not in a pass of its own over dv; the tiles are fixed, so the sum does not
  // depend on the thread count
  at::Tensor dbu;
  // Where du is needed, da and du = (dv) + dz W_d run as one chain of products tile by
  // tile, dz and a formed between them: du's product reads its rows of dv and dz from
  // cache. Else da alone, and the adapter backward from it.
  const bool chain = want.dx && activation_rows_available(rk);
  at::Tensor du, a;
  if (chain) {
    du = at::empty({n, d}, dv.options());
    if (want.dwu) a = at::empty({n, rk}, dv.options());
  }
  if (n > 0) {
    // da = dv W_u, each tile's rows of dv formed first by the prologue
    ResidualGemm gemm{n, rk, d, dv.data_ptr<float>(), d, wu.data_ptr<float>(), rk, 1, nullptr, 0, nullptr, 1.0f,
                      da.data_ptr<float>(), rk};
    gemm.rows_ready = prologue;
    gemm.ready_ctx = ctx;
    if (chain) {
      const at::Tensor zc = z.to(at::kFloat).contiguous(), wd = w_down.to(at::kFloat).contiguous();
      ActBackRows act{rk, zc.data_ptr<float>(), da.data_ptr<float>(), want.dwu ? a.data_ptr<float>() : nullptr,
                      activation, static_cast<float>(scaling)};
      ResidualGemm dug{n, d, rk, da.data_ptr<float>(), rk, wd.data_ptr<float>(), d, 1,
                       residual_is_x ? dv.data_ptr<float>() : nullptr, d, nullptr, 1.0f, du.data_ptr<float>(), d};
      TORCH_INTERNAL_ASSERT(residual_gemm_chain(gemm, act_back_rows_hook, &act, dug));
    } else {
      TORCH_INTERNAL_ASSERT(residual_gemm(gemm));
    }
  }
  if (want.dbu) {
    dbu = tile_sums_total(col_sums, scaling);
    needs[4] = false;
  }
  std::vector<at::Tensor> grads;
  if (chain) {  // da is dz now
    needs[0] = false;
    grads = adapter_backward_from_dz_cpu(da, a, dv, u, z, w_down, b_down, w_up, b_up, activation, scaling,
                                         residual_is_x, std::move(needs));
    grads[0] = du;
  } else {
    grads = adapter_backward_from_da_cpu(da, dv, u, z, w_down, b_down, w_up, b_up, activation, scaling,
                                         residual_is_x, std::move(needs));
  }
  if (want.dbu) grads[4] = dbu;
  grads.insert(grads.begin(), dv);
  return grads;
#else
  return {};
#endif
}

std::vector<at::Tensor> adapter_layernorm_forward_cpu(const at::Tensor& h_in, const at::Tensor& r_in, const at::Tensor& w_down,
                                                      const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                      const c10::optional<at::Tensor>& b_up,
                                                      const c10::optional<at::Tensor>& ln_weight,
                                                      const c10::optional<at::Tensor>& ln_bias, int64_t placement,
                                                      double eps, int64_t activation, double scaling) {
  TORCH_CHECK(h_in.dim() == 2 && r_in.sizes() == h_in.sizes(), "fastadapter cpp: the site takes h and r [N, d]");
  TORCH_CHECK(placement >= 0 && placement <= 2, "fastadapter cpp: placement must be 0, 1 or 2, got ", placement);
  const int64_t n = h_in.size(0), d = h_in.size(1), rk = w_down.size(0);
  if (!site_kernels_run_here(h_in, rk) || r_in.scalar_type() != at::kFloat) return {};
#if FASTADAPTER_HAVE_AVX2_ROWS
  const at::Tensor h = unit_columns(h_in), r = unit_columns(r_in);
  const at::Tensor wd = w_down.to(at::kFloat).contiguous(), wu = w_up.to(at::kFloat).contiguous();
  const auto bd = fp32(b_down), bu = fp32(b_up), lw = fp32(ln_weight), lb = fp32(ln_bias);
  const auto opt = h.options();
  at::Tensor mean_t = at::empty({0}, opt), rstd_t = at::empty({0}, opt);
  at::Tensor t, u;
  if (placement == 2) {  // t = h + r and u = LN(t) by ATen: u feeds the down-projection
    t = at::add(h, r);
    auto ln = at::native_layer_norm(t, {d}, lw, lb, eps);
    u = std::get<0>(ln);
    mean_t = std::get<1>(ln).view(-1);
    rstd_t = std::get<2>(ln).view(-1);
  } else {
    u = placement == 0 ? h : r;
  }
  at::Tensor z = at::empty({n, rk}, opt), a = at::empty({n, rk}, opt);
  at::Tensor v = at::empty({n, d}, opt), out = at::empty({n, d}, opt);
  at::Tensor mean = at::empty({n}, opt), rstd = at::empty({n}, opt);
  if (n == 0) return {out, z, v, mean, rstd, mean_t, rstd_t};
  ResidualGemm down{n, rk, d, u.data_ptr<float>(), u.stride(0), wd.data_ptr<float>(), 1, d, nullptr, 0,
                    bd ? bd->data_ptr<float>() : nullptr, 1.0f, z.data_ptr<float>(), rk};
  LnRows ln{v.data_ptr<float>(), d, lw ? lw->data_ptr<float>() : nullptr, lb ? lb->data_ptr<float>() : nullptr,
            static_cast<float>(eps), d, out.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>()};
  const at::Tensor& base = placement == 2 ? t : h;
  ResidualGemm up{n, d, rk, a.data_ptr<float>(), rk, wu.data_ptr<float>(), 1, rk, base.data_ptr<float>(), base.stride(0),
                  bu ? bu->data_ptr<float>() : nullptr, static_cast<float>(scaling), v.data_ptr<float>(), d};
  if (placement != 2) {  // v = h + r + s * (...): r as the second residual
    up.r2 = r.data_ptr<float>();
    up.ldr2 = r.stride(0);
  }
  up.rows_done = ln_rows;
  up.ctx = &ln;
  site_forward_products(down, up, activation);
  return {out, z, v, mean, rstd, mean_t, rstd_t};
#else
  return {};
#endif
}

std::vector<at::Tensor> adapter_layernorm_backward_cpu(const at::Tensor& dout_in, const at::Tensor& u_in,
                                                       const at::Tensor& z, const at::Tensor& v_in,
                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                       const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                                                       const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                                                       const c10::optional<at::Tensor>& ln_weight, int64_t activation,
                                                       double scaling, bool residual_is_x, std::vector<bool> needs) {
  const BackwardNeeds want = backward_needs(needs, b_down.has_value(), b_up.has_value());
  TORCH_CHECK(dout_in.dim() == 2 && v_in.sizes() == dout_in.sizes() && u_in.sizes() == dout_in.sizes(),
              "fastadapter cpp: dout, u and v must be [N, d]");
  const int64_t n = dout_in.size(0), d = dout_in.size(1), rk = w_down.size(0);
  if (!want.dz || !site_kernels_run_here(u_in, rk) || dout_in.scalar_type() != at::kFloat || v_in.scalar_type() != at::kFloat)
    return {};
#if FASTADAPTER_HAVE_AVX2_ROWS
  const at::Tensor dout = unit_columns(dout_in), v = unit_columns(v_in);
  const at::Tensor mu = mean.to(at::kFloat).contiguous(), rs = rstd.to(at::kFloat).contiguous();
  const auto lw = fp32(ln_weight);
  at::Tensor dv = at::empty({n, d}, dout.options());
  const at::Tensor col_sums = tile_sums_buffer(n, d, want.dbu, dout.options());
  LnBackRows ln{dout.data_ptr<float>(), dout.stride(0), v.data_ptr<float>(), v.stride(0), mu.data_ptr<float>(),
                rs.data_ptr<float>(), lw ? lw->data_ptr<float>() : nullptr, d, dv.data_ptr<float>(),
                want.dbu ? col_sums.data_ptr<float>() : nullptr};
  return site_adapter_backward_cpu(ln_backward_hook, &ln, dv, col_sums, u_in, z, w_down, b_down, w_up, b_up, activation,
                                   scaling, residual_is_x, std::move(needs));
#else
  return {};
#endif
}

at::Tensor layernorm_backward_input_cpu(const at::Tensor& dout_in, const at::Tensor& v, const at::Tensor& mean,
                                        const at::Tensor& rstd, const c10::optional<at::Tensor>& ln_weight) {
  TORCH_CHECK(dout_in.dim() == 2 && v.sizes() == dout_in.sizes(), "fastadapter cpp: dout and v must be [N, d]");
  if (!(FASTADAPTER_HAVE_AVX2_ROWS && dout_in.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
        residual_gemm_available(true)))
    return at::Tensor();
#if FASTADAPTER_HAVE_AVX2_ROWS
  const at::Tensor dout = unit_columns(dout_in), vc = unit_columns(v);
  const at::Tensor mu = mean.to(at::kFloat).contiguous(), rs = rstd.to(at::kFloat).contiguous();
  const auto lw = fp32(ln_weight);
  const int64_t n = dout.size(0), d = dout.size(1);
  at::Tensor dv = at::empty({n, d}, dout.options());
  const float *gp = dout.data_ptr<float>(), *vp = vc.data_ptr<float>(), *mp = mu.data_ptr<float>();
  const float *rp = rs.data_ptr<float>(), *wp = lw ? lw->data_ptr<float>() : nullptr;
  float* op = dv.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    ln_backward_rows(b, e, d, gp, dout.stride(0), vp, vc.stride(0), mp, rp, wp, op, nullptr);
  });
  return dv;
#else
  return at::Tensor();
#endif
}

}  // namespace fastadapter
