// AVX-512 and AVX2 kernels for out = R + s * (A @ B + c) (see cpu_residual_gemm.h).
//
// B (k x d, the adapter's weight) is packed once per call into column blocks of 64 (AVX-512)
// or 16 (AVX2), k x width floats each and contiguous, zero-padded past d. Rows go in tiles of
// 24, handed to threads one at a time. Inside a tile the order is the micro-row's: 6 rows
// sweep all of d before the next 6 (for k <= kKc in one call), so that R and out stream
// along 6 rows at a time and A's 6 rows stay in L1 (B's blocks come from L2); the micro-tile
// is 6 x 64 with AVX-512 (24 zmm accumulators, 4 loads of B and 6 broadcasts of A per step
// of p) and 6 x 16 with AVX2 (12 ymm accumulators, 2 loads and 6 broadcasts). R, R2 and c
// are read in the epilogue while the micro-tile is still in registers. For k > kKc each
// micro-tile's k-blocks of kKc are summed in registers and added in order in a 6 x width
// buffer, then the same epilogue (the rounding error grows with kKc plus the number of
// blocks, not with k). Both widths form each output from the same sums in the same order:
// they give the same bits.
//
// Rows are reached through row pointers, so the same code serves the products whose rows
// are gathered or scattered through row maps (the mixed-adapter op) and those with a
// second residual, a row hook or a prologue (the site ops); those run only where AVX2 is
// on, since their callers' hooks are AVX2 code. On a Zen 3 the micro-row order ran about
// 30% faster than a 24-row order with a tile buffer per k-block; on a Zen 5 (AVX-512) the
// two were within 4% of each other, the micro-row order ahead in fwd+bwd
// (benchmarks/RESULTS.md), and the 24-row kernel was dropped.
//
// Each is compiled by function attribute and chosen at run time, so a build without
// -march=native still has both and a CPU never runs instructions it lacks.

#include "cpu_residual_gemm.h"
#include "cpu_avx2.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTADAPTER_HAVE_AVX512_KERNEL 1
#include <immintrin.h>
#define FA_AVX512 __attribute__((target("avx512f"), noinline))
#define FA_AVX512_INLINE __attribute__((target("avx512f")))
#define FA_AVX2 __attribute__((target("avx2,fma"), noinline))
#define FA_AVX2_INLINE __attribute__((target("avx2,fma")))
#else
#define FASTADAPTER_HAVE_AVX512_KERNEL 0
#endif

