// The Python module minlora._C: importing it registers the torch.ops.minlora.* operators.
#include <torch/extension.h>

#include "backend.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "minlora native extension: LoRA operators (torch.ops.minlora.*)";
  m.def("cuda_built", &minlora::cuda::available, "Whether this build has the CUDA kernels");
}
