"""The extension registers every op on CPU, and on CUDA wherever the build could compile CUDA."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import minlora
from helpers import REPO
from minlora.build_info import cuda_kernels_registered

sys.path.insert(0, str(REPO / "third_party"))
import find_deps  # noqa: E402

OPS = ["build_plan", "plan_positions", "lora_forward", "lora_forward_add_", "lora_backward",
       "lora_backward_accumulate_"]
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


def _fatbin_entries(data: bytes) -> list[list[tuple[int, int, bytes]]]:
    """The CUDA fat binaries embedded in a shared object: for each, its entries as
    (kind, arch, payload) with kind 1 = PTX, 2 = ELF (cubin) and arch e.g. 80 or 90.

    The container layout (what cuobjdump reads): a header (magic 0xBA55ED50, u16 version,
    u16 header size, u64 size of the entries), then entries of (u16 kind, u16, u32 header
    size, u64 payload size, u32, u32, u16 minor, u16 major, u32 arch, ...) and their payload."""
    import struct

    magic = (0xBA55ED50).to_bytes(4, "little")
    fatbins, at = [], data.find(magic)
    while at >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, at)
        entries, p, end = [], at + header, at + header + size
        while p + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, p)
            (arch,) = struct.unpack_from("<I", data, p + 28)
            if entry_header == 0:
                break
            entries.append((kind, arch, data[p + entry_header : p + entry_header + payload]))
            p += entry_header + payload
        fatbins.append(entries)
        at = data.find(magic, max(end, at + 4))
    return fatbins


@pytest.mark.skipif(not CUDA_EXPECTED, reason="this torch or machine cannot build CUDA code")
def test_cuda_code_carries_ptx_for_the_highest_arch():
    """Every CUDA translation unit carries a cubin per MINLORA_CUDA_ARCHS entry and PTX for the
    highest architecture without the arch-specific "a" (compute_90 for "80;90a"), so a newer GPU
    compiles the PTX when the module loads instead of finding no kernel image."""
    import re

    fatbins = _fatbin_entries(Path(minlora._C.__file__).read_bytes())
    archs = [int(re.match(r"\d+", a).group()) for a in os.environ.get("MINLORA_CUDA_ARCHS", "80;90a").split(";")]
    assert len(fatbins) >= 6, f"expected a fat binary per CUDA source, found {len(fatbins)}"
    for n, entries in enumerate(fatbins):
        cubins = {arch for kind, arch, _ in entries if kind == 2}
        ptx = [(arch, payload) for kind, arch, payload in entries if kind == 1]
        assert set(archs) <= cubins, f"fat binary {n}: cubins for {sorted(cubins)}, want {archs}"
        assert [arch for arch, _ in ptx] == [max(archs)], f"fat binary {n}: PTX for {[a for a, _ in ptx]}"
        text = ptx[0][1]
        if b".target" in text:  # uncompressed PTX: its target must be the portable one
            assert re.search(rb"\.target sm_%d\b(?!a)" % max(archs), text), f"fat binary {n}: PTX is arch-specific"


def test_registered_backends_match_the_build():
    """Each backend registers itself: a build without the CUDA sources has no CUDA kernels (no stubs)."""
    for op in OPS:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"minlora::{op}", "CUDA")
        assert has_cuda == minlora._C.cuda_built(), op
