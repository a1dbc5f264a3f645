// The fallback CUDA LoRA kernels: one thread block per token, pages read in place through
// the page tables, float32 accumulation.  Correct for every shape, including page tables too
// wide for the gather kernels (R > kGatherMaxRank); the fast kernels are lora_gather and
// lora_grouped.  Raw pointers, shapes and a stream: no torch headers here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace minlora::kernels {

// y[t] += scale_s * E_s (S_s x[t]) for every token t with slot s = token_slot[t] >= 0,
// where row j of S_s is shrink_pool[shrink_pages[s, j]] (length in) and column j of E_s
// is expand_pool[expand_pages[s, j]] (length out), for j < ranks[s].
// The forward is (x, a_pool, b_pool); grad_x is (grad_y, b_pool, a_pool).
// Out-of-range slots or pages contribute nothing (never read out of bounds).
struct ShrinkExpandParams {
  const void* x;            // [num_tokens, in]
  void* y;                  // [num_tokens, out], accumulated in place
  const void* shrink_pool;  // [num_shrink_pages, in]
  const void* expand_pool;  // [num_expand_pages, out]
  const int32_t* shrink_pages;  // [num_slots, max_rank]
  const int32_t* expand_pages;  // [num_slots, max_rank]
  const int32_t* ranks;         // [num_slots]
  const float* scales;          // [num_slots]
  const int32_t* token_slot;    // [num_tokens]
  int64_t num_tokens, num_slots, max_rank, in_features, out_features, num_shrink_pages, num_expand_pages;
};

// grad_a[pa_j] += scale_s (B_s^T g_t)_j x_t and grad_b[pb_j] += scale_s (A_s x_t)_j g_t, in
// float32 with atomics; grad_a or grad_b may be null (not wanted).
struct PoolGradParams {
  const void* x;       // [num_tokens, in]
  const void* grad_y;  // [num_tokens, out]
  const void* a_pool;  // [num_a_pages, in]
  const void* b_pool;  // [num_b_pages, out]
  const int32_t* a_pages;
  const int32_t* b_pages;
  const int32_t* ranks;
  const float* scales;
  const int32_t* token_slot;
  float* grad_a;  // [num_a_pages, in] or null
  float* grad_b;  // [num_b_pages, out] or null
  int64_t num_tokens, num_slots, max_rank, in_features, out_features, num_a_pages, num_b_pages;
};

// Both take R <= kFallbackMaxRank.
cudaError_t launch_shrink_expand_fallback(const ShrinkExpandParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_pool_grads_fallback(const PoolGradParams& p, DType dtype, cudaStream_t stream);

}  // namespace minlora::kernels
