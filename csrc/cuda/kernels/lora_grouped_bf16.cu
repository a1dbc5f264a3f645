// The grouped shrink / expand GEMMs for bfloat16: one translation unit per kernel family and dtype,
// so that the heavy CUTLASS instantiations build in parallel (lora_grouped_launch.h).
#include "lora_grouped_impl.cuh"

namespace minlora::kernels::grouped {
template cudaError_t launch_gemms<Family::kShrinkExpand, DType::kBFloat16>(const KernelParams&, int, cudaStream_t);
}  // namespace minlora::kernels::grouped
