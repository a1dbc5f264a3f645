// The grouped GEMM path's problems and operand descriptors as plain functions that compile
// for the device (nvcc: the prep kernel and the CUTLASS kernels call them) and for the host
// (g++: the CPU tests drive a plain GEMM with the same descriptors and compare it with the
// float64 reference).  No CUTLASS types: ProblemSize has the layout of cutlass::gemm::GemmCoord.
//
// One problem per slot s (and K split) of the segments the grouped path owns:
//   shrink  hs[pos, j]   = alpha * sum_k act[order[pos], k0 + k] * shrink_pool[shrink_pages[s, j], k0 + k]
//           A = act rows gathered by order (row-major), B = pages as gathered columns of a
//           column-major [K, N = r] operand, D = hs rows in plan order (or float32 partial
//           sums when K = in is split: partial[split, pos, j]).
//   expand  out[order[pos], c] (+)= alpha * sum_k hs[pos, k] * expand_pool[expand_idx[s, k], c]
//           K = r rounded up to 8 (hs rows stay 16-byte aligned after CUTLASS's K residue);
//           the padded k read hs = 0 and repeat the slot's page 0 (never an unused page).
//           A = hs (row-major), B = pages as gathered rows (row-major), D = rows scattered by order.
//   grad    grad[grad_pages[s, j], c] += alpha * sum_k hs[pos0 + k, j] * v[order[pos0 + k], c]
//           M = r, N = len, K = a range of the segment's positions.  A = hs as a column-major
//           [M = r, K] operand, B = v rows gathered by order (row-major), D: atomic adds into
//           the pages' rows (pages may be shared by slots and rank indices).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"
#include "lora_index.h"

