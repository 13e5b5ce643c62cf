// A GEMM with its epilogue in one pass, fp32, on CPUs with AVX-512 or AVX2 (and FMA):
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

// Products with k or d below this (an adapter bottleneck r < 8) are left to ATen and MKL:
// residual_gemm returns false for them.
constexpr int64_t kResidualGemmMin = 8;

// Rows per tile of either kernel: the ranges the row prologue is called with.
constexpr int64_t kResidualGemmTileRows = 24;

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
  // Row maps (null: the identity): row i of the product reads row a_rows[i] of A and
  // r_rows[i] of R and writes row out_rows[i] of out. Rows of out must not repeat.
  const int64_t* a_rows = nullptr;
  const int64_t* r_rows = nullptr;
  const int64_t* out_rows = nullptr;
  // A second residual (null: none), [n, d] with row stride ldr2 and unit column stride,
  // no row map: out = (R + R2) + s * (A @ B + c), R + R2 rounded first.
  const float* r2 = nullptr;
  int64_t ldr2 = 0;
  // Called (from the worker threads, each range once) with product rows [row0, row1) as
  // soon as their rows of out are final, while they are still in cache: a row epilogue.
  void (*rows_done)(void* ctx, int64_t row0, int64_t row1) = nullptr;
  void* ctx = nullptr;
  // Called (from the worker threads, each range once) with product rows [row0, row1)
  // before the kernel reads those rows of A: a row prologue that may write them (the
  // site op forms rows of dv there, which the product then reads from cache). The
  // ranges are the kernel's tiles: row0 a multiple of kResidualGemmTileRows, and
  // row1 - row0 that many rows (fewer in the last).
  void (*rows_ready)(void* ctx, int64_t row0, int64_t row1) = nullptr;
  void* ready_ctx = nullptr;
};

// True when this CPU has AVX-512 and the cpp backend's AVX-512 kernels (this one and
// cpu_activation.h) are enabled.
bool avx512_kernels_available();

// True when this CPU has AVX2 and FMA and the AVX2 kernel is enabled.
bool avx2_kernels_available();

// The kernels are on unless turned off here; off, the callers use ATen ops (or, with
// AVX-512 off and AVX2 on, the AVX2 kernel). Each returns the previous setting.
bool set_avx512_kernels_enabled(bool enabled);
bool set_avx2_kernels_enabled(bool enabled);

// Whether residual_gemm runs here, for a product with row maps (or a second residual, or
// a row hook or prologue) or without. Products without run on AVX-512 where it is on, else on
// AVX2; those with them only where AVX2 is on (their callers' row hooks are AVX2 code), at
// the AVX-512 width where that is on too.
bool residual_gemm_available(bool row_maps);

// Computes the product and returns true, or returns false without touching out when
// residual_gemm_available() is false for it, or k or d is below kResidualGemmMin.
bool residual_gemm(const ResidualGemm& g);

// Two products over the same n rows through row pointers (AVX-512 where it is on), tile by tile: per tile of
// kResidualGemmTileRows rows the first product's rows, then between(ctx, row0, row1) (may
// be null), then the second's, so that the second reads the first's output (through
// between) and any rows the first read from cache, not memory. Returns false without
// touching either output where residual_gemm_available(true) is false, the row counts
// differ, or a k or d is below kResidualGemmMin.
bool residual_gemm_chain(const ResidualGemm& first, void (*between)(void* ctx, int64_t row0, int64_t row1), void* ctx,
                         const ResidualGemm& second);

}  // namespace fastadapter
