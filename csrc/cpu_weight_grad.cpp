// out = s * A^T B (or its transpose) with AVX-512, or AVX2 and FMA (see cpu_weight_grad.h).
//
// Threads split the columns of B into blocks of NR (64 with AVX-512, 16 with AVX2) and
// walk all N rows in blocks of kKc. Per block a thread packs A's rows as panels of 6
// columns ([kKc][6] each, zero past m), and each of its column blocks of B as a [kKc][NR]
// panel; the 6 x NR micro-kernel runs every panel of A over each panel of B (24 zmm
// accumulators, 4 loads of B and 6 broadcasts of A per row; with AVX2 12 ymm, 2 loads and
// 6 broadcasts) and adds its sums to the thread's [m][NR] tile of the result.
//
// B's rows are d floats apart: a panel's rows fall in a few L1 sets, and the hardware
// prefetchers do not follow a stride of several KiB across pages. So the next block's
// panel of a column block is copied inside the micro-kernel calls that run over this
// block's panel, a share of its rows in each (the loads wait behind the FMAs, not in a
// loop of their own), while the following column block's lines are prefetched, and A's
// next rows too. Only the first block is packed up front. The result is scaled (and
// transposed) into out at the end.

#include "cpu_weight_grad.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_avx2.h"
#include "cpu_residual_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTADAPTER_HAVE_AVX2_WGRAD 1
#include <immintrin.h>
#define FA_AVX2 __attribute__((target("avx2,fma")))
#define FA_AVX512 __attribute__((target("avx512f")))
#else
#define FASTADAPTER_HAVE_AVX2_WGRAD 0
#endif

namespace fastadapter {
namespace {

#if FASTADAPTER_HAVE_AVX2_WGRAD

constexpr int64_t kMR = 6;   // columns of A per panel (rows of the result per micro-tile)
constexpr int64_t kKc = 64;  // rows per block: 16 KiB (AVX-512) or 4 KiB per panel of B, 1.5 KiB per panel of A

// a micro-kernel: C[6][NR] += Ap^T Bp over kb rows, copying a share of the next panel
using Micro = void (*)(const float* Ap, const float* Bp, int64_t kb, float* C, const float* const* next, int64_t j,
                       int64_t kn, float* next_panel, bool prefetch);


// C[6][16] += sum over the kb rows of Ap[p][i] * Bp[p][j]. With next (not null), the loop
// also copies 16 floats of each of kn <= kb rows of the next block of B, next[p] + j, into
// rows [0, kn) of next_panel: their loads, mostly from memory, then wait in the shadow of
// the FMAs instead of in a packing loop of their own.
FA_AVX2 __attribute__((noinline)) void micro_6x16(const float* Ap, const float* Bp, int64_t kb, float* C,
                                                    const float* const* next, int64_t j, int64_t kn, float* next_panel,
                                                    bool prefetch) {
  constexpr int64_t kNR = 16;
#define FA_ROW(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = c##i##0;
  FA_ROW(0) FA_ROW(1) FA_ROW(2) FA_ROW(3) FA_ROW(4) FA_ROW(5)
#undef FA_ROW
#define FA_FMA(i)                                  \
  {                                                \
    const __m256 av = _mm256_broadcast_ss(a + i);  \
    c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);    \
    c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);    \
  }
#define FA_STEP                                                                                       \
  {                                                                                                   \
    const __m256 b0 = _mm256_load_ps(Bp + p * kNR), b1 = _mm256_load_ps(Bp + p * kNR + 8);           \
    const float* a = Ap + p * kMR;                                                                    \
    FA_FMA(0) FA_FMA(1) FA_FMA(2) FA_FMA(3) FA_FMA(4) FA_FMA(5)                                       \
  }
  int64_t p = 0;
  if (next) {
    for (; p < kn; ++p) {
      const float* src = next[p] + j;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(src + kNR), _MM_HINT_T0);
      _mm256_store_ps(next_panel + p * kNR, _mm256_loadu_ps(src));
      _mm256_store_ps(next_panel + p * kNR + 8, _mm256_loadu_ps(src + 8));
      FA_STEP
    }
  }
  for (; p < kb; ++p) FA_STEP
