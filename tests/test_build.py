"""The extension registers every op on CPU, and on CUDA wherever the build could compile CUDA."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import minlora
from minlora.build_info import cuda_kernels_registered

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "third_party"))
import find_deps  # noqa: E402

OPS = ["build_plan", "lora_forward", "lora_forward_add_", "lora_backward"]
CUDA_EXPECTED = (
    torch.version.cuda is not None
    and find_deps.cuda_home() is not None
    and os.environ.get("MINLORA_FORCE_CPU", "0") != "1"
)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"minlora::{op}", "CPU")


@pytest.mark.skipif(not CUDA_EXPECTED, reason="this torch or machine cannot build CUDA code")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    assert minlora._C.cuda_built()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"minlora::{op}", "CUDA")
    assert cuda_kernels_registered()


@pytest.mark.skipif(not CUDA_EXPECTED, reason="this torch or machine cannot build CUDA code")
def test_cuda_code_compiled_for_sm80_and_sm90a():
    """The fat binary holds a cubin for each architecture of MINLORA_CUDA_ARCHS (default 80;90a)."""
    data = Path(minlora._C.__file__).read_bytes()
    archs = os.environ.get("MINLORA_CUDA_ARCHS", "80;90a").split(";")
    for arch in archs:
        assert f"-arch sm_{arch} ".encode() in data, f"no sm_{arch} code in {Path(minlora._C.__file__).name}"


def test_registered_backends_match_the_build():
    """Each backend registers itself: a build without the CUDA sources has no CUDA kernels (no stubs)."""
    for op in OPS:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"minlora::{op}", "CUDA")
        assert has_cuda == minlora._C.cuda_built(), op