namespace fastadapter {
namespace {

// Products with k or d below kResidualGemmMin (a bottleneck r < 8) are left to ATen and
// MKL: a micro-tile would be mostly masked lanes (d = r) or a handful of FMAs per output
// (k = r), and MKL's matrix-vector kernel (r = 1) sums in partial sums, more accurately
// than one running sum per output.

std::atomic<bool> g_enabled{true};       // the AVX-512 kernel
std::atomic<bool> g_avx2_enabled{true};  // the AVX2 kernel

#if FASTADAPTER_HAVE_AVX512_KERNEL

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// B as column blocks [ceil(d / width)][k][width], zero past d, in a buffer kept per
// calling thread and slot (grown when needed), so that a call allocates nothing; a chain
// of two products packs both, in slots 0 and 1.
const float* pack_b(const ResidualGemm& g, int64_t width, int slot = 0) {
  static thread_local std::vector<float> buffers[2];
  std::vector<float>& packed = buffers[slot];
  const int64_t blocks = (g.d + width - 1) / width;
  const size_t size = static_cast<size_t>(blocks * g.k * width);
  if (packed.size() < size) packed.resize(size);
  std::fill(packed.begin(), packed.begin() + size, 0.0f);
  float* base = packed.data();  // the lambda runs on other threads, which have their own `packed`
  at::parallel_for(0, blocks, 1, [&](int64_t jb0, int64_t jb1) {
    for (int64_t jb = jb0; jb < jb1; ++jb) {
      const int64_t cols = std::min(width, g.d - jb * width);
      for (int64_t p = 0; p < g.k; ++p) {
        float* dst = base + (jb * g.k + p) * width;
        const float* src = g.b + p * g.b_stride_k + jb * width * g.b_stride_d;
        for (int64_t q = 0; q < cols; ++q) dst[q] = src[q * g.b_stride_d];
      }
    }
  });
  return base;
}

constexpr int64_t kMR = 6;                            // rows per micro-tile, either width
constexpr int64_t kTileRows = kResidualGemmTileRows;  // rows per parallel task

// The row pointers of one micro-tile: A's rows (at column 0), R's, R2's and out's (at the
// column block's first column, or column 0 for a sweep); r[i], r2[i] null: none.
struct Rows {
  const float* a[kMR];
  const float* r[kMR];
  const float* r2[kMR];
  float* o[kMR];
};

// ---------------------------------------------------------------------------- AVX-512

namespace avx512 {

constexpr int64_t kNR = 64;   // columns per micro-tile and per packed block of B
constexpr int64_t kKc = 128;  // k per block of a long dot product (128 x 64 floats of B: 32 KiB)

// R + R2 (either may be null) for the 16 columns at r and r2, only the lanes of m
FA_AVX512_INLINE inline __m512 residual(const float* r, const float* r2, __mmask16 m) {
  const __m512 a = r ? _mm512_maskz_loadu_ps(m, r) : _mm512_setzero_ps();
  return r2 ? _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, r2)) : a;
}

// the same for 16 whole columns: plain loads
FA_AVX512_INLINE inline __m512 residual(const float* r, const float* r2) {
  const __m512 a = r ? _mm512_loadu_ps(r) : _mm512_setzero_ps();
  return r2 ? _mm512_add_ps(a, _mm512_loadu_ps(r2)) : a;
}

#define FA_ZERO_6X64(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define FA_FMA_6X64(i)                             \
  {                                                \
    const __m512 av = _mm512_set1_ps(a##i[p]);     \
    c##i##0 = _mm512_fmadd_ps(av, b0, c##i##0);    \
    c##i##1 = _mm512_fmadd_ps(av, b1, c##i##1);    \
    c##i##2 = _mm512_fmadd_ps(av, b2, c##i##2);    \
    c##i##3 = _mm512_fmadd_ps(av, b3, c##i##3);    \
  }
#define FA_STEPS_6X64(B, p0, p1)                                                          \
  for (int64_t p = (p0); p < (p1); ++p) {                                                 \
    const float* bp = (B) + p * kNR;                                                      \
    const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);                 \
    const __m512 b2 = _mm512_loadu_ps(bp + 32), b3 = _mm512_loadu_ps(bp + 48);           \
    FA_FMA_6X64(0) FA_FMA_6X64(1) FA_FMA_6X64(2) FA_FMA_6X64(3) FA_FMA_6X64(4) FA_FMA_6X64(5) \
  }

// A full micro-row: the 6 x 64 micro-tile over each column block [j, j + 64) of [0, d) in
// turn (d a multiple of 64), m's row pointers at column 0.
FA_AVX512 void micro_6x64_sweep(const Rows& m, const float* B, int64_t k, int64_t d, const float* c, float s) {
  const float *a0 = m.a[0], *a1 = m.a[1], *a2 = m.a[2], *a3 = m.a[3], *a4 = m.a[4], *a5 = m.a[5];
  const __m512 vs = _mm512_set1_ps(s), zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += kNR) {
    const float* Bj = B + j * k;  // column block j / 64 of the packed B
    FA_ZERO_6X64(0) FA_ZERO_6X64(1) FA_ZERO_6X64(2) FA_ZERO_6X64(3) FA_ZERO_6X64(4) FA_ZERO_6X64(5)
    FA_STEPS_6X64(Bj, 0, k)
#define FA_OUT1(i, v)                                                                                             \
  {                                                                                                               \
    const __m512 e = c ? _mm512_loadu_ps(c + j + 16 * v) : zero;                                                  \
    const float *rr = m.r[i], *rr2 = m.r2[i];                                                                     \
    _mm512_storeu_ps(m.o[i] + j + 16 * v,                                                                         \
                     _mm512_fmadd_ps(vs, _mm512_add_ps(c##i##v, e),                                               \
                                     residual(rr ? rr + j + 16 * v : nullptr, rr2 ? rr2 + j + 16 * v : nullptr))); \
  }
#define FA_OUT(i) FA_OUT1(i, 0) FA_OUT1(i, 1) FA_OUT1(i, 2) FA_OUT1(i, 3)
    FA_OUT(0) FA_OUT(1) FA_OUT(2) FA_OUT(3) FA_OUT(4) FA_OUT(5)
#undef FA_OUT
#undef FA_OUT1
  }
}

// Edge micro-tiles: mr < 6 rows and/or cols < 64 columns, the columns past cols masked;
// m's row pointers at the column block's first column.
FA_AVX512 void micro_edge(int64_t mr, int64_t cols, const Rows& m, const float* B, int64_t k, const float* c, float s) {
  const int64_t nv = (cols + 15) / 16;
  __m512 acc[kMR][4];
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t v = 0; v < nv; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = B + p * kNR;  // zero-padded: full loads are in bounds
    for (int64_t i = 0; i < mr; ++i) {
      const __m512 av = _mm512_set1_ps(m.a[i][p]);
      for (int64_t v = 0; v < nv; ++v) acc[i][v] = _mm512_fmadd_ps(av, _mm512_loadu_ps(bp + 16 * v), acc[i][v]);
    }
  }
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t v = 0; v < nv; ++v) {
    const int64_t lanes = std::min<int64_t>(16, cols - 16 * v);
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
    const __m512 e = c ? _mm512_maskz_loadu_ps(mask, c + 16 * v) : _mm512_setzero_ps();
    for (int64_t i = 0; i < mr; ++i) {
      const __m512 rv = residual(m.r[i] ? m.r[i] + 16 * v : nullptr, m.r2[i] ? m.r2[i] + 16 * v : nullptr, mask);
      _mm512_mask_storeu_ps(m.o[i] + 16 * v, mask, _mm512_fmadd_ps(vs, _mm512_add_ps(acc[i][v], e), rv));
    }
  }
}

