// The cpp backend's element-wise work on the N x r bottleneck, fp32, in one AVX-512 or
// AVX2 pass each way (cpu_activation.cpp). Vector exp / erf / tanh come from the SLEEF
// build inside libtorch; without them, without either kernel (cpu_residual_gemm.h), or
// for r < 8 (where a row's vectors would be mostly masked lanes and ATen's flat pass over
// the N x r tensor uses them all), the passes return false and the caller uses ATen ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastadapter {

// True when avx512_kernels_available() (cpu_residual_gemm.h) and this torch build exports
// the SLEEF functions the AVX-512 passes need; the same for AVX2.
bool activation_avx512_available();
bool activation_avx2_available();

// a[i, :r] = act(z[i, :r]) for i < n. Row strides ldz, lda. AVX-512 where it is
// available, else AVX2.
bool activation_forward_pass(int64_t n, int64_t r, const float* z, int64_t ldz, float* a, int64_t lda, int64_t act);

// One pass over the rows of z and da (= dy @ W_up):
//   a (may be null):   a[i, :r] = act(z[i, :r]), for the dW_up GEMM;
//   dz (may be null):  dz[i, :] = s * da[i, :] * act'(z[i, :]), in place when dz == da.
bool activation_backward_pass(int64_t n, int64_t r, const float* z, int64_t ldz, const float* da, int64_t ldda, int64_t act,
                              float s, float* a, int64_t lda, float* dz, int64_t lddz);

// The passes' work on rows [i0, i1) alone, on the calling thread, for a caller that runs
// it between two products tile by tile (residual_gemm_chain, cpu_residual_gemm.h): only
// where activation_rows_available(r), which is where the passes above run.
bool activation_rows_available(int64_t r);
void activation_forward_rows(int64_t i0, int64_t i1, int64_t r, const float* z, int64_t ldz, float* a, int64_t lda,
                             int64_t act);
void activation_backward_rows(int64_t i0, int64_t i1, int64_t r, const float* z, int64_t ldz, const float* da, int64_t ldda,
                              int64_t act, float s, float* a, int64_t lda, float* dz, int64_t lddz);

// The same as ATen ops, for any dtype and where the passes above do not run:
// a = act(z) into a; and grad * act'(z).
void activation_out_aten(at::Tensor& a, const at::Tensor& z, int64_t activation);
at::Tensor activation_backward_aten(const at::Tensor& grad, const at::Tensor& z, int64_t activation);

}  // namespace fastadapter
