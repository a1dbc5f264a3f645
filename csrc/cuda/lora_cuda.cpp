// The CUDA backend of the LoRA ops: turns validated tensors into kernel parameters, chooses
// the kernels (kernels/dispatch.h), launches them on the current stream, and registers
// TORCH_LIBRARY_IMPL(minlora, CUDA).  Nothing here synchronises the host (no reads of device
// memory, no blocking calls), so the ops can be captured into CUDA graphs; workspaces come
// from the caching allocator.  Index values are therefore not checked here: the kernels treat
// an out-of-range slot, rank or page as "no adapter" and trust only plan positions that agree
// with the plan's positions (kernels/lora_index.h), so they never read out of bounds and never
// write a row twice.  MINLORA_CHECK_INDICES=1 adds the host check of the CPU backend (a debug
// switch: it copies the index tensors to the host).
//
// Every output row is written once: the functional forward and grad_x are written only by the
// kernels (rows no path owns get zeros), never zero-filled first (except where page tables have
// no column at all: no kernel runs, the output is zeroed); the accumulating forms add only into
// the rows and pages the batch owns.
// c10's CUDA headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE and
// doubles this file's compile time).
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../lora_op.h"
#include "kernels/dispatch.h"
#include "kernels/lora_gather.cuh"
#include "kernels/lora_grouped.cuh"

namespace minlora::cuda {
namespace {

namespace k = kernels;

k::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return k::DType::kFloat16;
    case at::kBFloat16: return k::DType::kBFloat16;
    case at::kFloat: return k::DType::kFloat32;
    default: TORCH_CHECK(false, "minlora CUDA kernels take float16, bfloat16 or float32, got ", t);
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "minlora: launching ", what, " failed: ", cudaGetErrorString(err));
}

void check_rank_width(const LoraArgs& args) {
  TORCH_CHECK_VALUE(args.max_rank() <= k::kMaxRank, "a_pages has R = ", args.max_rank(),
                    " columns; the CUDA kernels take at most ", k::kMaxRank);
}

k::KernelMode kernel_mode() {
  const k::KernelMode mode = k::kernel_mode_from_env();
  TORCH_CHECK_VALUE(mode != k::KernelMode::kUnknown, "MINLORA_CUDA_KERNELS = '", std::getenv("MINLORA_CUDA_KERNELS"),
                    "' is none of auto, fallback, gather, grouped");
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

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

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

// Rows of every tensor start 16-byte aligned (base pointers and row lengths in bytes).
bool rows_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    const int64_t row_bytes = t->size(-1) * static_cast<int64_t>(t->element_size());
    const void* ptr = t->data_ptr();
    if (!k::rows_are_16b_aligned(&ptr, 1, &row_bytes, 1)) return false;
  }
  return true;
}

// The grouped path's alignment: 16-byte base pointers, rows of multiples of 8 elements.
bool grouped_rows_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    const void* ptr = t->data_ptr();
    const int64_t len = t->size(-1);
    if (!k::grouped_aligned(&ptr, 1, &len, 1)) return false;
  }
  return true;
}

k::OpShape op_shape(const LoraArgs& args, const Plan* plan, std::initializer_list<const at::Tensor*> rows) {
  k::OpShape s{};
  s.num_tokens = args.num_tokens();
  s.num_slots = args.num_slots();
  s.max_rank = args.max_rank();
  s.in_features = args.in_features();
  s.out_features = args.out_features();
  s.max_segment = args.max_segment;
  s.sm_count = sm_count(args.x);
  s.vec = rows_aligned(rows) ? 16 / static_cast<int>(args.x.element_size()) : 1;
  s.half_precision = args.x.scalar_type() == at::kHalf || args.x.scalar_type() == at::kBFloat16;
  s.has_plan = plan != nullptr;
  s.has_positions = plan != nullptr && plan->positions.defined();
  s.grouped_compiled = k::grouped_compiled();
  s.grouped_aligned = grouped_rows_aligned(rows);
  return s;
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
  return Plan{order, seg, at::Tensor()};
}

