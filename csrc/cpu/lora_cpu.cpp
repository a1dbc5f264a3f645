// The CPU backend of the LoRA ops: its kernels and TORCH_LIBRARY_IMPL(minlora, CPU).
//
// Each call first copies the index values it needs into private buffers and checks them
// (HostIndices, lora_op.h); the kernels read nothing else.  So another thread rewriting the
// page tables, ranks, token slots or plan during a call can change its answer, never make it
// read out of bounds, and scratch memory grows with the ranks in use, not with R.
//
// The work runs as items (a few tokens of one slot; a column tile of a pool gradient) in at
// most two parallel regions per call (at::parallel_for: torch's own threads), whose workers
// take items from a shared counter.  No worker waits for a share of the work fixed in
// advance: when another process holds a core, the workers that run take over its items, and
// the call pays one hand-off per region instead of one per matrix product or copy.  A region
// still ends when every thread of the team has joined it, which takes a scheduling quantum
// (milliseconds) when a core is busy elsewhere; so a call with less work than that runs in
// the calling thread, with no region at all (cpu_min_parallel_work).
//
// Short segments (decode: one or a few tokens per adapter) shrink and expand over blocks of
// up to kTokenBlock tokens, reading each page once per block; long segments (prefill,
// training) run as matrix products (at::mm) on float copies of their token rows and pages,
// where at::mm cannot start threads of its own: inside a region (nested regions run on one
// thread) or with one thread in all.  The intermediate A_s x_t is accumulated and scaled in
// float32 (float64 for float64 inputs) and never rounded.  The pool gradients of each (slot,
// rank index) are summed in that precision and added once into their page rows: a dense
// gradient of the pools' dtype (the functional backward) or float32 accumulators that only the
// batch's pages are added into (the accumulating backward, lora_backward_accumulate_).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <vector>

#include "../lora_op.h"

