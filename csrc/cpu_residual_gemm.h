// A GEMM with its epilogue in one pass, fp32, on CPUs with AVX-512:
//
//   out[i, j] = R[i, j] + s * (sum_p A[i, p] * B[p, j] + c[j])
//
// for products whose B is an adapter weight (small: k x d with k or d equal to r).
// The cpp backend runs four of its six products with it: z = x W_down^T + b_down and
// da = dy W_up (k = d, N x r outputs, where MKL is slow), and y = x + s * (a W_up^T +
// b_up) and dx = dy + dz W_down (k = r). As ATen GEMMs the last two need R copied into
// the output first and the GEMM accumulating into it: one more full pass over an N x d
// tensor than the one R read and one out write this kernel makes.
#pragma once

#include <cstdint>

namespace fastadapter {

struct ResidualGemm {
  int64_t n, d, k;
  const float* a;          // [n, k], row stride lda, unit column stride
  int64_t lda;
  const float* b;          // element (p, j) at b[p * b_stride_k + j * b_stride_d]
  int64_t b_stride_k, b_stride_d;
  const float* r;          // [n, d], row stride ldr, unit column stride; null: no residual
  int64_t ldr;
  const float* c;          // [d]; null: no bias
  float s;
  float* out;              // [n, d], row stride ldo, unit column stride
  int64_t ldo;
};

// True when this CPU has AVX-512 and the cpp backend's AVX-512 kernels (this one and
// cpu_activation.h) are enabled.
bool avx512_kernels_available();

// The AVX-512 kernels are on unless turned off here; off, the callers use ATen ops.
// Returns the previous setting.
bool set_avx512_kernels_enabled(bool enabled);

// Computes the product and returns true, or returns false without touching out when
// avx512_kernels_available() is false or k < 1.
bool residual_gemm(const ResidualGemm& g);

}  // namespace fastadapter