at::Tensor device_positions(const at::Tensor& order) {
  const c10::cuda::CUDAGuard guard(order.device());
  auto positions = at::empty_like(order);
  check_launch(k::launch_plan_positions(order.data_ptr<int32_t>(), order.size(0), positions.data_ptr<int32_t>(),
                                        stream()),
               "the plan-positions kernel");
  return positions;
}

// The plan the kernels read: the caller's, or one built here, with its positions.
Plan resolve_plan(const LoraArgs& args, const Plan* given, const k::Choice& c) {
  Plan plan = given != nullptr ? *given : Plan{};
  if (c.build_plan) plan = device_plan(args.token_slot, args.num_slots());
  if (plan.order.defined() && !plan.positions.defined() && c.need_positions) plan.positions = device_positions(plan.order);
  return plan;
}

k::PlanView plan_view(const LoraArgs& args, const Plan& plan) {
  k::PlanView v{};
  v.token_slot = args.token_slot.data_ptr<int32_t>();
  v.ranks = args.ranks.data_ptr<int32_t>();
  const bool full = plan.order.defined() && plan.positions.defined();
  v.order = full ? plan.order.data_ptr<int32_t>() : nullptr;
  v.seg_offsets = full ? plan.seg_offsets.data_ptr<int32_t>() : nullptr;
  v.positions = full ? plan.positions.data_ptr<int32_t>() : nullptr;
  v.num_tokens = args.num_tokens();
  v.num_slots = args.num_slots();
  v.max_rank = args.max_rank();
  return v;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

// ---- one shrink-then-expand: the forward, and grad_x ----

// The operands of one shrink-then-expand: rows of `act` [T, len_in] -> pages of shrink
// (length len_in) -> pages of expand (length len_out) into `out`.  The forward is
// (x, a_pool, a_pages, b_pool, b_pages); grad_x is (grad_y, b_pool, b_pages, a_pool, a_pages).
struct Operands {
  const at::Tensor& act;
  const at::Tensor& shrink_pool;
  const at::Tensor& shrink_pages;
  const at::Tensor& expand_pool;
  const at::Tensor& expand_pages;
};

k::ShrinkExpandOperands kernel_operands(const Operands& o, const LoraArgs& args) {
  k::ShrinkExpandOperands k{};
  k.act = o.act.data_ptr();
  k.act_len = o.act.size(1);
  k.shrink_pool = o.shrink_pool.data_ptr();
  k.shrink_pages = o.shrink_pages.data_ptr<int32_t>();
  k.num_shrink_pages = o.shrink_pool.size(0);
  k.expand_pool = o.expand_pool.data_ptr();
  k.expand_pages = o.expand_pages.data_ptr<int32_t>();
  k.num_expand_pages = o.expand_pool.size(0);
  k.out_len = o.expand_pool.size(1);
  k.scales = args.scales.data_ptr<float>();
  return k;
}

k::GatherParams gather_params(const Operands& o, const LoraArgs& args, const k::PlanView& view,
                              const k::Choice& c, at::Tensor* out, bool accumulate, float* partial) {
  k::GatherParams p{};
  p.plan = view;
  p.mode = c.mode;
  p.ops = kernel_operands(o, args);
  p.y = out != nullptr ? out->data_ptr() : nullptr;
  p.accumulate = accumulate;
  p.partial = partial;
  p.launch = c.launch;
  return p;
}

k::GroupedOp grouped_op(const Operands& o, const LoraArgs& args, const k::PlanView& view, int64_t grouped_min,
                        at::Tensor* out, bool accumulate, bool forward, at::Tensor* hs) {
  k::GroupedOp g{};
  g.plan = view;
  g.grouped_min = grouped_min;
  g.ops = kernel_operands(o, args);
  // The forward scales its intermediate (DESIGN.md, The math); the backward keeps u and h
  // unscaled in the operand dtype and the consumers apply the scale in float32, so a large
  // scale cannot push a float16 intermediate out of range.
  g.shrink_scaled = forward;
  g.expand_scaled = !forward;
  g.out = out != nullptr ? out->data_ptr() : nullptr;
  g.accumulate = accumulate;
  g.hs = hs != nullptr ? hs->data_ptr() : nullptr;
  return g;
}

void launch_grouped_op(const k::GroupedOp& g, const at::Tensor& like) {
  const int sms = sm_count(like);
  const k::DType dtype = kernel_dtype(like.scalar_type());
  const auto ws = workspace(k::grouped_workspace_bytes(g, dtype, sms), like);
  check_launch(k::launch_grouped(g, dtype, ws.data_ptr(), sms, stream()), "the LoRA grouped GEMM");
}

// out (+)= the delta of `o` for every row the batch owns; write-only (out = delta, zeros in
// the other rows) unless accumulate.  c: the dispatcher's choice; plan resolved.
void shrink_expand(at::Tensor& out, const Operands& o, const LoraArgs& args, const Plan& plan, const k::Choice& c,
                   bool accumulate, int vec) {
  const k::PlanView view = plan_view(args, plan);
  const k::DType dtype = kernel_dtype(args.x.scalar_type());
  const bool vectorized = vec > 1;
  if (c.mode.grouped_min > 0)
    launch_grouped_op(grouped_op(o, args, view, c.mode.grouped_min, &out, accumulate, /*forward=*/true, nullptr),
                      args.x);
  if (!c.launch_gather) return;
  if (c.launch.fused) {
    check_launch(k::launch_gather_fused(gather_params(o, args, view, c, &out, accumulate, nullptr), dtype, vectorized,
                                        stream()),
                 "the LoRA gather kernel");
    return;
  }
  const auto partial = at::empty({c.launch.k_splits, args.num_tokens(), args.max_rank()},
                                 args.x.options().dtype(at::kFloat));
  const k::GatherParams p = gather_params(o, args, view, c, &out, accumulate, partial.data_ptr<float>());
  if (c.gather_shrink) check_launch(k::launch_gather_shrink(p, dtype, vectorized, stream()), "the LoRA gather shrink");
  check_launch(k::launch_gather_expand(p, dtype, vectorized, stream()), "the LoRA gather expand");
}

void forward_into(at::Tensor& y, const LoraArgs& args, const Plan* given, bool accumulate) {
  check_rank_width(args);
  if (check_indices(args.x.device())) (void)read_indices(args, given);
  if (args.out_features() == 0) return;
  const c10::cuda::CUDAGuard guard(args.x.device());
  if (args.max_rank() == 0) {
    // Page tables without a column: no slot has an adapter.  (The kernels' scratch would have
    // no element, and the caching allocator gives such a tensor no address.)
    if (!accumulate) y.zero_();
    return;
  }
  const k::OpShape shape = op_shape(args, given, {&args.x, &args.a_pool, &args.b_pool, &y});
  const k::Choice c = k::choose_forward(shape, kernel_mode(), !accumulate);
  const Plan plan = resolve_plan(args, given, c);
  shrink_expand(y, Operands{args.x, args.a_pool, args.a_pages, args.b_pool, args.b_pages}, args, plan, c, accumulate,
                shape.vec);
}

// ---- the backward ----

// One pool gradient of the backward: the functional form's dense gradient of the pools' dtype
// (zeroed here) or a caller's float32 accumulator.  Undefined: not wanted.
struct PoolGrad {
  at::Tensor data;
};

bool is_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat; }

