// The decoder site on the CPU, fp32 (see adapter_rmsnorm_cpu.h):
//   forward:  z = u W_d^T + b_d; a = act(z);
//             y = h + r + s * (a W_u^T + b_u) by the row kernel of cpu_residual_gemm.h (AVX-512
//             products where they run, else AVX2) with both residuals in its epilogue (t + s * (...) for pfeiffer, t = h + r), and as each micro-row of y
//             is final, still in L1, its RMSNorm: rstd and y_normed. The steps run tile by
//             tile (site_forward_products): h and r read once, y and y_normed written once.
//   backward: dv = dy + RMSNorm'(dn) formed tile by tile in the prologue of the da = dv W_up
//             product, which reads those rows from cache, with db_up's per-tile sums; dz and
//             du = dv + dz W_d in the same tiles; then the weight gradients
//             (site_adapter_backward_cpu). The norm weight's gradient is the caller's.

#include "adapter_rmsnorm_cpu.h"

#include <cmath>

#include "adapter_cpu.h"
#include "adapter_layernorm_cpu.h"
#include "cpu_avx2.h"
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

// sum of x[j]^2 over [0, full), full a multiple of 8, in four accumulator chains
FA_AVX2 inline float row_sum_sq(const float* x, int64_t full) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t j = 0;
  for (; j + 32 <= full; j += 32) {
    const __m256 t0 = _mm256_loadu_ps(x + j), t1 = _mm256_loadu_ps(x + j + 8);
    const __m256 t2 = _mm256_loadu_ps(x + j + 16), t3 = _mm256_loadu_ps(x + j + 24);
    s0 = _mm256_fmadd_ps(t0, t0, s0);
    s1 = _mm256_fmadd_ps(t1, t1, s1);
    s2 = _mm256_fmadd_ps(t2, t2, s2);
    s3 = _mm256_fmadd_ps(t3, t3, s3);
  }
  for (; j < full; j += 8) {
    const __m256 t = _mm256_loadu_ps(x + j);
    s0 = _mm256_fmadd_ps(t, t, s0);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// The RMSNorm of rows of y: the up-projection's row hook.
struct RmsRows {
  const float* y;
  int64_t d;
  const float* w;  // null: 1
  float eps;
  float* out;
  float* rstd;
};

FA_AVX2 void rms_rows(void* ctx, int64_t row0, int64_t row1) {
  const RmsRows& c = *static_cast<const RmsRows*>(ctx);
  const int64_t d = c.d, full = d - d % 8;
  for (int64_t i = row0; i < row1; ++i) {
    const float* x = c.y + i * d;
    float* o = c.out + i * d;
    float ss = row_sum_sq(x, full);
    for (int64_t j = full; j < d; ++j) ss += x[j] * x[j];
    const float rs = 1.0f / std::sqrt(ss / static_cast<float>(d) + c.eps);
    const __m256 vrs = _mm256_set1_ps(rs);
    if (c.w) {
      for (int64_t j = 0; j < full; j += 8)
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(c.w + j), _mm256_mul_ps(_mm256_loadu_ps(x + j), vrs)));
    } else {
      for (int64_t j = 0; j < full; j += 8) _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), vrs));
    }
    for (int64_t j = full; j < d; ++j) o[j] = (c.w ? c.w[j] : 1.0f) * (x[j] * rs);
    c.rstd[i] = rs;
  }
}

// The RMSNorm backward of rows, plus dy: the da product's row prologue.
struct RmsBackRows {
  const float* dy;  // null: y reached the loss only through y_normed
  int64_t ldy;
  const float* dn;
  int64_t ldn;
  const float* y;
  int64_t ldyv;
  const float* rstd;
  const float* w;  // null: 1
  int64_t d;
  float* dv;
  float* col_sums;  // null: none; else per tile of the product, the sums of its rows of dv
};

