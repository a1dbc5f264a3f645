// Which kernels a minlora CUDA op launches: plain C++ (no CUDA, no torch) so the decision
// is one readable function.  Only what the host knows without reading device memory goes
// in (sizes, dtype, alignment, whether a plan was given); per-segment choices happen on
// the device (the gather kernels skip segments the grouped path takes, and vice versa).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernel_types.h"

namespace minlora::kernels {

// MINLORA_CUDA_KERNELS (read on every call, so benchmarks can switch it):
//   auto (default) | fallback (the one-block-per-token kernels) |
//   gather (gather kernels only) | grouped (grouped GEMM for every segment it can take).
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
  bool half_precision;      // float16 / bfloat16 (the grouped GEMM path's dtypes)
  bool has_plan;            // the caller passed a BatchPlan
  bool grouped_compiled;    // the grouped GEMM kernels are in this build
  bool grouped_aligned;     // operands meet the grouped path's alignment (see lora_grouped.cuh)
};

struct Choice {
  bool fallback = false;        // the fallback kernels, nothing else
  bool build_plan = false;      // build a plan on the device first
  bool gather = false;          // launch the gather kernel
  bool gather_planned = false;  // ... with the plan (several tokens of one slot per block)
  bool grouped = false;         // launch the grouped GEMM for long segments
  int64_t grouped_min_segment = 0;  // segments of at least this many tokens go to the grouped GEMM
};

// Segments at least this long are worth the grouped GEMM's tiles (its M tile is 64 or 128 rows;
// shorter segments leave most of a tile idle and the gather kernel's reuse of 4 tokens wins).
constexpr int64_t kGroupedMinSegment = 32;

// Whether the grouped GEMM is worth launching without reading the plan: with few tokens per
// slot (decode) every segment is short, and its launches (memset, prep, two GEMMs that find
// no tiles) would only add latency.  Many tokens overall make long segments likely even
// when many slots are resident.
constexpr bool may_have_long_segments(const OpShape& s) {
  if (s.num_tokens < kGroupedMinSegment) return false;
  const int64_t avg = s.num_slots > 0 ? s.num_tokens / s.num_slots : 0;
  return avg >= 4 || s.num_tokens >= 2048;
}

// The fallback kernels: when asked for, or when the page table is too wide for the gather kernels.
constexpr bool wants_fallback(const OpShape& s, KernelMode mode) {
  return mode == KernelMode::kFallback || s.max_rank > kGatherMaxRank;
}

// Whether the grouped GEMM runs (for the long segments, or for all of them when forced).
constexpr bool wants_grouped(const OpShape& s, KernelMode mode) {
  const bool grouped_ok = s.half_precision && s.grouped_compiled && s.grouped_aligned;
  return grouped_ok && mode != KernelMode::kGather && (mode == KernelMode::kGrouped || may_have_long_segments(s));
}

constexpr Choice choose_kernels(const OpShape& s, KernelMode mode) {
  Choice c;
  c.fallback = wants_fallback(s, mode);
  if (c.fallback) return c;
  const int64_t avg = s.num_slots > 0 ? s.num_tokens / s.num_slots : 0;
  if (wants_grouped(s, mode)) {
    c.grouped = true;
    c.grouped_min_segment = mode == KernelMode::kGrouped ? 1 : kGroupedMinSegment;
  }
  // The gather kernel runs whenever some segment may be shorter than the grouped threshold.
  c.gather = !(c.grouped && c.grouped_min_segment <= 1);
  // A plan lets a gather block take several tokens of one slot; without one, build it only
  // when slots average a few tokens each (a device sort costs a few launches).
  c.build_plan = !s.has_plan && (c.grouped || avg >= 4);
  c.gather_planned = c.gather && (s.has_plan || c.build_plan);
  return c;
}

// The backward: the fallback kernels, or the grouped GEMMs for every segment (u = scale B^T g,
// grad_x, h = scale A x), else the gather kernels; the pool gradients always use the
// segment-gradient kernel (float32 sums, atomics, so pages shared by slots add up).
struct BackwardChoice {
  bool fallback = false;
  bool grouped = false;
};

constexpr BackwardChoice choose_backward(const OpShape& s, KernelMode mode) {
  BackwardChoice c;
  c.fallback = wants_fallback(s, mode);
  c.grouped = !c.fallback && wants_grouped(s, mode);
  return c;
}

// The decisions above, checked at compile time (this header is compiled in every CUDA build).
namespace dispatch_checks {
constexpr OpShape shape(int64_t T, int64_t S, int64_t R, bool half, bool plan, bool aligned = true) {
  return OpShape{T, S, R, 4096, 4096, half, plan, /*grouped_compiled=*/true, aligned};
}
// Decode, 256 adapters x 1 token, with a plan: gather only, several tokens per block allowed.
constexpr Choice kDecode = choose_kernels(shape(256, 256, 16, true, true), KernelMode::kAuto);
static_assert(!kDecode.fallback && kDecode.gather && kDecode.gather_planned && !kDecode.grouped && !kDecode.build_plan);
// Decode without a plan: no device sort, one token per block.
constexpr Choice kDecodeNoPlan = choose_kernels(shape(256, 256, 16, true, false), KernelMode::kAuto);
static_assert(kDecodeNoPlan.gather && !kDecodeNoPlan.gather_planned && !kDecodeNoPlan.build_plan);
// Prefill, 8 adapters x 512 tokens: grouped GEMM for long segments, gather for the short ones.
constexpr Choice kPrefill = choose_kernels(shape(4096, 8, 16, true, false), KernelMode::kAuto);
static_assert(kPrefill.grouped && kPrefill.grouped_min_segment == kGroupedMinSegment && kPrefill.gather &&
              kPrefill.gather_planned && kPrefill.build_plan);
// float32 and unaligned rows never take the grouped GEMM.
static_assert(!choose_kernels(shape(4096, 8, 16, false, true), KernelMode::kAuto).grouped);
static_assert(!choose_kernels(shape(4096, 8, 16, true, true, false), KernelMode::kGrouped).grouped);
// Forced choices.
constexpr Choice kForcedGrouped = choose_kernels(shape(64, 64, 16, true, true), KernelMode::kGrouped);
static_assert(kForcedGrouped.grouped && kForcedGrouped.grouped_min_segment == 1 && !kForcedGrouped.gather);
static_assert(!choose_kernels(shape(4096, 8, 16, true, true), KernelMode::kGather).grouped);
static_assert(choose_kernels(shape(4096, 8, 16, true, true), KernelMode::kFallback).fallback);
// Page tables wider than the gather kernels' shared memory allows go to the fallback kernels.
static_assert(choose_kernels(shape(16, 4, 2048, true, true), KernelMode::kAuto).fallback);
static_assert(choose_backward(shape(16, 4, 2048, true, true), KernelMode::kAuto).fallback);
static_assert(choose_backward(shape(8192, 64, 16, true, true), KernelMode::kAuto).grouped);
static_assert(!choose_backward(shape(64, 64, 16, true, true), KernelMode::kAuto).grouped);
}  // namespace dispatch_checks

}  // namespace minlora::kernels