namespace minlora::kernels::grouped {

struct ProblemSize {
  int32_t m, n, k;
};

// Tile shapes of the CUTLASS kernels (lora_grouped_impl.cuh static_asserts them).
constexpr int kTileM = 128, kTileN = 64, kTileK = 32;             // shrink and expand
constexpr int kGradTileM = 64, kGradTileN = 128, kGradTileK = 32;  // pool gradients
// Positions per K split of a pool-gradient problem: a multiple of the K tile.
constexpr int64_t kGradSplitGranule = kGradTileK;

MINLORA_HOST_DEVICE constexpr int64_t expand_k(int64_t r) { return (r + 7) / 8 * 8; }

// Everything the prep and GEMM kernels read.  Device pointers on the GPU.
struct KernelParams {
  PlanView plan;
  GatherMode mode;  // mode.grouped_min: the segments this path owns
  const float* scales;
  // Page tables of both pools: the prep kernel accepts a segment only when every page below
  // the rank is in its pool, in both tables (so every launch of one op accepts the same).
  const int32_t* shrink_pages;  // [S, R]
  const int32_t* expand_pages;  // [S, R]
  int64_t num_shrink_pages, num_expand_pages;
  // shrink: act [T, act_len]
  const void* act;
  const void* shrink_pool;
  int64_t act_len;
  bool shrink_scaled;  // alpha = scale_s (forward) or 1 (backward: the consumer scales)
  // expand: into out [T, out_len] (null: no expand)
  const void* expand_pool;
  void* out;
  int64_t out_len;
  bool accumulate;     // beta = 1 (out += ...) or 0 (out written once)
  bool expand_scaled;  // alpha = scale_s (backward) or 1 (forward)
  // grad: v [T, grad_len] into grad [P, grad_len] (float32 or the operand dtype) at the
  // shrink pages (the gradient launch passes the gradient pool's table as shrink_pages)
  const void* grad_v;
  void* grad;
  int64_t grad_len;
  bool grad_f32;
  int32_t grad_splits;
  // workspace (filled by the prep kernel; the GEMMs read the plan's and the page tables'
  // values only through these validated copies)
  ProblemSize* shrink_sizes;  // [S * k_splits]
  ProblemSize* expand_sizes;  // [S]
  ProblemSize* grad_sizes;    // [S * grad_splits]
  int32_t* seg_begin;         // [S]: clamped segment starts
  int32_t* grad_pos;          // [S * grad_splits]: first position of each gradient problem
  int32_t* tokens;            // [T]: order's values at the positions of accepted segments
  int32_t* shrink_idx;        // [S, ldh]: shrink pages j < r
  int32_t* expand_idx;        // [S, ldh]: expand pages, padded (expand_index)
  void* hs;                   // [T, ldh] operand dtype, zeroed before the shrink
  int64_t ldh;
  float* partial;             // [k_splits, T, ldh] when k_splits > 1
  int32_t k_splits;
  int64_t k_split_len;
};

// ---- problem sizes (0 x 0 x 0: the problem has no tiles)

MINLORA_HOST_DEVICE inline ProblemSize shrink_problem(bool accepted, int64_t length, int r, int64_t act_len,
                                                      int32_t split, int64_t k_split_len) {
  const int64_t k0 = split * k_split_len;
  const int64_t k = k_split_len < act_len - k0 ? k_split_len : act_len - k0;
  if (!accepted || k <= 0 || length <= 0) return {0, 0, 0};
  return {static_cast<int32_t>(length), r, static_cast<int32_t>(k)};
}

MINLORA_HOST_DEVICE inline ProblemSize expand_problem(bool accepted, int64_t length, int r, int64_t out_len) {
  if (!accepted || length <= 0) return {0, 0, 0};
  return {static_cast<int32_t>(length), static_cast<int32_t>(out_len), static_cast<int32_t>(expand_k(r))};
}

MINLORA_HOST_DEVICE inline ProblemSize grad_problem(bool accepted, const Segment& seg, int r, int64_t grad_len,
                                                    int32_t split, int32_t splits) {
  const PositionRange range = split_range(seg, split, splits, kGradSplitGranule);
  if (!accepted || range.end <= range.begin) return {0, 0, 0};
  return {r, static_cast<int32_t>(grad_len), static_cast<int32_t>(range.end - range.begin)};
}

// Row k of the expand's gathered B operand for slot s: the page of rank index k, or (padding
// k >= r, where hs is 0) the slot's page 0.
MINLORA_HOST_DEVICE inline int32_t expand_index(const int32_t* slot_pages, int r, int64_t k) {
  return slot_pages[k < r ? k : 0];
}

// ---- the prep kernel's work for one slot, as loops strided over the threads of its block
// (thread tid of nthreads; the CPU tests run them with one thread)

// Phase 1: checks slot s's segment (pages below the rank in both tables, every position
// trusted and of slot s) and copies each value it checked into the workspace (so the GEMMs
// never re-read the caller's tensors).  True when this thread found a reason to reject.
MINLORA_HOST_DEVICE inline bool prep_check(const KernelParams& p, int32_t s, const Segment& seg, int r, int tid,
                                           int nthreads) {
  bool bad = false;
  const int64_t R = p.plan.max_rank;
  for (int64_t j = tid; j < r; j += nthreads) {
    const int32_t a = p.shrink_pages[s * R + j], e = p.expand_pages[s * R + j];
    bad |= !page_in_pool(a, p.num_shrink_pages) || !page_in_pool(e, p.num_expand_pages);
    p.shrink_idx[s * p.ldh + j] = a;
    p.expand_idx[s * p.ldh + j] = e;
  }
  for (int64_t q = seg.begin + tid; q < seg.end; q += nthreads) {
    int32_t sq;
    Segment g;
    const int64_t t = trusted_token(p.plan, q, &sq, &g);
    if (t < 0 || sq != s) {
      bad = true;
    } else {
      // Only slot s can find position q trusted and of its slot: no other block writes here.
      p.tokens[q] = static_cast<int32_t>(t);
    }
  }
  return bad;
}

// Phase 2 (after a barrier): the padding of the expand's gather indices and, on thread 0,
// the slot's problem sizes.  accepted: wanted and no thread rejected.
MINLORA_HOST_DEVICE inline void prep_write(const KernelParams& p, int32_t s, const Segment& seg, int r,
                                           bool accepted, int tid, int nthreads) {
  if (accepted) {
    int32_t* row = p.expand_idx + s * p.ldh;
    for (int64_t k = r + tid; k < expand_k(r); k += nthreads) row[k] = expand_index(row, r, k);
  }
  if (tid != 0) return;
  p.seg_begin[s] = static_cast<int32_t>(seg.begin);
  for (int32_t q = 0; q < p.k_splits; ++q)
    p.shrink_sizes[s * p.k_splits + q] = shrink_problem(accepted, seg.length(), r, p.act_len, q, p.k_split_len);
  p.expand_sizes[s] = expand_problem(accepted && p.out != nullptr, seg.length(), r, p.out_len);
  for (int32_t q = 0; q < p.grad_splits; ++q) {
    p.grad_pos[s * p.grad_splits + q] = static_cast<int32_t>(split_range(seg, q, p.grad_splits, kGradSplitGranule).begin);
    p.grad_sizes[s * p.grad_splits + q] = grad_problem(accepted && p.grad != nullptr, seg, r, p.grad_len, q,
                                                       p.grad_splits);
  }
}

// Phase 3, write-only launches whose segment was wanted but rejected: the token whose row
// the prep kernel zeroes at position q (-1: none), since no other path owns it.
MINLORA_HOST_DEVICE inline int64_t prep_zero_token(const KernelParams& p, int32_t s, int64_t q) {
  int32_t sq;
  Segment g;
  const int64_t t = trusted_token(p.plan, q, &sq, &g);
  return t >= 0 && sq == s ? t : -1;
}

// ---- operand descriptors: element offsets from the operands' base pointers, leading
// dimensions, gather / scatter index arrays (null: none) and the epilogue's alpha / beta.

struct GemmDesc {
  int64_t a_offset, lda;
  const int32_t* a_idx;
  int64_t b_offset, ldb;
  const int32_t* b_idx;
  int64_t d_offset, ldd;
  const int32_t* d_idx;
  float alpha, beta;
};

// Shrink problem (s, split): A = act, B = shrink_pool, D = hs or partial.
MINLORA_HOST_DEVICE inline GemmDesc shrink_desc(const KernelParams& p, int32_t s, int32_t split) {
  const int64_t begin = p.seg_begin[s], k0 = split * p.k_split_len;
  GemmDesc d{};
  d.a_offset = k0;
  d.lda = p.act_len;
  d.a_idx = p.tokens + begin;
  d.b_offset = k0;
  d.ldb = p.act_len;  // column n of B is page shrink_pages[s, n], a row of length act_len
  d.b_idx = p.shrink_idx + static_cast<int64_t>(s) * p.ldh;
  d.d_offset = ((p.k_splits > 1 ? split * p.plan.num_tokens : 0) + begin) * p.ldh;
  d.ldd = p.ldh;
  d.d_idx = nullptr;
  d.alpha = p.shrink_scaled ? p.scales[s] : 1.f;
  d.beta = 0.f;
  return d;
}

// Expand problem s: A = hs, B = expand_pool, C = D = out.
MINLORA_HOST_DEVICE inline GemmDesc expand_desc(const KernelParams& p, int32_t s) {
  const int64_t begin = p.seg_begin[s];
  GemmDesc d{};
  d.a_offset = begin * p.ldh;
  d.lda = p.ldh;
  d.a_idx = nullptr;
  d.b_offset = 0;
  d.ldb = p.out_len;  // row k of B is page expand_idx[s, k], of length out_len
  d.b_idx = p.expand_idx + static_cast<int64_t>(s) * p.ldh;
  d.d_offset = 0;
  d.ldd = p.out_len;
  d.d_idx = p.tokens + begin;
  d.alpha = p.expand_scaled ? p.scales[s] : 1.f;
  d.beta = p.accumulate ? 1.f : 0.f;
  return d;
}

// Gradient problem q = s * grad_splits + split: A = hs (column-major), B = grad_v, D = grad
// (atomic adds).  Its rows are the pages of the pool the gradient is for: the prep kernel's
// shrink_idx (the gradient launch passes that pool's table as the shrink pages).
MINLORA_HOST_DEVICE inline GemmDesc grad_desc(const KernelParams& p, int32_t s, int32_t split) {
  const int64_t pos0 = p.grad_pos[static_cast<int64_t>(s) * p.grad_splits + split];
  GemmDesc d{};
  d.a_offset = pos0 * p.ldh;  // element (j, k) at (pos0 + k) * ldh + j
  d.lda = p.ldh;
  d.a_idx = nullptr;
  d.b_offset = 0;
  d.ldb = p.grad_len;
  d.b_idx = p.tokens + pos0;
  d.d_offset = 0;
  d.ldd = p.grad_len;
  d.d_idx = p.shrink_idx + static_cast<int64_t>(s) * p.ldh;
  d.alpha = p.scales[s];
  d.beta = 1.f;
  return d;
}

// Top-left element of tile `tile` of a problem whose grid has grid_n tiles along N (CUTLASS's
// grouped problem visitor numbers a problem's tiles row by row).
MINLORA_HOST_DEVICE inline void tile_origin(int32_t tile, int32_t grid_n, int tile_m, int tile_n, int32_t* row,
                                            int32_t* col) {
  *row = tile / grid_n * tile_m;
  *col = tile % grid_n * tile_n;
}

// ---- split-K of the shrink and the workspace

// With few tokens (so, at best, few M tiles) most multiprocessors would idle while the tiles
// stream x and the pages (K = in is long).  Estimate the tiles as if the tokens formed 128-row
// tiles and split K until there are about two tiles per multiprocessor, keeping at least 512
// columns (16 k-tiles) per split and at most 16 splits.  The split length is a multiple of 32
// (the k-tile), hence of 8: every split starts 16-byte aligned.
struct KSplit {
  int32_t splits;
  int64_t length;
};

constexpr KSplit choose_k_splits(int64_t num_tokens, int64_t max_rank, int64_t act_len, int sm_count) {
  const int64_t m_tiles = num_tokens > kTileM ? (num_tokens + kTileM - 1) / kTileM : 1;
  const int64_t n_tiles = max_rank > kTileN ? (max_rank + kTileN - 1) / kTileN : 1;
  int64_t want = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1) / (m_tiles * n_tiles);
  if (want > act_len / 512) want = act_len / 512;
  if (want > 16) want = 16;
  if (want <= 1) return {1, act_len};
  const int64_t length = ((act_len + want - 1) / want + 31) / 32 * 32;
  return {static_cast<int32_t>((act_len + length - 1) / length), length};
}

