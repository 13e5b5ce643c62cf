// The weight-gradient product of an adapter's backward, fp32, on CPUs with AVX-512 or with
// AVX2 and FMA:
//
//   out = s * A^T B     (m x d),  or its transpose (d x m)
//
// a reduction over the N rows of A [N, m] (m = r: dz or a = act(z)) and B [N, d] (x or
// dy). dW_down = dz^T x is the first form; dW_up = s * dy^T a = (s * a^T dy)^T the second.
// The kernel packs both operands per block of rows and sums in registers. Threads split
// the columns, not N, so each output is the same sum whatever the thread count (MKL
// splits N by thread), and the same with either width. On a Zen 3 (AVX2), alone, it ran
// these products 5-20% faster than MKL; on a Zen 5 (AVX-512, where MKL takes its AVX2
// path) 2.2x-2.5x faster (benchmarks/RESULTS.md). Not measured against MKL's AVX-512 path
// on an Intel CPU.
#pragma once

#include <cstdint>

namespace fastadapter {

struct WeightGrad {
  int64_t n, m, d;
  const float* a;  // [n, m], row stride lda, unit column stride
  int64_t lda;
  const float* b;  // [n, d], row stride ldb, unit column stride
  int64_t ldb;
  float s;
  float* out;       // contiguous: [m, d], or [d, m] where transposed
  bool transposed;
  // Row maps (null: the identity): row p of the reduction reads row a_rows[p] of A and
  // b_rows[p] of B.
  const int64_t* a_rows = nullptr;
  const int64_t* b_rows = nullptr;
};

// Computes out and returns true (with AVX-512 where avx512_kernels_available(), else with
// AVX2); returns false without touching out where both are off or absent, or where m or d
// is below kResidualGemmMin (cpu_residual_gemm.h); the caller then uses ATen.
//
// Each output is one sum over N in a fixed order (running sums over blocks of kKc rows,
// then the blocks in order), whatever the number of threads: threads split the columns.
bool weight_grad(const WeightGrad& g);

}  // namespace fastadapter
