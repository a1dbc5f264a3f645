// The CUDA backend of the LoRA ops: turns validated tensors into kernel parameters, chooses
// the kernels (kernels/dispatch.h), launches them on the current stream, and registers
// TORCH_LIBRARY_IMPL(minlora, CUDA).  Nothing here
// synchronises the host (no reads of device memory, no blocking calls), so the ops can be
// captured into CUDA graphs; workspaces come from the caching allocator.  Index values are
// therefore not checked here: the kernels treat an out-of-range slot, rank or page as "no
// adapter" (or skip the page) and never read out of bounds.  MINLORA_CHECK_INDICES=1 adds the
// host check of the CPU backend (a debug switch: it copies the index tensors to the host).
// c10's CUDA headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE and
// doubles this file's compile time).
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../lora_op.h"
#include "kernels/dispatch.h"
#include "kernels/lora_fallback.cuh"
#include "kernels/lora_gather.cuh"
#include "kernels/lora_grouped.cuh"

namespace minlora::cuda {
namespace {

kernels::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    case at::kFloat: return kernels::DType::kFloat32;
    default: TORCH_CHECK(false, "minlora CUDA kernels take float16, bfloat16 or float32, got ", t);
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "minlora: launching ", what, " failed: ", cudaGetErrorString(err));
}

void check_rank_width(const LoraArgs& args) {
  TORCH_CHECK_VALUE(args.max_rank() <= kernels::kFallbackMaxRank, "a_pages has R = ", args.max_rank(),
                    " columns; the CUDA kernels take at most ", kernels::kFallbackMaxRank);
}

kernels::KernelMode kernel_mode() {
  const kernels::KernelMode mode = kernels::kernel_mode_from_env();
  TORCH_CHECK_VALUE(mode != kernels::KernelMode::kUnknown, "MINLORA_CUDA_KERNELS = '",
                    std::getenv("MINLORA_CUDA_KERNELS"), "' is none of auto, fallback, gather, grouped");
  return mode;
}

// Multiprocessors of t's device (a host-side attribute query: no synchronisation).
int sm_count(const at::Tensor& t) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the launch that follows must not report it
    return 1;
  }
  return n;
}

// The fields every shrink-then-expand kernel's parameters share (the fallback, gather and
// grouped kernels name them alike): x [T, in] -> shrink pages (length in) -> expand pages
// (length out).  The forward is (x, a_pool, a_pages, b_pool, b_pages); grad_x is
// (grad_y, b_pool, b_pages, a_pool, a_pages).
template <typename Params>
void fill_shrink_expand(Params& p, const at::Tensor& x, const at::Tensor& shrink_pool, const at::Tensor& shrink_pages,
                        const at::Tensor& expand_pool, const at::Tensor& expand_pages, const LoraArgs& args) {
  p.shrink_pool = shrink_pool.data_ptr();
  p.expand_pool = expand_pool.data_ptr();
  p.shrink_pages = shrink_pages.data_ptr<int32_t>();
  p.expand_pages = expand_pages.data_ptr<int32_t>();
  p.ranks = args.ranks.data_ptr<int32_t>();
  p.scales = args.scales.data_ptr<float>();
  p.token_slot = args.token_slot.data_ptr<int32_t>();
  p.num_tokens = x.size(0);
  p.num_slots = args.num_slots();
  p.max_rank = args.max_rank();
  p.in_features = x.size(1);
  p.out_features = expand_pool.size(1);
  p.num_shrink_pages = shrink_pool.size(0);
  p.num_expand_pages = expand_pool.size(0);
}

// ---- the fallback kernels (MINLORA_CUDA_KERNELS=fallback, and R > kGatherMaxRank) ----

// y += scale_s * E_s (S_s x) on the current stream (see kernels::ShrinkExpandParams).
void fallback_shrink_expand_add(at::Tensor& y, const at::Tensor& x, const at::Tensor& shrink_pool,
                              const at::Tensor& shrink_pages, const at::Tensor& expand_pool,
                              const at::Tensor& expand_pages, const LoraArgs& args) {
  kernels::ShrinkExpandParams p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  fill_shrink_expand(p, x, shrink_pool, shrink_pages, expand_pool, expand_pages, args);
  check_launch(kernels::launch_shrink_expand_fallback(p, kernel_dtype(x.scalar_type()),
                                                    c10::cuda::getCurrentCUDAStream()),
               "the LoRA shrink/expand kernel");
}

