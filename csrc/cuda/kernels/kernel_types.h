// Types and limits shared by the minlora CUDA kernels, their dispatcher and their host side:
// plain C++ (no CUDA runtime, no torch), so that host code and device code read one copy.
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

// Largest page-table width R of the fallback kernels (a token's rank vector lives in shared memory).
constexpr int64_t kFallbackMaxRank = 4096;
// Largest R of the gather kernels (h for a block's tokens lives in shared memory); wider page
// tables go to the fallback kernels.
constexpr int64_t kGatherMaxRank = 1024;
// Tokens of one slot a gather block takes when a plan is given.
constexpr int kGatherTokens = 4;

// Row length of the grouped path's intermediate hs: R rounded up to 8 elements (16-byte rows
// of 16-bit elements).
MINLORA_HOST_DEVICE constexpr int64_t grouped_hs_width(int64_t max_rank) { return (max_rank + 7) / 8 * 8; }

}  // namespace minlora::kernels
