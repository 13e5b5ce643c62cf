// AVX-512 and AVX2 passes over the bottleneck activations (see cpu_activation.h).
//
// The formulas are ATen's, term for term (GeluKernel.cpp and friends), so the results
// agree with at::gelu / at::gelu_backward to a few ulp; NaN passes the same way.
// Compiled by function attribute and chosen at run time, like cpu_residual_gemm.cpp.

#include "cpu_activation.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "adapter_cpu.h"
#include "cpu_avx2.h"
#include "cpu_residual_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTADAPTER_HAVE_AVX512_KERNEL 1
#include <immintrin.h>
#define FA_AVX512 __attribute__((target("avx512f")))
#define FA_AVX2 __attribute__((target("avx2,fma")))
// SLEEF's AVX-512 and AVX2 functions, exported by libtorch_cpu on x86-64 Linux wheels.
// Weak: a torch without them leaves these null and the callers take the ATen path.
extern "C" {
FA_AVX512 __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
FA_AVX512 __m512 Sleef_erff16_u10(__m512) __attribute__((weak));
FA_AVX512 __m512 Sleef_tanhf16_u10(__m512) __attribute__((weak));
FA_AVX2 __m256 Sleef_expf8_u10avx2(__m256) __attribute__((weak));
FA_AVX2 __m256 Sleef_tanhf8_u10avx2(__m256) __attribute__((weak));
}
#else
#define FASTADAPTER_HAVE_AVX512_KERNEL 0
#endif

namespace fastadapter {
namespace {

constexpr int64_t kTileRows = 64;  // rows per parallel task

int64_t tiles(int64_t n) { return (n + kTileRows - 1) / kTileRows; }

#if FASTADAPTER_HAVE_AVX512_KERNEL

bool available() {
  static const bool sleef = Sleef_expf16_u10 != nullptr && Sleef_erff16_u10 != nullptr && Sleef_tanhf16_u10 != nullptr;
  return sleef && avx512_kernels_available();
}

// act(z) and act'(z) for 16 lanes
struct ActDeriv {
  __m512 value, deriv;
};

FA_AVX512 inline ActDeriv act_and_deriv(__m512 z, Activation act, bool want_value, bool want_deriv) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  ActDeriv r{zero, zero};
  switch (act) {
    case Activation::Relu: {
      r.value = _mm512_max_ps(zero, z);  // max(0, NaN) is NaN, like torch.relu
      // 1 where not z <= 0, NaN included: ATen's threshold_backward passes the gradient there
      r.deriv = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, zero, _CMP_NLE_UQ), zero, one);
      break;
    }
    case Activation::Gelu: {
      const __m512 cdf = _mm512_mul_ps(half, _mm512_add_ps(one, Sleef_erff16_u10(_mm512_mul_ps(z, _mm512_set1_ps(M_SQRT1_2)))));
      if (want_value) r.value = _mm512_mul_ps(z, cdf);
      if (want_deriv) {
        const float beta = M_2_SQRTPI * M_SQRT1_2 * 0.5;  // 1 / sqrt(2 pi)
        const __m512 pdf = _mm512_mul_ps(Sleef_expf16_u10(_mm512_mul_ps(_mm512_set1_ps(-0.5f), _mm512_mul_ps(z, z))),
                                         _mm512_set1_ps(beta));
        r.deriv = _mm512_fmadd_ps(z, pdf, cdf);
      }
      break;
    }
    case Activation::GeluTanh: {
      const float beta = M_SQRT2 * M_2_SQRTPI * 0.5, kappa = 0.044715f;
      const __m512 z2 = _mm512_mul_ps(z, z);
      const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_fmadd_ps(_mm512_set1_ps(kappa), _mm512_mul_ps(z2, z), z));
      const __m512 t = Sleef_tanhf16_u10(inner);
      const __m512 left = _mm512_mul_ps(half, z), right = _mm512_add_ps(one, t);
      if (want_value) r.value = _mm512_mul_ps(left, right);
      if (want_deriv) {
        const __m512 left_d = _mm512_mul_ps(half, right);
        const __m512 inner_d = _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_fmadd_ps(_mm512_set1_ps(3.0f * kappa), z2, one));
        const __m512 right_d = _mm512_mul_ps(_mm512_mul_ps(left, _mm512_fnmadd_ps(t, t, one)), inner_d);
        r.deriv = _mm512_add_ps(left_d, right_d);
      }
      break;
    }
    case Activation::Silu: {
      const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_sub_ps(zero, z))));
      if (want_value) r.value = _mm512_mul_ps(z, sig);
      if (want_deriv) r.deriv = _mm512_mul_ps(sig, _mm512_fmadd_ps(z, _mm512_sub_ps(one, sig), one));
      break;
    }
    case Activation::Tanh: {
      const __m512 t = Sleef_tanhf16_u10(z);
      r.value = t;
      r.deriv = _mm512_fnmadd_ps(t, t, one);
      break;
    }
    case Activation::Identity: {
      r.value = z;
      r.deriv = one;
      break;
    }
  }
  return r;
}

