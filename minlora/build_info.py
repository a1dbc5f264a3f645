"""What this build of minlora has: `python -m minlora.build_info`."""
from __future__ import annotations

import torch

import minlora


def cuda_kernels_registered() -> bool:
    """Whether torch.ops.minlora.lora_forward has a CUDA kernel."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("minlora::lora_forward", "CUDA")


def main() -> None:
    print(
        f"minlora {minlora.__version__}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"CUDA kernels built: {minlora._C.cuda_built()}, "
        f"registered for CUDA: {cuda_kernels_registered()}, GPU present: {torch.cuda.is_available()}"
    )


if __name__ == "__main__":
    main()
