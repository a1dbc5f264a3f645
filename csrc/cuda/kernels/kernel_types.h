// Types and limits shared by the minlora CUDA kernels, their dispatcher and their host side:
// plain C++ (no CUDA runtime, no torch), so that host code, device code and the CPU tests of
// the kernel logic (csrc/testing) read one copy.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MINLORA_HOST_DEVICE __host__ __device__
#else
#define MINLORA_HOST_DEVICE
#endif

namespace minlora::kernels {

// Element type of activations and pools.
enum class DType { kFloat16, kBFloat16, kFloat32 };

constexpr int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Largest page-table width R the CUDA kernels take (one token per gather block: a token's
// rank vector, R floats, lives in shared memory).
constexpr int64_t kMaxRank = 4096;
// Largest R of the planned gather blocks (kGatherTokens rank vectors in shared memory) and of
// the grouped GEMM path; wider page tables take the one-token-per-block kernels.
constexpr int64_t kGatherMaxRank = 1024;
// Tokens of one slot a planned gather block takes.
constexpr int kGatherTokens = 4;

// The operands of one shrink-then-expand, shared by the gather and grouped paths:
// rows of act [T, act_len] -> pages of shrink_pool (rows of act_len) -> pages of expand_pool
// (rows of out_len).  The forward is (x, a_pool, a_pages, b_pool, b_pages); grad_x is
// (grad_y, b_pool, b_pages, a_pool, a_pages).  Device pointers.
struct ShrinkExpandOperands {
  const void* act;              // [T, act_len]
  int64_t act_len;
  const void* shrink_pool;      // [num_shrink_pages, act_len]
  const int32_t* shrink_pages;  // [S, R]
  int64_t num_shrink_pages;
  const void* expand_pool;      // [num_expand_pages, out_len]
  const int32_t* expand_pages;  // [S, R]
  int64_t num_expand_pages;
  int64_t out_len;
  const float* scales;          // [S]
};

// The operands of one pool gradient, shared by the gather and grouped paths:
// grad[pages[s, j]] += scale_s * sum over the tokens t of slot s of coef[t, j] * v[t], where
//   grad_a_pool: v = x,      coef = u = B^T g,  pages = A pages, other = B pages;
//   grad_b_pool: v = grad_y, coef = h = A x,    pages = B pages, other = A pages
// (each path brings its own coef).  A slot with a page below its rank outside its pool, in
// either table, is skipped.  Device pointers.
struct PoolGradOperands {
  const void* v;               // [T, len]
  int64_t len;
  const float* scales;         // [S]
  const int32_t* pages;        // [S, R]: the gradient pool's page table
  int64_t num_pages;
  const int32_t* other_pages;  // [S, R]: the other pool's
  int64_t num_other_pages;
  void* grad;                  // [num_pages, len]: float32, or the operand dtype
  bool grad_f32;
};

// Row length of the grouped path's intermediate hs: R rounded up to 8 elements (16-byte rows
// of 16-bit elements).
MINLORA_HOST_DEVICE constexpr int64_t grouped_hs_width(int64_t max_rank) { return (max_rank + 7) / 8 * 8; }

}  // namespace minlora::kernels
