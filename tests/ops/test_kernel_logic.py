"""The CUDA kernels' index logic on the CPU (no GPU needed).

tests/ops/kernel_logic/harness.cpp is built here with g++ and AddressSanitizer / UBSan over the
same __host__ __device__ headers the kernels include (csrc/cuda/kernels/lora_index.h,
dispatch.h, lora_grouped_desc.h).  It checks, over hostile random plans, that every token is
handled exactly once by exactly one path, and it emulates whole op calls block by block and
GEMM problem by problem (driven by the kernels' operand descriptors) in float64, counting every
output write; the results are compared here with the float64 reference.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import REPO
from helpers.cases import LoraCase, make_case, mixed_ranks, rel_error
from minlora.reference import build_plan_ref, lora_backward_accumulate_ref, lora_forward_ref

SOURCE = Path(__file__).resolve().parent / "kernel_logic" / "harness.cpp"
KERNELS = REPO / "csrc" / "cuda" / "kernels"
MODES = {"auto": 0, "fallback": 1, "gather": 2, "grouped": 3}  # kernels::KernelMode


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the kernel-logic harness")
    exe = tmp_path_factory.mktemp("kernel_logic") / "harness"
    flags = ["-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-Wall"]
    done = subprocess.run([cxx, *flags, f"-I{KERNELS}", str(SOURCE), "-o", str(exe)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return exe


def run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hostile_plans_every_token_one_owner(harness, seed):
    """Damaged orders, segment offsets, positions and slots: each token is handled by at most
    one gather block or grouped segment (exactly its owner), never out of bounds (ASan)."""
    done = run(harness, "selftest", str(seed), "4000")
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "selftest ok" in done.stdout


# ---------------------------------------------------------------- emulated op calls


def _write_arrays(path: Path, arrays: dict[str, torch.Tensor]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(arrays)))
        for name, t in arrays.items():
            t = t.detach().cpu().contiguous()
            code = {torch.float64: 0, torch.int32: 1, torch.int64: 2}[t.dtype]
            f.write(struct.pack("<i", len(name)) + name.encode())
            f.write(struct.pack("<ii", code, t.dim()) + struct.pack(f"<{t.dim()}q", *t.shape))
            f.write(t.numpy().tobytes())


def _read_arrays(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    (count,), at = struct.unpack_from("<i", data), 4
    out = {}
    for _ in range(count):
        (n,) = struct.unpack_from("<i", data, at)
        name = data[at + 4 : at + 4 + n].decode()
        at += 4 + n
        (length,) = struct.unpack_from("<q", data, at)
        at += 8
        out[name] = torch.frombuffer(bytearray(data[at : at + 8 * length]), dtype=torch.float64).clone()
        at += 8 * length
    return out


def emulate(exe: Path, tmp: Path, case: LoraCase, kind: str, mode: str = "auto", *, sm_count: int = 132,
            vec: int = 8, half: bool = True, aligned: bool = True, max_segment: int = -1, plan: str = "none",
            y0: torch.Tensor | None = None, grad_y: torch.Tensor | None = None, acc=None, grad_x: bool = True,
            given: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Runs the harness on `case`; plan: none | plan (order, seg_offsets) | positions (with
    positions) | given (the (order, seg_offsets, positions) passed)."""
    kinds = {"forward": 0, "add": 1, "accumulate": 2}
    cfg = [kinds[kind], MODES[mode], sm_count, vec, int(half), int(aligned), max_segment, int(grad_x)]
    arrays = {
        "config": torch.tensor(cfg, dtype=torch.int64),
        "x": case.x.double(), "a_pool": case.a_pool.double(), "b_pool": case.b_pool.double(),
        "a_pages": case.a_pages, "b_pages": case.b_pages, "ranks": case.ranks,
        "scales": case.scales.double(), "token_slot": case.token_slot,
    }
    if plan == "given":
        arrays["order"], arrays["seg_offsets"], arrays["positions"] = given
    elif plan != "none":
        order, seg = build_plan_ref(case.token_slot, case.ranks.shape[0])
        # Any permutation within segments is a valid plan: reverse each segment.
        for s in range(case.ranks.shape[0]):
            order[seg[s]:seg[s + 1]] = order[seg[s]:seg[s + 1]].flip(0)
        arrays["order"], arrays["seg_offsets"] = order, seg
        if plan == "positions":
            positions = torch.empty_like(order)
            positions[order.long()] = torch.arange(order.shape[0], dtype=torch.int32)
            arrays["positions"] = positions
    if y0 is not None:
        arrays["y0"] = y0.double()
    if grad_y is not None:
        arrays["grad_y"] = grad_y.double()
        arrays["acc_a"], arrays["acc_b"] = acc[0].double(), acc[1].double()
    src, dst = tmp / "in.bin", tmp / "out.bin"
    _write_arrays(src, arrays)
    done = run(exe, "emulate", str(src), str(dst))
    assert done.returncode == 0, done.stderr[-4000:]
    return _read_arrays(dst)


