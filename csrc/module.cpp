// The Python module minlora._C: importing it registers the torch.ops.minlora.* operators
// (ops.cpp and the backends' TORCH_LIBRARY_IMPL blocks) and the page allocator.
#include <torch/extension.h>

#include "lora_op.h"
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
  m.def("cpu_min_parallel_work", &minlora::cpu::get_min_parallel_work,
        "Multiply-adds below which a CPU op call runs on the calling thread");
  m.def("set_cpu_min_parallel_work", &minlora::cpu::set_min_parallel_work, py::arg("multiply_adds"),
        "Sets that threshold; returns the previous one");
}
