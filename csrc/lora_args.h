// Shared argument view and input checks of the minlora LoRA ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace minlora {

// The operands of one LoRA op call, after validation (see DESIGN.md "The op contract").
//   x [T, in], a_pool [Pa, in], b_pool [Pb, out], a_pages / b_pages [S, R] int32,
//   ranks [S] int32, scales [S] float32, token_slot [T] int32.
struct LoraArgs {
  at::Tensor x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot;
  int64_t num_tokens() const { return x.size(0); }
  int64_t in_features() const { return x.size(1); }
  int64_t out_features() const { return b_pool.size(1); }
  int64_t num_slots() const { return ranks.size(0); }
  int64_t max_rank() const { return a_pages.size(1); }
};

// A BatchPlan: tokens of slot s are order[seg_offsets[s] : seg_offsets[s + 1]];
// tokens with slot -1 follow seg_offsets[S].  order [T] int32, seg_offsets [S + 1] int32.
struct Plan {
  at::Tensor order, seg_offsets;
};

// Checks dtypes, devices, shapes and contiguity; returns the arguments with x and the
// small index tensors made contiguous.  Throws c10 errors (RuntimeError / ValueError)
// naming the argument.  Index *values* are checked by check_index_values.
LoraArgs check_lora_args(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                         const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                         const at::Tensor& scales, const at::Tensor& token_slot);

// Checks a plan's shapes against the arguments.
Plan check_plan_shapes(const LoraArgs& args, const at::Tensor& order, const at::Tensor& seg_offsets);

// Checks the values of ranks (0..R), token_slot (-1..S-1) and the page-table entries
// j < ranks[s] (0..P-1).  Entries past a slot's rank are never read.  When `plan` is
// given, also checks it is the plan of token_slot.  Reads the tensors on the host
// (copies them there when they live on a device).
void check_index_values(const LoraArgs& args, const Plan* plan);

// Checks y, the output of an accumulating variant: [T, out], dtype and device of x, contiguous.
void check_output(const LoraArgs& args, const at::Tensor& y);

// Checks grad_y of the backward: [T, out], dtype and device of x.
void check_grad_output(const LoraArgs& args, const at::Tensor& grad_y);

// Checks token_slot for the plan builder and returns it contiguous.
at::Tensor check_token_slot(const at::Tensor& token_slot, int64_t num_slots);

}  // namespace minlora