namespace minlora::cpu {
namespace {

// Segments at least this long go through matrix products; shorter ones through the token path.
constexpr int64_t kGemmMinTokens = 16;
// Tokens of one slot the token path handles per pass over the slot's pages.
constexpr int64_t kTokenBlock = 8;
// Tokens of one slot per matrix-product item (its rows and pages are gathered once per item).
constexpr int64_t kGemmTokens = 64;
// Rows zeroed per item of the write-once outputs (rows without an adapter).
constexpr int64_t kZeroRows = 256;
// Columns of a pool gradient per item (items own their columns: no two workers add into one element).
constexpr int64_t kGradColumns = 256;
// Below this much work (multiply-adds, about 3 ms on one core) a call runs in the calling
// thread, without a region: the default of cpu_min_parallel_work().  A region ends when every
// thread of the team has joined it, so on a machine shared with other processes a region
// costs a scheduling quantum; a process that owns its cores can lower the threshold.
constexpr int64_t kDefaultMinParallelWork = int64_t{1} << 25;

std::atomic<int64_t>& min_parallel_work_value() {
  static std::atomic<int64_t> value{kDefaultMinParallelWork};
  return value;
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;


// The float32 inner loops are built for AVX2+FMA as well as the baseline ISA and chosen at
// load time (GCC function multi-versioning): the extension must run on any x86-64, and
// the baseline's 4-wide SSE2 leaves half the memory bandwidth unused.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MINLORA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MINLORA_MULTIVERSION
#endif

// <v, page>: four independent accumulators, so the sum runs at the FMA units' throughput
// rather than their latency (one dot per page and token is the decode shrink's whole work).
MINLORA_MULTIVERSION float dot_f32(const float* v, const float* page, int64_t len) {
  float acc[4][8] = {};
  int64_t k = 0;
  for (; k + 32 <= len; k += 32)
    for (int j = 0; j < 4; ++j)
#pragma omp simd
      for (int l = 0; l < 8; ++l) acc[j][l] += v[k + 8 * j + l] * page[k + 8 * j + l];
  float sum = 0;
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 8; ++l) sum += acc[j][l];
  for (; k < len; ++k) sum += v[k] * page[k];
  return sum;
}

// out[b] = <rows[b], page> for b < 4: each chunk of the page is loaded once for four tokens.
MINLORA_MULTIVERSION void dot4_f32(const float* page, const float* const* rows, int64_t len, float* out) {
  float a0[8] = {}, a1[8] = {}, a2[8] = {}, a3[8] = {};
  const float *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
#pragma omp simd
    for (int l = 0; l < 8; ++l) {
      const float p = page[k + l];
      a0[l] += r0[k + l] * p;
      a1[l] += r1[k + l] * p;
      a2[l] += r2[k + l] * p;
      a3[l] += r3[k + l] * p;
    }
  }
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int l = 0; l < 8; ++l) {
    s0 += a0[l];
    s1 += a1[l];
    s2 += a2[l];
    s3 += a3[l];
  }
  for (; k < len; ++k) {
    s0 += r0[k] * page[k];
    s1 += r1[k] * page[k];
    s2 += r2[k] * page[k];
    s3 += r3[k] * page[k];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

MINLORA_MULTIVERSION void axpy_f32(float* y, float a, const float* x, int64_t len) {
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) y[c] += a * x[c];
}

// 16-bit <-> float32 conversions of whole rows, vectorised (bfloat16 by its bits: the upper
// half of a float32; rounding to nearest even, NaN kept quiet, as c10::BFloat16 rounds).
MINLORA_MULTIVERSION void to_f32(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
}

MINLORA_MULTIVERSION void to_f32(const c10::Half* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

MINLORA_MULTIVERSION void from_f32(const float* src, c10::BFloat16* dst, int64_t n) {
  auto* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = std::bit_cast<uint32_t>(src[i]);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    bits[i] = src[i] != src[i] ? uint16_t{0x7fc0} : rounded;
  }
}

MINLORA_MULTIVERSION void from_f32(const float* src, c10::Half* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// dst[0:n] = src[0:n] in dst's type: a copy when the types agree; 16-bit <-> float32 through
// the vectorised conversions (operands to acc precision and results back).
template <typename src_t, typename dst_t>
void convert(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::memcpy(dst, src, sizeof(dst_t) * static_cast<size_t>(n));
  } else if constexpr (std::is_same_v<dst_t, float> && sizeof(src_t) == 2) {
    to_f32(src, dst, n);
  } else if constexpr (std::is_same_v<src_t, float> && sizeof(dst_t) == 2) {
    from_f32(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(src[i]);
  }
}

// <v, page> over len elements, in acc precision (the float64 token path; float32 accumulation
// goes through shrink_tokens_f32).
template <typename scalar_t>
acc_type<scalar_t> dot(const scalar_t* v, const scalar_t* page, int64_t len) {
  using acc_t = acc_type<scalar_t>;
  acc_t acc = 0;
  // simd reduction: without it the compiler keeps the float sum sequential (no reassociation).
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < len; ++k) acc += static_cast<acc_t>(v[k]) * static_cast<acc_t>(page[k]);
  return acc;
}

// acc[0:len] += a * v[0:len], v in the operand dtype.
template <typename scalar_t, typename acc_t>
void axpy(acc_t* acc, acc_t a, const scalar_t* v, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    axpy_f32(acc, a, v, len);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < len; ++c) acc[c] += a * static_cast<acc_t>(v[c]);
  }
}

// ---- work items and the region that runs them

// Plan positions [begin, begin + count) of one slot; slot -1: rows to zero (no adapter).
struct Item {
  int32_t slot;
  int32_t count;
  int64_t begin;
  int64_t cost;  // multiply-adds, for ordering and for the inline threshold
};

// Per-worker buffers, grown on demand (sizes follow the ranks and token blocks in use).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> rows, pages, h, out;
  static acc_t* sized(std::vector<acc_t>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
};

