// The argument checks shared by every backend of the minlora ops (lora_op.h).
#include "lora_op.h"

#include <c10/util/Exception.h>

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
                               const std::optional<at::Tensor>& seg_offsets) {
  TORCH_CHECK_VALUE(order.has_value() == seg_offsets.has_value(),
                    "order and seg_offsets must be given together (a BatchPlan) or not at all");
  if (!order) return std::nullopt;
  const auto dev = args.x.device();
  check_int32_vector(*order, "order", args.num_tokens(), dev);
  check_int32_vector(*seg_offsets, "seg_offsets", args.num_slots() + 1, dev);
  return Plan{order->contiguous(), seg_offsets->contiguous()};
}

void check_index_values(const LoraArgs& args, const Plan* plan) {
  const int64_t S = args.num_slots(), R = args.max_rank(), T = args.num_tokens();
  const int64_t Pa = args.a_pool.size(0), Pb = args.b_pool.size(0);
  const auto ranks = args.ranks.cpu();
  const auto slots = args.token_slot.cpu();
  const auto a_pages = args.a_pages.cpu();
  const auto b_pages = args.b_pages.cpu();
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const int32_t* ts = slots.data_ptr<int32_t>();
  const int32_t* ap = a_pages.data_ptr<int32_t>();
  const int32_t* bp = b_pages.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(rk[s] >= 0 && rk[s] <= R, "ranks[", s, "] = ", rk[s], " is outside 0..R = 0..", R);
    for (int64_t j = 0; j < rk[s]; ++j) {
      const int32_t pa = ap[s * R + j], pb = bp[s * R + j];
      TORCH_CHECK_VALUE(pa >= 0 && pa < Pa, "a_pages[", s, ", ", j, "] = ", pa, " is outside a_pool's ", Pa,
                        " pages");
      TORCH_CHECK_VALUE(pb >= 0 && pb < Pb, "b_pages[", s, ", ", j, "] = ", pb, " is outside b_pool's ", Pb,
                        " pages");
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(ts[t] >= -1 && ts[t] < S, "token_slot[", t, "] = ", ts[t], " is outside -1..S-1 = -1..",
                      S - 1);
  }
  if (plan == nullptr) return;
  const auto order = plan->order.cpu();
  const auto seg = plan->seg_offsets.cpu();
  const int32_t* od = order.data_ptr<int32_t>();
  const int32_t* sg = seg.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(sg[0] == 0, "seg_offsets[0] must be 0, got ", sg[0]);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(sg[s] <= sg[s + 1] && sg[s + 1] <= T, "seg_offsets must be non-decreasing and at most T = ",
                      T, "; seg_offsets[", s, "..", s + 1, "] = ", sg[s], ", ", sg[s + 1]);
    for (int64_t i = sg[s]; i < sg[s + 1]; ++i) {
      TORCH_CHECK_VALUE(od[i] >= 0 && od[i] < T, "order[", i, "] = ", od[i], " is outside 0..T-1");
      TORCH_CHECK_VALUE(ts[od[i]] == s, "the plan does not match token_slot: order[", i, "] = ", od[i],
                        " is in slot ", s, "'s segment but token_slot[", od[i], "] = ", ts[od[i]]);
    }
  }
  // Every token of a slot must appear in its segment exactly once: segment lengths equal slot counts.
  std::vector<int64_t> counts(S, 0);
  for (int64_t t = 0; t < T; ++t)
    if (ts[t] >= 0) ++counts[ts[t]];
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK_VALUE(sg[s + 1] - sg[s] == counts[s], "the plan does not match token_slot: slot ", s, " has ",
                      counts[s], " tokens but its segment has ", sg[s + 1] - sg[s]);
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

at::Tensor check_token_slot(const at::Tensor& token_slot, int64_t num_slots) {
  TORCH_CHECK_VALUE(num_slots >= 0, "num_slots must be >= 0, got ", num_slots);
  TORCH_CHECK(token_slot.scalar_type() == at::kInt, "token_slot must be int32, got ", token_slot.scalar_type());
  TORCH_CHECK_VALUE(token_slot.dim() == 1, "token_slot must be 1-D, got shape ", token_slot.sizes());
  return token_slot.contiguous();
}

void check_token_slot_values(const at::Tensor& token_slot, int64_t num_slots) {
  const auto host = token_slot.cpu();
  const int32_t* p = host.data_ptr<int32_t>();
  for (int64_t t = 0; t < host.size(0); ++t)
    TORCH_CHECK_VALUE(p[t] >= -1 && p[t] < num_slots, "token_slot[", t, "] = ", p[t],
                      " is outside -1..num_slots-1 = -1..", num_slots - 1);
}

}  // namespace minlora