Grads fallback_backward(const at::Tensor& g, const LoraArgs& args, std::array<bool, 3> output_mask) {
  const auto empty = at::empty({0}, args.x.options());
  at::Tensor grad_x = empty, grad_a = empty, grad_b = empty;
  if (output_mask[0]) {
    grad_x = at::zeros_like(args.x);
    fallback_shrink_expand_add(grad_x, g, args.b_pool, args.b_pages, args.a_pool, args.a_pages, args);
  }
  if (output_mask[1] || output_mask[2]) {
    const auto f32 = args.x.options().dtype(at::kFloat);
    at::Tensor grad_a32 = output_mask[1] ? at::zeros(args.a_pool.sizes(), f32) : at::Tensor();
    at::Tensor grad_b32 = output_mask[2] ? at::zeros(args.b_pool.sizes(), f32) : at::Tensor();
    kernels::PoolGradParams p{};
    p.x = args.x.data_ptr();
    p.grad_y = g.data_ptr();
    p.a_pool = args.a_pool.data_ptr();
    p.b_pool = args.b_pool.data_ptr();
    p.a_pages = args.a_pages.data_ptr<int32_t>();
    p.b_pages = args.b_pages.data_ptr<int32_t>();
    p.ranks = args.ranks.data_ptr<int32_t>();
    p.scales = args.scales.data_ptr<float>();
    p.token_slot = args.token_slot.data_ptr<int32_t>();
    p.grad_a = output_mask[1] ? grad_a32.data_ptr<float>() : nullptr;
    p.grad_b = output_mask[2] ? grad_b32.data_ptr<float>() : nullptr;
    p.num_tokens = args.num_tokens();
    p.num_slots = args.num_slots();
    p.max_rank = args.max_rank();
    p.in_features = args.in_features();
    p.out_features = args.out_features();
    p.num_a_pages = args.a_pool.size(0);
    p.num_b_pages = args.b_pool.size(0);
    check_launch(kernels::launch_pool_grads_fallback(p, kernel_dtype(args.x.scalar_type()),
                                                   c10::cuda::getCurrentCUDAStream()),
                 "the LoRA pool-gradient kernel");
    if (output_mask[1]) grad_a = grad_a32.to(args.x.scalar_type());
    if (output_mask[2]) grad_b = grad_b32.to(args.x.scalar_type());
  }
  return {grad_x, grad_a, grad_b};
}

// ---- the fast paths ----

bool aligned16(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    const int64_t row_bytes = t->size(1) * static_cast<int64_t>(t->element_size());
    const void* ptr = t->data_ptr();
    if (!kernels::rows_are_16b_aligned(&ptr, 1, &row_bytes, 1)) return false;
  }
  return true;
}

// One gather launch (see kernels::GatherParams).  `plan` may be null (one token per block).
void gather(const at::Tensor* y, const at::Tensor& x, const float* h_in, float* h_out, const at::Tensor& shrink_pool,
            const at::Tensor& shrink_pages, const at::Tensor& expand_pool, const at::Tensor& expand_pages,
            const LoraArgs& args, const Plan* plan, int64_t skip_segments_from) {
  kernels::GatherParams p{};
  p.x = x.data_ptr();
  p.y = y != nullptr ? y->data_ptr() : nullptr;
  p.h_in = h_in;
  p.h_out = h_out;
  fill_shrink_expand(p, x, shrink_pool, shrink_pages, expand_pool, expand_pages, args);
  p.order = plan != nullptr ? plan->order.data_ptr<int32_t>() : nullptr;
  p.seg_offsets = plan != nullptr ? plan->seg_offsets.data_ptr<int32_t>() : nullptr;
  p.skip_segments_from = skip_segments_from;
  std::vector<const at::Tensor*> rows = {&x, &shrink_pool, &expand_pool};
  if (y != nullptr) rows.push_back(y);
  bool vec = true;
  for (const at::Tensor* t : rows) vec = vec && aligned16({t});
  check_launch(kernels::launch_gather(p, kernel_dtype(x.scalar_type()), vec, c10::cuda::getCurrentCUDAStream()),
               "the LoRA gather kernel");
}