inline __mmask16 tail_mask(int64_t cols) { return static_cast<__mmask16>((1u << cols) - 1u); }

FA_AVX512 void forward_rows(int64_t i0, int64_t i1, int64_t r, const float* z, int64_t ldz, float* a, int64_t lda,
                            Activation act) {
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = 0; j < r; j += 16) {
      const __mmask16 m = r - j >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(r - j);
      const __m512 zv = _mm512_maskz_loadu_ps(m, z + i * ldz + j);
      _mm512_mask_storeu_ps(a + i * lda + j, m, act_and_deriv(zv, act, true, false).value);
    }
  }
}

FA_AVX512 void backward_rows(int64_t i0, int64_t i1, int64_t r, const float* z, int64_t ldz, const float* da, int64_t ldda,
                             Activation act, float s, float* a, int64_t lda, float* dz, int64_t lddz) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = 0; j < r; j += 16) {
      const __mmask16 m = r - j >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(r - j);
      const __m512 zv = _mm512_maskz_loadu_ps(m, z + i * ldz + j);
      const ActDeriv v = act_and_deriv(zv, act, a != nullptr, dz != nullptr);
      if (a) _mm512_mask_storeu_ps(a + i * lda + j, m, v.value);
      if (dz) {
        const __m512 g = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, da + i * ldda + j), v.deriv), vs);
        _mm512_mask_storeu_ps(dz + i * lddz + j, m, g);
      }
    }
  }
}

// ---------------------------------------------------------------------------- AVX2: the same, 8 lanes

bool available_avx2() {
  static const bool sleef =
      Sleef_expf8_u10avx2 != nullptr && Sleef_tanhf8_u10avx2 != nullptr;
  return sleef && avx2_kernels_available();
}

struct ActDeriv8 {
  __m256 value, deriv;
};

// erf(x) by the formula of ATen's AVX2 Vectorized<float>::erf: Abramowitz and Stegun
// 7.1.26, sign(x) * (1 - t * P(t) * exp(-x^2)) with t = 1 / (1 + p|x|), absolute error
// below 1.5e-7, and exp(-x^2) returned in e, which the GELU's derivative needs too: one
// exponential per lane for both, in place of SLEEF's erf and a second exp. The GELU's
// error stays eager's: 4.7e-7 at most and 5.9e-8 on average over [-9, 9] against 3.8e-7
// and 5.6e-8 for at::gelu, and the same for its derivative.
FA_AVX2 inline __m256 erf8(__m256 x, __m256& e) {
  const __m256 neg_zero = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_and_ps(neg_zero, x), ax = _mm256_xor_ps(sign, x);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, one));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  e = Sleef_expf8_u10avx2(_mm256_xor_ps(neg_zero, _mm256_mul_ps(x, x)));
  return _mm256_xor_ps(sign, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_xor_ps(neg_zero, e), t), p, one));
}

