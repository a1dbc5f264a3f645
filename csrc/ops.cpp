// The minlora operator library: schemas, input checks, and the CPU / CUDA registrations.
// Python-side fake kernels and autograd live in minlora/ops.py.
#include <torch/library.h>

#include "backend.h"

namespace minlora {
namespace {

bool on_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

// Value checks read index tensors on the host.  On CUDA that is skipped while a graph is
// being captured (a host read would break the capture); the kernels guard indices instead.
bool should_check_values(const LoraArgs& args) { return !on_cuda(args.x) || !cuda::stream_is_capturing(args.x.device()); }

void forward_add(at::Tensor& y, const LoraArgs& args, const Plan* plan) {
  if (args.num_tokens() == 0 || args.num_slots() == 0) return;
  if (on_cuda(args.x)) {
    cuda::lora_forward_add(y, args, plan);
  } else {
    cpu::lora_forward_add(y, args, plan);
  }
}

LoraArgs checked(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool, const at::Tensor& a_pages,
                 const at::Tensor& b_pages, const at::Tensor& ranks, const at::Tensor& scales,
                 const at::Tensor& token_slot, const at::Tensor* order,
                 const at::Tensor* seg_offsets, Plan* plan) {
  LoraArgs args = check_lora_args(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot);
  if (order != nullptr) *plan = check_plan_shapes(args, *order, *seg_offsets);
  if (should_check_values(args)) check_index_values(args, order != nullptr ? plan : nullptr);
  return args;
}

at::Tensor lora_forward(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                        const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                        const at::Tensor& scales, const at::Tensor& token_slot) {
  Plan plan;
  auto args = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, nullptr, nullptr, &plan);
  auto y = at::zeros({args.num_tokens(), args.out_features()}, x.options());
  forward_add(y, args, nullptr);
  return y;
}

void lora_forward_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                       const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                       const at::Tensor& scales, const at::Tensor& token_slot) {
  Plan plan;
  auto args = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, nullptr, nullptr, &plan);
  check_output(args, y);
  forward_add(y, args, nullptr);
}

at::Tensor lora_forward_planned(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                                const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                                const at::Tensor& scales, const at::Tensor& token_slot, const at::Tensor& order,
                                const at::Tensor& seg_offsets) {
  Plan plan;
  auto args = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, &order, &seg_offsets, &plan);
  auto y = at::zeros({args.num_tokens(), args.out_features()}, x.options());
  forward_add(y, args, &plan);
  return y;
}

void lora_forward_planned_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_pool,
                               const at::Tensor& b_pool, const at::Tensor& a_pages, const at::Tensor& b_pages,
                               const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& token_slot,
                               const at::Tensor& order, const at::Tensor& seg_offsets) {
  Plan plan;
  auto args = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, &order, &seg_offsets, &plan);
  check_output(args, y);
  forward_add(y, args, &plan);
}

Grads lora_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& a_pool,
                    const at::Tensor& b_pool, const at::Tensor& a_pages, const at::Tensor& b_pages,
                    const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& token_slot,
                    const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& seg_offsets,
                    std::array<bool, 3> mask) {
  TORCH_CHECK_VALUE(order.has_value() == seg_offsets.has_value(),
                    "order and seg_offsets must be given together (a BatchPlan) or not at all");
  Plan plan;
  auto args = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot,
                      order ? &*order : nullptr, seg_offsets ? &*seg_offsets : nullptr, &plan);
  check_grad_output(args, grad_y);
  const Plan* p = order ? &plan : nullptr;
  if (args.num_tokens() == 0 || args.num_slots() == 0) {
    auto empty = [&](bool want, const at::Tensor& like) {
      return want ? at::zeros_like(like) : at::empty({0}, x.options());
    };
    return {empty(mask[0], args.x), empty(mask[1], a_pool), empty(mask[2], b_pool)};
  }
  return on_cuda(x) ? cuda::lora_backward(grad_y, args, p, mask) : cpu::lora_backward(grad_y, args, p, mask);
}

std::tuple<at::Tensor, at::Tensor> build_plan(const at::Tensor& token_slot, int64_t num_slots) {
  const auto ts = check_token_slot(token_slot, num_slots);
  if (!on_cuda(ts) || !cuda::stream_is_capturing(ts.device())) {
    const auto host = ts.cpu();
    const int32_t* p = host.data_ptr<int32_t>();
    for (int64_t t = 0; t < host.size(0); ++t)
      TORCH_CHECK_VALUE(p[t] >= -1 && p[t] < num_slots, "token_slot[", t, "] = ", p[t],
                        " is outside -1..num_slots-1 = -1..", num_slots - 1);
  }
  Plan plan = on_cuda(ts) ? cuda::build_plan(ts, num_slots) : cpu::build_plan(ts, num_slots);
  return {plan.order, plan.seg_offsets};
}

}  // namespace

TORCH_LIBRARY(minlora, m) {
  m.def("build_plan(Tensor token_slot, int num_slots) -> (Tensor order, Tensor seg_offsets)");
  m.def(
      "lora_forward(Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, Tensor ranks, "
      "Tensor scales, Tensor token_slot) -> Tensor");
  m.def(
      "lora_forward_add_(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, "
      "Tensor ranks, Tensor scales, Tensor token_slot) -> ()");
  m.def(
      "lora_forward_planned(Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, "
      "Tensor ranks, Tensor scales, Tensor token_slot, Tensor order, Tensor seg_offsets) -> Tensor");
  m.def(
      "lora_forward_planned_add_(Tensor(a!) y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, "
      "Tensor b_pages, Tensor ranks, Tensor scales, Tensor token_slot, Tensor order, Tensor seg_offsets) -> ()");
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor a_pool, Tensor b_pool, Tensor a_pages, Tensor b_pages, "
      "Tensor ranks, Tensor scales, Tensor token_slot, Tensor? order, Tensor? seg_offsets, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_a_pool, Tensor grad_b_pool)");
}

#define MINLORA_REGISTER_IMPLS(m)                                  \
  m.impl("build_plan", &build_plan);                               \
  m.impl("lora_forward", &lora_forward);                           \
  m.impl("lora_forward_add_", &lora_forward_add_);                 \
  m.impl("lora_forward_planned", &lora_forward_planned);           \
  m.impl("lora_forward_planned_add_", &lora_forward_planned_add_); \
  m.impl("lora_backward", &lora_backward)

TORCH_LIBRARY_IMPL(minlora, CPU, m) { MINLORA_REGISTER_IMPLS(m); }

#ifdef MINLORA_WITH_CUDA
TORCH_LIBRARY_IMPL(minlora, CUDA, m) { MINLORA_REGISTER_IMPLS(m); }
#endif

}  // namespace minlora