def _case(shape: str, seed: int) -> LoraCase:
    g = torch.Generator().manual_seed(seed)
    if shape == "mixed":  # long and short segments, ranks 1..128, a rank-0 slot, no-adapter rows
        return make_case(300, 96, 72, mixed_ranks(), slot_weights=[20, 1, 10, 1, 1, 5, 1, 10, 0.5, 1, 3, 1], generator=g)
    if shape == "decode":  # one token per adapter, few tokens: split grids
        case = make_case(24, 512, 384, [int(r) for r in torch.randint(1, 40, (24,), generator=g)], generator=g)
        case.token_slot = torch.randperm(24, generator=g).to(torch.int32)
        return case
    if shape == "long":  # few long segments (split-K of the grouped shrink), a page shared by two slots
        case = make_case(200, 1024, 64, [36, 8, 5], slot_weights=[10, 5, 1], generator=g)
        case.a_pages[1, :4] = case.a_pages[0, :4]
        case.b_pages[1, 2] = case.b_pages[0, 0]
        case.a_pool[torch.isnan(case.a_pool)] = 0.25
        case.b_pool[torch.isnan(case.b_pool)] = 0.25
        return case
    raise ValueError(shape)


CONFIGS = [
    # (mode, sm_count, vec, plan, max_segment)
    ("auto", 132, 8, "positions", -1),
    ("auto", 132, 8, "plan", -1),
    ("auto", 132, 8, "none", -1),
    ("auto", 4, 1, "positions", -1),
    ("auto", 132, 8, "positions", 1),  # the step says one token per slot
    ("auto", 132, 8, "positions", 40),
    ("gather", 132, 8, "positions", -1),
    ("gather", 1, 8, "none", -1),
    ("grouped", 132, 8, "positions", -1),
    ("grouped", 8, 8, "none", -1),
    ("fallback", 132, 1, "positions", -1),
]


@pytest.mark.parametrize("shape", ["mixed", "decode", "long"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_emulated_forward_matches_reference(harness, tmp_path, shape, config):
    mode, sms, vec, plan, max_seg = config
    case = _case(shape, 11)
    want = lora_forward_ref(*case.args())
    got = emulate(harness, tmp_path, case, "forward", mode, sm_count=sms, vec=vec, plan=plan, max_segment=max_seg)
    assert torch.isfinite(got["y"]).all(), "an unused (NaN) page was read or a row left unwritten"
    assert rel_error(got["y"].view(want.shape), want) <= 1e-12
    y0 = torch.randn(want.shape, dtype=torch.float64)
    got = emulate(harness, tmp_path, case, "add", mode, sm_count=sms, vec=vec, plan=plan, max_segment=max_seg, y0=y0)
    y = got["y"].view(want.shape)
    none = (case.token_slot == -1) | (case.ranks.long()[case.token_slot.long().clamp(min=0)] == 0)
    assert torch.equal(y[none], y0[none]), "a row without an adapter was changed"
    assert rel_error(y - y0, want) <= 1e-12


@pytest.mark.parametrize("shape", ["mixed", "decode", "long"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_emulated_accumulating_backward_matches_reference(harness, tmp_path, shape, config):
    mode, sms, vec, plan, max_seg = config
    case = _case(shape, 12)
    if shape == "mixed":
        case.a_pool[torch.isnan(case.a_pool)] = 0.5  # gradients of pages read only as x-side products
    grad_y = torch.randn(case.x.shape[0], case.b_pool.shape[1], dtype=torch.float64)
    acc = (torch.randn(case.a_pool.shape, dtype=torch.float64), torch.randn(case.b_pool.shape, dtype=torch.float64))
    acc[0][~case.used_a_pages] = float("nan")  # pages the batch does not use are neither read nor written
    acc[1][~case.used_b_pages] = float("nan")
    got = emulate(harness, tmp_path, case, "accumulate", mode, sm_count=sms, vec=vec, plan=plan, max_segment=max_seg,
                  grad_y=grad_y, acc=acc)
    want_x, want_a, want_b = lora_backward_accumulate_ref(*acc, grad_y, *case.args())
    got_a, got_b = got["acc_a"].view(want_a.shape), got["acc_b"].view(want_b.shape)
    for name, g, w, used in (("grad_a", got_a, want_a, case.used_a_pages), ("grad_b", got_b, want_b, case.used_b_pages)):
        assert torch.isnan(g[~used]).all(), f"{name}: an unused page was touched"
        assert rel_error(g[used], w[used]) <= 1e-12, name
    assert rel_error(got["grad_x"].view(want_x.shape), want_x) <= 1e-12


def test_emulated_hostile_plans_write_each_row_once(harness, tmp_path):
    """A plan whose order repeats a token and drops another, with positions that lie: the
    emulated kernels write no element twice (the harness counts) and every row once (zeros
    where nobody owns it), in every kernel mode."""
    case = _case("mixed", 13)
    order, seg = build_plan_ref(case.token_slot, case.ranks.shape[0])
    bad = order.clone()
    long_slot = int(torch.argmax(seg[1:] - seg[:-1]))
    bad[seg[long_slot] + 1] = bad[seg[long_slot]]  # a repeat inside a long (grouped) segment
    bad[0], bad[-1] = bad[-1], bad[0]  # a token moved to the wrong segment
    positions = torch.empty_like(order)
    positions[bad.long()] = torch.arange(order.shape[0], dtype=torch.int32)
    for mode in MODES:
        got = emulate(harness, tmp_path, case, "forward", mode, plan="given", given=(bad, seg, positions))
        assert got["y"].numel() == case.x.shape[0] * case.b_pool.shape[1]
        assert not torch.isnan(got["y"]).any(), "a row was left unwritten"
