// The Python module minlora._C: importing it registers the torch.ops.minlora.* operators.
#include <torch/extension.h>

#include "backend.h"
#include "pool/bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "minlora native extension: LoRA operators (torch.ops.minlora.*)";
  register_pool_bindings(m);
  m.def("cuda_built", &minlora::cuda::available, "Whether this build has the CUDA kernels");
}