// The operands of one pool gradient: v = x for grad_a_pool, grad_y for grad_b_pool; pages /
// pool: the gradient pool's, other_pages / other_pool: the other one's.  Empty when the
// gradient is not wanted.
k::PoolGradOperands pool_grad_operands(const LoraArgs& args, const at::Tensor& v, const at::Tensor& pages,
                                       const at::Tensor& pool, const at::Tensor& other_pages,
                                       const at::Tensor& other_pool, const PoolGrad& grad) {
  k::PoolGradOperands o{};
  if (!grad.data.defined()) return o;
  o.v = v.data_ptr();
  o.len = pool.size(1);
  o.scales = args.scales.data_ptr<float>();
  o.pages = pages.data_ptr<int32_t>();
  o.num_pages = pool.size(0);
  o.other_pages = other_pages.data_ptr<int32_t>();
  o.num_other_pages = other_pool.size(0);
  o.grad = grad.data.data_ptr();
  o.grad_f32 = is_f32(grad.data);
  return o;
}

// grad_x (undefined: not wanted; else written once) and the pool gradients (added into) of one
// backward call.  Per segment: the grouped GEMMs for the segments the grouped path owns, the
// gather and segment-gradient kernels for the others.
void backward_into(const at::Tensor& grad_y, const LoraArgs& args, const Plan* given, at::Tensor& grad_x,
                   PoolGrad grad_a, PoolGrad grad_b) {
  check_rank_width(args);
  if (check_indices(args.x.device())) (void)read_indices(args, given);
  const c10::cuda::CUDAGuard guard(args.x.device());
  const auto g = grad_y.contiguous();
  // A grad_x without elements (x of [T, 0]) has nothing to write and no address.
  const bool want_x = grad_x.defined() && grad_x.numel() > 0, want_a = grad_a.data.defined(),
             want_b = grad_b.data.defined();
  const bool need_u = want_x || want_a, need_h = want_b;
  if (!want_x && !want_a && !want_b) return;
  if (args.max_rank() == 0) {  // no slot has an adapter: grad_x is zero, the pool gradients get nothing
    if (want_x) grad_x.zero_();
    return;
  }
  const bool grads_f32 = (!want_a || is_f32(grad_a.data)) && (!want_b || is_f32(grad_b.data));
  const k::OpShape shape = op_shape(args, given, {&args.x, &g, &args.a_pool, &args.b_pool, &grad_x, &grad_a.data,
                                                  &grad_b.data});
  const k::BackwardChoice bc = k::choose_backward(shape, kernel_mode(), grads_f32);
  const k::Choice& c = bc.fwd;
  const Plan plan = resolve_plan(args, given, c);
  const k::PlanView view = plan_view(args, plan);
  const k::DType dtype = kernel_dtype(args.x.scalar_type());
  const bool vectorized = shape.vec > 1;
  const Operands u_ops{g, args.b_pool, args.b_pages, args.a_pool, args.a_pages};  // u = B^T g, grad_x = A^T u
  const Operands h_ops{args.x, args.a_pool, args.a_pages, args.b_pool, args.b_pages};  // h = A x
  const auto ops_a = pool_grad_operands(args, args.x, args.a_pages, args.a_pool, args.b_pages, args.b_pool, grad_a);
  const auto ops_b = pool_grad_operands(args, g, args.b_pages, args.b_pool, args.a_pages, args.a_pool, grad_b);
  if (c.mode.grouped_min > 0) {
    const int64_t ldh = k::grouped_hs_width(args.max_rank());
    at::Tensor us, hs;
    if (need_u) {
      us = at::empty({args.num_tokens(), ldh}, args.x.options());
      launch_grouped_op(grouped_op(u_ops, args, view, c.mode.grouped_min, want_x ? &grad_x : nullptr, false,
                                   /*forward=*/false, &us),
                        args.x);
    }
    if (need_h) {
      hs = at::empty({args.num_tokens(), ldh}, args.x.options());
      launch_grouped_op(grouped_op(h_ops, args, view, c.mode.grouped_min, nullptr, false, /*forward=*/false, &hs),
                        args.x);
    }
    const int sms = sm_count(args.x);
    auto grad_gemm = [&](const k::PoolGradOperands& ops, const at::Tensor& coef) {
      const k::GroupedGradOp op{.plan = view, .grouped_min = c.mode.grouped_min, .ops = ops, .hs = coef.data_ptr(),
                                .splits = bc.grouped_grad_splits};
      const auto ws = workspace(k::grouped_grad_workspace_bytes(op, dtype), args.x);
      check_launch(k::launch_grouped_grad(op, dtype, ws.data_ptr(), sms, stream()), "the LoRA grouped gradient GEMM");
    };
    if (want_a) grad_gemm(ops_a, us);
    if (want_b) grad_gemm(ops_b, hs);
  }
  // The gather side: coefficients u and h as float32 partial sums (never rounded), grad_x
  // from u (this launch also zeroes the rows no path owns), the segment gradients.
  const auto f32 = args.x.options().dtype(at::kFloat);
  at::Tensor u_part, h_part;
  if (need_u) {
    u_part = at::empty({c.launch.k_splits, args.num_tokens(), args.max_rank()}, f32);
    const k::GatherParams p = gather_params(u_ops, args, view, c, want_x ? &grad_x : nullptr, false,
                                            u_part.data_ptr<float>());
    if (c.gather_shrink) check_launch(k::launch_gather_shrink(p, dtype, vectorized, stream()), "the LoRA gather shrink");
    if (want_x) check_launch(k::launch_gather_expand(p, dtype, vectorized, stream()), "the LoRA gather expand");
  }
  if (!c.gather_shrink) return;  // the grouped path took every segment
  if (need_h) {
    k::Choice ch = c;
    ch.launch = bc.h_launch;
    h_part = at::empty({ch.launch.k_splits, args.num_tokens(), args.max_rank()}, f32);
    const k::GatherParams p = gather_params(h_ops, args, view, ch, nullptr, false, h_part.data_ptr<float>());
    check_launch(k::launch_gather_shrink(p, dtype, vectorized, stream()), "the LoRA gather shrink");
  }
  // partial: the float32 partial sums of u (grad_a) or h (grad_b).
  auto segment_grad = [&](const k::PoolGradOperands& ops, const at::Tensor& partial) {
    const k::SegmentGradParams p{.plan = view, .mode = c.mode, .ops = ops, .partial = partial.data_ptr<float>(),
                                 .k_splits = static_cast<int32_t>(partial.size(0)),
                                 .token_splits = bc.grad_token_splits};
    check_launch(k::launch_segment_grad(p, dtype, vectorized, stream()), "the LoRA segment-gradient kernel");
  };
  if (want_a) segment_grad(ops_a, u_part);
  if (want_b) segment_grad(ops_b, h_part);
}

