// The fallback kernels (see lora_fallback.cuh).
#include "common.cuh"
#include "lora_fallback.cuh"

namespace minlora::kernels {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ bool valid_page(int32_t page, int64_t num_pages) { return page >= 0 && page < num_pages; }

// The slot and rank of token t, or rank 0 when the token has no (valid) adapter.
__device__ __forceinline__ int token_rank(const int32_t* token_slot, const int32_t* ranks, int64_t num_slots,
                                          int64_t max_rank, int64_t t, int32_t* slot) {
  const int32_t s = token_slot[t];
  *slot = s;
  if (s < 0 || s >= num_slots) return 0;
  return slot_rank(ranks[s], max_rank);
}

// out[j] = scale * <v, pool[pages[j]]> for j < rank; one warp per j.
template <typename T>
__device__ void block_page_dots(const T* v, const T* pool, const int32_t* pages, int64_t num_pages, int64_t len,
                                int rank, float scale, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  for (int j = warp; j < rank; j += num_warps) {
    const int32_t page = pages[j];
    float acc = 0.f;
    if (valid_page(page, num_pages)) {
      const T* row = pool + static_cast<int64_t>(page) * len;
      for (int64_t k = lane; k < len; k += 32) acc += to_float(v[k]) * to_float(row[k]);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[j] = acc * scale;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) shrink_expand_fallback_kernel(ShrinkExpandParams p) {
  extern __shared__ float h[];  // [rank]
  const int64_t t = blockIdx.x;
  int32_t s;
  const int rank = token_rank(p.token_slot, p.ranks, p.num_slots, p.max_rank, t, &s);
  if (rank == 0) return;
  const T* x = static_cast<const T*>(p.x) + t * p.in_features;
  block_page_dots(x, static_cast<const T*>(p.shrink_pool), p.shrink_pages + s * p.max_rank, p.num_shrink_pages,
                  p.in_features, rank, p.scales[s], h);
  __syncthreads();
  T* y = static_cast<T*>(p.y) + t * p.out_features;
  const T* expand_pool = static_cast<const T*>(p.expand_pool);
  const int32_t* pages = p.expand_pages + s * p.max_rank;
  for (int64_t c = threadIdx.x; c < p.out_features; c += blockDim.x) {
    float acc = to_float(y[c]);
    for (int j = 0; j < rank; ++j) {
      const int32_t page = pages[j];
      if (valid_page(page, p.num_expand_pages))
        acc += h[j] * to_float(expand_pool[static_cast<int64_t>(page) * p.out_features + c]);
    }
    y[c] = from_float<T>(acc);
  }
}

// grad_pool[pages[j]] += coef[j] * v for j < rank (float32 atomics: pages may be shared).
template <typename T>
__device__ void block_rank1_updates(float* grad_pool, const T* v, const int32_t* pages, int64_t num_pages,
                                    int64_t len, int rank, const float* coef) {
  for (int64_t c = threadIdx.x; c < len; c += blockDim.x) {
    const float vc = to_float(v[c]);
    for (int j = 0; j < rank; ++j) {
      const int32_t page = pages[j];
      if (valid_page(page, num_pages)) atomicAdd(grad_pool + static_cast<int64_t>(page) * len + c, coef[j] * vc);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pool_grads_fallback_kernel(PoolGradParams p) {
  extern __shared__ float shared[];  // h [max_rank], u [max_rank]
  float* h = shared;
  float* u = shared + p.max_rank;
  const int64_t t = blockIdx.x;
  int32_t s;
  const int rank = token_rank(p.token_slot, p.ranks, p.num_slots, p.max_rank, t, &s);
  if (rank == 0) return;
  const float scale = p.scales[s];
  const T* x = static_cast<const T*>(p.x) + t * p.in_features;
  const T* g = static_cast<const T*>(p.grad_y) + t * p.out_features;
  const int32_t* a_pages = p.a_pages + s * p.max_rank;
  const int32_t* b_pages = p.b_pages + s * p.max_rank;
  // h = scale * A_s x_t feeds dB; u = scale * B_s^T g_t feeds dA.
  block_page_dots(x, static_cast<const T*>(p.a_pool), a_pages, p.num_a_pages, p.in_features, rank, scale, h);
  block_page_dots(g, static_cast<const T*>(p.b_pool), b_pages, p.num_b_pages, p.out_features, rank, scale, u);
  __syncthreads();
  if (p.grad_a != nullptr) block_rank1_updates(p.grad_a, x, a_pages, p.num_a_pages, p.in_features, rank, u);
  if (p.grad_b != nullptr) block_rank1_updates(p.grad_b, g, b_pages, p.num_b_pages, p.out_features, rank, h);
}

template <typename T>
cudaError_t launch_typed_shrink_expand(const ShrinkExpandParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(float) * static_cast<size_t>(p.max_rank);
  shrink_expand_fallback_kernel<T><<<static_cast<unsigned>(p.num_tokens), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed_pool_grads(const PoolGradParams& p, cudaStream_t stream) {
  const size_t smem = 2 * sizeof(float) * static_cast<size_t>(p.max_rank);
  pool_grads_fallback_kernel<T><<<static_cast<unsigned>(p.num_tokens), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_shrink_expand_fallback(const ShrinkExpandParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_slots == 0 || p.max_rank == 0) return cudaSuccess;
  if (p.max_rank > kFallbackMaxRank) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16: return launch_typed_shrink_expand<__half>(p, stream);
    case DType::kBFloat16: return launch_typed_shrink_expand<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return launch_typed_shrink_expand<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_pool_grads_fallback(const PoolGradParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.num_slots == 0 || p.max_rank == 0) return cudaSuccess;
  if (p.max_rank > kFallbackMaxRank) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16: return launch_typed_pool_grads<__half>(p, stream);
    case DType::kBFloat16: return launch_typed_pool_grads<__nv_bfloat16>(p, stream);
    case DType::kFloat32: return launch_typed_pool_grads<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace minlora::kernels