// acc[6][64] = A's 6 rows times B (k x 64, packed) for k > kKc: each block of kKc steps
// summed in registers, the block partials added in order in acc (in L1), the sums of the
// AVX2 kernel's micro_6x16_long.
FA_AVX512 void micro_6x64_long(const float* const* a, const float* B, int64_t k, float* acc) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    const int64_t p1 = std::min(k, p0 + kKc);
    FA_ZERO_6X64(0) FA_ZERO_6X64(1) FA_ZERO_6X64(2) FA_ZERO_6X64(3) FA_ZERO_6X64(4) FA_ZERO_6X64(5)
    FA_STEPS_6X64(B, p0, p1)
#define FA_SET1(i, v)                                                                                  \
  _mm512_store_ps(acc + i * kNR + 16 * v,                                                              \
                  p0 == 0 ? c##i##v : _mm512_add_ps(_mm512_load_ps(acc + i * kNR + 16 * v), c##i##v));
#define FA_SET(i) FA_SET1(i, 0) FA_SET1(i, 1) FA_SET1(i, 2) FA_SET1(i, 3)
    FA_SET(0) FA_SET(1) FA_SET(2) FA_SET(3) FA_SET(4) FA_SET(5)
#undef FA_SET
#undef FA_SET1
  }
}

#undef FA_STEPS_6X64
#undef FA_FMA_6X64
#undef FA_ZERO_6X64

// out row i = R row i + R2 row i + s * (acc row i + c) over columns [j, j + cols) of the
// rows of a tile, c at column j: plain loads and stores for whole vectors, a mask for a
// partial last one
FA_AVX512 void tile_epilogue(int64_t rows, int64_t cols, const float* acc, const float* const* r_row,
                             const float* const* r2_row, float* const* o_row, int64_t j, const float* c, float s) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t v = 0; v < cols; v += 16) {
    const bool whole = cols - v >= 16;
    const __mmask16 mask = whole ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (cols - v)) - 1u);
    const __m512 e = c ? _mm512_maskz_loadu_ps(mask, c + v) : _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; ++i) {
      const float* r = r_row[i] ? r_row[i] + j + v : nullptr;
      const float* r2 = r2_row[i] ? r2_row[i] + j + v : nullptr;
      const __m512 t = _mm512_add_ps(_mm512_load_ps(acc + i * kNR + v), e);
      if (whole) _mm512_storeu_ps(o_row[i] + j + v, _mm512_fmadd_ps(vs, t, residual(r, r2)));
      else _mm512_mask_storeu_ps(o_row[i] + j + v, mask, _mm512_fmadd_ps(vs, t, residual(r, r2, mask)));
    }
  }
}

