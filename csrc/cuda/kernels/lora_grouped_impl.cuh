// The grouped GEMM kernels of the segment path, composed from CUTLASS 2.x pieces: the
// gather-capable threadblock MMA and epilogue of DefaultGemm (as in CUTLASS example 36)
// driven by the grouped problem visitor of GemmGrouped (example 24), so that each problem
// (one BatchPlan segment) reads its operands through its own index arrays:
//   shrink  hs[pos, n]    = scale_s * sum_k x[order[b + m], k] * S_pool[S_pages[s, n], k]
//           A = x rows gathered by order (row-major), B = pages as the gathered columns of a
//           column-major [K = in, N = r] operand, D = hs (row-major, plan order).
//   expand  y[order[b + m], c] += sum_k hs[b + m, k] * E_pool[E_pages[s, k], c]   (K = r rounded
//           up to 8 so hs loads stay 16-byte aligned; the padded k read hs = 0, see the prep kernel)
//           A = hs (row-major), B = pages as the gathered rows of a row-major [K = r, N = out]
//           operand, C = D = y with rows scattered by order.
// CUTLASS gathers the strided coordinate of each operand and reads an index only for
// coordinates inside the problem's extent, so the index arrays need no padding.
// Included only by lora_grouped_f16.cu / lora_grouped_bf16.cu (one dtype each, so the two
// heavy instantiations compile in parallel).  No torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm.h"
#include "cutlass/gemm/kernel/gemm_grouped_problem_visitor.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "lora_grouped_problems.h"

