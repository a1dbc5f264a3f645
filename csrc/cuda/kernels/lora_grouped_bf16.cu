// The grouped shrink / expand GEMMs for bfloat16 (see lora_grouped_impl.cuh); one translation
// unit per kernel family and dtype so the heavy CUTLASS instantiations build in parallel.
#include <cuda_runtime.h>

#include "lora_grouped_launch.h"

#if __has_include("cutlass/cutlass.h")
#include "lora_grouped_impl.cuh"

namespace minlora::kernels::grouped {
cudaError_t launch_gemms_bf16(const KernelParams& p, int sm_count, cudaStream_t stream) {
  return launch_shrink_expand<cutlass::bfloat16_t>(p, sm_count, stream);
}
}  // namespace minlora::kernels::grouped
#else
namespace minlora::kernels::grouped {
cudaError_t launch_gemms_bf16(const KernelParams&, int, cudaStream_t) { return cudaErrorNotSupported; }
}  // namespace minlora::kernels::grouped
#endif
