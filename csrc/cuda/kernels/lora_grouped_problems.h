// The device-side problem table of the grouped GEMM path, shared by the prep kernel
// (lora_grouped.cu) and the CUTLASS kernels (lora_grouped_impl.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lora_grouped.cuh"

namespace cutlass::gemm {
struct GemmCoord;
}

namespace minlora::kernels::grouped {

// The op's operands (op) and the workspace the prep kernel filled.  Problem s is slot s's
// segment; the prep kernel gives it size 0 when the segment is shorter than min_segment or
// any index it would read is invalid (then the slot's tokens get nothing from this path).
struct GroupedKernelParams {
  GroupedParams op;
  const cutlass::gemm::GemmCoord* shrink_sizes;  // [S * k_splits]: (seg len, r, split length)
  const cutlass::gemm::GemmCoord* expand_sizes;  // [S]: (seg len, out, r rounded up to 8)
  // [S, ldh]: the expand's B gather indices.  Its K is r rounded up to 8 (see the prep kernel),
  // so rows r..K-1 need indices too: they repeat the slot's page 0 (hs is 0 in those columns).
  const int32_t* expand_idx;
  const int32_t* seg_begin;  // [S]: clamped segment start
  void* hs;                  // [T, ldh] operand dtype (op.hs or the workspace's), zeroed first
  int64_t ldh;
  // Split-K of the shrink (when few long segments would leave most multiprocessors idle):
  // shrink problem q = s * k_splits + split covers columns [split * k_split_len, ...) of in
  // and writes its scaled float32 partial sums to partial [k_splits, T, ldh]; a reduce kernel
  // then adds and rounds them into hs.  k_splits = 1: no split, the shrink writes hs directly.
  int32_t k_splits;
  int64_t k_split_len;
  float* partial;
};

cudaError_t launch_grouped_f16(const GroupedKernelParams& p, int sm_count, cudaStream_t stream);
cudaError_t launch_grouped_bf16(const GroupedKernelParams& p, int sm_count, cudaStream_t stream);

}  // namespace minlora::kernels::grouped
