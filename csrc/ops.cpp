// The schemas of the minlora operators, in one place.  Each backend registers its kernels
// for its own dispatch key (cpu/lora_cpu.cpp, cuda/lora_cuda.cpp); the Python fake kernels
// and autograd live in minlora/ops.py.
#include <torch/library.h>

// order / seg_offsets: an optional BatchPlan (both or neither), so that the plan is built
// once per step and not once per layer; positions: the plan's inverse permutation
// (plan_positions(order); computed by the op when not given); max_segment: the plan's longest
// segment when the caller knows it on the host (which kernels to launch; never the results).
TORCH_LIBRARY(minlora, m) {
  m.def("build_plan(Tensor token_slot, int num_slots) -> (Tensor order, Tensor seg_offsets)");
  m.def("plan_positions(Tensor order) -> Tensor positions");
  m.def(
      "lora_forward(Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, Tensor ranks, "
      "Tensor scales, Tensor token_slot, Tensor? order=None, Tensor? seg_offsets=None, Tensor? positions=None, "
      "int? max_segment=None) -> Tensor");
  m.def(
      "lora_forward_add_(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, "
      "Tensor ranks, Tensor scales, Tensor token_slot, Tensor? order=None, Tensor? seg_offsets=None, "
      "Tensor? positions=None, int? max_segment=None) -> ()");
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, "
      "Tensor ranks, Tensor scales, Tensor token_slot, Tensor? order, Tensor? seg_offsets, bool[3] output_mask, "
      "Tensor? positions=None, int? max_segment=None) -> (Tensor grad_x, Tensor grad_a_pool, Tensor grad_b_pool)");
  // grad_a_acc [Pa, in] / grad_b_acc [Pb, out], float32 with the pools' page numbering, get the
  // batch's dA / dB rows added (only the pages the batch uses are touched); returns grad_x
  // [T, in] when grad_x, else an empty tensor.
  m.def(
      "lora_backward_accumulate_(Tensor(a!) grad_a_acc, Tensor(b!) grad_b_acc, Tensor grad_y, Tensor x, "
      "Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, Tensor ranks, Tensor scales, "
      "Tensor token_slot, Tensor? order=None, Tensor? seg_offsets=None, Tensor? positions=None, "
      "int? max_segment=None, bool grad_x=True) -> Tensor grad_x");
}
