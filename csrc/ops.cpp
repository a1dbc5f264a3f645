// The schemas of the minlora operators, in one place.  Each backend registers its kernels
// for its own dispatch key (cpu/lora_cpu.cpp, cuda/lora_cuda.cpp); the Python fake kernels
// and autograd live in minlora/ops.py.
#include <torch/library.h>

// order / seg_offsets: an optional BatchPlan (both or neither), so that the plan is built
// once per step and not once per layer.
TORCH_LIBRARY(minlora, m) {
  m.def("build_plan(Tensor token_slot, int num_slots) -> (Tensor order, Tensor seg_offsets)");
  m.def(
      "lora_forward(Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, Tensor ranks, "
      "Tensor scales, Tensor token_slot, Tensor? order=None, Tensor? seg_offsets=None) -> Tensor");
  m.def(
      "lora_forward_add_(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, "
      "Tensor ranks, Tensor scales, Tensor token_slot, Tensor? order=None, Tensor? seg_offsets=None) -> ()");
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, "
      "Tensor ranks, Tensor scales, Tensor token_slot, Tensor? order, Tensor? seg_offsets, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_a_pool, Tensor grad_b_pool)");
}
