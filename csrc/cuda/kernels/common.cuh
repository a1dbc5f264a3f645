// Device helpers shared by the minlora kernels: element conversions, 16-byte vectors,
// atomics and block-wide helpers.  No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace minlora::kernels {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements of T loaded or stored as one access: 16 bytes when VEC * sizeof(T) == 16
// (the caller checked the alignment of every row pointer), else element by element.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  const Vec<T, VEC> r = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(r.v[i]);
}

// Loads through the read-only path: adapter pages are streamed once per block.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec_stream(const T* p, float (&out)[VEC]) {
  Vec<T, VEC> r;
  if constexpr (sizeof(Vec<T, VEC>) == 16) {
    const int4 raw = __ldg(reinterpret_cast<const int4*>(p));
    r = *reinterpret_cast<const Vec<T, VEC>*>(&raw);
  } else {
    r = *reinterpret_cast<const Vec<T, VEC>*>(p);
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(r.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Vec<T, VEC> r;
#pragma unroll
  for (int i = 0; i < VEC; ++i) r.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = r;
}

// p[0] += a, p[1] += b as one 32-bit packed atomic (p 4-byte aligned; sm_80+ for bfloat16).
__device__ __forceinline__ void atomic_add_pair(__half* p, float a, float b) {
  atomicAdd(reinterpret_cast<__half2*>(p), __floats2half2_rn(a, b));
}
__device__ __forceinline__ void atomic_add_pair(__nv_bfloat16* p, float a, float b) {
  atomicAdd(reinterpret_cast<__nv_bfloat162*>(p), __floats2bfloat162_rn(a, b));
}

// p[i] += in[i] with atomics (pages may be shared by several slots).  Pairs of 16-bit
// elements go through the packed atomics when p is 4-byte aligned.  Unrolled over N so `in`
// stays in registers.
template <int N, typename T>
__device__ __forceinline__ void atomic_add_vec(T* p, const float (&in)[N]) {
  if constexpr (!std::is_same_v<T, float>) {
    if (N % 2 == 0 && (reinterpret_cast<uintptr_t>(p) & 3) == 0) {
#pragma unroll
      for (int i = 0; i + 1 < N; i += 2) atomic_add_pair(p + i, in[i], in[i + 1]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) atomicAdd(p + i, from_float<T>(in[i]));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The thread's index in its block and the block's size, for blocks of any shape.
__device__ __forceinline__ int flat_thread() { return threadIdx.x + threadIdx.y * blockDim.x; }
__device__ __forceinline__ int block_threads() { return blockDim.x * blockDim.y; }

}  // namespace minlora::kernels
