// Host side and prep kernel of the grouped GEMM path (see lora_grouped.cuh).  The CUTLASS
// kernels are lora_grouped_launch.h's launch_gemms.
#include <algorithm>

#include "common.cuh"
#include "lora_grouped.cuh"
#include "lora_grouped_desc.h"
#include "lora_grouped_launch.h"

namespace minlora::kernels {
namespace {

using grouped::KernelParams;
using grouped::Workspace;

constexpr int kPrepThreads = 128;

// One block per slot: checks the slot's segment, copies the values it checked into the
// workspace, writes the slot's problem sizes (0 when the segment is short, the rank is 0 or
// a check failed) and, for a write-only launch, zeroes the rows of a wanted segment it had to
// reject (no other path owns them).  See lora_grouped_desc.h's prep_* functions.
__global__ void __launch_bounds__(kPrepThreads) grouped_prep_kernel(KernelParams p, int element_size) {
  __shared__ Segment seg;
  __shared__ int rank;
  __shared__ bool wanted;
  const int32_t s = blockIdx.x;
  const int tid = flat_thread(), nthreads = block_threads();
  if (tid == 0) {
    Segment g;
    wanted = grouped_wants(p.plan, p.mode, s, &g);
    seg = g;
    rank = rank_of_slot(p.plan, s);
  }
  __syncthreads();
  const bool bad = wanted && grouped::prep_check(p, s, seg, rank, tid, nthreads);
  const bool accepted = __syncthreads_or(bad) == 0 && wanted;
  grouped::prep_write(p, s, seg, rank, accepted, tid, nthreads);
  if (!wanted || accepted || p.out == nullptr || p.accumulate) return;
  // Rows are 16-byte multiples (grouped_aligned): zero them with 16-byte stores.
  const int64_t row_vectors = p.out_len * element_size / 16;
  for (int64_t q = seg.begin; q < seg.end; ++q) {
    const int64_t t = grouped::prep_zero_token(p, s, q);
    if (t < 0) continue;
    int4* row = reinterpret_cast<int4*>(static_cast<char*>(p.out) + t * p.out_len * element_size);
    for (int64_t i = tid; i < row_vectors; i += nthreads) row[i] = make_int4(0, 0, 0, 0);
  }
}

KernelParams base_params(const PlanView& plan, int64_t grouped_min, const float* scales, const Workspace& w,
                         char* base, int32_t k_splits, int64_t k_split_len, int32_t grad_splits) {
  KernelParams k{};
  k.plan = plan;
  k.mode = GatherMode{true, kGatherTokens, grouped_min};
  k.scales = scales;
  k.shrink_sizes = reinterpret_cast<grouped::ProblemSize*>(base + w.shrink_sizes);
  k.expand_sizes = reinterpret_cast<grouped::ProblemSize*>(base + w.expand_sizes);
  k.grad_sizes = reinterpret_cast<grouped::ProblemSize*>(base + w.grad_sizes);
  k.seg_begin = reinterpret_cast<int32_t*>(base + w.seg_begin);
  k.grad_pos = reinterpret_cast<int32_t*>(base + w.grad_pos);
  k.tokens = reinterpret_cast<int32_t*>(base + w.tokens);
  k.shrink_idx = reinterpret_cast<int32_t*>(base + w.shrink_idx);
  k.expand_idx = reinterpret_cast<int32_t*>(base + w.expand_idx);
  k.ldh = grouped_hs_width(plan.max_rank);
  k.partial = k_splits > 1 ? reinterpret_cast<float*>(base + w.partial) : nullptr;
  k.k_splits = k_splits;
  k.k_split_len = k_split_len;
  k.grad_splits = grad_splits;
  return k;
}

cudaError_t check_common(const PlanView& plan, int64_t grouped_min, void* workspace) {
  if (plan.num_tokens > 0x7fffffff || plan.num_slots > 0x7fffffff || grouped_min < 1) return cudaErrorInvalidValue;
  if (plan.max_rank > kGatherMaxRank) return cudaErrorInvalidValue;
  if (plan.order == nullptr || plan.seg_offsets == nullptr || plan.positions == nullptr) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(workspace) % grouped::kWorkspaceAlign != 0) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// The prep kernel over k's slots, then family F's GEMMs for dtype (float16 or bfloat16).
template <grouped::Family F>
cudaError_t prep_and_launch_gemms(const KernelParams& k, DType dtype, int sm_count, cudaStream_t stream) {
  grouped_prep_kernel<<<static_cast<unsigned>(k.plan.num_slots), kPrepThreads, 0, stream>>>(k, dtype_size(dtype));
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  return dtype == DType::kFloat16 ? grouped::launch_gemms<F, DType::kFloat16>(k, sm_count, stream)
                                  : grouped::launch_gemms<F, DType::kBFloat16>(k, sm_count, stream);
}

}  // namespace

bool grouped_compiled() { return MINLORA_HAVE_CUTLASS != 0; }

bool grouped_aligned(const void* const* ptrs, int num_ptrs, const int64_t* row_lengths, int num_lengths) {
  for (int i = 0; i < num_ptrs; ++i)
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;  // null counts as aligned
  for (int i = 0; i < num_lengths; ++i)
    if (row_lengths[i] % 8 != 0) return false;
  return true;
}

size_t grouped_workspace_bytes(const GroupedOp& op, DType dtype, int sm_count) {
  const grouped::KSplit ks = grouped::choose_k_splits(op.plan.num_tokens, op.plan.max_rank, op.ops.act_len, sm_count);
  return grouped::workspace_layout(op.plan.num_tokens, op.plan.num_slots, op.plan.max_rank, ks.splits, 1,
                                   op.hs == nullptr, dtype_size(dtype))
      .total;
}

size_t grouped_grad_workspace_bytes(const GroupedGradOp& op, DType dtype) {
  return grouped::workspace_layout(op.plan.num_tokens, op.plan.num_slots, op.plan.max_rank, 1, op.splits, false,
                                   dtype_size(dtype))
      .total;
}

cudaError_t launch_grouped(const GroupedOp& op, DType dtype, void* workspace, int sm_count, cudaStream_t stream) {
  if (!grouped_compiled()) return cudaErrorNotSupported;
  if (op.plan.num_tokens == 0 || op.plan.num_slots == 0 || op.plan.max_rank == 0) return cudaSuccess;
  if (dtype == DType::kFloat32) return cudaErrorInvalidValue;
  if (cudaError_t bad = check_common(op.plan, op.grouped_min, workspace); bad != cudaSuccess) return bad;
  const void* ptrs[] = {op.ops.act, op.ops.shrink_pool, op.ops.expand_pool, op.out, op.hs};
  const int64_t lens[] = {op.ops.act_len, op.ops.out_len};
  if (!grouped_aligned(ptrs, 5, lens, 2)) return cudaErrorInvalidValue;
  const grouped::KSplit ks = grouped::choose_k_splits(op.plan.num_tokens, op.plan.max_rank, op.ops.act_len, sm_count);
  const Workspace w = grouped::workspace_layout(op.plan.num_tokens, op.plan.num_slots, op.plan.max_rank, ks.splits, 1,
                                                op.hs == nullptr, dtype_size(dtype));
  char* base = static_cast<char*>(workspace);
  KernelParams k = base_params(op.plan, op.grouped_min, op.ops.scales, w, base, ks.splits, ks.length, 1);
  k.shrink_pages = op.ops.shrink_pages;
  k.expand_pages = op.ops.expand_pages;
  k.num_shrink_pages = op.ops.num_shrink_pages;
  k.num_expand_pages = op.ops.num_expand_pages;
  k.act = op.ops.act;
  k.shrink_pool = op.ops.shrink_pool;
  k.act_len = op.ops.act_len;
  k.shrink_scaled = op.shrink_scaled;
  k.expand_pool = op.ops.expand_pool;
  k.out = op.out;
  k.out_len = op.ops.out_len;
  k.accumulate = op.accumulate;
  k.expand_scaled = op.expand_scaled;
  k.hs = op.hs != nullptr ? op.hs : base + w.hs;
  // hs starts at 0: its padding columns r..ldh-1 are read by the expand's padded K.
  const cudaError_t err =
      cudaMemsetAsync(k.hs, 0, static_cast<size_t>(dtype_size(dtype)) * op.plan.num_tokens * k.ldh, stream);
  if (err != cudaSuccess) return err;
  return prep_and_launch_gemms<grouped::Family::kShrinkExpand>(k, dtype, sm_count, stream);
}

cudaError_t launch_grouped_grad(const GroupedGradOp& op, DType dtype, void* workspace, int sm_count,
                                cudaStream_t stream) {
  if (!grouped_compiled()) return cudaErrorNotSupported;
  if (op.plan.num_tokens == 0 || op.plan.num_slots == 0 || op.plan.max_rank == 0 || op.ops.len == 0)
    return cudaSuccess;
  if (dtype == DType::kFloat32 || op.splits < 1) return cudaErrorInvalidValue;
  if (cudaError_t bad = check_common(op.plan, op.grouped_min, workspace); bad != cudaSuccess) return bad;
  const void* ptrs[] = {op.hs, op.ops.v, op.ops.grad};
  const int64_t lens[] = {op.ops.len};
  if (op.hs == nullptr || !grouped_aligned(ptrs, 3, lens, 1)) return cudaErrorInvalidValue;
  const Workspace w = grouped::workspace_layout(op.plan.num_tokens, op.plan.num_slots, op.plan.max_rank, 1, op.splits,
                                                false, dtype_size(dtype));
  char* base = static_cast<char*>(workspace);
  KernelParams k = base_params(op.plan, op.grouped_min, op.ops.scales, w, base, 1, 0, op.splits);
  // The gradient pool's table goes in as the shrink pages: its validated copy (shrink_idx)
  // holds the rows the problems add into.
  k.shrink_pages = op.ops.pages;
  k.expand_pages = op.ops.other_pages;
  k.num_shrink_pages = op.ops.num_pages;
  k.num_expand_pages = op.ops.num_other_pages;
  k.hs = const_cast<void*>(op.hs);
  k.grad_v = op.ops.v;
  k.grad = op.ops.grad;
  k.grad_len = op.ops.len;
  k.grad_f32 = op.ops.grad_f32;
  return prep_and_launch_gemms<grouped::Family::kGrad>(k, dtype, sm_count, stream);
}

}  // namespace minlora::kernels
