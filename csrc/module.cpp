// The Python module minlora._C: importing it registers the torch.ops.minlora.* operators
// (ops.cpp and the backends' TORCH_LIBRARY_IMPL blocks) and the page allocator.
#include <torch/extension.h>

#include "pool/bindings.h"

namespace {
#ifdef MINLORA_WITH_CUDA
constexpr bool kCudaBuilt = true;
#else
constexpr bool kCudaBuilt = false;
#endif
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "minlora native extension: LoRA operators (torch.ops.minlora.*)";
  register_pool_bindings(m);
  m.def("cuda_built", [] { return kCudaBuilt; }, "Whether this build has the CUDA kernels");
}