// A column tile [c0, c1) of one pool gradient (grad_a_pool or grad_b_pool).
struct GradTile {
  bool is_a;
  int64_t c0, c1;
  int64_t cost;
};

// Runs fn(item, scratch, gemm_ok) for every item (anything with a `cost`), largest first, in
// one parallel region whose workers take items from a shared counter, or in the calling
// thread when the work is small.  gemm_ok: at::mm runs on the calling thread only (so items
// may use matrix products).
template <typename acc_t, typename ItemT, typename F>
void run_items(std::vector<ItemT>& items, const F& fn) {
  if (items.empty()) return;
  std::stable_sort(items.begin(), items.end(), [](const ItemT& a, const ItemT& b) { return a.cost > b.cost; });
  int64_t work = 0;
  for (const ItemT& it : items) work += it.cost;
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || work < min_parallel_work_value().load(std::memory_order_relaxed)) {
    const bool gemm_ok = at::get_num_threads() == 1 || at::in_parallel_region();
    Scratch<acc_t> scratch;
    for (const ItemT& it : items) fn(it, scratch, gemm_ok);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch<acc_t> scratch;
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(items[i], scratch, true);
  });
}

// The items of one shrink-then-expand pass over every segment: blocks of tokens of each slot
// with a rank, and (when rows without an adapter must be zeroed) the other rows.
std::vector<Item> segment_items(const HostIndices& ix, int64_t row_work, bool zero_rows) {
  std::vector<Item> items;
  const int64_t S = ix.num_slots(), T = ix.num_tokens();
  auto add_zero = [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; p += kZeroRows) {
      const int64_t count = std::min(kZeroRows, end - p);
      items.push_back({-1, static_cast<int32_t>(count), p, count});
    }
  };
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = ix.segment_length(s), r = ix.ranks[s], begin = ix.segment_begin(s);
    if (n == 0) continue;
    if (r == 0) {
      if (zero_rows) add_zero(begin, begin + n);
      continue;
    }
    const int64_t block = n >= kGemmMinTokens ? kGemmTokens : kTokenBlock;
    for (int64_t p = begin; p < begin + n; p += block) {
      const int64_t count = std::min(block, begin + n - p);
      items.push_back({static_cast<int32_t>(s), static_cast<int32_t>(count), p, (count + 1) * r * row_work});
    }
  }
  if (zero_rows) add_zero(ix.seg_offsets[S], T);
  return items;
}

// ---- shrink and expand of one item

// The operands of one shrink-then-expand: rows of `in` [T, len_in] -> pages of shrink_pool
// (length len_in) -> pages of expand_pool (length len_out).  The forward is (x, a_pool,
// a_pages, b_pool, b_pages); grad_x is (grad_y, b_pool, b_pages, a_pool, a_pages).
template <typename scalar_t>
struct ShrinkExpand {
  const scalar_t* in;
  int64_t len_in;
  const scalar_t* shrink_pool;
  const int32_t* shrink_pages;  // compact (HostIndices::page_begin)
  const scalar_t* expand_pool;
  const int32_t* expand_pages;
  int64_t len_out;
};

// rows [n, len] (acc) = v[tokens[i]] for i < n, in acc precision.
template <typename scalar_t, typename acc_t>
void gather_rows(acc_t* rows, const scalar_t* v, int64_t len, const int32_t* tokens, int64_t n, int64_t c0 = 0,
                 int64_t width = -1) {
  const int64_t w = width < 0 ? len : width;
  for (int64_t i = 0; i < n; ++i) convert(v + static_cast<int64_t>(tokens[i]) * len + c0, rows + i * w, w);
}

template <typename acc_t>
at::Tensor view(acc_t* data, int64_t rows, int64_t cols) {
  const auto dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(dtype));
}

