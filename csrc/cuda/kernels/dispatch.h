// Which kernels a minlora CUDA op launches, and with which grid splits: plain C++ (no CUDA,
// no torch), so the decision is a few readable functions that the CPU tests call too.  Only
// what the host knows without reading device memory goes in: sizes, dtype, alignment, the
// multiprocessor count, whether a plan (and its positions) was given, and the plan's longest
// segment when the caller knows it (the step knows its tokens per request on the host).
// Which path takes which segment is decided on the device from the real segment lengths
// (lora_index.h); the host only decides what to launch.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernel_types.h"
#include "lora_index.h"

namespace minlora::kernels {

// MINLORA_CUDA_KERNELS (read on every call, so benchmarks can switch it):
//   auto (default) | fallback (one block per token, no plan, no grid splits: the simplest
//   configuration) | gather (gather kernels only) | grouped (grouped GEMM for every segment).
// kUnknown: any other value (the host side refuses it).
enum class KernelMode { kAuto, kFallback, kGather, kGrouped, kUnknown };

inline KernelMode kernel_mode_from_env() {
  const char* v = std::getenv("MINLORA_CUDA_KERNELS");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return KernelMode::kAuto;
  if (std::strcmp(v, "fallback") == 0) return KernelMode::kFallback;
  if (std::strcmp(v, "gather") == 0) return KernelMode::kGather;
  if (std::strcmp(v, "grouped") == 0) return KernelMode::kGrouped;
  return KernelMode::kUnknown;
}

struct OpShape {
  int64_t num_tokens, num_slots, max_rank, in_features, out_features;
  int64_t max_segment;     // the plan's longest segment when the caller knows it, else -1
  int sm_count;            // multiprocessors of the device
  int vec;                 // elements per 16-byte access when every row is 16-byte aligned, else 1
  bool half_precision;     // float16 / bfloat16 (the grouped GEMM path's dtypes)
  bool has_plan;           // the caller passed a BatchPlan
  bool has_positions;      // ... with its positions (the inverse of order)
  bool grouped_compiled;   // the grouped GEMM kernels are in this build
  bool grouped_aligned;    // operands meet the grouped path's alignment (see lora_grouped.cuh)
};

// Segments at least this long go to the grouped GEMM (its M tile is 128 rows; shorter
// segments leave most of a tile idle, and a gather block's reuse of 4 tokens wins).
constexpr int64_t kGroupedMinSegment = 32;

// Without the longest segment's length: whether long segments are likely (many tokens per slot).
constexpr bool may_have_long_segments(const OpShape& s) {
  if (s.num_tokens < kGroupedMinSegment) return false;
  const int64_t avg = s.num_slots > 0 ? s.num_tokens / s.num_slots : 0;
  return avg >= 4 || s.num_tokens >= 2048;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Grid of the gather kernels.  With enough groups to fill the GPU one fused kernel does the
// shrink (into shared memory) and the expand per group; with few (decode at a few dozen
// requests) the shrink's K is split across k_splits blocks per group (float32 partial sums)
// and the expand's N across n_tiles blocks, so every multiprocessor streams pages.
struct GatherLaunch {
  bool fused;
  int32_t k_splits;
  int64_t k_chunk;  // columns of `in` per shrink block: a multiple of one warp's 16-byte step
  int32_t n_tiles;
  int64_t n_chunk;  // columns of `out` per expand block, likewise
  int32_t expand_threads;
};

constexpr int kShrinkThreads = 128;
constexpr int kFusedThreads = 256;
constexpr int kMaxKSplits = 32;
constexpr int kMaxNTiles = 64;

// A fused launch is also the unsplit configuration of the split form (k_splits = n_tiles = 1),
// which the backward uses (its coefficients are read again by the pool gradients).
constexpr GatherLaunch gather_launch(int64_t groups, int64_t in, int64_t out, int vec, int sm_count, bool unsplit) {
  GatherLaunch g{true, 1, max64(in, 1), 1, max64(out, 1), 128};
  const int64_t target = 2 * max64(sm_count, 1);
  if (unsplit || groups >= target || groups <= 0 || in <= 0 || out <= 0) return g;
  g.fused = false;
  const int64_t want = ceil_div(target, groups);
  const int64_t granule = 32 * static_cast<int64_t>(vec);
  g.k_chunk = split_chunk(in, min64(min64(want, ceil_div(in, granule)), kMaxKSplits), granule);
  g.k_splits = static_cast<int32_t>(ceil_div(in, g.k_chunk));
  g.n_chunk = split_chunk(out, min64(min64(want, ceil_div(out, granule)), kMaxNTiles), granule);
  g.n_tiles = static_cast<int32_t>(ceil_div(out, g.n_chunk));
  g.expand_threads = static_cast<int32_t>(min64(128, ceil_div(ceil_div(g.n_chunk, vec), 32) * 32));
  return g;
}

// What one forward (or grad_x) call launches.
struct Choice {
  GatherMode mode;       // planned groups or one block per token; the grouped GEMM's segments
  bool build_plan;       // build a plan on the device first (none was given)
  bool need_positions;   // compute the plan's positions on the device (not given, or plan built here)
  bool launch_gather;    // the gather kernels (in the functional form they also zero unowned rows)
  bool gather_shrink;    // some segment may be gather-owned (false when the grouped GEMM takes all)
  GatherLaunch launch;
};

constexpr bool wide_table(const OpShape& s) { return s.max_rank > kGatherMaxRank; }

// An upper bound of the gather blocks that have a group (planned: a group starts each segment
// and every kGatherTokens positions into it).
constexpr int64_t gather_groups(const OpShape& s, bool planned) {
  return planned ? min64(s.num_tokens, s.num_slots + ceil_div(s.num_tokens, kGatherTokens)) : s.num_tokens;
}

constexpr bool wants_grouped(const OpShape& s, KernelMode mode) {
  const bool ok = s.half_precision && s.grouped_compiled && s.grouped_aligned && !wide_table(s) && s.num_tokens > 0;
  if (!ok || mode == KernelMode::kGather || mode == KernelMode::kFallback) return false;
  if (mode == KernelMode::kGrouped) return true;
  return s.max_segment >= 0 ? s.max_segment >= kGroupedMinSegment : may_have_long_segments(s);
}

// write_only: the functional form (y = delta; rows no path owns get zeros); else y += delta.
constexpr Choice choose_forward(const OpShape& s, KernelMode mode, bool write_only) {
  Choice c{};
  const bool simplest = mode == KernelMode::kFallback;
  const bool grouped = wants_grouped(s, mode);
  const int64_t grouped_min = grouped ? (mode == KernelMode::kGrouped ? 1 : kGroupedMinSegment) : 0;
  const int64_t avg = s.num_slots > 0 ? s.num_tokens / s.num_slots : 0;
  bool planned = false;
  if (simplest || wide_table(s)) {
    planned = false;
  } else if (grouped) {
    planned = true;
  } else if (s.max_segment >= 0 && s.max_segment <= 1) {
    planned = false;  // one token per slot: groups would hold one token anyway
  } else {
    planned = s.has_plan || avg >= 4;  // without a plan, a device sort pays only with a few tokens per slot
  }
  c.mode = GatherMode{planned, planned ? kGatherTokens : 1, grouped_min};
  c.build_plan = planned && !s.has_plan;
  c.need_positions = planned && (c.build_plan || !s.has_positions);
  c.launch_gather = write_only || grouped_min != 1;
  c.gather_shrink = grouped_min != 1;
  c.launch = gather_launch(gather_groups(s, planned), s.in_features, s.out_features, s.vec, s.sm_count, simplest);
  return c;
}

// The backward: grad_x as a forward with the roles of A and B swapped (write-only), and the
// pool gradients per segment: the grouped GEMMs (x^T (B^T g), g^T (A x)) for the segments the
// grouped path owns, the segment-gradient kernel for the others.
struct BackwardChoice {
  // grad_x and the coefficients u = B^T g: the forward's choice with the roles of in and out
  // swapped (its launch shrinks along out and expands along in); always with a plan.
  Choice fwd;
  GatherLaunch h_launch;      // the shrink of the coefficients h = A x (along in)
  int32_t grad_token_splits;  // blocks per segment of the segment-gradient kernel (token ranges)
  int32_t grouped_grad_splits;  // K (token) splits of the grouped gradient GEMMs
};

// Each split of a pool-gradient sum adds once into the gradient: into float32 buffers any
// number may, into a gradient of the pools' 16-bit dtype each addition rounds, so few.
constexpr int64_t kGradTokensPerSplit = 256;

constexpr BackwardChoice choose_backward(const OpShape& s, KernelMode mode, bool grads_f32) {
  BackwardChoice c{};
  c.fwd = choose_forward(s, mode, /*write_only=*/true);
  // The pool gradients sum over each slot's tokens: they need the plan's segments.
  c.fwd.build_plan = !s.has_plan;
  c.fwd.need_positions = c.fwd.build_plan || !s.has_positions;
  const bool simplest_launch = mode == KernelMode::kFallback;
  const int64_t groups = gather_groups(s, c.fwd.mode.planned);
  c.fwd.launch = gather_launch(groups, s.out_features, s.in_features, s.vec, s.sm_count, simplest_launch);
  c.h_launch = gather_launch(groups, s.in_features, s.out_features, s.vec, s.sm_count, simplest_launch);
  // Splitting a segment's positions pays only when few long segments leave the GPU idle, and
  // each split adds its own partial sums into the gradient: size it by the longest segment
  // when known, else by the average (one long segment: all the tokens).
  const int64_t longest = s.max_segment >= 0 ? s.max_segment : ceil_div(s.num_tokens, max64(s.num_slots, 1));
  const int64_t most = grads_f32 ? 64 : 4;
  const bool simplest = mode == KernelMode::kFallback;
  c.grad_token_splits = simplest ? 1 : static_cast<int32_t>(min64(max64(ceil_div(longest, kGradTokensPerSplit), 1), most));
  c.grouped_grad_splits = static_cast<int32_t>(min64(max64(ceil_div(longest, 4 * kGradTokensPerSplit), 1), most));
  return c;
}

// The decisions above, checked at compile time (this header is compiled in every build).
namespace dispatch_checks {
constexpr OpShape shape(int64_t T, int64_t S, int64_t R, bool half, bool plan, int64_t max_segment = -1,
                        bool aligned = true) {
  return OpShape{T, S, R, 4096, 4096, max_segment, 132, half ? 8 : 4, half, plan, plan, true, aligned};
}
// Decode, 256 adapters x 1 token, with a plan and its longest segment: one block per token, no grouped launch.
constexpr Choice kDecode = choose_forward(shape(256, 256, 16, true, true, 1), KernelMode::kAuto, true);
static_assert(!kDecode.mode.planned && kDecode.mode.grouped_min == 0 && !kDecode.build_plan && !kDecode.need_positions);
// 32 requests: the shrink's K and the expand's N are split so every multiprocessor has blocks.
constexpr Choice kDecode32 = choose_forward(shape(32, 32, 16, true, true, 1), KernelMode::kAuto, true);
static_assert(!kDecode32.launch.fused && 32 * kDecode32.launch.k_splits >= 132 && 32 * kDecode32.launch.n_tiles >= 132);
// Decode with a plan but no known longest segment: planned groups, positions given.
constexpr Choice kDecodePlan = choose_forward(shape(256, 256, 16, true, true), KernelMode::kAuto, true);
static_assert(kDecodePlan.mode.planned && kDecodePlan.mode.grouped_min == 0 && !kDecodePlan.need_positions);
// Prefill, 8 adapters x 512 tokens: grouped GEMM for the long segments, gather for the rest.
constexpr Choice kPrefill = choose_forward(shape(4096, 8, 16, true, false), KernelMode::kAuto, true);
static_assert(kPrefill.mode.grouped_min == kGroupedMinSegment && kPrefill.launch_gather && kPrefill.build_plan &&
              kPrefill.need_positions && kPrefill.launch.fused);
// The step says its longest segment is short: no grouped launch even with many tokens.
static_assert(choose_forward(shape(4096, 1024, 16, true, true, 8), KernelMode::kAuto, true).mode.grouped_min == 0);
static_assert(choose_forward(shape(4096, 1024, 16, true, true, 32), KernelMode::kAuto, true).mode.grouped_min ==
              kGroupedMinSegment);
// float32 and unaligned rows never take the grouped GEMM.
static_assert(choose_forward(shape(4096, 8, 16, false, true), KernelMode::kAuto, true).mode.grouped_min == 0);
static_assert(choose_forward(shape(4096, 8, 16, true, true, -1, false), KernelMode::kGrouped, true).mode.grouped_min == 0);
// Forced choices.
constexpr Choice kForcedGrouped = choose_forward(shape(64, 64, 16, true, true), KernelMode::kGrouped, false);
static_assert(kForcedGrouped.mode.grouped_min == 1 && !kForcedGrouped.launch_gather && !kForcedGrouped.gather_shrink);
static_assert(choose_forward(shape(64, 64, 16, true, true), KernelMode::kGrouped, true).launch_gather);
static_assert(choose_forward(shape(4096, 8, 16, true, true), KernelMode::kGather, true).mode.grouped_min == 0);
constexpr Choice kSimplest = choose_forward(shape(4096, 8, 16, true, true), KernelMode::kFallback, true);
static_assert(!kSimplest.mode.planned && kSimplest.launch.fused && kSimplest.mode.grouped_min == 0);
// Wide page tables: one token per block, never grouped.
static_assert(!choose_forward(shape(4096, 8, 2048, true, true), KernelMode::kAuto, true).mode.planned);
// The backward always has a plan (pool gradients sum per segment) and chooses per segment too.
constexpr BackwardChoice kTrain = choose_backward(shape(8192, 64, 16, true, true), KernelMode::kAuto, true);
static_assert(kTrain.fwd.mode.grouped_min == kGroupedMinSegment && !kTrain.fwd.build_plan);
static_assert(choose_backward(shape(64, 64, 16, true, false, 1), KernelMode::kAuto, true).fwd.build_plan);
static_assert(choose_backward(shape(64, 64, 16, true, true, 1), KernelMode::kAuto, true).fwd.mode.grouped_min == 0);
}  // namespace dispatch_checks

}  // namespace minlora::kernels
