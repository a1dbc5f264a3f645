// The argument checks shared by every backend of the minlora ops (lora_op.h).
#include "lora_op.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace minlora {
namespace {

bool is_float_dtype(at::ScalarType t, bool allow_double) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || (allow_double && t == at::kDouble);
}

void check_int32_vector(const at::Tensor& t, const char* name, int64_t length, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like x, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) == length, name, " must have ", length, " entries, got ", t.size(0));
}

void check_pool(const at::Tensor& pool, const char* name, const at::Tensor& x) {
  TORCH_CHECK(pool.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(),
              "), got ", pool.scalar_type());
  TORCH_CHECK(pool.device() == x.device(), name, " must be on ", x.device(), " like x, got ", pool.device());
  TORCH_CHECK_VALUE(pool.dim() == 2, name, " must be 2-D [num_pages, row_length], got shape ", pool.sizes());
  TORCH_CHECK_VALUE(pool.is_contiguous(), name, " must be contiguous (pages are read in place)");
}

}  // namespace

LoraArgs check_lora_args(const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                         const at::Tensor& a_pages, const at::Tensor& b_pages, const at::Tensor& ranks,
                         const at::Tensor& scales, const at::Tensor& token_slot) {
  const bool on_cpu = x.device().is_cpu();
  TORCH_CHECK(is_float_dtype(x.scalar_type(), on_cpu), "x must be float16, bfloat16 or float32",
              on_cpu ? " (or float64 on CPU)" : "", ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [T, in] (flatten leading dims), got shape ", x.sizes());
  check_pool(a_pool, "a_pool", x);
  check_pool(b_pool, "b_pool", x);
  TORCH_CHECK_VALUE(a_pool.size(1) == x.size(1), "a_pool rows have length ", a_pool.size(1),
                    " but x has in = ", x.size(1));
  const auto dev = x.device();
  TORCH_CHECK(a_pages.scalar_type() == at::kInt, "a_pages must be int32, got ", a_pages.scalar_type());
  TORCH_CHECK(b_pages.scalar_type() == at::kInt, "b_pages must be int32, got ", b_pages.scalar_type());
  TORCH_CHECK(a_pages.device() == dev, "a_pages must be on ", dev, " like x, got ", a_pages.device());
  TORCH_CHECK(b_pages.device() == dev, "b_pages must be on ", dev, " like x, got ", b_pages.device());
  TORCH_CHECK_VALUE(a_pages.dim() == 2, "a_pages must be 2-D [S, R], got shape ", a_pages.sizes());
  TORCH_CHECK_VALUE(b_pages.sizes() == a_pages.sizes(), "b_pages must have the shape of a_pages ",
                    a_pages.sizes(), ", got ", b_pages.sizes());
  const int64_t S = a_pages.size(0);
  check_int32_vector(ranks, "ranks", S, dev);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(scales.device() == dev, "scales must be on ", dev, " like x, got ", scales.device());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == S, "scales must have shape [", S, "], got ",
                    scales.sizes());
  check_int32_vector(token_slot, "token_slot", x.size(0), dev);
  return LoraArgs{x.contiguous(),       a_pool,         b_pool,           a_pages.contiguous(),
                  b_pages.contiguous(), ranks.contiguous(), scales.contiguous(), token_slot.contiguous()};
}

std::optional<Plan> check_plan(const LoraArgs& args, const std::optional<at::Tensor>& order,
                               const std::optional<at::Tensor>& seg_offsets,
                               const std::optional<at::Tensor>& positions) {
  TORCH_CHECK_VALUE(order.has_value() == seg_offsets.has_value(),
                    "order and seg_offsets must be given together (a BatchPlan) or not at all");
  TORCH_CHECK_VALUE(order.has_value() || !positions.has_value(),
                    "positions belong to a plan: give order and seg_offsets with them");
  if (!order) return std::nullopt;
  const auto dev = args.x.device();
  check_int32_vector(*order, "order", args.num_tokens(), dev);
  check_int32_vector(*seg_offsets, "seg_offsets", args.num_slots() + 1, dev);
  Plan plan{order->contiguous(), seg_offsets->contiguous(), at::Tensor()};
  if (positions) {
    check_int32_vector(*positions, "positions", args.num_tokens(), dev);
    plan.positions = positions->contiguous();
  }
  return plan;
}

