// AVX-512 kernel for out = R + s * (A @ B + c) (see cpu_residual_gemm.h).
//
// B (k x d, the adapter's weight) is packed once per call into column blocks of 64,
// k x 64 floats each and contiguous, zero-padded past d. Rows go in tiles of kTileRows,
// handed to threads one at a time; inside a tile each block of B is swept by 6 x 64
// micro-tiles: 24 zmm accumulators, 4 loads of B and 6 broadcasts of A per step of p.
// For k <= kKc, R and c are read in the epilogue while the micro-tile is still in
// registers; longer dot products go in k-blocks of kKc summed in a tile buffer (B's
// block stays in L1, and the rounding error grows with kKc, not k) and then the same
// epilogue. Compiled for AVX-512 by function attribute and chosen at run time, so a
// build without -march=native still has it and a CPU without AVX-512 never runs it.

#include "cpu_residual_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTADAPTER_HAVE_AVX512_KERNEL 1
#include <immintrin.h>
#define FA_AVX512 __attribute__((target("avx512f"), noinline))
#else
#define FASTADAPTER_HAVE_AVX512_KERNEL 0
#endif

namespace fastadapter {
namespace {

std::atomic<bool> g_enabled{true};

#if FASTADAPTER_HAVE_AVX512_KERNEL

constexpr int64_t kMR = 6;         // rows per micro-tile
constexpr int64_t kNR = 64;        // columns per micro-tile and per packed block of B
constexpr int64_t kTileRows = 24;  // rows per parallel task
constexpr int64_t kKc = 128;       // k per block of a long dot product (128 x 64 floats of B: 32 KiB, in L1)

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// The full 6 x 64 micro-tile, written out so that the 24 accumulators stay in registers.
FA_AVX512 void micro_6x64(const float* A, int64_t lda, const float* B, int64_t k, const float* R, int64_t ldr,
                          const float* c, float s, float* out, int64_t ldo) {
#define FA_ROW(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
  FA_ROW(0) FA_ROW(1) FA_ROW(2) FA_ROW(3) FA_ROW(4) FA_ROW(5)
#undef FA_ROW
  const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda, *a4 = A + 4 * lda, *a5 = A + 5 * lda;
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = B + p * kNR;
    const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
    const __m512 b2 = _mm512_loadu_ps(bp + 32), b3 = _mm512_loadu_ps(bp + 48);
#define FA_FMA(i)                                       \
  {                                                     \
    const __m512 av = _mm512_set1_ps(a##i[p]);          \
    c##i##0 = _mm512_fmadd_ps(av, b0, c##i##0);         \
    c##i##1 = _mm512_fmadd_ps(av, b1, c##i##1);         \
    c##i##2 = _mm512_fmadd_ps(av, b2, c##i##2);         \
    c##i##3 = _mm512_fmadd_ps(av, b3, c##i##3);         \
  }
    FA_FMA(0) FA_FMA(1) FA_FMA(2) FA_FMA(3) FA_FMA(4) FA_FMA(5)
#undef FA_FMA
  }
  const __m512 vs = _mm512_set1_ps(s), zero = _mm512_setzero_ps();
  const __m512 e0 = c ? _mm512_loadu_ps(c) : zero, e1 = c ? _mm512_loadu_ps(c + 16) : zero;
  const __m512 e2 = c ? _mm512_loadu_ps(c + 32) : zero, e3 = c ? _mm512_loadu_ps(c + 48) : zero;
#define FA_OUT1(i, v, e) \
  _mm512_storeu_ps(o + 16 * v, _mm512_fmadd_ps(vs, _mm512_add_ps(c##i##v, e), R ? _mm512_loadu_ps(rr + 16 * v) : zero));
#define FA_OUT(i)                                   \
  {                                                 \
    float* o = out + i * ldo;                       \
    const float* rr = R ? R + i * ldr : nullptr;    \
    FA_OUT1(i, 0, e0) FA_OUT1(i, 1, e1) FA_OUT1(i, 2, e2) FA_OUT1(i, 3, e3) \
  }
  FA_OUT(0) FA_OUT(1) FA_OUT(2) FA_OUT(3) FA_OUT(4) FA_OUT(5)
#undef FA_OUT
#undef FA_OUT1
}

// Edge micro-tiles: mr < 6 rows and/or nv < 4 vectors, the last vector's columns masked.
FA_AVX512 void micro_edge(int64_t mr, int64_t nv, __mmask16 tail, const float* A, int64_t lda, const float* B, int64_t k,
                          const float* R, int64_t ldr, const float* c, float s, float* out, int64_t ldo) {
  __m512 acc[kMR][4];
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t v = 0; v < nv; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = B + p * kNR;  // zero-padded: full loads are in bounds
    for (int64_t i = 0; i < mr; ++i) {
      const __m512 av = _mm512_set1_ps(A[i * lda + p]);
      for (int64_t v = 0; v < nv; ++v) acc[i][v] = _mm512_fmadd_ps(av, _mm512_loadu_ps(bp + 16 * v), acc[i][v]);
    }
  }
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t v = 0; v < nv; ++v) {
    const __mmask16 m = v == nv - 1 ? tail : static_cast<__mmask16>(0xFFFF);
    const __m512 e = c ? _mm512_maskz_loadu_ps(m, c + 16 * v) : _mm512_setzero_ps();
    for (int64_t i = 0; i < mr; ++i) {
      const __m512 rv = R ? _mm512_maskz_loadu_ps(m, R + i * ldr + 16 * v) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(out + i * ldo + 16 * v, m, _mm512_fmadd_ps(vs, _mm512_add_ps(acc[i][v], e), rv));
    }
  }
}

// B as column blocks [ceil(d / 64)][k][64], zero past d, in a buffer kept per calling
// thread (grown when needed), so that a call allocates nothing.
const float* pack_b(const ResidualGemm& g) {
  static thread_local std::vector<float> packed;
  const int64_t blocks = (g.d + kNR - 1) / kNR;
  const size_t size = static_cast<size_t>(blocks * g.k * kNR);
  if (packed.size() < size) packed.resize(size);
  std::fill(packed.begin(), packed.begin() + size, 0.0f);
  float* base = packed.data();  // the lambda runs on other threads, which have their own `packed`
  at::parallel_for(0, blocks, 1, [&](int64_t jb0, int64_t jb1) {
    for (int64_t jb = jb0; jb < jb1; ++jb) {
      const int64_t cols = std::min(kNR, g.d - jb * kNR);
      for (int64_t p = 0; p < g.k; ++p) {
        float* dst = base + (jb * g.k + p) * kNR;
        const float* src = g.b + p * g.b_stride_k + jb * kNR * g.b_stride_d;
        for (int64_t q = 0; q < cols; ++q) dst[q] = src[q * g.b_stride_d];
      }
    }
  });
  return base;
}

// out[i, :cols] = R[i, :cols] + s * (acc[i, :cols] + c[:cols]) for the rows of a tile
FA_AVX512 void tile_epilogue(int64_t rows, int64_t cols, const float* acc, const float* R, int64_t ldr, const float* c,
                             float s, float* out, int64_t ldo) {
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t v = 0; v < cols; v += 16) {
    const __mmask16 m = cols - v >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (cols - v)) - 1u);
    const __m512 e = c ? _mm512_maskz_loadu_ps(m, c + v) : _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; ++i) {
      const __m512 rv = R ? _mm512_maskz_loadu_ps(m, R + i * ldr + v) : _mm512_setzero_ps();
      const __m512 t = _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + i * kNR + v), e);
      _mm512_mask_storeu_ps(out + i * ldo + v, m, _mm512_fmadd_ps(vs, t, rv));
    }
  }
}