// h [n, r] = scale * (S_s x_t) for the n tokens: per page and token (short segments) or as one
// matrix product on gathered rows and pages (long ones).
// The token path in float32 (float32, float16 and bfloat16 operands): 16-bit token rows are
// converted once per item and each page once per item, not once per product; tokens go four
// at a time against each page, so each chunk of it is loaded once for four dot products.
template <typename scalar_t>
void shrink_tokens_f32(const scalar_t* in, int64_t len, const scalar_t* pool, const int32_t* pages, int64_t r,
                       const int32_t* tokens, int64_t n, float scale, float* h, Scratch<float>& scratch) {
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  float* rows = nullptr;
  float* page_f32 = nullptr;
  if constexpr (!kF32) {
    rows = Scratch<float>::sized(scratch.rows, n * len);
    page_f32 = Scratch<float>::sized(scratch.pages, len);
    gather_rows(rows, in, len, tokens, n);
  }
  auto row = [&](int64_t b) -> const float* {
    if constexpr (kF32) return in + static_cast<int64_t>(tokens[b]) * len;
    else return rows + b * len;
  };
  for (int64_t j = 0; j < r; ++j) {
    const scalar_t* src = pool + static_cast<int64_t>(pages[j]) * len;
    const float* page;
    if constexpr (kF32) {
      page = src;
    } else {
      to_f32(src, page_f32, len);
      page = page_f32;
    }
    int64_t b = 0;
    for (; b + 4 <= n; b += 4) {
      const float* group[4] = {row(b), row(b + 1), row(b + 2), row(b + 3)};
      float d[4];
      dot4_f32(page, group, len, d);
      for (int q = 0; q < 4; ++q) h[(b + q) * r + j] = d[q] * scale;
    }
    for (; b < n; ++b) h[b * r + j] = dot_f32(row(b), page, len) * scale;
  }
}

template <typename scalar_t, typename acc_t>
void shrink(const scalar_t* in, int64_t len, const scalar_t* pool, const int32_t* pages, int64_t r,
            const int32_t* tokens, int64_t n, acc_t scale, acc_t* h, bool as_gemm, Scratch<acc_t>& scratch) {
  if (!as_gemm) {
    if constexpr (std::is_same_v<acc_t, float>) {
      shrink_tokens_f32(in, len, pool, pages, r, tokens, n, scale, h, scratch);
    } else {
      for (int64_t j = 0; j < r; ++j) {
        const scalar_t* page = pool + static_cast<int64_t>(pages[j]) * len;
        for (int64_t b = 0; b < n; ++b)
          h[b * r + j] = dot(in + static_cast<int64_t>(tokens[b]) * len, page, len) * scale;
      }
    }
    return;
  }
  acc_t* rows = Scratch<acc_t>::sized(scratch.rows, n * len);
  acc_t* pg = Scratch<acc_t>::sized(scratch.pages, r * len);
  gather_rows(rows, in, len, tokens, n);
  gather_rows(pg, pool, len, pages, r);
  auto ht = view(h, n, r);
  at::mm_out(ht, view(rows, n, len), view(pg, r, len).t());
  ht.mul_(scale);
}

