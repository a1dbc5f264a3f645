// Placeholder of the grouped GEMM path until its CUTLASS kernels land: reports that the
// path is not compiled, so the dispatcher sends every segment to the gather kernel.
#include "lora_grouped.cuh"

namespace minlora::kernels {

bool grouped_compiled() { return false; }
bool grouped_aligned(const GroupedParams&) { return false; }
size_t grouped_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }
cudaError_t launch_grouped(const GroupedParams&, DType, void*, int, cudaStream_t) { return cudaErrorNotSupported; }

}  // namespace minlora::kernels
