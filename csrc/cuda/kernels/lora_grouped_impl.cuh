// The grouped GEMM kernels of the segment path, composed from CUTLASS 2.x pieces: the
// gather-capable threadblock MMA and epilogue of DefaultGemm (as in CUTLASS example 36)
// driven by the grouped problem visitor of GemmGrouped (example 24), so that each problem
// (one BatchPlan segment, or a K split of one) reads its operands through its own index
// arrays.  The problems, operand offsets and index arrays are lora_grouped_desc.h's
// (shrink_desc, expand_desc, grad_desc), filled by the prep kernel (lora_grouped.cu).
// CUTLASS gathers the strided coordinate of each operand and reads an index only for
// coordinates inside the problem's extent, so the index arrays need no padding.
// Included only by lora_grouped_{f16,bf16}.cu and lora_grouped_grad_{f16,bf16}.cu, which
// instantiate launch_gemms for one kernel family and dtype each.
#pragma once

#include <cuda_runtime.h>

#include "lora_grouped_launch.h"

#if MINLORA_HAVE_CUTLASS
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm.h"
#include "cutlass/gemm/kernel/gemm_grouped_problem_visitor.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "lora_grouped_desc.h"

namespace minlora::kernels::grouped {

static_assert(sizeof(cutlass::gemm::GemmCoord) == sizeof(ProblemSize), "ProblemSize has GemmCoord's layout");

// kShrink: hs (operand dtype); kShrinkPartial: float32 partial sums of a K split; kExpand:
// the scattered output rows; kGrad: the pool gradients (atomic adds, its own epilogue).
enum class Kind { kShrink, kShrinkPartial, kExpand, kGrad };

template <typename Element, Kind K>
struct Traits {
  static constexpr bool kShrinkLike = K == Kind::kShrink || K == Kind::kShrinkPartial;
  static constexpr bool kGradKind = K == Kind::kGrad;
  // Shrink / expand: 128 x 64 x 32 tiles, 4 warps of 64 x 32.  Shrink: N = r <= 64 in one
  // tile for ranks up to 64; expand: K = r is a few k-tiles, the epilogue dominates.
  // Gradients: M = r, so 64-row tiles (r <= 64 in one), 4 warps of 32 x 64, N = the row
  // length in 128-column tiles.  3 stages: 36 KB of shared memory (under the 48 KB a launch
  // gets without opting in).  One configuration for both archs (the sm_80 path runs on sm_90a).
  using ThreadblockShape = std::conditional_t<kGradKind, cutlass::gemm::GemmShape<kGradTileM, kGradTileN, kGradTileK>,
                                              cutlass::gemm::GemmShape<kTileM, kTileN, kTileK>>;
  using WarpShape = std::conditional_t<kGradKind, cutlass::gemm::GemmShape<32, 64, 32>, cutlass::gemm::GemmShape<64, 32, 32>>;
  using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
  static constexpr int kStages = 3;
  static constexpr int kAlignment = 8;  // 16 bytes of 16-bit elements
  using ElementOut = std::conditional_t<K == Kind::kShrinkPartial || kGradKind, float, Element>;
  static constexpr int kAlignmentOut = 16 / static_cast<int>(sizeof(ElementOut));
  // Gradients: A = hs read as a column-major [M = r, K = positions] operand.
  using LayoutA = std::conditional_t<kGradKind, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutB = std::conditional_t<kShrinkLike, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutC = cutlass::layout::RowMajor;
  // kZfill: every predicated-off access zero-fills its shared memory, in the prologue and in
  // the main loop alike, so the columns n >= r of the shrink accumulate exact zeros (a stale
  // stage could hold NaN bits) and the padding columns of hs stay 0 for the expand.
  // D = alpha * acc + beta * C computed in float32.
  using OutputOp = cutlass::epilogue::thread::LinearCombination<ElementOut, kAlignmentOut, float, float>;
  using Default = typename cutlass::gemm::kernel::DefaultGemm<
      Element, LayoutA, kAlignment, Element, LayoutB, kAlignment, ElementOut, LayoutC, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, OutputOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages, /*SplitKSerial=*/false,
      cutlass::arch::OpMultiplyAdd, cutlass::gemm::SharedMemoryClearOption::kZfill,
      /*GatherA=*/kShrinkLike, /*GatherB=*/true, /*ScatterD=*/K == Kind::kExpand>;
  using Mma = typename Default::Mma;
  using Epilogue = typename Default::Epilogue;
  static constexpr int kThreads = 32 * Mma::WarpCount::kCount;
  using ProblemVisitor = cutlass::gemm::kernel::GemmGroupedProblemVisitor<
      ThreadblockShape, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly, kThreads, kThreads>;
  // The gradients' epilogue stages the accumulator tile in shared memory (rows padded by 4
  // floats against bank conflicts), then adds it row by row into the pages.
  static constexpr int kTileLd = ThreadblockShape::kN + 4;
  struct SharedStorage {
    union {
      typename Mma::SharedStorage main_loop;
      typename Epilogue::SharedStorage epilogue;
      float tile[kGradKind ? ThreadblockShape::kM * kTileLd : 1];
    } kernel;
    typename ProblemVisitor::SharedStorage problem_visitor;
  };
};

static_assert(Traits<cutlass::half_t, Kind::kGrad>::Mma::WarpCount::kK == 1, "no K partitions across warps");

// The CUDA type of a CUTLASS 16-bit element (the same bits), for common.cuh's atomics.
template <typename Element>
using NativeOf = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, __half, __nv_bfloat16>;

template <typename Element, Kind K>
__global__ void __launch_bounds__(Traits<Element, K>::kThreads) lora_grouped_kernel(KernelParams p) {
  using Tr = Traits<Element, K>;
  using Mma = typename Tr::Mma;
  using Epilogue = typename Tr::Epilogue;
  using OutputOp = typename Tr::OutputOp;
  using ProblemVisitor = typename Tr::ProblemVisitor;
  using ElementOut = typename Tr::ElementOut;
  extern __shared__ int4 shared_raw[];
  auto& shared = *reinterpret_cast<typename Tr::SharedStorage*>(shared_raw);

  const ProblemSize* sizes = Tr::kShrinkLike ? p.shrink_sizes : (K == Kind::kExpand ? p.expand_sizes : p.grad_sizes);
  // Problems are (slot, split) pairs, q = s * splits + split.
  const int32_t splits = Tr::kShrinkLike ? p.k_splits : (K == Kind::kGrad ? p.grad_splits : 1);
  ProblemVisitor visitor(
      typename ProblemVisitor::Params(reinterpret_cast<const cutlass::gemm::GemmCoord*>(sizes),
                                      static_cast<int32_t>(p.plan.num_slots * splits)),
      shared.problem_visitor, blockIdx.x);
  const int thread_idx = threadIdx.x;
  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int lane_idx = threadIdx.x % 32;

  while (visitor.next_tile()) {
    const cutlass::gemm::GemmCoord size = visitor.problem_size();
    const int32_t q = visitor.problem_index();
    const int32_t s = q / splits, split = q % splits;
    const cutlass::gemm::GemmCoord grid = visitor.grid_shape(size);
    int32_t row0, col0;
    tile_origin(static_cast<int32_t>(visitor.threadblock_idx()), grid.n(), Mma::Shape::kM, Mma::Shape::kN, &row0, &col0);
    const cutlass::MatrixCoord tile_offset(row0, col0);

    GemmDesc d;
    const Element* ptr_A;
    const Element* ptr_B;
    ElementOut* ptr_D;
    if constexpr (Tr::kShrinkLike) {
      d = shrink_desc(p, s, split);
      ptr_A = static_cast<const Element*>(p.act);
      ptr_B = static_cast<const Element*>(p.shrink_pool);
      ptr_D = K == Kind::kShrinkPartial ? reinterpret_cast<ElementOut*>(p.partial) : static_cast<ElementOut*>(p.hs);
    } else if constexpr (K == Kind::kExpand) {
      d = expand_desc(p, s);
      ptr_A = static_cast<const Element*>(p.hs);
      ptr_B = static_cast<const Element*>(p.expand_pool);
      ptr_D = static_cast<ElementOut*>(p.out);
    } else {
      d = grad_desc(p, s, split);
      ptr_A = static_cast<const Element*>(p.hs);
      ptr_B = static_cast<const Element*>(p.grad_v);
      ptr_D = nullptr;  // atomic adds below
    }

    typename Mma::IteratorA iterator_A(typename Mma::IteratorA::Params(typename Tr::LayoutA(d.lda)),
                                       const_cast<Element*>(ptr_A + d.a_offset), {size.m(), size.k()}, thread_idx,
                                       cutlass::MatrixCoord(tile_offset.row(), 0), d.a_idx);
    typename Mma::IteratorB iterator_B(typename Mma::IteratorB::Params(typename Tr::LayoutB(d.ldb)),
                                       const_cast<Element*>(ptr_B + d.b_offset), {size.k(), size.n()}, thread_idx,
                                       cutlass::MatrixCoord(0, tile_offset.column()), d.b_idx);
    typename Mma::FragmentC accumulators;
    accumulators.clear();
    Mma mma(shared.kernel.main_loop, thread_idx, warp_idx, lane_idx);
    const int k_iterations = (size.k() + Mma::Shape::kK - 1) / Mma::Shape::kK;
    // The previous tile's epilogue may still be reading the shared memory the main loop reuses.
    __syncthreads();
    mma(k_iterations, accumulators, iterator_A, iterator_B, accumulators);

    if constexpr (K != Kind::kGrad) {
      OutputOp output_op(typename OutputOp::Params(d.alpha, d.beta));
      const typename Epilogue::OutputTileIterator::Params params_D{typename Tr::LayoutC(d.ldd)};
      ElementOut* out = ptr_D + d.d_offset;
      typename Epilogue::OutputTileIterator iterator_C(params_D, out, size.mn(), thread_idx, tile_offset, d.d_idx);
      typename Epilogue::OutputTileIterator iterator_D(params_D, out, size.mn(), thread_idx, tile_offset, d.d_idx);
      Epilogue epilogue(shared.kernel.epilogue, thread_idx, warp_idx, lane_idx);
      epilogue(output_op, iterator_D, accumulators, iterator_C);
    } else {
      // The main loop drained its copies and synchronised; stage each warp's accumulators in
      // the tile (row-major, kTileLd floats per row), then add the tile's rows j < r into the
      // pages' rows: consecutive threads take consecutive columns (coalesced atomics).
      constexpr int kM = Mma::Shape::kM, kN = Mma::Shape::kN, kLd = Tr::kTileLd;
      using WarpCount = typename Mma::WarpCount;
      const int warp_mn = warp_idx % (WarpCount::kM * WarpCount::kN);
      typename Mma::Operator::IteratorC staged({shared.kernel.tile, cutlass::layout::RowMajor(kLd)}, lane_idx);
      staged.add_tile_offset({warp_mn % WarpCount::kM, warp_mn / WarpCount::kM});
      staged.store(accumulators);
      __syncthreads();
      const int rows = size.m() - row0 < kM ? size.m() - row0 : kM;
      const int cols = size.n() - col0 < kN ? size.n() - col0 : kN;
      for (int e = thread_idx; e < rows * (kN / 2); e += Tr::kThreads) {
        const int i = e / (kN / 2), c = 2 * (e % (kN / 2));
        if (c >= cols) continue;
        const int32_t page = d.d_idx[row0 + i];
        const float a = d.alpha * shared.kernel.tile[i * kLd + c];
        const float b = c + 1 < cols ? d.alpha * shared.kernel.tile[i * kLd + c + 1] : 0.f;
        const int64_t at = static_cast<int64_t>(page) * d.ldd + col0 + c;
        if (p.grad_f32) {
          float* g = static_cast<float*>(p.grad) + at;
          atomicAdd(g, a);
          if (c + 1 < cols) atomicAdd(g + 1, b);
        } else {
          NativeOf<Element>* g = static_cast<NativeOf<Element>*>(p.grad) + at;
          // ldd and col0 + c are even: the pair is 4-byte aligned.
          if (c + 1 < cols) {
            atomic_add_pair(g, a, b);
          } else {
            atomicAdd(g, from_float<NativeOf<Element>>(a));
          }
        }
      }
    }

    visitor.advance(gridDim.x);
  }
}

// Persistent grid: as many blocks as fit on the device at once (each loops over tiles).
template <typename Element, Kind K>
cudaError_t launch_one(const KernelParams& p, int sm_count, cudaStream_t stream) {
  using Tr = Traits<Element, K>;
  constexpr int smem = static_cast<int>(sizeof(typename Tr::SharedStorage));
  static_assert(smem <= 48 * 1024, "the tile configuration must fit the default shared memory of a launch");
  static const int per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, lora_grouped_kernel<Element, K>, Tr::kThreads, smem) !=
        cudaSuccess) {
      (void)cudaGetLastError();  // clear it: the launch below must not report the query's error
      n = 1;
    }
    return n > 0 ? n : 1;
  }();
  const int blocks = (sm_count > 0 ? sm_count : 1) * per_sm;
  lora_grouped_kernel<Element, K><<<blocks, Tr::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// hs[pos, j] = round(sum over the splits with columns of partial[split, pos, j]) for the
