// Gather kernels (see lora_gather.cuh): decode-shaped LoRA, the pool gradients of short
// segments, and the plan's positions.  Which tokens a block handles is decided by thread 0
// with lora_index.h's functions and broadcast through shared memory, so every barrier is
// reached by the whole block whatever the index tensors hold.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "lora_gather.cuh"

namespace minlora::kernels {
namespace {

// The group of one gather block, decided once (thread 0) for the whole block.
template <int TOK>
struct BlockGroup {
  int64_t tok[TOK];
  int32_t slot;
  int rank;
  bool has;        // the block handles tokens of `slot`
  bool zero_row;   // write-only form: token blockIdx.x has no owner, the block zeroes its row (its columns)

  __device__ void fill(const GatherParams& p, int64_t b) {
    has = gather_group<TOK>(p.plan, p.mode, b, &slot, tok);
    rank = has ? rank_of_slot(p.plan, slot) : 0;
    zero_row = !p.accumulate && token_owner(p.plan, p.mode, b) == Owner::kNone;
  }
};

// Whether every page of slot s below rank r lies in its pool, in both tables.  A barrier:
// called by the whole block; the answer is the same in every thread.
__device__ bool slot_pages_ok(const int32_t* pages_a, int64_t num_a, const int32_t* pages_b, int64_t num_b,
                              int64_t max_rank, int32_t s, int r) {
  int bad = 0;
  for (int j = flat_thread(); j < r; j += block_threads())
    bad |= !page_in_pool(pages_a[s * max_rank + j], num_a) || !page_in_pool(pages_b[s * max_rank + j], num_b);
  return __syncthreads_or(bad) == 0;
}

template <typename T, int VEC>
__device__ void store_zeros(T* row, int64_t c0, int64_t c1) {
  float zero[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) zero[v] = 0.f;
  for (int64_t c = c0 + static_cast<int64_t>(flat_thread()) * VEC; c < c1; c += static_cast<int64_t>(block_threads()) * VEC)
    store_vec<T, VEC>(row + c, zero);
}

// <x[tok[i], k0:k1], shrink page j> for the group's tokens, one warp per rank index j; the
// page row is streamed once for all TOK tokens.  emit(i, j, sum) runs on lane 0.
template <typename T, int VEC, int TOK, typename Emit>
__device__ void shrink_dots(const GatherParams& p, int32_t s, int r, const int64_t (&tok)[TOK], int64_t k0,
                            int64_t k1, Emit emit) {
  const T* x = static_cast<const T*>(p.ops.act);
  const T* pool = static_cast<const T*>(p.ops.shrink_pool);
  const int64_t in = p.ops.act_len, R = p.plan.max_rank;
  const int warp = flat_thread() >> 5, lane = flat_thread() & 31, num_warps = block_threads() >> 5;
  constexpr int U = 4;  // independent 16-byte page loads in flight per thread
  const int64_t step = 32 * VEC;
  for (int j = warp; j < r; j += num_warps) {
    float acc[TOK];
#pragma unroll
    for (int i = 0; i < TOK; ++i) acc[i] = 0.f;
    const int32_t page = p.ops.shrink_pages[s * R + j];
    if (page_in_pool(page, p.ops.num_shrink_pages)) {
      const T* row = pool + static_cast<int64_t>(page) * in;
      int64_t k = k0 + lane * VEC;
      for (; k + (U - 1) * step < k1; k += U * step) {
        float w[U][VEC];
#pragma unroll
        for (int u = 0; u < U; ++u) load_vec_stream<T, VEC>(row + k + u * step, w[u]);
#pragma unroll
        for (int i = 0; i < TOK; ++i) {
          if (tok[i] < 0) continue;
          const T* xr = x + tok[i] * in + k;
#pragma unroll
          for (int u = 0; u < U; ++u) {
            float xv[VEC];
            load_vec<T, VEC>(xr + u * step, xv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[i] += w[u][v] * xv[v];
          }
        }
      }
      for (; k < k1; k += step) {
        float w[VEC];
        load_vec_stream<T, VEC>(row + k, w);
#pragma unroll
        for (int i = 0; i < TOK; ++i) {
          if (tok[i] < 0) continue;
          float xv[VEC];
          load_vec<T, VEC>(x + tok[i] * in + k, xv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i] += w[v] * xv[v];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < TOK; ++i) acc[i] = warp_sum(acc[i]);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < TOK; ++i)
        if (tok[i] >= 0) emit(i, j, acc[i]);
    }
  }
}

// y[tok[i], c0:c1] (+)= sum_j h[i * R + j] * expand page j (h: the scaled rank vectors, in
// shared memory).  ok = false (an invalid page): zeros in the write-only form, nothing when
// accumulating.  Each page row is read once for all TOK tokens.
template <typename T, int VEC, int TOK>
__device__ void expand_cols(const GatherParams& p, int32_t s, int r, const int64_t (&tok)[TOK], const float* h,
                            int64_t c0, int64_t c1, bool ok) {
  if (p.accumulate && !ok) return;
  const T* pool = static_cast<const T*>(p.ops.expand_pool);
  T* y = static_cast<T*>(p.y);
  const int64_t out = p.ops.out_len, R = p.plan.max_rank;
  for (int64_t c = c0 + static_cast<int64_t>(flat_thread()) * VEC; c < c1;
       c += static_cast<int64_t>(block_threads()) * VEC) {
    float acc[TOK][VEC];
#pragma unroll
    for (int i = 0; i < TOK; ++i)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[i][v] = 0.f;
    if (ok) {
#pragma unroll 4
      for (int j = 0; j < r; ++j) {
        const int32_t page = p.ops.expand_pages[s * R + j];
        if (!page_in_pool(page, p.ops.num_expand_pages)) continue;
        float bv[VEC];
        load_vec_stream<T, VEC>(pool + static_cast<int64_t>(page) * out + c, bv);
#pragma unroll
        for (int i = 0; i < TOK; ++i) {
          const float hv = h[i * R + j];
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i][v] += hv * bv[v];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < TOK; ++i) {
      if (tok[i] < 0) continue;
      T* yr = y + tok[i] * out + c;
      if (p.accumulate) {
        float yv[VEC];
        load_vec<T, VEC>(yr, yv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[i][v] += yv[v];
      }
      store_vec<T, VEC>(yr, acc[i]);
    }
  }
}

// One block per group: the shrink into shared memory (h [TOK][R], scaled), then the expand
// over every column.  Grid: T blocks.
template <typename T, int VEC, int TOK>
__global__ void __launch_bounds__(kFusedThreads) gather_fused_kernel(GatherParams p) {
  extern __shared__ float h[];
  __shared__ BlockGroup<TOK> g;
  const int64_t b = blockIdx.x;
  if (flat_thread() == 0) g.fill(p, b);
  __syncthreads();
  if (g.has) {
    const int64_t R = p.plan.max_rank;
    const bool ok = slot_pages_ok(p.ops.shrink_pages, p.ops.num_shrink_pages, p.ops.expand_pages, p.ops.num_expand_pages, R, g.slot,
                                  g.rank);
    if (ok) {
      // Rank vectors of empty group places read as 0 (the shrink writes only the others).
      for (int idx = flat_thread(); idx < TOK * g.rank; idx += block_threads())
        if (g.tok[idx / g.rank] < 0) h[(idx / g.rank) * R + idx % g.rank] = 0.f;
      const float scale = p.ops.scales[g.slot];
      shrink_dots<T, VEC, TOK>(p, g.slot, g.rank, g.tok, 0, p.ops.act_len,
                               [&](int i, int j, float v) { h[i * R + j] = v * scale; });
    }
    __syncthreads();
    expand_cols<T, VEC, TOK>(p, g.slot, g.rank, g.tok, h, 0, p.ops.out_len, ok);
  }
  if (g.zero_row) store_zeros<T, VEC>(static_cast<T*>(p.y) + b * p.ops.out_len, 0, p.ops.out_len);
}

// The split shrink: block (b, split) writes the partial sums of columns
// [split * k_chunk, (split + 1) * k_chunk) of in.  Grid: T x k_splits.
template <typename T, int VEC, int TOK>
__global__ void __launch_bounds__(kShrinkThreads) gather_shrink_kernel(GatherParams p) {
  __shared__ BlockGroup<TOK> g;
  if (flat_thread() == 0) g.fill(p, blockIdx.x);
  __syncthreads();
  if (!g.has) return;
  const int64_t R = p.plan.max_rank, T_ = p.plan.num_tokens;
  if (!slot_pages_ok(p.ops.shrink_pages, p.ops.num_shrink_pages, p.ops.expand_pages, p.ops.num_expand_pages, R, g.slot, g.rank))
    return;
  const int64_t split = blockIdx.y, k0 = split * p.launch.k_chunk;
  const int64_t k1 = k0 + p.launch.k_chunk < p.ops.act_len ? k0 + p.launch.k_chunk : p.ops.act_len;
  float* part = p.partial + split * T_ * R;
  shrink_dots<T, VEC, TOK>(p, g.slot, g.rank, g.tok, k0, k1,
                           [&](int i, int j, float v) { part[g.tok[i] * R + j] = v; });
}

// The split expand: block (b, tile) sums the partials of its tokens (scaled, into shared
// memory) and writes columns [tile * n_chunk, (tile + 1) * n_chunk) of their rows, and of
// row b when token b has no owner (write-only).  Grid: T x n_tiles.
template <typename T, int VEC, int TOK>
__global__ void __launch_bounds__(128) gather_expand_kernel(GatherParams p) {
  extern __shared__ float h[];
  __shared__ BlockGroup<TOK> g;
  const int64_t b = blockIdx.x;
  if (flat_thread() == 0) g.fill(p, b);
  __syncthreads();
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.launch.n_chunk;
  const int64_t c1 = c0 + p.launch.n_chunk < p.ops.out_len ? c0 + p.launch.n_chunk : p.ops.out_len;
  if (g.has) {
    const int64_t R = p.plan.max_rank, T_ = p.plan.num_tokens;
    const bool ok = slot_pages_ok(p.ops.shrink_pages, p.ops.num_shrink_pages, p.ops.expand_pages, p.ops.num_expand_pages, R, g.slot,
                                  g.rank);
    if (ok) {
      const float scale = p.ops.scales[g.slot];
      for (int idx = flat_thread(); idx < TOK * g.rank; idx += block_threads()) {
        const int i = idx / g.rank, j = idx % g.rank;
        float sum = 0.f;
        if (g.tok[i] >= 0)
          for (int32_t q = 0; q < p.launch.k_splits; ++q) sum += p.partial[(q * T_ + g.tok[i]) * R + j];
        h[i * R + j] = sum * scale;
      }
    }
    __syncthreads();
    expand_cols<T, VEC, TOK>(p, g.slot, g.rank, g.tok, h, c0, c1, ok);
  }
  if (g.zero_row) store_zeros<T, VEC>(static_cast<T*>(p.y) + b * p.ops.out_len, c0, c1);
}

// Block (32, kGradRankGroups): threadIdx.x owns VEC columns, threadIdx.y owns rank indices
// j = j0 + y + kGradRankGroups * q.  Positions are resolved to tokens kGradChunk at a time
// into shared memory.
constexpr int kGradRankGroups = 8;
constexpr int kGradRanksPerThread = 4;
constexpr int kGradChunk = 32 * kGradRankGroups;

template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kGradRankGroups) segment_grad_kernel(SegmentGradParams p) {
  __shared__ int32_t shared_rank;
  __shared__ float shared_scale;
  __shared__ Segment shared_seg;
  __shared__ int64_t tokens[kGradChunk];
  const int32_t s = blockIdx.x;
  if (flat_thread() == 0) {
    const Segment seg = segment_of_slot(p.plan, s);
    shared_seg = seg;
    shared_rank = grouped_owns(p.mode, seg) ? 0 : rank_of_slot(p.plan, s);
    shared_scale = p.ops.scales[s];
  }
  __syncthreads();
  const int r = shared_rank;
  if (r == 0) return;
  const int64_t R = p.plan.max_rank, T_ = p.plan.num_tokens, len = p.ops.len;
  if (!slot_pages_ok(p.ops.pages, p.ops.num_pages, p.ops.other_pages, p.ops.num_other_pages, R, s, r)) return;
  const PositionRange range = split_range(shared_seg, blockIdx.z, p.token_splits, 1);
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x) * VEC;
  const bool active = c < len;  // inactive threads still take part in the barriers
  const T* v = static_cast<const T*>(p.ops.v);
  constexpr int J = kGradRanksPerThread;
  for (int j0 = 0; j0 < r; j0 += kGradRankGroups * J) {
    float acc[J][VEC];
#pragma unroll
    for (int q = 0; q < J; ++q)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[q][e] = 0.f;
    for (int64_t chunk = range.begin; chunk < range.end; chunk += kGradChunk) {
      __syncthreads();  // the previous chunk's tokens are no longer read
      const int64_t q0 = chunk + flat_thread();
      tokens[flat_thread()] = q0 < range.end ? segment_grad_token(p.plan, p.mode, s, q0) : -1;
      __syncthreads();
      if (!active) continue;
      const int64_t n = range.end - chunk < kGradChunk ? range.end - chunk : kGradChunk;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = tokens[i];
        if (t < 0) continue;
        float vv[VEC];
        load_vec<T, VEC>(v + t * len + c, vv);
#pragma unroll
        for (int q = 0; q < J; ++q) {
          const int j = j0 + threadIdx.y + kGradRankGroups * q;
          if (j < r) {
            float cf = 0.f;
            for (int32_t k = 0; k < p.k_splits; ++k) cf += p.partial[(k * T_ + t) * R + j];
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[q][e] += cf * vv[e];
          }
        }
      }
    }
    if (!active) continue;
#pragma unroll
    for (int q = 0; q < J; ++q) {
      const int j = j0 + threadIdx.y + kGradRankGroups * q;
      if (j >= r) continue;
      const int32_t page = p.ops.pages[s * R + j];
      if (!page_in_pool(page, p.ops.num_pages)) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[q][e] *= shared_scale;
      const int64_t at = static_cast<int64_t>(page) * len + c;
      if (p.ops.grad_f32) {
        atomic_add_vec<VEC>(static_cast<float*>(p.ops.grad) + at, acc[q]);
      } else {
        atomic_add_vec<VEC>(static_cast<T*>(p.ops.grad) + at, acc[q]);
      }
    }
  }
}

__global__ void __launch_bounds__(256) plan_positions_kernel(const int32_t* order, int64_t num_tokens,
                                                             int32_t* positions) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= num_tokens) return;
  const int32_t t = order[q];
  if (t >= 0 && t < num_tokens) positions[t] = static_cast<int32_t>(q);
}

