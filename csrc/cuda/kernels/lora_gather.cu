// Gather kernels (see lora_gather.cuh): decode-shaped LoRA and per-segment pool gradients.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "lora_gather.cuh"

namespace minlora::kernels {
namespace {

constexpr int kThreads = 256;

// Block-wide work of one gather block: slot s, its rank, and up to TOK tokens (-1 = none).
template <int TOK>
struct BlockTokens {
  int64_t tok[TOK];
  int32_t slot;
  int rank;
};

// Fills `bt` for this block; false when the block has nothing to do.  Every thread of the
// block computes the same answer (uniform early exit before any barrier).
template <int TOK>
__device__ __forceinline__ bool block_tokens(const GatherParams& p, BlockTokens<TOK>& bt) {
  const int64_t T = p.num_tokens, S = p.num_slots;
  const int64_t b = blockIdx.x;
#pragma unroll
  for (int i = 0; i < TOK; ++i) bt.tok[i] = -1;
  if (p.order == nullptr) {
    bt.slot = p.token_slot[b];
    if (bt.slot < 0 || bt.slot >= S) return false;
    bt.tok[0] = b;
  } else {
    // Block b starts a chunk when plan position b is a multiple of TOK into its segment.
    const int32_t t0 = p.order[b];
    if (t0 < 0 || t0 >= T) return false;
    const int32_t s = p.token_slot[t0];
    if (s < 0 || s >= S) return false;
    const int64_t begin = clamp_int(p.seg_offsets[s], 0, T);
    const int64_t end = clamp_int(p.seg_offsets[s + 1], begin, T);
    if (b < begin || b >= end) return false;
    if (p.skip_segments_from > 0 && end - begin >= p.skip_segments_from) return false;
    if ((b - begin) % TOK != 0) return false;
    bt.slot = s;
#pragma unroll
    for (int i = 0; i < TOK; ++i) {
      if (b + i < end) {
        const int32_t t = p.order[b + i];
        bool take = t >= 0 && t < T && p.token_slot[t] == s;
#pragma unroll
        for (int k = 0; k < i; ++k) take = take && bt.tok[k] != t;  // a token repeated in this block counts once
        if (take) bt.tok[i] = t;
      }
    }
  }
  bt.rank = slot_rank(p.ranks[bt.slot], p.max_rank);
  return bt.rank > 0;
}

// shared memory: h [TOK][R] float, then shrink pages [R] and expand pages [R] (int, -1 = invalid).
template <typename T, int VEC, int TOK>
__global__ void __launch_bounds__(kThreads) gather_kernel(GatherParams p) {
  BlockTokens<TOK> bt;
  if (!block_tokens<TOK>(p, bt)) return;
  extern __shared__ float smem[];
  const int64_t R = p.max_rank, in = p.in_features, out = p.out_features;
  float* h = smem;
  int32_t* sp = reinterpret_cast<int32_t*>(smem + TOK * R);
  int32_t* ep = sp + R;
  const int r = bt.rank;
  const int64_t s = bt.slot;
  for (int j = threadIdx.x; j < r; j += blockDim.x) {
    const int32_t a = p.shrink_pages[s * R + j], e = p.expand_pages[s * R + j];
    sp[j] = (a >= 0 && a < p.num_shrink_pages) ? a : -1;
    ep[j] = (e >= 0 && e < p.num_expand_pages) ? e : -1;
  }
  if (p.h_in != nullptr) {
    for (int j = threadIdx.x; j < r; j += blockDim.x) {
#pragma unroll
      for (int i = 0; i < TOK; ++i) h[i * R + j] = bt.tok[i] >= 0 ? p.h_in[bt.tok[i] * R + j] : 0.f;
    }
    __syncthreads();
  } else {
    __syncthreads();
    // Shrink: one warp per rank row j; the page row is streamed once for all TOK tokens.
    const T* x = static_cast<const T*>(p.x);
    const T* pool = static_cast<const T*>(p.shrink_pool);
    const float scale = p.scales[s];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, num_warps = blockDim.x >> 5;
    constexpr int U = 4;  // independent 16-byte loads in flight per thread
    const int64_t step = 32 * VEC;
    for (int j = warp; j < r; j += num_warps) {
      float acc[TOK];
#pragma unroll
      for (int i = 0; i < TOK; ++i) acc[i] = 0.f;
      const int32_t page = sp[j];
      if (page >= 0) {
        const T* row = pool + static_cast<int64_t>(page) * in;
        int64_t k = lane * VEC;
        for (; k + (U - 1) * step < in; k += U * step) {
          float w[U][VEC];
#pragma unroll
          for (int u = 0; u < U; ++u) load_vec_stream<T, VEC>(row + k + u * step, w[u]);
#pragma unroll
          for (int i = 0; i < TOK; ++i) {
            if (bt.tok[i] < 0) continue;
            const T* xr = x + bt.tok[i] * in + k;
#pragma unroll
            for (int u = 0; u < U; ++u) {
              float xv[VEC];
              load_vec<T, VEC>(xr + u * step, xv);
#pragma unroll
              for (int v = 0; v < VEC; ++v) acc[i] += w[u][v] * xv[v];
            }
          }
        }
        for (; k < in; k += step) {
          float w[VEC];
          load_vec_stream<T, VEC>(row + k, w);
#pragma unroll
          for (int i = 0; i < TOK; ++i) {
            if (bt.tok[i] < 0) continue;
            float xv[VEC];
            load_vec<T, VEC>(x + bt.tok[i] * in + k, xv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[i] += w[v] * xv[v];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < TOK; ++i) acc[i] = warp_sum(acc[i]);
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < TOK; ++i) h[i * R + j] = acc[i] * scale;
      }
    }
    __syncthreads();
  }
  if (p.h_out != nullptr) {
#pragma unroll
    for (int i = 0; i < TOK; ++i) {
      if (bt.tok[i] < 0) continue;
      for (int j = threadIdx.x; j < r; j += blockDim.x) p.h_out[bt.tok[i] * R + j] = h[i * R + j];
    }
    return;
  }
  // Expand: each thread owns VEC columns; every page row is read once for all TOK tokens.
  const T* pool = static_cast<const T*>(p.expand_pool);
  T* y = static_cast<T*>(p.y);
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < out; c += static_cast<int64_t>(blockDim.x) * VEC) {
    float acc[TOK][VEC];
#pragma unroll
    for (int i = 0; i < TOK; ++i)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[i][v] = 0.f;
#pragma unroll 4
    for (int j = 0; j < r; ++j) {
      const int32_t page = ep[j];
      if (page < 0) continue;
      float bv[VEC];
      load_vec_stream<T, VEC>(pool + static_cast<int64_t>(page) * out + c, bv);
#pragma unroll
      for (int i = 0; i < TOK; ++i) {
        const float hv = h[i * R + j];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[i][v] += hv * bv[v];
      }
    }
#pragma unroll
    for (int i = 0; i < TOK; ++i) {
      if (bt.tok[i] < 0) continue;
      T* yr = y + bt.tok[i] * out + c;
      float yv[VEC];
      load_vec<T, VEC>(yr, yv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) yv[v] += acc[i][v];
      store_vec<T, VEC>(yr, yv);
    }
  }
}

// Block (32, 8): threadIdx.x owns VEC columns, threadIdx.y owns ranks j = j0 + y + 8 q.
constexpr int kGradRankGroups = 8;
constexpr int kGradRanksPerThread = 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kGradRankGroups) segment_grad_kernel(SegmentGradParams p) {
  const int64_t T_ = p.num_tokens, R = p.max_rank, len = p.len;
  const int64_t s = blockIdx.x;
  if (s >= p.num_slots) return;
  const int r = slot_rank(p.ranks[s], R);
  if (r == 0) return;
  const int64_t begin = clamp_int(p.seg_offsets[s], 0, T_);
  const int64_t end = clamp_int(p.seg_offsets[s + 1], begin, T_);
  const int64_t splits = p.token_splits > 0 ? p.token_splits : 1;
  const int64_t per = (end - begin + splits - 1) / splits;
  const int64_t tb = begin + blockIdx.z * per;
  const int64_t te = tb + per < end ? tb + per : end;
  if (tb >= te) return;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x) * VEC;
  if (c >= len) return;
  const T* v = static_cast<const T*>(p.v);
  const T* coef_plan = static_cast<const T*>(p.coef_plan);
  T* grad = static_cast<T*>(p.grad_pool);
  constexpr int J = kGradRanksPerThread;
  for (int j0 = 0; j0 < r; j0 += kGradRankGroups * J) {
    float acc[J][VEC];
#pragma unroll
    for (int q = 0; q < J; ++q)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[q][e] = 0.f;
    for (int64_t pos = tb; pos < te; ++pos) {
      const int32_t t = p.order[pos];
      if (t < 0 || t >= T_ || p.token_slot[t] != s) continue;
      float vv[VEC];
      load_vec<T, VEC>(v + t * len + c, vv);
#pragma unroll
      for (int q = 0; q < J; ++q) {
        const int j = j0 + threadIdx.y + kGradRankGroups * q;
        if (j < r) {
          const float cf = coef_plan != nullptr ? to_float(coef_plan[pos * p.coef_ld + j]) : p.coef[t * R + j];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[q][e] += cf * vv[e];
        }
      }
    }
#pragma unroll
    for (int q = 0; q < J; ++q) {
      const int j = j0 + threadIdx.y + kGradRankGroups * q;
      if (j >= r) continue;
      const int32_t page = p.pages[s * R + j];
      if (page < 0 || page >= p.num_pages) continue;
      atomic_add_vec<VEC>(grad + static_cast<int64_t>(page) * len + c, acc[q]);
    }
  }
}