// y[tokens[b]] (+)= h[b] E_s^T for the n tokens (accumulate: y += delta, else y = delta).
template <typename scalar_t, typename acc_t>
void expand(const acc_t* h, int64_t r, const scalar_t* pool, const int32_t* pages, int64_t len, scalar_t* y,
            const int32_t* tokens, int64_t n, bool accumulate, bool as_gemm, Scratch<acc_t>& scratch) {
  acc_t* out = Scratch<acc_t>::sized(scratch.out, n * len);
  if (!as_gemm) {
    for (int64_t b = 0; b < n; ++b) {
      acc_t* o = out + b * len;
      if (accumulate) {
        convert(y + static_cast<int64_t>(tokens[b]) * len, o, len);
      } else {
        std::fill(o, o + len, acc_t(0));
      }
    }
    // Each page is read from memory once (a 16-bit one converted once) and then hit in cache
    // for the block's other tokens.
    acc_t* page_acc = std::is_same_v<scalar_t, acc_t> ? nullptr : Scratch<acc_t>::sized(scratch.pages, len);
    for (int64_t j = 0; j < r; ++j) {
      const scalar_t* page = pool + static_cast<int64_t>(pages[j]) * len;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        for (int64_t b = 0; b < n; ++b) axpy(out + b * len, h[b * r + j], page, len);
      } else {
        convert(page, page_acc, len);
        for (int64_t b = 0; b < n; ++b) axpy(out + b * len, h[b * r + j], page_acc, len);
      }
    }
  } else {
    acc_t* pg = Scratch<acc_t>::sized(scratch.pages, r * len);
    gather_rows(pg, pool, len, pages, r);
    auto o = view(out, n, len);
    if (accumulate) {
      gather_rows(out, y, len, tokens, n);
      o.addmm_(view(const_cast<acc_t*>(h), n, r), view(pg, r, len));
    } else {
      at::mm_out(o, view(const_cast<acc_t*>(h), n, r), view(pg, r, len));
    }
  }
  for (int64_t b = 0; b < n; ++b) convert(out + b * len, y + static_cast<int64_t>(tokens[b]) * len, len);
}

template <typename scalar_t>
void zero_rows(scalar_t* y, int64_t len, const int32_t* tokens, int64_t n) {
  for (int64_t b = 0; b < n; ++b) {
    scalar_t* row = y + static_cast<int64_t>(tokens[b]) * len;
    std::fill(row, row + len, scalar_t(0));
  }
}

// One shrink-then-expand item into y; h_store, when set, receives the item's scaled rank
// vectors (its rows at coef_begin[slot] + (position - segment start) * rank, see coef_layout).
template <typename scalar_t, typename acc_t>
void shrink_expand_item(const Item& it, const ShrinkExpand<scalar_t>& op, const HostIndices& ix, const float* scales,
                        scalar_t* y, bool accumulate, acc_t* h_store, const int64_t* coef_begin,
                        Scratch<acc_t>& scratch, bool gemm_ok) {
  const int32_t* tokens = ix.order.data() + it.begin;
  if (it.slot < 0) {
    if (y != nullptr) zero_rows(y, op.len_out, tokens, it.count);
    return;
  }
  const int64_t s = it.slot, r = ix.ranks[s], k0 = ix.page_begin[s];
  const bool as_gemm = gemm_ok && ix.segment_length(s) >= kGemmMinTokens;
  acc_t* h = h_store != nullptr ? h_store + coef_begin[s] + (it.begin - ix.segment_begin(s)) * r
                                : Scratch<acc_t>::sized(scratch.h, it.count * r);
  shrink(op.in, op.len_in, op.shrink_pool, op.shrink_pages + k0, r, tokens, it.count, static_cast<acc_t>(scales[s]),
         h, as_gemm, scratch);
  if (y != nullptr)
    expand(h, r, op.expand_pool, op.expand_pages + k0, op.len_out, y, tokens, it.count, accumulate, as_gemm, scratch);
}

// y (+)= the LoRA delta of `op` for every token (write-once when !accumulate: rows without
// an adapter are zeroed).  One region.
template <typename scalar_t>
void shrink_expand(scalar_t* y, const ShrinkExpand<scalar_t>& op, const HostIndices& ix, const float* scales,
                   bool accumulate) {
  using acc_t = acc_type<scalar_t>;
  auto items = segment_items(ix, op.len_in + op.len_out, !accumulate);
  run_items<acc_t>(items, [&](const Item& it, Scratch<acc_t>& scratch, bool gemm_ok) {
    shrink_expand_item<scalar_t, acc_t>(it, op, ix, scales, y, accumulate, nullptr, nullptr, scratch, gemm_ok);
  });
}

// ---- the pool gradients

