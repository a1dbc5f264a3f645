"""The CPU op's threading threshold (minlora.ops.set_cpu_min_parallel_work): it chooses whether
a call runs in a parallel region or on the calling thread, never what the call computes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import minlora
from helpers import REPO, pythonpath
from helpers.cases import TOLERANCE, make_case, mixed_ranks, rel_error
from minlora.ops import set_cpu_min_parallel_work
from minlora.reference import lora_backward_ref, lora_forward_ref


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _with_threshold(value: int, fn):
    previous = set_cpu_min_parallel_work(value)
    try:
        return fn()
    finally:
        assert set_cpu_min_parallel_work(previous) == value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_decode_call_in_a_region_equals_it_on_the_calling_thread(dtype, two_threads):
    # A decode-sized call: short segments (the token path), far below the default threshold.
    case = make_case(48, 1024, 768, mixed_ranks(), dtype, balanced=True)
    y0 = torch.randn(48, 768, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(48, 768, dtype=torch.float64).to(dtype)

    def run():
        y = y0.clone()
        minlora.ops.lora_add_(y, *case.args())
        return minlora.lora(*case.args()), y, minlora.ops.lora_backward(grad_y, *case.args())

    inline = _with_threshold(1 << 40, run)
    region = _with_threshold(0, run)
    # Every output row is written by one work item either way: the same bits.
    assert torch.equal(inline[0], region[0]) and torch.equal(inline[1], region[1])
    assert all(torch.equal(a, b) for a, b in zip(inline[2], region[2]))
    assert rel_error(region[0], lora_forward_ref(*case.args())) <= TOLERANCE[dtype]
    for g, w in zip(region[2], lora_backward_ref(grad_y, *case.args())):
        assert rel_error(g, w) <= 3 * TOLERANCE[dtype]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_a_bad_threshold_is_refused_and_the_old_one_kept(bad):
    before = set_cpu_min_parallel_work(123)
    try:
        with pytest.raises(ValueError, match="multiply_adds must be a non-negative integer"):
            set_cpu_min_parallel_work(bad)
        assert set_cpu_min_parallel_work(123) == 123
    finally:
        set_cpu_min_parallel_work(before)


def _child(code: str, value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MINLORA_CPU_MIN_PARALLEL_WORK=value, PYTHONPATH=pythonpath())
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_the_environment_sets_the_initial_threshold():
    out = _child("import minlora.ops as o; print(o.set_cpu_min_parallel_work(7))", "4096")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4096"]
    default = _child("import minlora.ops as o; print(o.set_cpu_min_parallel_work(7))", "")
    assert default.stdout.split() == [str(1 << 25)]


@pytest.mark.parametrize("value", ["lots", "-3", "1e6"])
def test_a_bad_environment_value_fails_the_import_naming_it(value):
    out = _child("import minlora.ops", value)
    assert out.returncode != 0
    assert f"ValueError: MINLORA_CPU_MIN_PARALLEL_WORK must be a non-negative integer, got {value!r}" in out.stderr
