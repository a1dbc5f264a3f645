// The minlora LoRA ops between their schemas (ops.cpp) and the per-device backends: the
// validated argument view, the argument checks, and the op front-end every backend
// registers for its dispatch key (cpu/lora_cpu.cpp, cuda/lora_cuda.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace minlora {

// The operands of one LoRA op call, after validation (see DESIGN.md "The op contract").
//   x [T, in], a_pool [Pa, in], b_pool [Pb, out], a_pages / b_pages [S, R] int32,
//   ranks [S] int32, scales [S] float32, token_slot [T] int32.
struct LoraArgs {
  at::Tensor x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot;
  // The plan's longest segment when the caller knows it (a host value: the step knows its tokens
  // per request), else -1.  A hint for which kernels to launch; results never depend on it.
  int64_t max_segment = -1;
  int64_t num_tokens() const { return x.size(0); }
  int64_t in_features() const { return x.size(1); }
  int64_t out_features() const { return b_pool.size(1); }
  int64_t num_slots() const { return ranks.size(0); }
  int64_t max_rank() const { return a_pages.size(1); }
};

// A BatchPlan: tokens of slot s are order[seg_offsets[s] : seg_offsets[s + 1]];
// tokens with slot -1 follow seg_offsets[S].  order [T] int32, seg_offsets [S + 1] int32,
// positions [T] int32 (the inverse of order: positions[order[q]] == q) or undefined when the
// caller gave none (a backend that needs it computes it).
struct Plan {
  at::Tensor order, seg_offsets, positions;
};

// (grad_x [T, in], grad_a_pool [Pa, in], grad_b_pool [Pb, out]); a gradient not asked for
// by the output mask is an empty tensor.
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// ---- argument checks (lora_op.cpp); each throws a c10 error (RuntimeError / ValueError)
// naming the argument.

// Dtypes, devices, shapes and contiguity; returns the arguments with x and the small
// index tensors made contiguous.  Index *values* are checked by read_indices.
LoraArgs check_lora_args(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                         const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                         const at::Tensor& scales, const at::Tensor& token_slot);

// A plan's shapes and devices against the arguments; nullopt when neither order nor
// seg_offsets is given (positions alone are refused).
std::optional<Plan> check_plan(const LoraArgs& args, const std::optional<at::Tensor>& order,
                               const std::optional<at::Tensor>& seg_offsets,
                               const std::optional<at::Tensor>& positions);

// The longest-segment hint: >= 0 when given; -1 when not.
int64_t check_max_segment(const std::optional<int64_t>& max_segment);

// y of the accumulating form: [T, out], dtype and device of x, contiguous.
void check_output(const LoraArgs& args, const at::Tensor& y);

// grad_y of the backward: [T, out], dtype and device of x.
void check_grad_output(const LoraArgs& args, const at::Tensor& grad_y);

// A gradient accumulator of the accumulating backward: float32, the shape of `pool` (the
// pool's page numbering), on x's device, contiguous.
void check_accumulator(const LoraArgs& args, const at::Tensor& acc, const char* name, const at::Tensor& pool);

// order of plan_positions: int32, 1-D; returns it contiguous.
at::Tensor check_order(const at::Tensor& order);

// token_slot of the plan builder (int32, 1-D) and num_slots >= 0; returns it contiguous.
at::Tensor check_token_slot(const at::Tensor& token_slot, int64_t num_slots);

// ---- index values, read on the host

// The index values of one call, copied out of the caller's tensors (each value is read once,
// before anything is checked) and checked: ranks in 0..R, token_slot in -1..S-1, the page-table
// entries j < ranks[s] inside their pools (entries past a slot's rank are never read), and the
// plan, when one is given, a permutation of 0..T-1 consistent with token_slot and seg_offsets.
// A kernel that reads only these copies cannot be pushed out of bounds by another thread
// rewriting the tensors during the call, and their size grows with the ranks used, not with R.
struct HostIndices {
  std::vector<int32_t> token_slot;          // [T]
  std::vector<int32_t> ranks;               // [S]
  std::vector<int64_t> page_begin;          // [S + 1]: slot s's pages are entries page_begin[s] .. [s + 1] - 1
  std::vector<int32_t> a_pages, b_pages;    // [sum of ranks]
  std::vector<int32_t> order, seg_offsets;  // the plan given, or the one of token_slot (positions checked, not kept)
  int32_t max_rank_used = 0;                // max of ranks (0 when S = 0)