// Start of each slot's rank vectors in a [sum over slots of tokens x rank] buffer (row = plan
// position within the slot's segment); [S] is the total.
std::vector<int64_t> coef_layout(const HostIndices& ix) {
  const int64_t S = ix.num_slots();
  std::vector<int64_t> begin(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) begin[s + 1] = begin[s] + ix.segment_length(s) * ix.ranks[s];
  return begin;
}

// grad[pages[s, j], c0:c1] += sum over slot s's tokens t of coef[t, j] * v[t, c0:c1], for every
// slot: one item's column tile of one pool gradient.  The sum of each (slot, j) is formed in
// acc precision (d [r, w]) and added once into `grad` ([P, len] of out_t: the pools' dtype for
// the functional backward, float32 accumulators for the accumulating one), so a 16-bit
// gradient is rounded once per contribution.  zero_first: the tile's columns of every page are
// zeroed first (a dense result); else only the batch's pages are touched.
template <typename scalar_t, typename acc_t, typename out_t>
void pool_grad_tile(out_t* grad, int64_t num_pages, int64_t len, int64_t c0, int64_t c1, const scalar_t* v,
                    const acc_t* coef, const int64_t* coef_begin, const std::vector<int32_t>& pages,
                    const HostIndices& ix, bool zero_first, Scratch<acc_t>& scratch, bool gemm_ok) {
  const int64_t w = c1 - c0;
  if (zero_first)
    for (int64_t p = 0; p < num_pages; ++p) std::fill(grad + p * len + c0, grad + p * len + c1, out_t(0));
  for (int64_t s = 0; s < ix.num_slots(); ++s) {
    const int64_t n = ix.segment_length(s), r = ix.ranks[s];
    if (n == 0 || r == 0) continue;
    const int32_t* tokens = ix.order.data() + ix.segment_begin(s);
    const int32_t* pg = pages.data() + ix.page_begin[s];
    const acc_t* cs = coef + coef_begin[s];  // [n, r]
    // d [r, w] = coef_s^T v_s[:, c0:c1]
    acc_t* d = Scratch<acc_t>::sized(scratch.out, r * w);
    if (gemm_ok && n >= kGemmMinTokens) {
      auto dt = view(d, r, w);
      for (int64_t b = 0; b < n; b += kGemmTokens) {
        const int64_t m = std::min(kGemmTokens, n - b);
        acc_t* rows = Scratch<acc_t>::sized(scratch.rows, m * w);
        gather_rows(rows, v, len, tokens + b, m, c0, w);
        const auto ct = view(const_cast<acc_t*>(cs + b * r), m, r).t();
        if (b == 0) {
          at::mm_out(dt, ct, view(rows, m, w));
        } else {
          dt.addmm_(ct, view(rows, m, w));
        }
      }
    } else {
      std::fill(d, d + r * w, acc_t(0));
      acc_t* vt = Scratch<acc_t>::sized(scratch.rows, w);  // the token's columns, converted once
      for (int64_t i = 0; i < n; ++i) {
        convert(v + static_cast<int64_t>(tokens[i]) * len + c0, vt, w);
        for (int64_t j = 0; j < r; ++j) axpy(d + j * w, cs[i * r + j], vt, w);
      }
    }
    for (int64_t j = 0; j < r; ++j) {
      out_t* row = grad + static_cast<int64_t>(pg[j]) * len + c0;
      const acc_t* dj = d + j * w;
      if constexpr (std::is_same_v<out_t, acc_t>) {
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) row[c] += dj[c];
      } else {
        for (int64_t c = 0; c < w; ++c) row[c] = static_cast<out_t>(static_cast<acc_t>(row[c]) + dj[c]);
      }
    }
  }
}

// ---- the backend

Plan build_plan(const at::Tensor& token_slot, int64_t num_slots) {
  const auto slots = read_token_slot(token_slot, num_slots);
  auto order = at::empty({token_slot.size(0)}, token_slot.options());
  auto seg = at::empty({num_slots + 1}, token_slot.options());
  build_host_plan(slots, num_slots, order.data_ptr<int32_t>(), seg.data_ptr<int32_t>());
  return Plan{order, seg};
}