// ---- launchers

size_t rank_vectors_bytes(int tok, int64_t max_rank) { return sizeof(float) * static_cast<size_t>(tok * max_rank); }

template <typename T, int VEC, int TOK>
cudaError_t fused_typed(const GatherParams& p, cudaStream_t stream) {
  gather_fused_kernel<T, VEC, TOK><<<static_cast<unsigned>(p.plan.num_tokens), kFusedThreads,
                                     rank_vectors_bytes(TOK, p.plan.max_rank), stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int VEC, int TOK>
cudaError_t shrink_typed(const GatherParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.plan.num_tokens), static_cast<unsigned>(p.launch.k_splits));
  gather_shrink_kernel<T, VEC, TOK><<<grid, kShrinkThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int VEC, int TOK>
cudaError_t expand_typed(const GatherParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.plan.num_tokens), static_cast<unsigned>(p.launch.n_tiles));
  gather_expand_kernel<T, VEC, TOK><<<grid, static_cast<unsigned>(p.launch.expand_threads),
                                      rank_vectors_bytes(TOK, p.plan.max_rank), stream>>>(p);
  return cudaGetLastError();
}

enum class Which { kFused, kShrink, kExpand };

template <typename T, int VEC, int TOK>
cudaError_t launch_which(Which w, const GatherParams& p, cudaStream_t stream) {
  switch (w) {
    case Which::kFused: return fused_typed<T, VEC, TOK>(p, stream);
    case Which::kShrink: return shrink_typed<T, VEC, TOK>(p, stream);
    case Which::kExpand: return expand_typed<T, VEC, TOK>(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int VEC>
cudaError_t launch_tok(Which w, const GatherParams& p, cudaStream_t stream) {
  return p.mode.planned ? launch_which<T, VEC, kGatherTokens>(w, p, stream) : launch_which<T, VEC, 1>(w, p, stream);
}

cudaError_t check_gather(Which w, const GatherParams& p) {
  const int64_t T = p.plan.num_tokens, R = p.plan.max_rank;
  if (T > 0x7fffffff || R > kMaxRank || (p.mode.planned && R > kGatherMaxRank)) return cudaErrorInvalidValue;
  if (p.mode.tokens != (p.mode.planned ? kGatherTokens : 1)) return cudaErrorInvalidValue;
  if (p.mode.planned && (p.plan.order == nullptr || p.plan.seg_offsets == nullptr || p.plan.positions == nullptr))
    return cudaErrorInvalidValue;
  if (!p.mode.planned && p.mode.grouped_min != 0) return cudaErrorInvalidValue;
  if (w != Which::kFused && (p.partial == nullptr || p.launch.k_splits < 1 || p.launch.k_chunk < 1)) return cudaErrorInvalidValue;
  if (w == Which::kExpand && (p.launch.n_tiles < 1 || p.launch.n_chunk < 1 || p.launch.expand_threads < 32 ||
                              p.launch.expand_threads > 128 || p.launch.expand_threads % 32 != 0))
    return cudaErrorInvalidValue;
  if (w != Which::kShrink && p.y == nullptr) return cudaErrorInvalidValue;
  if (p.launch.k_splits > 65535 || p.launch.n_tiles > 65535) return cudaErrorInvalidValue;
  return cudaSuccess;
}

cudaError_t launch_gather_any(Which w, const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream) {
  if (p.plan.num_tokens == 0 || p.plan.num_slots == 0) {
    // No slot: every row has no owner (the caller handles empty calls; nothing to launch).
    return cudaSuccess;
  }
  const cudaError_t bad = check_gather(w, p);
  if (bad != cudaSuccess) return bad;
  switch (dtype) {
    case DType::kFloat16:
      return vectorized ? launch_tok<__half, 8>(w, p, stream) : launch_tok<__half, 1>(w, p, stream);
    case DType::kBFloat16:
      return vectorized ? launch_tok<__nv_bfloat16, 8>(w, p, stream) : launch_tok<__nv_bfloat16, 1>(w, p, stream);
    case DType::kFloat32:
      return vectorized ? launch_tok<float, 4>(w, p, stream) : launch_tok<float, 1>(w, p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int VEC>
cudaError_t segment_grad_typed(const SegmentGradParams& p, cudaStream_t stream) {
  const int64_t col_tiles = (p.ops.len + 32 * VEC - 1) / (32 * VEC);
  const dim3 grid(static_cast<unsigned>(p.plan.num_slots), static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(p.token_splits));
  segment_grad_kernel<T, VEC><<<grid, dim3(32, kGradRankGroups), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool rows_are_16b_aligned(const void* const* ptrs, int num_ptrs, const int64_t* row_bytes, int num_rows) {
  for (int i = 0; i < num_ptrs; ++i)
    if (ptrs[i] != nullptr && reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  for (int i = 0; i < num_rows; ++i)
    if (row_bytes[i] % 16 != 0) return false;
  return true;
}

cudaError_t launch_gather_fused(const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream) {
  return launch_gather_any(Which::kFused, p, dtype, vectorized, stream);
}

cudaError_t launch_gather_shrink(const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream) {
  return launch_gather_any(Which::kShrink, p, dtype, vectorized, stream);
}

cudaError_t launch_gather_expand(const GatherParams& p, DType dtype, bool vectorized, cudaStream_t stream) {
  return launch_gather_any(Which::kExpand, p, dtype, vectorized, stream);
}

cudaError_t launch_segment_grad(const SegmentGradParams& p, DType dtype, bool vectorized, cudaStream_t stream) {
  if (p.plan.num_tokens == 0 || p.plan.num_slots == 0 || p.ops.len == 0) return cudaSuccess;
  if (p.plan.num_slots > 0x7fffffff || p.plan.num_tokens > 0x7fffffff || p.token_splits < 1 ||
      p.token_splits > 65535 || p.k_splits < 1)
    return cudaErrorInvalidValue;
  if (p.plan.order == nullptr || p.plan.seg_offsets == nullptr || p.plan.positions == nullptr)
    return cudaErrorInvalidValue;
  if ((p.ops.len + 31) / 32 > 65535) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16:
      return vectorized ? segment_grad_typed<__half, 8>(p, stream) : segment_grad_typed<__half, 1>(p, stream);
    case DType::kBFloat16:
      return vectorized ? segment_grad_typed<__nv_bfloat16, 8>(p, stream)
                        : segment_grad_typed<__nv_bfloat16, 1>(p, stream);
    case DType::kFloat32:
      return vectorized ? segment_grad_typed<float, 4>(p, stream) : segment_grad_typed<float, 1>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_plan_positions(const int32_t* order, int64_t num_tokens, int32_t* positions, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (num_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(positions, 0xff, sizeof(int32_t) * static_cast<size_t>(num_tokens), stream);
  if (err != cudaSuccess) return err;
  plan_positions_kernel<<<static_cast<unsigned>((num_tokens + 255) / 256), 256, 0, stream>>>(order, num_tokens,
                                                                                              positions);
  return cudaGetLastError();
}

}  // namespace minlora::kernels