template <typename T, int VEC, int TOK>
cudaError_t launch_gather_typed(const GatherParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(float) * static_cast<size_t>((TOK + 2) * p.max_rank);
  gather_kernel<T, VEC, TOK><<<static_cast<unsigned>(p.num_tokens), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_gather_vec(const GatherParams& p, cudaStream_t stream) {
  return p.order != nullptr ? launch_gather_typed<T, VEC, kGatherTokens>(p, stream)
                            : launch_gather_typed<T, VEC, 1>(p, stream);
}

template <typename T, int VEC>
cudaError_t launch_segment_grad_typed(const SegmentGradParams& p, cudaStream_t stream) {
  const int64_t col_tiles = (p.len + 32 * VEC - 1) / (32 * VEC);
  const dim3 grid(static_cast<unsigned>(p.num_slots), static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(p.token_splits > 0 ? p.token_splits : 1));
  segment_grad_kernel<T, VEC><<<grid, dim3(32, kGradRankGroups), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool rows_are_16b_aligned(const void* const* ptrs, int num_ptrs, const int64_t* row_bytes, int num_rows) {
  for (int i = 0; i < num_ptrs; ++i)
    if (ptrs[i] != nullptr && reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  for (int i = 0; i < num_rows; ++i)
    if (row_bytes[i] % 16 != 0) return false;
  return true;
}

cudaError_t launch_gather(const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_slots == 0 || p.max_rank == 0) return cudaSuccess;
  if (p.max_rank > kGatherMaxRank || p.num_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  if ((p.order == nullptr) != (p.seg_offsets == nullptr)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16:
      return vectorized ? launch_gather_vec<__half, 8>(p, stream) : launch_gather_vec<__half, 1>(p, stream);
    case DType::kBFloat16:
      return vectorized ? launch_gather_vec<__nv_bfloat16, 8>(p, stream)
                        : launch_gather_vec<__nv_bfloat16, 1>(p, stream);
    case DType::kFloat32:
      return vectorized ? launch_gather_vec<float, 4>(p, stream) : launch_gather_vec<float, 1>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_segment_grad(const SegmentGradParams& p, DType dtype, bool vectorized, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_slots == 0 || p.max_rank == 0 || p.len == 0) return cudaSuccess;
  if (p.num_slots > 0x7fffffff || p.token_splits > 65535) return cudaErrorInvalidValue;
  if ((p.len + 31) / 32 > 65535) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16:
      return vectorized ? launch_segment_grad_typed<__half, 8>(p, stream)
                        : launch_segment_grad_typed<__half, 1>(p, stream);
    case DType::kBFloat16:
      return vectorized ? launch_segment_grad_typed<__nv_bfloat16, 8>(p, stream)
                        : launch_segment_grad_typed<__nv_bfloat16, 1>(p, stream);
    case DType::kFloat32:
      return vectorized ? launch_segment_grad_typed<float, 4>(p, stream)
                        : launch_segment_grad_typed<float, 1>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace minlora::kernels