void forward_into(at::Tensor& y, const LoraArgs& args, const Plan* plan, bool accumulate) {
  const HostIndices ix = read_indices(args, plan);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "minlora_forward", [&] {
    const ShrinkExpand<scalar_t> op{args.x.data_ptr<scalar_t>(), args.in_features(),
                                    args.a_pool.data_ptr<scalar_t>(), ix.a_pages.data(),
                                    args.b_pool.data_ptr<scalar_t>(), ix.b_pages.data(), args.out_features()};
    shrink_expand(y.data_ptr<scalar_t>(), op, ix, args.scales.data_ptr<float>(), accumulate);
  });
}

// Where one pool gradient goes: the functional backward's dense gradient of the pools' dtype
// (zeroed, then the batch's pages added), or a float32 accumulator (only the batch's pages
// added into).  data undefined: not wanted.
struct GradOut {
  at::Tensor data;
  bool f32_accumulator;
};

// grad_x (written once: rows without an adapter are 0; undefined: not wanted) and the pool
// gradients of one backward call.
void backward_into(const at::Tensor& grad_y, const LoraArgs& args, const HostIndices& ix, at::Tensor& grad_x,
                   const GradOut& out_a, const GradOut& out_b) {
  const auto g = grad_y.contiguous();
  const bool want_x = grad_x.defined(), want_a = out_a.data.defined(), want_b = out_b.data.defined();
  const int64_t in = args.in_features(), out = args.out_features();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "minlora_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x = args.x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* a_pool = args.a_pool.data_ptr<scalar_t>();
    const scalar_t* b_pool = args.b_pool.data_ptr<scalar_t>();
    const float* scales = args.scales.data_ptr<float>();
    const auto coef_begin = coef_layout(ix);
    // u = scale B_s^T g_t (feeds grad_x and grad_a), h = scale A_s x_t (feeds grad_b), in acc
    // precision: never rounded.
    std::vector<acc_t> u(want_x || want_a ? coef_begin.back() : 0), h(want_b ? coef_begin.back() : 0);
    // Region 1: per block of tokens, u (and grad_x = u A_s, write-once) and h.
    const ShrinkExpand<scalar_t> gx_op{gp, out, b_pool, ix.b_pages.data(), a_pool, ix.a_pages.data(), in};
    scalar_t* gx = want_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    auto items = segment_items(ix, in + out, want_x);
    run_items<acc_t>(items, [&](const Item& it, Scratch<acc_t>& scratch, bool gemm_ok) {
      if (want_x || want_a)
        shrink_expand_item<scalar_t, acc_t>(it, gx_op, ix, scales, gx, false, u.data(), coef_begin.data(), scratch,
                                            gemm_ok);
      if (want_b && it.slot >= 0) {
        const int64_t s = it.slot, r = ix.ranks[s];
        shrink(x, in, a_pool, ix.a_pages.data() + ix.page_begin[s], r, ix.order.data() + it.begin, it.count,
               static_cast<acc_t>(scales[s]), h.data() + coef_begin[s] + (it.begin - ix.segment_begin(s)) * r,
               gemm_ok && ix.segment_length(s) >= kGemmMinTokens, scratch);
      }
    });
    if (!want_a && !want_b) return;
    // Region 2: column tiles of grad_a (u^T x) and grad_b (h^T g).  Items own their columns:
    // no two workers add into one element.
    const int64_t Pa = args.a_pool.size(0), Pb = args.b_pool.size(0);
    std::vector<GradTile> tiles;
    auto add_tiles = [&](bool is_a, int64_t len, int64_t pages, bool zero_first) {
      for (int64_t c = 0; c < len; c += kGradColumns) {
        const int64_t c1 = std::min(len, c + kGradColumns);
        tiles.push_back({is_a, c, c1, (c1 - c) * (coef_begin.back() + (zero_first ? pages : 0))});
      }
    };
    if (want_a) add_tiles(true, in, Pa, !out_a.f32_accumulator);
    if (want_b) add_tiles(false, out, Pb, !out_b.f32_accumulator);
    run_items<acc_t>(tiles, [&](const GradTile& tile, Scratch<acc_t>& scratch, bool gemm_ok) {
      const GradOut& dst = tile.is_a ? out_a : out_b;
      const int64_t len = tile.is_a ? in : out, P = tile.is_a ? Pa : Pb;
      const scalar_t* v = tile.is_a ? x : gp;
      const acc_t* coef = tile.is_a ? u.data() : h.data();
      const auto& pages = tile.is_a ? ix.a_pages : ix.b_pages;
      if (dst.f32_accumulator) {
        pool_grad_tile<scalar_t, acc_t, float>(dst.data.data_ptr<float>(), P, len, tile.c0, tile.c1, v, coef,
                                               coef_begin.data(), pages, ix, false, scratch, gemm_ok);
      } else {
        pool_grad_tile<scalar_t, acc_t, scalar_t>(dst.data.data_ptr<scalar_t>(), P, len, tile.c0, tile.c1, v, coef,
                                                  coef_begin.data(), pages, ix, true, scratch, gemm_ok);
      }
    });
  });
}

