// CUDA kernels of the fused adapter: the `cuda` backend, the GPU fallback where Triton
// is missing or fails. CUDA headers only (see adapter_cuda.h).
//
// Same math and saved tensors as the Triton kernels: the forward reads x once per row
// block, keeps z in shared memory, writes z (fp32) and y; the backward is two kernels:
//   dz kernel:   per row block, da = dy @ W_up over d, dz = s * da * act'(z)  (fp32, [N, r])
//   grad kernel: grid (row groups, d columns): dx = dz @ W_down (+ dy), and per-group
//                partials of dW_down = dz^T x, dW_up = dy^T a, db_up = sum(dy), which the
//                binding sums over groups in a fixed order (deterministic).
// Products run on CUDA cores with fp32 accumulation over operands rounded to x's dtype.
// All indexing into N x d tensors is 64-bit.

#include "adapter_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastadapter {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 16;       // rows per block in the forward and dz kernels
constexpr int kChunk = 32;      // d-chunk staged in shared memory
constexpr int kOutPerThread = kRows * kMaxBottleneck / kThreads;  // 16
constexpr int kRChunk = 32;     // bottleneck columns per pass of the gradient kernel

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to the operand dtype T (x's dtype), as a float
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f<T>(from_f<T>(v)); }

// weights of dtype W read as operands of dtype T
template <typename T, typename W> __device__ __forceinline__ float weight(const W* p, int64_t i) {
  return round_to<T>(to_f<W>(p[i]));
}

__device__ __forceinline__ float act_fwd(float z, int act) {
  switch (act) {
    case 0: return z <= 0.f ? 0.f : z;  // relu; NaN passes like torch.relu
    case 1: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case 2: {
      const float inner = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.f + tanhf(inner));
    }
    case 3: return z / (1.f + expf(-z));
    case 4: return tanhf(z);
    default: return z;
  }
}

__device__ __forceinline__ float act_grad(float z, int act) {
  switch (act) {
    case 0: return z <= 0.f ? 0.f : 1.f;
    case 1: {
      const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
      return cdf + z * expf(-0.5f * z * z) * 0.39894228040143268f;
    }
    case 2: {
      const float inner = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      const float t = tanhf(inner);
      const float dinner = 0.79788456080286536f * (1.f + 3.f * 0.044715f * z * z);
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * dinner;
    }
    case 3: {
      const float s = 1.f / (1.f + expf(-z));
      return s * (1.f + z * (1.f - s));
    }
    case 4: {
      const float t = tanhf(z);
      return 1.f - t * t;
    }
    default: return 1.f;
  }
}

// acc[BM rows][r] += rows of A [n, K] (strides sam, sak) times B^T, where B(col, k) is read by
// b_at(col, k); K is walked in chunks staged in shared memory.
// Output o = threadIdx.x + j * kThreads maps to (row o / r, col o % r).
template <typename T, typename W, bool B_IS_W_UP>
__device__ void rows_times_weights(const T* __restrict__ A, int64_t row0, int64_t n, int64_t K, int64_t sam,
                                   int64_t sak, const W* __restrict__ B, int64_t r, float (&acc)[kOutPerThread],
                                   float* a_s, float* b_s) {
  const int tid = threadIdx.x;
  const int outs = static_cast<int>((kRows * r + kThreads - 1) / kThreads);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    for (int i = tid; i < kRows * kChunk; i += kThreads) {
      const int row = i / kChunk, kk = i % kChunk;
      const int64_t gr = row0 + row, gk = k0 + kk;
      a_s[i] = (gr < n && gk < K) ? to_f<T>(A[gr * sam + gk * sak]) : 0.f;
    }
    for (int i = tid; i < r * kChunk; i += kThreads) {
      int64_t col, kk;
      if (B_IS_W_UP) {  // B(col, k) = W_up[k, col], W_up is [K, r]: walk k-major for coalescing
        kk = i / r;
        col = i % r;
      } else {          // B(col, k) = W_down[col, k], W_down is [r, K]
        col = i / kChunk;
        kk = i % kChunk;
      }
      const int64_t gk = k0 + kk;
      float v = 0.f;
      if (gk < K) v = B_IS_W_UP ? weight<T, W>(B, gk * r + col) : weight<T, W>(B, col * K + gk);
      b_s[col * kChunk + kk] = v;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kOutPerThread; ++j) {
      if (j < outs) {
        const int o = tid + j * kThreads;
        if (o < kRows * r) {
          const int row = o / static_cast<int>(r), col = o % static_cast<int>(r);
          float s = acc[j];
#pragma unroll 8
          for (int kk = 0; kk < kChunk; ++kk) s += a_s[row * kChunk + kk] * b_s[col * kChunk + kk];
          acc[j] = s;
        }
      }
    }
    __syncthreads();
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) adapter_fwd_kernel(ForwardArgs p) {
  __shared__ float a_s[kRows * kChunk];
  __shared__ float b_s[kMaxBottleneck * kChunk];  // reused for act(z) [kRows, r] afterwards
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t n = p.n, d = p.d, r = p.r;
  const T* x = static_cast<const T*>(p.x);
  const W* bd = static_cast<const W*>(p.b_down);
  const W* wu = static_cast<const W*>(p.w_up);
  const W* bu = static_cast<const W*>(p.b_up);
  const T* res = static_cast<const T*>(p.res);
  T* y = static_cast<T*>(p.y);

  float acc[kOutPerThread];
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j) acc[j] = 0.f;
  rows_times_weights<T, W, false>(x, row0, n, d, p.sxm, p.sxd, static_cast<const W*>(p.w_down), r, acc, a_s, b_s);

  float* act_s = b_s;  // [kRows, r]: a = act(z) rounded to x's dtype
  const int outs = static_cast<int>((kRows * r + kThreads - 1) / kThreads);
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j) {
    const int o = tid + j * kThreads;
    if (j < outs && o < kRows * r) {
      const int row = o / static_cast<int>(r), col = o % static_cast<int>(r);
      float zv = acc[j] + (bd ? to_f<W>(bd[col]) : 0.f);
      const int64_t gr = row0 + row;
      if (gr < n) p.z[gr * r + col] = zv;
      act_s[row * r + col] = round_to<T>(act_fwd(zv, p.activation));
    }
  }
  __syncthreads();

  // y[row, col] = R + s * (a[row, :] . W_up[col, :] + b_up[col]), one column per thread
  for (int64_t col = tid; col < d; col += kThreads) {
    float u[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) u[i] = 0.f;
    for (int64_t k = 0; k < r; ++k) {
      const float w = weight<T, W>(wu, col * r + k);
#pragma unroll
      for (int i = 0; i < kRows; ++i) u[i] += act_s[i * r + k] * w;
    }
    const float b = bu ? to_f<W>(bu[col]) : 0.f;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t gr = row0 + i;
      if (gr >= n) break;
      float out = p.scaling * (u[i] + b);
      if (p.residual_is_x) out += to_f<T>(x[gr * p.sxm + col * p.sxd]);
      else if (res) out += to_f<T>(res[gr * p.srm + col * p.srd]);
      y[gr * d + col] = from_f<T>(out);
    }
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) adapter_bwd_dz_kernel(BackwardArgs p) {
  __shared__ float a_s[kRows * kChunk];
  __shared__ float b_s[kMaxBottleneck * kChunk];
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t n = p.n, r = p.r;
  float acc[kOutPerThread];
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j) acc[j] = 0.f;
  rows_times_weights<T, W, true>(static_cast<const T*>(p.dy), row0, n, p.d, p.sdm, p.sdd,
                                 static_cast<const W*>(p.w_up), r, acc, a_s, b_s);
  const int outs = static_cast<int>((kRows * r + kThreads - 1) / kThreads);
#pragma unroll
  for (int j = 0; j < kOutPerThread; ++j) {
    const int o = tid + j * kThreads;
    if (j < outs && o < kRows * r) {
      const int64_t gr = row0 + o / static_cast<int>(r);
      const int64_t col = o % static_cast<int>(r);
      if (gr < n) {
        const float zv = p.z[gr * r + col];
        p.dz[gr * r + col] = acc[j] * p.scaling * act_grad(zv, p.activation);
      }
    }
  }
}

