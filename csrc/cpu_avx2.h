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

// 8 floats at p, or with Masked only the lanes of m (the others read as 0 and left
// unwritten): plain loads and stores for whole vectors (a masked store is slow on Zen),
// a mask for a row's last partial one
// the sum of the 8 lanes of v
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool Masked>
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p, __m256i m) {
  if constexpr (Masked) return _mm256_maskload_ps(p, m);
  else return _mm256_loadu_ps(p);
}

template <bool Masked>
__attribute__((target("avx2,fma"))) inline void store8(float* p, __m256i m, __m256 v) {
  if constexpr (Masked) _mm256_maskstore_ps(p, m, v);
  else _mm256_storeu_ps(p, v);
}

}  // namespace fastadapter
#endif

namespace fastadapter {

// row i of an operand: through its row map where there is one (null: the identity)
inline int64_t mapped_row(const int64_t* map, int64_t i) { return map ? map[i] : i; }

}  // namespace fastadapter
