// The grouped pool-gradient GEMM for float16: one translation unit per kernel family and dtype,
// so that the heavy CUTLASS instantiations build in parallel (lora_grouped_launch.h).
#include "lora_grouped_impl.cuh"

namespace minlora::kernels::grouped {
template cudaError_t launch_gemms<Family::kGrad, DType::kFloat16>(const KernelParams&, int, cudaStream_t);
}  // namespace minlora::kernels::grouped