int64_t check_max_segment(const std::optional<int64_t>& max_segment) {
  if (!max_segment) return -1;
  TORCH_CHECK_VALUE(*max_segment >= 0, "max_segment must be >= 0, got ", *max_segment);
  return *max_segment;
}

namespace {

// A host tensor with t's values: t itself on the CPU, else a copy (a host synchronisation).
at::Tensor on_host(const at::Tensor& t) { return t.is_cpu() ? t : t.cpu(); }

// n int32 values at src copied into a new vector: one read of the caller's memory (memcpy),
// after which nothing reads it again.
std::vector<int32_t> copy_ints(const int32_t* src, int64_t n) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  if (n > 0) std::memcpy(v.data(), src, sizeof(int32_t) * static_cast<size_t>(n));
  return v;
}

void check_slots(const std::vector<int32_t>& token_slot, int64_t num_slots) {
  for (size_t t = 0; t < token_slot.size(); ++t)
    TORCH_CHECK_VALUE(token_slot[t] >= -1 && token_slot[t] < num_slots, "token_slot[", t, "] = ", token_slot[t],
                      " is outside -1..S-1 = -1..", num_slots - 1);
}

// The plan is a permutation of 0..T-1 whose segment s holds exactly the tokens of slot s and
// whose tail (after seg_offsets[S]) holds the tokens without a slot.
void check_plan_values(const HostIndices& ix) {
  const int64_t T = ix.num_tokens(), S = ix.num_slots();
  const auto& od = ix.order;
  const auto& sg = ix.seg_offsets;
  TORCH_CHECK_VALUE(sg[0] == 0, "seg_offsets[0] must be 0, got ", sg[0]);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK_VALUE(sg[s] <= sg[s + 1] && sg[s + 1] <= T, "seg_offsets must be non-decreasing and at most T = ",
                      T, "; seg_offsets[", s, "..", s + 1, "] = ", sg[s], ", ", sg[s + 1]);
  std::vector<int64_t> counts(S + 1, 0);  // tokens per slot; [S]: tokens without one
  for (int64_t t = 0; t < T; ++t) ++counts[ix.token_slot[t] >= 0 ? ix.token_slot[t] : S];
  std::vector<bool> seen(T, false);
  for (int64_t s = 0; s <= S; ++s) {
    const int64_t begin = sg[s], end = s < S ? sg[s + 1] : T;
    const int32_t want = s < S ? static_cast<int32_t>(s) : -1;
    TORCH_CHECK_VALUE(end - begin == counts[s], "the plan does not match token_slot: ",
                      s < S ? "slot " + std::to_string(s) : std::string("no adapter"), " has ", counts[s],
                      " tokens but its part of order has ", end - begin);
    for (int64_t i = begin; i < end; ++i) {
      const int32_t t = od[i];
      TORCH_CHECK_VALUE(t >= 0 && t < T, "order[", i, "] = ", t, " is outside 0..T-1 = 0..", T - 1);
      TORCH_CHECK_VALUE(ix.token_slot[t] == want, "the plan does not match token_slot: order[", i, "] = ", t,
                        s < S ? " is in slot " + std::to_string(s) + "'s segment" : std::string(" is in the tail"),
                        " but token_slot[", t, "] = ", ix.token_slot[t]);
      TORCH_CHECK_VALUE(!seen[t], "order[", i, "] = ", t, " repeats a token: a plan's order must be a permutation "
                        "of 0..T-1");
      seen[t] = true;
    }
  }
}