// Grouped GEMM parameters for one operand ordering (as for gather(): the forward is
// (x, a_pool, a_pages) -> (b_pool, b_pages) into y; grad_x is (grad_y, b, b_pages) -> (a, a_pages)).
kernels::GroupedParams grouped_params(const at::Tensor* y, const at::Tensor& x, const at::Tensor& shrink_pool,
                                      const at::Tensor& shrink_pages, const at::Tensor& expand_pool,
                                      const at::Tensor& expand_pages, const LoraArgs& args, const Plan& plan,
                                      int64_t min_segment) {
  kernels::GroupedParams p{};
  p.x = x.data_ptr();
  p.y = y != nullptr ? y->data_ptr() : nullptr;
  fill_shrink_expand(p, x, shrink_pool, shrink_pages, expand_pool, expand_pages, args);
  p.order = plan.order.data_ptr<int32_t>();
  p.seg_offsets = plan.seg_offsets.data_ptr<int32_t>();
  p.min_segment = min_segment;
  p.hs = nullptr;
  p.skip_expand = y == nullptr;
  return p;
}

void grouped(const kernels::GroupedParams& p, const at::Tensor& like) {
  const int sms = sm_count(like);
  const auto ws = at::empty({static_cast<int64_t>(kernels::grouped_workspace_bytes(p, sms))},
                            like.options().dtype(at::kByte));
  check_launch(kernels::launch_grouped(p, kernel_dtype(like.scalar_type()), ws.data_ptr(), sms,
                                       c10::cuda::getCurrentCUDAStream()),
               "the LoRA grouped GEMM");
}

kernels::OpShape op_shape(const LoraArgs& args, const Plan* plan) {
  kernels::OpShape s{};
  s.num_tokens = args.num_tokens();
  s.num_slots = args.num_slots();
  s.max_rank = args.max_rank();
  s.in_features = args.in_features();
  s.out_features = args.out_features();
  s.half_precision = args.x.scalar_type() == at::kHalf || args.x.scalar_type() == at::kBFloat16;
  s.has_plan = plan != nullptr;
  s.grouped_compiled = kernels::grouped_compiled();
  return s;
}

// Alignment of the grouped path's operands does not depend on the plan's contents; a
// stand-in plan lets grouped_params be built before the real one exists.
bool grouped_aligned(const at::Tensor* y, const at::Tensor& x, const at::Tensor& shrink_pool,
                     const at::Tensor& expand_pool, const LoraArgs& args) {
  const Plan none{args.token_slot, args.token_slot};
  return kernels::grouped_aligned(
      grouped_params(y, x, shrink_pool, args.a_pages, expand_pool, args.b_pages, args, none, 1));
}

