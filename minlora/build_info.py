"""What this build of minlora has: `python -m minlora.build_info`."""
from __future__ import annotations

import os

import torch

import minlora

OPS = ("build_plan", "plan_positions", "lora_forward", "lora_forward_add_", "lora_backward",
       "lora_backward_accumulate_")


def kernels_registered(dispatch_key: str) -> bool:
    """Whether every torch.ops.minlora op has a kernel for `dispatch_key` ("CPU" or "CUDA")."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"minlora::{op}", dispatch_key) for op in OPS)


def cuda_kernels_registered() -> bool:
    """Whether the CUDA backend registered its kernels (builds without the CUDA sources have none)."""
    return kernels_registered("CUDA")


def main() -> None:
    check = os.environ.get("MINLORA_CHECK_INDICES") == "1"
    print(
        f"minlora {minlora.__version__}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"CUDA kernels built: {minlora._C.cuda_built()}, "
        f"registered for CPU: {kernels_registered('CPU')}, for CUDA: {cuda_kernels_registered()}, "
        f"GPU present: {torch.cuda.is_available()}, "
        f"host checks of CUDA index values (MINLORA_CHECK_INDICES): {'on' if check else 'off'}"
    )


if __name__ == "__main__":
    main()
