// CUDA side of the minlora ops: turns validated tensors into kernel parameters and launches
// on the current stream.  Nothing here synchronises the host, so the ops can be captured
// into CUDA graphs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include "../backend.h"
#include "../kernels/lora_simple.cuh"

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
  TORCH_CHECK_VALUE(args.max_rank() <= kernels::kSimpleMaxRank, "a_pages has R = ", args.max_rank(),
                    " columns; the CUDA kernels take at most ", kernels::kSimpleMaxRank);
}

// y += scale_s * E_s (S_s x) on the current stream (see kernels::ShrinkExpandParams).
void shrink_expand_add(at::Tensor& y, const at::Tensor& x, const at::Tensor& shrink_pool,
                       const at::Tensor& shrink_pages, const at::Tensor& expand_pool, const at::Tensor& expand_pages,
                       const LoraArgs& args) {
  kernels::ShrinkExpandParams p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
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
  p.out_features = y.size(1);
  p.num_shrink_pages = shrink_pool.size(0);
  p.num_expand_pages = expand_pool.size(0);
  check_launch(kernels::launch_shrink_expand_simple(p, kernel_dtype(x.scalar_type()),
                                                    at::cuda::getCurrentCUDAStream()),
               "the LoRA shrink/expand kernel");
}

}  // namespace

bool available() { return true; }

bool stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

void lora_forward_add(at::Tensor& y, const LoraArgs& args, const Plan* /*plan: unused by the simple kernel*/) {
  check_rank_width(args);
  const c10::cuda::CUDAGuard guard(args.x.device());
  shrink_expand_add(y, args.x, args.a_pool, args.a_pages, args.b_pool, args.b_pages, args);
}

Grads lora_backward(const at::Tensor& grad_y, const LoraArgs& args, const Plan* /*plan*/,
                    std::array<bool, 3> output_mask) {
  check_rank_width(args);
  const c10::cuda::CUDAGuard guard(args.x.device());
  const auto g = grad_y.contiguous();
  const auto empty = at::empty({0}, args.x.options());
  at::Tensor grad_x = empty, grad_a = empty, grad_b = empty;
  if (output_mask[0]) {
    grad_x = at::zeros_like(args.x);
    shrink_expand_add(grad_x, g, args.b_pool, args.b_pages, args.a_pool, args.a_pages, args);
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
    check_launch(kernels::launch_pool_grads_simple(p, kernel_dtype(args.x.scalar_type()),
                                                   at::cuda::getCurrentCUDAStream()),
                 "the LoRA pool-gradient kernel");
    if (output_mask[1]) grad_a = grad_a32.to(args.x.scalar_type());
    if (output_mask[2]) grad_b = grad_b32.to(args.x.scalar_type());
  }
  return {grad_x, grad_a, grad_b};
}

Plan build_plan(const at::Tensor& token_slot, int64_t num_slots) {
  const c10::cuda::CUDAGuard guard(token_slot.device());
  // A stable sort by slot (slot -1 last) and segment offsets from per-slot counts, all on
  // the device with fixed output sizes: no host synchronisation.
  const auto key = token_slot.masked_fill(token_slot.lt(0), num_slots).to(at::kLong);
  const auto order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false)).to(at::kInt);
  auto counts = at::zeros({num_slots + 1}, key.options());
  counts.scatter_add_(0, key, at::ones_like(key));
  auto seg = at::zeros({num_slots + 1}, token_slot.options());
  seg.narrow(0, 1, num_slots).copy_(at::cumsum(counts.narrow(0, 0, num_slots), 0));
  return Plan{order, seg};
}

}  // namespace minlora::cuda
