// The grouped GEMM path: one GEMM problem per long segment of the BatchPlan (the segments of
// at least grouped_min tokens, lora_index.h's grouped_owns), operands read in place through
// gather indices (token rows by the plan's order, A rows / B columns by the page table) and
// output rows scattered back to token positions.  float16 / bfloat16.  The problems and
// operand descriptors are lora_grouped_desc.h's.  Raw pointers + shapes + stream.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"
#include "lora_index.h"

namespace minlora::kernels {

// One shrink (then, when out is set, expand) over the long segments, in two grouped GEMMs:
//   shrink: hs[pos, 0:r] = alpha * act[order[pos]] @ S_s^T   (M = seg len, N = r, K = act_len;
//           alpha = scale_s when shrink_scaled, else 1; split along K into float32 partial
//           sums when few tokens would leave multiprocessors idle)
//   expand: out[order[pos]] (+)= alpha * hs[pos, 0:r] @ E_s^T  (M = seg len, N = out_len,
//           K = r rounded up to 8; alpha = scale_s when expand_scaled)
// The forward is (act = x, shrink = A pages, expand = B pages, shrink_scaled); grad_x is
// (act = grad_y, shrink = B pages, expand = A pages, expand_scaled).  The shrink accumulates
// in float32 and applies alpha in float32 before rounding hs (DESIGN.md, The math).
// A segment is taken only when its slot's pages below the rank lie in their pools (both
// tables) and each of its positions is trusted and of its slot; otherwise its rows are zeroed
// (write-only) or left alone (accumulate).  So every row is written at most once.
struct GroupedOp {
  PlanView plan;        // with order, seg_offsets and positions
  int64_t grouped_min;  // >= 1: the segments this path owns
  ShrinkExpandOperands ops;
  bool shrink_scaled, expand_scaled;
  void* out;        // [T, out_len] or null (shrink only)
  bool accumulate;  // out += ...; else out = ...
  // hs in caller memory ([T, grouped_hs_width(R)] operand dtype, 16-byte aligned) when it is
  // read afterwards (the pool gradients); null: in the workspace.  Rows in plan order; rows of
  // segments this path does not take, and columns r.., are 0.
  void* hs;
};

// The pool gradient of `ops` for the segments a GroupedOp with the same plan, tables and
// grouped_min took, coef = hs (its output):
//   grad[pages[s, j]] += scale_s * sum over the positions pos of s's segment of hs[pos, j] * v[order[pos]]
//   grad_a: pages = A pages, other = B pages, hs = u = B^T g (unscaled), v = x;
//   grad_b: pages = B pages, other = A pages, hs = h = A x (unscaled), v = grad_y.
// M = r, N = len, K = a range of the segment's positions (splits ranges per segment); atomic
// adds of float32 sums into grad (float32, or the operand dtype).
struct GroupedGradOp {
  PlanView plan;
  int64_t grouped_min;
  PoolGradOperands ops;
  const void* hs;  // [T, grouped_hs_width(R)]
  int32_t splits;
};

// True when this build holds the grouped GEMM kernels (CUTLASS headers were found).
bool grouped_compiled();
// The 16-byte alignment the grouped kernels need: operand base pointers 16-byte aligned, row
// lengths multiples of 8 elements.
bool grouped_aligned(const void* const* ptrs, int num_ptrs, const int64_t* row_lengths, int num_lengths);
// Device workspace a launch needs on a device with sm_count multiprocessors, in bytes.
size_t grouped_workspace_bytes(const GroupedOp& op, DType dtype, int sm_count);
size_t grouped_grad_workspace_bytes(const GroupedGradOp& op, DType dtype);
// workspace: that many bytes of device memory, 256-byte aligned.
cudaError_t launch_grouped(const GroupedOp& op, DType dtype, void* workspace, int sm_count, cudaStream_t stream);
cudaError_t launch_grouped_grad(const GroupedGradOp& op, DType dtype, void* workspace, int sm_count,
                                cudaStream_t stream);

}  // namespace minlora::kernels
