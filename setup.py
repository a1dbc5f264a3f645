"""Build of minlora and its extension minlora._C (torch.utils.cpp_extension, ninja).

The schemas (csrc/ops.cpp), the shared argument checks, the CPU backend (csrc/cpu) and the
page allocator (csrc/pool) are always built.  The CUDA backend (csrc/cuda: its host side and
csrc/cuda/kernels) is built when torch has CUDA and a CUDA toolkit is found, for the
architectures in MINLORA_CUDA_ARCHS (default "80;90a", plus PTX for the highest); MINLORA_FORCE_CPU=1
skips it.  Each
backend registers its own kernels, so a CPU-only build simply leaves the CUDA sources out.  CUTLASS headers come from the nvidia-cutlass wheel
(CUTLASS_DIR overrides); see third_party/README.md.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "third_party"))

import find_deps  # noqa: E402  (third_party/find_deps.py: where the toolkit and headers are)

CUDA_HOME = find_deps.cuda_home()
if CUDA_HOME and "CUDA_HOME" not in os.environ:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def want_cuda() -> bool:
    if os.environ.get("MINLORA_FORCE_CPU", "0") == "1":
        return False
    if torch.version.cuda is None:
        print("minlora: torch has no CUDA; building the CPU kernels only")
        return False
    if CUDA_HOME is None:
        print("minlora: no CUDA toolkit found (set CUDA_HOME); building the CPU kernels only")
        return False
    return True


def cuda_arch_flags() -> list[str]:
    """A cubin per architecture of MINLORA_CUDA_ARCHS, plus PTX for the highest one (without an
    "a" suffix: arch-specific PTX cannot be compiled for newer GPUs), so GPUs newer than every
    cubin compile the PTX when the module loads.  MINLORA_CUDA_PTX=0 leaves the PTX out."""
    archs = [a.strip() for a in os.environ.get("MINLORA_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    numbers = []
    for a in archs:
        m = re.fullmatch(r"(\d+)([af]?)", a)
        if m is None:
            raise SystemExit(f"minlora: MINLORA_CUDA_ARCHS entry {a!r} is not like 80, 90 or 90a")
        numbers.append(int(m.group(1)))
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if numbers and os.environ.get("MINLORA_CUDA_PTX", "1") != "0":
        flags.append(f"-gencode=arch=compute_{max(numbers)},code=compute_{max(numbers)}")
    return flags


# C++20: torch 2.13's headers and later need it.  -fopenmp: at::parallel_for is inline and runs
# serially in code built without it.
cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp"]
link_flags = ["-fopenmp"]
common_sources = rel(
    glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "pool", "*.cpp"))
)

if want_cuda():
    sources = common_sources + rel(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "kernels", "*.cu"))
    )
    include_dirs = find_deps.cuda_include_dirs() + find_deps.cutlass_include_dirs()
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "--use_fast_math",
        "-lineinfo",
        # CUTLASS's device-side asserts (index pointers present) cost registers and build
        # time; the launchers check those conditions on the host instead.
        "-DNDEBUG",
        f"--threads={os.environ.get('MINLORA_NVCC_THREADS', '2')}",
    ] + cuda_arch_flags()
    ext = CUDAExtension(
        "minlora._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("MINLORA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("minlora._C", common_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

# The package's metadata, dependencies and console script are in pyproject.toml; this file
# only describes the extension.
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