// positions, when given, is the inverse of the (already checked) permutation order.
void check_positions(const std::vector<int32_t>& order, const std::vector<int32_t>& positions) {
  for (size_t q = 0; q < order.size(); ++q)
    TORCH_CHECK_VALUE(positions[order[q]] == static_cast<int32_t>(q), "positions[", order[q], "] = ",
                      positions[order[q]], " but order[", q, "] = ", order[q],
                      ": a plan's positions must be the inverse of its order (minlora.plan_positions)");
}

}  // namespace

HostIndices read_indices(const LoraArgs& args, const Plan* plan) {
  const int64_t S = args.num_slots(), R = args.max_rank(), T = args.num_tokens();
  const int64_t Pa = args.a_pool.size(0), Pb = args.b_pool.size(0);
  HostIndices ix;
  ix.ranks = copy_ints(on_host(args.ranks).data_ptr<int32_t>(), S);
  ix.token_slot = copy_ints(on_host(args.token_slot).data_ptr<int32_t>(), T);
  ix.page_begin.assign(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    const int32_t r = ix.ranks[s];
    TORCH_CHECK_VALUE(r >= 0 && r <= R, "ranks[", s, "] = ", r, " is outside 0..R = 0..", R);
    ix.page_begin[s + 1] = ix.page_begin[s] + r;
    ix.max_rank_used = std::max(ix.max_rank_used, r);
  }
  const int64_t used = ix.page_begin[S];
  ix.a_pages.resize(used);
  ix.b_pages.resize(used);
  const auto a_host = on_host(args.a_pages), b_host = on_host(args.b_pages);
  const int32_t* ap = a_host.data_ptr<int32_t>();
  const int32_t* bp = b_host.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t r = ix.ranks[s], k0 = ix.page_begin[s];
    if (r > 0) {
      std::memcpy(ix.a_pages.data() + k0, ap + s * R, sizeof(int32_t) * r);
      std::memcpy(ix.b_pages.data() + k0, bp + s * R, sizeof(int32_t) * r);
    }
    for (int64_t j = 0; j < r; ++j) {
      const int32_t pa = ix.a_pages[k0 + j], pb = ix.b_pages[k0 + j];
      TORCH_CHECK_VALUE(pa >= 0 && pa < Pa, "a_pages[", s, ", ", j, "] = ", pa, " is outside a_pool's ", Pa,
                        " pages");
      TORCH_CHECK_VALUE(pb >= 0 && pb < Pb, "b_pages[", s, ", ", j, "] = ", pb, " is outside b_pool's ", Pb,
                        " pages");
    }
  }
  check_slots(ix.token_slot, S);
  if (plan == nullptr) {
    ix.order.resize(T);
    ix.seg_offsets.resize(S + 1);
    build_host_plan(ix.token_slot, S, ix.order.data(), ix.seg_offsets.data());
  } else {
    ix.order = copy_ints(on_host(plan->order).data_ptr<int32_t>(), T);
    ix.seg_offsets = copy_ints(on_host(plan->seg_offsets).data_ptr<int32_t>(), S + 1);
    check_plan_values(ix);
    if (plan->positions.defined())
      check_positions(ix.order, copy_ints(on_host(plan->positions).data_ptr<int32_t>(), T));
  }
  return ix;
}

std::vector<int32_t> read_token_slot(const at::Tensor& token_slot, int64_t num_slots) {
  auto slots = copy_ints(on_host(token_slot).data_ptr<int32_t>(), token_slot.size(0));
  check_slots(slots, num_slots);
  return slots;
}

