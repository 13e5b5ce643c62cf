// Helpers shared by the cpp backend's AVX2 kernels (cpu_residual_gemm.cpp,
// cpu_activation.cpp, cpu_weight_grad.cpp), each compiled by function attribute.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace fastadapter {

// lanes [0, n) of 8 set: the mask of the masked loads and stores of a row's last vector
__attribute__((target("avx2,fma"))) inline __m256i lanes8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

}  // namespace fastadapter
#endif

namespace fastadapter {

// row i of an operand: through its row map where there is one (null: the identity)
inline int64_t mapped_row(const int64_t* map, int64_t i) { return map ? map[i] : i; }

}  // namespace fastadapter