  int64_t num_tokens() const { return static_cast<int64_t>(token_slot.size()); }
  int64_t num_slots() const { return static_cast<int64_t>(ranks.size()); }
  int64_t segment_begin(int64_t s) const { return seg_offsets[s]; }
  int64_t segment_length(int64_t s) const { return seg_offsets[s + 1] - seg_offsets[s]; }
};

// Reads and checks the index values of `args` (and `plan`, when not null), copying device
// tensors to the host first.  Throws ValueError naming the first bad value.
HostIndices read_indices(const LoraArgs& args, const Plan* plan);

// token_slot's values, read once and checked to lie in -1..num_slots-1.
std::vector<int32_t> read_token_slot(const at::Tensor& token_slot, int64_t num_slots);

// The plan of `token_slot` (values in -1..num_slots-1): a stable counting sort, slot -1 last.
// order: [T], seg_offsets: [num_slots + 1].
void build_host_plan(const std::vector<int32_t>& token_slot, int64_t num_slots, int32_t* order,
                     int32_t* seg_offsets);

// positions[order[q]] = q, after checking (ValueError naming order) that order is a
// permutation of 0..T-1.  order and positions: [T] host memory.
void host_plan_positions(const int32_t* order, int64_t num_tokens, int32_t* positions);

namespace cpu {
// The CPU backend's threading threshold: a call with less work than this many multiply-adds
// runs on the calling thread, with no parallel region.  set_min_parallel_work returns the
// previous value; the initial one is 2^25 (minlora.ops sets MINLORA_CPU_MIN_PARALLEL_WORK's).
int64_t get_min_parallel_work();
int64_t set_min_parallel_work(int64_t multiply_adds);
}  // namespace cpu

// ---- the op front-end, shared by the backends

// A backend provides five functions (shapes, dtypes and devices already checked; each backend
// decides how index values are checked):
//   void forward_into(at::Tensor& y, const LoraArgs&, const Plan*, bool accumulate)
//       y[T, out] += delta when accumulate (only the rows the batch owns); else y = delta with
//       every row written once (y may be uninitialised; rows without an adapter get zeros)
//   Grads backward(const at::Tensor& grad_y, const LoraArgs&, const Plan*, std::array<bool, 3>)
//   at::Tensor backward_accumulate(at::Tensor& grad_a_acc, at::Tensor& grad_b_acc,
//                                  const at::Tensor& grad_y, const LoraArgs&, const Plan*, bool grad_x)
//       grad_a_acc[a_pages[s, j]] += scale_s sum_{t in s} (B_s^T g_t)_j x_t and
//       grad_b_acc[b_pages[s, j]] += scale_s sum_{t in s} (A_s x_t)_j g_t for j < ranks[s]
//       (float32; no other row touched); returns grad_x [T, in] (or an empty tensor)
//   Plan build_plan(const at::Tensor& token_slot, int64_t num_slots)   (no positions)
//   at::Tensor plan_positions(const at::Tensor& order)                 positions [T]
// A null Plan* means the caller passed none (the backend builds one if it needs it).  T = 0 and
// S = 0 never reach a backend's LoRA functions.
template <auto ForwardInto, auto Backward, auto BackwardAccumulate, auto BuildPlan, auto PlanPositions>
struct LoraOps {
  using OptTensor = std::optional<at::Tensor>;
  using OptInt = std::optional<int64_t>;

  // The operands of one LoRA op call, checked.
  struct Call {
    LoraArgs args;
    std::optional<Plan> given_plan;
    const Plan* plan() const { return given_plan ? &*given_plan : nullptr; }
    bool empty() const { return args.num_tokens() == 0 || args.num_slots() == 0; }
  };

  static Call checked(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                      const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                      const at::Tensor& scales, const at::Tensor& token_slot, const OptTensor& order,
                      const OptTensor& seg_offsets, const OptTensor& positions, const OptInt& max_segment) {
    Call c{check_lora_args(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot), std::nullopt};
    c.given_plan = check_plan(c.args, order, seg_offsets, positions);
    c.args.max_segment = check_max_segment(max_segment);
    return c;
  }

