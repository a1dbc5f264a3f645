// Host side and prep kernel of the grouped GEMM path (see lora_grouped.cuh).  The CUTLASS
// kernels themselves live in lora_grouped_{f16,bf16}.cu.
#include <algorithm>

#include "common.cuh"
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
  size_t shrink_sizes, expand_sizes, seg_begin, expand_idx, claims, partial, hs, total;
  int32_t k_splits;
  int64_t k_split_len;
};

// Split-K of the shrink: with few tokens (so, at best, few M tiles) most multiprocessors would
// idle while the tiles stream x and the pages (K = in is long).  Estimate the tiles as if the
// tokens formed 128-row tiles, and split K until there are about two tiles per multiprocessor,
// keeping at least 512 columns (16 k-tiles) per split and at most 16 splits.
void choose_splits(const GroupedParams& p, int sm_count, Workspace& w) {
  const int64_t m_tiles = std::max<int64_t>(1, (p.num_tokens + 127) / 128);
  const int64_t n_tiles = std::max<int64_t>(1, (p.max_rank + 63) / 64);
  const int64_t want = std::max<int64_t>(1, 2 * static_cast<int64_t>(sm_count) / (m_tiles * n_tiles));
  int64_t splits = std::min<int64_t>({want, p.in_features / 512, 16});
  if (splits <= 1) {
    w.k_splits = 1;
    w.k_split_len = p.in_features;
    return;
  }
  // Split length a multiple of 32 (the k-tile) and of 8 (16-byte alignment of the split's start).
  w.k_split_len = ((p.in_features + splits - 1) / splits + 31) / 32 * 32;
  w.k_splits = static_cast<int32_t>((p.in_features + w.k_split_len - 1) / w.k_split_len);
}

Workspace layout(const GroupedParams& p, int sm_count) {
  Workspace w{};
  choose_splits(p, sm_count, w);
  const size_t T = p.num_tokens, S = p.num_slots, W = grouped_hs_width(p.max_rank);
  constexpr size_t coord = 3 * sizeof(int);  // cutlass::gemm::GemmCoord
  w.shrink_sizes = 0;
  w.expand_sizes = w.shrink_sizes + align_up(coord * S * w.k_splits);
  w.seg_begin = w.expand_sizes + align_up(coord * S);
  w.expand_idx = w.seg_begin + align_up(sizeof(int32_t) * S);
  w.claims = w.expand_idx + align_up(sizeof(int32_t) * S * W);
  w.partial = w.claims + align_up(sizeof(int32_t) * T);
  w.hs = w.partial + (w.k_splits > 1 ? align_up(sizeof(float) * w.k_splits * T * W) : 0);
  w.total = w.hs + (p.hs == nullptr ? align_up(2 * T * W) : 0);
  return w;
}

#if MINLORA_HAVE_CUTLASS
static_assert(sizeof(cutlass::gemm::GemmCoord) == 3 * sizeof(int), "GemmCoord is three ints");

