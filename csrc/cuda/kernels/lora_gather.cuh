// The gather kernels: LoRA on paged adapter memory for short segments (decode), and the
// per-segment pool gradients.  Pages are read in place through the page tables with
// 16-byte loads where every row is 16-byte aligned (the launcher falls back to scalar
// loads otherwise), float32 accumulation.  Raw pointers + shapes + stream; no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace minlora::kernels {

// One call of the shrink / expand pair for one operand ordering:
//   forward: (x, a_pool, a_pages) shrink, (b_pool, b_pages) expand, into y;
//   grad_x:  (grad_y, b_pool, b_pages) shrink, (a_pool, a_pages) expand, into grad_x.
// For token t of slot s = token_slot[t] with r = ranks[s]:
//   h[t, j] = scales[s] * <x[t], shrink_pool[shrink_pages[s, j]]>     j < r   (float32)
//   y[t, c] += sum_j h[t, j] * expand_pool[expand_pages[s, j], c]
// Modes: h_in != null skips the shrink (h read from h_in [T, R]); h_out != null skips the
// expand (h written to h_out [T, R]; columns j >= r of a token's row are not written).
// With a plan (order, seg_offsets: tokens of slot s are order[seg_offsets[s]:seg_offsets[s+1]])
// a block takes up to kGatherTokens (kernel_types.h) tokens of one slot, so pages are read once per block;
// without one, a block takes one token.  Segments of at least skip_segments_from tokens
// are skipped (the grouped path takes them); 0 skips none.
// Every index is guarded: slots outside 0..S-1, ranks outside 1..R are skipped, pages
// outside the pool contribute nothing, plan positions whose token is not of the segment's
// slot (or repeats a token of the same block) are skipped.  A plan repeating a token of a
// slot at distant positions of its segment (never one from build_plan; refused by the host
// check) can add that token's delta more than once, never out of bounds.
struct GatherParams {
  const void* x;        // [T, in]
  void* y;              // [T, out], accumulated in place (unused when h_out is set)
  const float* h_in;    // [T, R] or null
  float* h_out;         // [T, R] or null
  const void* shrink_pool;      // [Ps, in]
  const void* expand_pool;      // [Pe, out]
  const int32_t* shrink_pages;  // [S, R]
  const int32_t* expand_pages;  // [S, R]
  const int32_t* ranks;         // [S]
  const float* scales;          // [S]
  const int32_t* token_slot;    // [T]
  const int32_t* order;         // [T] or null
  const int32_t* seg_offsets;   // [S + 1] or null (with order)
  int64_t num_tokens, num_slots, max_rank, in_features, out_features, num_shrink_pages, num_expand_pages;
  int64_t skip_segments_from;
};

// grad_pool[pages[s, j]] += sum_{t in segment s} coef[t, j] * v[t] for j < ranks[s]:
//   grad_a_pool: v = x,      coef = u = scale_s * B_s^T g_t  (shrink of grad_y),
//   grad_b_pool: v = grad_y, coef = h = scale_s * A_s x_t     (shrink of x).
// One thread block per (slot, column tile, token split); accumulation in float32, one
// atomic add per element and split into grad_pool (pages may be shared by slots).
// coef comes either from coef ([T, R] float32, row = token) or, when coef_plan is set, from
// coef_plan ([T, coef_ld] operand dtype, row = plan position: the grouped path's hs).
struct SegmentGradParams {
  const void* v;         // [T, len]
  const float* coef;     // [T, R] or null
  const void* coef_plan;  // [T, coef_ld] or null
  int64_t coef_ld;
  void* grad_pool;       // [P, len], accumulated in place
  const int32_t* pages;  // [S, R]
  const int32_t* ranks;
  const int32_t* token_slot;
  const int32_t* order;        // [T]
  const int32_t* seg_offsets;  // [S + 1]
  int64_t num_tokens, num_slots, max_rank, len, num_pages;
  int32_t token_splits;  // >= 1: each segment's tokens are split among this many blocks
};

// True when every row the kernels touch starts on a 16-byte boundary, so the 16-byte paths
// may be used: base pointers 16-byte aligned and row lengths (in bytes) multiples of 16.
bool rows_are_16b_aligned(const void* const* ptrs, int num_ptrs, const int64_t* row_bytes, int num_rows);

cudaError_t launch_gather(const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream);
cudaError_t launch_segment_grad(const SegmentGradParams& p, DType dtype, bool vectorized, cudaStream_t stream);

}  // namespace minlora::kernels