FA_AVX2 inline ActDeriv8 act_and_deriv8(__m256 z, Activation act, bool want_value, bool want_deriv) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  ActDeriv8 r{zero, zero};
  switch (act) {
    case Activation::Relu: {
      // max(0, z) with z second: NaN passes, like torch.relu
      r.value = _mm256_max_ps(zero, z);
      r.deriv = _mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_NLE_UQ), one);  // NaN: 1, as ATen
      break;
    }
    case Activation::Gelu: {
      __m256 e;  // exp(-z^2 / 2), from the erf
      const __m256 cdf = _mm256_mul_ps(half, _mm256_add_ps(one, erf8(_mm256_mul_ps(z, _mm256_set1_ps(M_SQRT1_2)), e)));
      if (want_value) r.value = _mm256_mul_ps(z, cdf);
      if (want_deriv) {
        const float beta = M_2_SQRTPI * M_SQRT1_2 * 0.5;  // 1 / sqrt(2 pi)
        r.deriv = _mm256_fmadd_ps(z, _mm256_mul_ps(e, _mm256_set1_ps(beta)), cdf);
      }
      break;
    }
    case Activation::GeluTanh: {
      const float beta = M_SQRT2 * M_2_SQRTPI * 0.5, kappa = 0.044715f;
      const __m256 z2 = _mm256_mul_ps(z, z);
      const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(beta), _mm256_fmadd_ps(_mm256_set1_ps(kappa), _mm256_mul_ps(z2, z), z));
      const __m256 t = Sleef_tanhf8_u10avx2(inner);
      const __m256 left = _mm256_mul_ps(half, z), right = _mm256_add_ps(one, t);
      if (want_value) r.value = _mm256_mul_ps(left, right);
      if (want_deriv) {
        const __m256 left_d = _mm256_mul_ps(half, right);
        const __m256 inner_d = _mm256_mul_ps(_mm256_set1_ps(beta), _mm256_fmadd_ps(_mm256_set1_ps(3.0f * kappa), z2, one));
        const __m256 right_d = _mm256_mul_ps(_mm256_mul_ps(left, _mm256_fnmadd_ps(t, t, one)), inner_d);
        r.deriv = _mm256_add_ps(left_d, right_d);
      }
      break;
    }
    case Activation::Silu: {
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, Sleef_expf8_u10avx2(_mm256_sub_ps(zero, z))));
      if (want_value) r.value = _mm256_mul_ps(z, sig);
      if (want_deriv) r.deriv = _mm256_mul_ps(sig, _mm256_fmadd_ps(z, _mm256_sub_ps(one, sig), one));
      break;
    }
    case Activation::Tanh: {
      const __m256 t = Sleef_tanhf8_u10avx2(z);
      r.value = t;
      r.deriv = _mm256_fnmadd_ps(t, t, one);
      break;
    }
    case Activation::Identity: {
      r.value = z;
      r.deriv = one;
      break;
    }
  }
  return r;
}


// One vector of a row: a = act(z) (a not null) and dz = s * da * act'(z) (dz not null), at
// the row's offset; Masked for its last partial vector (load8, store8)
template <bool Masked>
FA_AVX2 inline void rows8_vector(const float* z, const float* da, float* a, float* dz, __m256i m, Activation act,
                                 __m256 vs) {
  const ActDeriv8 v = act_and_deriv8(load8<Masked>(z, m), act, a != nullptr, dz != nullptr);
  if (a) store8<Masked>(a, m, v.value);
  if (dz) store8<Masked>(dz, m, _mm256_mul_ps(_mm256_mul_ps(load8<Masked>(da, m), v.deriv), vs));
}

FA_AVX2 void backward_rows8(int64_t i0, int64_t i1, int64_t r, const float* z, int64_t ldz, const float* da, int64_t ldda,
                            Activation act, float s, float* a, int64_t lda, float* dz, int64_t lddz) {
  const __m256 vs = _mm256_set1_ps(s);
  const int64_t full = r - r % 8;
  const __m256i tail = lanes8(r - full);
  for (int64_t i = i0; i < i1; ++i) {
    const float *zi = z + i * ldz, *dai = dz ? da + i * ldda : nullptr;
    float *ai = a ? a + i * lda : nullptr, *dzi = dz ? dz + i * lddz : nullptr;
    for (int64_t j = 0; j < full; j += 8)
      rows8_vector<false>(zi + j, dz ? dai + j : nullptr, a ? ai + j : nullptr, dz ? dzi + j : nullptr, tail, act, vs);
    if (full < r)
      rows8_vector<true>(zi + full, dz ? dai + full : nullptr, a ? ai + full : nullptr, dz ? dzi + full : nullptr, tail,
                         act, vs);
  }
}

