// The grouped GEMM kernels for one dtype (see lora_grouped_impl.cuh); a separate translation
// unit per dtype so the heavy CUTLASS instantiations build in parallel.
#include <cuda_runtime.h>

#if __has_include("cutlass/cutlass.h")
#include "lora_grouped_impl.cuh"

namespace minlora::kernels::grouped {
cudaError_t launch_grouped_f16(const GroupedKernelParams& p, int sm_count, cudaStream_t stream) {
  return launch_shrink_expand<cutlass::half_t>(p, sm_count, stream);
}
}  // namespace minlora::kernels::grouped
#else
#include "lora_grouped_problems.h"

namespace minlora::kernels::grouped {
cudaError_t launch_grouped_f16(const GroupedKernelParams&, int, cudaStream_t) { return cudaErrorNotSupported; }
}  // namespace minlora::kernels::grouped
#endif