// The functional backward: grad_x written once; dense pool gradients of the pools' dtype (a
// dense result is zeroed once; each (slot, rank index) sum is then added once).
Grads backward(const at::Tensor& grad_y, const LoraArgs& args, const Plan* plan, std::array<bool, 3> mask) {
  const auto empty = at::empty({0}, args.x.options());
  at::Tensor grad_x = mask[0] ? at::empty_like(args.x) : at::Tensor();
  PoolGrad grad_a{mask[1] ? at::zeros_like(args.a_pool) : at::Tensor()};
  PoolGrad grad_b{mask[2] ? at::zeros_like(args.b_pool) : at::Tensor()};
  backward_into(grad_y, args, plan, grad_x, grad_a, grad_b);
  return {mask[0] ? grad_x : empty, mask[1] ? grad_a.data : empty, mask[2] ? grad_b.data : empty};
}

// The accumulating backward: float32 gradient pages the caller owns; only the batch's pages
// are added into.
at::Tensor backward_accumulate(at::Tensor& grad_a_acc, at::Tensor& grad_b_acc, const at::Tensor& grad_y,
                               const LoraArgs& args, const Plan* plan, bool want_grad_x) {
  at::Tensor grad_x = want_grad_x ? at::empty_like(args.x) : at::Tensor();
  backward_into(grad_y, args, plan, grad_x, PoolGrad{grad_a_acc}, PoolGrad{grad_b_acc});
  return want_grad_x ? grad_x : at::empty({0}, args.x.options());
}

Plan build_plan(const at::Tensor& token_slot, int64_t num_slots) {
  if (check_indices(token_slot.device())) (void)read_token_slot(token_slot, num_slots);
  return device_plan(token_slot, num_slots);
}

at::Tensor plan_positions(const at::Tensor& order) {
  if (check_indices(order.device())) {
    const auto host = order.cpu();
    std::vector<int32_t> positions(static_cast<size_t>(order.size(0)));
    host_plan_positions(host.data_ptr<int32_t>(), order.size(0), positions.data());
  }
  return device_positions(order);
}

}  // namespace

TORCH_LIBRARY_IMPL(minlora, CUDA, m) {
  register_lora_ops<&cuda::forward_into, &cuda::backward, &cuda::backward_accumulate, &cuda::build_plan,
                    &cuda::plan_positions>(m);
}

}  // namespace minlora::cuda