// the micro-kernels at this width, for run_tile
struct Kernel {
  static constexpr int64_t kNR = avx512::kNR, kKc = avx512::kKc;
  static constexpr auto sweep = micro_6x64_sweep;
  static constexpr auto edge = micro_edge;
  static constexpr auto long_sums = micro_6x64_long;
  static constexpr auto epilogue = tile_epilogue;
};

}  // namespace avx512

// ---------------------------------------------------------------------------- AVX2

namespace avx2 {

constexpr int64_t kNR = 16;   // columns per micro-tile and per packed block of B
constexpr int64_t kKc = 128;  // k per block of a long dot product (128 x 16 floats of B: 8 KiB)

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// R + R2 (either may be null) for 8 columns, with Masked only the lanes of mask
template <bool Masked>
FA_AVX2_INLINE inline __m256 residual(const float* r, const float* r2, __m256i mask) {
  const __m256 a = r ? load8<Masked>(r, mask) : _mm256_setzero_ps();
  return r2 ? _mm256_add_ps(a, load8<Masked>(r2, mask)) : a;
}

FA_AVX2_INLINE inline __m256 residual(const float* r, const float* r2) {
  return residual<false>(r, r2, _mm256_setzero_si256());
}


// The 6 x 16 micro-tile's 12 accumulators, named so that they stay in registers, and its
// steps p in [p0, p1): c_i += A row i [p] * B[p] (B packed 16 wide), with a0..a5 the rows
// of A. Shared by the AVX2 kernels below.
#define FA_ZERO_6X16                                                              \
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, \
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define FA_FMA_6X16(i)                               \
  {                                                  \
    const __m256 av = _mm256_broadcast_ss(a##i + p); \
    c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);      \
    c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);      \
  }
#define FA_STEPS_6X16(B, p0, p1)                                                                 \
  for (int64_t p = (p0); p < (p1); ++p) {                                                        \
    const __m256 b0 = _mm256_loadu_ps((B) + p * kNR), b1 = _mm256_loadu_ps((B) + p * kNR + 8); \
    FA_FMA_6X16(0) FA_FMA_6X16(1) FA_FMA_6X16(2) FA_FMA_6X16(3) FA_FMA_6X16(4) FA_FMA_6X16(5)    \
  }