void micro(int64_t mr, int64_t cols, int64_t nv, __mmask16 tail, const float* a, int64_t lda, const float* b, int64_t k,
           const float* r, int64_t ldr, const float* c, float s, float* o, int64_t ldo) {
  if (mr == kMR && cols == kNR) micro_6x64(a, lda, b, k, r, ldr, c, s, o, ldo);
  else micro_edge(mr, nv, tail, a, lda, b, k, r, ldr, c, s, o, ldo);
}

void run_tile(const ResidualGemm& g, const float* packed, int64_t row0, int64_t row1) {
  alignas(64) float acc[kTileRows * kNR];  // running sums of a tile's k-blocks
  for (int64_t j = 0; j < g.d; j += kNR) {
    const float* bj = packed + (j / kNR) * g.k * kNR;
    const int64_t cols = std::min(kNR, g.d - j);
    const int64_t nv = (cols + 15) / 16;
    const int64_t rem = cols - 16 * (nv - 1);
    const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1u);
    const float* cj = g.c ? g.c + j : nullptr;
    if (g.k <= kKc) {  // one k-block: the epilogue straight from the registers
      for (int64_t i = row0; i < row1; i += kMR) {
        micro(std::min(kMR, row1 - i), cols, nv, tail, g.a + i * g.lda, g.lda, bj, g.k, g.r ? g.r + i * g.ldr + j : nullptr,
              g.ldr, cj, g.s, g.out + i * g.ldo + j, g.ldo);
      }
      continue;
    }
    // k in blocks of kKc: each block's B stays in L1 across the tile's micro-rows, and a
    // long dot product is summed as block partials (rounding error grows with kKc plus
    // the number of blocks, not with k)
    for (int64_t p = 0; p < g.k; p += kKc) {
      const int64_t kb = std::min(kKc, g.k - p);
      for (int64_t i = row0; i < row1; i += kMR) {
        float* t = acc + (i - row0) * kNR;
        micro(std::min(kMR, row1 - i), cols, nv, tail, g.a + i * g.lda + p, g.lda, bj + p * kNR, kb, p == 0 ? nullptr : t, kNR,
              nullptr, 1.0f, t, kNR);
      }
    }
    tile_epilogue(row1 - row0, cols, acc, g.r ? g.r + row0 * g.ldr + j : nullptr, g.ldr, cj, g.s, g.out + row0 * g.ldo + j,
                  g.ldo);
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

bool set_avx512_kernels_enabled(bool enabled) { return g_enabled.exchange(enabled); }

bool residual_gemm(const ResidualGemm& g) {
  if (!avx512_kernels_available() || g.k < 1) return false;
#if FASTADAPTER_HAVE_AVX512_KERNEL
  if (g.n == 0 || g.d == 0) return true;
  const float* packed = pack_b(g);
  const int64_t tiles = (g.n + kTileRows - 1) / kTileRows;
  // Tiles are handed out one at a time from a shared counter, not split evenly up front:
  // on a shared machine one slowed core then costs its share of the work, not the wait
  // of every other thread at the end.
  const int64_t min_tiles = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, kTileRows * g.d * g.k));
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (tiles + min_tiles - 1) / min_tiles);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tiles; t = next++) run_tile(g, packed, t * kTileRows, std::min(g.n, (t + 1) * kTileRows));
  });
  return true;
#else
  return false;
#endif
}

}  // namespace fastadapter