// Byte offsets of the workspace of one launch (each part 256-byte aligned).
struct Workspace {
  size_t shrink_sizes, expand_sizes, grad_sizes, seg_begin, grad_pos, tokens, shrink_idx, expand_idx, partial, hs,
      total;
};

constexpr size_t kWorkspaceAlign = 256;

constexpr size_t align_up(size_t n) { return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

// element_size: of the operand dtype; hs_in_workspace: hs is not in caller memory.
constexpr Workspace workspace_layout(int64_t num_tokens, int64_t num_slots, int64_t max_rank, int32_t k_splits,
                                     int32_t grad_splits, bool hs_in_workspace, int element_size) {
  const size_t T = static_cast<size_t>(num_tokens), S = static_cast<size_t>(num_slots);
  const size_t W = static_cast<size_t>(grouped_hs_width(max_rank));
  const size_t coord = sizeof(ProblemSize), ks = static_cast<size_t>(k_splits), gs = static_cast<size_t>(grad_splits);
  Workspace w{};
  w.shrink_sizes = 0;
  w.expand_sizes = w.shrink_sizes + align_up(coord * S * ks);
  w.grad_sizes = w.expand_sizes + align_up(coord * S);
  w.seg_begin = w.grad_sizes + align_up(coord * S * gs);
  w.grad_pos = w.seg_begin + align_up(sizeof(int32_t) * S);
  w.tokens = w.grad_pos + align_up(sizeof(int32_t) * S * gs);
  w.shrink_idx = w.tokens + align_up(sizeof(int32_t) * T);
  w.expand_idx = w.shrink_idx + align_up(sizeof(int32_t) * S * W);
  w.partial = w.expand_idx + align_up(sizeof(int32_t) * S * W);
  w.hs = w.partial + (k_splits > 1 ? align_up(sizeof(float) * ks * T * W) : 0);
  w.total = w.hs + (hs_in_workspace ? align_up(static_cast<size_t>(element_size) * T * W) : 0);
  return w;
}

}  // namespace minlora::kernels::grouped