// A full micro-row: the 6 x 16 micro-tile over each column block [j, j + 16) of
// [0, d) in turn (d a multiple of 16), in one call, m's row pointers at column 0.
// Against a call per column block, the rows' pointers and the epilogue's null checks
// stay put across the blocks: on a Zen 3, 13% faster in a standalone loop for
// k = 64 with a second residual (the site forward's y = h + r + ...), 2% on the site op.
FA_AVX2 void micro_6x16_sweep(const Rows& m, const float* B, int64_t k, int64_t d, const float* c, float s) {
  const float *a0 = m.a[0], *a1 = m.a[1], *a2 = m.a[2], *a3 = m.a[3], *a4 = m.a[4], *a5 = m.a[5];
  const __m256 vs = _mm256_set1_ps(s), zero = _mm256_setzero_ps();
  for (int64_t j = 0; j < d; j += kNR) {
    const float* Bj = B + j * k;  // column block j / 16 of the packed B
    FA_ZERO_6X16
    FA_STEPS_6X16(Bj, 0, k)
    const __m256 e0 = c ? _mm256_loadu_ps(c + j) : zero, e1 = c ? _mm256_loadu_ps(c + j + 8) : zero;
#define FA_OUT(i)                                                                                              \
  {                                                                                                            \
    const float *rr = m.r[i], *rr2 = m.r2[i];                                                                  \
    _mm256_storeu_ps(m.o[i] + j, _mm256_fmadd_ps(vs, _mm256_add_ps(c##i##0, e0),                               \
                                                 residual(rr ? rr + j : nullptr, rr2 ? rr2 + j : nullptr)));   \
    _mm256_storeu_ps(m.o[i] + j + 8, _mm256_fmadd_ps(vs, _mm256_add_ps(c##i##1, e1),                           \
                                                     residual(rr ? rr + j + 8 : nullptr, rr2 ? rr2 + j + 8 : nullptr))); \
  }
    FA_OUT(0) FA_OUT(1) FA_OUT(2) FA_OUT(3) FA_OUT(4) FA_OUT(5)
#undef FA_OUT
  }
}

// Edge micro-tiles: mr < 6 rows and/or cols < 16 columns, the columns past cols masked.
FA_AVX2 void micro_edge(int64_t mr, int64_t cols, const Rows& m, const float* B, int64_t k, const float* c, float s) {
  __m256 acc[kMR][2];
  for (int64_t i = 0; i < mr; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(B + p * kNR), b1 = _mm256_loadu_ps(B + p * kNR + 8);  // zero-padded
    for (int64_t i = 0; i < mr; ++i) {
      const __m256 av = _mm256_broadcast_ss(m.a[i] + p);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  const __m256 vs = _mm256_set1_ps(s);
  for (int64_t v = 0; v < 2 && 8 * v < cols; ++v) {
    const __m256i mask = lanes8(cols - 8 * v);
    const __m256 e = c ? _mm256_maskload_ps(c + 8 * v, mask) : _mm256_setzero_ps();
    for (int64_t i = 0; i < mr; ++i) {
      const __m256 rv = residual<true>(m.r[i] ? m.r[i] + 8 * v : nullptr, m.r2[i] ? m.r2[i] + 8 * v : nullptr, mask);
      _mm256_maskstore_ps(m.o[i] + 8 * v, mask, _mm256_fmadd_ps(vs, _mm256_add_ps(acc[i][v], e), rv));
    }
  }
}

// acc[6][16] = A's 6 rows times B (k x 16, packed) for k > kKc: each block of kKc steps
// summed in registers, the block partials added in order in acc (in L1), so that the
// rounding error grows with kKc plus the number of blocks, not with k.
FA_AVX2 void micro_6x16_long(const float* const* a, const float* B, int64_t k, float* acc) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    const int64_t p1 = std::min(k, p0 + kKc);
    FA_ZERO_6X16
    FA_STEPS_6X16(B, p0, p1)
    if (p0 == 0) {
#define FA_SET(i)                                   \
  _mm256_store_ps(acc + i * kNR, c##i##0);          \
  _mm256_store_ps(acc + i * kNR + 8, c##i##1);
      FA_SET(0) FA_SET(1) FA_SET(2) FA_SET(3) FA_SET(4) FA_SET(5)
#undef FA_SET
    } else {
#define FA_ADD(i)                                                                        \
  _mm256_store_ps(acc + i * kNR, _mm256_add_ps(_mm256_load_ps(acc + i * kNR), c##i##0)); \
  _mm256_store_ps(acc + i * kNR + 8, _mm256_add_ps(_mm256_load_ps(acc + i * kNR + 8), c##i##1));
      FA_ADD(0) FA_ADD(1) FA_ADD(2) FA_ADD(3) FA_ADD(4) FA_ADD(5)
#undef FA_ADD
    }
  }
}

// out row i = R row i + R2 row i + s * (acc row i + c) for the 8 columns [j + v, j + v + 8)
// of the rows of a tile, with Masked only the lanes of mask
template <bool Masked>
FA_AVX2_INLINE inline void epilogue_vector(int64_t rows, int64_t v, __m256i mask, const float* acc,
                                           const float* const* r_row, const float* const* r2_row, float* const* o_row,
                                           int64_t j, const float* c, __m256 vs) {
  const __m256 e = c ? load8<Masked>(c + v, mask) : _mm256_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    const __m256 rv = residual<Masked>(r_row[i] ? r_row[i] + j + v : nullptr, r2_row[i] ? r2_row[i] + j + v : nullptr, mask);
    const __m256 t = _mm256_add_ps(_mm256_load_ps(acc + i * kNR + v), e);
    store8<Masked>(o_row[i] + j + v, mask, _mm256_fmadd_ps(vs, t, rv));
  }
}

// columns [j, j + cols) of the rows of a tile: plain loads and stores for whole vectors (a
// masked store is slow on Zen), a mask for the last partial one
FA_AVX2 void tile_epilogue(int64_t rows, int64_t cols, const float* acc, const float* const* r_row,
                           const float* const* r2_row, float* const* o_row, int64_t j, const float* c, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t v = 0;
  for (; v + 8 <= cols; v += 8)
    epilogue_vector<false>(rows, v, _mm256_setzero_si256(), acc, r_row, r2_row, o_row, j, c, vs);
  if (v < cols) epilogue_vector<true>(rows, v, lanes8(cols - v), acc, r_row, r2_row, o_row, j, c, vs);
}

#undef FA_STEPS_6X16
#undef FA_FMA_6X16
#undef FA_ZERO_6X16

// the micro-kernels at this width, for run_tile
struct Kernel {
  static constexpr int64_t kNR = avx2::kNR, kKc = avx2::kKc;
  static constexpr auto sweep = micro_6x16_sweep;
  static constexpr auto edge = micro_edge;
  static constexpr auto long_sums = micro_6x16_long;
  static constexpr auto epilogue = tile_epilogue;
};

}  // namespace avx2

// Rows [row0, row1) of the product (a tile) with the micro-kernels of K (avx512::Kernel or
// avx2::Kernel): the rows are mapped once, then each micro-row of 6 sweeps all of d.
template <typename K>
void run_tile(const ResidualGemm& g, const float* packed, int64_t row0, int64_t row1) {
  constexpr int64_t kNR = K::kNR, kKc = K::kKc;
  if (g.rows_ready) g.rows_ready(g.ready_ctx, row0, row1);  // before any read of these rows of A
  const float* a_row[kTileRows];  // the tile's rows of A, R and out, mapped once
  const float* r_row[kTileRows];
  const float* r2_row[kTileRows];
  float* o_row[kTileRows];
  for (int64_t i = row0; i < row1; ++i) {
    a_row[i - row0] = g.a + mapped_row(g.a_rows, i) * g.lda;
    r_row[i - row0] = g.r ? g.r + mapped_row(g.r_rows, i) * g.ldr : nullptr;
    r2_row[i - row0] = g.r2 ? g.r2 + i * g.ldr2 : nullptr;
    o_row[i - row0] = g.out + mapped_row(g.out_rows, i) * g.ldo;
  }
  Rows m;
  if (g.k <= kKc) {
    // one k-block: each micro-row sweeps all of d, the epilogue straight from the registers
    for (int64_t i = 0; i < row1 - row0; i += kMR) {
      const int64_t mr = std::min(kMR, row1 - row0 - i);
      for (int64_t q = 0; q < mr; ++q) m.a[q] = a_row[i + q];
      int64_t j = 0;
      if (mr == kMR) {  // the full column blocks in one call; a partial one, or fewer rows, below
        for (int64_t q = 0; q < kMR; ++q) {
          m.r[q] = r_row[i + q];
          m.r2[q] = r2_row[i + q];
          m.o[q] = o_row[i + q];
        }
        j = g.d / kNR * kNR;
        K::sweep(m, packed, g.k, j, g.c, g.s);
      }
      for (; j < g.d; j += kNR) {
        for (int64_t q = 0; q < mr; ++q) {
          m.r[q] = r_row[i + q] ? r_row[i + q] + j : nullptr;
          m.r2[q] = r2_row[i + q] ? r2_row[i + q] + j : nullptr;
          m.o[q] = o_row[i + q] + j;
        }
        K::edge(mr, std::min(kNR, g.d - j), m, packed + (j / kNR) * g.k * kNR, g.k, g.c ? g.c + j : nullptr, g.s);
      }
      if (g.rows_done) g.rows_done(g.ctx, row0 + i, row0 + i + mr);  // these rows of out are final
    }
    return;
  }
  // k in blocks of kKc: per micro-row and column block, K::long_sums sums the blocks'
  // partials in order, then the epilogue. A micro-row of fewer than 6 rows repeats its
  // first row's A in the others and writes only its own.
  alignas(64) float acc[kMR * kNR];
  for (int64_t i = 0; i < row1 - row0; i += kMR) {
    const int64_t mr = std::min(kMR, row1 - row0 - i);
    for (int64_t q = 0; q < kMR; ++q) m.a[q] = a_row[i + (q < mr ? q : 0)];
    for (int64_t j = 0; j < g.d; j += kNR) {
      K::long_sums(m.a, packed + (j / kNR) * g.k * kNR, g.k, acc);
      K::epilogue(mr, std::min(kNR, g.d - j), acc, r_row + i, r2_row + i, o_row + i, j, g.c ? g.c + j : nullptr, g.s);
    }
    if (g.rows_done) g.rows_done(g.ctx, row0 + i, row0 + i + mr);
  }
}

#endif  // FASTADAPTER_HAVE_AVX512_KERNEL

}  // namespace

bool avx512_kernels_available() {
#if FASTADAPTER_HAVE_AVX512_KERNEL
  return g_enabled.load() && cpu_has_avx512();
#else
  return false;
#endif
}

bool avx2_kernels_available() {
#if FASTADAPTER_HAVE_AVX512_KERNEL
  return g_avx2_enabled.load() && avx2::cpu_has_avx2();
#else
  return false;
#endif
}

bool set_avx512_kernels_enabled(bool enabled) { return g_enabled.exchange(enabled); }

bool set_avx2_kernels_enabled(bool enabled) { return g_avx2_enabled.exchange(enabled); }

bool residual_gemm_available(bool row_maps) {
  return avx2_kernels_available() || (!row_maps && avx512_kernels_available());
}

bool residual_gemm(const ResidualGemm& g) {
  // row maps, a second residual and the row hook and prologue only where AVX2 is on
  const bool row_maps = g.a_rows || g.r_rows || g.out_rows || g.r2 || g.rows_done || g.rows_ready;
  if (g.k < kResidualGemmMin || g.d < kResidualGemmMin || !residual_gemm_available(row_maps)) return false;
#if FASTADAPTER_HAVE_AVX512_KERNEL
  if (g.n == 0 || g.d == 0) return true;
  const bool wide = avx512_kernels_available();
  const float* packed = pack_b(g, wide ? avx512::kNR : avx2::kNR);
  const int64_t tiles = (g.n + kTileRows - 1) / kTileRows;
  // Tiles are handed out one at a time from a shared counter, not split evenly up front:
  // on a shared machine one slowed core then costs its share of the work, not the wait
  // of every other thread at the end.
  const int64_t min_tiles = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, kTileRows * g.d * g.k));
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (tiles + min_tiles - 1) / min_tiles);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tiles; t = next++) {
      const int64_t row0 = t * kTileRows, row1 = std::min(g.n, (t + 1) * kTileRows);
      if (wide) run_tile<avx512::Kernel>(g, packed, row0, row1);
      else run_tile<avx2::Kernel>(g, packed, row0, row1);
    }
  });
  return true;