  static at::Tensor forward(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                            const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                            const at::Tensor& scales, const at::Tensor& token_slot, const OptTensor& order,
                            const OptTensor& seg_offsets, const OptTensor& positions, OptInt max_segment) {
    const Call c = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg_offsets,
                           positions, max_segment);
    if (c.empty()) return at::zeros({c.args.num_tokens(), c.args.out_features()}, x.options());
    // The backend writes every row once: no zero fill first.
    auto y = at::empty({c.args.num_tokens(), c.args.out_features()}, x.options());
    ForwardInto(y, c.args, c.plan(), /*accumulate=*/false);
    return y;
  }

  static void forward_add_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                           const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                           const at::Tensor& scales, const at::Tensor& token_slot, const OptTensor& order,
                           const OptTensor& seg_offsets, const OptTensor& positions, OptInt max_segment) {
    const Call c = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg_offsets,
                           positions, max_segment);
    check_output(c.args, y);
    if (!c.empty()) ForwardInto(y, c.args, c.plan(), /*accumulate=*/true);
  }

  static Grads backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& a_pool,
                        const at::Tensor& b_pool, const at::Tensor& a_pages, const at::Tensor& b_pages,
                        const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& token_slot,
                        const OptTensor& order, const OptTensor& seg_offsets, std::array<bool, 3> mask,
                        const OptTensor& positions, OptInt max_segment) {
    const Call c = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg_offsets,
                           positions, max_segment);
    check_grad_output(c.args, grad_y);
    if (c.empty()) {
      auto zeros = [&](bool want, const at::Tensor& like) {
        return want ? at::zeros_like(like, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
      };
      return {zeros(mask[0], c.args.x), zeros(mask[1], a_pool), zeros(mask[2], b_pool)};
    }
    return Backward(grad_y, c.args, c.plan(), mask);
  }

  static at::Tensor backward_accumulate_(at::Tensor& grad_a_acc, at::Tensor& grad_b_acc, const at::Tensor& grad_y,
                                         const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                                         const at::Tensor& a_pages, const at::Tensor& b_pages,
                                         const at::Tensor& ranks, const at::Tensor& scales,
                                         const at::Tensor& token_slot, const OptTensor& order,
                                         const OptTensor& seg_offsets, const OptTensor& positions,
                                         OptInt max_segment, bool grad_x) {
    const Call c = checked(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg_offsets,
                           positions, max_segment);
    check_grad_output(c.args, grad_y);
    check_accumulator(c.args, grad_a_acc, "grad_a_acc", a_pool);
    check_accumulator(c.args, grad_b_acc, "grad_b_acc", b_pool);
    if (c.empty()) return grad_x ? at::zeros_like(c.args.x) : at::empty({0}, x.options());
    return BackwardAccumulate(grad_a_acc, grad_b_acc, grad_y, c.args, c.plan(), grad_x);
  }

  static std::tuple<at::Tensor, at::Tensor> build_plan(const at::Tensor& token_slot, int64_t num_slots) {
    const Plan plan = BuildPlan(check_token_slot(token_slot, num_slots), num_slots);
    return {plan.order, plan.seg_offsets};
  }

  static at::Tensor plan_positions(const at::Tensor& order) { return PlanPositions(check_order(order)); }
};

// m.impl of every minlora op for the dispatch key of `m` (TORCH_LIBRARY_IMPL(minlora, KEY, m)),
// with a backend's five functions.
template <auto ForwardInto, auto Backward, auto BackwardAccumulate, auto BuildPlan, auto PlanPositions>
void register_lora_ops(torch::Library& m) {
  using Ops = LoraOps<ForwardInto, Backward, BackwardAccumulate, BuildPlan, PlanPositions>;
  m.impl("build_plan", &Ops::build_plan);
  m.impl("plan_positions", &Ops::plan_positions);
  m.impl("lora_forward", &Ops::forward);
  m.impl("lora_forward_add_", &Ops::forward_add_);
  m.impl("lora_backward", &Ops::backward);
  m.impl("lora_backward_accumulate_", &Ops::backward_accumulate_);
}

}  // namespace minlora
