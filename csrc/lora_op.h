// The minlora LoRA ops between their schemas (ops.cpp) and the per-device backends: the
// validated argument view, the argument checks, and the op front-end every backend
// registers for its dispatch key (cpu/lora_cpu.cpp, cuda/lora_cuda.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

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

// (grad_x [T, in], grad_a_pool [Pa, in], grad_b_pool [Pb, out]); a gradient not asked for
// by the output mask is an empty tensor.
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// ---- argument checks (lora_op.cpp); each throws a c10 error (RuntimeError / ValueError)
// naming the argument.

// Dtypes, devices, shapes and contiguity; returns the arguments with x and the small
// index tensors made contiguous.  Index *values* are checked by check_index_values.
LoraArgs check_lora_args(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                         const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                         const at::Tensor& scales, const at::Tensor& token_slot);

// A plan's shapes and devices against the arguments; nullopt when neither tensor is given.
std::optional<Plan> check_plan(const LoraArgs& args, const std::optional<at::Tensor>& order,
                               const std::optional<at::Tensor>& seg_offsets);

// The values of ranks (0..R), token_slot (-1..S-1) and the page-table entries j < ranks[s]
// (0..P-1); entries past a slot's rank are never read.  When `plan` is given, also that it
// is the plan of token_slot.  Reads the tensors on the host (copies them there from a device).
void check_index_values(const LoraArgs& args, const Plan* plan);

// y of the accumulating form: [T, out], dtype and device of x, contiguous.
void check_output(const LoraArgs& args, const at::Tensor& y);

// grad_y of the backward: [T, out], dtype and device of x.
void check_grad_output(const LoraArgs& args, const at::Tensor& grad_y);

// token_slot of the plan builder (int32, 1-D) and num_slots >= 0; returns it contiguous.
at::Tensor check_token_slot(const at::Tensor& token_slot, int64_t num_slots);

// token_slot's values are in -1..num_slots-1 (read on the host).
void check_token_slot_values(const at::Tensor& token_slot, int64_t num_slots);

// ---- the op front-end, shared by the backends

// A backend is a type with these static members (inputs already checked):
//   bool check_values(const at::Tensor& like)   whether index values are checked on the host
//   void forward_add(at::Tensor& y, const LoraArgs&, const Plan*)     y[T, out] += delta
//   Grads backward(const at::Tensor& grad_y, const LoraArgs&, const Plan*, std::array<bool, 3>)
//   Plan build_plan(const at::Tensor& token_slot, int64_t num_slots)
// A null Plan* means the caller passed none (the backend builds one if it needs it).
template <class Backend>
struct LoraOps {
  using OptTensor = std::optional<at::Tensor>;

  static LoraArgs checked(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                          const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                          const at::Tensor& scales, const at::Tensor& token_slot, const OptTensor& order,
                          const OptTensor& seg_offsets, std::optional<Plan>& plan) {
    LoraArgs args = check_lora_args(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot);
    plan = check_plan(args, order, seg_offsets);
    if (Backend::check_values(args.x)) check_index_values(args, plan ? &*plan : nullptr);
    return args;
  }

  static void add(at::Tensor& y, const LoraArgs& args, const std::optional<Plan>& plan) {
    if (args.num_tokens() == 0 || args.num_slots() == 0) return;
    Backend::forward_add(y, args, plan ? &*plan : nullptr);
  }

  static at::Tensor forward(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                            const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                            const at::Tensor& scales, const at::Tensor& token_slot, const OptTensor& order,
                            const OptTensor& seg_offsets) {
    std::optional<Plan> plan;
    const auto args = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg_offsets, plan);
    auto y = at::zeros({args.num_tokens(), args.out_features()}, x.options());
    add(y, args, plan);
    return y;
  }

  static void forward_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                           const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                           const at::Tensor& scales, const at::Tensor& token_slot, const OptTensor& order,
                           const OptTensor& seg_offsets) {
    std::optional<Plan> plan;
    const auto args = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg_offsets, plan);
    check_output(args, y);
    add(y, args, plan);
  }

  static Grads backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& a_pool,
                        const at::Tensor& b_pool, const at::Tensor& a_pages, const at::Tensor& b_pages,
                        const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& token_slot,
                        const OptTensor& order, const OptTensor& seg_offsets, std::array<bool, 3> mask) {
    std::optional<Plan> plan;
    const auto args = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg_offsets, plan);
    check_grad_output(args, grad_y);
    if (args.num_tokens() == 0 || args.num_slots() == 0) {
      auto zeros = [&](bool want, const at::Tensor& like) {
        return want ? at::zeros_like(like, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
      };
      return {zeros(mask[0], args.x), zeros(mask[1], a_pool), zeros(mask[2], b_pool)};
    }
    return Backend::backward(grad_y, args, plan ? &*plan : nullptr, mask);
  }

  static std::tuple<at::Tensor, at::Tensor> build_plan(const at::Tensor& token_slot, int64_t num_slots) {
    const auto ts = check_token_slot(token_slot, num_slots);
    if (Backend::check_values(ts)) check_token_slot_values(ts, num_slots);
    const Plan plan = Backend::build_plan(ts, num_slots);
    return {plan.order, plan.seg_offsets};
  }
};

// m.impl of every minlora op for the dispatch key of `m` (TORCH_LIBRARY_IMPL(minlora, KEY, m)).
template <class Backend>
void register_lora_ops(torch::Library& m) {
  using Ops = LoraOps<Backend>;
  m.impl("build_plan", &Ops::build_plan);
  m.impl("lora_forward", &Ops::forward);
  m.impl("lora_forward_add_", &Ops::forward_add_);
  m.impl("lora_backward", &Ops::backward);
}

}  // namespace minlora
