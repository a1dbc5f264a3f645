// Per-device implementations behind the minlora ops.  ops.cpp validates the inputs and
// calls these; they may assume valid shapes, dtypes and index values.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "lora_args.h"

namespace minlora {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

namespace cpu {
// y[T, out] += LoRA delta.  `plan` may be null (then it is built here).
void lora_forward_add(at::Tensor& y, const LoraArgs& args, const Plan* plan);
// (grad_x [T, in], grad_a_pool [Pa, in], grad_b_pool [Pb, out]); a gradient not asked for
// by output_mask is an empty tensor.
Grads lora_backward(const at::Tensor& grad_y, const LoraArgs& args, const Plan* plan,
                    std::array<bool, 3> output_mask);
Plan build_plan(const at::Tensor& token_slot, int64_t num_slots);
}  // namespace cpu

namespace cuda {
bool available();
// True while the current CUDA stream of `device` is being captured into a graph: host reads of
// device memory (value checks) are then skipped; the kernels guard every index instead.
bool stream_is_capturing(const at::Device& device);
void lora_forward_add(at::Tensor& y, const LoraArgs& args, const Plan* plan);
Grads lora_backward(const at::Tensor& grad_y, const LoraArgs& args, const Plan* plan,
                    std::array<bool, 3> output_mask);
Plan build_plan(const at::Tensor& token_slot, int64_t num_slots);
}  // namespace cuda

}  // namespace minlora
