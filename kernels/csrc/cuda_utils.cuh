// Helpers shared by the CUDA sources: float conversion of the storage types, warp reductions.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace esvit {

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float<at::Half>(at::Half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<at::BFloat16>(at::BFloat16 x) {
  return static_cast<float>(x);
}
template <typename T> __device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace esvit