// grid (groups, ceil(d / kThreads)); thread owns column `col` of d for the group's rows.
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) adapter_bwd_grad_kernel(BackwardArgs p) {
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t g = blockIdx.x;
  const int64_t n = p.n, d = p.d, r = p.r;
  const int64_t first = g * p.rows_per_group;
  const int64_t last = first + p.rows_per_group < n ? first + p.rows_per_group : n;
  const bool active = col < d;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const W* wd = static_cast<const W*>(p.w_down);

  if (p.dx && active) {
    T* dx = static_cast<T*>(p.dx);
    for (int64_t i = first; i < last; ++i) {
      float s = p.residual_is_x ? to_f<T>(dy[i * p.sdm + col * p.sdd]) : 0.f;
      float acc = 0.f;
      for (int64_t k = 0; k < r; ++k) acc += round_to<T>(p.dz[i * r + k]) * weight<T, W>(wd, k * d + col);
      dx[i * d + col] = from_f<T>(s + acc);
    }
  }
  if (p.dbu_partial && active) {
    float s = 0.f;
    for (int64_t i = first; i < last; ++i) s += to_f<T>(dy[i * p.sdm + col * p.sdd]);
    p.dbu_partial[g * d + col] = s;
  }
  if (!active || (!p.dwd_partial && !p.dwu_partial)) return;
  // weight-gradient partials, kRChunk bottleneck columns per pass over the group's rows
  for (int64_t k0 = 0; k0 < r; k0 += kRChunk) {
    float gwd[kRChunk], gwu[kRChunk];
#pragma unroll
    for (int k = 0; k < kRChunk; ++k) gwd[k] = gwu[k] = 0.f;
    for (int64_t i = first; i < last; ++i) {
      const float xv = to_f<T>(x[i * p.sxm + col * p.sxd]);
      const float gv = to_f<T>(dy[i * p.sdm + col * p.sdd]);
#pragma unroll
      for (int k = 0; k < kRChunk; ++k) {
        if (k0 + k < r) {
          const int64_t idx = i * r + k0 + k;
          if (p.dwd_partial) gwd[k] += round_to<T>(p.dz[idx]) * xv;
          if (p.dwu_partial) gwu[k] += gv * round_to<T>(act_fwd(p.z[idx], p.activation));
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kRChunk; ++k) {
      if (k0 + k < r) {
        if (p.dwd_partial) p.dwd_partial[(g * r + k0 + k) * d + col] = gwd[k];
        if (p.dwu_partial) p.dwu_partial[(g * d + col) * r + k0 + k] = gwu[k];
      }
    }
  }
}

template <typename T, typename W>
cudaError_t launch_forward(const ForwardArgs& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.n + kRows - 1) / kRows);
  adapter_fwd_kernel<T, W><<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t launch_backward(const BackwardArgs& p, cudaStream_t stream) {
  if (p.need_dz) {
    const unsigned blocks = static_cast<unsigned>((p.n + kRows - 1) / kRows);
    adapter_bwd_dz_kernel<T, W><<<blocks, kThreads, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.dx || p.dwd_partial || p.dwu_partial || p.dbu_partial) {
    dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>((p.d + kThreads - 1) / kThreads));
    adapter_bwd_grad_kernel<T, W><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

#define FASTADAPTER_DISPATCH(LAUNCH, ARGS, STREAM)                                                     \
  do {                                                                                                \
    const bool w32 = (ARGS).w_dtype == DType::F32;                                                    \
    switch ((ARGS).x_dtype) {                                                                         \
      case DType::F32: return LAUNCH<float, float>(ARGS, STREAM);                                     \
      case DType::F16: return w32 ? LAUNCH<__half, float>(ARGS, STREAM) : LAUNCH<__half, __half>(ARGS, STREAM); \
      case DType::BF16:                                                                               \
        return w32 ? LAUNCH<__nv_bfloat16, float>(ARGS, STREAM)                                       \
                   : LAUNCH<__nv_bfloat16, __nv_bfloat16>(ARGS, STREAM);                              \
    }                                                                                                 \
    return cudaErrorInvalidValue;                                                                     \
  } while (0)

cudaError_t adapter_forward(const ForwardArgs& args, cudaStream_t stream) {
  if (args.r < 1 || args.r > kMaxBottleneck) return cudaErrorInvalidValue;
  if (args.n == 0) return cudaSuccess;
  FASTADAPTER_DISPATCH(launch_forward, args, stream);
}

cudaError_t adapter_backward(const BackwardArgs& args, cudaStream_t stream) {
  if (args.r < 1 || args.r > kMaxBottleneck) return cudaErrorInvalidValue;
  if (args.n == 0) return cudaSuccess;
  FASTADAPTER_DISPATCH(launch_backward, args, stream);
}

}  // namespace cuda
}  // namespace fastadapter