FA_AVX2 void rms_backward_hook(void* ctx, int64_t row0, int64_t row1) {
  const RmsBackRows& c = *static_cast<const RmsBackRows*>(ctx);
  const int64_t d = c.d, full = d - d % 8;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = row0; i < row1; ++i) {
    const float *g = c.dn + i * c.ldn, *x = c.y + i * c.ldyv, *gy = c.dy ? c.dy + i * c.ldy : nullptr;
    float* o = c.dv + i * d;
    float* cs = c.col_sums ? c.col_sums + (i / kResidualGemmTileRows) * d : nullptr;
    const float rs = c.rstd[i];
    const __m256 vrs = _mm256_set1_ps(rs);
    // sum of g * w * y_hat, two accumulator chains
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t j = 0;
    for (; j + 16 <= full; j += 16) {
      const __m256 w0 = c.w ? _mm256_loadu_ps(c.w + j) : one, w1 = c.w ? _mm256_loadu_ps(c.w + j + 8) : one;
      s0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(g + j), w0), _mm256_loadu_ps(x + j), s0);
      s1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(g + j + 8), w1), _mm256_loadu_ps(x + j + 8), s1);
    }
    if (j < full) {
      const __m256 w0 = c.w ? _mm256_loadu_ps(c.w + j) : one;
      s0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(g + j), w0), _mm256_loadu_ps(x + j), s0);
    }
    float b = hsum(_mm256_add_ps(s0, s1));
    for (int64_t k = full; k < d; ++k) b += g[k] * (c.w ? c.w[k] : 1.0f) * x[k];
    b *= rs / static_cast<float>(d);  // mean(g * w * y_hat), y_hat = y * rs
    // dv = dy + rs * (g * w - y * rs * b)
    const __m256 vb = _mm256_set1_ps(rs * b);
    for (int64_t k = 0; k < full; k += 8) {
      const __m256 gw = _mm256_mul_ps(_mm256_loadu_ps(g + k), c.w ? _mm256_loadu_ps(c.w + k) : one);
      __m256 dvk = _mm256_mul_ps(vrs, _mm256_fnmadd_ps(_mm256_loadu_ps(x + k), vb, gw));
      if (gy) dvk = _mm256_add_ps(_mm256_loadu_ps(gy + k), dvk);
      _mm256_storeu_ps(o + k, dvk);
      if (cs) _mm256_storeu_ps(cs + k, _mm256_add_ps(_mm256_loadu_ps(cs + k), dvk));
    }
    for (int64_t k = full; k < d; ++k) {
      float dvk = rs * (g[k] * (c.w ? c.w[k] : 1.0f) - x[k] * (rs * b));
      if (gy) dvk += gy[k];
      o[k] = dvk;
      if (cs) cs[k] += dvk;
    }
  }
}

#endif  // FASTADAPTER_HAVE_AVX2_ROWS

}  // namespace

std::vector<at::Tensor> adapter_rmsnorm_forward_cpu(const at::Tensor& h_in, const at::Tensor& r_in, const at::Tensor& w_down,
                                                    const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                    const c10::optional<at::Tensor>& b_up,
                                                    const c10::optional<at::Tensor>& norm_weight, int64_t placement,
                                                    double eps, int64_t activation, double scaling) {
  TORCH_CHECK(h_in.dim() == 2 && r_in.sizes() == h_in.sizes(), "fastadapter cpp: the decoder site takes h and r [N, d]");
  TORCH_CHECK(placement >= 0 && placement <= 2, "fastadapter cpp: placement must be 0, 1 or 2, got ", placement);
  const int64_t n = h_in.size(0), d = h_in.size(1), rk = w_down.size(0);
  if (!site_kernels_run_here(h_in, rk) || r_in.scalar_type() != at::kFloat) return {};
#if FASTADAPTER_HAVE_AVX2_ROWS
  const at::Tensor h = unit_columns(h_in), r = unit_columns(r_in);
  const at::Tensor wd = w_down.to(at::kFloat).contiguous(), wu = w_up.to(at::kFloat).contiguous();
  const auto bd = fp32(b_down), bu = fp32(b_up), nw = fp32(norm_weight);
  const auto opt = h.options();
  const at::Tensor t = placement == 2 ? at::add(h, r) : at::Tensor();  // pfeiffer: u = t = h + r
  const at::Tensor& u = placement == 0 ? h : (placement == 1 ? r : t);
  at::Tensor z = at::empty({n, rk}, opt), a = at::empty({n, rk}, opt);
  at::Tensor y = at::empty({n, d}, opt), y_normed = at::empty({n, d}, opt), rstd = at::empty({n}, opt);
  if (n == 0) return {y, y_normed, z, rstd};
  ResidualGemm down{n, rk, d, u.data_ptr<float>(), u.stride(0), wd.data_ptr<float>(), 1, d, nullptr, 0,
                    bd ? bd->data_ptr<float>() : nullptr, 1.0f, z.data_ptr<float>(), rk};
  const at::Tensor& base = placement == 2 ? t : h;
  ResidualGemm up{n, d, rk, a.data_ptr<float>(), rk, wu.data_ptr<float>(), 1, rk, base.data_ptr<float>(), base.stride(0),
                  bu ? bu->data_ptr<float>() : nullptr, static_cast<float>(scaling), y.data_ptr<float>(), d};
  if (placement != 2) {  // y = h + r + s * (...): r as the second residual
    up.r2 = r.data_ptr<float>();
    up.ldr2 = r.stride(0);
  }
  RmsRows rms{y.data_ptr<float>(), d, nw ? nw->data_ptr<float>() : nullptr, static_cast<float>(eps),
              y_normed.data_ptr<float>(), rstd.data_ptr<float>()};
  up.rows_done = rms_rows;
  up.ctx = &rms;
  site_forward_products(down, up, activation);
  return {y, y_normed, z, rstd};
#else
  return {};
#endif
}