namespace minlora::kernels::grouped {

// One tile configuration for both GEMMs and both archs (the sm_80 path runs on sm_90a):
// 128 x 64 x 32 tiles, 4 warps of 64 x 32, 3 stages = 36 KB of shared memory (under the
// 48 KB a launch gets without opting in).  Shrink: N = r <= 64 in one tile for ranks up to
// 64; expand: K = r is a few k-tiles, the epilogue (y read and written) dominates.
// ElementOut: the shrink writes hs in the operand dtype, or float32 partial sums when its K
// (= in) is split among several problems (few long segments: see GroupedKernelParams::k_splits).
template <typename Element, bool kShrink, typename ElementOut = Element>
struct Traits {
  using ThreadblockShape = cutlass::gemm::GemmShape<128, 64, 32>;
  using WarpShape = cutlass::gemm::GemmShape<64, 32, 32>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
  static constexpr int kStages = 3;
  static constexpr int kAlignment = 8;  // 16 bytes of 16-bit elements
  static constexpr int kAlignmentOut = 16 / static_cast<int>(sizeof(ElementOut));
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = std::conditional_t<kShrink, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutC = cutlass::layout::RowMajor;
  // kZfill: every predicated-off access zero-fills its shared memory, in the prologue and in
  // the main loop alike, so the columns n >= r of the shrink accumulate exact zeros (a stale
  // stage could hold NaN bits) and the padding columns of hs stay 0 for the expand.
  // D = alpha * acc + beta * C computed in float32: alpha = scale_s (shrink) or 1 (expand).
  using OutputOp = cutlass::epilogue::thread::LinearCombination<ElementOut, kAlignmentOut, float, float>;
  using Default = typename cutlass::gemm::kernel::DefaultGemm<
      Element, LayoutA, kAlignment, Element, LayoutB, kAlignment, ElementOut, LayoutC, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, OutputOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages, /*SplitKSerial=*/false,
      cutlass::arch::OpMultiplyAdd, cutlass::gemm::SharedMemoryClearOption::kZfill,
      /*GatherA=*/kShrink, /*GatherB=*/true, /*ScatterD=*/!kShrink>;
  using Mma = typename Default::Mma;
  using Epilogue = typename Default::Epilogue;
  static constexpr int kThreads = 32 * Mma::WarpCount::kCount;
  using ProblemVisitor = cutlass::gemm::kernel::GemmGroupedProblemVisitor<
      ThreadblockShape, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly, kThreads, kThreads>;
  struct SharedStorage {
    union {
      typename Mma::SharedStorage main_loop;
      typename Epilogue::SharedStorage epilogue;
    } kernel;
    typename ProblemVisitor::SharedStorage problem_visitor;
  };
};

template <typename Element, bool kShrink, typename ElementOut>
__global__ void __launch_bounds__(Traits<Element, kShrink, ElementOut>::kThreads)
    lora_grouped_kernel(GroupedKernelParams p) {
  using Tr = Traits<Element, kShrink, ElementOut>;
  constexpr bool kPartial = !std::is_same_v<ElementOut, Element>;  // split-K shrink
  using Mma = typename Tr::Mma;
  using Epilogue = typename Tr::Epilogue;
  using OutputOp = typename Tr::OutputOp;
  using ProblemVisitor = typename Tr::ProblemVisitor;
  extern __shared__ int4 shared_raw[];
  auto& shared = *reinterpret_cast<typename Tr::SharedStorage*>(shared_raw);

  const cutlass::gemm::GemmCoord* sizes = kShrink ? p.shrink_sizes : p.expand_sizes;
  // Shrink problems are (slot, k split) pairs, q = s * k_splits + split; expand problems are slots.
  const int32_t splits = kShrink ? p.k_splits : 1;
  ProblemVisitor visitor(typename ProblemVisitor::Params(sizes, static_cast<int32_t>(p.op.num_slots * splits)),
                         shared.problem_visitor, blockIdx.x);
  const int thread_idx = threadIdx.x;
  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int lane_idx = threadIdx.x % 32;

  while (visitor.next_tile()) {
    const cutlass::gemm::GemmCoord size = visitor.problem_size();
    const int32_t q = visitor.problem_index();
    const int32_t s = q / splits;
    const int64_t k0 = static_cast<int64_t>(q % splits) * p.k_split_len;  // first column of this K split
    const int32_t tile = static_cast<int32_t>(visitor.threadblock_idx());
    const cutlass::gemm::GemmCoord grid = visitor.grid_shape(size);
    const cutlass::MatrixCoord tile_offset(int(tile / grid.n()) * Mma::Shape::kM, int(tile % grid.n()) * Mma::Shape::kN);
    // Segment start, validated (clamped, checked against the pages and order) by the prep kernel.
    const int64_t begin = p.seg_begin[s];
    const int* tokens = p.op.order + begin;  // the segment's token rows, in plan order

    const Element* ptr_A;
    int64_t ld_A;
    const int* idx_A;
    const Element* ptr_B;
    int64_t ld_B;
    const int* idx_B;
    ElementOut* ptr_D;
    int64_t ld_D;
    const int* idx_D;
    float alpha, beta;
    if constexpr (kShrink) {
      // The K split starts k0 columns into every x row and every page row (extent K = its length).
      ptr_A = static_cast<const Element*>(p.op.x) + k0;
      ld_A = p.op.in_features;
      idx_A = tokens;
      ptr_B = static_cast<const Element*>(p.op.shrink_pool) + k0;
      ld_B = p.op.in_features;  // column n of B is page S_pages[s, n], a row of length in
      idx_B = p.op.shrink_pages + static_cast<int64_t>(s) * p.op.max_rank;
      ld_D = p.ldh;
      idx_D = nullptr;
      beta = 0.f;
      // The slot's scale, split or not; grouped_reduce_kernel adds the splits' scaled float32
      // partial sums and rounds them into hs.
      alpha = p.op.scales[s];
      if constexpr (kPartial) {
        ptr_D = static_cast<ElementOut*>(p.partial) + ((q % splits) * p.op.num_tokens + begin) * p.ldh;
      } else {
        ptr_D = static_cast<ElementOut*>(p.hs) + begin * p.ldh;
      }
    } else {
      ptr_A = static_cast<const Element*>(p.hs) + begin * p.ldh;
      ld_A = p.ldh;
      idx_A = nullptr;
      ptr_B = static_cast<const Element*>(p.op.expand_pool);
      ld_B = p.op.out_features;  // row k of B is page E_pages[s, k], of length out
      // K = r rounded up to 8 (prep kernel): padded gather indices, not the page table.
      idx_B = p.expand_idx + static_cast<int64_t>(s) * p.ldh;
      ptr_D = static_cast<ElementOut*>(p.op.y);
      ld_D = p.op.out_features;
      idx_D = tokens;
      alpha = 1.f;
      beta = 1.f;
    }

    typename Mma::IteratorA iterator_A(typename Mma::IteratorA::Params(typename Tr::LayoutA(ld_A)),
                                       const_cast<Element*>(ptr_A), {size.m(), size.k()}, thread_idx,
                                       cutlass::MatrixCoord(tile_offset.row(), 0), idx_A);
    typename Mma::IteratorB iterator_B(typename Mma::IteratorB::Params(typename Tr::LayoutB(ld_B)),
                                       const_cast<Element*>(ptr_B), {size.k(), size.n()}, thread_idx,
                                       cutlass::MatrixCoord(0, tile_offset.column()), idx_B);
    typename Mma::FragmentC accumulators;
    accumulators.clear();
    Mma mma(shared.kernel.main_loop, thread_idx, warp_idx, lane_idx);
    const int k_iterations = (size.k() + Mma::Shape::kK - 1) / Mma::Shape::kK;
    // The previous tile's epilogue may still be reading the shared memory the main loop reuses.
    __syncthreads();
    mma(k_iterations, accumulators, iterator_A, iterator_B, accumulators);

    OutputOp output_op(typename OutputOp::Params(alpha, beta));
    const typename Epilogue::OutputTileIterator::Params params_D{typename Tr::LayoutC(ld_D)};
    typename Epilogue::OutputTileIterator iterator_C(params_D, ptr_D, size.mn(), thread_idx, tile_offset, idx_D);
    typename Epilogue::OutputTileIterator iterator_D(params_D, ptr_D, size.mn(), thread_idx, tile_offset, idx_D);
    Epilogue epilogue(shared.kernel.epilogue, thread_idx, warp_idx, lane_idx);
    epilogue(output_op, iterator_D, accumulators, iterator_C);

    visitor.advance(gridDim.x);
  }
}

// Persistent grid: as many blocks as fit on the device at once (each loops over tiles).
template <typename Element, bool kShrink, typename ElementOut = Element>
cudaError_t launch_one(const GroupedKernelParams& p, int sm_count, cudaStream_t stream) {
  using Tr = Traits<Element, kShrink, ElementOut>;
  constexpr int smem = static_cast<int>(sizeof(typename Tr::SharedStorage));
  static_assert(smem <= 48 * 1024, "the tile configuration must fit the default shared memory of a launch");
  static const int per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lora_grouped_kernel<Element, kShrink, ElementOut>, Tr::kThreads,
                                                      smem) != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: the launch below must not report the query's error
      n = 1;
    }
    return n > 0 ? n : 1;
  }();
  const int blocks = (sm_count > 0 ? sm_count : 1) * per_sm;
  lora_grouped_kernel<Element, kShrink, ElementOut><<<blocks, Tr::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// hs[pos, j] = round(sum_q partial[q, pos, j]) for every plan position (the partial sums are
// already scaled; rows of skipped segments sum zeros).  One thread per (pos, j).
template <typename Element>
__global__ void __launch_bounds__(256) grouped_reduce_kernel(GroupedKernelParams p) {
  const int64_t n = p.op.num_tokens * p.ldh;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float acc = 0.f;
  for (int q = 0; q < p.k_splits; ++q) acc += p.partial[q * n + i];
  static_cast<Element*>(p.hs)[i] = Element(acc);
}

template <typename Element>
cudaError_t launch_shrink_expand(const GroupedKernelParams& p, int sm_count, cudaStream_t stream) {
  cudaError_t err;
  if (p.k_splits > 1) {
    err = launch_one<Element, true, float>(p, sm_count, stream);
    if (err != cudaSuccess) return err;
    const int64_t n = p.op.num_tokens * p.ldh;
    grouped_reduce_kernel<Element><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p);
    err = cudaGetLastError();
  } else {
    err = launch_one<Element, true>(p, sm_count, stream);
  }
  if (err != cudaSuccess || p.op.skip_expand) return err;
  return launch_one<Element, false>(p, sm_count, stream);
}

}  // namespace minlora::kernels::grouped