FA_AVX2 void forward_rows8(int64_t i0, int64_t i1, int64_t r, const float* z, int64_t ldz, float* a, int64_t lda,
                           Activation act) {
  const int64_t full = r - r % 8;
  const __m256i tail = lanes8(r - full);
  const __m256 unused = _mm256_setzero_ps();
  for (int64_t i = i0; i < i1; ++i) {
    const float* zi = z + i * ldz;
    float* ai = a + i * lda;
    for (int64_t j = 0; j < full; j += 8) rows8_vector<false>(zi + j, nullptr, ai + j, nullptr, tail, act, unused);
    if (full < r) rows8_vector<true>(zi + full, nullptr, ai + full, nullptr, tail, act, unused);
  }
}

#endif  // FASTADAPTER_HAVE_AVX512_KERNEL

}  // namespace

bool activation_avx512_available() {
#if FASTADAPTER_HAVE_AVX512_KERNEL
  return available();
#else
  return false;
#endif
}

bool activation_avx2_available() {
#if FASTADAPTER_HAVE_AVX512_KERNEL
  return available_avx2();
#else
  return false;
#endif
}

bool activation_rows_available(int64_t r) {
#if FASTADAPTER_HAVE_AVX512_KERNEL
  return r >= kResidualGemmMin && (available() || available_avx2());
#else
  return false;
#endif
}

void activation_forward_rows(int64_t i0, int64_t i1, int64_t r, const float* z, int64_t ldz, float* a, int64_t lda,
                             int64_t act) {
#if FASTADAPTER_HAVE_AVX512_KERNEL
  if (available()) forward_rows(i0, i1, r, z, ldz, a, lda, static_cast<Activation>(act));
  else forward_rows8(i0, i1, r, z, ldz, a, lda, static_cast<Activation>(act));
#endif
}

void activation_backward_rows(int64_t i0, int64_t i1, int64_t r, const float* z, int64_t ldz, const float* da, int64_t ldda,
                              int64_t act, float s, float* a, int64_t lda, float* dz, int64_t lddz) {
#if FASTADAPTER_HAVE_AVX512_KERNEL
  if (available()) backward_rows(i0, i1, r, z, ldz, da, ldda, static_cast<Activation>(act), s, a, lda, dz, lddz);
  else backward_rows8(i0, i1, r, z, ldz, da, ldda, static_cast<Activation>(act), s, a, lda, dz, lddz);
#endif
}

bool activation_forward_pass(int64_t n, int64_t r, const float* z, int64_t ldz, float* a, int64_t lda, int64_t act) {
  if (!activation_rows_available(r)) return false;
  at::parallel_for(0, tiles(n), 16, [&](int64_t t0, int64_t t1) {
    activation_forward_rows(t0 * kTileRows, std::min(n, t1 * kTileRows), r, z, ldz, a, lda, act);
  });
  return true;
}

bool activation_backward_pass(int64_t n, int64_t r, const float* z, int64_t ldz, const float* da, int64_t ldda, int64_t act,
                              float s, float* a, int64_t lda, float* dz, int64_t lddz) {
  if (!activation_rows_available(r)) return false;
  at::parallel_for(0, tiles(n), 16, [&](int64_t t0, int64_t t1) {
    activation_backward_rows(t0 * kTileRows, std::min(n, t1 * kTileRows), r, z, ldz, da, ldda, act, s, a, lda, dz, lddz);
  });
  return true;
}

void activation_out_aten(at::Tensor& a, const at::Tensor& z, int64_t activation) {
  switch (static_cast<Activation>(activation)) {
    case Activation::Relu: at::relu_out(a, z); break;  // NaN passes, like torch.relu
    case Activation::Gelu: at::gelu_out(a, z, "none"); break;
    case Activation::GeluTanh: at::gelu_out(a, z, "tanh"); break;
    case Activation::Silu: at::silu_out(a, z); break;
    case Activation::Tanh: at::tanh_out(a, z); break;
    case Activation::Identity: a.copy_(z); break;
  }
}

at::Tensor activation_backward_aten(const at::Tensor& grad, const at::Tensor& z, int64_t activation) {
  switch (static_cast<Activation>(activation)) {
    case Activation::Relu: return at::threshold_backward(grad, z, 0);
    case Activation::Gelu: return at::gelu_backward(grad, z, "none");
    case Activation::GeluTanh: return at::gelu_backward(grad, z, "tanh");
    case Activation::Silu: return at::silu_backward(grad, z);
    case Activation::Tanh: return at::tanh_backward(grad, at::tanh(z));
    case Activation::Identity: return grad;
  }
  return grad;
}

}  // namespace fastadapter
