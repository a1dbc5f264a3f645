// Stand-ins for the CUDA backend in a build without CUDA: no tensor can reach them except
// through a CUDA dispatch key, which such a build does not register.
#include "../backend.h"

namespace minlora::cuda {

namespace {
[[noreturn]] void unavailable() { TORCH_CHECK(false, "minlora was built without CUDA support"); }
}  // namespace

bool available() { return false; }
bool stream_is_capturing(const at::Device&) { return false; }
void lora_forward_add(at::Tensor&, const LoraArgs&, const Plan*) { unavailable(); }
Grads lora_backward(const at::Tensor&, const LoraArgs&, const Plan*, std::array<bool, 3>) { unavailable(); }
Plan build_plan(const at::Tensor&, int64_t) { unavailable(); }

}  // namespace minlora::cuda
