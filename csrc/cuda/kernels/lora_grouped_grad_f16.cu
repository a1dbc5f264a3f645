// The grouped pool-gradient GEMM for float16 (see lora_grouped_impl.cuh); its own translation
// unit so it builds in parallel with the others.
#include <cuda_runtime.h>

#include "lora_grouped_launch.h"

#if __has_include("cutlass/cutlass.h")
#include "lora_grouped_impl.cuh"

namespace minlora::kernels::grouped {
cudaError_t launch_grad_gemm_f16(const KernelParams& p, int sm_count, cudaStream_t stream) {
  return launch_one<cutlass::half_t, Kind::kGrad>(p, sm_count, stream);
}
}  // namespace minlora::kernels::grouped
#else
namespace minlora::kernels::grouped {
cudaError_t launch_grad_gemm_f16(const KernelParams&, int, cudaStream_t) { return cudaErrorNotSupported; }
}  // namespace minlora::kernels::grouped
#endif