#undef FA_STEP
#undef FA_FMA
#define FA_ADD(i)                                                                              \
  _mm256_store_ps(C + i * kNR, _mm256_add_ps(_mm256_load_ps(C + i * kNR), c##i##0));          \
  _mm256_store_ps(C + i * kNR + 8, _mm256_add_ps(_mm256_load_ps(C + i * kNR + 8), c##i##1));
  FA_ADD(0) FA_ADD(1) FA_ADD(2) FA_ADD(3) FA_ADD(4) FA_ADD(5)
#undef FA_ADD
}

// The same with AVX-512 over 64 columns of B: 24 zmm accumulators, 4 loads of B and 6
// broadcasts of A per row; the copy moves 64 floats of a row of the next block, and the
// prefetch the following column block's 4 lines of that row.
FA_AVX512 __attribute__((noinline)) void micro_6x64(const float* Ap, const float* Bp, int64_t kb, float* C,
                                                      const float* const* next, int64_t j, int64_t kn,
                                                      float* next_panel, bool prefetch) {
  constexpr int64_t kNR = 64;
#define FA_ROW(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
  FA_ROW(0) FA_ROW(1) FA_ROW(2) FA_ROW(3) FA_ROW(4) FA_ROW(5)
#undef FA_ROW
#define FA_FMA(i)                                  \
  {                                                \
    const __m512 av = _mm512_set1_ps(a[i]);        \
    c##i##0 = _mm512_fmadd_ps(av, b0, c##i##0);    \
    c##i##1 = _mm512_fmadd_ps(av, b1, c##i##1);    \
    c##i##2 = _mm512_fmadd_ps(av, b2, c##i##2);    \
    c##i##3 = _mm512_fmadd_ps(av, b3, c##i##3);    \
  }
#define FA_STEP                                                                                   \
  {                                                                                               \
    const float* bp = Bp + p * kNR;                                                               \
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);                           \
    const __m512 b2 = _mm512_load_ps(bp + 32), b3 = _mm512_load_ps(bp + 48);                      \
    const float* a = Ap + p * kMR;                                                                \
    FA_FMA(0) FA_FMA(1) FA_FMA(2) FA_FMA(3) FA_FMA(4) FA_FMA(5)                                   \
  }
  int64_t p = 0;
  if (next) {
    for (; p < kn; ++p) {
      const float* src = next[p] + j;
      if (prefetch)
        for (int64_t v = 0; v < 4; ++v) _mm_prefetch(reinterpret_cast<const char*>(src + kNR + 16 * v), _MM_HINT_T0);
      for (int64_t v = 0; v < 4; ++v) _mm512_store_ps(next_panel + p * kNR + 16 * v, _mm512_loadu_ps(src + 16 * v));
      FA_STEP
    }
  }
  for (; p < kb; ++p) FA_STEP
#undef FA_STEP
#undef FA_FMA
#define FA_ADD1(i, v) _mm512_store_ps(C + i * kNR + 16 * v, _mm512_add_ps(_mm512_load_ps(C + i * kNR + 16 * v), c##i##v));
#define FA_ADD(i) FA_ADD1(i, 0) FA_ADD1(i, 1) FA_ADD1(i, 2) FA_ADD1(i, 3)
  FA_ADD(0) FA_ADD(1) FA_ADD(2) FA_ADD(3) FA_ADD(4) FA_ADD(5)
#undef FA_ADD
#undef FA_ADD1
}

// rows [n0, n0 + kb) of A into panels of 6 columns, zero past m: one 8-float load and
// store per row and panel, panel by panel, the 2 floats past a panel's 6 overwritten by
// the next row (or the next panel's first; the buffer has room past the last)
FA_AVX2 void pack_a(const WeightGrad& g, int64_t n0, int64_t kb, int64_t panels, float* Ap) {
  for (int64_t q = 0; q < panels; ++q) {
    const int64_t cols = std::min<int64_t>(8, g.m - q * kMR);
    float* dst = Ap + q * kKc * kMR;
    if (cols == 8) {
      for (int64_t p = 0; p < kb; ++p)
        _mm256_storeu_ps(dst + p * kMR, _mm256_loadu_ps(g.a + mapped_row(g.a_rows, n0 + p) * g.lda + q * kMR));
    } else {
      const __m256i mask = lanes8(std::min(kMR, cols));
      for (int64_t p = 0; p < kb; ++p)
        _mm256_storeu_ps(dst + p * kMR, _mm256_maskload_ps(g.a + mapped_row(g.a_rows, n0 + p) * g.lda + q * kMR, mask));
    }
  }
}

// the panel of column block jb of rows[0, kb) of B (row pointers), NR columns, zero past d
template <int64_t NR>
FA_AVX2 void pack_b(const WeightGrad& g, const float* const* rows, int64_t kb, int64_t jb, float* panel) {
  const int64_t j = jb * NR, cols = std::min(NR, g.d - j);
  for (int64_t v = 0; v < NR; v += 8) {
    const __m256i m = lanes8(cols - v);
    for (int64_t p = 0; p < kb; ++p) _mm256_store_ps(panel + p * NR + v, _mm256_maskload_ps(rows[p] + j + v, m));
  }
}

// One thread's share: the column blocks [jb0, jb1) of NR columns, all N rows in blocks of
// kKc, by the micro-kernel for NR.
template <int64_t NR, Micro micro>
FA_AVX2 void run_columns(const WeightGrad& g, int64_t jb0, int64_t jb1) {
  constexpr int64_t kNR = NR;
  const int64_t panels = (g.m + kMR - 1) / kMR, m_pad = panels * kMR, blocks = jb1 - jb0;
  const int64_t panel = kKc * kNR;  // floats per panel of B
  thread_local std::vector<float> buf;
  thread_local std::vector<const float*> rows;
  // Bp's two halves (this block's panels and the next's) start 2 KiB apart modulo 4 KiB,
  // so that the copy's stores into one half do not alias the loads from the other
  const int64_t half_size = blocks * panel + 512;
  const int64_t a_size = panels * kKc * kMR + 8, b_size = 2 * half_size, c_size = blocks * m_pad * kNR;
  if (buf.size() < static_cast<size_t>(a_size + b_size + c_size + 16)) buf.resize(a_size + b_size + c_size + 16);
  if (rows.size() < static_cast<size_t>(2 * kKc)) rows.resize(2 * kKc);
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
  float *C = base, *Bp = C + c_size, *Ap = Bp + b_size;  // 64-byte aligned: c_size and b_size are multiples of 16
  std::fill(C, C + c_size, 0.0f);
  const float** cur = rows.data();
  const float** nxt = rows.data() + kKc;
  auto row_ptrs = [&](const float** ptrs, int64_t n0, int64_t kb) {
    for (int64_t p = 0; p < kb; ++p) ptrs[p] = g.b + mapped_row(g.b_rows, n0 + p) * g.ldb;
  };
  // block 0's panels of B first; every later block's are copied while the one before runs
  const int64_t kb0 = std::min(kKc, g.n);
  row_ptrs(cur, 0, kb0);
  for (int64_t jb = jb0; jb < jb1; ++jb) pack_b<NR>(g, cur, kb0, jb, Bp + (jb - jb0) * panel);
  int64_t half = 0;  // which half of Bp holds this block's panels
  for (int64_t n0 = 0; n0 < g.n; n0 += kKc) {
    const int64_t kb = std::min(kKc, g.n - n0), kn = std::min(kKc, g.n - n0 - kb);
    pack_a(g, n0, kb, panels, Ap);
    row_ptrs(nxt, n0 + kb, kn);
    float* now = Bp + half * half_size;
    float* later = Bp + (1 - half) * half_size;
    for (int64_t jb = jb0; jb < jb1; ++jb) {
      const int64_t jl = jb - jb0;
      for (int64_t p = jl * kn / blocks; p < (jl + 1) * kn / blocks; ++p) {  // a share of A's next rows into cache
        const char* src = reinterpret_cast<const char*>(g.a + mapped_row(g.a_rows, n0 + kb + p) * g.lda);
        for (int64_t off = 0; off < g.m * 4; off += 64) _mm_prefetch(src + off, _MM_HINT_T0);
      }
      const bool full = (jb + 1) * kNR <= g.d;
      float* Cj = C + jl * m_pad * kNR;
      const float* Bj = now + jl * panel;
      // the next block's panel copied in shares of its rows, one share per panel of A: a
      // few copies in each micro-kernel call, not all of them in the first
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t c0 = q * kn / panels, c1 = (q + 1) * kn / panels;
        micro(Ap + q * kKc * kMR, Bj, kb, Cj + q * kMR * kNR, full ? nxt + c0 : nullptr, jb * kNR, c1 - c0,
              later + jl * panel + c0 * kNR, jb + 1 < jb1);
      }
      if (!full && kn) pack_b<NR>(g, nxt, kn, jb, later + jl * panel);
    }
    half = 1 - half;
    std::swap(cur, nxt);
  }
  for (int64_t jb = jb0; jb < jb1; ++jb) {  // out = s * C, transposed or not
    const int64_t j = jb * kNR, cols = std::min(kNR, g.d - j);
    const float* Cj = C + (jb - jb0) * m_pad * kNR;
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t t = 0; t < cols; ++t) {
        const float v = g.s * Cj[i * kNR + t];
        if (g.transposed) g.out[(j + t) * g.m + i] = v;
        else g.out[i * g.d + j + t] = v;
      }
  }
}

#endif  // FASTADAPTER_HAVE_AVX2_WGRAD

}  // namespace

bool weight_grad(const WeightGrad& g) {
  const bool wide = avx512_kernels_available();
  if (g.m < kResidualGemmMin || g.d < kResidualGemmMin || !(wide || avx2_kernels_available())) return false;
#if FASTADAPTER_HAVE_AVX2_WGRAD
  const int64_t nr = wide ? 64 : 16, blocks = (g.d + nr - 1) / nr;
  if (g.n == 0) {
    std::fill(g.out, g.out + g.m * g.d, 0.0f);
    return true;
  }
  // at least ~1 MFLOP per thread: small products stay on one
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 19) / std::max<int64_t>(1, g.n * g.m * nr));
  at::parallel_for(0, blocks, grain, [&](int64_t jb0, int64_t jb1) {
    if (wide) run_columns<64, micro_6x64>(g, jb0, jb1);
    else run_columns<16, micro_6x16>(g, jb0, jb1);
  });
  return true;
#else
  return false;
#endif
}

}  // namespace fastadapter
