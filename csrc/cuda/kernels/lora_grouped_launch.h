// The per-dtype GEMM launchers of the grouped path (lora_grouped_{f16,bf16}.cu and
// lora_grouped_grad_{f16,bf16}.cu: one heavy CUTLASS translation unit each, so they build in
// parallel), called by lora_grouped.cu after its prep kernel filled the workspace.
#pragma once

#include <cuda_runtime.h>

#include "lora_grouped_desc.h"

namespace minlora::kernels::grouped {

// The shrink (into hs, or split-K partial sums and their reduction into hs) and, when p.out
// is set, the expand.
cudaError_t launch_gemms_f16(const KernelParams& p, int sm_count, cudaStream_t stream);
cudaError_t launch_gemms_bf16(const KernelParams& p, int sm_count, cudaStream_t stream);
// The pool-gradient GEMM.
cudaError_t launch_grad_gemm_f16(const KernelParams& p, int sm_count, cudaStream_t stream);
cudaError_t launch_grad_gemm_bf16(const KernelParams& p, int sm_count, cudaStream_t stream);

}  // namespace minlora::kernels::grouped
