// Host side and prep kernel of the grouped GEMM path (see lora_grouped.cuh).  The CUTLASS
// kernels themselves live in lora_grouped_{f16,bf16}.cu.
#include "lora_grouped.cuh"
#include "lora_grouped_problems.h"

#if __has_include("cutlass/cutlass.h")
#include "cutlass/gemm_coord.h"
#define MINLORA_HAVE_CUTLASS 1
#else
#define MINLORA_HAVE_CUTLASS 0
#endif

namespace minlora::kernels {
namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct Workspace {
  size_t shrink_sizes, expand_sizes, seg_begin, hs, total;
};

Workspace layout(int64_t T, int64_t S, int64_t R, bool hs_in_workspace = true) {
  Workspace w{};
  constexpr size_t coord = 3 * sizeof(int);  // cutlass::gemm::GemmCoord
  w.shrink_sizes = 0;
  w.expand_sizes = w.shrink_sizes + align_up(coord * S);
  w.seg_begin = w.expand_sizes + align_up(coord * S);
  w.hs = w.seg_begin + align_up(sizeof(int32_t) * S);
  w.total = w.hs + (hs_in_workspace ? align_up(2 * static_cast<size_t>(T) * grouped_hs_width(R)) : 0);
  return w;
}

#if MINLORA_HAVE_CUTLASS
static_assert(sizeof(cutlass::gemm::GemmCoord) == 3 * sizeof(int), "GemmCoord is three ints");

// One block per slot: the problem sizes of its segment, or 0 when the segment is short
// (the gather kernel takes it) or any index it would read is invalid (possible only when a
// captured graph replays unchecked contents; the slot then contributes nothing).
__global__ void __launch_bounds__(128) grouped_prep_kernel(GroupedParams p, cutlass::gemm::GemmCoord* shrink_sizes,
                                                           cutlass::gemm::GemmCoord* expand_sizes,
                                                           int32_t* seg_begin) {
  const int64_t T = p.num_tokens, R = p.max_rank, s = blockIdx.x;
  const int64_t b0 = p.seg_offsets[s], b1 = p.seg_offsets[s + 1];
  const int64_t begin = b0 < 0 ? 0 : (b0 > T ? T : b0);
  const int64_t end = b1 < begin ? begin : (b1 > T ? T : b1);
  const int64_t len = end - begin;
  const int32_t r = p.ranks[s];
  const bool wanted = len > 0 && len >= p.min_segment && r >= 1 && r <= R;
  int bad = 0;
  if (wanted) {
    for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
      const int32_t a = p.shrink_pages[s * R + j], e = p.expand_pages[s * R + j];
      bad |= (a < 0 || a >= p.num_shrink_pages || e < 0 || e >= p.num_expand_pages);
    }
    for (int64_t q = begin + threadIdx.x; q < end; q += blockDim.x) {
      const int32_t t = p.order[q];
      bad |= (t < 0 || t >= T);
    }
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    const bool ok = wanted && !bad;
    const int m = ok ? static_cast<int>(len) : 0;
    shrink_sizes[s] = cutlass::gemm::GemmCoord(m, ok ? r : 0, ok ? static_cast<int>(p.in_features) : 0);
    expand_sizes[s] = cutlass::gemm::GemmCoord(m, ok ? static_cast<int>(p.out_features) : 0, ok ? r : 0);
    seg_begin[s] = static_cast<int32_t>(begin);
  }
}
#endif

}  // namespace

bool grouped_compiled() { return MINLORA_HAVE_CUTLASS != 0; }

bool grouped_aligned(const GroupedParams& p) {
  const void* ptrs[] = {p.x, p.y, p.shrink_pool, p.expand_pool, p.hs};  // null counts as aligned
  for (const void* ptr : ptrs)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  return p.in_features % 8 == 0 && p.out_features % 8 == 0;
}

size_t grouped_workspace_bytes(int64_t num_tokens, int64_t num_slots, int64_t max_rank) {
  return layout(num_tokens, num_slots, max_rank).total;
}

cudaError_t launch_grouped(const GroupedParams& p, DType dtype, void* workspace, int sm_count, cudaStream_t stream) {
#if MINLORA_HAVE_CUTLASS
  if (p.num_tokens == 0 || p.num_slots == 0 || p.max_rank == 0) return cudaSuccess;
  if (dtype == DType::kFloat32 || !grouped_aligned(p)) return cudaErrorInvalidValue;
  if (p.num_tokens > 0x7fffffff || p.num_slots > 0x7fffffff || p.min_segment < 1) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(workspace) % kAlign != 0) return cudaErrorInvalidValue;
  if (p.hs != nullptr && reinterpret_cast<uintptr_t>(p.hs) % 16 != 0) return cudaErrorInvalidValue;
  const Workspace w = layout(p.num_tokens, p.num_slots, p.max_rank);
  char* base = static_cast<char*>(workspace);
  auto* shrink_sizes = reinterpret_cast<cutlass::gemm::GemmCoord*>(base + w.shrink_sizes);
  auto* expand_sizes = reinterpret_cast<cutlass::gemm::GemmCoord*>(base + w.expand_sizes);
  auto* seg_begin = reinterpret_cast<int32_t*>(base + w.seg_begin);
  void* hs = p.hs != nullptr ? p.hs : base + w.hs;
  // hs starts at 0: rows of skipped segments and the padding columns r..ldh-1 must read as 0.
  cudaError_t err = cudaMemsetAsync(hs, 0, 2 * static_cast<size_t>(p.num_tokens) * grouped_hs_width(p.max_rank), stream);
  if (err != cudaSuccess) return err;
  grouped_prep_kernel<<<static_cast<unsigned>(p.num_slots), 128, 0, stream>>>(p, shrink_sizes, expand_sizes,
                                                                              seg_begin);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  grouped::GroupedKernelParams k{};
  k.shrink_sizes = shrink_sizes;
  k.expand_sizes = expand_sizes;
  k.seg_begin = seg_begin;
  k.x = p.x;
  k.y = p.y;
  k.hs = hs;
  k.ldh = grouped_hs_width(p.max_rank);
  k.skip_expand = p.skip_expand;
  k.shrink_pool = p.shrink_pool;
  k.expand_pool = p.expand_pool;
  k.shrink_pages = p.shrink_pages;
  k.expand_pages = p.expand_pages;
  k.scales = p.scales;
  k.order = p.order;
  k.num_slots = p.num_slots;
  k.max_rank = p.max_rank;
  k.in_features = p.in_features;
  k.out_features = p.out_features;
  return dtype == DType::kFloat16 ? grouped::launch_grouped_f16(k, sm_count, stream)
                                  : grouped::launch_grouped_bf16(k, sm_count, stream);
#else
  (void)p, (void)dtype, (void)workspace, (void)sm_count, (void)stream;
  return cudaErrorNotSupported;
#endif
}

}  // namespace minlora::kernels