#else
  return false;
#endif
}

bool residual_gemm_chain(const ResidualGemm& first, void (*between)(void* ctx, int64_t row0, int64_t row1), void* ctx,
                         const ResidualGemm& second) {
  if (first.n != second.n || std::min({first.k, first.d, second.k, second.d}) < kResidualGemmMin ||
      !residual_gemm_available(true))
    return false;
#if FASTADAPTER_HAVE_AVX512_KERNEL
  const int64_t n = first.n;
  if (n == 0) return true;
  const bool wide = avx512_kernels_available();
  const int64_t width = wide ? avx512::kNR : avx2::kNR;
  const float* packed1 = pack_b(first, width, 0);
  const float* packed2 = pack_b(second, width, 1);
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  const int64_t flops = kTileRows * (first.d * first.k + second.d * second.k);
  const int64_t min_tiles = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, flops));
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (tiles + min_tiles - 1) / min_tiles);
  std::atomic<int64_t> next{0};  // tiles handed out one at a time, as in residual_gemm
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tiles; t = next++) {
      const int64_t row0 = t * kTileRows, row1 = std::min(n, (t + 1) * kTileRows);
      if (wide) run_tile<avx512::Kernel>(first, packed1, row0, row1);
      else run_tile<avx2::Kernel>(first, packed1, row0, row1);
      if (between) between(ctx, row0, row1);
      if (wide) run_tile<avx512::Kernel>(second, packed2, row0, row1);
      else run_tile<avx2::Kernel>(second, packed2, row0, row1);
    }
  });
  return true;
#else
  return false;
#endif
}

}  // namespace fastadapter
