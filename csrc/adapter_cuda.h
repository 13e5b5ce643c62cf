// Launcher interface of the CUDA kernels (adapter_cuda.cu). Plain C++ and CUDA runtime
// types only, so the .cu file compiles without torch headers; the torch binding
// (adapter_cuda_binding.cpp) fills these structs from tensors.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastadapter {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct ForwardArgs {
  const void* x;        // [N, d], strides sxm, sxd, dtype x_dtype
  const void* w_down;   // [r, d] contiguous, dtype w_dtype
  const void* b_down;   // [r] or nullptr, dtype w_dtype
  const void* w_up;     // [d, r] contiguous, dtype w_dtype
  const void* b_up;     // [d] or nullptr, dtype w_dtype
  const void* res;      // [N, d] residual tensor (x's dtype) or nullptr, strides srm, srd
  void* y;              // [N, d] contiguous, x's dtype
  float* z;             // [N, r] contiguous fp32
  int64_t n, d, r;
  int64_t sxm, sxd, srm, srd;
  DType x_dtype, w_dtype;
  int activation;       // index in fastadapter.activations.ACTIVATIONS
  float scaling;
  bool residual_is_x;
};

struct BackwardArgs {
  const void* dy;       // [N, d], strides sdm, sdd, x's dtype
  const void* x;        // [N, d], strides sxm, sxd
  const float* z;       // [N, r] contiguous fp32
  const void* w_down;   // [r, d] contiguous
  const void* w_up;     // [d, r] contiguous
  float* dz;            // [N, r] fp32 scratch (written by the first kernel)
  void* dx;             // [N, d] contiguous x's dtype, or nullptr
  float* dwd_partial;   // [groups, r, d] or nullptr
  float* dwu_partial;   // [groups, d, r] or nullptr
  float* dbu_partial;   // [groups, d] or nullptr
  int64_t n, d, r;
  int64_t sdm, sdd, sxm, sxd;
  int64_t rows_per_group, groups;
  DType x_dtype, w_dtype;
  int activation;
  float scaling;
  bool residual_is_x;
  bool need_dz;         // run the first kernel (dx, dW_down or db_down needed)
};

constexpr int kMaxBottleneck = 256;

cudaError_t adapter_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t adapter_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastadapter
