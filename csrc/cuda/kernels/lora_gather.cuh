// The gather kernels: LoRA on paged adapter memory for short segments (decode), the pool
// gradients of those segments, and the plan's positions.  Pages are read in place through
// the page tables with 16-byte loads where every row is 16-byte aligned (scalar loads
// otherwise), float32 accumulation.  Which block handles which token is lora_index.h's
// gather_group; the grids are dispatch.h's GatherLaunch.  Raw pointers + shapes + stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dispatch.h"
#include "kernel_types.h"
#include "lora_index.h"

namespace minlora::kernels {

// One shrink-then-expand for one operand ordering:
//   forward: x, (a_pool, a_pages) shrink, (b_pool, b_pages) expand, into y;
//   grad_x:  grad_y, (b_pool, b_pages) shrink, (a_pool, a_pages) expand, into grad_x.
// For a token t that the gather kernels own (token_owner) with slot s and rank r:
//   partial[split, t, j] = <x[t, k-range of split], shrink_pool[shrink_pages[s, j], same range]>   (float32, unscaled)
//   y[t, c] (+)= scales[s] * sum_j (sum_split partial[split, t, j]) * expand_pool[expand_pages[s, j], c]
// The scale is applied in float32 to the float32 sums; nothing is rounded before the output.
// A slot with a page below its rank outside its pool (in either table) counts as no adapter:
// its tokens get zeros (write-only) or nothing (accumulate).  In the write-only form, rows of
// tokens no path owns (no slot, rank 0, untrusted position) are written with zeros, so every
// row of y is written exactly once by exactly one block (with the grouped path, which writes
// the rows of the segments it owns).
struct GatherParams {
  PlanView plan;
  GatherMode mode;
  ShrinkExpandOperands ops;  // x [T, in] (act), shrink pages (rows of in), expand pages (rows of out)
  void* y;              // [T, out]
  bool accumulate;      // y += delta; else y = delta, and zeros in rows no path owns
  float* partial;       // [launch.k_splits, T, R]: the shrink's partial sums (split form and backward)
  GatherLaunch launch;
};

// grad[pages[s, j]] += scales[s] * sum over the gather-owned tokens t of slot s (segment_grad_token)
//   of coef[t, j] * v[t],   coef[t, j] = sum_split partial[split, t, j]   for j < ranks[s]:
//   grad_a_pool: v = x,      partial from the shrink of grad_y with b_pool (u = B^T g),
//   grad_b_pool: v = grad_y, partial from the shrink of x with a_pool (h = A x).
// One block per (slot, column tile, position range); float32 sums, one atomic add per element
// and block into grad, which is float32 (accumulators) or the operand dtype (the functional
// backward's gradient): pages may be shared by several slots and rank indices.
struct SegmentGradParams {
  PlanView plan;
  GatherMode mode;  // of the shrink that wrote `partial`
  PoolGradOperands ops;
  const float* partial;  // [k_splits, T, R]
  int32_t k_splits;
  int32_t token_splits;  // blocks per segment along its positions
};

// True when every row the kernels touch starts on a 16-byte boundary, so the 16-byte paths
// may be used: base pointers 16-byte aligned and row lengths (in bytes) multiples of 16.
bool rows_are_16b_aligned(const void* const* ptrs, int num_ptrs, const int64_t* row_bytes, int num_rows);

// The fused kernel (p.launch.fused): one block per group, shrink into shared memory, expand.
cudaError_t launch_gather_fused(const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream);
// The split form: the shrink writes p.partial (k_splits blocks per group) ...
cudaError_t launch_gather_shrink(const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream);
// ... and the expand reads it (n_tiles blocks per group) and writes y (also the zero rows).
cudaError_t launch_gather_expand(const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream);
cudaError_t launch_segment_grad(const SegmentGradParams& p, DType dtype, bool vectorized, cudaStream_t stream);

// positions[t] = q for order[q] = t (each t in 0..T-1 at most once; -1 where order has no q for
// t; out-of-range entries of order are skipped; when order repeats a token one of its
// positions is kept).  positions: [T] int32 device memory.
cudaError_t launch_plan_positions(const int32_t* order, int64_t num_tokens, int32_t* positions, cudaStream_t stream);

}  // namespace minlora::kernels