void build_host_plan(const std::vector<int32_t>& token_slot, int64_t num_slots, int32_t* order,
                     int32_t* seg_offsets) {
  const int64_t T = static_cast<int64_t>(token_slot.size());
  std::vector<int64_t> cursor(num_slots + 2, 0);
  auto key = [&](int32_t s) { return s >= 0 ? static_cast<int64_t>(s) : num_slots; };
  for (int64_t t = 0; t < T; ++t) ++cursor[key(token_slot[t]) + 1];
  for (int64_t s = 0; s <= num_slots; ++s) cursor[s + 1] += cursor[s];
  for (int64_t s = 0; s <= num_slots; ++s) seg_offsets[s] = static_cast<int32_t>(cursor[s]);
  for (int64_t t = 0; t < T; ++t) order[cursor[key(token_slot[t])]++] = static_cast<int32_t>(t);
}

void host_plan_positions(const int32_t* order, int64_t num_tokens, int32_t* positions) {
  std::fill(positions, positions + num_tokens, -1);
  for (int64_t q = 0; q < num_tokens; ++q) {
    const int32_t t = order[q];
    TORCH_CHECK_VALUE(t >= 0 && t < num_tokens, "order[", q, "] = ", t, " is outside 0..T-1 = 0..", num_tokens - 1);
    TORCH_CHECK_VALUE(positions[t] < 0, "order[", q, "] = ", t, " repeats a token: a plan's order must be a "
                      "permutation of 0..T-1");
    positions[t] = static_cast<int32_t>(q);
  }
}

void check_output(const LoraArgs& args, const at::Tensor& y) {
  TORCH_CHECK(y.scalar_type() == args.x.scalar_type(), "y must have the dtype of x (", args.x.scalar_type(),
              "), got ", y.scalar_type());
  TORCH_CHECK(y.device() == args.x.device(), "y must be on ", args.x.device(), " like x, got ", y.device());
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == args.num_tokens() && y.size(1) == args.out_features(),
                    "y must have shape [T, out] = [", args.num_tokens(), ", ", args.out_features(), "], got ",
                    y.sizes());
  TORCH_CHECK_VALUE(y.is_contiguous(), "y must be contiguous (it is updated in place)");
}

void check_grad_output(const LoraArgs& args, const at::Tensor& grad_y) {
  TORCH_CHECK(grad_y.scalar_type() == args.x.scalar_type(), "grad_y must have the dtype of x (",
              args.x.scalar_type(), "), got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == args.x.device(), "grad_y must be on ", args.x.device(), " like x, got ",
              grad_y.device());
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == args.num_tokens() &&
                        grad_y.size(1) == args.out_features(),
                    "grad_y must have shape [T, out] = [", args.num_tokens(), ", ", args.out_features(), "], got ",
                    grad_y.sizes());
}

void check_accumulator(const LoraArgs& args, const at::Tensor& acc, const char* name, const at::Tensor& pool) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat, name, " must be float32 (gradients accumulate in float32), got ",
              acc.scalar_type());
  TORCH_CHECK(acc.device() == args.x.device(), name, " must be on ", args.x.device(), " like x, got ", acc.device());
  TORCH_CHECK_VALUE(acc.sizes() == pool.sizes(), name, " must have the shape of its pool ", pool.sizes(),
                    " (the same page numbering), got ", acc.sizes());
  TORCH_CHECK_VALUE(acc.is_contiguous(), name, " must be contiguous (its pages are updated in place)");
}

at::Tensor check_order(const at::Tensor& order) {
  TORCH_CHECK(order.scalar_type() == at::kInt, "order must be int32, got ", order.scalar_type());
  TORCH_CHECK_VALUE(order.dim() == 1, "order must be 1-D, got shape ", order.sizes());
  return order.contiguous();
}

at::Tensor check_token_slot(const at::Tensor& token_slot, int64_t num_slots) {
  TORCH_CHECK_VALUE(num_slots >= 0, "num_slots must be >= 0, got ", num_slots);
  TORCH_CHECK(token_slot.scalar_type() == at::kInt, "token_slot must be int32, got ", token_slot.scalar_type());
  TORCH_CHECK_VALUE(token_slot.dim() == 1, "token_slot must be 1-D, got shape ", token_slot.sizes());
  return token_slot.contiguous();
}

}  // namespace minlora
