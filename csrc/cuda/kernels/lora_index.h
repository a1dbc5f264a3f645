// The index logic of the minlora CUDA kernels as plain functions that compile for the device
// (nvcc) and for the host (g++): which plan positions are trusted, which path owns a segment,
// which tokens a gather block handles, which tokens a pool-gradient block sums.  The kernels
// call these functions and nothing else to decide what to touch, and the CPU tests of the
// kernel logic (csrc/testing/kernel_logic.cpp) run the same functions over hostile plans to
// check that every token is handled exactly once, by exactly one path.
//
// Nothing here trusts an index: every value is range-checked where it is read, so an
// inconsistent plan (a hand-made one, or buffers refilled between graph replays without the
// host check) can make a token get nothing (its row is zeroed, or left alone by the adding
// form) but can never make a kernel read out of bounds or write a row twice.
//
// The rule that makes double writes impossible: a plan carries `positions`, the inverse of
// `order` (positions[order[q]] == q).  Position q is trusted only when t = order[q] is a token
// of the segment holding q AND positions[t] == q.  positions[t] is a single value, so each
// token has at most one trusted position, whatever the contents of order and positions; a
// position that repeats a token is simply not trusted.  Checking it costs two reads per
// position, with no host synchronisation and no scratch that needs clearing.
#pragma once

#include <cstdint>

#include "kernel_types.h"

