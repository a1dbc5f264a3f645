// The grouped GEMM path: one GEMM problem per long segment of the BatchPlan, operands read
// in place through gather indices (token rows by the plan's order, A rows / B columns by
// the page table) and output rows scattered back to token positions.  float16 / bfloat16.
// Raw pointers + shapes + stream; no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"

namespace minlora::kernels {

// y[t] += scale_s * E_s (S_s x[t]) for the tokens of every segment with at least
// min_segment tokens (the others are left to the gather kernel), in two grouped GEMMs:
//   shrink: hs[pos, 0:r] = scale_s * x[order[pos]] @ S_s^T     (M = seg len, N = r, K = in)
//   expand: y[order[pos]] += hs[pos, 0:r] @ E_s^T               (M = seg len, N = out, K = r
//           rounded up to 8: hs's 16-byte loads stay aligned; hs is 0 in the padded columns)
// hs [T, ldh] (operand dtype) is the intermediate in plan order; the shrink accumulates
// in float32 and scales in float32 before rounding hs (DESIGN.md, The math).
struct GroupedParams {
  const void* x;  // [T, in]
  void* y;        // [T, out], accumulated in place
  const void* shrink_pool;  // [Ps, in]
  const void* expand_pool;  // [Pe, out]
  const int32_t* shrink_pages;
  const int32_t* expand_pages;
  const int32_t* ranks;
  const float* scales;
  const int32_t* token_slot;
  const int32_t* order;
  const int32_t* seg_offsets;
  int64_t num_tokens, num_slots, max_rank, in_features, out_features, num_shrink_pages, num_expand_pages;
  int64_t min_segment;  // >= 1
  // Optional: hs in caller memory ([T, grouped_hs_width(R)] of the operand dtype, 16-byte
  // aligned) so it can be read afterwards (the backward's pool gradients use it); null = in
  // the workspace.  Rows are in plan order; rows of segments this path skips stay 0.
  void* hs;
  bool skip_expand;  // shrink only (y may be null)
};

// True when this build holds the grouped GEMM kernels (CUTLASS headers were found).
bool grouped_compiled();
// The 16-byte alignment the grouped kernels need: x, y and pool base pointers 16-byte
// aligned, in and out multiples of 8 elements.
bool grouped_aligned(const GroupedParams& p);
// Device workspace launch_grouped needs for these parameters on a device with sm_count
// multiprocessors, in bytes.
size_t grouped_workspace_bytes(const GroupedParams& p, int sm_count);
// workspace: grouped_workspace_bytes(...) bytes of device memory, 256-byte aligned.
// sm_count: multiprocessors of the device (sizes the persistent grid).
cudaError_t launch_grouped(const GroupedParams& p, DType dtype, void* workspace, int sm_count, cudaStream_t stream);

}  // namespace minlora::kernels
