// The GEMM launchers of the grouped path, called by lora_grouped.cu after its prep kernel
// filled the workspace.  Each (family, dtype) is one heavy CUTLASS instantiation of
// lora_grouped_impl.cuh's definition, in a translation unit of its own
// (lora_grouped_{f16,bf16}.cu, lora_grouped_grad_{f16,bf16}.cu) so that they build in parallel.
#pragma once

#include <cuda_runtime.h>

#include "kernel_types.h"
#include "lora_grouped_desc.h"

#if __has_include("cutlass/cutlass.h")
#define MINLORA_HAVE_CUTLASS 1
#else
#define MINLORA_HAVE_CUTLASS 0
#endif

namespace minlora::kernels::grouped {

// kShrinkExpand: the shrink (into hs, or split-K partial sums and their reduction into hs)
// and, when p.out is set, the expand.  kGrad: the pool-gradient GEMM.
enum class Family { kShrinkExpand, kGrad };

// D: kFloat16 or kBFloat16.  cudaErrorNotSupported in a build without CUTLASS.
template <Family F, DType D>
cudaError_t launch_gemms(const KernelParams& p, int sm_count, cudaStream_t stream);

}  // namespace minlora::kernels::grouped