namespace minlora::kernels {

// A plan's index arrays as the kernels see them (device pointers on the GPU, host pointers
// in the CPU tests).  order, seg_offsets and positions are null when there is no plan.
struct PlanView {
  const int32_t* token_slot;   // [T]
  const int32_t* ranks;        // [S]
  const int32_t* order;        // [T]: tokens of slot s are order[seg_offsets[s] : seg_offsets[s + 1]]
  const int32_t* seg_offsets;  // [S + 1]
  const int32_t* positions;    // [T]: the inverse of order
  int64_t num_tokens, num_slots, max_rank;
};

MINLORA_HOST_DEVICE constexpr int64_t clamp_index(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// The rank every kernel uses for a slot: ranks[s] when it is in 1..R, else 0 (a rank outside
// the page table is never trusted in part: the slot then contributes nothing).
MINLORA_HOST_DEVICE inline int slot_rank(int32_t rank, int64_t max_rank) {
  return rank >= 1 && rank <= max_rank ? static_cast<int>(rank) : 0;
}

MINLORA_HOST_DEVICE inline bool page_in_pool(int32_t page, int64_t num_pages) { return page >= 0 && page < num_pages; }

// token_slot[t] when it names a slot, else -1 (no adapter).
MINLORA_HOST_DEVICE inline int32_t slot_of_token(const PlanView& p, int64_t t) {
  const int32_t s = p.token_slot[t];
  return s >= 0 && s < p.num_slots ? s : -1;
}

MINLORA_HOST_DEVICE inline int rank_of_slot(const PlanView& p, int32_t s) { return slot_rank(p.ranks[s], p.max_rank); }

// Plan positions [begin, end) of one segment, clamped to 0 <= begin <= end <= T.
struct Segment {
  int64_t begin, end;
  MINLORA_HOST_DEVICE int64_t length() const { return end - begin; }
  MINLORA_HOST_DEVICE bool contains(int64_t q) const { return q >= begin && q < end; }
};

MINLORA_HOST_DEVICE inline Segment segment_of_slot(const PlanView& p, int64_t s) {
  const int64_t begin = clamp_index(p.seg_offsets[s], 0, p.num_tokens);
  return {begin, clamp_index(p.seg_offsets[s + 1], begin, p.num_tokens)};
}

// How one op call splits the work: planned gather blocks (groups of up to `tokens` tokens of
// one slot, by plan position) or one block per token; the grouped GEMM owns every segment of
// at least grouped_min tokens (0: it is not launched; it is only launched with a plan).
struct GatherMode {
  bool planned;
  int tokens;           // tokens per gather group; 1 when !planned
  int64_t grouped_min;  // 0: no grouped path
};

MINLORA_HOST_DEVICE inline bool grouped_owns(const GatherMode& m, const Segment& seg) {
  return m.grouped_min > 0 && seg.length() >= m.grouped_min;
}

// The token at plan position q when q is its one trusted position (see the file comment),
// with its slot and segment; -1 otherwise.
MINLORA_HOST_DEVICE inline int64_t trusted_token(const PlanView& p, int64_t q, int32_t* slot, Segment* seg) {
  const int32_t t = p.order[q];
  if (t < 0 || t >= p.num_tokens) return -1;
  const int32_t s = slot_of_token(p, t);
  if (s < 0) return -1;
  const Segment g = segment_of_slot(p, s);
  if (!g.contains(q) || p.positions[t] != q) return -1;
  *slot = s;
  *seg = g;
  return t;
}

// The first position of the gather group holding position q of `seg`.
MINLORA_HOST_DEVICE inline int64_t group_start(const Segment& seg, int64_t q, int tokens) {
  return seg.begin + (q - seg.begin) / tokens * tokens;
}

enum class Owner : int { kNone = 0, kGather = 1, kGrouped = 2 };

// Which path writes token t's row: the gather kernels, the grouped GEMM, or none (then the
// functional forward writes zeros there and the adding form leaves it alone).  A token has an
// owner when its slot is valid with a rank in 1..R and (planned) it has a trusted position;
// a planned gather group is led by the token at its first position, which must be of the
// same slot (so the block that handles the group knows the slot without a search).
MINLORA_HOST_DEVICE inline Owner token_owner(const PlanView& p, const GatherMode& m, int64_t t) {
  const int32_t s = slot_of_token(p, t);
  if (s < 0 || rank_of_slot(p, s) == 0) return Owner::kNone;
  if (!m.planned) return Owner::kGather;
  const int32_t q = p.positions[t];
  if (q < 0 || q >= p.num_tokens || p.order[q] != t) return Owner::kNone;
  const Segment seg = segment_of_slot(p, s);
  if (!seg.contains(q)) return Owner::kNone;
  if (grouped_owns(m, seg)) return Owner::kGrouped;
  const int32_t lead = p.order[group_start(seg, q, m.tokens)];
  if (lead < 0 || lead >= p.num_tokens || slot_of_token(p, lead) != s) return Owner::kNone;
  return Owner::kGather;
}

// The tokens gather block b handles (tokens[i] = -1: none) and their slot; false when the
// block handles none.  Planned: block b is plan position b, and it handles a group when b is
// a group start of its token's segment; unplanned: block b is token b.  Exactly the tokens
// with token_owner(...) == kGather, each by exactly one block.
template <int TOK>
MINLORA_HOST_DEVICE inline bool gather_group(const PlanView& p, const GatherMode& m, int64_t b, int32_t* slot,
                                             int64_t (&tokens)[TOK]) {
  for (int i = 0; i < TOK; ++i) tokens[i] = -1;
  if (!m.planned) {
    if (token_owner(p, m, b) != Owner::kGather) return false;
    *slot = slot_of_token(p, b);
    tokens[0] = b;
    return true;
  }
  const int32_t lead = p.order[b];
  if (lead < 0 || lead >= p.num_tokens) return false;
  const int32_t s = slot_of_token(p, lead);
  if (s < 0 || rank_of_slot(p, s) == 0) return false;
  const Segment seg = segment_of_slot(p, s);
  if (!seg.contains(b) || grouped_owns(m, seg) || (b - seg.begin) % m.tokens != 0) return false;
  bool any = false;
  for (int i = 0; i < TOK && i < m.tokens && b + i < seg.end; ++i) {
    int32_t sq;
    Segment gq;
    const int64_t t = trusted_token(p, b + i, &sq, &gq);
    if (t >= 0 && sq == s) {
      tokens[i] = t;
      any = true;
    }
  }
  *slot = s;
  return any;
}

// The token whose coefficients the pool-gradient sum of slot s takes at position q (-1:
// none): q is trusted, of slot s, and its token is gather-owned (the grouped GEMMs sum the
// others).  The same tokens the gather shrink wrote coefficients for.
MINLORA_HOST_DEVICE inline int64_t segment_grad_token(const PlanView& p, const GatherMode& m, int32_t s, int64_t q) {
  int32_t sq;
  Segment g;
  const int64_t t = trusted_token(p, q, &sq, &g);
  if (t < 0 || sq != s || token_owner(p, m, t) != Owner::kGather) return -1;
  return t;
}

// Whether the grouped GEMM takes segment s (its slot has a rank and the segment is long
// enough); the prep kernel accepts it when, in addition, every position of the segment is
// trusted and of slot s (grouped_position_ok) and every page below the rank is in its pool.
MINLORA_HOST_DEVICE inline bool grouped_wants(const PlanView& p, const GatherMode& m, int32_t s, Segment* seg) {
  *seg = segment_of_slot(p, s);
  return rank_of_slot(p, s) > 0 && grouped_owns(m, *seg);
}

MINLORA_HOST_DEVICE inline bool grouped_position_ok(const PlanView& p, int32_t s, int64_t q) {
  int32_t sq;
  Segment g;
  return trusted_token(p, q, &sq, &g) >= 0 && sq == s;
}

// Part `split` of `splits` of a segment's positions, in chunks that are multiples of
// `granule` positions (the last may be shorter; trailing parts may be empty).
struct PositionRange {
  int64_t begin, end;
};

MINLORA_HOST_DEVICE constexpr int64_t split_chunk(int64_t length, int64_t splits, int64_t granule) {
  const int64_t per = (length + splits - 1) / (splits > 0 ? splits : 1);
  return (per + granule - 1) / granule * granule;
}

MINLORA_HOST_DEVICE inline PositionRange split_range(const Segment& seg, int64_t split, int64_t splits,
                                                     int64_t granule) {
  const int64_t chunk = split_chunk(seg.length(), splits, granule);
  const int64_t b = clamp_index(seg.begin + split * chunk, seg.begin, seg.end);
  return {b, clamp_index(b + chunk, b, seg.end)};
}

}  // namespace minlora::kernels
