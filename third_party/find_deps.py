"""Where the build finds the CUDA toolkit, the CUDA library headers and CUTLASS.

Imported by setup.py; no third-party code lives in this repository.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil


def _is_toolkit(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h")
    )


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else the usual places.

    `nvcc` on PATH may be a wrapper script, so its directory is tried but not trusted.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and _is_toolkit(root):
            return os.path.realpath(root)
    return None


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def cuda_include_dirs() -> list[str]:
    """Headers of the CUDA libraries torch's headers include (cuBLAS, cuSPARSE, ...).

    A minimal toolkit lacks them; torch's CUDA wheels install them under nvidia/*/include.
    """
    nvidia = _package_dir("nvidia")
    if nvidia is None:
        return []
    return sorted(d for d in glob.glob(os.path.join(nvidia, "*", "include")) if os.path.isdir(d))


def cutlass_include_dirs() -> list[str]:
    """CUTLASS and CuTe headers: $CUTLASS_DIR (a CUTLASS checkout), else the nvidia-cutlass wheel."""
    root = os.environ.get("CUTLASS_DIR")
    if not root:
        lib = _package_dir("cutlass_library")
        root = os.path.join(lib, "source") if lib else None
    if not root or not os.path.isfile(os.path.join(root, "include", "cutlass", "cutlass.h")):
        return []
    return [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