// One block per slot: the problem sizes of its segment, or 0 when the segment is short
// (the gather kernel takes it) or any index it would read is invalid (never so for checked
// inputs; possible when a captured graph replays unchecked contents): a page outside its
// pool, a position whose token is outside 0..T-1 or not of this slot, or a token at two
// positions.  The slot then contributes nothing, and no y row is ever scattered twice: a
// token's positions can only lie in its own slot's segment, and within it claims[t] (scratch,
// written before it is read: no initialisation) keeps one position per token.
__global__ void __launch_bounds__(128) grouped_prep_kernel(GroupedParams p, cutlass::gemm::GemmCoord* shrink_sizes,
                                                           cutlass::gemm::GemmCoord* expand_sizes,
                                                           int32_t* seg_begin, int32_t* expand_idx, int32_t* claims,
                                                           int32_t k_splits, int64_t k_split_len) {
  const int64_t T = p.num_tokens, R = p.max_rank, s = blockIdx.x;
  const int64_t b0 = p.seg_offsets[s], b1 = p.seg_offsets[s + 1];
  const int64_t begin = b0 < 0 ? 0 : (b0 > T ? T : b0);
  const int64_t end = b1 < begin ? begin : (b1 > T ? T : b1);
  const int64_t len = end - begin;
  const int32_t r = slot_rank(p.ranks[s], R);
  const bool wanted = len > 0 && len >= p.min_segment && r >= 1;
  int bad = 0;
  if (wanted) {
    for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
      const int32_t a = p.shrink_pages[s * R + j], e = p.expand_pages[s * R + j];
      bad |= (a < 0 || a >= p.num_shrink_pages || e < 0 || e >= p.num_expand_pages);
    }
    for (int64_t q = begin + threadIdx.x; q < end; q += blockDim.x) {
      const int32_t t = p.order[q];
      const bool mine = t >= 0 && t < T && p.token_slot[t] == s;
      bad |= !mine;
      if (mine) claims[t] = static_cast<int32_t>(q);
    }
  }
  bad = __syncthreads_or(bad);
  if (wanted && !bad) {
    for (int64_t q = begin + threadIdx.x; q < end; q += blockDim.x) bad |= claims[p.order[q]] != q;
  }
  bad = __syncthreads_or(bad);
  const bool ok = wanted && !bad;
  // The expand's K is r rounded up to 8, not r: its A operand (hs, row-major, K contiguous)
  // is read with 16-byte cp.async, and CUTLASS takes the K residue (K % 32) as the FIRST
  // k-tile, then advances the A pointer by that residue; with K % 8 != 0 (e.g. r = 36) every
  // later 16-byte load of hs would be misaligned (a fault).  hs columns r..K-1 are exact zeros
  // (zero-filled in the shrink), so the padded rows of B add nothing; they must still be
  // gathered from a valid page, so they repeat the slot's page 0 (a page this slot reads
  // anyway: never an unused, possibly NaN page, never a page-table entry past the rank).
  const int64_t k_expand = (static_cast<int64_t>(r) + 7) / 8 * 8;
  if (ok) {
    const int64_t W = grouped_hs_width(R);
    for (int64_t j = threadIdx.x; j < k_expand; j += blockDim.x)
      expand_idx[s * W + j] = p.expand_pages[s * R + (j < r ? j : 0)];
  }
  if (threadIdx.x == 0) {
    const int m = ok ? static_cast<int>(len) : 0;
    for (int32_t q = 0; q < k_splits; ++q) {
      const int64_t k0 = q * k_split_len;
      const int64_t k = k_split_len < p.in_features - k0 ? k_split_len : p.in_features - k0;
      const bool some = ok && k > 0;
      shrink_sizes[s * k_splits + q] = cutlass::gemm::GemmCoord(some ? m : 0, some ? r : 0, some ? static_cast<int>(k) : 0);
    }
    expand_sizes[s] = cutlass::gemm::GemmCoord(m, ok ? static_cast<int>(p.out_features) : 0,
                                               ok ? static_cast<int>(k_expand) : 0);
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

size_t grouped_workspace_bytes(const GroupedParams& p, int sm_count) { return layout(p, sm_count).total; }

cudaError_t launch_grouped(const GroupedParams& p, DType dtype, void* workspace, int sm_count, cudaStream_t stream) {
#if MINLORA_HAVE_CUTLASS
  if (p.num_tokens == 0 || p.num_slots == 0 || p.max_rank == 0) return cudaSuccess;
  if (dtype == DType::kFloat32 || !grouped_aligned(p)) return cudaErrorInvalidValue;
  if (p.num_tokens > 0x7fffffff || p.num_slots > 0x7fffffff || p.min_segment < 1) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(workspace) % kAlign != 0) return cudaErrorInvalidValue;
  if (p.hs != nullptr && reinterpret_cast<uintptr_t>(p.hs) % 16 != 0) return cudaErrorInvalidValue;
  const Workspace w = layout(p, sm_count);
  char* base = static_cast<char*>(workspace);
  auto* shrink_sizes = reinterpret_cast<cutlass::gemm::GemmCoord*>(base + w.shrink_sizes);
  auto* expand_sizes = reinterpret_cast<cutlass::gemm::GemmCoord*>(base + w.expand_sizes);
  auto* seg_begin = reinterpret_cast<int32_t*>(base + w.seg_begin);
  auto* expand_idx = reinterpret_cast<int32_t*>(base + w.expand_idx);
  auto* claims = reinterpret_cast<int32_t*>(base + w.claims);
  void* hs = p.hs != nullptr ? p.hs : base + w.hs;
  // hs starts at 0: rows of skipped segments and the padding columns r..ldh-1 must read as 0.
  cudaError_t err = cudaMemsetAsync(hs, 0, 2 * static_cast<size_t>(p.num_tokens) * grouped_hs_width(p.max_rank), stream);
  if (err != cudaSuccess) return err;
  float* partial = w.k_splits > 1 ? reinterpret_cast<float*>(base + w.partial) : nullptr;
  if (partial != nullptr) {
    // Rows of skipped segments and columns past r must sum to 0 in the reduce.
    err = cudaMemsetAsync(partial, 0, sizeof(float) * w.k_splits * p.num_tokens * grouped_hs_width(p.max_rank),
                          stream);
    if (err != cudaSuccess) return err;
  }
  grouped_prep_kernel<<<static_cast<unsigned>(p.num_slots), 128, 0, stream>>>(
      p, shrink_sizes, expand_sizes, seg_begin, expand_idx, claims, w.k_splits, w.k_split_len);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  grouped::GroupedKernelParams k{};
  k.op = p;
  k.shrink_sizes = shrink_sizes;
  k.expand_sizes = expand_sizes;
  k.seg_begin = seg_begin;
  k.expand_idx = expand_idx;
  k.hs = hs;
  k.ldh = grouped_hs_width(p.max_rank);
  k.k_splits = w.k_splits;
  k.k_split_len = w.k_split_len;
  k.partial = partial;
  return dtype == DType::kFloat16 ? grouped::launch_grouped_f16(k, sm_count, stream)
                                  : grouped::launch_grouped_bf16(k, sm_count, stream);
#else
  (void)p, (void)dtype, (void)workspace, (void)sm_count, (void)stream;
  return cudaErrorNotSupported;
#endif
}

}  // namespace minlora::kernels