bool stream_is_capturing(const at::Device& device) {
  // The current stream of the tensors' device, not of the current device: they may differ.
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// MINLORA_CHECK_INDICES=1 (read on every call): check index values on the host, except while
// the tensors' stream is being captured (a host read would break the capture).
bool check_indices(const at::Device& device) {
  const char* v = std::getenv("MINLORA_CHECK_INDICES");
  return v != nullptr && std::strcmp(v, "1") == 0 && !stream_is_capturing(device);
}

Plan device_plan(const at::Tensor& token_slot, int64_t num_slots);

void forward_add(at::Tensor& y, const LoraArgs& args, const Plan* plan) {
  check_rank_width(args);
  if (check_indices(args.x.device())) (void)read_indices(args, plan);
  const c10::cuda::CUDAGuard guard(args.x.device());
  kernels::OpShape shape = op_shape(args, plan);
  shape.grouped_aligned = shape.grouped_compiled && shape.half_precision &&
                          grouped_aligned(&y, args.x, args.a_pool, args.b_pool, args);
  const kernels::Choice c = kernels::choose_kernels(shape, kernel_mode());
  if (c.fallback) {
    fallback_shrink_expand_add(y, args.x, args.a_pool, args.a_pages, args.b_pool, args.b_pages, args);
    return;
  }
  Plan built;
  if (c.build_plan) {
    built = device_plan(args.token_slot, args.num_slots());
    plan = &built;
  }
  if (c.grouped) {
    grouped(grouped_params(&y, args.x, args.a_pool, args.a_pages, args.b_pool, args.b_pages, args, *plan,
                           c.grouped_min_segment),
            args.x);
  }
  if (c.gather) {
    gather(&y, args.x, nullptr, nullptr, args.a_pool, args.a_pages, args.b_pool, args.b_pages, args,
           c.gather_planned ? plan : nullptr, c.grouped ? c.grouped_min_segment : 0);
  }
}

Grads backward(const at::Tensor& grad_y, const LoraArgs& args, const Plan* plan, std::array<bool, 3> output_mask) {
  check_rank_width(args);
  if (check_indices(args.x.device())) (void)read_indices(args, plan);
  const c10::cuda::CUDAGuard guard(args.x.device());
  const auto g = grad_y.contiguous();
  kernels::OpShape shape = op_shape(args, plan);
  // grad_x is allocated here (aligned); the two shrinks read g with b_pool and x with a_pool.
  shape.grouped_aligned = shape.grouped_compiled && shape.half_precision &&
                          grouped_aligned(nullptr, g, args.b_pool, args.a_pool, args) &&
                          grouped_aligned(nullptr, args.x, args.a_pool, args.b_pool, args);
  const kernels::BackwardChoice c = kernels::choose_backward(shape, kernel_mode());
  if (c.fallback) return fallback_backward(g, args, output_mask);
  // The pool gradients sum over each slot's tokens: they need the plan's segments.
  Plan built;
  if (plan == nullptr) {
    built = device_plan(args.token_slot, args.num_slots());
    plan = &built;
  }
  const int64_t T = args.num_tokens(), R = args.max_rank();
  const auto empty = at::empty({0}, args.x.options());
  at::Tensor grad_x = empty, grad_a = empty, grad_b = empty;
  if (output_mask[0]) grad_x = at::zeros_like(args.x);
  // u[t] = scale_s B_s^T g_t feeds grad_x and grad_a; h[t] = scale_s A_s x_t feeds grad_b.
  // Gather path: float32 [T, R], row = token.  Grouped path: operand dtype [T, W], row =
  // plan position (the GEMMs' intermediate, rounded only as the input of the next product).
  at::Tensor u, h;
  int64_t coef_ld = R;
  if (c.grouped) {
    coef_ld = kernels::grouped_hs_width(R);
    if (output_mask[0] || output_mask[1]) {
      u = at::empty({T, coef_ld}, args.x.options());
      auto p = grouped_params(output_mask[0] ? &grad_x : nullptr, g, args.b_pool, args.b_pages, args.a_pool,
                              args.a_pages, args, *plan, /*min_segment=*/1);
      p.hs = u.data_ptr();
      grouped(p, args.x);
    }
    if (output_mask[2]) {
      h = at::empty({T, coef_ld}, args.x.options());
      auto p = grouped_params(nullptr, args.x, args.a_pool, args.a_pages, args.b_pool, args.b_pages, args, *plan,
                              /*min_segment=*/1);
      p.hs = h.data_ptr();
      grouped(p, args.x);
    }
  } else {
    const auto f32 = args.x.options().dtype(at::kFloat);
    if (output_mask[0] || output_mask[1]) {
      u = at::empty({T, R}, f32);
      gather(nullptr, g, nullptr, u.data_ptr<float>(), args.b_pool, args.b_pages, args.a_pool, args.a_pages, args,
             plan, 0);
    }
    if (output_mask[2]) {
      h = at::empty({T, R}, f32);
      gather(nullptr, args.x, nullptr, h.data_ptr<float>(), args.a_pool, args.a_pages, args.b_pool, args.b_pages,
             args, plan, 0);
    }
    if (output_mask[0]) {
      gather(&grad_x, g, u.data_ptr<float>(), nullptr, args.b_pool, args.b_pages, args.a_pool, args.a_pages, args,
             plan, 0);
    }
  }
  // Split each segment's tokens among a few blocks when slots average many tokens, so long
  // segments keep the GPU busy; each split adds once into the (dtype) gradient, so keep it small.
  const int64_t avg = T / std::max<int64_t>(1, args.num_slots());
  const int32_t splits = static_cast<int32_t>(std::clamp<int64_t>(avg / 256, 1, 4));
  auto segment_grad = [&](const at::Tensor& v, const at::Tensor& coef, const at::Tensor& pages,
                          const at::Tensor& pool) {
    at::Tensor grad = at::zeros_like(pool);
    kernels::SegmentGradParams p{};
    p.v = v.data_ptr();
    p.coef = c.grouped ? nullptr : coef.data_ptr<float>();
    p.coef_plan = c.grouped ? coef.data_ptr() : nullptr;
    p.coef_ld = coef_ld;
    p.grad_pool = grad.data_ptr();
    p.pages = pages.data_ptr<int32_t>();
    p.ranks = args.ranks.data_ptr<int32_t>();
    p.token_slot = args.token_slot.data_ptr<int32_t>();
    p.order = plan->order.data_ptr<int32_t>();
    p.seg_offsets = plan->seg_offsets.data_ptr<int32_t>();
    p.num_tokens = T;
    p.num_slots = args.num_slots();
    p.max_rank = R;
    p.len = pool.size(1);
    p.num_pages = pool.size(0);
    p.token_splits = splits;
    const bool vec = aligned16({&v, &grad});
    check_launch(kernels::launch_segment_grad(p, kernel_dtype(args.x.scalar_type()), vec,
                                              c10::cuda::getCurrentCUDAStream()),
                 "the LoRA segment-gradient kernel");
    return grad;
  };
  if (output_mask[1]) grad_a = segment_grad(args.x, u, args.a_pages, args.a_pool);
  if (output_mask[2]) grad_b = segment_grad(g, h, args.b_pages, args.b_pool);
  return {grad_x, grad_a, grad_b};
}

Plan device_plan(const at::Tensor& token_slot, int64_t num_slots) {
  const c10::cuda::CUDAGuard guard(token_slot.device());
  // A stable sort by slot (slot -1 last) and segment offsets from per-slot counts, all on
  // the device with fixed output sizes: no host synchronisation.
  // Slots outside 0..S-1 (never checked here) are treated as -1.
  const auto key = token_slot.masked_fill(token_slot.lt(0).logical_or(token_slot.ge(num_slots)), num_slots)
                       .to(at::kLong);
  const auto order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false)).to(at::kInt);
  auto counts = at::zeros({num_slots + 1}, key.options());
  counts.scatter_add_(0, key, at::ones_like(key));
  auto seg = at::zeros({num_slots + 1}, token_slot.options());
  seg.narrow(0, 1, num_slots).copy_(at::cumsum(counts.narrow(0, 0, num_slots), 0));
  return Plan{order, seg};
}

// The functional form: y starts at zero, then the kernels add the delta.
at::Tensor forward(const LoraArgs& args, const Plan* plan) {
  auto y = at::zeros({args.num_tokens(), args.out_features()}, args.x.options());
  forward_add(y, args, plan);
  return y;
}

Plan build_plan(const at::Tensor& token_slot, int64_t num_slots) {
  if (check_indices(token_slot.device())) (void)read_token_slot(token_slot, num_slots);
  return device_plan(token_slot, num_slots);
}

}  // namespace

TORCH_LIBRARY_IMPL(minlora, CUDA, m) {
  register_lora_ops<&cuda::forward, &cuda::forward_add, &cuda::backward, &cuda::build_plan>(m);
}

}  // namespace minlora::cuda