std::vector<at::Tensor> adapter_rmsnorm_backward_cpu(const at::Tensor& dy_in, const at::Tensor& dn_in, const at::Tensor& u,
                                                     const at::Tensor& y_in, const at::Tensor& z, const at::Tensor& rstd,
                                                     const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                                                     const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                                                     const c10::optional<at::Tensor>& norm_weight, int64_t activation,
                                                     double scaling, std::vector<bool> needs) {
  const BackwardNeeds want = backward_needs(needs, b_down.has_value(), b_up.has_value());
  TORCH_CHECK(y_in.dim() == 2 && u.sizes() == y_in.sizes(), "fastadapter cpp: u and y must be [N, d]");
  const bool has_dy = dy_in.dim() == 2;
  TORCH_CHECK(dn_in.dim() != 2 || dn_in.sizes() == y_in.sizes(), "fastadapter cpp: dn must be y's shape or empty");
  TORCH_CHECK(!has_dy || dy_in.sizes() == y_in.sizes(), "fastadapter cpp: dy must be y's shape or empty");
  const int64_t n = y_in.size(0), d = y_in.size(1), rk = w_down.size(0);
  if (!want.dz || dn_in.dim() != 2 || !site_kernels_run_here(u, rk) || y_in.scalar_type() != at::kFloat ||
      dn_in.scalar_type() != at::kFloat || (has_dy && dy_in.scalar_type() != at::kFloat))
    return {};
#if FASTADAPTER_HAVE_AVX2_ROWS
  const at::Tensor dn = unit_columns(dn_in), y = unit_columns(y_in);
  const at::Tensor dy = has_dy ? unit_columns(dy_in) : at::Tensor();
  const at::Tensor rs = rstd.to(at::kFloat).contiguous();
  const auto nw = fp32(norm_weight);
  at::Tensor dv = at::empty({n, d}, y.options());
  const at::Tensor col_sums = tile_sums_buffer(n, d, want.dbu, y.options());
  RmsBackRows rms{has_dy ? dy.data_ptr<float>() : nullptr, has_dy ? dy.stride(0) : 0, dn.data_ptr<float>(), dn.stride(0),
                  y.data_ptr<float>(), y.stride(0), rs.data_ptr<float>(), nw ? nw->data_ptr<float>() : nullptr, d,
                  dv.data_ptr<float>(), want.dbu ? col_sums.data_ptr<float>() : nullptr};
  return site_adapter_backward_cpu(rms_backward_hook, &rms, dv, col_sums, u, z, w_down, b_down, w_up, b_up, activation,
                                   scaling, true, std::move(needs));
#else
  return {};
#endif
}

}  // namespace fastadapter