// positions and ranks of each accepted segment (the partial sums are already scaled).  One
// block per slot; positions of other segments and columns j >= r keep hs's zeros.
template <typename Element>
__global__ void __launch_bounds__(256) grouped_reduce_kernel(KernelParams p) {
  const int32_t s = blockIdx.x;
  const ProblemSize first = p.shrink_sizes[static_cast<int64_t>(s) * p.k_splits];
  if (first.m == 0) return;
  const int64_t begin = p.seg_begin[s], n = first.n, T = p.plan.num_tokens;
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(first.m) * n; e += blockDim.x) {
    const int64_t pos = begin + e / n, j = e % n;
    float acc = 0.f;
    for (int32_t q = 0; q < p.k_splits; ++q)
      if (p.shrink_sizes[static_cast<int64_t>(s) * p.k_splits + q].k > 0) acc += p.partial[(q * T + pos) * p.ldh + j];
    static_cast<Element*>(p.hs)[pos * p.ldh + j] = Element(acc);
  }
}

template <typename Element>
cudaError_t launch_shrink_expand(const KernelParams& p, int sm_count, cudaStream_t stream) {
  cudaError_t err;
  if (p.k_splits > 1) {
    err = launch_one<Element, Kind::kShrinkPartial>(p, sm_count, stream);
    if (err != cudaSuccess) return err;
    grouped_reduce_kernel<Element><<<static_cast<unsigned>(p.plan.num_slots), 256, 0, stream>>>(p);
    err = cudaGetLastError();
  } else {
    err = launch_one<Element, Kind::kShrink>(p, sm_count, stream);
  }
  if (err != cudaSuccess || p.out == nullptr) return err;
  return launch_one<Element, Kind::kExpand>(p, sm_count, stream);
}

template <Family F, DType D>
cudaError_t launch_gemms(const KernelParams& p, int sm_count, cudaStream_t stream) {
  static_assert(D == DType::kFloat16 || D == DType::kBFloat16, "the grouped GEMMs take 16-bit operands");
  using Element = std::conditional_t<D == DType::kFloat16, cutlass::half_t, cutlass::bfloat16_t>;
  if constexpr (F == Family::kGrad) {
    return launch_one<Element, Kind::kGrad>(p, sm_count, stream);
  } else {
    return launch_shrink_expand<Element>(p, sm_count, stream);
  }
}

}  // namespace minlora::kernels::grouped
#else
namespace minlora::kernels::grouped {
template <Family F, DType D>
cudaError_t launch_gemms(const KernelParams&, int, cudaStream_t) {
  return cudaErrorNotSupported;
}
}  // namespace minlora::kernels::grouped
#endif