Grads backward(const at::Tensor& grad_y, const LoraArgs& args, const Plan* plan, std::array<bool, 3> mask) {
  const HostIndices ix = read_indices(args, plan);
  const auto empty = at::empty({0}, args.x.options());
  at::Tensor grad_x = mask[0] ? at::empty_like(args.x) : at::Tensor();
  const GradOut grad_a{mask[1] ? at::empty_like(args.a_pool) : at::Tensor(), false};
  const GradOut grad_b{mask[2] ? at::empty_like(args.b_pool) : at::Tensor(), false};
  backward_into(grad_y, args, ix, grad_x, grad_a, grad_b);
  return {mask[0] ? grad_x : empty, mask[1] ? grad_a.data : empty, mask[2] ? grad_b.data : empty};
}

at::Tensor backward_accumulate(at::Tensor& grad_a_acc, at::Tensor& grad_b_acc, const at::Tensor& grad_y,
                               const LoraArgs& args, const Plan* plan, bool want_grad_x) {
  const HostIndices ix = read_indices(args, plan);
  at::Tensor grad_x = want_grad_x ? at::empty_like(args.x) : at::Tensor();
  backward_into(grad_y, args, ix, grad_x, GradOut{grad_a_acc, true}, GradOut{grad_b_acc, true});
  return want_grad_x ? grad_x : at::empty({0}, args.x.options());
}

at::Tensor plan_positions(const at::Tensor& order) {
  const int64_t T = order.size(0);
  // One read of the caller's memory, then checks and the inverse on the copy.
  std::vector<int32_t> values(static_cast<size_t>(T));
  if (T > 0) std::memcpy(values.data(), order.data_ptr<int32_t>(), sizeof(int32_t) * static_cast<size_t>(T));
  auto positions = at::empty({T}, order.options());
  host_plan_positions(values.data(), T, positions.data_ptr<int32_t>());
  return positions;
}

}  // namespace

int64_t get_min_parallel_work() { return min_parallel_work_value().load(); }

int64_t set_min_parallel_work(int64_t multiply_adds) {
  TORCH_CHECK_VALUE(multiply_adds >= 0, "multiply_adds must be >= 0, got ", multiply_adds);
  return min_parallel_work_value().exchange(multiply_adds);
}

TORCH_LIBRARY_IMPL(minlora, CPU, m) {
  register_lora_ops<&cpu::forward_into, &cpu::backward, &cpu::backward_accumulate, &cpu::build_plan,
                    &cpu::plan_positions>(m);
}

}  // namespace minlora::cpu
